"""The target role: a sidecar that attaches its application's namespace to a conduit.

* **Connection**: it connects to the proxy of its node (``proxy`` setting, network service
  ``proxy.<conduit>.<trench>``) with the chosen mechanism; the proxy assigns its address.
* **Identifiers**: for each stream it opens it picks an identifier no other target of the
  stream holds (at random among the free ones NSP shows, within ``max-targets``), sends it in
  the connection's extra context (``identifier/<stream>``), and confirms it once the proxy has
  registered it: if another target holds the same identifier and has the lower address list,
  it picks again. A full stream is reported clearly (log and readiness) and retried when a
  target leaves. Who registers: the proxy (see :mod:`meridio.roles.proxy`); the target decides
  the identifier.
* **VIPs**: the trench's VIPs go on ``lo`` (IPv4 and IPv6, for the families the conduit carries)
  with a ``from <VIP>`` rule to a table whose default route goes via the proxy's address on the
  conduit, so replies go back the way requests came.
* **SIGTERM**: first the identifiers are dropped from the connection (the proxy unregisters the
  target at once, the LBs stop sending new flows), then ``drain-time`` passes, then the
  connection is closed and everything installed is removed.
"""

from __future__ import annotations

import ipaddress
import random
from functools import partial
from typing import Any

import trio

from meridio.api.nsp.v1 import (
    Conduit,
    ConfigurationManagerStub,
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
from meridio.connect.endpoint import pid_netns_path
from meridio.core import conduit, identifiers
from meridio.core.conduit import VXLAN_PORT
from meridio.core.identifiers import Holder, StreamFull
from meridio.core.proxystate import NODE_CONTEXT, egress_next_hops, egress_rules
from meridio.core.registry import DEFAULT_MAX_TARGETS, canonical_ips
from meridio.roles.base import Role
from meridio.roles.common import Egress, NspInputs, wait_any, watch
from meridio.settings import CommonSettings


class TargetSettings(CommonSettings, kw_only=True):
    proxy: str = "localhost:7781"
    """The connect endpoint of this node's proxy (host:port or unix:///path)."""
    nsp: str = "localhost:7778"
    node: str = ""
    """This target's node, told to the proxy, which refuses a target of another node."""
    trench: str = ""
    conduit: str = ""
    streams: str = ""
    """Comma-separated streams of the conduit this target opens."""
    interface: str = "conduit0"
    """Name of the conduit's interface in this namespace."""
    mechanism: str = "veth"
    primary_address: str = ""
    """This host's underlay address for vxlan; default: the one it sends from toward the
    proxy."""
    vxlan_port: int = VXLAN_PORT
    netns_path: str = ""
    """This namespace as the proxy opens it (veth); default /proc/<pid>/ns/net."""
    connection_id: str = ""
    """Default: <instance>-<network namespace inode>, stable across restarts of the sidecar."""
    table: int = 4096
    """Routing table of the VIPs' replies (default route via the proxy)."""
    rule_priority: int = 100
    drain_time: float = 2.0
    """Seconds between leaving the streams and closing the connection on SIGTERM."""
    resync_period: float = 5.0


def stream_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


class TargetRole(NspInputs, Role):
    name = "target"
    Settings = TargetSettings

    @classmethod
    def check_settings(cls, settings: CommonSettings) -> None:
        assert isinstance(settings, TargetSettings)
        for name in ("trench", "conduit", "streams"):
            if not getattr(settings, name).strip(" ,"):
                raise ValueError(f"setting '{name}' is required")
        if settings.mechanism not in conduit.MECHANISMS:
            raise ValueError(f"setting 'mechanism': {settings.mechanism!r} is not veth or vxlan")
        if settings.primary_address:
            try:
                ipaddress.ip_address(settings.primary_address)
            except ValueError as exc:
                raise ValueError(f"setting 'primary-address': {exc}") from None
        if not conduit.valid_ifname(settings.interface):
            raise ValueError(f"setting 'interface': {settings.interface!r} is not a valid name")
        if not 0 < settings.table < 253 and not 255 < settings.table < 2**32:
            raise ValueError(f"setting 'table': {settings.table} is not a free routing table id")
        if settings.drain_time < 0 or settings.drain_time >= settings.drain_timeout:
            raise ValueError(
                f"setting 'drain-time' ({settings.drain_time}) must be below 'drain-timeout' "
                f"({settings.drain_timeout})"
            )

    def __init__(self, settings: CommonSettings, runtime: Any) -> None:
        super().__init__(settings, runtime)
        assert isinstance(settings, TargetSettings)
        self.target = settings
        self.log = runtime.log
        self.streams = stream_list(settings.streams)
        self.conduit_msg = Conduit(name=settings.conduit, trench=Trench(name=settings.trench))
        self.connection_id = (
            settings.connection_id or f"{runtime.instance}-{kernel.own_netns_inode()}"
        )
        self.max_targets: dict[str, int] | None = None
        self.holders: dict[str, list[Holder]] | None = None
        self.vips: list[str] | None = None
        self.chosen: dict[str, int] = {}
        self.confirmed: set[str] = set()
        self.problems: dict[str, str] = {}
        self.installed_vips: set[str] = set()
        self.draining = False
        self.connected: dict[str, bool] = {}
        self.rng = random.SystemRandom()
        self._inputs_changed = trio.Event()

    # --- life ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.target
        health = self.runtime.health
        self.nsp_check = health.register("NSPCli", ["Readiness"])
        self.conduit_check = health.register("Conduit", ["Readiness"])
        self.stream_check = health.register("Stream", ["Readiness"])
        health.register("Target", ["Startup", "Liveness"]).set(True)
        self.netlink = kernel.serial(await self.runtime.netlink(events=True))
        nsp = await self.runtime.grpc.channel(settings.nsp)
        registry = TargetRegistryStub(nsp)
        config = ConfigurationManagerStub(nsp)
        self.client = ConnectClient(self.runtime, self.runtime.instance, ClientEnd())
        self.egress = Egress(self.netlink, settings.table, settings.rule_priority)
        holders_filter = Target(
            status=TargetStatus.ANY,
            type=TargetType.DEFAULT,
            stream=Stream(conduit=self.conduit_msg),
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.client.run)
                for name, open_stream, store in (
                    (
                        "streams",
                        lambda: config.watch_stream(Stream(conduit=self.conduit_msg)),
                        self._store_streams,
                    ),
                    ("targets", lambda: registry.watch(holders_filter), self._store_targets),
                    (
                        "vips",
                        lambda: config.watch_vip(Vip(trench=self.conduit_msg.trench)),
                        self._store_vips,
                    ),
                ):
                    nursery.start_soon(
                        watch, self.runtime, name, open_stream, store, self._on_watch_state
                    )
                task_status.started()
                await self._loop()
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    def _on_watch_state(self, name: str, up: bool) -> None:
        self.connected[name] = up
        self.nsp_check.set(len(self.connected) == 3 and all(self.connected.values()))

    def _store_streams(self, message: Any) -> None:
        self.max_targets = {
            s.name: int(s.max_targets) or DEFAULT_MAX_TARGETS for s in message.streams
        }
        self._kick()

    def _store_targets(self, message: Any) -> None:
        holders: dict[str, list[Holder]] = {}
        for t in message.targets:
            try:
                identifier = int(t.context.get(identifiers.IDENTIFIER_KEY, ""))
            except ValueError:
                continue
            holders.setdefault(t.stream.name, []).append(Holder(tuple(t.ips), identifier))
        self.holders = holders
        self._kick()

    async def drain(self) -> None:
        """Leave the streams (the proxy unregisters us at once), then let flows drain."""
        self.draining = True
        self._kick()
        with trio.move_on_after(self.target.drain_time):
            while not self._left_streams():
                await self.client.changes.wait_past(self.client.changes.version)
        self.log.info("left the streams, draining", drain_time=self.target.drain_time)
        await trio.sleep(self.target.drain_time)

    def _left_streams(self) -> bool:
        conn = self.client.connections.get(self.connection_id)
        if conn is None or conn.reply is None or not conn.established:
            return True
        return not identifiers.decode(conn.reply.extra_context)

    async def _cleanup(self) -> None:
        try:
            await self.egress.clear()
            for vip in sorted(self.installed_vips):
                await self.netlink.ensure_address_absent("lo", vip)
            self.installed_vips.clear()
            self.log.info("target state removed")
        except Exception as exc:  # never mask the original exit reason
            self.log.error("cleanup failed", error=str(exc))

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        next_resync = trio.current_time() + self.target.resync_period
        while True:
            wake = self._inputs_changed
            seen = self.client.changes.version
            drift = trio.current_time() >= next_resync
            if drift:
                next_resync = trio.current_time() + self.target.resync_period
            self._choose_identifiers()
            self.client.set_desired({self.connection_id: self._spec()})
            try:
                await self._reconcile(check_drift=drift)
            except Exception as exc:
                self.conduit_check.set(False)
                self.log.error("reconcile failed, retrying", error=str(exc), exc_info=True)
                next_resync = trio.current_time() + 1
            await wait_any(next_resync, partial(self.client.changes.wait_past, seen), wake.wait)

    def _my_ips(self) -> tuple[str, ...] | None:
        conn = self.client.connections.get(self.connection_id)
        if conn is None or not conn.established:
            return None
        return tuple(canonical_ips(conn.client_addresses))

    def _choose_identifiers(self) -> None:
        """Pick, confirm or re-pick the identifier of each stream (see the module docstring)."""
        if self.max_targets is None or self.holders is None:
            return
        mine = self._my_ips()
        for stream in self.streams:
            max_targets = self.max_targets.get(stream)
            if max_targets is None:
                self._problem(
                    stream, f"stream {stream} is not configured in conduit {self.target.conduit}"
                )
                self.chosen.pop(stream, None)
                self.confirmed.discard(stream)
                continue
            holders = self.holders.get(stream, [])
            current = self.chosen.get(stream)
            if current is not None and mine is not None:
                if not identifiers.keeps(mine, current, holders):
                    self.log.warning(
                        "identifier taken by another target, picking again",
                        stream=stream,
                        identifier=current,
                    )
                    self.confirmed.discard(stream)
                    current = None
                elif Holder(mine, current) in holders:
                    if stream not in self.confirmed:
                        self.log.info("identifier confirmed", stream=stream, identifier=current)
                    self.confirmed.add(stream)
            if current is None or current > max_targets:
                taken = identifiers.taken_by_others(mine or (), holders)
                if current is not None:
                    taken.add(current)
                try:
                    self.chosen[stream] = identifiers.choose(stream, max_targets, taken, self.rng)
                except StreamFull as exc:
                    self._problem(stream, str(exc))
                    self.chosen.pop(stream, None)
                    self.confirmed.discard(stream)
                    continue
                self.confirmed.discard(stream)
                self.log.info("identifier chosen", stream=stream, identifier=self.chosen[stream])
            self.problems.pop(stream, None)
        self.stream_check.set(all(s in self.confirmed for s in self.streams))

    def _problem(self, stream: str, text: str) -> None:
        if self.problems.get(stream) != text:
            self.log.error("cannot open stream", stream=stream, problem=text)
        self.problems[stream] = text

    def _spec(self) -> ClientSpec:
        settings = self.target
        chosen = {} if self.draining else self.chosen
        return ClientSpec(
            connection_id=self.connection_id,
            endpoint=settings.proxy,
            network_service=f"proxy.{settings.conduit}.{settings.trench}",
            mechanism=settings.mechanism,
            interface=settings.interface,
            netns_path=settings.netns_path or pid_netns_path(),
            primary_address=settings.primary_address,
            vxlan_port=settings.vxlan_port,
            context={
                **identifiers.encode(chosen),
                **({NODE_CONTEXT: settings.node} if settings.node else {}),
            },
        )

    async def _reconcile(self, *, check_drift: bool) -> None:
        conn = self.client.connections.get(self.connection_id)
        if conn is None or not conn.established or self.vips is None:
            self.conduit_check.set(False)
            if self.egress.routes:  # the link is gone or going: no route via it
                await self.egress.update(self.egress.rules, {})
            return
        families = {conduit.family(a) for a in conn.client_addresses}
        rules = egress_rules(self.vips, families)
        wanted_vips = {r.src for r in rules}
        for vip in sorted(wanted_vips - self.installed_vips):
            await self.netlink.ensure_address("lo", vip)
        for vip in sorted(self.installed_vips - wanted_vips):
            await self.netlink.ensure_address_absent("lo", vip)
        if check_drift:
            present = {str(ipaddress.ip_interface(a)) for a in await self.netlink.addresses("lo")}
            for vip in sorted(wanted_vips - present):
                await self.netlink.ensure_address("lo", vip)
        self.installed_vips = wanted_vips
        hops = egress_next_hops(conn.endpoint_addresses)
        if await self.egress.update(
            rules, hops, oif=self.target.interface, check_drift=check_drift
        ):
            self.log.info(
                "egress updated",
                vips=sorted(wanted_vips),
                via={f"ipv{f}": list(h) for f, h in hops.items()},
            )
        self.conduit_check.set(True)
