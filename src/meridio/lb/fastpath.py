"""Which targets the ingress fast path may send to, asked of the kernel (kernel mode).

The fast path (see :mod:`meridio.lb.nftables`) forwards a packet with ``fwd ip to <target>
device <link>``: right only when the target is on a link of the LB's own and its neighbour
entry is known. So for every target address this asks the kernel two things, on a netlink
socket of its own: the route to the address (``RTM_GETROUTE``, as ``ip route get``: it must be
a unicast route without a gateway, whose output link is the one to use) and the neighbour
table (one ``RTM_GETNEIGH`` dump: an entry on that link in a state with a link-layer address,
REACHABLE, STALE, DELAY, PROBE, PERMANENT or NOARP). A target that fails either (no route yet,
a route through a gateway, a neighbour never resolved or FAILED) stays on the routed path,
which resolves the neighbour and answers what the fast path cannot (ICMP errors, fragments);
the next reconcile pass asks again.

The requests and the parsing are pure (:func:`route_request`, :func:`neigh_dump_request`,
:func:`parse_route`, :func:`parse_neigh`, :func:`eligible`); :func:`probe` does the I/O.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import trio

from meridio.core.rtnl import attribute, attributes

__all__ = [
    "NUD_VALID",
    "Neighbour",
    "Probe",
    "RouteAnswer",
    "eligible",
    "neigh_dump_request",
    "parse_neigh",
    "parse_route",
    "probe",
    "route_request",
]

NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x1
NLM_F_DUMP: Final = 0x300
RTM_NEWROUTE: Final = 24
RTM_GETROUTE: Final = 26
RTM_NEWNEIGH: Final = 28
RTM_GETNEIGH: Final = 30
RTA_DST: Final = 1
RTA_OIF: Final = 4
RTA_GATEWAY: Final = 5
RTA_VIA: Final = 18
NDA_DST: Final = 1
NDA_LLADDR: Final = 2
RTN_UNICAST: Final = 1
NETLINK_ROUTE: Final = 0

# REACHABLE, STALE, DELAY, PROBE, NOARP, PERMANENT: the kernel knows where to send
NUD_VALID: Final = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_U32 = struct.Struct("=I")
_FAMILIES: Final = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True)
class RouteAnswer:
    """The kernel's route to one address: its type, output link and gateway (if any)."""

    type: int
    oif: int | None
    gateway: bool


@dataclass(frozen=True)
class Neighbour:
    ifindex: int
    address: str
    state: int
    has_lladdr: bool


@dataclass(frozen=True)
class Probe:
    """What :func:`eligible` needs: routes by address, neighbours, link names by index."""

    routes: Mapping[str, RouteAnswer | None]
    neighbours: tuple[Neighbour, ...]
    links: Mapping[int, str]


def route_request(address: str, seq: int) -> bytes:
    """An ``RTM_GETROUTE`` for one address (what ``ip route get <address>`` sends)."""
    ip = ipaddress.ip_address(address)
    family = _FAMILIES[ip.version]
    body = _RTMSG.pack(family, ip.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + attribute(
        RTA_DST, ip.packed
    )
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def neigh_dump_request(seq: int) -> bytes:
    """An ``RTM_GETNEIGH`` dump of every family."""
    body = _NDMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETNEIGH, flags, seq, 0) + body


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload) of each message in ``data``."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return
        yield msg_type, seq, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def parse_route(payload: bytes) -> RouteAnswer:
    """An ``RTM_NEWROUTE`` answer."""
    _family, _dst, _src, _tos, _table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(payload)
    oif: int | None = None
    gateway = False
    for kind, value in attributes(payload, _RTMSG.size):
        if kind == RTA_OIF:
            (oif,) = _U32.unpack_from(value)
        elif kind in (RTA_GATEWAY, RTA_VIA):
            gateway = True
    return RouteAnswer(rtype, oif, gateway)


def parse_neigh(payload: bytes) -> Neighbour | None:
    """An ``RTM_NEWNEIGH`` entry (None when it has no destination address)."""
    family, ifindex, state, _flags, _type = _NDMSG.unpack_from(payload)
    address = None
    lladdr = False
    for kind, value in attributes(payload, _NDMSG.size):
        if kind == NDA_DST and family in (socket.AF_INET, socket.AF_INET6):
            address = socket.inet_ntop(family, value)
        elif kind == NDA_LLADDR:
            lladdr = len(value) > 0
    if address is None:
        return None
    return Neighbour(ifindex, address, state, lladdr)


def eligible(address: str, found: Probe) -> str | None:
    """The link the fast path may send ``address``'s packets over, or None (routed path)."""
    canonical = str(ipaddress.ip_address(address))
    route = found.routes.get(canonical)
    if route is None or route.type != RTN_UNICAST or route.gateway or route.oif is None:
        return None
    link = found.links.get(route.oif)
    if link is None:
        return None
    for n in found.neighbours:
        if n.address == canonical and n.ifindex == route.oif:
            if n.state & NUD_VALID and (n.has_lladdr or n.state & 0x40):
                return link
            return None
    return None


def _open() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind((0, 0))
    return sock


async def probe(addresses: Iterable[str], links: Mapping[int, str]) -> Probe:
    """Ask the kernel (of this process's namespace) about ``addresses``: their routes, and the
    neighbour table. ``links`` names the links by index (from a link dump)."""
    wanted = sorted({str(ipaddress.ip_address(a)) for a in addresses})
    routes: dict[str, RouteAnswer | None] = dict.fromkeys(wanted)
    neighbours: list[Neighbour] = []
    with trio.socket.from_stdlib_socket(_open()) as sock:
        by_seq = {seq: address for seq, address in enumerate(wanted, start=1)}
        dump_seq = len(wanted) + 1
        # the route requests and the dump go out together; the answers come back in order
        for seq, address in by_seq.items():
            await sock.send(route_request(address, seq))
        await sock.send(neigh_dump_request(dump_seq))
        pending = set(by_seq)
        dumping = True
        while pending or dumping:
            data = await sock.recv(1 << 20)
            for msg_type, seq, payload in _messages(data):
                if msg_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if seq == dump_seq:
                        raise OSError(-code, f"neighbour dump: {errno.errorcode.get(-code)}")
                    pending.discard(seq)  # no route (ENETUNREACH, ...): stays None
                elif msg_type == RTM_NEWROUTE and seq in pending:
                    routes[by_seq[seq]] = parse_route(payload)
                    pending.discard(seq)
                elif msg_type == RTM_NEWNEIGH and seq == dump_seq:
                    entry = parse_neigh(payload)
                    if entry is not None:
                        neighbours.append(entry)
                elif msg_type == NLMSG_DONE and seq == dump_seq:
                    dumping = False
    return Probe(routes, tuple(neighbours), dict(links))
