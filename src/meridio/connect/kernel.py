"""Link operations shared by endpoints and clients, on the runtime's netlink manager.

Everything is idempotent and compares before it changes: configuring a link that is already as
wanted makes no kernel change, so the periodic resync of a role costs reads only.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import ipaddress
import os
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import trio
from pyroute2.netlink.exceptions import NetlinkError

from meridio.core import rtnl
from meridio.core.conduit import family
from meridio.runtime.netlink import NetlinkManager

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000


@dataclass(frozen=True)
class VxlanInfo:
    vni: int
    local: str | None
    remote: str | None
    port: int


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None
    alias: str | None
    mtu: int
    master: int | None
    up: bool  # administratively up
    lower_up: bool  # carrier: for veth, the peer is up too
    vxlan: VxlanInfo | None = None
    group: int = 0  # the link group (deleted together)

    @property
    def running(self) -> bool:
        return self.up and self.lower_up


def link_info(msg: Any) -> LinkInfo:
    """A :class:`LinkInfo` from a pyroute2 RTM_NEWLINK message."""
    linkinfo = msg.get("IFLA_LINKINFO")
    kind = linkinfo.get("IFLA_INFO_KIND") if linkinfo else None
    vxlan = None
    if kind == "vxlan":
        data = linkinfo.get("IFLA_INFO_DATA")
        if data is not None:
            vxlan = VxlanInfo(
                vni=int(data.get("IFLA_VXLAN_ID") or 0),
                local=data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6"),
                remote=data.get("IFLA_VXLAN_GROUP") or data.get("IFLA_VXLAN_GROUP6"),
                port=int(data.get("IFLA_VXLAN_PORT") or 0),
            )
    flags = int(msg["flags"])
    return LinkInfo(
        index=int(msg["index"]),
        name=msg.get("IFLA_IFNAME") or "",
        kind=kind,
        alias=msg.get("IFLA_IFALIAS"),
        mtu=int(msg.get("IFLA_MTU") or 0),
        master=msg.get("IFLA_MASTER") or None,
        up=bool(flags & IFF_UP),
        lower_up=bool(flags & IFF_LOWER_UP),
        vxlan=vxlan,
    )


def lean_link_info(link: rtnl.Link) -> LinkInfo:
    """A :class:`LinkInfo` from a lean dump's or get's :class:`meridio.core.rtnl.Link`."""
    vx = link.vxlan
    return LinkInfo(
        index=link.index,
        name=link.name,
        kind=link.kind,
        alias=link.alias,
        mtu=link.mtu,
        master=link.master,
        up=bool(link.flags & IFF_UP),
        lower_up=bool(link.flags & IFF_LOWER_UP),
        vxlan=VxlanInfo(vx.vni, vx.local, vx.remote, vx.port) if vx is not None else None,
        group=link.group,
    )


async def read_links(netlink: NetlinkManager) -> dict[str, LinkInfo]:
    """Every link of the namespace, by name: one lean dump (see :mod:`meridio.core.rtnl`)."""
    return {link.name: lean_link_info(link) for link in await netlink.link_list()}


async def get_link(netlink: NetlinkManager, ifname: str) -> LinkInfo | None:
    """The link named ``ifname`` (None when there is none): one message, not a dump."""
    link = await netlink.link_get(ifname)
    return lean_link_info(link) if link is not None else None


# --- one request at a time -------------------------------------------------------------------

_LOCKS: weakref.WeakKeyDictionary[NetlinkManager, trio.Lock] = weakref.WeakKeyDictionary()
BUSY_RETRIES = 50


class _Serial:
    """The runtime's netlink manager, one request at a time.

    A netlink socket runs one dump at a time: a dump started while another is in progress on
    the same socket fails with EBUSY. The manager's socket is shared by every task of the
    process, so the tasks of this package take turns through one lock per manager, and retry
    on EBUSY in case a user that does not take the lock (another role's code) is dumping.
    """

    def __init__(self, netlink: NetlinkManager) -> None:
        self._netlink = netlink
        self._lock = _LOCKS.setdefault(netlink, trio.Lock())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._netlink, name)
        if name.startswith(("_", "run_")) or not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            async with self._lock:
                return await retry_busy(attr, *args, **kwargs)

        return call


async def retry_busy(fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    for attempt in range(BUSY_RETRIES):
        try:
            return await fn(*args, **kwargs)
        except NetlinkError as exc:
            if exc.code != errno.EBUSY or attempt == BUSY_RETRIES - 1:
                raise
            await trio.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")


def serial(netlink: NetlinkManager) -> NetlinkManager:
    """``netlink`` with its requests serialised (see :class:`_Serial`)."""
    if isinstance(netlink, _Serial):
        return netlink
    return cast(NetlinkManager, _Serial(netlink))


# --- sysctl -------------------------------------------------------------------------------------


def write_sysctl(path: str, value: str) -> bool:
    """Write ``/proc/sys/<path>`` (of this process's namespace); False if it does not exist
    (e.g. IPv6 disabled). The value is compared first, so repeating is free."""
    target = Path("/proc/sys") / path
    try:
        if target.read_text().strip() == value:
            return True
        target.write_text(value)
    except FileNotFoundError:
        return False
    return True


def no_dad(ifname: str) -> None:
    """Skip IPv6 duplicate address detection on ``ifname``: its addresses come from IPAM (or the
    endpoint) and are unique by construction, and DAD would hold each one tentative for a second
    or more before it can be used."""
    write_sysctl(f"net/ipv6/conf/{ifname}/accept_dad", "0")


def netns_inode(path: str) -> int:
    """The inode of a network namespace file: equal for two paths naming the same namespace."""
    return os.stat(path).st_ino


def pid_netns_path() -> str:
    """This process's network namespace, as a path another process can open."""
    return f"/proc/{os.getpid()}/ns/net"


def own_netns_inode() -> int:
    return netns_inode("/proc/self/ns/net")


# --- links --------------------------------------------------------------------------------------


class LinkError(Exception):
    """A link could not be made as asked; the message says what was tried."""


async def create_veth(
    netlink: NetlinkManager,
    name: str,
    peer: str,
    netns_path: str,
    mtu: int,
    *,
    master: int | None = None,
    group: int = 0,
) -> None:
    """A veth pair: ``name`` here and ``peer`` created directly in the namespace at
    ``netns_path``. The namespace file is open only during the call, so the namespace goes
    away with its last process as it should. With ``master``, ``name`` is made a port of that
    bridge and up in the same request (one kernel change instead of three); with ``group``,
    it is put in that link group."""
    extra: dict[str, Any] = {} if master is None else {"master": master, "state": "up"}
    if group:
        extra["group"] = group
    for attempt in (1, 2):
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await netlink.create_link(
                name,
                "veth",
                mtu=mtu,
                peer={"ifname": peer, "net_ns_fd": fd, "mtu": mtu},
                **extra,
            )
            return
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            if await netlink.link_get(name) is not None:
                return  # made meanwhile (an earlier instance's, adopted by the caller)
            # ``name`` is not here, so a ``peer`` in the client's namespace is the other end of
            # a pair whose first end is elsewhere: an earlier instance of this endpoint (its
            # namespace gone, or going, with sockets still holding it). The names are ours.
            if attempt == 1 and await _remove_in(netns_path, peer):
                continue
            raise LinkError(
                f"cannot create veth {name}: is there already an interface {peer} "
                f"in the client's namespace?"
            ) from exc
        finally:
            os.close(fd)


async def _remove_in(netns_path: str, ifname: str) -> bool:
    """Delete ``ifname`` in the namespace at ``netns_path``; True when it was there."""
    result = await trio.run_process(
        ["nsenter", f"--net={netns_path}", "ip", "link", "del", ifname],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode == 0


def vxlan_attrs(vni: int, local: str, remote: str, port: int) -> dict[str, Any]:
    six = family(local) == 6
    return {
        "vxlan_id": vni,
        "vxlan_local6" if six else "vxlan_local": local,
        "vxlan_group6" if six else "vxlan_group": remote,
        "vxlan_port": port,
    }


def vxlan_matches(info: LinkInfo, vni: int, local: str, remote: str, port: int) -> bool:
    vx = info.vxlan
    if info.kind != "vxlan" or vx is None:
        return False

    def same(a: str | None, b: str) -> bool:
        return a is not None and ipaddress.ip_address(a) == ipaddress.ip_address(b)

    return vx.vni == vni and vx.port == port and same(vx.local, local) and same(vx.remote, remote)


async def create_vxlan(
    netlink: NetlinkManager,
    name: str,
    *,
    vni: int,
    local: str,
    remote: str,
    port: int,
    mtu: int,
    group: int = 0,
) -> None:
    extra: dict[str, Any] = {"group": group} if group else {}
    try:
        await netlink.ensure_link(
            name, "vxlan", mtu=mtu, **vxlan_attrs(vni, local, remote, port), **extra
        )
    except RuntimeError as exc:  # EEXIST: the VNI is taken on this port
        raise LinkError(f"cannot create vxlan {name}: VNI {vni} is in use on port {port}") from exc


def _is_link_local(cidr: str) -> bool:
    return ipaddress.ip_interface(cidr).ip.is_link_local


async def ensure_addresses(netlink: NetlinkManager, ifname: str, wanted: Iterable[str]) -> None:
    """Exactly ``wanted`` (CIDRs) as the global addresses of ``ifname``."""
    want = {ipaddress.ip_interface(a) for a in wanted}
    if any(a.version == 6 for a in want):
        no_dad(ifname)
    have = {ipaddress.ip_interface(a) for a in await netlink.addresses(ifname)}
    for address in sorted(want - have, key=str):
        await netlink.ensure_address(ifname, str(address))
    for address in sorted(have - want, key=str):
        if not _is_link_local(str(address)):
            await netlink.ensure_address_absent(ifname, str(address))


async def configure_link(
    netlink: NetlinkManager,
    info: LinkInfo,
    *,
    alias: str | None = None,
    mtu: int | None = None,
    master: int | None = None,
    addresses: Sequence[str] | None = None,
    group: int | None = None,
) -> None:
    """Bring ``info``'s link to the wanted alias, MTU, master, addresses, group, and up."""
    if addresses is not None:
        await ensure_addresses(netlink, info.name, addresses)
    attrs: dict[str, Any] = {}
    if alias is not None and info.alias != alias:
        attrs["ifalias"] = alias
    if mtu and info.mtu != mtu:
        attrs["mtu"] = mtu
    if master is not None and info.master != master:
        attrs["master"] = master
    if group is not None and info.group != group:
        attrs["group"] = group
    if not info.up:
        attrs["state"] = "up"
    if attrs:
        await netlink.set_link_index(info.index, **attrs)


async def remove_link(netlink: NetlinkManager, ifname: str) -> None:
    with contextlib.suppress(LookupError):
        await netlink.ensure_link_absent(ifname)


def source_address(remote: str) -> str:
    """The address this namespace sends from toward ``remote`` (a route lookup, no packet)."""
    af = socket.AF_INET6 if family(remote) == 6 else socket.AF_INET
    try:
        with socket.socket(af, socket.SOCK_DGRAM) as sock:
            sock.connect((remote, 9))
            return str(sock.getsockname()[0])
    except OSError as exc:
        raise LinkError(f"no route toward {remote}: {exc.strerror}") from None


async def resolve(host: str) -> str:
    """An IP address of ``host`` (returned as is when it is one)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        found = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise LinkError(f"cannot resolve {host}: {exc}") from None
    return str(found[0][4][0])


async def underlay_mtu(netlink: NetlinkManager, address: str) -> int:
    """The MTU of the link that holds ``address`` (the primary address of a vxlan side)."""
    wanted = ipaddress.ip_address(address)
    holders = {a.index for a in await netlink.address_list() if ip_of(a.address) == wanted}
    for link in await netlink.link_list():
        if link.index in holders:
            return link.mtu
    raise LinkError(f"no interface holds the primary address {address}")


def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
