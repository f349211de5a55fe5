"""The client side of the connect service: request, refresh, and the client's end of the link.

The role says which connections it wants (:meth:`ConnectClient.set_desired`); the client runs
one task per connection that requests it, configures its own end of the link (for vxlan it
creates it; for veth the endpoint created it in our namespace), and refreshes it well within the
expiry the endpoint announced. A refresh is the same request again, so after an endpoint restart
the request recreates the connection with the same addresses: it is made at once when the
transport connection to the endpoint drops (the endpoint's process exited), not at the next
refresh, so a restarted endpoint gets its clients back as soon as it answers, however long its
expiry. When the endpoint cannot be reached the task retries with backoff, and counts the
connection lost after LOST_AFTER seconds without an answer (or the expiry, when shorter); when
our end of the link disappears it asks again at once. A connection no longer wanted is closed
(Close, then our end is removed), and links an earlier instance left for connections nobody
wants any more are removed too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpclib
import grpclib.client
import trio
from grpclib.const import Status
from grpclib.exceptions import ProtocolError, StreamTerminatedError
from pyroute2.netlink.exceptions import NetlinkError

from meridio.api.meridio.connect.v1 import (
    CloseRequest,
    Connection,
    ConnectRequest,
    ConnectStub,
    Mechanism,
    Veth,
    Vxlan,
)
from meridio.connect import kernel
from meridio.connect.kernel import LinkError
from meridio.core import conduit
from meridio.core.conduit import CLIENT_ALIAS, VETH, VXLAN
from meridio.runtime.bus import Lagged
from meridio.runtime.grpc import Endpoint, on_connection_lost
from meridio.runtime.netlink import LinkEvent, NetlinkManager
from meridio.runtime.notify import Signal

if TYPE_CHECKING:
    from meridio.runtime import Runtime

CALL_TIMEOUT = 10.0
CLOSE_TIMEOUT = 3.0
MAX_BACKOFF = 5.0
LOST_AFTER = 30.0
"""Seconds without an answer after which a connection counts as lost (the expiry, if shorter):
a long expiry (it spares refreshes) does not keep a client that lost its endpoint waiting."""
TRANSPORT_ERRORS = (OSError, StreamTerminatedError, TimeoutError, ProtocolError)


@dataclass(frozen=True)
class ClientSpec:
    """One connection the client wants."""

    connection_id: str
    endpoint: str  # where the connect service is: host:port or unix:///path
    network_service: str
    mechanism: str
    interface: str  # our end of the link
    netns_path: str = ""  # veth: our namespace
    primary_address: str = ""  # vxlan: our underlay address; empty: the one toward the endpoint
    vxlan_port: int = conduit.VXLAN_PORT
    context: Mapping[str, str] = field(default_factory=dict)
    client_addresses: tuple[str, ...] = ()  # proposals
    endpoint_addresses: tuple[str, ...] = ()
    mtu: int = 0

    def same_link(self, other: ClientSpec) -> bool:
        """Whether ``other`` differs from this one in its context only."""
        return (
            self.endpoint,
            self.network_service,
            self.mechanism,
            self.interface,
            self.netns_path,
            self.primary_address,
            self.vxlan_port,
            self.client_addresses,
            self.endpoint_addresses,
            self.mtu,
        ) == (
            other.endpoint,
            other.network_service,
            other.mechanism,
            other.interface,
            other.netns_path,
            other.primary_address,
            other.vxlan_port,
            other.client_addresses,
            other.endpoint_addresses,
            other.mtu,
        )


@dataclass(frozen=True)
class ClientEnd:
    """How the client's end of every link is set up: joined to ``bridge`` (the proxy) or given
    the addresses the endpoint assigned (the target)."""

    bridge: str | None = None


@dataclass
class ClientConnection:
    spec: ClientSpec
    reply: Connection | None = None
    established: bool = False
    last_ok: float = -math.inf
    error: str = ""
    attempt: int = 0
    vni: int = 0
    local: str = ""  # vxlan: our underlay address
    underlay_mtu: int = 0
    kick: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def client_addresses(self) -> tuple[str, ...]:
        return tuple(self.reply.client_addresses) if self.reply and self.established else ()

    @property
    def endpoint_addresses(self) -> tuple[str, ...]:
        return tuple(self.reply.endpoint_addresses) if self.reply and self.established else ()


def build_request(
    spec: ClientSpec, client_name: str, vni: int = 0, local: str = "", mtu: int = 0
) -> ConnectRequest:
    """The request for ``spec``; for vxlan with our underlay address ``local``, the proposed
    ``vni`` and the MTU our underlay allows."""
    mechanism = Mechanism(type=spec.mechanism, interface_name=spec.interface)
    if spec.mechanism == VETH:
        mechanism.veth = Veth(netns_path=spec.netns_path)
    else:
        mechanism.vxlan = Vxlan(client_address=local, vni=vni, port=spec.vxlan_port)
    return ConnectRequest(
        network_service=spec.network_service,
        connection_id=spec.connection_id,
        client_name=client_name,
        extra_context=dict(spec.context),
        mechanisms=[mechanism],
        client_addresses=list(spec.client_addresses),
        endpoint_addresses=list(spec.endpoint_addresses),
        mtu=conduit.agree_mtu(mtu, spec.mtu) if mtu else spec.mtu,
    )


class ConnectClient:
    def __init__(self, runtime: Runtime, name: str, end: ClientEnd) -> None:
        self.runtime = runtime
        self.name = name
        self.end = end
        self.log = runtime.log
        self.connections: dict[str, ClientConnection] = {}
        self.changes = Signal()
        self._desired: dict[str, ClientSpec] = {}
        self._desired_known = False
        self._wake = trio.Event()
        self._channels: dict[str, grpclib.client.Channel] = {}
        self._netlink: NetlinkManager | None = None
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    # --- the role's side ----------------------------------------------------------------------

    def set_desired(self, specs: Mapping[str, ClientSpec]) -> None:
        """The connections wanted from now on (by connection id)."""
        if self._desired_known and dict(specs) == self._desired:
            return
        self._desired = dict(specs)
        self._desired_known = True
        self._wake.set()

    def established(self) -> list[ClientConnection]:
        return [c for c in self.connections.values() if c.established]

    # --- life ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._netlink = kernel.serial(await self.runtime.netlink(events=True))
        try:
            with self.runtime.bus.subscribe(LinkEvent) as sub:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._watch_links, sub)
                    task_status.started()
                    while True:
                        await self._wake.wait()
                        self._wake = trio.Event()
                        await self._apply()
        finally:
            self._nursery = None
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()

    async def _watch_links(self, sub: Any) -> None:
        async for event in sub:
            if isinstance(event, Lagged):
                for conn in self.connections.values():
                    conn.kick.set()
            elif isinstance(event, LinkEvent) and event.netns is None and event.action == "del":
                for conn in self.connections.values():
                    if conn.spec.interface == event.ifname:
                        # our end is gone (the endpoint closed, or the pair died): not
                        # connected any more; ask again right away
                        self._set(conn, established=False)
                        conn.kick.set()

    async def _apply(self) -> None:
        assert self._nursery is not None
        closing = []
        for cid, conn in list(self.connections.items()):
            want = self._desired.get(cid)
            if want is None or not want.same_link(conn.spec):
                conn.scope.cancel()  # its task closes it (Close, then our end removed)
                closing.append(conn)
            elif want != conn.spec:
                conn.spec = want
                conn.kick.set()
        for conn in closing:
            await conn.done.wait()
        in_use = {spec.endpoint for spec in self._desired.values()}
        for endpoint in set(self._channels) - in_use:
            self._channels.pop(endpoint).close()
        for cid, spec in self._desired.items():
            if cid not in self.connections:
                conn = ClientConnection(spec)
                self.connections[cid] = conn
                self._nursery.start_soon(self._run_one, conn)
        if self._desired_known:
            await self._sweep()

    async def _sweep(self) -> None:
        """Remove links an earlier instance left for connections nobody wants now."""
        assert self._netlink is not None
        wanted = {c.spec.interface for c in self.connections.values()}
        async with self._lock:
            for info in (await kernel.read_links(self._netlink)).values():
                owner = conduit.connection_of(CLIENT_ALIAS, info.alias)
                if owner is not None and owner not in self._desired and info.name not in wanted:
                    self.log.info("removing a link of an unwanted connection", link=info.name)
                    await kernel.remove_link(self._netlink, info.name)

    # --- one connection -----------------------------------------------------------------------

    async def _stub(self, endpoint: str) -> ConnectStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = await self.runtime.grpc.channel(endpoint)
            self._channels[endpoint] = channel
        return ConnectStub(channel, timeout=CALL_TIMEOUT)

    async def _forget_neighbour(self, endpoint: str) -> None:
        host = Endpoint.parse(endpoint).host
        if self._netlink is None or not host:
            return
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return  # a name: its address is the resolver's business
        with contextlib.suppress(NetlinkError, OSError):
            await self._netlink.forget_neighbour(host)

    def _forget_channel(self, endpoint: str) -> None:
        channel = self._channels.pop(endpoint, None)
        if channel is not None:
            channel.close()

    def _set(self, conn: ClientConnection, **changes: Any) -> None:
        before = (conn.established, conn.reply and bytes(conn.reply), conn.error)
        for key, value in changes.items():
            setattr(conn, key, value)
        if before != (conn.established, conn.reply and bytes(conn.reply), conn.error):
            self.changes.bump()

    async def _run_one(self, conn: ClientConnection) -> None:
        cid = conn.spec.connection_id
        log = self.log.bind(connection=cid, endpoint=conn.spec.endpoint)
        delay = 0.1  # after a failure; doubles up to MAX_BACKOFF, reset by a success
        try:
            with conn.scope:
                while True:
                    wait = delay
                    try:
                        reply = await self._request(conn)
                        await self._configure(conn, reply)
                    except grpclib.GRPCError as exc:
                        if exc.status == Status.ALREADY_EXISTS:  # VNI taken: propose the next
                            conn.attempt, conn.vni = conn.attempt + 1, 0
                            wait = 0
                        self._failed(conn, log, f"{exc.status.name}: {exc.message}")
                    except VniClash as exc:
                        conn.attempt, conn.vni = conn.attempt + 1, 0
                        wait = 0
                        self._failed(conn, log, str(exc))
                    except TRANSPORT_ERRORS as exc:
                        # A half-open connection (the endpoint's host gone without a reset)
                        # times out every call and is never closed: start a new one, and
                        # forget the endpoint's MAC address (a host replaced under the same
                        # address has another one; a socket stuck on a failed entry waits).
                        self._forget_channel(conn.spec.endpoint)
                        await self._forget_neighbour(conn.spec.endpoint)
                        self._failed(conn, log, f"{type(exc).__name__}: {exc}")
                    except LinkError as exc:
                        self._failed(conn, log, f"{type(exc).__name__}: {exc}")
                    except Exception as exc:  # e.g. the kernel refused a change: retry
                        log.error("configuring the connection failed", exc_info=True)
                        self._failed(conn, log, f"{type(exc).__name__}: {exc}")
                    else:
                        if not conn.established:
                            log.info(
                                "connected",
                                mechanism=reply.mechanism.type,
                                interface=conn.spec.interface,
                                addresses=list(reply.client_addresses),
                            )
                        self._set(
                            conn,
                            reply=reply,
                            established=True,
                            error="",
                            last_ok=trio.current_time(),
                        )
                        delay = 0.05
                        wait = max(0.2, reply.expiry_seconds / 3)
                        self._kick_when_dropped(conn)
                    delay = min(MAX_BACKOFF, delay * 2)
                    with trio.move_on_after(wait):
                        await conn.kick.wait()
                    conn.kick = trio.Event()
        finally:
            with trio.CancelScope(shield=True):
                await self._close(conn, log)
                if self.connections.get(cid) is conn:
                    del self.connections[cid]
                self.changes.bump()
                conn.done.set()

    def _kick_when_dropped(self, conn: ClientConnection) -> None:
        """Ask again at once (this wait's kick) when the transport connection the answer came
        on drops: the endpoint's process exited, and its successor knows nothing of us."""
        channel = self._channels.get(conn.spec.endpoint)
        if channel is not None:
            on_connection_lost(channel, conn.spec.connection_id, conn.kick.set)

    def _failed(self, conn: ClientConnection, log: Any, error: str) -> None:
        expiry = conn.reply.expiry_seconds if conn.reply else 0.0
        lost = conn.established and trio.current_time() - conn.last_ok > min(expiry, LOST_AFTER)
        if error != conn.error:
            log.warning("connection request failed", error=error)
        self._set(conn, error=error, established=conn.established and not lost)

    async def _request(self, conn: ClientConnection) -> Connection:
        spec = conn.spec
        request = build_request(spec, self.name)
        if spec.mechanism == VXLAN:
            await self._underlay(conn)
            vni = await self._vni(conn)
            limit = conduit.vxlan_mtu(conn.underlay_mtu, conduit.family(conn.local))
            request = build_request(spec, self.name, vni, conn.local, limit)
        stub = await self._stub(spec.endpoint)
        reply: Connection = await self.runtime.grpc.call(stub.request, request)
        return reply

    async def _underlay(self, conn: ClientConnection) -> None:
        """Our underlay address (configured, or the one toward the endpoint) and its MTU."""
        assert self._netlink is not None
        local = conn.spec.primary_address
        if not local:
            host = Endpoint.parse(conn.spec.endpoint).host
            if not host:
                raise LinkError("vxlan needs a primary address when the endpoint is a unix socket")
            local = kernel.source_address(await kernel.resolve(host))
        if local != conn.local or not conn.underlay_mtu:
            conn.underlay_mtu = await kernel.underlay_mtu(self._netlink, local)
            conn.local = local

    async def _vni(self, conn: ClientConnection) -> int:
        """The VNI to ask for: the one proposed before until it is refused, then the next
        proposal that is free on our side."""
        if not conn.vni:
            assert self._netlink is not None
            used = {
                i.vxlan.vni
                for i in (await kernel.read_links(self._netlink)).values()
                if i.vxlan is not None and i.name != conn.spec.interface
            }
            conn.vni = conduit.propose_vni(conn.spec.connection_id, conn.attempt, used)
        return conn.vni

    async def _configure(self, conn: ClientConnection, reply: Connection) -> None:
        """Our end of the link as the reply says."""
        assert self._netlink is not None
        netlink = self._netlink
        spec = conn.spec
        async with self._lock:
            info = await kernel.get_link(netlink, spec.interface)
            if spec.mechanism == VXLAN:
                vx = reply.mechanism.vxlan
                want = (int(vx.vni), conn.local, vx.endpoint_address, int(vx.port))
                if info is not None and not kernel.vxlan_matches(info, *want):
                    await kernel.remove_link(netlink, spec.interface)
                    info = None
                if info is None:
                    try:
                        await kernel.create_vxlan(
                            netlink,
                            spec.interface,
                            vni=want[0],
                            local=want[1],
                            remote=want[2],
                            port=want[3],
                            mtu=reply.mtu,
                        )
                    except LinkError as exc:
                        raise VniClash(str(exc)) from exc
                    info = await kernel.get_link(netlink, spec.interface)
                    if info is None:
                        raise LinkError(f"{spec.interface} vanished right after creation")
            elif info is None:
                raise LinkError(f"the endpoint's veth end {spec.interface} is not here (yet)")
            master = None
            if self.end.bridge is not None:
                bridge = await netlink.link_get(self.end.bridge)
                if bridge is None:
                    raise LinkError(f"bridge {self.end.bridge} does not exist")
                master = bridge.index
            await kernel.configure_link(
                netlink,
                info,
                alias=conduit.alias_of(CLIENT_ALIAS, spec.connection_id),
                mtu=reply.mtu,
                master=master,
                addresses=None if self.end.bridge is not None else list(reply.client_addresses),
            )

    async def _close(self, conn: ClientConnection, log: Any) -> None:
        spec = conn.spec
        if conn.reply is not None or conn.error:
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    stub = await self._stub(spec.endpoint)
                    await self.runtime.grpc.call(
                        stub.close,
                        CloseRequest(
                            network_service=spec.network_service,
                            connection_id=spec.connection_id,
                        ),
                    )
                except (grpclib.GRPCError, *TRANSPORT_ERRORS) as exc:
                    log.info("close not confirmed by the endpoint", error=str(exc))
        if self._netlink is not None:
            async with self._lock:
                try:
                    await kernel.remove_link(self._netlink, spec.interface)
                except Exception as exc:
                    log.warning("removing our end of the link failed", error=str(exc))
        self._set(conn, established=False)
        log.info("disconnected", interface=spec.interface)


class VniClash(Exception):
    """The VNI the endpoint agreed to is taken on our side: propose another."""
