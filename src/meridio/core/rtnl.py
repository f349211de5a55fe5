"""Lean rtnetlink dumps of rules, routes, links and addresses: the requests and the answers
(pure, no I/O).

Reading back thousands of rules and routes is what the LB's resync does, and thousands of links
(one per target) what the proxy's does; pyroute2's generic parser costs tens of microseconds per
message (a veth's carries about 1.5 kB of statistics), which at a thousand targets made a
resync pass take longer than the resync period. This module builds the dump requests and
decodes only the fields the roles compare (family, table, priority, fwmark, source; destination
length, type and next hops; a link's name, kind, alias, MTU, master, flags and VXLAN
parameters; an address and its length), straight from the bytes.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTM_GETNEIGH = 30
RTM_NEWRULE = 32
RTM_GETRULE = 34
RTA_DST = 1
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_MULTIPATH = 9
RTA_OIF = 4
RTA_TABLE = 15
FRA_SRC = 2
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_GROUP = 27
IFLA_NET_NS_FD = 28
IFLA_AF_SPEC = 26
IFLA_EXT_MASK = 29
RTEXT_FILTER_SKIP_STATS = 1 << 3
VETH_INFO_PEER = 1
IFF_UP = 0x1
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_KIND = 4
IFLA_INFO_SLAVE_DATA = 5
IFLA_BRPORT_ISOLATED = 33
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
IFLA_VXLAN_ID = 1
IFLA_VXLAN_GROUP = 2
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_PORT = 15
IFLA_VXLAN_GROUP6 = 16
IFLA_VXLAN_LOCAL6 = 17
IFA_ADDRESS = 1
IFA_LOCAL = 2
NDA_DST = 1
RTN_UNICAST = 1
RTN_BLACKHOLE = 6

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")  # also fib_rule_hdr: same size and the fields we use
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTATTR = struct.Struct("=HH")
_RTNEXTHOP = struct.Struct("=HBBi")
_U32 = struct.Struct("=I")
_BE16 = struct.Struct("!H")


class NetlinkDumpError(OSError):
    """The kernel answered a dump with an error."""


@dataclass(frozen=True, slots=True)
class Rule:
    family: int
    priority: int
    table: int
    fwmark: int | None
    src: str | None
    """Source prefix as ``address/length``, or None."""


@dataclass(frozen=True, slots=True)
class Route:
    family: int
    table: int
    type: int
    dst: str | None
    """Destination as ``address/length``; None for a default route."""
    gateways: tuple[str, ...]
    """The next hop, or every next hop of a multipath route."""
    priority: int


@dataclass(frozen=True, slots=True)
class Vxlan:
    vni: int
    local: str | None
    remote: str | None
    port: int


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    kind: str | None
    """``IFLA_INFO_KIND`` (veth, bridge, vxlan, ...), None for a link without one (lo, ...)."""
    alias: str | None
    mtu: int
    master: int | None
    flags: int
    vxlan: Vxlan | None = None
    lladdr: str | None = None
    """The link-layer address (``IFLA_ADDRESS``) as ``ip link`` shows it."""
    group: int = 0
    """The link group (``IFLA_GROUP``): a group is deleted in one request."""


@dataclass(frozen=True, slots=True)
class Address:
    family: int
    index: int
    address: str
    prefixlen: int

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


def dump_request(kind: str, family: int, seq: int) -> bytes:
    """An ``RTM_GETRULE``, ``RTM_GETROUTE``, ``RTM_GETLINK`` or ``RTM_GETADDR`` dump request for
    one family (``AF_UNSPEC``, 0: every family)."""
    msg_type = {
        "rule": RTM_GETRULE,
        "route": RTM_GETROUTE,
        "link": RTM_GETLINK,
        "address": RTM_GETADDR,
        "neighbour": RTM_GETNEIGH,
    }[kind]
    if kind == "link":
        # without the statistics (a third of a veth's message): nothing here reads them
        body = _IFINFOMSG.pack(family, 0, 0, 0, 0) + attribute(
            IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS)
        )
    elif kind == "address":
        body = _IFADDRMSG.pack(family, 0, 0, 0, 0)
    elif kind == "neighbour":
        body = _NDMSG.pack(family, 0, 0, 0, 0)
    else:
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


def attribute(kind: int, value: bytes) -> bytes:
    """One rtnetlink attribute: header, value, padding to 4 bytes."""
    return _RTATTR.pack(_RTATTR.size + len(value), kind) + value + b"\0" * (-len(value) % 4)


def _message(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _name(ifname: str) -> bytes:
    return ifname.encode() + b"\0"


def link_request(ifname: str, seq: int) -> bytes:
    """An ``RTM_GETLINK`` request for the one link named ``ifname`` (not a dump), without
    its statistics (as the dumps)."""
    body = (
        _IFINFOMSG.pack(0, 0, 0, 0, 0)
        + attribute(IFLA_IFNAME, _name(ifname))
        + attribute(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))
    )
    return _message(RTM_GETLINK, NLM_F_REQUEST, seq, body)


def veth_request(
    seq: int,
    ifname: str,
    peer: str,
    peer_netns_fd: int,
    mtu: int,
    *,
    master: int | None = None,
    up: bool = False,
    group: int = 0,
    ack: bool = True,
) -> bytes:
    """Create the veth pair ``ifname`` (here: MTU, bridge, up, link group) and ``peer`` (in
    the namespace open as ``peer_netns_fd``): ``ip link add`` in one message. Acknowledged
    with ``ack``; without, only a failure is answered (an error message)."""
    peer_info = (
        _IFINFOMSG.pack(0, 0, 0, 0, 0)
        + attribute(IFLA_IFNAME, _name(peer))
        + attribute(IFLA_MTU, _U32.pack(mtu))
        + attribute(IFLA_NET_NS_FD, _U32.pack(peer_netns_fd))
    )
    linkinfo = attribute(IFLA_INFO_KIND, b"veth\0") + attribute(
        IFLA_INFO_DATA, attribute(VETH_INFO_PEER, peer_info)
    )
    flags = IFF_UP if up else 0
    body = (
        _IFINFOMSG.pack(0, 0, 0, flags, flags)
        + attribute(IFLA_IFNAME, _name(ifname))
        + attribute(IFLA_MTU, _U32.pack(mtu))
        + (attribute(IFLA_MASTER, _U32.pack(master)) if master is not None else b"")
        + (attribute(IFLA_GROUP, _U32.pack(group)) if group else b"")
        + attribute(IFLA_LINKINFO, linkinfo)
    )
    request = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | (NLM_F_ACK if ack else 0)
    return _message(RTM_NEWLINK, request, seq, body)


def port_request(
    seq: int,
    ifname: str,
    *,
    alias: str | None = None,
    isolated: bool = False,
    ipv6_link_local: bool = True,
    ack: bool = True,
) -> bytes:
    """Set, in one message, what a new bridge port needs besides its creation (which ignores
    these attributes): its alias; ``isolated``, an isolated port (``ip link set <ifname> type
    bridge_slave isolated on``: the bridge forwards nothing between two isolated ports, so
    what one sends to every port (broadcast, multicast, unknown unicast) reaches only the
    others; Linux 4.18 or later); and, without ``ipv6_link_local``, no IPv6 address of its
    own (``addrgenmode none``: a port carries frames for the bridge and needs none; with one,
    each port makes address and route events and sends duplicate address detection, router
    solicitation and MLD packets when its carrier comes up). Acknowledged with ``ack``
    (without, only a failure is answered)."""
    body = _IFINFOMSG.pack(0, 0, 0, 0, 0) + attribute(IFLA_IFNAME, _name(ifname))
    if alias is not None:
        body += attribute(IFLA_IFALIAS, alias.encode())
    if isolated:
        body += attribute(
            IFLA_LINKINFO,
            attribute(IFLA_INFO_SLAVE_KIND, b"bridge\0")
            + attribute(IFLA_INFO_SLAVE_DATA, attribute(IFLA_BRPORT_ISOLATED, b"\1")),
        )
    if not ipv6_link_local:
        mode = attribute(IFLA_INET6_ADDR_GEN_MODE, bytes((IN6_ADDR_GEN_MODE_NONE,)))
        body += attribute(IFLA_AF_SPEC, attribute(socket.AF_INET6, mode))
    return _message(RTM_NEWLINK, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, body)


def group_delete_request(seq: int, group: int) -> bytes:
    """Delete every link of ``group`` (``ip link del group``), acknowledged: the kernel takes
    them down together, far faster than one request each."""
    body = _IFINFOMSG.pack(0, 0, 0, 0, 0) + attribute(IFLA_GROUP, _U32.pack(group))
    return _message(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def _host_u16(value: int) -> int:
    """``value`` as a classic BPF program reads a 16-bit field in host order (BPF loads are
    big-endian, netlink headers are in host order)."""
    return int.from_bytes(struct.pack("=H", value), "big")


def bridge_port_filter() -> bytes:
    """A classic BPF program (``struct sock_filter`` array) for an event socket that drops
    the bridge port states in the kernel: ``RTM_NEWLINK`` and ``RTM_DELLINK`` of family
    ``AF_BRIDGE``, which a bridge sends beside each of its ports' own link events (seven a
    port as it is made and comes up). Every other message passes; a notification is one
    message a datagram, so looking at the first is enough."""
    ld_h, ld_b, jeq, ret = 0x28, 0x30, 0x15, 0x06  # BPF_LD|H|ABS, BPF_LD|B|ABS, JMP|JEQ|K, RET|K
    program = [
        (ld_h, 0, 0, 4),  # nlmsg_type
        (jeq, 1, 0, _host_u16(RTM_NEWLINK)),
        (jeq, 0, 2, _host_u16(RTM_DELLINK)),
        (ld_b, 0, 0, _NLMSGHDR.size),  # ifi_family
        (jeq, 1, 0, socket.AF_BRIDGE),
        (ret, 0, 0, 0xFFFFFFFF),  # keep the whole datagram
        (ret, 0, 0, 0),  # drop it
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


def answers(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(seq, type, error, payload) of each message in ``data``: an error message's code (0:
    an acknowledgement) as a positive errno, else 0."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            raise ValueError("netlink message shorter than its header")
        payload = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        error = 0
        if msg_type == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", payload)
            error = -code
        yield msg_seq, msg_type, error, payload


def messages(data: bytes, seq: int | None) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each message of ``seq`` (None: of any) in ``data``; NLMSG_DONE ends
    it with type NLMSG_DONE; an error message raises :class:`NetlinkDumpError`."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            raise ValueError("netlink message shorter than its header")
        payload = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if seq is not None and msg_seq != seq:
            continue
        if msg_type == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", payload)
            if code:
                raise NetlinkDumpError(-code, f"netlink dump failed: {_strerror(-code)}")
            continue
        yield msg_type, payload
        if msg_type == NLMSG_DONE:
            return


def _strerror(code: int) -> str:
    return os.strerror(code)


def attributes(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    """The (kind, value) of each rtnetlink attribute from ``offset`` on (nested flag cleared)."""
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw)


def parse_rule(payload: bytes) -> Rule:
    family, _dst_len, src_len, _tos, table, *_rest = _RTMSG.unpack_from(payload)
    priority = 0
    fwmark: int | None = None
    src: str | None = None
    for kind, value in attributes(payload, _RTMSG.size):
        if kind == FRA_TABLE:
            (table,) = _U32.unpack_from(value)
        elif kind == FRA_PRIORITY:
            (priority,) = _U32.unpack_from(value)
        elif kind == FRA_FWMARK:
            (fwmark,) = _U32.unpack_from(value)
        elif kind == FRA_SRC:
            src = f"{_address(family, value)}/{src_len}"
    return Rule(family, priority, table, fwmark, src)


def parse_route(payload: bytes) -> Route:
    family, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(
        payload
    )
    dst: str | None = None
    gateways: list[str] = []
    priority = 0
    for kind, value in attributes(payload, _RTMSG.size):
        if kind == RTA_TABLE:
            (table,) = _U32.unpack_from(value)
        elif kind == RTA_DST:
            dst = f"{_address(family, value)}/{dst_len}"
        elif kind == RTA_GATEWAY:
            gateways.append(_address(family, value))
        elif kind == RTA_PRIORITY:
            (priority,) = _U32.unpack_from(value)
        elif kind == RTA_MULTIPATH:
            offset = 0
            while offset + _RTNEXTHOP.size <= len(value):
                length, _nh_flags, _hops, _ifindex = _RTNEXTHOP.unpack_from(value, offset)
                if length < _RTNEXTHOP.size:
                    break
                nested = value[offset : offset + length]
                for nkind, nvalue in attributes(nested, _RTNEXTHOP.size):
                    if nkind == RTA_GATEWAY:
                        gateways.append(_address(family, nvalue))
                offset += (length + 3) & ~3
    return Route(family, table, rtype, dst, tuple(gateways), priority)


def _string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _vxlan(data: bytes) -> Vxlan:
    vni, port = 0, 0
    local: str | None = None
    remote: str | None = None
    for kind, value in attributes(data, 0):
        if kind == IFLA_VXLAN_ID:
            (vni,) = _U32.unpack_from(value)
        elif kind == IFLA_VXLAN_PORT:
            (port,) = _BE16.unpack_from(value)
        elif kind == IFLA_VXLAN_LOCAL:
            local = _address(socket.AF_INET, value)
        elif kind == IFLA_VXLAN_LOCAL6:
            local = _address(socket.AF_INET6, value)
        elif kind == IFLA_VXLAN_GROUP:
            remote = _address(socket.AF_INET, value)
        elif kind == IFLA_VXLAN_GROUP6:
            remote = _address(socket.AF_INET6, value)
    return Vxlan(vni, local, remote, port)


def parse_link(payload: bytes) -> Link:
    """An ``RTM_NEWLINK`` (or ``RTM_DELLINK``) message: dump answer or event.

    A veth's message is about 1.5 kB, mostly statistics: the attributes are walked without
    copying and only the few read here are sliced."""
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
    name = ""
    kind: str | None = None
    alias: str | None = None
    mtu = 0
    master: int | None = None
    vxlan: Vxlan | None = None
    lladdr: str | None = None
    group = 0
    offset, end = _IFINFOMSG.size, len(payload)
    unpack = _RTATTR.unpack_from
    while offset + 4 <= end:
        length, attr = unpack(payload, offset)
        if length < 4:
            break
        attr &= 0x3FFF
        if attr == IFLA_IFNAME:
            name = _string(payload[offset + 4 : offset + length])
        elif attr == IFLA_MTU:
            (mtu,) = _U32.unpack_from(payload, offset + 4)
        elif attr == IFLA_ADDRESS:
            lladdr = payload[offset + 4 : offset + length].hex(":")
        elif attr == IFLA_MASTER:
            (master,) = _U32.unpack_from(payload, offset + 4)
            master = master or None
        elif attr == IFLA_GROUP:
            (group,) = _U32.unpack_from(payload, offset + 4)
        elif attr == IFLA_IFALIAS:
            alias = _string(payload[offset + 4 : offset + length]) or None
        elif attr == IFLA_LINKINFO:
            data = b""
            for nkind, nvalue in attributes(payload[offset + 4 : offset + length], 0):
                if nkind == IFLA_INFO_KIND:
                    kind = _string(nvalue)
                elif nkind == IFLA_INFO_DATA:
                    data = nvalue
            if kind == "vxlan" and data:
                vxlan = _vxlan(data)
        offset += (length + 3) & ~3
    return Link(index, name, kind, alias, mtu, master, flags, vxlan, lladdr, group)


def parse_address(payload: bytes) -> Address:
    """An ``RTM_NEWADDR`` (or ``RTM_DELADDR``) message. The address is ``IFA_ADDRESS`` (the
    peer's on a point-to-point link, else the local one), as ``ip address`` shows it."""
    family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(payload)
    address = local = ""
    for kind, value in attributes(payload, _IFADDRMSG.size):
        if kind == IFA_ADDRESS:
            address = _address(family, value)
        elif kind == IFA_LOCAL:
            local = _address(family, value)
    return Address(family, index, address or local, prefixlen)


@dataclass(frozen=True, slots=True)
class RouteFields:
    """What a route event says, as the routes' events carry it (addresses without length)."""

    family: int
    table: int
    dst: str | None
    dst_len: int
    gateway: str | None
    oif: int | None


def parse_route_fields(payload: bytes) -> RouteFields:
    family, dst_len, _src_len, _tos, table, *_rest = _RTMSG.unpack_from(payload)
    dst: str | None = None
    gateway: str | None = None
    oif: int | None = None
    for kind, value in attributes(payload, _RTMSG.size):
        if kind == RTA_TABLE:
            (table,) = _U32.unpack_from(value)
        elif kind == RTA_DST:
            dst = _address(family, value)
        elif kind == RTA_GATEWAY:
            gateway = _address(family, value)
        elif kind == RTA_OIF:
            (oif,) = _U32.unpack_from(value)
    return RouteFields(family, table, dst, dst_len, gateway, oif)


@dataclass(frozen=True, slots=True)
class Neighbour:
    family: int
    index: int
    dst: str | None
    state: int


def parse_neighbour(payload: bytes) -> Neighbour:
    """An ``RTM_NEWNEIGH`` message: the neighbour's address (``NDA_DST``), link and state."""
    family, index, state, _flags, _type = _NDMSG.unpack_from(payload)
    dst: str | None = None
    for kind, value in attributes(payload, _NDMSG.size):
        if kind == NDA_DST and family in (socket.AF_INET, socket.AF_INET6):
            dst = _address(family, value)
    return Neighbour(family, index, dst, state)
