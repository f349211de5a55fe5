"""The target role: the sidecar that attaches its application's namespace to conduits, serving
Meridio's TAPA API (``ambassador.v1.Tap``) so the application opens and closes its streams.

* **TAPA** on a unix socket (``socket``; else ``MERIDIO_SOCKET``; else
  ``<run-dir>/ambassador.sock``): ``Open`` connects the trench (watches its NSP) and the conduit
  (through the node's proxy) when not yet connected, then takes an identifier in the stream;
  ``Close`` unregisters first (and returns once the registry no longer lists the stream, or
  after a few seconds), closes the conduit ``drain-time`` seconds after its last stream, and
  leaves the trench after its last conduit; ``Watch`` sends the statuses of the open streams
  that match the request, at once and on every change. The state is in
  :mod:`meridio.core.tapa`; bad requests are INVALID_ARGUMENT and change nothing.
* **Settings stay a way in**: the streams named in ``streams`` are opened at start through the
  same path, for applications that cannot call TAPA.
* **Connections**: one per conduit, to the proxy of this node for that conduit (``proxy``,
  ``proxies``; network service ``proxy.<conduit>.<trench>``), id ``<connection-id>@<conduit>``,
  on interface ``conduit<slot>``. The proxy assigns the addresses and registers the target in
  NSP for each stream whose identifier the connection carries (``identifier/<stream>``).
* **VIPs**: the trench's VIPs go on ``lo`` while a conduit is open; per conduit, the VIPs of its
  flows get a ``from <VIP>`` rule (priority ``rule-priority`` + slot) to table ``table`` + slot,
  whose default route goes via that conduit's proxy, so replies go back the way requests came.
* **Restarts**: what is open, the identifiers, the conduits' slots and addresses and the VIPs
  installed are kept in ``<run-dir>/target-state.json``: a restarted target (even after
  SIGKILL) reopens the same streams, asks for the same identifiers first, and removes what a
  predecessor left that is not wanted any more.
* **SIGTERM**: every stream's identifier is dropped from the connections (the proxies
  unregister the target at once, the LBs stop sending new flows), ``drain-time`` passes, then
  the connections close and everything installed is removed. The open streams stay in the state
  file, so a restarted target opens them again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpclib
import trio
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status

from meridio.api.ambassador import v1 as tap
from meridio.api.nsp.v1 import (
    Conduit,
    ConfigurationManagerStub,
    Flow,
    Stream,
    Target,
    TargetRegistryStub,
    TargetStatus,
    TargetType,
    Trench,
    Vip,
)
from meridio.connect import kernel
from meridio.connect.client import ClientEnd, ClientSpec, ConnectClient
from meridio.core import conduit, identifiers, tapa
from meridio.core.conduit import VXLAN_PORT
from meridio.core.proxystate import NODE_CONTEXT, egress_next_hops, egress_rules
from meridio.core.registry import DEFAULT_MAX_TARGETS, canonical_ips
from meridio.core.tapa import (
    InvalidStream,
    OtherTrench,
    Reach,
    StreamFilter,
    StreamKey,
    StreamRef,
    TapState,
    TooManyConduits,
)
from meridio.roles.base import Role
from meridio.roles.common import FAMILY, KERNEL_ERRORS, Egress, wait_any, watch
from meridio.runtime.grpc import Endpoint
from meridio.runtime.notify import Changes, Signal, watch_changes
from meridio.settings import CommonSettings

if TYPE_CHECKING:
    from meridio.runtime import Runtime

SOCKET_ENV = "MERIDIO_SOCKET"
SOCKET_NAME = "ambassador.sock"
STATE_FILE = "target-state.json"
CLOSE_WAIT = 5.0
"""Seconds Close waits for the registry to stop listing the stream."""
WATCHES = ("streams", "targets", "vips", "flows")


class TargetSettings(CommonSettings, kw_only=True):
    socket: str = ""
    """The TAPA socket; default $MERIDIO_SOCKET, else <run-dir>/ambassador.sock."""
    socket_mode: str = "0666"
    """Permissions of the TAPA socket (octal): the application may run as another user."""
    proxy: str = "localhost:7781"
    """The connect endpoint of this node's proxy (host:port or unix:///path); ``{conduit}`` and
    ``{trench}`` are replaced by the conduit's and trench's names."""
    proxies: str = ""
    """Per conduit, where its proxy is: ``conduit=address,...`` (ahead of ``proxy``)."""
    nsp: str = "localhost:7778"
    """The trench's NSP; ``{trench}`` is replaced by the trench's name."""
    node: str = ""
    """This target's node, told to the proxies, which refuse a target of another node."""
    trench: str = ""
    """The trench of the streams in ``streams``."""
    conduit: str = ""
    """The conduit of the streams in ``streams`` given without one."""
    streams: str = ""
    """Streams opened at start: comma-separated ``stream`` or ``conduit/stream``."""
    interface: str = "conduit0"
    """The first conduit's interface; the others are numbered on from it (conduit1, ...)."""
    mechanism: str = "veth"
    primary_address: str = ""
    """This host's underlay address for vxlan; default: the one it sends from toward the
    proxy."""
    vxlan_port: int = VXLAN_PORT
    netns_path: str = ""
    """This namespace as the proxy opens it (veth); default /proc/<pid>/ns/net."""
    connection_id: str = ""
    """Default: <instance>-<network namespace inode>, stable across restarts of the sidecar;
    each conduit's connection is ``<connection-id>@<conduit>``."""
    table: int = 4096
    """Routing table of the first conduit's replies (default route via its proxy); the
    others use the next ones."""
    rule_priority: int = 100
    drain_time: float = 2.0
    """Seconds between leaving the streams and closing the connections on SIGTERM; also how
    long a conduit stays after its last stream is closed."""
    resync_period: float = 5.0


def _template(text: str, what: str, **names: str) -> str:
    try:
        return text.format(**names)
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join("{" + n + "}" for n in names)
        raise ValueError(f"setting '{what}': {text!r} may only use {known} ({exc})") from None


def parse_proxies(text: str) -> dict[str, str]:
    """The ``proxies`` setting: ``conduit=address,...``."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, eq, address = item.partition("=")
        if not eq or not address.strip():
            raise ValueError(f"setting 'proxies': {item!r} is not conduit=address")
        try:
            out[tapa.check_name("conduit", name.strip())] = address.strip()
        except InvalidStream as exc:
            raise ValueError(f"setting 'proxies': {exc}") from None
    return out


def interface_name(first: str, slot: int) -> str:
    """The interface of the conduit in ``slot``: ``first`` with its number replaced."""
    return f"{first.rstrip('0123456789') or first}{slot}"


def _valid_table(table: int) -> bool:
    return 0 < table < 253 or 255 < table < 2**32


@dataclass
class Session:
    """The connection to a trench: its NSP's watches and what they said."""

    trench: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    config: dict[StreamKey, int] | None = None
    registered: dict[StreamKey, list[tapa.Registered]] | None = None
    vips: list[str] | None = None
    flow_vips: dict[str, set[str]] | None = None  # conduit -> VIPs of its flows
    watches: dict[str, bool] = field(default_factory=dict)

    def reach(self) -> Reach:
        if not all(self.watches.values()):
            return Reach.DOWN
        return Reach.UP if len(self.watches) == len(WATCHES) else Reach.CONNECTING


class Stopping(Exception):
    pass


class TargetRole(Role[TargetSettings]):
    name = "target"
    Settings = TargetSettings

    @classmethod
    def check_settings(cls, settings: TargetSettings) -> None:
        try:
            tapa.parse_streams(settings.streams, settings.trench, settings.conduit)
        except ValueError as exc:
            raise ValueError(f"setting 'streams': {exc}") from None
        addresses = {
            "nsp": _template(settings.nsp, "nsp", trench="t"),
            "proxy": _template(settings.proxy, "proxy", conduit="c", trench="t"),
            **{f"proxies ({c})": a for c, a in parse_proxies(settings.proxies).items()},
        }
        for what, address in addresses.items():
            try:
                Endpoint.parse(address)
            except ValueError as exc:
                raise ValueError(f"setting '{what}': {exc}") from None
        if settings.mechanism not in conduit.MECHANISMS:
            raise ValueError(f"setting 'mechanism': {settings.mechanism!r} is not veth or vxlan")
        if settings.primary_address:
            try:
                ipaddress.ip_address(settings.primary_address)
            except ValueError as exc:
                raise ValueError(f"setting 'primary-address': {exc}") from None
        last = interface_name(settings.interface, tapa.MAX_SLOTS - 1)
        if not conduit.valid_ifname(settings.interface) or not conduit.valid_ifname(last):
            raise ValueError(f"setting 'interface': {settings.interface!r} is not a valid name")
        if not all(_valid_table(settings.table + s) for s in range(tapa.MAX_SLOTS)):
            raise ValueError(
                f"setting 'table': {settings.table}..{settings.table + tapa.MAX_SLOTS - 1} "
                "are not all free routing table ids"
            )
        if settings.drain_time < 0 or settings.drain_time >= settings.drain_timeout:
            raise ValueError(
                f"setting 'drain-time' ({settings.drain_time}) must be below 'drain-timeout' "
                f"({settings.drain_timeout})"
            )
        try:
            int(settings.socket_mode, 8)
        except ValueError:
            raise ValueError(
                f"setting 'socket-mode': {settings.socket_mode!r} is not octal"
            ) from None

    def __init__(self, settings: TargetSettings, runtime: Runtime) -> None:
        super().__init__(settings, runtime)
        self.target = settings
        self.log = runtime.log
        self.proxies = parse_proxies(settings.proxies)
        self.connection_base = (
            settings.connection_id or f"{runtime.instance}-{kernel.own_netns_inode()}"
        )
        self.state_path = Path(runtime.run_dir) / STATE_FILE
        self.socket_path = (
            settings.socket
            or os.environ.get(SOCKET_ENV, "")
            or str(Path(runtime.run_dir) / SOCKET_NAME)
        )
        self.state = TapState()
        self.session: Session | None = None
        self.statuses: dict[StreamRef, tapa.Status] = {}
        self.routed: set[str] = set()
        self.egresses: dict[int, Egress] = {}
        self.draining = False
        self.rng = random.SystemRandom()
        self.tap_changes = Changes()  # statuses, for Watch (asyncio side)
        self.progress = Changes()  # every pass of the loop (asyncio side)
        self.passes = Signal()  # the same, trio side
        self._written: str | None = None
        self._inputs_changed = trio.Event()

    # --- TAPA requests (from the gRPC handlers: same thread, asyncio side) ---------------------

    def tap_open(self, ref: StreamRef, by: str = "tapa") -> None:
        if self.draining:
            raise Stopping("the target is stopping")
        if self.state.open(ref):
            self.log.info("stream opened", stream=str(ref), by=by)
            self._changed()

    def tap_close(self, ref: StreamRef) -> None:
        if self.state.close(ref, trio.current_time()):
            self.log.info("stream closed", stream=str(ref))
            self._changed()

    def _changed(self) -> None:
        """After a request: recorded on disk, shown to watchers, acted on by the loop."""
        self._persist()
        self._publish()
        self._kick()

    def left(self, ref: StreamRef) -> bool:
        """Whether ``ref`` is out of the registry (as far as can be known)."""
        if ref in self.state.streams:
            return False
        if ref.trench != self.state.trench:
            return True
        conn = self.client.connections.get(self._cid(ref.conduit))
        if conn is not None and conn.established and conn.reply is not None:
            try:
                if ref.name in identifiers.decode(conn.reply.extra_context):
                    return False
            except ValueError:
                pass
        session = self.session
        mine = self._mine(ref.conduit)
        if session is None or session.reach() is not Reach.UP or mine is None:
            return True
        listed = (session.registered or {}).get(ref.key, ())
        return not any(r.ips == mine for r in listed)

    async def wait_left(self, ref: StreamRef, timeout: float) -> bool:
        """asyncio side: wait until ``ref`` has left the registry, at most ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.left(ref):
            seen = self.progress.version
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self.progress.wait_past(seen), remaining)
            except TimeoutError:
                return False
        return True

    def watch_reply(self, flt: StreamFilter) -> tap.StreamResponse:
        return tap.StreamResponse(
            stream_status=[
                tap.StreamStatus(
                    status=tap.StreamStatusStatus(int(status)),
                    stream=tap.Stream(
                        name=ref.name,
                        conduit=tap.Conduit(name=ref.conduit, trench=tap.Trench(name=ref.trench)),
                    ),
                )
                for ref, status in sorted(self.statuses.items())
                if flt.matches(ref)
            ]
        )

    # --- life ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.target
        health = self.runtime.health
        self.nsp_check = health.register("NSPCli", ["Readiness"])
        self.conduit_check = health.register("Conduit", ["Readiness"])
        self.stream_check = health.register("Stream", ["Readiness"])
        ambassador = health.register("Ambassador", ["Startup", "Readiness", "Liveness"])
        self.netlink = kernel.serial(await self.runtime.netlink(events=True))
        self.client = ConnectClient(self.runtime, self.runtime.instance, ClientEnd())
        self._restore()
        try:
            await self._sweep()
            for ref in tapa.parse_streams(settings.streams, settings.trench, settings.conduit):
                self.tap_open(ref, by="settings")
            self._persist()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.client.run)
                await self.runtime.grpc.serve([TapService(self)], [Endpoint(path=self.socket_path)])
                os.chmod(self.socket_path, int(settings.socket_mode, 8))
                self.log.info("TAPA serving", socket=self.socket_path)
                ambassador.set(True)
                task_status.started()
                await self._loop(nursery)
        finally:
            ambassador.set(False)
            with trio.CancelScope(shield=True):
                await self._cleanup()

    def _restore(self) -> None:
        settings = self.target
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            self.log.warning(
                "cannot read the state file", path=str(self.state_path), error=str(exc)
            )
            return
        try:
            state = TapState.from_dict(json.loads(text), trio.current_time())
        except ValueError as exc:  # json.JSONDecodeError is one
            self.log.warning("state file ignored", path=str(self.state_path), error=str(exc))
            return
        wanted = tapa.parse_streams(settings.streams, settings.trench, settings.conduit)
        if state.trench and wanted and wanted[0].trench != state.trench:
            self.log.warning(
                "the settings name another trench: not reopening the streams of the last one",
                trench=state.trench,
            )
            state = TapState(vips=state.vips)
        self.state = state
        self._written = None
        if state.streams:
            self.log.info(
                "reopening the streams of the last run",
                streams=[str(r) for r in sorted(state.streams)],
                identifiers={str(r): e.identifier for r, e in sorted(state.streams.items())},
            )

    def _persist(self) -> None:
        text = json.dumps(self.state.to_dict(), sort_keys=True)
        if text == self._written:
            return
        tmp = self.state_path.with_suffix(".tmp")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
            self._written = text
        except OSError as exc:
            self.log.error("cannot write the state file", path=str(tmp), error=str(exc))

    async def drain(self) -> None:
        """Leave every stream (the proxies unregister us at once), then let flows drain."""
        self.draining = True
        self._kick()
        with trio.move_on_after(self.target.drain_time):
            while not self._left_all():
                await self.passes.wait_past(self.passes.version)
        self.log.info("left the streams, draining", drain_time=self.target.drain_time)
        await trio.sleep(self.target.drain_time)

    def _left_all(self) -> bool:
        for name in self.state.conduits:
            conn = self.client.connections.get(self._cid(name))
            if conn is None or conn.reply is None or not conn.established:
                continue
            if identifiers.decode(conn.reply.extra_context):
                return False
        return True

    async def _cleanup(self) -> None:
        try:
            for egress in self.egresses.values():
                await egress.clear()
            self.egresses.clear()
            for vip in self.state.vips:
                await self.netlink.ensure_address_absent("lo", vip)
            self.state.vips = ()
            self._persist()
            self.log.info("target state removed")
        except Exception as exc:  # never mask the original exit reason
            self.log.error("cleanup failed", error=str(exc))

    async def _sweep(self) -> None:
        """Remove the ``from <VIP>`` rules, and the routes, of slots not in use: a killed
        predecessor's (one rule dump when there are none)."""
        settings = self.target
        used = {c.slot for c in self.state.conduits.values()}
        stale: set[int] = set()
        for msg in await self.netlink.rules():
            slot = (msg.get("FRA_TABLE") or msg["table"]) - settings.table
            if (
                0 <= slot < tapa.MAX_SLOTS
                and slot not in used
                and msg.get("FRA_PRIORITY") == settings.rule_priority + slot
                and msg.get("FRA_SRC")
            ):
                stale.add(slot)
        for slot in sorted(stale):
            table = settings.table + slot
            egress = Egress(self.netlink, table, settings.rule_priority + slot)
            await egress.update((), {}, check_drift=True)
            for family in FAMILY.values():
                await self.netlink.ensure_route_absent("default", table=table, family=family)
            self.log.info("removed the routing of a conduit no longer open", table=table)

    # --- the trench ---------------------------------------------------------------------------

    def _sync_session(self, nursery: trio.Nursery) -> None:
        want = self.state.trench
        session = self.session
        if session is not None and session.trench != want:
            session.scope.cancel()
            self.session = None
            self.log.info("left the trench", trench=session.trench)
        if want is not None and self.session is None:
            self.session = Session(want)
            self.log.info("connecting the trench", trench=want)
            nursery.start_soon(self._run_session, self.session)

    async def _run_session(self, session: Session) -> None:
        with session.scope:
            address = _template(self.target.nsp, "nsp", trench=session.trench)
            channel = await self.runtime.grpc.channel(address)
            config = ConfigurationManagerStub(channel)
            registry = TargetRegistryStub(channel)
            trench = Trench(name=session.trench)
            in_trench = Stream(conduit=Conduit(trench=trench))
            holders = Target(status=TargetStatus.ANY, type=TargetType.DEFAULT, stream=in_trench)
            opens: dict[str, Callable[[], AsyncIterator[Any]]] = {
                "streams": lambda: config.watch_stream(in_trench),
                "targets": lambda: registry.watch(holders),
                "vips": lambda: config.watch_vip(Vip(trench=trench)),
                "flows": lambda: config.watch_flow(Flow(stream=in_trench)),
            }
            try:
                async with trio.open_nursery() as nursery:
                    for name in WATCHES:
                        nursery.start_soon(
                            watch,
                            self.runtime,
                            name,
                            opens[name],
                            partial(self._store, session, name),
                            partial(self._on_watch_state, session),
                        )
            finally:
                channel.close()

    def _on_watch_state(self, session: Session, name: str, up: bool) -> None:
        session.watches[name] = up
        self._kick()

    def _store(self, session: Session, name: str, message: Any) -> None:
        if name == "streams":
            session.config = {
                (s.conduit.name, s.name): int(s.max_targets) or DEFAULT_MAX_TARGETS
                for s in message.streams
            }
        elif name == "targets":
            session.registered = tapa.registered_by_stream(
                (
                    t.stream.conduit.name,
                    t.stream.name,
                    tuple(t.ips),
                    t.context.get(identifiers.IDENTIFIER_KEY, ""),
                    int(t.status) == int(TargetStatus.ENABLED),
                )
                for t in message.targets
            )
        elif name == "vips":
            session.vips = [v.address for v in message.vips]
        else:
            flow_vips: dict[str, set[str]] = {}
            for f in message.flows:
                flow_vips.setdefault(f.stream.conduit.name, set()).update(v.address for v in f.vips)
            session.flow_vips = flow_vips
        self._kick()

    def _kick(self) -> None:
        self._inputs_changed.set()
        self._inputs_changed = trio.Event()

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self, nursery: trio.Nursery) -> None:
        linger = self.target.drain_time
        next_resync = trio.current_time() + self.target.resync_period
        while True:
            wake = self._inputs_changed
            seen = self.client.changes.version
            now = trio.current_time()
            drift = now >= next_resync
            if drift:
                next_resync = now + self.target.resync_period
            for name in self.state.expire(now, linger):
                self.log.info("conduit closed", conduit=name)
            self._sync_session(nursery)
            self._settle(now)
            self.client.set_desired(
                {self._cid(name): self._spec(name) for name in self.state.conduits}
            )
            try:
                await self._reconcile(check_drift=drift)
            except KERNEL_ERRORS as exc:  # anything else is a bug: crash, be restarted
                self.log.error("reconcile failed, retrying", error=str(exc), exc_info=True)
                next_resync = trio.current_time() + 1
            self._remember_addresses()
            self._persist()
            self._publish()
            self.progress.bump()
            self.passes.bump()
            wake_at = self.state.wake_at(linger)
            deadline = min(next_resync, math.inf if wake_at is None else wake_at)
            await wait_any(deadline, partial(self.client.changes.wait_past, seen), wake.wait)

    def _cid(self, conduit_name: str) -> str:
        return f"{self.connection_base}@{conduit_name}"

    def _mine(self, conduit_name: str) -> tuple[str, ...] | None:
        """This target's addresses in the conduit: current, else as last connected."""
        conn = self.client.connections.get(self._cid(conduit_name))
        if conn is not None and conn.established:
            return tuple(canonical_ips(conn.client_addresses))
        entry = self.state.conduits.get(conduit_name)
        return entry.addresses if entry is not None and entry.addresses else None

    def _established(self) -> list[str]:
        out = []
        for name in self.state.conduits:
            conn = self.client.connections.get(self._cid(name))
            if conn is not None and conn.established:
                out.append(name)
        return out

    def _settle(self, now: float) -> None:
        session = self.session
        if session is None:
            return
        mine = {}
        for name in self.state.conduits:
            ips = self._mine(name)
            if ips is not None:
                mine[name] = ips
        events = self.state.settle(
            session.config, session.registered, mine, self._established(), now, self.rng
        )
        for event in events:
            stream = str(event.stream)
            if event.kind == "problem":
                self.log.error("cannot open stream", stream=stream, problem=event.problem)
            elif event.kind == "chosen":
                self.log.info("identifier chosen", stream=stream, identifier=event.identifier)
            elif event.kind == "confirmed":
                self.log.info("identifier confirmed", stream=stream, identifier=event.identifier)
            elif event.kind == "taken":
                self.log.warning(
                    "identifier taken by another target, picking again",
                    stream=stream,
                    identifier=event.identifier,
                )
            else:
                self.log.warning(
                    "registration dropped by the registry, picking again",
                    stream=stream,
                    identifier=event.identifier,
                )

    def _proxy(self, conduit_name: str) -> str:
        trench = self.state.trench or ""
        return self.proxies.get(conduit_name) or _template(
            self.target.proxy, "proxy", conduit=conduit_name, trench=trench
        )

    def _spec(self, conduit_name: str) -> ClientSpec:
        settings = self.target
        entry = self.state.conduits[conduit_name]
        chosen = {} if self.draining else self.state.context(conduit_name)
        return ClientSpec(
            connection_id=self._cid(conduit_name),
            endpoint=self._proxy(conduit_name),
            network_service=f"proxy.{conduit_name}.{self.state.trench}",
            mechanism=settings.mechanism,
            interface=interface_name(settings.interface, entry.slot),
            netns_path=settings.netns_path or kernel.pid_netns_path(),
            primary_address=settings.primary_address,
            vxlan_port=settings.vxlan_port,
            context={
                **identifiers.encode(chosen),
                **({NODE_CONTEXT: settings.node} if settings.node else {}),
            },
        )

    def _egress(self, slot: int) -> Egress:
        egress = self.egresses.get(slot)
        if egress is None:
            settings = self.target
            egress = Egress(self.netlink, settings.table + slot, settings.rule_priority + slot)
            self.egresses[slot] = egress
        return egress

    async def _reconcile(self, *, check_drift: bool) -> None:
        session = self.session
        flow_vips = session.flow_vips if session is not None else None
        families: set[int] = set()
        for name, entry in sorted(self.state.conduits.items()):
            egress = self._egress(entry.slot)
            conn = self.client.connections.get(self._cid(name))
            addresses = conn.client_addresses if conn is not None and conn.established else ()
            families |= {conduit.family(a) for a in addresses or entry.addresses}
            if conn is None or not conn.established or flow_vips is None:
                self.routed.discard(name)
                if egress.routes:  # the link is gone or going: no route via it
                    await egress.update(egress.rules, {})
                continue
            rules = egress_rules(flow_vips.get(name, ()), {conduit.family(a) for a in addresses})
            hops = egress_next_hops(conn.endpoint_addresses)
            interface = interface_name(self.target.interface, entry.slot)
            if await egress.update(rules, hops, oif=interface, check_drift=check_drift):
                self.log.info(
                    "egress updated",
                    conduit=name,
                    vips=sorted(r.src for r in rules),
                    via={f"ipv{f}": list(h) for f, h in hops.items()},
                )
            self.routed.add(name)
        used = {c.slot for c in self.state.conduits.values()}
        for slot in sorted(set(self.egresses) - used):
            await self.egresses.pop(slot).clear()
        self.routed &= set(self.state.conduits)
        await self._reconcile_vips(families, check_drift=check_drift)

    async def _reconcile_vips(self, families: set[int], *, check_drift: bool) -> None:
        session = self.session
        installed = set(self.state.vips)
        if not self.state.conduits:
            wanted: set[str] = set()
        elif session is None or session.vips is None:
            return  # not known (yet): leave them as they are
        else:
            wanted = {r.src for r in egress_rules(session.vips, families)}
        for vip in sorted(wanted - installed):
            await self.netlink.ensure_address("lo", vip)
            installed.add(vip)
            self.state.vips = tuple(sorted(installed))
        for vip in sorted(installed - wanted):
            await self.netlink.ensure_address_absent("lo", vip)
            installed.discard(vip)
            self.state.vips = tuple(sorted(installed))
        if check_drift and wanted:
            present = {str(ipaddress.ip_interface(a)) for a in await self.netlink.addresses("lo")}
            for vip in sorted(wanted - present):
                await self.netlink.ensure_address("lo", vip)

    def _remember_addresses(self) -> None:
        for name, entry in self.state.conduits.items():
            conn = self.client.connections.get(self._cid(name))
            if conn is not None and conn.established:
                entry.addresses = tuple(canonical_ips(conn.client_addresses))

    def _conduit_reach(self, name: str) -> Reach:
        conn = self.client.connections.get(self._cid(name))
        if conn is None:
            return Reach.CONNECTING
        if conn.established:
            return Reach.UP
        return Reach.DOWN if conn.error else Reach.CONNECTING

    def _publish(self) -> None:
        session = self.session
        nsp = session.reach() if session is not None else Reach.CONNECTING
        config = session.config if session is not None else None
        reach = {name: self._conduit_reach(name) for name in self.state.conduits}
        statuses: dict[StreamRef, tapa.Status] = {}
        for ref in sorted(self.state.streams):
            status = self.state.status(
                ref, nsp=nsp, config=config, conduits=reach, routed=self.routed
            )
            if status is not None:
                statuses[ref] = status
        if statuses != self.statuses:
            for ref, status in statuses.items():
                if self.statuses.get(ref) != status:
                    self.log.info("stream status", stream=str(ref), status=status.name)
            self.statuses = statuses
            self.tap_changes.bump()
        self.nsp_check.set(session is None or nsp is Reach.UP)
        self.conduit_check.set(all(n in self.routed for n in self.state.open_conduits()))
        self.stream_check.set(all(s is tapa.Status.OPEN for s in statuses.values()))


class TapService(tap.TapBase):
    """``ambassador.v1.Tap``: Meridio's TAPA."""

    def __init__(self, role: TargetRole) -> None:
        self.role = role

    @staticmethod
    def _ref(stream: tap.Stream) -> StreamRef:
        try:
            return tapa.stream_ref(stream)
        except InvalidStream as exc:
            raise grpclib.GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None

    async def open(self, stream: tap.Stream) -> Empty:
        ref = self._ref(stream)
        try:
            self.role.tap_open(ref)
        except OtherTrench as exc:
            raise grpclib.GRPCError(Status.FAILED_PRECONDITION, str(exc)) from None
        except TooManyConduits as exc:
            raise grpclib.GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
        except Stopping as exc:
            raise grpclib.GRPCError(Status.UNAVAILABLE, str(exc)) from None
        return Empty()

    async def close(self, stream: tap.Stream) -> Empty:
        ref = self._ref(stream)
        self.role.tap_close(ref)
        await self.role.wait_left(ref, CLOSE_WAIT)
        return Empty()

    def watch(self, stream: tap.Stream) -> AsyncIterator[tap.StreamResponse]:
        try:
            flt = StreamFilter.of(stream)
        except InvalidStream as exc:
            raise grpclib.GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        return watch_changes(self.role.tap_changes, lambda: self.role.watch_reply(flt))


__all__ = ["TapService", "TargetRole", "TargetSettings", "interface_name", "parse_proxies"]
