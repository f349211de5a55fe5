"""The load-balancer role: VIP traffic to targets through one Maglev table per stream.

The LB watches the NSP for its conduit's streams, flows and VIPs and for the enabled targets of
those streams. A reconcile task turns that into kernel state and keeps it there: for every
target and each of its IP families an ``ip rule fwmark X lookup X`` and a ``default via
<target>`` route in table X (X = stream offset + identifier), the data path of the chosen mode,
and the NFQUEUE readers. It runs on every change and every ``resync-period`` (repairing drift,
e.g. a rule deleted by hand), and removes all it installed when the role stops.

Modes (``mode`` setting), all from the same table:

* ``kernel``: an nftables map per stream holds the table; ``jhash`` of the 5-tuple picks the
  entry, no packet visits user space (ICMP errors are steered by their quoted header in the
  kernel too). With the ingress fast path, packets to targets on the LB's own links are
  forwarded at the ingress link, before routing; the rest take the routed path.
* ``nfqueue``: every VIP packet is queued; the reader classifies it by flow, hashes it with a
  keyed hash and sets the mark.
* ``first-packet``: the first packet of a connection is steered by the same in-kernel map and
  its mark kept in conntrack, so established connections stay put when the target set
  changes.

The nftables side is :mod:`meridio.lb.nftables` (rendering, counters), the fast path's
eligibility :mod:`meridio.lb.fastpath`, port NAT :mod:`meridio.lb.portnat`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpclib
import trio
from grpclib.const import Status
from prometheus_client import Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pyroute2.netlink.exceptions import NetlinkError

from meridio.api.meridio.admin.v1 import (
    GatewaysRequest,
    GatewaysResponse,
    GatewayStatus,
    LbInspectBase,
    LbStream,
    LbTarget,
    ShowRequest,
    ShowResponse,
    WhichRequest,
    WhichResponse,
)
from meridio.api.nsp.v1 import (
    Attractor,
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
from meridio.connect.lbside import LbConnect, LbConnectSettings, check_connect_settings
from meridio.core import birdconf, lbplan, maglev
from meridio.core.classifier import Classifier
from meridio.core.jhash import flow_key, nft_bucket
from meridio.core.lbstate import (
    DesiredState,
    RouteSpec,
    RuleSpec,
    StreamKey,
    StreamSpec,
    TargetSpec,
    desired_state,
)
from meridio.core.packet import MalformedPacket, five_tuple
from meridio.lb import fastpath, iptables, portnat
from meridio.lb import nftables as nft
from meridio.lb.external import External, ExternalError, external_spec, split_list
from meridio.lb.frontend import Frontend
from meridio.lb.nfq import DROP, QueueReader
from meridio.roles.base import Role
from meridio.roles.common import KERNEL_ERRORS
from meridio.runtime.metrics import REGISTRY
from meridio.settings import CommonSettings

if TYPE_CHECKING:
    from meridio.runtime import Runtime

MODES = ("kernel", "nfqueue", "first-packet")
# What a reconcile pass may meet and retry: the kernel refusing a change for now (netlink), a
# tool failing (nft, iptables, conntrack), a socket or file error.
RECONCILE_ERRORS = (*KERNEL_ERRORS, nft.NftError, iptables.IptablesError)
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}

ANNOUNCED = Gauge(
    "meridio_lb_vips_announced",
    "VIPs the LB announces to its gateways now",
    ["trench", "attractor"],
    registry=REGISTRY,
)
TARGETS = Gauge(
    "meridio_lb_targets",
    "Targets in the Maglev table of a stream",
    ["trench", "conduit", "stream"],
    registry=REGISTRY,
)


class LbSettings(LbConnectSettings, kw_only=True):
    nsp: str = "localhost:7778"
    """Address of the NSP, host:port or unix:///path."""
    trench: str = ""
    conduit: str = ""
    """Serve the streams of this conduit (empty: every conduit of the trench)."""
    mode: str = "kernel"
    fast_path: bool = True
    """kernel mode: steer and forward VIP packets at the ingress links, before routing, to
    targets on links of the LB's own (see meridio.lb.nftables); what it cannot handle takes
    the routed path."""
    fast_path_interfaces: str | list[str] = ""
    """The links VIP traffic arrives on, where the fast path hooks (a list, or
    comma-separated); empty: the external interface."""
    table_size: int = 0
    """Maglev table size M; 0 picks the smallest prime of at least 100 x max-targets."""
    queue: int = 0
    """nfqueue mode: first NFQUEUE number."""
    queues: int = 1
    """nfqueue mode: number of queues (and reader tasks); packets are spread over them by flow
    hash."""
    fail_open: bool = False
    """With no reader bound, let queued packets through unmarked (they are then dropped by
    routing unless the host routes VIPs elsewhere) instead of dropping them in the queue."""
    batch: int = 64
    identifier_offset: int = 5000
    rule_priority: int = 100
    resync_period: float = 5.0
    hash_seed: int = 0
    """Seed of the flow hash, equal on every LB of a trench; 0 derives it from the trench name."""
    reject_no_target: bool = False
    untrack_syn: bool = False
    """first-packet mode behind several LBs (replies may return through another LB): untrack
    SYNs so connections seen one way only still keep their mark; about half of new
    connections then take 200 ms longer to start."""
    defrag: bool = True
    """Reassemble fragments of VIP traffic before classifying, so they follow their flow (no
    conntrack needed where the kernel has nft tproxy); off only where VIP traffic is never
    fragmented."""
    inspect_listen: str = ""
    """Also serve the LbInspect API on this TCP host:port (always on <run-dir>/lb.sock)."""
    # --- the external side (see meridio.lb.external) ---
    external_interface: str = ""
    """The interface facing the gateways: an existing one, or (with external-parent) the name
    of the one the LB creates (default ext0)."""
    external_parent: str = ""
    """Create the external interface on this parent interface."""
    external_kind: str = "macvlan"
    """What to create on the parent: vlan (802.1Q, needs external-vlan-id) or macvlan."""
    external_vlan_id: int = 0
    external_macvlan_mode: str = "bridge"
    external_addresses: str | list[str] = ""
    """Addresses with prefix length on the external interface (IPv4 and IPv6; a list, or
    comma-separated)."""
    gateways: str | list[str] = ""
    """Gateway addresses: the default route of the gateway table (multipath over several of a
    family; a list, or comma-separated)."""
    gateway_table: int = 4096
    """Routing table of the replies from the VIPs (``from <VIP> lookup <table>``)."""
    gateway_rule_priority: int = 200
    """Priority of the ``from <VIP>`` rules."""
    # --- attraction (see meridio.lb.frontend) ---
    attractor: str = ""
    """Name of the attractor (NSP configuration) this LB belongs to: its VIPs are announced
    to its gateways by BGP (or attracted by static routes with BFD) through a BIRD the LB runs
    on the external interface. Empty: no frontend (the gateways route statically)."""
    router_id: str = ""
    """BIRD's router ID; empty: the first external IPv4 address, else derived from the
    instance name (so an IPv6-only LB works)."""
    bird_binary: str = "bird"
    bird_poll_interval: float = 0.25
    """Seconds between two readings of BIRD's sessions."""
    withdraw_grace: float = 1.0
    """After SIGTERM: seconds between withdrawing the VIPs and removing the data path, for
    the gateways to move the flows to the other LBs."""


def derive_seed(settings: LbSettings) -> int:
    if settings.hash_seed:
        return settings.hash_seed & 0xFFFFFFFF
    digest = hashlib.blake2b(f"meridio-lb/{settings.trench}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") or 1


@dataclass(frozen=True)
class StreamTable:
    key: StreamKey
    offset: int
    table: maglev.MaglevTable
    targets: Mapping[int, TargetSpec]
    hits: HitCounters


class HitCounters:
    """Packets and bytes per identifier of one stream, kept across table swaps.

    Plain lists indexed by identifier: the packet path only adds to them; Prometheus reads them
    when scraped (see :class:`LbCollector`), which costs nothing per packet.
    """

    def __init__(self, max_targets: int) -> None:
        self.packets = [0] * (max_targets + 1)
        self.octets = [0] * (max_targets + 1)

    def resized(self, max_targets: int) -> HitCounters:
        if len(self.packets) == max_targets + 1:
            return self
        fresh = HitCounters(max_targets)
        keep = min(len(self.packets), max_targets + 1)
        fresh.packets[:keep], fresh.octets[:keep] = self.packets[:keep], self.octets[:keep]
        return fresh


@dataclass(frozen=True)
class DataPath:
    """What the packet path reads: swapped as a whole, never changed in place."""

    classifier: Classifier
    streams: Mapping[StreamKey, StreamTable]
    vips: tuple[str, ...]
    seed: int
    hash_flow: maglev.FlowHasher
    port_nats: tuple[nft.PortNat, ...] = ()


@dataclass
class Inputs:
    """The latest view of the NSP (level-triggered: each message replaces a whole list)."""

    streams: list[Stream] | None = None
    flows: list[Flow] | None = None
    vips: list[Vip] | None = None
    targets: list[Target] | None = None
    attractors: list[Attractor] | None = None
    connected: dict[str, bool] = field(default_factory=dict)

    def complete(self) -> bool:
        return None not in (self.streams, self.flows, self.vips, self.targets)


def table_size_for(settings: LbSettings, max_targets: int) -> int:
    return settings.table_size or maglev.default_table_size(max_targets)


def stream_key(stream: Stream) -> StreamKey:
    conduit = stream.conduit
    return (
        conduit.trench.name if conduit and conduit.trench else "",
        conduit.name if conduit else "",
        stream.name,
    )


def target_specs(targets: list[Target]) -> list[TargetSpec]:
    specs = []
    for t in targets:
        try:
            identifier = int(t.context.get("identifier", ""))
        except ValueError:
            continue
        specs.append(TargetSpec(stream_key(t.stream), identifier, tuple(t.ips)))
    return specs


class Verdicts:
    """The per-packet decision of the user-space readers (nfqueue mode), with its counters.

    Kept lean on purpose (it runs for every queued packet, in the reader threads): parse,
    classify, hash, look up; it returns the mark (or :data:`meridio.lb.nfq.DROP`) and the
    reader sends the verdicts in batches. Counters are list and dict increments, exported
    only when scraped.
    """

    def __init__(self, role: LbRole) -> None:
        self.role = role
        self.drops: Counter[str] = Counter()

    def __call__(self, pkt: Any) -> int:
        path = self.role.datapath
        payload = pkt.get_payload()
        try:
            family, proto, src, dst, sport, dport = five_tuple(payload)
        except MalformedPacket as exc:
            self.drops[f"malformed-{exc.reason}"] += 1
            return DROP
        if path is None:
            self.drops["not-ready"] += 1
            return DROP
        match = path.classifier.lookup(family, proto, src, dst, sport, dport, payload)
        if match is None:
            self.drops["no-flow"] += 1
            return DROP
        stream = path.streams.get(match.stream)
        if stream is None:
            self.drops["no-stream"] += 1
            return DROP
        identifier = stream.table.lookup(path.hash_flow(src, dst, proto, sport, dport))
        if identifier == 0:
            self.drops["no-target"] += 1
            return DROP
        hits = stream.hits
        hits.packets[identifier] += 1
        # the packet's own length: the queue copies only its first bytes to user space
        if family == 4:
            hits.octets[identifier] += payload[2] << 8 | payload[3]
        else:
            hits.octets[identifier] += 40 + (payload[4] << 8 | payload[5])
        return stream.offset + identifier


class LbCollector:
    """Prometheus view of the LB's counters, with Meridio's metric names where it has them."""

    def __init__(self, role: LbRole) -> None:
        self.role = role

    def collect(self) -> Iterator[Any]:
        labels = ["trench", "conduit", "stream", "identifier"]
        packets = CounterMetricFamily(
            "meridio_conduit_stream_target_hit_packets",
            "Packets steered to a target by the user-space reader",
            labels=labels,
        )
        octets = CounterMetricFamily(
            "meridio_conduit_stream_target_hit_bytes",
            "Bytes steered to a target by the user-space reader",
            labels=labels,
        )
        for key, hits in sorted(self.role.hit_counters.items()):
            for identifier, count in enumerate(hits.packets):
                if count:
                    values = [*key, str(identifier)]
                    packets.add_metric(values, count)
                    octets.add_metric(values, hits.octets[identifier])
        drops = CounterMetricFamily(
            "meridio_lb_dropped_packets", "Packets the LB dropped, by reason", labels=["reason"]
        )
        for reason, count in sorted((self.role.verdicts.drops + self.role.kernel_drops).items()):
            drops.add_metric([reason], count)
        yield from (packets, octets, drops)
        frontend = self.role.frontend
        if frontend is None:
            return
        session = GaugeMetricFamily(
            "meridio_lb_gateway_up",
            "1 while the session with the gateway is up (BGP established, static route in)",
            labels=["gateway", "protocol"],
        )
        bfd = GaugeMetricFamily(
            "meridio_lb_gateway_bfd_up",
            "1 while the BFD session with the gateway is up (gateways with BFD only)",
            labels=["gateway"],
        )
        announced = GaugeMetricFamily(
            "meridio_lb_gateway_routes_announced",
            "Routes announced to the gateway",
            labels=["gateway"],
        )
        received = GaugeMetricFamily(
            "meridio_lb_gateway_routes_received",
            "Routes received from the gateway",
            labels=["gateway"],
        )
        for g in frontend.gateways:
            session.add_metric([g.name, g.protocol], 1 if g.up else 0)
            if g.bfd != "off":
                bfd.add_metric([g.name], 1 if g.bfd == "up" else 0)
            announced.add_metric([g.name], g.routes_announced)
            received.add_metric([g.name], g.routes_received)
        restarts = CounterMetricFamily(
            "meridio_lb_bird_starts", "Times the LB started its BIRD", labels=[]
        )
        restarts.add_metric([], frontend.starts)
        yield from (session, bfd, announced, received, restarts)


class LbRole(Role[LbSettings]):
    name = "lb"
    Settings = LbSettings

    @classmethod
    def check_settings(cls, settings: CommonSettings) -> None:
        assert isinstance(settings, LbSettings)
        if settings.mode not in MODES:
            raise ValueError(f"setting 'mode': {settings.mode!r} is not one of {', '.join(MODES)}")
        if not settings.trench:
            raise ValueError("setting 'trench' is required")
        if settings.queues < 1 or not 0 <= settings.queue <= 65535 - settings.queues:
            raise ValueError("settings 'queue'/'queues' must give queue numbers within 0..65535")
        if settings.table_size and not maglev.is_prime(settings.table_size):
            raise ValueError(f"setting 'table-size': {settings.table_size} is not a prime")
        check_connect_settings(settings, settings.conduit, settings.rule_priority)
        # ValueError naming the setting
        external_spec(settings, routes_from_frontend=bool(settings.attractor))
        if settings.attractor:
            birdconf.router_id(settings.router_id, (), "check")
        for name in split_list(settings.fast_path_interfaces):
            if not re.fullmatch(r"[^\s/\"']{1,15}", name):
                raise ValueError(f"setting 'fast-path-interfaces': {name!r} is no interface name")
        if settings.withdraw_grace < 0 or settings.bird_poll_interval <= 0:
            raise ValueError("settings 'withdraw-grace' and 'bird-poll-interval' must be > 0")

    def __init__(self, settings: LbSettings, runtime: Runtime) -> None:
        super().__init__(settings, runtime)
        assert isinstance(settings, LbSettings)
        self.lb = settings
        self.mode = settings.mode
        self.seed = derive_seed(settings)
        # the flow hash key follows from the seed, so LBs sharing a seed agree
        self.hash_flow = maglev.flow_hasher(
            hashlib.blake2s(b"meridio-flow/%d" % self.seed).digest()
        )
        self.inputs = Inputs()
        self.dirty = trio.Event()
        self.datapath: DataPath | None = None
        self.desired: DesiredState | None = None
        self.offsets: dict[StreamKey, int] = {}
        self.verdicts = Verdicts(self)
        self.hit_counters: dict[StreamKey, HitCounters] = {}
        self.retry_soon = False
        self._tables: dict[tuple[StreamKey, int, tuple[int, ...]], maglev.MaglevTable] = {}
        self._installed = lbplan.Observed(frozenset(), frozenset())
        self._nft_applied: nft.TableSpec | None = None
        """What the kernel holds (kernel, first-packet; nfqueue: the NAT/defrag table)."""
        self._fast_links: dict[str, int] = {}
        """Fast path hook: device name -> its index when the table was loaded."""
        self._fast_links_seen: dict[str, int] = {}
        self._attraction_inputs: tuple[object, ...] = ()
        self.fast_pending = False
        """Some target of the fast path's links has no neighbour entry yet: look again soon."""
        self._fast_retries = 0
        self.kernel_totals = nft.CounterTotals()
        self.kernel_drops: Counter[str] = Counter()
        self.features: nft.Features | None = None
        self._iptables: dict[int, str] = {}
        self.nft_table = "meridio-lb"
        self.log = runtime.log
        self.connect: LbConnect | None = None
        self.external: External | None = None
        self.egress_vips: frozenset[str] = frozenset()
        """The VIPs whose egress (``from <VIP>`` rules) was last put in place."""
        self.frontend: Frontend | None = None
        self.watches = 5 if settings.attractor else 4
        self.draining = False

    # --- NSP watches -------------------------------------------------------------------------

    def _filters(self) -> tuple[Trench, Conduit]:
        trench = Trench(name=self.lb.trench)
        return trench, Conduit(name=self.lb.conduit, trench=trench)

    async def _watch(
        self, name: str, open_stream: Callable[[], AsyncIterator[Any]], store: Callable[[Any], None]
    ) -> None:
        send, recv = trio.open_memory_channel[Any](4)

        def on_state(up: bool) -> None:
            self.inputs.connected[name] = up
            self._update_nsp_health()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: self.runtime.grpc.pump(open_stream, send, on_state=on_state, name=name)
            )
            async for message in recv:
                store(message)
                self.dirty.set()

    def _update_nsp_health(self) -> None:
        up = len(self.inputs.connected) == self.watches and all(self.inputs.connected.values())
        self.nsp_check.set(up)

    # --- reconcile ---------------------------------------------------------------------------

    def _table(self, key: StreamKey, size: int, identifiers: tuple[int, ...]) -> maglev.MaglevTable:
        cache_key = (key, size, identifiers)
        table = self._tables.get(cache_key)
        if table is None:
            table = maglev.build_table(identifiers, size)
            self._tables = {k: v for k, v in self._tables.items() if k[0] != key}
            self._tables[cache_key] = table
        return table

    def _compute(self) -> tuple[DesiredState, DataPath]:
        inputs = self.inputs
        assert inputs.streams is not None and inputs.flows is not None
        assert inputs.vips is not None and inputs.targets is not None
        specs = [StreamSpec(stream_key(s), int(s.max_targets) or 100) for s in inputs.streams]
        desired = desired_state(
            specs,
            target_specs(inputs.targets),
            self.offsets,
            offset_start=self.lb.identifier_offset,
            rule_priority=self.lb.rule_priority,
        )
        streams: dict[StreamKey, StreamTable] = {}
        for key, state in desired.streams.items():
            size = table_size_for(self.lb, state.spec.max_targets)
            table = self._table(key, size, tuple(sorted(state.targets)))
            hits = self.hit_counters.get(key)
            hits = (
                HitCounters(state.spec.max_targets)
                if hits is None
                else hits.resized(state.spec.max_targets)
            )
            self.hit_counters[key] = hits
            streams[key] = StreamTable(key, state.offset, table, state.targets, hits)
        served = {s.name for s in inputs.streams}
        flows = [f for f in inputs.flows if f.stream and f.stream.name in served]
        vip_addresses = tuple(sorted({v.address for f in flows for v in f.vips}))
        nats, problems = portnat.port_nats_of_streams(inputs.streams)
        for problem in problems:
            self.log.warning("port NAT left out", problem=problem)
        path = DataPath(
            Classifier.compile(flows),
            streams,
            vip_addresses,
            self.seed,
            self.hash_flow,
            port_nats=nats,
        )
        return desired, path

    async def reconcile(self, *, check_drift: bool) -> None:
        await self._reconcile_external(check_drift=check_drift)
        if not self.inputs.complete():
            self._update_attraction()
            return
        desired, path = self._compute()
        for problem in desired.problems:
            self.log.warning("target left out", problem=problem)
        self.offsets = {k: s.offset for k, s in desired.streams.items()}
        netlink = await self.runtime.netlink()
        observed = await self._read_routing(netlink) if check_drift else self._installed
        steps = lbplan.plan(
            desired.rules,
            desired.routes,
            observed,
            forget_connections=self.mode == "first-packet",
        )
        failed = await self._execute(steps, netlink, path, check_drift)
        changes = lbplan.routing_changes(steps)
        if any(changes.values()):
            self.log.info("routing reconciled", **changes, failed=len(failed), drift=check_drift)
        self._installed = lbplan.installed_after(desired.rules, desired.routes, failed, observed)
        # routes that could not be installed are tried again in a second, not at the next resync
        # a target on a fast path link without a neighbour yet: look again in a second (for a
        # while; then the resync period)
        self._fast_retries = self._fast_retries + 1 if self.fast_pending else 0
        self.retry_soon = bool(failed) or (self.fast_pending and self._fast_retries <= 10)
        self.desired = desired
        for key, stream in path.streams.items():
            TARGETS.labels(*key).set(len(stream.targets))
        # not ready while a target cannot be routed to: a gateway trusting readiness would
        # send traffic this LB cannot deliver yet
        self.datapath_check.set(not failed)
        self._update_attraction()

    async def _execute(
        self, steps: list[lbplan.Step], netlink: Any, path: DataPath, check_drift: bool
    ) -> list[RouteSpec]:
        """Run a plan's steps in order; the routes that could not be installed (their rules
        are skipped, so no rule points at a table without its route)."""
        failed: list[RouteSpec] = []
        blocked: set[tuple[int, int]] = set()
        for step in steps:
            if isinstance(step, lbplan.AddRoute):
                route = step.route
                try:
                    # a new target may have an address a removed one had: forget its old MAC
                    await netlink.forget_neighbour(route.gateway)
                    await netlink.ensure_route(
                        "default", table=route.table, gateway=route.gateway, family=route.family
                    )
                except NetlinkError as exc:
                    # e.g. the target's subnet is not reachable yet (its proxy still
                    # connecting): the others go ahead, this one is retried soon
                    failed.append(route)
                    blocked.add((route.family, route.table))
                    self.log.warning("route not installed yet", route=str(route), error=str(exc))
            elif isinstance(step, lbplan.AddRule):
                rule = step.rule
                if (rule.family, rule.table) not in blocked:
                    await netlink.ensure_rule(
                        family=rule.family,
                        priority=rule.priority,
                        table=rule.table,
                        fwmark=rule.fwmark,
                    )
            elif isinstance(step, lbplan.InstallDatapath):
                await self._reconcile_datapath(path, check_drift)
                self.datapath = path  # Show/Which and the readers see the new tables from here
            elif isinstance(step, lbplan.DeleteRule):
                rule = step.rule
                await netlink.ensure_rule_absent(
                    family=rule.family, priority=rule.priority, table=rule.table, fwmark=rule.fwmark
                )
            elif isinstance(step, lbplan.DeleteRoute):
                await netlink.ensure_route_absent(
                    "default", table=step.route.table, family=step.route.family
                )
            elif isinstance(step, lbplan.ForgetConnections):
                await self._forget_connections(set(step.marks))
        return failed

    async def _forget_connections(self, marks: set[int]) -> None:
        """Drop conntrack entries that still carry a removed target's mark.

        In first-packet mode a connection's mark lives in conntrack; without this, flows of a
        removed target keep its stale mark (and are lost) for as long as they keep sending,
        instead of being balanced again on their next packet.
        """
        for mark in sorted(marks):
            for family in ("ipv4", "ipv6"):
                await trio.run_process(
                    ["conntrack", "-D", "-f", family, "--mark", str(mark)],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,  # exit status 1 when there was nothing to delete
                )
        self.log.info("connections of removed targets forgotten", marks=sorted(marks))

    def _ours(self, mark: int | None, priority: int | None) -> bool:
        low = self.lb.identifier_offset
        return priority == self.lb.rule_priority and mark is not None and mark > low

    async def _read_routing(self, netlink: Any) -> lbplan.Observed:
        """Our rules and the default routes of their tables, in one lean dump per kind and
        family (a thousand targets cost milliseconds, not a dump per table)."""
        rules = frozenset(
            RuleSpec(r.family, r.fwmark, r.table, r.priority)
            for r in await netlink.rule_list()
            if r.fwmark is not None and self._ours(r.fwmark, r.priority)
        )
        tables = {r.table for r in self._installed.routes} | {r.table for r in rules}
        if self.desired is not None:
            tables |= {r.table for r in self.desired.routes}
        routes = frozenset(
            RouteSpec(r.family, r.table, r.gateways[0])
            for r in await netlink.route_list()
            if r.dst is None and r.table in tables and len(r.gateways) == 1
        )
        return lbplan.Observed(rules, routes)

    async def _reconcile_datapath(self, path: DataPath, check_drift: bool) -> None:
        if self.features is None:
            self.features = await nft.probe_features()
            self.log.info(
                "nftables features",
                native_queue=self.features.native_queue,
                tproxy=self.features.tproxy,
                fwd=self.features.fwd,
            )
        if self.mode == "nfqueue" and not self.features.native_queue:
            # no nft queue statement on this kernel: the queue rules go through iptables
            for family in (4, 6):
                script = iptables.render(family, path.vips, self._queue_spec())
                if script != self._iptables.get(family) or (
                    check_drift and not await self._iptables_intact(family)
                ):
                    await iptables.apply(family, script)
                    self._iptables[family] = script
        elif not self._iptables:
            # none of ours in iptables in this mode: remove what an earlier LB may have left
            for family in (4, 6):
                if await iptables.present(family):
                    await iptables.remove(family)
                self._iptables[family] = ""
        await self._reconcile_nft(path, check_drift)

    async def _iptables_intact(self, family: int) -> bool:
        text = await iptables.current(family)
        expected = [
            line for line in self._iptables.get(family, "").splitlines() if line.startswith("-A ")
        ]
        return all(line in text for line in expected) and f"-N {iptables.PRE_CHAIN}" in text

    def _queue_spec(self) -> iptables.QueueSpec:
        return iptables.QueueSpec(self.lb.queue, self.lb.queues, self.lb.fail_open)

    def _fast_devices(self) -> tuple[str, ...]:
        if self.mode != "kernel" or not self.lb.fast_path:
            return ()
        if self.features is not None and not self.features.fwd:
            return ()
        named = split_list(self.lb.fast_path_interfaces)
        if not named and self.external is not None:
            named = (self.external.spec.interface,)
        return named

    async def _fast_path(self, path: DataPath) -> nft.FastPath | None:
        """The fast path's hook devices and its targets: those on links of ours with a known
        neighbour (see meridio.lb.fastpath)."""
        wanted = self._fast_devices()
        if not wanted:
            return None
        netlink = await self.runtime.netlink()
        links = {link.index: link for link in await netlink.link_list()}
        by_name = {link.name: link for link in links.values()}
        devices = tuple(sorted(name for name in set(wanted) if name in by_name))
        if not devices:
            return None
        self._fast_links_seen = {name: by_name[name].index for name in devices}
        # one next hop per family and target, the first address (as the routes: lbstate)
        hops: dict[tuple[int, int], str] = {}
        for stream in path.streams.values():
            for identifier, target in stream.targets.items():
                for ip in target.ips:
                    hop = ipaddress.ip_interface(ip).ip
                    hops.setdefault((hop.version, stream.offset + identifier), str(hop))
        found = await fastpath.probe(hops.values(), {i: link.name for i, link in links.items()})
        chosen: dict[int, list[tuple[int, nft.FastTarget]]] = {4: [], 6: []}
        mtus = []
        pending = False
        for (family, mark), address in sorted(hops.items()):
            link = fastpath.eligible(address, found)
            if link is None:
                route = found.routes.get(address)
                pending |= route is not None and not route.gateway  # on a link, no neighbour yet
                continue
            chosen[family].append((mark, nft.FastTarget(address, link)))
            mtus.append(by_name[link].mtu)
        self.fast_pending = pending
        # a packet is at most as long as its ingress link's MTU (GRO aggregates stay GSO
        # packets, which the links segment): check lengths only where a link out is smaller
        smallest = min(mtus, default=0)
        mtu = smallest if mtus and smallest < max(by_name[d].mtu for d in devices) else None
        return nft.FastPath(devices, tuple(chosen[4]), tuple(chosen[6]), mtu)

    async def _nft_spec(self, path: DataPath) -> nft.TableSpec:
        assert self.features is not None
        maps = []
        marks = []
        if self.mode != "nfqueue":
            for key, stream in sorted(path.streams.items()):
                entries = stream.table.entries.astype("int64") + stream.offset
                entries[stream.table.entries == maglev.NO_TARGET] = 0
                maps.append(nft.StreamMap(key, tuple(entries.tolist())))
                marks += [stream.offset + identifier for identifier in stream.targets]
        native = None
        if self.mode == "nfqueue" and self.features.native_queue:
            native = (self.lb.queue, self.lb.queues, self.lb.fail_open)
        return nft.TableSpec(
            streams=tuple(maps),
            flows=path.classifier.flows if self.mode != "nfqueue" else (),
            seed=path.seed,
            name=self.nft_table,
            vips=tuple(f"{ipaddress.ip_interface(v).ip}" for v in path.vips),
            reject_no_target=self.lb.reject_no_target,
            defrag=self.lb.defrag,
            mode=self.mode,
            marks=tuple(marks),
            port_nats=path.port_nats,
            fast=await self._fast_path(path),
            untrack_syn=self.lb.untrack_syn and self.mode == "first-packet",
            defrag_by_conntrack=not self.features.tproxy,
            native_queue=native,
        )

    async def _reconcile_nft(self, path: DataPath, check_drift: bool) -> None:
        spec = await self._nft_spec(path)
        old = self._nft_applied
        reload = old is None or old.structure() != spec.structure()
        if old is not None and old.mode != "nfqueue" and (check_drift or reload or old != spec):
            # before counters go (a reload, a target's element deleted), and at every resync
            await self._read_kernel_counters(old, path)
        if not reload and check_drift:
            reload = not await self._nft_intact(spec)
            if reload:
                self.log.warning("nftables table missing or changed, reinstalled")
        if not reload and spec.fast is not None:
            # a hook device deleted and made again loses its hook: load the table again
            reload = self._fast_links_seen != self._fast_links
        if not reload:
            assert old is not None
            try:
                await nft.apply(nft.render_update(old, spec))
            except nft.NftError as exc:
                self.log.warning("nftables update refused, reloading the table", error=str(exc))
                reload = True
        if reload:
            if nft.needs_table(spec):
                await nft.apply(nft.render_table(spec))
            else:
                await nft.apply(nft.render_delete(self.nft_table))
            self._fast_links = dict(self._fast_links_seen) if spec.fast is not None else {}
        if reload:
            self.log.info("nftables table loaded", table=self.nft_table, fast=spec.fast is not None)
        self._nft_applied = spec

    async def _nft_intact(self, spec: nft.TableSpec) -> bool:
        if not nft.needs_table(spec):
            return True
        if not await nft.exists(spec.name):
            return False
        if spec.fast is not None:
            return await nft.exists(nft.fast_table_name(spec.name), family="netdev")
        return True

    async def _read_kernel_counters(self, applied: nft.TableSpec, path: DataPath) -> None:
        """Per-target hits (routed and fast path) and drops, from the kernel's counters into
        the metrics (kernel and first-packet modes)."""
        try:
            readings = await nft.read_counters(applied)
        except nft.NftError as exc:
            self.log.warning("reading the nftables counters failed", error=str(exc))
            return
        totals = self.kernel_totals
        totals.update(readings.flat())
        for stream in path.streams.values():
            hits = stream.hits
            for identifier in range(1, len(hits.packets)):
                mark = stream.offset + identifier
                routed, fast = totals.total(f"routed/{mark}"), totals.total(f"fast/{mark}")
                if routed[0] or fast[0]:
                    hits.packets[identifier] = routed[0] + fast[0]
                    hits.octets[identifier] = routed[1] + fast[1]
        self.kernel_drops = Counter(
            {
                reason: totals.total(reason)[0]
                for reason in (nft.NO_FLOW_COUNTER, nft.NO_TARGET_COUNTER)
            }
        )

    async def cleanup(self) -> None:
        """Remove every rule, route, chain, table and map this LB installed."""
        netlink = await self.runtime.netlink()
        # what this instance installed, and what a previous, killed one left behind
        observed = await self._read_routing(netlink)
        for rule in sorted(observed.rules | self._installed.rules):
            await netlink.ensure_rule_absent(
                family=rule.family, priority=rule.priority, table=rule.table, fwmark=rule.fwmark
            )
        for route in sorted(observed.routes | self._installed.routes):
            await netlink.ensure_route_absent("default", table=route.table, family=route.family)
        self._installed = lbplan.Observed(frozenset(), frozenset())
        if any(self._iptables.values()):
            for family in (4, 6):
                await iptables.remove(family)
        self._iptables = {}
        await nft.apply(nft.render_delete(self.nft_table), check=False)
        self._nft_applied = None
        self.log.info("data path removed")

    # --- role life ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        health = self.runtime.health
        self.nsp_check = health.register("NSPCli", ["Readiness"])
        self.datapath_check = health.register("Stream", ["Readiness"])
        health.register("LB", ["Startup", "Liveness"]).set(True)
        if self.lb.attractor:
            self.gateways_check = health.register("Gateways", ["Readiness"])
        collector = LbCollector(self)
        REGISTRY.register(collector)
        nsp = await self.runtime.grpc.channel(self.lb.nsp)
        registry, config = TargetRegistryStub(nsp), ConfigurationManagerStub(nsp)
        trench, conduit = self._filters()
        target_filter = Target(
            status=TargetStatus.ENABLED, type=TargetType.DEFAULT, stream=Stream(conduit=conduit)
        )
        inputs = self.inputs
        listen = [f"unix://{self.runtime.run_dir / 'lb.sock'}"]
        if self.lb.inspect_listen:
            listen.append(self.lb.inspect_listen)
        await self.runtime.grpc.serve([LbInspect(self)], listen)

        def setter(attr: str, field_name: str) -> Callable[[Any], None]:
            return lambda msg: setattr(inputs, attr, list(getattr(msg, field_name)))

        try:
            async with trio.open_nursery() as nursery:
                await self._start_connect(nursery, nsp)
                await self._attach_external()
                if self.lb.attractor:
                    self.frontend = Frontend(
                        self.runtime.run_dir,
                        self.log.bind(part="frontend"),
                        binary=self.lb.bird_binary,
                        poll_interval=self.lb.bird_poll_interval,
                        on_change=self._frontend_changed,
                    )
                    await nursery.start(self.frontend.run)
                    nursery.start_soon(
                        self._watch,
                        "attractors",
                        lambda: config.watch_attractor(
                            Attractor(name=self.lb.attractor, trench=trench)
                        ),
                        setter("attractors", "attractors"),
                    )

                nursery.start_soon(
                    self._watch,
                    "streams",
                    lambda: config.watch_stream(Stream(conduit=conduit)),
                    setter("streams", "streams"),
                )
                nursery.start_soon(
                    self._watch,
                    "flows",
                    lambda: config.watch_flow(Flow(stream=Stream(conduit=conduit))),
                    setter("flows", "flows"),
                )
                nursery.start_soon(
                    self._watch,
                    "vips",
                    lambda: config.watch_vip(Vip(trench=trench)),
                    setter("vips", "vips"),
                )
                nursery.start_soon(
                    self._watch,
                    "targets",
                    lambda: registry.watch(target_filter),
                    setter("targets", "targets"),
                )
                await self._start_readers(nursery)
                task_status.started()
                await self._reconcile_loop()
        finally:
            REGISTRY.unregister(collector)
            with trio.CancelScope(shield=True):
                self.datapath_check.set(False)
                try:
                    await self.cleanup()
                except Exception as exc:  # never mask the original exit reason
                    self.log.error("cleanup failed", error=str(exc))
                await self._detach_external()

    async def _start_readers(self, nursery: trio.Nursery) -> None:
        count = self.lb.queues if self.mode == "nfqueue" else 0
        self.readers = [
            QueueReader(self.lb.queue + i, self.verdicts, batch=self.lb.batch) for i in range(count)
        ]
        for reader in self.readers:
            await nursery.start(reader.run)

    async def _reconcile_loop(self) -> None:
        next_resync = trio.current_time() + self.lb.resync_period
        while True:
            wake = min(next_resync, trio.current_time() + 1) if self.retry_soon else next_resync
            with trio.move_on_at(wake):
                await self.dirty.wait()
            drift = trio.current_time() >= next_resync
            if drift:
                next_resync = trio.current_time() + self.lb.resync_period
            self.dirty = trio.Event()
            try:
                await self.reconcile(check_drift=drift)
            except RECONCILE_ERRORS as exc:
                # what the kernel or its tools may refuse for a while; anything else is a bug
                # and crashes the daemon, for its supervisor to restart it
                self.datapath_check.set(False)
                self._update_attraction()
                self.log.error("reconcile failed, retrying", error=str(exc), exc_info=True)
                await trio.sleep(1)
                self.dirty.set()

    async def drain(self) -> None:
        """Withdraw, let the gateways move the flows, then stop taking replies.

        Readiness is already off. With a frontend the VIPs are withdrawn first; either way the
        LB keeps forwarding for ``withdraw-grace`` (the other LBs build the same tables, so
        flows keep their targets when they move), then tells the proxies to send their
        replies elsewhere; the data path goes only after that, when the role stops.
        """
        self.draining = True
        if self.frontend is not None:
            await self.frontend.withdraw()
        await trio.sleep(self.lb.withdraw_grace)
        await self._drain_connect()
        if self.connect is not None:
            # the proxies take this LB out of their replies' next hops when the NSP tells them:
            # keep the egress (and the data path) meanwhile, or replies in flight are dropped
            await trio.sleep(self.lb.withdraw_grace)

    # --- attraction (BIRD; see meridio.lb.frontend) -------------------------------------------

    def able_to_forward(self) -> bool:
        """The data path is installed and routes to every target, and egress is in place.

        The NSP's connection is not required once the data path is in: an NSP restart must
        not make every LB withdraw every VIP at once.
        """
        egress = getattr(self, "egress_check", None)
        return (
            self.datapath is not None
            and self.datapath_check.serving
            and (egress is None or egress.serving)
            and not self.draining
        )

    def announceable_vips(self) -> tuple[str, ...]:
        """The attractor's VIPs this LB can forward now: carried by a flow of a stream that
        has at least one target in the table."""
        inputs, path = self.inputs, self.datapath
        if not self.able_to_forward() or path is None or not inputs.attractors:
            return ()
        wanted = {v.address for a in inputs.attractors for v in a.vips}
        with_targets = {key for key, stream in path.streams.items() if stream.targets}
        carried = {
            v.address
            for f in inputs.flows or ()
            if f.stream and stream_key(f.stream) in with_targets
            for v in f.vips
        }
        return tuple(sorted(wanted & carried))

    def frontend_config(self, announce: tuple[str, ...]) -> birdconf.FrontendConfig:
        """BIRD's configuration for the attractor as the NSP has it now, announcing
        ``announce`` (:meth:`announceable_vips`)."""
        assert self.external is not None
        spec = self.external.spec
        peers = []
        for attractor in self.inputs.attractors or ():
            for gateway in attractor.gateways:
                peers.append(birdconf.peer_from_gateway(gateway, self._gateway_key(gateway)))
        peers.sort(key=lambda p: p.name)
        return birdconf.FrontendConfig(
            router_id=birdconf.router_id(
                self.lb.router_id, split_list(self.lb.external_addresses), self.runtime.instance
            ),
            interface=spec.interface,
            table=spec.table,
            peers=tuple(peers),
            announce=announce,
            families=tuple(sorted({p.family for p in peers})) or (4, 6),
        )

    def _gateway_key(self, gateway: Any) -> str:
        """The TCP MD5 key of a gateway's session, from its key source: a file holding the key,
        or a directory (a mounted Secret) holding a file named by the key name."""
        auth = gateway.bgp_auth
        if auth is None or not auth.key_source:
            return ""
        source = Path(auth.key_source)
        path = source / auth.key_name if source.is_dir() else source
        try:
            key = path.read_text()
        except OSError as exc:
            raise birdconf.FrontendConfigError(
                f"gateway {gateway.name!r}: cannot read the BGP authentication key "
                f"{str(path)!r}: {exc.strerror or exc}"
            ) from None
        return birdconf.check_password(gateway.name, key)

    def _update_attraction(self) -> None:
        frontend = self.frontend
        if frontend is None or self.inputs.attractors is None:
            return
        if not self.inputs.attractors:
            message = (
                f"attractor {self.lb.attractor!r} is not in trench {self.lb.trench!r}'s "
                "configuration"
            )
            if frontend.error != message:
                self.log.error("unknown attractor", attractor=self.lb.attractor)
            frontend.set_error(message)
            return
        announce = self.announceable_vips()
        self._log_attraction_inputs(announce)
        try:
            config = self.frontend_config(announce)
        except birdconf.FrontendConfigError as exc:
            if frontend.error != str(exc):
                self.log.error("frontend configuration refused", error=str(exc))
            frontend.set_error(str(exc))
            return
        frontend.set_config(config)

    def _log_attraction_inputs(self, announce: tuple[str, ...]) -> None:
        """Log what decides the announcement whenever it changes: an LB that does not announce
        must say why (data path, target routes, egress, draining, streams with targets)."""
        egress = getattr(self, "egress_check", None)
        path = self.datapath
        inputs = (
            path is not None,
            self.datapath_check.serving,
            egress is None or egress.serving,
            self.draining,
            tuple(sorted(str(k) for k, st in (path.streams.items() if path else ()) if st.targets)),
            announce,
        )
        if inputs != self._attraction_inputs:
            self._attraction_inputs = inputs
            self.log.info(
                "attraction inputs",
                datapath=inputs[0],
                target_routes=inputs[1],
                egress=inputs[2],
                draining=inputs[3],
                streams_with_targets=list(inputs[4]),
                announce=list(inputs[5]),
            )

    def _frontend_changed(self) -> None:
        frontend = self.frontend
        if frontend is None:
            return
        self.gateways_check.set(frontend.any_gateway_up())
        if self.connect is not None:
            self.connect.replies_changed()
        ANNOUNCED.labels(self.lb.trench, self.lb.attractor).set(len(frontend.announced))

    # --- the external side (gateways; see meridio.lb.external) --------------------------------

    async def _attach_external(self) -> None:
        """Make or adopt the external interface; fail the role when it cannot be made (e.g. a
        VLAN on a kernel without 802.1Q support), saying why."""
        spec = external_spec(self.lb, routes_from_frontend=bool(self.lb.attractor))
        if spec is None:
            return
        self.egress_check = self.runtime.health.register("Egress", ["Readiness"])
        self.external = External(await self.runtime.netlink(), spec, self.log)
        try:
            await self.external.attach()
        except ExternalError as exc:
            self.log.error("external interface failed", error=str(exc))
            raise

    async def _reconcile_external(self, *, check_drift: bool) -> None:
        """``from <VIP>`` rules for the trench's VIPs and the gateway table (a failure here is
        logged and repaired at the next resync; it does not hold up the data path)."""
        external = self.external
        if external is None:
            return
        vips = [v.address for v in self.inputs.vips or ()]
        try:
            await external.reconcile(vips, check_drift=check_drift)
        except Exception as exc:
            self.egress_check.set(False)
            self.egress_vips = frozenset()
            self.log.error("egress reconcile failed", error=str(exc), exc_info=True)
            return
        self.egress_check.set(True)
        if frozenset(vips) != self.egress_vips:
            self.egress_vips = frozenset(vips)
            if self.connect is not None:
                self.connect.replies_changed()

    def takes_replies(self) -> bool:
        """Whether the proxies may send the targets' replies through this LB: its egress is in
        place (the ``from <VIP>`` rules and the gateways' table; in static mode the proxies were
        told so before the LB had them) and, with an attractor, BIRD has a gateway's route in
        the kernel (BGP takes seconds)."""
        if self.external is not None and not self.egress_vips:
            return False
        return not self.lb.attractor or (self.frontend is not None and self.frontend.egress_up())

    async def _detach_external(self) -> None:
        if self.external is None:
            return
        try:
            await self.external.detach()
        except Exception as exc:  # never mask the original exit reason
            self.log.error("removing the external interface failed", error=str(exc))

    # --- the conduit endpoint (proxies connect here; see meridio.connect.lbside) ----------------

    async def _start_connect(self, nursery: trio.Nursery, nsp: Any) -> None:
        """Serve the connect endpoint and announce it in NSP, when ``connect-listen`` is set.

        Started before anything else touches netlink: the endpoint needs the runtime's
        netlink manager with kernel events on.
        """
        if not self.lb.connect_listen:
            return
        self.connect = LbConnect(
            self.runtime,
            self.lb,
            self.lb.trench,
            self.lb.conduit,
            takes_replies=self.takes_replies,
        )
        await nursery.start(self.connect.run, nsp)

    async def _drain_connect(self) -> None:
        """Announce the drain: proxies stop sending replies through this LB but stay connected
        (so what still arrives reaches the targets) until it exits and withdraws."""
        if self.connect is not None:
            await self.connect.drain()


def _show_counters(role: LbRole) -> dict[str, int]:
    drops = role.verdicts.drops + role.kernel_drops
    counters = {f"drop {reason}": count for reason, count in drops.items()}
    for (_, _, stream), hits in role.hit_counters.items():
        for identifier, count in enumerate(hits.packets):
            if count:
                counters[f"hit {stream} {identifier}"] = count
    return counters


class LbInspect(LbInspectBase):
    def __init__(self, role: LbRole) -> None:
        self.role = role

    async def show(self, show_request: ShowRequest) -> ShowResponse:
        role = self.role
        path = role.datapath
        streams = []
        if path is not None:
            for key, stream in sorted(path.streams.items()):
                counts = stream.table.counts()
                spec = role.desired.streams[key].spec if role.desired else None
                streams.append(
                    LbStream(
                        trench=key[0],
                        conduit=key[1],
                        name=key[2],
                        table_size=stream.table.size,
                        max_targets=spec.max_targets if spec else 0,
                        offset=stream.offset,
                        digest=stream.table.digest(),
                        targets=[
                            LbTarget(
                                identifier=i,
                                fwmark=stream.offset + i,
                                ips=list(t.ips),
                                entries=counts.get(i, 0),
                            )
                            for i, t in sorted(stream.targets.items())
                        ],
                    )
                )
        return ShowResponse(
            mode=role.mode,
            instance=role.runtime.instance,
            streams=streams,
            vips=list(path.vips) if path else [],
            problems=list(role.desired.problems) if role.desired else [],
            counters=_show_counters(role),
        )

    async def which(self, which_request: WhichRequest) -> WhichResponse:
        req = which_request
        path = self.role.datapath
        if path is None:
            raise grpclib.GRPCError(Status.UNAVAILABLE, "the LB has no data path yet")
        try:
            src = ipaddress.ip_address(req.src)
            dst = ipaddress.ip_address(req.dst)
        except ValueError as exc:
            raise grpclib.GRPCError(Status.INVALID_ARGUMENT, str(exc)) from exc
        proto = PROTOCOLS.get(req.protocol.lower())
        if proto is None or src.version != dst.version:
            raise grpclib.GRPCError(
                Status.INVALID_ARGUMENT,
                "protocol must be tcp, udp or sctp and both addresses of one family",
            )
        match = path.classifier.lookup(
            src.version, proto, src.packed, dst.packed, req.sport, req.dport
        )
        if match is None:
            return WhichResponse()
        stream = path.streams[match.stream]
        if self.role.mode in ("kernel", "first-packet"):
            key = flow_key(src.packed, dst.packed, req.sport, req.dport)
            index = nft_bucket(key, stream.table.size, path.seed)
        else:
            hashed = path.hash_flow(src.packed, dst.packed, proto, req.sport, req.dport)
            index = hashed % stream.table.size
        identifier = int(stream.table.entries[index])
        target = stream.targets.get(identifier)
        return WhichResponse(
            flow=match.flow,
            stream=match.stream[2],
            index=index,
            identifier=identifier,
            fwmark=stream.offset + identifier if identifier else 0,
            ips=list(target.ips) if target else [],
        )

    async def gateways(self, gateways_request: GatewaysRequest) -> GatewaysResponse:
        role = self.role
        frontend = role.frontend
        if frontend is None:
            return GatewaysResponse(error="no attractor: this LB runs no frontend (static routing)")
        applied = frontend.applied
        return GatewaysResponse(
            attractor=role.lb.attractor,
            bird=frontend.bird,
            gateways=[
                GatewayStatus(
                    name=g.name,
                    address=g.address,
                    protocol=g.protocol,
                    state=g.state,
                    bfd=g.bfd,
                    since=g.since,
                    routes_announced=g.routes_announced,
                    routes_received=g.routes_received,
                    info=g.info,
                )
                for g in frontend.gateways
            ],
            announced=list(frontend.announced),
            error=frontend.error,
            router_id=applied.router_id if applied else "",
        )
