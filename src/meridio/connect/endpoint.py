"""The endpoint side of the connect service: the servicer and the reconcile of its links.

One trio task owns the endpoint's state (its connections and their links) and handles, in
order, what reaches it through one inbox: requests and closes from the gRPC handlers (which run
in the asyncio loop and wait on a future), and kernel link events from the bus. Its loop also
runs a periodic resync that repairs drift (a link or address removed by hand), closes
connections whose client stopped refreshing, and removes links left by an earlier instance
(recognised by their alias, ``meridio-endpoint:<connection id>``) that no client claimed
within the grace period. Serialising everything through one task means no two requests ever
race on a connection or a link.

A role plugs in what differs between the LB and the proxy through :class:`EndpointPolicy`:
which addresses both ends get, whether the endpoint's end carries addresses or joins a bridge,
and what happens when a connection closes.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpclib
import trio
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status

from meridio.api.meridio.connect.v1 import (
    CloseRequest,
    ConnectBase,
    Connection,
    ConnectRequest,
    Mechanism,
    Veth,
    Vxlan,
)
from meridio.connect import kernel
from meridio.connect.kernel import LinkError, LinkInfo, pid_netns_path
from meridio.core import conduit
from meridio.core.conduit import (
    ENDPOINT_ALIAS,
    VETH,
    VXLAN,
    InvalidRequest,
    MechanismSpec,
    RequestSpec,
)
from meridio.runtime.bus import Lagged
from meridio.runtime.netlink import LinkEvent, NetlinkManager, NetlinkOverrun
from meridio.runtime.notify import Signal

#: How long a gRPC handler waits for the endpoint task to answer its request.
HANDLER_TIMEOUT = 20.0


class VniTaken(Exception):
    """The proposed VXLAN VNI cannot be used here (ALREADY_EXISTS: propose another)."""


@dataclass(frozen=True)
class Assigned:
    """Addresses of a connection (CIDRs): the client's end, the endpoint's side (the client's
    next hops) and those the endpoint puts on its own end of the link (none on a bridge port)."""

    client: tuple[str, ...]
    endpoint: tuple[str, ...]
    on_link: tuple[str, ...] = ()


class EndpointPolicy(Protocol):
    """What a role decides for its endpoint (all called from the endpoint's trio task)."""

    network_service: str

    def check(self, spec: RequestSpec) -> None:
        """Refuse a request the role cannot serve (raise InvalidRequest)."""

    async def assign(self, spec: RequestSpec, previous: Assigned | None) -> Assigned:
        """The addresses of the connection (idempotent for the same connection id)."""

    def bridge(self) -> str | None:
        """The bridge every endpoint link joins, or None."""

    async def release(self, connection: EndpointConnection, reason: str) -> None:
        """The connection is closed and its link removed."""


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    """This endpoint's name in replies and logs."""
    mechanisms: tuple[str, ...] = conduit.MECHANISMS
    """Mechanisms this endpoint accepts."""
    link_prefix: str = "ep"
    mtu: int = 1500
    """MTU of veth links (and the limit for any link)."""
    primary_address: str = ""
    """This side's underlay address for vxlan; empty: the address this namespace sends from
    toward each client's primary address."""
    vxlan_port: int = conduit.VXLAN_PORT
    expiry: float = 30.0
    """Seconds a connection lives without a refresh."""
    resync_period: float = 2.0
    grace: float | None = None
    """Seconds after start during which unclaimed links of an earlier instance are kept for
    their clients to come back; default: ``expiry``."""


@dataclass
class EndpointConnection:
    spec: RequestSpec
    mechanism: MechanismSpec
    assigned: Assigned
    link: str
    mtu: int
    refreshed: float
    netns: int = 0  # veth: inode of the client's namespace
    local: str = ""  # vxlan: this side's underlay address
    index: int | None = None
    up: bool = False

    @property
    def connection_id(self) -> str:
        return self.spec.connection_id

    @property
    def context(self) -> Mapping[str, str]:
        return self.spec.context


@dataclass
class _Request:
    spec: RequestSpec
    future: asyncio.Future[Connection]


@dataclass
class _Close:
    network_service: str
    connection_id: str
    future: asyncio.Future[Empty]


def _settle(
    future: asyncio.Future[Any], result: Any = None, error: Exception | None = None
) -> None:
    if future.done():
        return  # the handler gave up (client cancelled or timed out)
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _status_error(exc: Exception) -> grpclib.GRPCError:
    if isinstance(exc, InvalidRequest):
        return grpclib.GRPCError(Status.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, VniTaken):
        return grpclib.GRPCError(Status.ALREADY_EXISTS, str(exc))
    if isinstance(exc, LinkError):
        return grpclib.GRPCError(Status.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, grpclib.GRPCError):
        return exc
    return grpclib.GRPCError(Status.UNAVAILABLE, f"the endpoint could not set up the link: {exc}")


class ConnectEndpoint:
    def __init__(self, runtime: Any, config: EndpointConfig, policy: EndpointPolicy) -> None:
        self.runtime = runtime
        self.config = config
        self.policy = policy
        self.log = runtime.log.bind(endpoint=config.name)
        self.connections: dict[str, EndpointConnection] = {}
        self.changes = Signal()
        self.bound: list[Any] = []
        self._send, self._recv = trio.open_memory_channel[Any](math.inf)
        self._netlink: NetlinkManager | None = None
        self._underlay_mtus: dict[str, int] = {}
        self._own_netns = kernel.own_netns_inode()
        self._started = 0.0
        self._links_dirty = False

    # --- from the gRPC handlers (asyncio side, same thread) ---------------------------------

    def submit(self, item: _Request | _Close) -> None:
        self._send.send_nowait(item)

    # --- life ---------------------------------------------------------------------------------

    async def run(
        self, listen: list[str], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._netlink = kernel.serial(await self.runtime.netlink(events=True))
        self._started = trio.current_time()
        try:
            bus = self.runtime.bus
            with bus.subscribe(LinkEvent) as links, bus.subscribe(NetlinkOverrun) as overruns:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._forward_events, links)
                    nursery.start_soon(self._forward_events, overruns)
                    server = await self.runtime.grpc.serve([ConnectService(self)], listen)
                    self.bound = list(server.bound)
                    self.log.info(
                        "connect endpoint serving",
                        service=self.policy.network_service,
                        listen=[str(b) for b in self.bound],
                    )
                    task_status.started()
                    await self._loop()
        finally:
            with trio.CancelScope(shield=True):
                await self._remove_all()

    async def _forward_events(self, sub: Any) -> None:
        async for event in sub:
            if isinstance(event, Lagged | NetlinkOverrun) or (
                isinstance(event, LinkEvent)
                and event.netns is None
                and (
                    event.ifname.startswith(self.config.link_prefix)
                    or any(c.index == event.index for c in self.connections.values())
                )
            ):
                self._send.send_nowait(event)

    async def _loop(self) -> None:
        next_resync = trio.current_time() + self.config.resync_period
        while True:
            items: list[Any] = []
            with trio.move_on_at(min(next_resync, self._next_expiry())):
                items.append(await self._recv.receive())
            while True:
                try:
                    items.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                for item in items:
                    await self._handle(item)
                if self._links_dirty:
                    self._links_dirty = False
                    await self._refresh_links()
                now = trio.current_time()
                await self._expire(now)
                if now >= next_resync:
                    next_resync = now + self.config.resync_period
                    await self._resync()
            except Exception as exc:  # the kernel refused something: try again shortly
                self.log.error("endpoint reconcile failed", error=str(exc), exc_info=True)
                self._links_dirty = True
                next_resync = min(next_resync, trio.current_time() + 1)

    def _next_expiry(self) -> float:
        if not self.connections:
            return math.inf
        return min(c.refreshed for c in self.connections.values()) + self.config.expiry

    async def _handle(self, item: Any) -> None:
        if isinstance(item, _Request):
            try:
                reply = await self._request(item.spec)
            except Exception as exc:
                if not isinstance(exc, InvalidRequest | VniTaken):
                    self.log.warning(
                        "connection request failed",
                        connection=item.spec.connection_id,
                        error=str(exc),
                    )
                _settle(item.future, error=_status_error(exc))
            else:
                _settle(item.future, reply)
        elif isinstance(item, _Close):
            conn = self.connections.get(item.connection_id)
            if conn is not None and item.network_service in ("", self.policy.network_service):
                await self._close(conn, "closed by the client")
            _settle(item.future, Empty())
        elif isinstance(item, LinkEvent):
            conn = next((c for c in self.connections.values() if c.index == item.index), None)
            if conn is not None and item.action == "del":
                await self._close(conn, "its link went away")
            else:
                self._links_dirty = True
        else:  # Lagged, NetlinkOverrun: events were lost, read the links again
            self._links_dirty = True

    # --- requests ----------------------------------------------------------------------------

    async def _request(self, spec: RequestSpec) -> Connection:
        if spec.network_service != self.policy.network_service:
            raise InvalidRequest(
                f"network service {spec.network_service!r} is not served here "
                f"(this endpoint serves {self.policy.network_service!r})"
            )
        self.policy.check(spec)
        assert self._netlink is not None
        links = await kernel.read_links(self._netlink)
        existing = self.connections.get(spec.connection_id)
        mechanism, netns, local = self._choose(spec, links)
        assigned = await self.policy.assign(spec, existing.assigned if existing else None)
        mtu = await self._mtu(mechanism, spec, local)
        name = conduit.link_name(self.config.link_prefix, spec.connection_id)
        conn = EndpointConnection(
            spec, mechanism, assigned, name, mtu, trio.current_time(), netns=netns, local=local
        )
        if existing is not None:
            conn.index, conn.up = existing.index, existing.up
            if self._relink_needed(existing, conn):
                await kernel.remove_link(self._netlink, name)
                conn.index, conn.up = None, False
                links.pop(name, None)
        try:
            await self._ensure(conn, links)
        except BaseException:
            if existing is None:
                with trio.CancelScope(shield=True):
                    await kernel.remove_link(self._netlink, name)
            raise
        self.connections[spec.connection_id] = conn
        if existing is None:
            self.log.info(
                "connection established",
                connection=spec.connection_id,
                client=spec.client_name,
                mechanism=mechanism.type,
                link=name,
                addresses=list(assigned.client),
            )
        if existing is None or self._visible(existing) != self._visible(conn):
            self.changes.bump()
        return self._reply(conn)

    @staticmethod
    def _visible(conn: EndpointConnection) -> tuple[Any, ...]:
        """What the role sees of a connection (a change of it is announced)."""
        return (dict(conn.context), conn.assigned, conn.up, conn.index)

    @staticmethod
    def _relink_needed(old: EndpointConnection, new: EndpointConnection) -> bool:
        a, b = old.mechanism, new.mechanism
        if a.type != b.type or a.interface != b.interface:
            return True
        if a.type == VETH:
            return old.netns != new.netns
        old_vx = (a.vni, a.port, a.client_address, old.local)
        return old_vx != (b.vni, b.port, b.client_address, new.local)

    def _choose(
        self, spec: RequestSpec, links: dict[str, LinkInfo]
    ) -> tuple[MechanismSpec, int, str]:
        """The first offered mechanism this endpoint serves; for veth the client's namespace
        (inode), for vxlan this side's underlay address."""
        offered = []
        for m in spec.mechanisms:
            offered.append(m.type)
            if m.type not in self.config.mechanisms:
                continue
            if m.type == VETH:
                try:
                    netns = kernel.netns_inode(m.netns_path)
                except OSError as exc:
                    raise InvalidRequest(
                        f"cannot open the client's netns {m.netns_path}: {exc.strerror}"
                    ) from None
                if netns == self._own_netns:
                    raise InvalidRequest(
                        f"netns {m.netns_path} is the endpoint's own namespace; veth needs two"
                    )
                return m, netns, ""
            local = self.config.primary_address
            if not local:
                try:
                    local = kernel.source_address(m.client_address)
                except LinkError as exc:
                    raise InvalidRequest(f"vxlan: {exc}") from None
            if conduit.family(local) != conduit.family(m.client_address):
                continue
            self._check_vni(spec.connection_id, m, links)
            return m, 0, local
        served = ", ".join(self.config.mechanisms)
        if VXLAN in self.config.mechanisms and self.config.primary_address:
            served += f" (vxlan over IPv{conduit.family(self.config.primary_address)})"
        raise InvalidRequest(
            f"none of the offered mechanisms ({', '.join(offered)}) is served here; "
            f"this endpoint serves {served}"
        )

    def _check_vni(self, connection_id: str, m: MechanismSpec, links: dict[str, LinkInfo]) -> None:
        own = conduit.link_name(self.config.link_prefix, connection_id)
        for info in links.values():
            vx = info.vxlan
            if vx is not None and info.name != own and (vx.vni, vx.port) == (m.vni, m.port):
                raise VniTaken(
                    f"VNI {m.vni} on port {m.port} is in use at endpoint {self.config.name}"
                )

    async def _mtu(self, mechanism: MechanismSpec, spec: RequestSpec, local: str) -> int:
        limit = self.config.mtu
        if mechanism.type == VXLAN:
            underlay = self._underlay_mtus.get(local)
            if underlay is None:
                assert self._netlink is not None
                underlay = await kernel.underlay_mtu(self._netlink, local)
                self._underlay_mtus[local] = underlay
            limit = min(limit, conduit.vxlan_mtu(underlay, conduit.family(local)))
        return conduit.agree_mtu(limit, spec.mtu)

    async def _ensure(self, conn: EndpointConnection, links: dict[str, LinkInfo]) -> None:
        """Create the connection's link if missing (or adopt the one a previous instance left)
        and configure it; records its index."""
        assert self._netlink is not None
        netlink = self._netlink
        m = conn.mechanism
        info = links.get(conn.link)
        if info is not None and m.type == VXLAN:
            if not kernel.vxlan_matches(info, m.vni, conn.local, m.client_address, m.port):
                await kernel.remove_link(netlink, conn.link)
                info = None
        elif info is not None and info.kind != "veth":
            await kernel.remove_link(netlink, conn.link)
            info = None
        if info is None:
            if m.type == VETH:
                await kernel.create_veth(netlink, conn.link, m.interface, m.netns_path, conn.mtu)
            else:
                try:
                    await kernel.create_vxlan(
                        netlink,
                        conn.link,
                        vni=m.vni,
                        local=conn.local,
                        remote=m.client_address,
                        port=m.port,
                        mtu=conn.mtu,
                    )
                except LinkError as exc:
                    raise VniTaken(str(exc)) from exc
            info = (await kernel.read_links(netlink))[conn.link]
        bridge = self.policy.bridge()
        master = None
        if bridge is not None:
            master = await netlink.link_index(bridge)
            if master is None:
                raise LinkError(f"bridge {bridge} does not exist")
        await kernel.configure_link(
            netlink,
            info,
            alias=conduit.alias_of(ENDPOINT_ALIAS, conn.connection_id),
            mtu=conn.mtu,
            master=master,
            addresses=None if bridge is not None else conn.assigned.on_link,
        )
        conn.index = info.index

    def _reply(self, conn: EndpointConnection) -> Connection:
        m = conn.mechanism
        mechanism = Mechanism(type=m.type, interface_name=m.interface)
        if m.type == VETH:
            mechanism.veth = Veth(netns_path=m.netns_path)
        else:
            mechanism.vxlan = Vxlan(
                client_address=m.client_address,
                endpoint_address=conn.local,
                vni=m.vni,
                port=m.port,
            )
        return Connection(
            connection_id=conn.connection_id,
            network_service=conn.spec.network_service,
            endpoint_name=self.config.name,
            mechanism=mechanism,
            client_addresses=list(conn.assigned.client),
            endpoint_addresses=list(conn.assigned.endpoint),
            endpoint_interface=conn.link,
            mtu=conn.mtu,
            expiry_seconds=self.config.expiry,
            extra_context=dict(conn.context),
        )

    # --- liveness, drift, clean-up ------------------------------------------------------------

    async def _expire(self, now: float) -> None:
        for conn in list(self.connections.values()):
            if conn.refreshed + self.config.expiry <= now:
                await self._close(conn, "its client stopped refreshing it")

    async def _close(self, conn: EndpointConnection, reason: str) -> None:
        assert self._netlink is not None
        if self.connections.get(conn.connection_id) is not conn:
            return
        del self.connections[conn.connection_id]
        conn.index = None  # our own deletion is not "the link went away"
        try:
            await kernel.remove_link(self._netlink, conn.link)
        except Exception as exc:  # the resync removes it as a link no client claims
            self.log.warning("removing a closed connection's link failed", error=str(exc))
        self.log.info("connection closed", connection=conn.connection_id, reason=reason)
        self.changes.bump()
        try:
            await self.policy.release(conn, reason)
        except Exception as exc:
            self.log.warning(
                "releasing a closed connection failed",
                connection=conn.connection_id,
                error=str(exc),
            )

    async def _refresh_links(self) -> None:
        """Read the links: note which are up, close connections whose link is gone."""
        assert self._netlink is not None
        by_index = {i.index: i for i in (await kernel.read_links(self._netlink)).values()}
        changed = False
        for conn in list(self.connections.values()):
            info = by_index.get(conn.index) if conn.index is not None else None
            if info is None or info.name != conn.link:
                if conn.index is not None:
                    await self._close(conn, "its link went away")
                continue
            if conn.up != info.running:
                conn.up = info.running
                changed = True
        if changed:
            self.changes.bump()

    async def _resync(self) -> None:
        """Repair drift of live connections; remove links of an earlier instance that no client
        claimed within the grace period."""
        assert self._netlink is not None
        await self._refresh_links()
        links = await kernel.read_links(self._netlink)
        for conn in list(self.connections.values()):
            info = links.get(conn.link)
            if info is not None:
                try:
                    await self._ensure(conn, links)
                except Exception as exc:
                    self.log.warning(
                        "repairing a link failed", connection=conn.connection_id, error=str(exc)
                    )
        grace = self.config.expiry if self.config.grace is None else self.config.grace
        if trio.current_time() < self._started + grace:
            return
        owned = {c.link for c in self.connections.values()}
        for info in links.values():
            claimed = conduit.connection_of(ENDPOINT_ALIAS, info.alias)
            if claimed is not None and info.name not in owned:
                self.log.info("removing a link no client claimed", link=info.name)
                await kernel.remove_link(self._netlink, info.name)

    async def _remove_all(self) -> None:
        if self._netlink is None:
            return
        for conn in list(self.connections.values()):
            conn.index = None
            try:
                await kernel.remove_link(self._netlink, conn.link)
            except Exception as exc:
                self.log.warning("removing a link failed", link=conn.link, error=str(exc))
        self.connections.clear()
        self.changes.bump()


class ConnectService(ConnectBase):  # type: ignore[misc]  # generated code is untyped
    """``meridio.connect.v1.Connect``: hands each call to the endpoint's task and waits."""

    def __init__(self, endpoint: ConnectEndpoint) -> None:
        self.endpoint = endpoint

    async def _submit(self, make: Callable[[asyncio.Future[Any]], Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.endpoint.submit(make(future))
        try:
            return await asyncio.wait_for(future, HANDLER_TIMEOUT)
        except TimeoutError:
            raise grpclib.GRPCError(
                Status.DEADLINE_EXCEEDED, "the endpoint did not answer in time"
            ) from None

    async def request(self, connect_request: ConnectRequest) -> Connection:
        try:
            spec = conduit.parse_request(connect_request)
        except InvalidRequest as exc:
            raise grpclib.GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        result: Connection = await self._submit(lambda f: _Request(spec, f))
        return result

    async def close(self, close_request: CloseRequest) -> Empty:
        if not close_request.connection_id:
            raise grpclib.GRPCError(Status.INVALID_ARGUMENT, "connection id is empty")
        result: Empty = await self._submit(
            lambda f: _Close(close_request.network_service, close_request.connection_id, f)
        )
        return result


__all__ = [
    "Assigned",
    "ConnectEndpoint",
    "ConnectService",
    "EndpointConfig",
    "EndpointConnection",
    "EndpointPolicy",
    "Signal",
    "VniTaken",
    "pid_netns_path",
]
