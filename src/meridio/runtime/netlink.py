"""The netlink manager: idempotent kernel changes and kernel events on the bus.

Changes go through pyroute2's ``AsyncIPRoute`` inside the trio-asyncio loop. Events come from a
separate trio-native netlink multicast socket opened in the target namespace and parsed by
:mod:`meridio.core.rtnl` (only the fields the events carry), so receiving events never involves
asyncio. Reads that may return thousands of objects (rules, routes, links, addresses) are lean
dumps on a socket of their own, parsed the same way. Every helper is idempotent:
``ensure_*`` makes a thing present (or absent) and is harmless to repeat.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
import trio_asyncio
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_IPV6_RULE,
    RTMGRP_LINK,
)

from meridio.core import rtnl
from meridio.runtime.bus import EventBus
from meridio.runtime.logs import get_logger

log = get_logger("meridio.netlink")

EVENT_GROUPS = (
    RTMGRP_LINK
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_ROUTE
    | RTMGRP_IPV4_RULE
    | RTMGRP_IPV6_RULE
)
NETLINK_ROUTE = 0
CREATE_TIMEOUT = 30.0  # seconds the kernel may take to answer a batch of link creations
#: Seconds a thread waits at most for the GIL while the event loop holds it (CPython's default
#: is 5 ms): the thread that creates links needs it back after the kernel's work.
SWITCH_INTERVAL = 0.0005
#: Bytes read at once from the event socket: a notification is one message (of a few kB) a
#: datagram. Not more: each read allocates its buffer (a megabyte costs 15 us, 64 kB 2 us).
EVENT_RECV_SIZE = 1 << 16
#: Datagrams read from the event socket between two checkpoints (each costs a pass of the
#: scheduler: a thousand new links bring tens of thousands of events).
EVENT_BATCH = 256
SO_ATTACH_FILTER = 26
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
AF_BRIDGE_BYTE = bytes([socket.AF_BRIDGE])


class NoSuchLink(LookupError):
    """A change named a link that is not there (it may have gone a moment ago)."""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetlinkEvent:
    """Base of every kernel event; ``netns`` is the namespace it came from (None: our own)."""

    netns: str | None
    action: str  # "new" or "del"


@dataclass(frozen=True)
class LinkEvent(NetlinkEvent):
    index: int
    ifname: str
    kind: str | None
    up: bool  # administratively up
    lower_up: bool = False  # carrier (a veth: its peer is up too)


@dataclass(frozen=True)
class AddressEvent(NetlinkEvent):
    index: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class RouteEvent(NetlinkEvent):
    family: int
    table: int
    dst: str | None
    dst_len: int
    gateway: str | None
    oif: int | None


@dataclass(frozen=True)
class RuleEvent(NetlinkEvent):
    family: int
    priority: int
    table: int
    fwmark: int | None
    src: str | None


@dataclass(frozen=True)
class VethSpec:
    """A veth pair to create (:meth:`NetlinkManager.create_veths`)."""

    name: str
    peer: str  # the other end, created in the namespace at netns_path
    netns_path: str
    mtu: int
    master: int | None = None  # the bridge ``name`` joins
    up: bool = False
    alias: str | None = None
    group: int = 0  # the link group of ``name``
    isolated: bool = False  # an isolated port of ``master`` (best effort: see configure_port)
    ipv6_link_local: bool = True  # False: no IPv6 address on ``name`` (see rtnl.port_request)


@dataclass(frozen=True)
class NetlinkOverrun(NetlinkEvent):
    """The kernel dropped events for us (ENOBUFS): re-read whatever state matters."""


def event_from_message(msg: Any, netns: str | None) -> NetlinkEvent | None:
    """Translate one parsed rtnetlink message into a bus event (None for other types)."""
    kind = msg["header"]["type"]
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        linkinfo = msg.get("IFLA_LINKINFO")
        return LinkEvent(
            netns,
            "new" if kind == RTM_NEWLINK else "del",
            index=msg["index"],
            ifname=msg.get("IFLA_IFNAME") or "",
            kind=linkinfo.get("IFLA_INFO_KIND") if linkinfo else None,
            up=bool(msg["flags"] & IFF_UP),
            lower_up=bool(msg["flags"] & IFF_LOWER_UP),
        )
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        return AddressEvent(
            netns,
            "new" if kind == RTM_NEWADDR else "del",
            index=msg["index"],
            address=msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL") or "",
            prefixlen=msg["prefixlen"],
        )
    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
        return RouteEvent(
            netns,
            "new" if kind == RTM_NEWROUTE else "del",
            family=msg["family"],
            table=msg.get("RTA_TABLE") or msg["table"],
            dst=msg.get("RTA_DST"),
            dst_len=msg["dst_len"],
            gateway=msg.get("RTA_GATEWAY"),
            oif=msg.get("RTA_OIF"),
        )
    if kind in (RTM_NEWRULE, RTM_DELRULE):
        return RuleEvent(
            netns,
            "new" if kind == RTM_NEWRULE else "del",
            family=msg["family"],
            priority=msg.get("FRA_PRIORITY") or 0,
            table=msg.get("FRA_TABLE") or msg["table"],
            fwmark=msg.get("FRA_FWMARK"),
            src=msg.get("FRA_SRC"),
        )
    return None


def event_from_bytes(msg_type: int, payload: bytes, netns: str | None) -> NetlinkEvent | None:
    """:func:`event_from_message` straight from the bytes of one message (see
    :mod:`meridio.core.rtnl`): the same events, without pyroute2's generic parser, which costs
    tens of microseconds a message (a thousand targets' links make thousands of events)."""
    if msg_type in (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK):
        if payload[:1] == AF_BRIDGE_BYTE:
            # a bridge port's state (forwarding, learning; "del" when it leaves the bridge),
            # not the link's: the link itself is reported in its own family
            return None
        link = rtnl.parse_link(payload)
        return LinkEvent(
            netns,
            "new" if msg_type == rtnl.RTM_NEWLINK else "del",
            index=link.index,
            ifname=link.name,
            kind=link.kind,
            up=bool(link.flags & IFF_UP),
            lower_up=bool(link.flags & IFF_LOWER_UP),
        )
    if msg_type in (rtnl.RTM_NEWADDR, rtnl.RTM_DELADDR):
        address = rtnl.parse_address(payload)
        return AddressEvent(
            netns,
            "new" if msg_type == rtnl.RTM_NEWADDR else "del",
            index=address.index,
            address=address.address,
            prefixlen=address.prefixlen,
        )
    if msg_type in (RTM_NEWROUTE, RTM_DELROUTE):
        route = rtnl.parse_route_fields(payload)
        return RouteEvent(
            netns,
            "new" if msg_type == RTM_NEWROUTE else "del",
            family=route.family,
            table=route.table,
            dst=route.dst,
            dst_len=route.dst_len,
            gateway=route.gateway,
            oif=route.oif,
        )
    if msg_type in (RTM_NEWRULE, RTM_DELRULE):
        rule = rtnl.parse_rule(payload)
        return RuleEvent(
            netns,
            "new" if msg_type == RTM_NEWRULE else "del",
            family=rule.family,
            priority=rule.priority,
            table=rule.table,
            fwmark=rule.fwmark,
            src=rule.src.split("/", 1)[0] if rule.src else None,
        )
    return None


def open_event_socket(netns: str | None) -> socket.socket:
    """A netlink route socket in ``netns`` bound to the link/address/route/rule groups.

    Opening a socket in another namespace forks a helper (pyroute2), so call this in a thread.
    """
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    else:
        from pyroute2.netns import create_socket

        sock = create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, flags=0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    attach_filter(sock, rtnl.bridge_port_filter())
    sock.bind((0, EVENT_GROUPS))
    return sock


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """Attach a classic BPF ``program`` (``struct sock_filter`` array) to ``sock``."""
    insns = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(insns))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_dump_socket(netns: str | None) -> socket.socket:
    """A netlink route socket in ``netns`` for the lean dumps of :mod:`meridio.core.rtnl`
    (call in a thread: another namespace forks a helper)."""
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    else:
        from pyroute2.netns import create_socket

        sock = create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, flags=0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind((0, 0))
    return sock


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


# --- the manager ------------------------------------------------------------------------------


class NetlinkManager:
    """Kernel state of one network namespace (by name under /run/netns, or by path)."""

    def __init__(self, bus: EventBus, netns: str | None = None) -> None:
        self.bus = bus
        self.netns = netns
        self._ipr: Any = None
        # One request at a time on the socket: a second dump while one runs fails with EBUSY,
        # and several tasks (reconcile, connect endpoint) share this manager.
        self._lock = trio.Lock()
        self.events_running = False
        self._dump_socket: trio.socket.SocketType | None = None
        self._dump_lock = trio.Lock()
        self._dump_seq = 0
        self._create_socket: socket.socket | None = None  # blocking, used in a thread
        self._create_lock = trio.Lock()
        self._create_seq = 0

    async def open(self) -> None:
        async def aio_open() -> Any:
            ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
            await ipr.setup_endpoint()
            return ipr

        self._ipr = await trio_asyncio.aio_as_trio(aio_open)()

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._dump_socket is not None:
            self._dump_socket.close()
            self._dump_socket = None
        if self._create_socket is not None:
            self._create_socket.close()
            self._create_socket = None

    async def _lean_dump(self, kind: str, family: int) -> list[bytes]:
        """The payloads of one rule, route, link or address dump, read on a socket of our own
        (no pyroute2 parsing: see :mod:`meridio.core.rtnl`)."""
        return await self._lean_exchange(lambda seq: rtnl.dump_request(kind, family, seq), True)

    def _next_seq(self) -> int:
        self._dump_seq = (self._dump_seq + 1) & 0xFFFFFFFF or 1
        return self._dump_seq

    async def _lean_socket(self) -> trio.socket.SocketType:
        if self._dump_socket is None:
            sock = await trio.to_thread.run_sync(open_dump_socket, self.netns)
            self._dump_socket = trio.socket.from_stdlib_socket(sock)
        return self._dump_socket

    async def _lean_exchange(self, request: Callable[[int], bytes], dump: bool) -> list[bytes]:
        """Send ``request(seq)`` on our own socket; the payloads of the answer (a dump's until
        NLMSG_DONE, else the one message). An error answer raises NetlinkDumpError."""
        async with self._dump_lock:
            sock = await self._lean_socket()
            seq = self._next_seq()
            try:
                await sock.send(request(seq))
                payloads: list[bytes] = []
                while True:
                    data = await sock.recv(1 << 20)
                    for msg_type, payload in rtnl.messages(data, seq):
                        if msg_type == rtnl.NLMSG_DONE:
                            return payloads
                        payloads.append(payload)
                        if not dump:
                            return payloads
            except rtnl.NetlinkDumpError:
                if dump:
                    self._close_dump_socket()
                raise
            except BaseException:
                # a dump cut short leaves the rest of it in the socket: start afresh next time
                self._close_dump_socket()
                raise

    def _close_dump_socket(self) -> None:
        if self._dump_socket is not None:
            self._dump_socket.close()
            self._dump_socket = None

    async def rule_list(self, family: int | None = None) -> list[rtnl.Rule]:
        """Every rule of ``family`` (both when None), lean: see :mod:`meridio.core.rtnl`."""
        families = [family] if family else [socket.AF_INET, socket.AF_INET6]
        return [rtnl.parse_rule(p) for fam in families for p in await self._lean_dump("rule", fam)]

    async def route_list(self, family: int | None = None) -> list[rtnl.Route]:
        """Every route of every table of ``family`` (both when None), in one dump each."""
        families = [family] if family else [socket.AF_INET, socket.AF_INET6]
        return [
            rtnl.parse_route(p) for fam in families for p in await self._lean_dump("route", fam)
        ]

    async def link_list(self) -> list[rtnl.Link]:
        """Every link of the namespace, in one dump, lean: see :mod:`meridio.core.rtnl`."""
        return [rtnl.parse_link(p) for p in await self._lean_dump("link", socket.AF_UNSPEC)]

    async def link_get(self, ifname: str) -> rtnl.Link | None:
        """The link named ``ifname`` (None when there is none), lean: one message, not a
        dump of every link."""
        try:
            found = await self._lean_exchange(lambda seq: rtnl.link_request(ifname, seq), False)
        except rtnl.NetlinkDumpError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return rtnl.parse_link(found[0]) if found else None

    async def create_veths(
        self, specs: Sequence[VethSpec], chunk: int = 64
    ) -> list[rtnl.Link | OSError]:
        """Create veth pairs, many per round trip: for each, one request creates the pair
        (here a bridge port, up, with ``master``), one sets the alias, isolation and IPv6
        addressing (:func:`rtnl.port_request`) and one reads the link back, all sent at once
        (``chunk`` pairs at a time) on our own socket. The answer for each is the link as
        created, or why not (an ``OSError``; EEXIST when ``name`` or ``peer`` exists)."""
        out: list[rtnl.Link | OSError] = []
        for start in range(0, len(specs), chunk):
            out.extend(await self._create_veths(specs[start : start + chunk]))
        return out

    async def _create_veths(self, specs: Sequence[VethSpec]) -> list[rtnl.Link | OSError]:
        async with self._create_lock:
            # The kernel makes the links inside the send call (a millisecond or more each):
            # in a thread, so that the rest of the process goes on meanwhile. A busy event
            # loop would hand the thread the GIL only every switch interval: make it short.
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
            return await trio.to_thread.run_sync(self._create_veths_blocking, specs)

    def _create_veths_blocking(self, specs: Sequence[VethSpec]) -> list[rtnl.Link | OSError]:
        if self._create_socket is None:
            self._create_socket = open_dump_socket(self.netns)
            self._create_socket.settimeout(CREATE_TIMEOUT)
        sock = self._create_socket
        fds: list[int] = []
        plan: list[tuple[int, int] | OSError] = []  # per spec: (create seq, get seq)
        # The creations and aliases are not acknowledged: the kernel answers them only when
        # they fail, and handles the requests in order, so once the answer to a pair's get is
        # in, any failure of its creation is too. One answer per pair rather than three: this
        # thread needs the GIL back for each, and while the event loop is busy (a cold start)
        # each wait for it is a switch interval.
        errors: dict[int, int] = {}
        links: dict[int, tuple[int, bytes]] = {}
        try:
            request = b""
            for spec in specs:
                try:
                    fd = os.open(spec.netns_path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    plan.append(exc)
                    continue
                fds.append(fd)
                self._create_seq += 3
                create, alias, get = self._create_seq - 2, self._create_seq - 1, self._create_seq
                request += rtnl.veth_request(
                    create,
                    spec.name,
                    spec.peer,
                    fd,
                    spec.mtu,
                    master=spec.master,
                    up=spec.up,
                    group=spec.group,
                    ack=False,
                )
                isolated = spec.isolated and spec.master is not None
                if spec.alias or isolated or not spec.ipv6_link_local:
                    # one message: each change is a pass under the kernel's lock and a link
                    # event to every listener. Its failure is not the link's: the caller
                    # repairs the alias, isolation is best effort (as configure_port)
                    request += rtnl.port_request(
                        alias,
                        spec.name,
                        alias=spec.alias,
                        isolated=isolated,
                        ipv6_link_local=spec.ipv6_link_local,
                        ack=False,
                    )
                request += rtnl.link_request(spec.name, get)
                plan.append((create, get))
            gets = {p[1] for p in plan if not isinstance(p, OSError)}
            try:
                if request:
                    sock.sendall(request)
                while not gets <= links.keys():
                    for seq, _type, error, payload in rtnl.answers(sock.recv(1 << 20)):
                        if seq in gets:
                            links[seq] = (error, payload)
                        elif error:
                            errors[seq] = error  # a creation or alias that failed
            except BaseException:
                sock.close()  # answers may be left in it: start afresh next time
                self._create_socket = None
                raise
        finally:
            for fd in fds:
                os.close(fd)
        answers: list[rtnl.Link | OSError] = []
        for p in plan:
            if isinstance(p, OSError):
                answers.append(p)
                continue
            create, get = p
            error = errors.get(create, 0)
            if error:
                answers.append(OSError(error, os.strerror(error)))
                continue
            error, payload = links[get]
            if error:
                answers.append(OSError(error, "the link vanished after creation"))
                continue
            answers.append(rtnl.parse_link(payload))
        return answers

    async def configure_port(
        self, ifname: str, *, isolated: bool = False, ipv6_link_local: bool = True
    ) -> None:
        """Make the bridge port ``ifname`` an isolated port and (without ``ipv6_link_local``)
        one with no IPv6 address: see :func:`rtnl.port_request`. NetlinkDumpError when the
        kernel refuses."""
        async with self._dump_lock:
            sock = await self._lean_socket()
            seq = self._next_seq()
            request = rtnl.port_request(
                seq, ifname, isolated=isolated, ipv6_link_local=ipv6_link_local
            )
            try:
                await sock.send(request)
                while True:
                    for got, _type, error, _payload in rtnl.answers(await sock.recv(1 << 20)):
                        if got != seq:
                            continue
                        if error:
                            raise rtnl.NetlinkDumpError(error, os.strerror(error))
                        return
            except rtnl.NetlinkDumpError:
                raise
            except BaseException:
                self._close_dump_socket()  # its answer may be left in it
                raise

    async def delete_group(self, group: int) -> None:
        """Delete every link of ``group`` in one request (``ip link del group``): the kernel
        takes down a thousand links in a fraction of a second, a request each takes tens of
        seconds. In a thread, like link creation: the kernel works inside the call."""
        if not group:
            raise ValueError("group 0 holds every link not put in another")
        async with self._create_lock:
            await trio.to_thread.run_sync(self._delete_group_blocking, group)

    def _delete_group_blocking(self, group: int) -> None:
        if self._create_socket is None:
            self._create_socket = open_dump_socket(self.netns)
            self._create_socket.settimeout(CREATE_TIMEOUT)
        sock = self._create_socket
        self._create_seq += 1
        seq = self._create_seq
        try:
            sock.sendall(rtnl.group_delete_request(seq, group))
            while True:
                for got, _type, error, _payload in rtnl.answers(sock.recv(1 << 20)):
                    if got == seq:
                        if error and error != errno.ENODEV:
                            raise OSError(error, f"deleting link group {group}")
                        return
        except BaseException:
            sock.close()
            self._create_socket = None
            raise

    async def neighbour_list(self, family: int | None = None) -> list[rtnl.Neighbour]:
        """Every neighbour entry (of ``family``; both when None), in one lean dump: a proxy's
        bridge knows every target of its node."""
        families = [family] if family else [socket.AF_INET, socket.AF_INET6]
        return [
            rtnl.parse_neighbour(p)
            for fam in families
            for p in await self._lean_dump("neighbour", fam)
        ]

    async def address_list(self, family: int | None = None) -> list[rtnl.Address]:
        """Every address of every link (of ``family``; both when None), in one dump."""
        return [
            rtnl.parse_address(p)
            for p in await self._lean_dump("address", family or socket.AF_UNSPEC)
        ]

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        async with self._lock:
            if self._ipr is None:
                await self.open()
            fn: Callable[..., Any] = getattr(self._ipr, method)
            return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)

    async def _dump(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        async def collect() -> list[Any]:
            return [m async for m in await getattr(self._ipr, method)(*args, **kwargs)]

        async with self._lock:
            if self._ipr is None:
                await self.open()
            result: list[Any] = await trio_asyncio.aio_as_trio(collect)()
            return result

    # links

    async def link_index(self, ifname: str) -> int | None:
        found = await self._call("link_lookup", ifname=ifname)
        return int(found[0]) if found else None

    async def links(self) -> list[Any]:
        return await self._dump("link", "dump")

    async def ensure_link(self, ifname: str, kind: str, **attrs: Any) -> int:
        """Create the link if it is missing; returns its index. Attributes are set at creation."""
        index = await self.link_index(ifname)
        if index is None:
            try:
                await self._call("link", "add", ifname=ifname, kind=kind, **attrs)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            index = await self.link_index(ifname)
        if index is None:
            raise RuntimeError(f"link {ifname} vanished right after creation")
        return index

    async def create_link(self, ifname: str, kind: str, **attrs: Any) -> None:
        """Create a link (no lookup before or after: EEXIST raises NetlinkError)."""
        await self._call("link", "add", ifname=ifname, kind=kind, **attrs)

    async def ensure_link_absent(self, ifname: str) -> bool:
        index = await self.link_index(ifname)
        if index is None:
            return False
        try:
            await self._call("link", "del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
        return True

    async def set_link(self, ifname: str, **attrs: Any) -> None:
        index = await self.link_index(ifname)
        if index is None:
            raise NoSuchLink(f"no link named {ifname}")
        await self._call("link", "set", index=index, **attrs)

    async def set_link_index(self, index: int, **attrs: Any) -> None:
        """Change the link at ``index`` (no lookup by name first)."""
        await self._call("link", "set", index=index, **attrs)

    async def ensure_link_up(self, ifname: str) -> None:
        await self.set_link(ifname, state="up")

    # addresses

    async def addresses(self, ifname: str | None = None) -> list[str]:
        """The addresses (CIDRs) of ``ifname``, or of every link: one lean dump."""
        index = None
        if ifname is not None:
            found = await self.link_get(ifname)
            if found is None:
                return []
            index = found.index
        return [a.cidr for a in await self.address_list() if index is None or a.index == index]

    async def ensure_address(self, ifname: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        index = await self.link_index(ifname)
        if index is None:
            raise NoSuchLink(f"no link named {ifname}")
        try:
            await self._call(
                "addr",
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    async def ensure_address_absent(self, ifname: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        index = await self.link_index(ifname)
        if index is None:
            return
        try:
            await self._call(
                "addr", "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise

    # rules

    async def rules(self, family: int | None = None) -> list[Any]:
        families = [family] if family else [socket.AF_INET, socket.AF_INET6]
        result: list[Any] = []
        for fam in families:
            result.extend(await self._dump("rule", "dump", family=fam))
        return result

    @staticmethod
    def _rule_attrs(
        family: int, priority: int, table: int, fwmark: int | None, src: str | None
    ) -> dict[str, Any]:
        attrs: dict[str, Any] = {"family": family, "priority": priority, "table": table}
        if fwmark is not None:
            attrs["fwmark"] = fwmark
            attrs["fwmask"] = 0xFFFFFFFF
        if src is not None:
            net = ipaddress.ip_network(src, strict=False)
            attrs["src"] = str(net.network_address)
            attrs["src_len"] = net.prefixlen
        return attrs

    async def ensure_rule(
        self,
        *,
        family: int,
        priority: int,
        table: int,
        fwmark: int | None = None,
        src: str | None = None,
    ) -> None:
        try:
            await self._call(
                "rule", "add", **self._rule_attrs(family, priority, table, fwmark, src)
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    async def ensure_rule_absent(
        self,
        *,
        family: int,
        priority: int,
        table: int,
        fwmark: int | None = None,
        src: str | None = None,
    ) -> None:
        try:
            await self._call(
                "rule", "del", **self._rule_attrs(family, priority, table, fwmark, src)
            )
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise

    # routes

    async def routes(self, table: int, family: int | None = None) -> list[Any]:
        kwargs: dict[str, Any] = {"table": table}
        if family:
            kwargs["family"] = family
        return await self._dump("route", "dump", **kwargs)

    async def ensure_route(
        self,
        dst: str,
        *,
        table: int = 254,
        gateway: str | None = None,
        oif: str | None = None,
        multipath: list[str] | None = None,
        family: int | None = None,
        **extra: Any,
    ) -> None:
        """Install or replace the route to ``dst`` (``default`` or a CIDR) in ``table``."""
        attrs: dict[str, Any] = {"table": table, **extra}
        probe = gateway or (multipath[0] if multipath else None) or dst
        attrs["family"] = family or (_family(probe) if probe != "default" else socket.AF_INET)
        attrs["dst"] = dst
        if gateway is not None:
            attrs["gateway"] = gateway
        if multipath:
            attrs["multipath"] = [{"gateway": gw} for gw in multipath]
        if oif is not None:
            index = await self.link_index(oif)
            if index is None:
                raise NoSuchLink(f"no link named {oif}")
            attrs["oif"] = index
        await self._call("route", "replace", **attrs)

    async def ensure_route_absent(self, dst: str, *, table: int = 254, family: int) -> None:
        try:
            await self._call("route", "del", dst=dst, table=table, family=family)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise

    # neighbours

    async def ensure_neighbour(self, ifname: str, ip: str, lladdr: str) -> None:
        index = await self.link_index(ifname)
        if index is None:
            raise NoSuchLink(f"no link named {ifname}")
        await self._call(
            "neigh", "replace", ifindex=index, dst=ip, lladdr=lladdr, state="permanent"
        )

    async def ensure_neighbour_absent(self, ifname: str, ip: str) -> None:
        index = await self.link_index(ifname)
        if index is None:
            return
        try:
            await self._call("neigh", "del", ifindex=index, dst=ip)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise

    async def forget_neighbour(self, ip: str) -> int:
        """Delete every neighbour entry for ``ip``, on any link; returns how many there were.

        For an address that comes back on another link or host: the old entry would hold the
        old MAC address until the kernel probes it again, seconds later.
        """
        ip = str(ipaddress.ip_interface(ip).ip)
        stale = [n for n in await self.neighbour_list(_family(ip)) if n.dst == ip]
        for neighbour in stale:
            try:
                await self._call("neigh", "del", ifindex=neighbour.index, dst=ip)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ESRCH):
                    raise
        return len(stale)

    # events

    async def run_events(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish kernel events of this namespace on the bus until cancelled."""
        raw = await trio.to_thread.run_sync(open_event_socket, self.netns)
        raw.setblocking(False)
        with raw:
            self.events_running = True
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(raw)
                # every datagram waiting, without a checkpoint each
                for _ in range(EVENT_BATCH):
                    try:
                        data = raw.recv(EVENT_RECV_SIZE)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno != errno.ENOBUFS:
                            raise
                        log.warning("netlink events overrun", netns=self.netns)
                        self.bus.publish(NetlinkOverrun(self.netns, "overrun"))
                        continue
                    for msg_type, payload in rtnl.messages(data, None):
                        event = event_from_bytes(msg_type, payload, self.netns)
                        if event is not None:
                            self.bus.publish(event)
