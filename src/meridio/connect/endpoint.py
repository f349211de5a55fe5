"""The endpoint side of the connect service: the servicer and the reconcile of its links.

One trio task owns the endpoint's state (its connections and their links) and handles, in
order, what reaches it through one inbox: requests and closes from the gRPC handlers (which run
in the asyncio loop and wait on a future), and kernel link events from the bus. Its loop also
runs a periodic resync that repairs drift (a link or address removed by hand), closes
connections whose client stopped refreshing, and removes links left by an earlier instance
(recognised by their alias, ``meridio-endpoint:<connection id>``) that no client claimed
within the grace period. Serialising everything through one task means no two requests ever
race on a connection or a link.

It stays cheap with a thousand connections (a proxy with every target of a busy node):

* a refresh that changes nothing (the same request again, for a link in place) is answered by
  the handler at once, with the reply serialized when the connection was made;
* a new connection's addresses are assigned beside the task (the role may ask IPAM), many at
  once; the request then goes to a link maker, also beside the task, which makes the bridge
  ports of the connections waiting for one in one exchange with the kernel (MAKE_CHUNK at a
  time) and hands each back to the task, whose reply goes then: while the kernel makes links,
  the task answers, assigns and serves what was made before;
* link events update the connection they concern (found by link index), and the resync reads
  every link in one lean dump (:mod:`meridio.core.rtnl`), put off while connections are being
  set up; expiries are kept in a heap.
* bridge ports carry no addresses, so anything that changes one of them is a link event: while
  none came (and no request, repair or read failed), there is nothing a resync could find,
  and it is skipped, up to QUIET_RESYNC_PERIODS periods in a row.

A role plugs in what differs between the LB and the proxy through :class:`EndpointPolicy`:
which addresses both ends get, whether the endpoint's end carries addresses or joins a bridge,
and what happens when a connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import socket
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpclib
import trio
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status

from meridio.api.meridio.connect.v1 import (
    CloseRequest,
    ConnectBase,
    Connection,
    ConnectRequest,
)
from meridio.connect import kernel
from meridio.connect.kernel import LinkError, LinkInfo, pid_netns_path
from meridio.connect.netnsguard import NetnsGuard
from meridio.core import conduit, rtnl, wire
from meridio.core.authz import RefusalLog
from meridio.core.conduit import (
    ENDPOINT_ALIAS,
    VETH,
    VXLAN,
    InvalidRequest,
    MechanismSpec,
    RequestSpec,
)
from meridio.core.netnsref import Refused
from meridio.runtime.bus import Lagged
from meridio.runtime.grpc import Encoded
from meridio.runtime.netlink import LinkEvent, NetlinkManager, NetlinkOverrun, VethSpec
from meridio.runtime.notify import Signal
from meridio.runtime.tls import CallPeer, current_peer, refused_counter

if TYPE_CHECKING:
    from meridio.runtime import Runtime

#: How long a gRPC handler waits for the endpoint task to answer its request.
HANDLER_TIMEOUT = 20.0
#: New connections whose addresses the role assigns at once (IPAM round trips in flight).
ASSIGN_CONCURRENCY = 256
#: Connections the listening socket queues before they are accepted.
LISTEN_BACKLOG = 4096
#: Resync periods a resync may wait while new connections are being set up.
RESYNC_DEFER = 4
#: Bridge ports only: resync periods a resync may be skipped while no link changed.
QUIET_RESYNC_PERIODS = 12
#: New bridge ports made in one exchange with the kernel; their replies go as soon as it ends.
MAKE_CHUNK = 64
#: Requests remembered, parsed, by their bytes (a refresh sends its connection's very bytes).
PARSED_REQUESTS = 4096
REQUEST_PATH = "/meridio.connect.v1.Connect/Request"


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
    track_changes: bool = False
    """Collect the ids of the connections that changed in :attr:`ConnectEndpoint.changed`
    (for a role that follows them one by one instead of reading every connection)."""
    isolate_ports: bool = False
    """Make the links isolated ports of the bridge (:meth:`EndpointPolicy.bridge`): the bridge
    forwards nothing from one to another, only between them and its other ports."""
    netns_allow: frozenset[str] = frozenset()
    """Names under /run/netns a veth request may name whoever calls (the
    ``connect-netns-allow`` setting); any other reference must be the caller's own
    namespace (see :mod:`meridio.core.netnsref`)."""


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
    reply: Encoded | None = field(default=None, repr=False, compare=False)  # serialized once

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
    proven: Mapping[str, int] = field(default_factory=dict)
    """Namespace references of the request proved to be the caller's -> their inode."""

    @property
    def connection_id(self) -> str:
        return self.spec.connection_id


@dataclass
class _Close:
    network_service: str
    connection_id: str
    future: asyncio.Future[Empty]


@dataclass
class _Assigned:
    """A new connection's addresses, back from the role (or why there are none)."""

    request: _Request
    addresses: Assigned | None = None
    error: Exception | None = None
    link: LinkInfo | None = None  # its link, made together with those of others
    made: bool = False  # back from the link maker (with its link, or to make it the usual way)


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
    if isinstance(exc, Refused):
        return grpclib.GRPCError(Status.PERMISSION_DENIED, str(exc))
    if isinstance(exc, VniTaken):
        return grpclib.GRPCError(Status.ALREADY_EXISTS, str(exc))
    if isinstance(exc, LinkError):
        return grpclib.GRPCError(Status.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, grpclib.GRPCError):
        return exc
    return grpclib.GRPCError(Status.UNAVAILABLE, f"the endpoint could not set up the link: {exc}")


def link_group(network_service: str) -> int:
    """The link group of an endpoint's links: from its network service, so that an endpoint
    restarted finds its links in it, and, on exit, deletes them in one request."""
    return zlib.crc32(f"meridio-endpoint:{network_service}".encode()) & 0x7FFFFFFF or 1


def _deepen_backlog(server: Any) -> None:
    """Let every client of a busy node connect at once: a proxy that starts with a thousand
    targets asking gets a thousand connections at the same moment, and asyncio's default
    listen backlog (100) makes the others fail (unix socket) or wait for SYN retries (TCP).

    The runtime's server does not take a backlog, so the listening sockets are found through
    it (every attribute looked up defensively: without them the default stays)."""
    for inner in getattr(server, "_servers", ()):
        for sock in getattr(getattr(inner, "_server", None), "sockets", None) or ():
            with contextlib.suppress(OSError, ValueError):
                dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
                with dup:
                    dup.listen(LISTEN_BACKLOG)


class ConnectEndpoint:
    def __init__(self, runtime: Runtime, config: EndpointConfig, policy: EndpointPolicy) -> None:
        self.runtime = runtime
        self.config = config
        self.policy = policy
        self.log = runtime.log.bind(endpoint=config.name)
        self.connections: dict[str, EndpointConnection] = {}
        self.changes = Signal()
        self.changed: set[str] = set()
        """With ``track_changes``: ids of connections that appeared, closed or changed what
        the role sees (addresses, context, link up) since the role last emptied it."""
        self.bound: list[Any] = []
        self._send, self._recv = trio.open_memory_channel[Any](math.inf)
        self._make_send, self._make_recv = trio.open_memory_channel[_Assigned](math.inf)
        self._netlink: NetlinkManager | None = None
        self._underlay_mtus: dict[str, int] = {}
        self._own_netns = kernel.own_netns_inode()
        self._started = 0.0
        self._links_dirty = False
        self._link_news = True  # since the last resync: a link event, a request, a failure
        self._by_index: dict[int, str] = {}  # link index -> connection id
        self._expiries: list[tuple[float, str]] = []  # heap of (deadline, connection id); stale
        # entries (the connection was refreshed or closed since) are dropped when they surface
        self._assigning: dict[str, list[_Request | _Close]] = {}  # id -> what waits for it
        self._assign_limit = trio.CapacityLimiter(ASSIGN_CONCURRENCY)
        self._bridge_index: int | None = None
        self._nursery: trio.Nursery | None = None
        self._group = link_group(policy.network_service)
        self.guard = NetnsGuard(config.netns_allow)
        self._refusals = RefusalLog()

    def _announce(self, *connection_ids: str) -> None:
        if self.config.track_changes:
            self.changed.update(connection_ids)
        self.changes.bump()

    # --- from the gRPC handlers (asyncio side, same thread) ---------------------------------

    def submit(self, item: _Request | _Close) -> None:
        self._send.send_nowait(item)

    async def prove(self, spec: RequestSpec, peer: CallPeer | None) -> dict[str, int]:
        """The namespace references of ``spec``'s veth mechanisms (those this endpoint
        serves), each proved to be the caller's: path -> inode. Refused (logged once a minute
        per caller and path, counted) when one is not."""
        if VETH not in self.config.mechanisms:
            return {}
        proven: dict[str, int] = {}
        for m in spec.mechanisms:
            if m.type != VETH or m.netns_path in proven:
                continue
            try:
                proven[m.netns_path] = await self.guard.check(m.netns_path, peer)
            except Refused as exc:
                self._refused(spec, m.netns_path, peer, str(exc))
                raise
        return proven

    def _refused(self, spec: RequestSpec, path: str, peer: CallPeer | None, reason: str) -> None:
        identity = peer.identity if peer is not None else None
        role = (identity.role or "") if identity is not None else ""
        refused_counter().labels(
            reason="netns", role=role or "none", method="/meridio.connect.v1.Connect/Request"
        ).inc()
        who = str(identity) if identity is not None else None
        caller: str | None = None
        if peer is not None:
            caller = f"pid {peer.pid}" if peer.pid is not None else peer.address
        repeats = self._refusals.note((who, caller, path), time.monotonic())
        if repeats is None:
            return
        self.log.warning(
            "connect refused: netns not the caller's",
            connection=spec.connection_id,
            peer=who,
            caller=caller,
            netns=path,
            reason=reason,
            **({"repeats_not_logged": repeats} if repeats else {}),
        )

    def refresh(self, spec: RequestSpec) -> Encoded | None:
        """A refresh that changes nothing, answered on the spot: the same request as the one
        the connection was made or last changed with, for a link in place, with nothing
        pending for it. It touches no link (its reply is the one given before), so it need
        not wait for its turn in the endpoint's task; anything else does (None)."""
        conn = self.connections.get(spec.connection_id)
        if (
            conn is None
            or conn.index is None
            or conn.reply is None
            or spec.connection_id in self._assigning
            or conn.spec != spec
        ):
            return None
        conn.refreshed = trio.current_time()
        heapq.heappush(self._expiries, (conn.refreshed + self.config.expiry, conn.connection_id))
        return conn.reply

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
                    self._nursery = nursery
                    nursery.start_soon(self._forward_events, links)
                    nursery.start_soon(self._forward_events, overruns)
                    nursery.start_soon(self._link_maker)
                    server = await self.runtime.grpc.serve([ConnectService(self)], listen)
                    _deepen_backlog(server)
                    self.bound = list(server.bound)
                    self.log.info(
                        "connect endpoint serving",
                        service=self.policy.network_service,
                        listen=[str(b) for b in self.bound],
                    )
                    task_status.started()
                    await self._loop()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._remove_all()

    async def _forward_events(self, sub: Any) -> None:
        bridge = self.policy.bridge()
        async for event in sub:
            if isinstance(event, Lagged | NetlinkOverrun) or (
                isinstance(event, LinkEvent)
                and event.netns is None
                and (
                    event.index in self._by_index
                    or event.ifname.startswith(self.config.link_prefix)
                    or event.ifname == bridge
                )
            ):
                self._send.send_nowait(event)

    async def _loop(self) -> None:
        period = self.config.resync_period
        next_resync = trio.current_time() + period
        latest_resync = next_resync + RESYNC_DEFER * period
        last_resync = -math.inf
        while True:
            items: list[Any] = []
            # expiries are checked to the second: a refresh makes the earliest deadline stale,
            # and waking for each of them would cost a wake-up per refresh
            expiry = self._next_expiry()
            with trio.move_on_at(
                min(next_resync, math.ceil(expiry) if expiry < math.inf else expiry)
            ):
                items.append(await self._recv.receive())
            while True:
                try:
                    items.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            items = self._to_link_maker(items)
            if items:
                self._link_news = True
            for item in items:
                try:
                    await self._handle(item)
                except Exception as exc:  # the kernel refused something: the others go on
                    self.log.error("endpoint reconcile failed", error=str(exc), exc_info=True)
                    self._links_dirty = True
            try:
                if self._links_dirty:
                    self._links_dirty = False
                    await self._refresh_links(await self._read_links())
                now = trio.current_time()
                await self._expire(now)
                if now >= next_resync and self._assigning and now < latest_resync:
                    # connections are being set up (a cold start): reading every link now
                    # would only slow them down, and their links are read as they are made
                    next_resync = min(now + 1, latest_resync)
                elif now >= next_resync:
                    next_resync = now + period
                    latest_resync = next_resync + RESYNC_DEFER * period
                    if self._resync_due(now, last_resync):
                        last_resync = now
                        await self._resync()
            except Exception as exc:  # the kernel refused something: try again shortly
                self.log.error("endpoint reconcile failed", error=str(exc), exc_info=True)
                self._links_dirty = True
                self._link_news = True
                next_resync = min(next_resync, trio.current_time() + 1)

    def _resync_due(self, now: float, last: float) -> bool:
        """Whether the resync at ``now`` (the last one at ``last``) can find anything."""
        if self._link_news or self.policy.bridge() is None:
            return True  # links with addresses: an address removed is no link event
        grace = self.config.expiry if self.config.grace is None else self.config.grace
        if last < self._started + grace <= now:
            return True  # the links no client claimed go now
        return now >= last + QUIET_RESYNC_PERIODS * self.config.resync_period

    def _next_expiry(self) -> float:
        """When the connection refreshed longest ago expires (inf: no connection)."""
        heap = self._expiries
        while heap:
            deadline, cid = heap[0]
            conn = self.connections.get(cid)
            if conn is not None and conn.refreshed + self.config.expiry == deadline:
                return deadline
            heapq.heappop(heap)
        return math.inf

    async def _handle(self, item: Any) -> None:
        if isinstance(item, _Request | _Close):
            waiting = self._assigning.get(item.connection_id)
            if waiting is not None:  # its connection is being set up: after that, in order
                waiting.append(item)
            elif isinstance(item, _Request):
                if item.future.done() and item.connection_id in self.connections:
                    return  # a refresh nobody waits for any more (the client asks again)
                await self._serve(item)
            else:
                conn = self.connections.get(item.connection_id)
                if conn is not None and item.network_service in ("", self.policy.network_service):
                    await self._close(conn, "closed by the client")
                _settle(item.future, Empty())
        elif isinstance(item, _Assigned):
            waiting = self._assigning.pop(item.request.connection_id, [])
            await self._serve(item.request, item)
            for later in waiting:
                await self._handle(later)
        elif isinstance(item, LinkEvent):
            if item.ifname == self.policy.bridge() and item.action == "del":
                self._bridge_index = None
            cid = self._by_index.get(item.index)
            conn = self.connections.get(cid) if cid is not None else None
            if conn is None or conn.index != item.index:
                return
            if item.action == "del":
                await self._close(conn, "its link went away")
            elif item.ifname != conn.link:
                self._links_dirty = True  # renamed: the refresh closes it
            elif conn.up != (item.up and item.lower_up):
                conn.up = item.up and item.lower_up
                self._announce(conn.connection_id)
        else:  # Lagged, NetlinkOverrun: events were lost, read the links again
            self._links_dirty = True

    async def _serve(self, item: _Request, assigned: _Assigned | None = None) -> None:
        try:
            if assigned is not None and assigned.error is not None:
                raise assigned.error
            if assigned is None:
                reply = await self._request(item, None)
            else:
                reply = await self._request(item, assigned.addresses, assigned.link)
        except Exception as exc:
            made = assigned.link if assigned is not None else None
            if made is not None and item.connection_id not in self.connections:
                assert self._netlink is not None  # its link was made for nothing
                with contextlib.suppress(Exception):
                    await kernel.remove_link(self._netlink, made.name)
            if not isinstance(exc, InvalidRequest | VniTaken | Refused):
                self.log.warning(
                    "connection request failed",
                    connection=item.spec.connection_id,
                    error=str(exc),
                )
            _settle(item.future, error=_status_error(exc))
        else:
            if reply is not None:
                _settle(item.future, reply)

    def _to_link_maker(self, items: list[Any]) -> list[Any]:
        """Hand the new connections whose addresses came back to the link maker (bridge
        ports); the others, to handle now. Those stay in ``_assigning`` meanwhile: anything
        else for them waits."""
        if self.policy.bridge() is None:
            return items
        rest = []
        for item in items:
            if (
                isinstance(item, _Assigned)
                and not item.made
                and item.error is None
                and item.request.spec.connection_id not in self.connections
            ):
                self._make_send.send_nowait(item)
            else:
                rest.append(item)
        return rest

    async def _link_maker(self) -> None:
        """Make the veth links of new connections, MAKE_CHUNK in one exchange with the kernel
        rather than a few round trips each (a thousand targets asking at once, on a busy node,
        take seconds instead of minutes), and send each back to the endpoint's task to be
        served (its reply goes then). Beside that task: while the kernel makes a chunk, the
        task answers, assigns addresses and serves the chunk made before."""
        while True:
            items = [await self._make_recv.receive()]
            while len(items) < MAKE_CHUNK:
                try:
                    items.append(self._make_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self._make_links(items)
            except Exception as exc:  # each is made the usual way
                self.log.warning("making links together failed", error=str(exc))
            for item in items:
                item.made = True
                self._send.send_nowait(item)

    async def _make_links(self, items: list[_Assigned]) -> None:
        """Make the links of ``items`` in one exchange with the kernel. Only bridge ports:
        they need nothing else. A link that cannot be made so is made the usual way after."""
        batch: list[tuple[_Assigned, VethSpec]] = []
        for item in items:
            spec = item.request.spec
            try:
                mechanism, _netns, local = await self._choose(spec, None, item.request.proven)
                mtu = await self._mtu(mechanism, spec, local)
                master = await self._bridge()
            except Exception:  # served the usual way, which says what is wrong
                continue
            if mechanism.type != VETH:
                continue
            name = conduit.link_name(self.config.link_prefix, spec.connection_id)
            vspec = VethSpec(
                name,
                mechanism.interface,
                mechanism.netns_path,
                mtu,
                master=master,
                up=True,
                alias=conduit.alias_of(ENDPOINT_ALIAS, spec.connection_id),
                group=self._group,
                isolated=self.config.isolate_ports,
                ipv6_link_local=False,
            )
            batch.append((item, vspec))
        if not batch:
            return
        assert self._netlink is not None
        made = await self._netlink.create_veths([vspec for _, vspec in batch], chunk=MAKE_CHUNK)
        for (item, _), link in zip(batch, made, strict=True):
            if isinstance(link, rtnl.Link):
                item.link = kernel.lean_link_info(link)

    async def _assign(self, item: _Request) -> None:
        """The addresses of a new connection, beside the endpoint's task (the role may ask
        IPAM, a round trip or two): the request comes back to the task with them."""
        result = _Assigned(item)
        try:
            async with self._assign_limit:
                result.addresses = await self.policy.assign(item.spec, None)
        except Exception as exc:
            result.error = exc
        self._send.send_nowait(result)

    # --- requests ----------------------------------------------------------------------------

    async def _request(
        self, item: _Request, assigned: Assigned | None, link: LinkInfo | None = None
    ) -> Encoded | None:
        """Serve a request: the reply, serialized; None when a new connection's addresses are
        being assigned (the request is served again with them, and with its ``link`` when it
        was made already)."""
        spec = item.spec
        if spec.network_service != self.policy.network_service:
            raise InvalidRequest(
                f"network service {spec.network_service!r} is not served here "
                f"(this endpoint serves {self.policy.network_service!r})"
            )
        self.policy.check(spec)
        assert self._netlink is not None
        existing = self.connections.get(spec.connection_id)
        mechanism, netns, local = await self._choose(spec, existing, item.proven)
        if assigned is None:
            if existing is None:
                assert self._nursery is not None
                self._assigning[spec.connection_id] = []
                self._nursery.start_soon(self._assign, item)
                return None
            assigned = await self.policy.assign(spec, existing.assigned)
        mtu = await self._mtu(mechanism, spec, local)
        name = conduit.link_name(self.config.link_prefix, spec.connection_id)
        conn = EndpointConnection(
            spec, mechanism, assigned, name, mtu, trio.current_time(), netns=netns, local=local
        )
        relinked = False
        if existing is not None:
            conn.index, conn.up = existing.index, existing.up
            if self._relink_needed(existing, conn):
                self._forget_index(existing)
                await kernel.remove_link(self._netlink, name)
                conn.index, conn.up = None, False
                relinked = True
        if (
            existing is None
            or relinked
            or conn.index is None
            or (existing.mtu, existing.assigned) != (conn.mtu, conn.assigned)
        ):
            try:
                await self._ensure(conn, link if existing is None else None)
            except BaseException:
                if existing is None:
                    with trio.CancelScope(shield=True):
                        await kernel.remove_link(self._netlink, name)
                raise
        elif existing.spec == spec:
            # a refresh that changes nothing: no kernel call (the resync repairs drift, an
            # event says when the link goes) and the same reply
            conn.reply = existing.reply
        if conn.reply is None:
            conn.reply = Encoded(self._reply(conn))
        self.connections[spec.connection_id] = conn
        heapq.heappush(self._expiries, (conn.refreshed + self.config.expiry, conn.connection_id))
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
            self._announce(conn.connection_id)
        return conn.reply

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

    async def _choose(
        self, spec: RequestSpec, existing: EndpointConnection | None, proven: Mapping[str, int]
    ) -> tuple[MechanismSpec, int, str]:
        """The first offered mechanism this endpoint serves; for veth the client's namespace
        (inode), which must still be the one proved to be the caller's (``proven``), for
        vxlan this side's underlay address."""
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
                if proven.get(m.netns_path) != netns:
                    raise Refused(
                        f"netns {m.netns_path} is not the namespace proved to be the caller's "
                        "(it changed, or was not checked)"
                    )
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
            if existing is None or (existing.mechanism, existing.local) != (m, local):
                self._check_vni(spec.connection_id, m, await self._read_links())
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

    async def _read_links(self) -> dict[str, LinkInfo]:
        assert self._netlink is not None
        return await kernel.read_links(self._netlink)

    async def _bridge(self) -> int | None:
        """The index of the bridge every link joins (None: no bridge)."""
        bridge = self.policy.bridge()
        if bridge is None:
            return None
        if self._bridge_index is None:
            assert self._netlink is not None
            info = await kernel.get_link(self._netlink, bridge)
            if info is None:
                raise LinkError(f"bridge {bridge} does not exist")
            self._bridge_index = info.index
        return self._bridge_index

    def _as_wanted(self, conn: EndpointConnection, info: LinkInfo, master: int) -> bool:
        """Whether ``info``, a bridge port, is the link :meth:`_ensure` would make of it."""
        m = conn.mechanism
        if m.type == VXLAN:
            if not kernel.vxlan_matches(info, m.vni, conn.local, m.client_address, m.port):
                return False
        elif info.kind != "veth":
            return False
        return (
            info.up
            and info.master == master
            and (not conn.mtu or info.mtu == conn.mtu)
            and info.alias == conduit.alias_of(ENDPOINT_ALIAS, conn.connection_id)
            and info.index == conn.index
            and info.group == self._group
        )

    def _forget_index(self, conn: EndpointConnection) -> None:
        if conn.index is not None and self._by_index.get(conn.index) == conn.connection_id:
            del self._by_index[conn.index]

    async def _ensure(self, conn: EndpointConnection, info: LinkInfo | None = None) -> None:
        """Create the connection's link if missing (or adopt the one a previous instance left)
        and configure it; records its index. ``info``: the link as just read, if it is."""
        assert self._netlink is not None
        netlink = self._netlink
        m = conn.mechanism
        if info is None:
            info = await kernel.get_link(netlink, conn.link)
        if info is not None and m.type == VXLAN:
            if not kernel.vxlan_matches(info, m.vni, conn.local, m.client_address, m.port):
                await kernel.remove_link(netlink, conn.link)
                info = None
        elif info is not None and info.kind != "veth":
            await kernel.remove_link(netlink, conn.link)
            info = None
        master = await self._bridge()
        if info is None:
            if m.type == VETH:
                try:
                    now_netns = kernel.netns_inode(m.netns_path)
                except OSError as exc:
                    raise LinkError(f"cannot open netns {m.netns_path}: {exc.strerror}") from None
                if now_netns != conn.netns:  # the process named exited, its pid was reused
                    raise LinkError(
                        f"netns {m.netns_path} is no longer the client's namespace; "
                        "it must connect again"
                    )
                await kernel.create_veth(
                    netlink,
                    conn.link,
                    m.interface,
                    m.netns_path,
                    conn.mtu,
                    master=master,
                    group=self._group,
                )
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
                        group=self._group,
                    )
                except LinkError as exc:
                    raise VniTaken(str(exc)) from exc
            info = await kernel.get_link(netlink, conn.link)
            if info is None:
                raise LinkError(f"link {conn.link} vanished right after creation")
            joins = True
        else:
            joins = info.master != master  # a port that joins again is not isolated any more
        await kernel.configure_link(
            netlink,
            info,
            alias=conduit.alias_of(ENDPOINT_ALIAS, conn.connection_id),
            mtu=conn.mtu,
            master=master,
            addresses=None if master is not None else conn.assigned.on_link,
            group=self._group,
        )
        if joins and master is not None:
            await self._configure_port(conn.link)
        self._forget_index(conn)
        conn.index = info.index
        conn.up = info.running
        self._by_index[info.index] = conn.connection_id

    async def _configure_port(self, link: str) -> None:
        """Make ``link`` an isolated port of the bridge (when so configured) with no IPv6
        address, as the links made together are; best effort (a kernel before 4.18 cannot
        isolate): such a port only carries or sends more than it needs to."""
        assert self._netlink is not None
        try:
            await self._netlink.configure_port(
                link, isolated=self.config.isolate_ports, ipv6_link_local=False
            )
        except OSError as exc:
            self.log.warning("configuring a bridge port failed", link=link, error=str(exc))

    def _reply(self, conn: EndpointConnection) -> bytes:
        """The ``Connection`` answered, serialized (by hand: see conduit.connection_bytes)."""
        return conduit.connection_bytes(
            connection_id=conn.connection_id,
            network_service=conn.spec.network_service,
            endpoint_name=self.config.name,
            mechanism=conn.mechanism,
            endpoint_address=conn.local,
            client_addresses=conn.assigned.client,
            endpoint_addresses=conn.assigned.endpoint,
            endpoint_interface=conn.link,
            mtu=conn.mtu,
            expiry_seconds=self.config.expiry,
            context=conn.context,
        )

    # --- liveness, drift, clean-up ------------------------------------------------------------

    async def _expire(self, now: float) -> None:
        while self._next_expiry() <= now:
            _deadline, cid = heapq.heappop(self._expiries)
            await self._close(self.connections[cid], "its client stopped refreshing it")

    async def _close(self, conn: EndpointConnection, reason: str) -> None:
        assert self._netlink is not None
        if self.connections.get(conn.connection_id) is not conn:
            return
        del self.connections[conn.connection_id]
        self._forget_index(conn)
        conn.index = None  # our own deletion is not "the link went away"
        try:
            await kernel.remove_link(self._netlink, conn.link)
        except Exception as exc:  # the resync removes it as a link no client claims
            self.log.warning("removing a closed connection's link failed", error=str(exc))
        self.log.info("connection closed", connection=conn.connection_id, reason=reason)
        self._announce(conn.connection_id)
        try:
            await self.policy.release(conn, reason)
        except Exception as exc:
            self.log.warning(
                "releasing a closed connection failed",
                connection=conn.connection_id,
                error=str(exc),
            )

    async def _refresh_links(self, links: dict[str, LinkInfo]) -> None:
        """From the links as read: note which are up, close connections whose link is gone."""
        by_index = {i.index: i for i in links.values()}
        bridge = self.policy.bridge()
        self._bridge_index = links[bridge].index if bridge in links else None
        changed = []
        for conn in list(self.connections.values()):
            info = by_index.get(conn.index) if conn.index is not None else None
            if info is None or info.name != conn.link:
                if conn.index is not None:
                    await self._close(conn, "its link went away")
                continue
            if conn.up != info.running:
                conn.up = info.running
                changed.append(conn.connection_id)
        if changed:
            self._announce(*changed)

    async def _resync(self) -> None:
        """Repair drift of live connections; remove links of an earlier instance that no client
        claimed within the grace period. One read of the links, whatever their number."""
        assert self._netlink is not None
        self._link_news = False
        links = await self._read_links()
        await self._refresh_links(links)
        master = self._bridge_index
        for conn in list(self.connections.values()):
            info = links.get(conn.link)
            if info is not None:
                if master is not None and self._as_wanted(conn, info, master):
                    continue  # a bridge port as it should be: nothing to compare further
                try:
                    await self._ensure(conn, info)
                except Exception as exc:
                    self._link_news = True  # try again at the next resync
                    self.log.warning(
                        "repairing a link failed", connection=conn.connection_id, error=str(exc)
                    )
        grace = self.config.expiry if self.config.grace is None else self.config.grace
        if trio.current_time() < self._started + grace:
            return
        owned = {c.link for c in self.connections.values()}
        for info in links.values():
            claimed = conduit.connection_of(ENDPOINT_ALIAS, info.alias)
            if claimed is not None and info.name not in owned and claimed not in self._assigning:
                self.log.info("removing a link no client claimed", link=info.name)
                await kernel.remove_link(self._netlink, info.name)

    async def _remove_all(self) -> None:
        if self._netlink is None:
            return
        remaining = list(self.connections.values())
        if remaining:
            try:  # the links of the group at once, then what is left (made by another version)
                await self._netlink.delete_group(self._group)
                present = await self._read_links()
                remaining = [c for c in remaining if c.link in present]
            except Exception as exc:
                self.log.warning("removing the links together failed", error=str(exc))
        for conn in remaining:
            conn.index = None
            try:
                await kernel.remove_link(self._netlink, conn.link)
            except Exception as exc:
                self.log.warning("removing a link failed", link=conn.link, error=str(exc))
        closed = list(self.connections)
        self.connections.clear()
        self._by_index.clear()
        self._announce(*closed)


class ConnectService(ConnectBase):  # type: ignore[misc]  # generated code is untyped
    """``meridio.connect.v1.Connect``: hands each call to the endpoint's task and waits.

    A request is read as bytes and parsed once for the same bytes (strictly decoded, then
    checked: :func:`meridio.core.conduit.parse_request`): a client's refresh repeats the bytes
    of its request, and their decoding and checks were a third of what a refresh cost (a proxy
    answers a thousand targets' refreshes). What follows, the proof of the namespace among it,
    runs for every call."""

    def __init__(self, endpoint: ConnectEndpoint) -> None:
        self.endpoint = endpoint
        self._parsed: dict[bytes, RequestSpec] = {}

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping: dict[str, grpclib.const.Handler] = dict(super().__mapping__())
        generated = mapping[REQUEST_PATH]
        mapping[REQUEST_PATH] = grpclib.const.Handler(
            self._request_bytes, generated.cardinality, bytes, generated.reply_type
        )
        return mapping

    async def _request_bytes(self, stream: Any) -> None:
        data: bytes = await stream.recv_message()
        spec = self._parsed.get(data)
        if spec is None:
            try:
                message = wire.decode(ConnectRequest, data)
            except Exception as exc:  # as the runtime's codec says it (WireError)
                raise grpclib.GRPCError(
                    Status.INVALID_ARGUMENT, f"malformed ConnectRequest message: {exc}"
                ) from exc
            spec = self._parse(message)
            if len(self._parsed) >= PARSED_REQUESTS:
                self._parsed.clear()
            self._parsed[data] = spec
        await stream.send_message(await self._serve(spec))

    @staticmethod
    def _parse(connect_request: ConnectRequest) -> RequestSpec:
        try:
            return conduit.parse_request(connect_request)
        except InvalidRequest as exc:
            raise grpclib.GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None

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
        result: Connection = await self._serve(self._parse(connect_request))
        return result

    async def _serve(self, spec: RequestSpec) -> Any:
        try:  # least authority: a veth end goes only into the caller's own namespace
            proven = await self.endpoint.prove(spec, current_peer())
        except Refused as exc:
            raise grpclib.GRPCError(Status.PERMISSION_DENIED, str(exc)) from None
        refreshed = self.endpoint.refresh(spec)
        if refreshed is not None:
            return refreshed  # serialized already (the codec sends Encoded as is)
        result: Connection = await self._submit(lambda f: _Request(spec, f, proven))
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
