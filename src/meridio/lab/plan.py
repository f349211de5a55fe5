"""What the lab is made of, decided without touching the host: names, addresses, placement,
scaling, the gateway's routes and BIRD configuration, the NSP's configuration and every
daemon's command line.

The lab, in network namespaces named ``<prefix><host>`` (prefix ``mlab-``)::

  gw       the external host: gateway router and traffic client. Bridge ``ext`` with
           192.0.2.1/24 and fd00:e::1/64; the VIPs are routed over the LBs' external addresses
           (ECMP, L4 hash): learned by BGP from the LBs (routing ``bgp``, BIRD ``bird-gw``),
           static routes over every possible LB supervised by BFD (``static-bfd``, BIRD too),
           or static routes the lab edits itself (``static``).
  gw-2     a second gateway router (``--gateways 2``): ``eth1``, a port of ``ext``, with
           192.0.2.2/24 and fd00:e::2/64, forwarding; BIRD ``bird-gw-2`` as in ``gw``.
  lb-N     ``meridiod --role=lb``. ``eth1`` is a port of the gateway's bridge; the LB makes its
           external interface ``ext0`` on it (macvlan, or VLAN 100) with 192.0.2.(10+N)/24 and
           fd00:e::(10+N)/64, or uses ``eth1`` itself (external kind ``veth``).
  node-N   ``meridiod --role=proxy`` (the node's proxy), instance ``proxy-N``.
  target-N ``meridiod --role=target`` (the sidecar, serving TAPA) beside the traffic server,
           which answers on the VIPs, port 5000 (and 6000 with two streams), naming itself
           ``target-N``. The lab opens each target's streams through its TAPA.
  nsp      ``meridiod --role=nsp``, 198.19.0.2:7778.
  ipam     ``meridiod --role=ipam``, 198.19.0.3:7777.
  pri      the primary network: bridge ``pri``, 198.19.0.0/16; every namespace above but ``gw``
           has ``eth0`` on it (LB N: 198.19.1.N, node N: 198.19.2.N, target N: 198.19.3.N).

With two conduits (``--conduits 2``) conduit-b has LBs and proxies of its own, in namespaces
of their own: ``lbb-N`` (198.19.4.N; external 192.0.2.(40+N), fd00:e::(40+N)) and ``nodeb-N``
(proxy ``proxyb-N`` of node N, 198.19.5.N), its stream ``stream-c`` and its VIPs 203.0.113.2/32
and 2001:db8::2/128.

Conduit addresses come from the IPAM (198.18.0.0/16 and fd00:10::/48); the VIPs are
203.0.113.1/32 and 2001:db8::1/128. Every address is in the ranges the project may use.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "mlab-"
TRENCH = "trench-a"
CONDUIT = "conduit-a"
STREAM = "stream-a"
FLOW = "flow-a"
MAX_TARGETS = 64
PORT = 5000
VIPS = {4: "203.0.113.1", 6: "2001:db8::1"}
PRIMARY = ipaddress.IPv4Network("198.19.0.0/16")
EXTERNAL: dict[int, ipaddress.IPv4Network | ipaddress.IPv6Network] = {
    4: ipaddress.IPv4Network("192.0.2.0/24"),
    6: ipaddress.IPv6Network("fd00:e::/64"),
}
IPAM_PREFIXES = {4: "198.18.0.0/16", 6: "fd00:10::/48"}
NSP_PORT = 7778
IPAM_PORT = 7777
LB_CONNECT_PORT = 7779
PROXY_CONNECT_PORT = 7781
VLAN_ID = 100
EXTERNAL_BRIDGE_MAC = "02:00:c0:00:02:01"
"""The MAC address of the gateway's bridge ``ext`` (192.0.2.1), set so that it stays: a bridge
otherwise takes the lowest address of its ports and changes it as LBs come and go, and the
LBs' packets to the gateway (BFD, BGP, replies) go astray until their ARP entries age."""
FAMILIES = {"dualstack": (4, 6), "ipv4": (4,), "ipv6": (6,)}
MECHANISMS = ("veth", "vxlan")
LB_MODES = ("first-packet", "kernel", "nfqueue")
EXTERNAL_KINDS = ("macvlan", "veth", "vlan")
ROUTINGS = ("bgp", "static-bfd", "static")
"""How the gateways learn where the VIPs are: BGP from the LBs; static routes over every
possible LB, each next hop supervised by BFD; or static routes the lab edits itself."""
DYNAMIC_ROUTINGS = ("bgp", "static-bfd")
"""The routings in which the gateways run BIRD and the LBs get their gateways from the NSP."""
LIMITS = {
    "lbs": (1, 16),
    "proxies": (1, 16),
    "targets": (0, MAX_TARGETS),
    "gateways": (1, 2),
    "streams": (1, 2),
    "conduits": (1, 2),
}
FIXED_HOSTS = ("gw", "pri", "nsp", "ipam")
HOST_KINDS = ("lb", "lbb", "node", "nodeb", "target", "gw")
"""The kinds of numbered hosts (``<kind>-N``)."""
# Role daemons and what runs beside them, in the order they start (and the reverse of stop).
ROLE_ORDER = ("gateway", "nsp", "ipam", "lb", "proxy", "target", "server")
# The attractor of the NSP configuration (bgp and static-bfd routing), and the gateways'
# protocol settings (Meridio's defaults for ports and AS numbers).
ATTRACTOR = "attractor-a"
BGP_PORT = 10179
LB_ASN = 8103
GATEWAY_ASN = 4248829953
HOLD_TIME = 3
BFD_MIN_TX = 100
BFD_MIN_RX = 100
BFD_MULTIPLIER = 3


class PlanError(ValueError):
    """A lab that cannot be built as asked; the message says what to change."""


# --- conduits and streams ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ConduitPlan:
    """A conduit of the lab, with the LBs and proxies that serve it (an LB and a proxy serve one
    conduit each; a second conduit's run in namespaces of their own)."""

    name: str
    lb_kind: str
    """Its LBs' hosts and instances: ``<lb_kind>-N``."""
    node_kind: str
    """The hosts of its proxies: ``<node_kind>-N`` (node N's proxy of this conduit)."""
    proxy_kind: str
    """Its proxies' instances: ``<proxy_kind>-N``."""
    attractor: str
    vips: Mapping[int, str]
    external_base: int
    """LB N's external addresses are host ``external_base + N`` of the external network."""


CONDUIT_A = ConduitPlan(
    name=CONDUIT,
    lb_kind="lb",
    node_kind="node",
    proxy_kind="proxy",
    attractor=ATTRACTOR,
    vips=VIPS,
    external_base=10,
)
CONDUIT_B = ConduitPlan(
    name="conduit-b",
    lb_kind="lbb",
    node_kind="nodeb",
    proxy_kind="proxyb",
    attractor="attractor-b",
    vips={4: "203.0.113.2", 6: "2001:db8::2"},
    external_base=40,
)
CONDUITS = (CONDUIT_A, CONDUIT_B)


@dataclass(frozen=True)
class StreamPlan:
    """A stream of the lab: its conduit, and the flow (TCP, UDP and SCTP to ``port`` of the
    conduit's VIPs) that feeds it."""

    name: str
    conduit: ConduitPlan
    flow: str
    port: int


STREAM_A = StreamPlan(STREAM, CONDUIT_A, FLOW, PORT)
STREAM_B = StreamPlan("stream-b", CONDUIT_A, "flow-b", 6000)
STREAM_C = StreamPlan("stream-c", CONDUIT_B, "flow-c", PORT)
STREAMS = (STREAM_A, STREAM_B, STREAM_C)


def conduit_plan(name: str) -> ConduitPlan:
    for conduit in CONDUITS:
        if conduit.name == name:
            return conduit
    raise PlanError(
        f"no conduit {name!r} in the lab; there are {', '.join(c.name for c in CONDUITS)}"
    )


def stream_plan(name: str) -> StreamPlan:
    for stream in STREAMS:
        if stream.name == name:
            return stream
    raise PlanError(
        f"no stream {name!r} in the lab; there are {', '.join(s.name for s in STREAMS)}"
    )


# --- the lab's shape ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LabSpec:
    """What ``lab up`` was asked for."""

    lbs: int = 2
    proxies: int = 2
    targets: int = 4
    ip_family: str = "dualstack"
    mechanism: str = "veth"
    lb_mode: str = "first-packet"
    external: str = "macvlan"
    """How each LB meets the gateway: ``macvlan`` or ``vlan`` made by the LB on ``eth1``, or
    ``veth`` (``eth1`` itself is the external interface)."""
    routing: str = "bgp"
    """``bgp``, ``static-bfd`` or ``static`` (see ``ROUTINGS``)."""
    gateways: int = 1
    """Gateway routers: 1 (``gw``) or 2 (``gw`` and ``gw-2``)."""
    prefix: str = PREFIX
    streams: int = 1
    """Streams of conduit-a: 1 (``stream-a``, port 5000) or 2 (and ``stream-b``, port 6000)."""
    conduits: int = 1
    """Conduits: 1 (``conduit-a``) or 2 (and ``conduit-b``: ``stream-c``, its own VIPs, LBs
    and proxies)."""
    restart: bool = True
    """Supervisors start a role's process again when it dies (``--no-restart``: they do not)."""

    @property
    def families(self) -> tuple[int, ...]:
        return FAMILIES[self.ip_family]

    @property
    def conduit_plans(self) -> tuple[ConduitPlan, ...]:
        """The lab's conduits (conduit-a first)."""
        return CONDUITS[: self.conduits]

    @property
    def stream_plans(self) -> tuple[StreamPlan, ...]:
        """The lab's streams: ``stream-a``; ``stream-b`` with two streams, ``stream-c`` with two
        conduits."""
        wanted = {STREAM_A.name}
        if self.streams == 2:
            wanted.add(STREAM_B.name)
        if self.conduits == 2:
            wanted.add(STREAM_C.name)
        return tuple(s for s in STREAMS if s.name in wanted)

    @property
    def dynamic(self) -> bool:
        """Whether the gateways run BIRD (``bgp``, ``static-bfd``)."""
        return self.routing in DYNAMIC_ROUTINGS

    @property
    def routers(self) -> tuple[int, ...]:
        """The gateway routers' numbers (1: ``gw``, 2: ``gw-2``)."""
        return tuple(range(1, self.gateways + 1))

    def check(self) -> None:
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise PlanError(f"--{name} {value}: must be within {low}..{high}")
        choices = {
            "ip-family": (self.ip_family, tuple(FAMILIES)),
            "mechanism": (self.mechanism, MECHANISMS),
            "lb-mode": (self.lb_mode, LB_MODES),
            "external": (self.external, EXTERNAL_KINDS),
            "routing": (self.routing, ROUTINGS),
        }
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise PlanError(f"--{option} {value!r}: one of {', '.join(allowed)}")
        check_prefix(self.prefix)


def check_prefix(prefix: str) -> None:
    if not re.fullmatch(r"mlab-([a-z0-9]+-)?", prefix) or len(prefix) > 24:
        raise PlanError(
            f"namespace prefix {prefix!r}: must be 'mlab-' or 'mlab-<letters and digits>-'"
        )


# --- names -------------------------------------------------------------------------------------


def lb_host(index: int, conduit: ConduitPlan = CONDUIT_A) -> str:
    """LB ``index`` of ``conduit``: ``lb-N`` (conduit-a), ``lbb-N`` (conduit-b)."""
    return f"{conduit.lb_kind}-{index}"


def node_host(index: int, conduit: ConduitPlan = CONDUIT_A) -> str:
    """Node ``index``'s proxy host for ``conduit``: ``node-N`` (conduit-a), ``nodeb-N``."""
    return f"{conduit.node_kind}-{index}"


def proxy_instance(index: int, conduit: ConduitPlan = CONDUIT_A) -> str:
    """Node ``index``'s proxy of ``conduit``: ``proxy-N`` (conduit-a), ``proxyb-N``."""
    return f"{conduit.proxy_kind}-{index}"


def lb_from_name(name: str) -> tuple[ConduitPlan, int] | None:
    """The conduit and index of an LB named ``lb-N`` or ``lbb-N``; None for anything else."""
    kind, _, number = name.partition("-")
    for conduit in CONDUITS:
        if kind == conduit.lb_kind and number.isdigit():
            return conduit, int(number)
    return None


def proxy_from_name(name: str) -> tuple[ConduitPlan, int] | None:
    """The conduit and node of a proxy named ``proxy-N`` or ``proxyb-N``; None otherwise."""
    kind, _, number = name.partition("-")
    for conduit in CONDUITS:
        if kind == conduit.proxy_kind and number.isdigit():
            return conduit, int(number)
    return None


def target_host(index: int) -> str:
    return f"target-{index}"


def netns_name(prefix: str, host: str) -> str:
    return f"{prefix}{host}"


def lab_netns_pattern(prefix: str) -> re.Pattern[str]:
    """Matches exactly the namespace names a lab with ``prefix`` makes (so that the default
    lab never takes the namespaces of a lab with a longer prefix for its own)."""
    hosts = "|".join(FIXED_HOSTS)
    kinds = "|".join(HOST_KINDS)
    return re.compile(rf"{re.escape(prefix)}(?:{hosts}|(?:{kinds})-\d+)")


def is_lab_netns(prefix: str, name: str) -> bool:
    return lab_netns_pattern(prefix).fullmatch(name) is not None


def port_name(host: str) -> str:
    """The primary bridge's port toward ``host`` (at most 15 characters)."""
    return f"p-{host}"[:15]


def external_port_name(lb_index: int, conduit: ConduitPlan = CONDUIT_A) -> str:
    """The gateway bridge's port toward LB ``lb_index`` (of ``conduit``)."""
    return f"x-{lb_host(lb_index, conduit)}"


def external_interface(external: str) -> str:
    """The LB's interface toward the gateway: the one it makes, or ``eth1`` itself."""
    return "eth1" if external == "veth" else "ext0"


def gateway_host(router: int) -> str:
    """Gateway router ``router``'s host: ``gw`` (1, also the traffic client) or ``gw-N``."""
    return "gw" if router == 1 else f"gw-{router}"


def gateway_instance(router: int) -> str:
    """The name of gateway router ``router``'s BIRD: ``bird-gw``, ``bird-gw-2``."""
    return f"bird-{gateway_host(router)}"


def gateway_port_name(router: int) -> str:
    """The bridge ``ext``'s port toward gateway router ``router`` (2 and up)."""
    return f"x-{gateway_host(router)}"


def gateway_interface(external: str, router: int) -> str:
    """Gateway router ``router``'s interface on the external network: the bridge ``ext`` in
    ``gw``, ``eth1`` (its port) in ``gw-N``; their VLAN 100 with VLAN external interfaces."""
    base = "ext" if router == 1 else "eth1"
    return f"{base}.{VLAN_ID}" if external == "vlan" else base


def gateway_router_from_name(name: str) -> int | None:
    """The router number a user means by ``gateway``, ``gateway-N``, ``gw``, ``gw-N``,
    ``bird-gw`` or ``bird-gw-N``; None for anything else."""
    match = re.fullmatch(r"(?:gateway|(?:bird-)?gw)(?:-(\d+))?", name)
    if match is None:
        return None
    return int(match.group(1)) if match.group(1) else 1


# --- addresses ---------------------------------------------------------------------------------

_PRIMARY_HOSTS = {
    "nsp": (0, 2),
    "ipam": (0, 3),
    "lb": (1, None),
    "node": (2, None),
    "lbb": (4, None),
    "nodeb": (5, None),
}


def primary_address(kind: str, index: int = 0) -> str:
    """The primary-network address of ``nsp``, ``ipam``, or ``lb``/``node``/``target`` N
    (``lbb``/``nodeb`` N: conduit-b's LB and node N's proxy of conduit-b)."""
    if kind == "target":
        third, fourth = 3, index
    else:
        third, fixed = _PRIMARY_HOSTS[kind]
        fourth = fixed if fixed is not None else index
    if not 1 <= fourth <= 254:
        raise PlanError(f"{kind} {index}: no primary address")
    return str(PRIMARY.network_address + (third << 8) + fourth)


def primary_cidr(kind: str, index: int = 0) -> str:
    return f"{primary_address(kind, index)}/{PRIMARY.prefixlen}"


def external_address(family: int, lb_index: int, conduit: ConduitPlan = CONDUIT_A) -> str:
    """LB ``lb_index``'s (of ``conduit``) external address (CIDR); index 0 is the gateway."""
    network = EXTERNAL[family]
    host = 1 if lb_index == 0 else conduit.external_base + lb_index
    return f"{network.network_address + host}/{network.prefixlen}"


def gateway_address(family: int) -> str:
    return external_address(family, 0).split("/")[0]


def gateway_router_cidr(family: int, router: int) -> str:
    """Gateway router ``router``'s address on the external network (1: 192.0.2.1/24,
    fd00:e::1/64; 2: 192.0.2.2/24, fd00:e::2/64)."""
    network = EXTERNAL[family]
    return f"{network.network_address + router}/{network.prefixlen}"


def gateway_router_address(family: int, router: int) -> str:
    return gateway_router_cidr(family, router).split("/")[0]


def lb_of_external_address(address: str) -> int | None:
    """The LB index whose external address ``address`` is (without prefix length); None when
    it is no LB's."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    network = EXTERNAL[ip.version]
    if ip not in network:
        return None
    index = int(ip) - int(network.network_address) - 10
    low, high = LIMITS["lbs"]
    return index if low <= index <= high else None


def lb_of_address(address: str) -> tuple[ConduitPlan, int] | None:
    """The conduit and index of the LB whose external address ``address`` is, of either
    conduit; None when it is no LB's."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    network = EXTERNAL[ip.version]
    if ip not in network:
        return None
    low, high = LIMITS["lbs"]
    for conduit in CONDUITS:
        index = int(ip) - int(network.network_address) - conduit.external_base
        if low <= index <= high:
            return conduit, index
    return None


def lb_name_of_address(address: str) -> str | None:
    """``lb-N`` or ``lbb-N`` for an LB's external address; None for any other."""
    found = lb_of_address(address)
    return lb_host(found[1], found[0]) if found is not None else None


def vip_cidr(family: int, conduit: ConduitPlan = CONDUIT_A) -> str:
    return f"{conduit.vips[family]}/{32 if family == 4 else 128}"


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def nsp_address() -> str:
    return hostport(primary_address("nsp"), NSP_PORT)


def ipam_address() -> str:
    return hostport(primary_address("ipam"), IPAM_PORT)


def vip_endpoints(families: Iterable[int], stream: StreamPlan = STREAM_A) -> list[str]:
    """``VIP:port`` of each family, as the traffic client takes them (of ``stream``: its
    conduit's VIPs and its flow's port)."""
    return [hostport(stream.conduit.vips[f], stream.port) for f in sorted(families)]


# --- which target opens which stream -------------------------------------------------------------


def target_streams(spec: LabSpec, index: int) -> tuple[StreamPlan, ...]:
    """The streams the lab opens on target ``index`` through its TAPA.

    One stream, one conduit: ``stream-a`` on every target. With two streams, ``stream-b`` on
    the even targets and ``stream-a`` on all but every fourth (4 targets: 1 a, 2 a+b, 3 a, 4
    b), so that each stream has targets of its own and some have both. With two conduits,
    ``stream-c`` (conduit-b) on the odd targets too (1 and 3 are in both conduits).
    """
    out = []
    for stream in spec.stream_plans:
        if stream is STREAM_A:
            chosen = spec.streams == 1 or index % 4 != 0
        elif stream is STREAM_B:
            chosen = index % 2 == 0
        else:
            chosen = index % 2 == 1
        if chosen:
            out.append(stream)
    return tuple(out)


def stream_targets(spec: LabSpec, stream: StreamPlan, indexes: Iterable[int]) -> list[int]:
    """Which of the target ``indexes`` the lab opens ``stream`` on."""
    return sorted(i for i in set(indexes) if stream in target_streams(spec, i))


def resolve_stream(text: str) -> tuple[str, str]:
    """A stream as a user names it to ``lab tap``: a stream of the lab (``stream-b``), or
    ``conduit/stream`` for any other; (conduit, stream)."""
    conduit, slash, name = text.rpartition("/")
    if slash:
        if not conduit or not name:
            raise PlanError(f"stream {text!r}: give STREAM or CONDUIT/STREAM")
        return conduit, name
    return stream_plan(text).conduit.name, text


@dataclass(frozen=True)
class TableCheck:
    """What an LB should have, and whether it has it."""

    want: Mapping[str, int]
    """Per stream of the LB's conduit, how many targets its table should hold."""
    have: Mapping[str, int]
    """Per stream, how many it holds."""
    routable: int
    """``fwmark`` rules it has in the family with the fewest (one per target and stream)."""

    @property
    def done(self) -> bool:
        return all(self.have.get(s, 0) == n for s, n in self.want.items()) and self.routable == sum(
            self.want.values()
        )

    @property
    def entries(self) -> int:
        return sum(self.have.get(s, 0) for s in self.want)

    def text(self, lb: str) -> str:
        return f"{lb}:{self.entries}/{self.routable}"


def table_want(
    spec: LabSpec, conduit: ConduitPlan, open_streams: Mapping[int, Iterable[tuple[str, str]]]
) -> dict[str, int]:
    """Per stream of ``conduit`` in the lab, how many targets an LB of it should hold: from
    each running target's open streams (``(conduit, stream)`` as its TAPA lists them). A stream
    no target has open is there with 0; a stream the lab does not define (a target may open
    any, it stays ``UNDEFINED``) is not."""
    want = {s.name: 0 for s in spec.stream_plans if s.conduit is conduit}
    for streams in open_streams.values():
        for conduit_name, stream in set(streams):
            if conduit_name == conduit.name and stream in want:
                want[stream] += 1
    return want


# --- placement and scaling ---------------------------------------------------------------------


def place_target(placement: Mapping[int, int], nodes: Sequence[int]) -> int:
    """The node for one more target: the one with the fewest targets, the first on a tie."""
    if not nodes:
        raise PlanError("no node to place a target on")
    load = {node: 0 for node in nodes}
    for node in placement.values():
        if node in load:
            load[node] += 1
    return min(nodes, key=lambda node: (load[node], node))


def place_targets(
    placement: Mapping[int, int], new: Iterable[int], nodes: Sequence[int]
) -> dict[int, int]:
    """Nodes for the ``new`` target indexes, one after the other (so round robin from an even
    start): target index -> node index."""
    current = dict(placement)
    chosen = {}
    for index in sorted(new):
        node = place_target(current, nodes)
        current[index] = chosen[index] = node
    return chosen


@dataclass(frozen=True)
class ScalePlan:
    """Which instances go and which come for one kind of instance."""

    remove: tuple[int, ...]
    """Running instances to stop, newest (highest index) first."""
    clear: tuple[int, ...]
    """Dead instances to clear away (their index is free again)."""
    add: tuple[int, ...]
    """New instances, lowest free index first."""

    @property
    def empty(self) -> bool:
        return not (self.remove or self.clear or self.add)


def scale_plan(running: Iterable[int], dead: Iterable[int], want: int) -> ScalePlan:
    """From the ``running`` and ``dead`` instance indexes to ``want`` running ones.

    Dead instances are cleared and replaced; extra running ones are removed newest first; new
    ones take the lowest free indexes.
    """
    if want < 0:
        raise PlanError(f"cannot scale to {want}")
    alive = sorted(set(running))
    gone = sorted(set(dead) - set(alive))
    remove = tuple(sorted(alive, reverse=True)[: max(0, len(alive) - want)])
    kept = set(alive) - set(remove)
    add: list[int] = []
    candidate = 1
    while len(kept) + len(add) < want:
        if candidate not in kept:
            add.append(candidate)
        candidate += 1
    return ScalePlan(remove=remove, clear=tuple(gone), add=tuple(add))


# --- the gateway -------------------------------------------------------------------------------


def gateway_next_hops(
    lbs: Iterable[int], family: int, conduit: ConduitPlan = CONDUIT_A
) -> tuple[str, ...]:
    """The LBs' external addresses the gateway routes the VIP of ``family`` (of ``conduit``)
    over."""
    return tuple(external_address(family, i, conduit).split("/")[0] for i in sorted(set(lbs)))


def gateway_route(lbs: Iterable[int], family: int, conduit: ConduitPlan = CONDUIT_A) -> list[str]:
    """``ip`` arguments that make the gateway's route to the VIP of ``family`` (of
    ``conduit``) go over exactly ``lbs`` (equal-cost multipath), or delete it when there is
    none."""
    hops = gateway_next_hops(lbs, family, conduit)
    head = [f"-{family}", "route"]
    vip = vip_cidr(family, conduit)
    if not hops:
        return [*head, "del", vip]
    if len(hops) == 1:
        return [*head, "replace", vip, "via", hops[0]]
    via = [word for hop in hops for word in ("nexthop", "via", hop)]
    return [*head, "replace", vip, *via]


def gateway_bird_config(spec: LabSpec, router: int) -> str:
    """BIRD 2's configuration of gateway router ``router`` (1: ``gw``, 2: ``gw-2``) in the
    ``bgp`` or ``static-bfd`` routing of ``spec``.

    Both: BFD on the external interface (100 ms x 3), and per family of the lab a kernel
    protocol that installs, with ``merge paths`` (ECMP over the LBs), only what the LBs are
    the next hops of, importing nothing from the kernel.

    - ``bgp``: passive BGP with dynamic neighbours from the external network (an LB, AS 8103,
      connects to port 10179; the gateway is AS 4248829953), BFD and a hold time of 3 s; the
      VIP routes the LBs announce go to the kernel; a default route (``unreachable`` here, so
      never in the gateway's own table) goes to the LBs only, with the gateway as next hop.
    - ``static-bfd``: one multipath route per VIP over every LB address there may be (all of
      ``LIMITS["lbs"]`` of the VIP's conduit, so that scaling never changes the gateway), each
      next hop supervised by BFD: an LB is a next hop while its BFD session is up.
    """
    if not spec.dynamic:
        raise PlanError(f"routing {spec.routing!r} runs no BIRD on the gateways")
    iface = gateway_interface(spec.external, router)
    host = gateway_host(router)
    lines = [
        f"# {gateway_instance(router)}: the lab's gateway router {host}, {spec.routing} routing",
        "log stderr all;",
        # session state changes and why (BFD down, connection closed, hold timer expired)
        "debug protocols { states, events };",
        f"router id {gateway_router_address(4, router)};",
        "timeformat protocol iso long;",
        "",
        "protocol device {",
        "}",
        "",
        "protocol bfd {",
        f'  interface "{iface}" {{',
        f"    min rx interval {BFD_MIN_RX} ms;",
        f"    min tx interval {BFD_MIN_TX} ms;",
        f"    multiplier {BFD_MULTIPLIER};",
        "  };",
        "}",
    ]
    for family in spec.families:
        channel = f"ipv{family}"
        learned = "source = RTS_BGP" if spec.routing == "bgp" else f'proto = "VIP{family}"'
        lines += [
            "",
            f"protocol kernel K{family} {{",
            f"  {channel} {{ import none; export where {learned}; }};",
            "  merge paths on;",
            "}",
        ]
        if spec.routing == "bgp":
            default = "0.0.0.0/0" if family == 4 else "::/0"
            local = gateway_router_address(family, router)
            lines += [
                "",
                f"protocol static DEF{family} {{",
                f"  {channel};",
                f"  route {default} unreachable;",
                "}",
                "",
                f"template bgp LB{family} {{",
                f"  local {local} port {BGP_PORT} as {GATEWAY_ASN};",
                "  passive on;",
                "  bfd on;",
                f"  hold time {HOLD_TIME};",
                # after an error (an LB crashed, BFD down) BIRD waits 60 s or more before it
                # takes a session from that address again: an LB replaced must rejoin at once
                "  error wait time 1, 10;",
                "  direct;",
                f"  {channel} {{",
                "    import all;",
                f'    export where proto = "DEF{family}";',
                "    next hop self;",
                "  };",
                f'  dynamic name "lb{family}_";',
                "}",
                "",
                f"protocol bgp LBS{family} from LB{family} {{",
                f"  neighbor range {EXTERNAL[family]} port {BGP_PORT} as {LB_ASN};",
                "}",
            ]
        else:
            low, high = LIMITS["lbs"]
            lines += ["", f"protocol static VIP{family} {{", f"  {channel};"]
            for conduit in spec.conduit_plans:
                hops = gateway_next_hops(range(low, high + 1), family, conduit)
                lines += [
                    f"  route {vip_cidr(family, conduit)}",
                    *(f"    via {hop} bfd" for hop in hops),
                    "  ;",
                ]
            lines.append("}")
    return "\n".join(lines) + "\n"


def vip_next_hop_lbs(
    nexthops: Iterable[str], conduit: ConduitPlan = CONDUIT_A
) -> tuple[list[int], list[str]]:
    """The indexes of ``conduit``'s LBs a route's next hops are the external addresses of, and
    the next hops that are not (another conduit's LB is one of those)."""
    lbs: set[int] = set()
    others: list[str] = []
    for hop in nexthops:
        found = lb_of_address(hop)
        if found is None or found[0] is not conduit:
            others.append(hop)
        else:
            lbs.add(found[1])
    return sorted(lbs), others


# --- the NSP's configuration ------------------------------------------------------------------


def gateway_name(family: int, router: int = 1) -> str:
    """The name of gateway router ``router`` for ``family`` in the NSP's configuration:
    ``gateway-v4``, ``gateway-v6``, ``gateway-2-v4``..."""
    return f"gateway-v{family}" if router == 1 else f"gateway-{router}-v{family}"


def nsp_gateway(family: int, router: int, routing: str) -> dict[str, Any]:
    """One item of ``gateways`` (Meridio's format): the gateway router's address of
    ``family``, with BFD, and BGP (Meridio's ports and AS numbers, written out) or static."""
    item: dict[str, Any] = {
        "name": gateway_name(family, router),
        "address": gateway_router_address(family, router),
        "ip-family": f"ipv{family}",
        "protocol": "bgp" if routing == "bgp" else "static",
        "bfd": True,
        "min-tx": BFD_MIN_TX,
        "min-rx": BFD_MIN_RX,
        "multiplier": BFD_MULTIPLIER,
    }
    if routing == "bgp":
        item |= {
            "hold-time": HOLD_TIME,
            "local-asn": LB_ASN,
            "remote-asn": GATEWAY_ASN,
            "local-port": BGP_PORT,
            "remote-port": BGP_PORT,
        }
    item["trench"] = TRENCH
    return item


def nsp_configuration(
    families: Iterable[int],
    *,
    routing: str = "static",
    gateways: int = 1,
    streams: int = 1,
    conduits: int = 1,
) -> dict[str, Any]:
    """The trench in Meridio's configuration format: conduit ``conduit-a`` with stream
    ``stream-a`` and its flow (TCP, UDP and SCTP to port 5000 of the VIPs of the lab's
    families); with two ``streams`` also ``stream-b`` (port 6000 of the same VIPs); with two
    ``conduits`` also ``conduit-b`` with ``stream-c`` (port 5000 of VIPs of its own). With
    ``bgp`` or ``static-bfd`` routing also an attractor per conduit (``attractor-a``,
    ``attractor-b``) with its VIPs and a gateway per family and gateway router (the LBs take
    both from it)."""
    fams = sorted(set(families))
    spec = LabSpec(ip_family=_family_name(fams), streams=streams, conduits=conduits)
    vip_names: dict[str, list[str]] = {}
    vips = []
    for conduit in spec.conduit_plans:
        suffix = "" if conduit is CONDUIT_A else f"-{conduit.name.rpartition('-')[2]}"
        names = [f"vip{f}{suffix}" for f in fams]
        vip_names[conduit.name] = names
        vips += [
            {"name": n, "address": vip_cidr(f, conduit), "trench": TRENCH}
            for n, f in zip(names, fams, strict=True)
        ]
    config: dict[str, Any] = {
        "trench": {"name": TRENCH},
        "conduits": {"items": [{"name": c.name, "trench": TRENCH} for c in spec.conduit_plans]},
        "streams": {
            "items": [
                {"name": s.name, "conduit": s.conduit.name, "max-targets": MAX_TARGETS}
                for s in spec.stream_plans
            ]
        },
        "vips": {"items": vips},
        "flows": {
            "items": [
                {
                    "name": s.flow,
                    "stream": s.name,
                    "vips": vip_names[s.conduit.name],
                    "protocols": ["tcp", "udp", "sctp"],
                    "destination-port-ranges": [str(s.port)],
                }
                for s in spec.stream_plans
            ]
        },
    }
    if routing in DYNAMIC_ROUTINGS:
        items = [
            nsp_gateway(family, router, routing)
            for router in range(1, gateways + 1)
            for family in fams
        ]
        config["gateways"] = {"items": items}
        config["attractors"] = {
            "items": [
                {
                    "name": c.attractor,
                    "vips": vip_names[c.name],
                    "gateways": [g["name"] for g in items],
                    "trench": TRENCH,
                }
                for c in spec.conduit_plans
            ]
        }
    return config


def _family_name(families: Sequence[int]) -> str:
    for name, fams in FAMILIES.items():
        if tuple(families) == fams:
            return name
    raise PlanError(f"no IP family setting for {families}")


def spec_nsp_configuration(spec: LabSpec) -> dict[str, Any]:
    """``nsp_configuration`` of a lab."""
    return nsp_configuration(
        spec.families,
        routing=spec.routing,
        gateways=spec.gateways,
        streams=spec.streams,
        conduits=spec.conduits,
    )


# --- command lines -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One process of the lab: a role daemon or a traffic server."""

    name: str
    """``nsp``, ``ipam``, ``lb-N``, ``proxy-N``, ``target-N`` or ``server-N``."""
    role: str
    """The meridiod role, or ``server`` for the traffic server."""
    host: str
    """Where it runs: the namespace is ``<prefix><host>``."""
    index: int = 0


def role_dir(state_dir: Path, name: str) -> Path:
    return state_dir / name


def run_dir(state_dir: Path, name: str) -> Path:
    return role_dir(state_dir, name) / "run"


def log_path(state_dir: Path, name: str) -> Path:
    return role_dir(state_dir, name) / f"{name}.log"


def health_socket(state_dir: Path, name: str) -> Path:
    return run_dir(state_dir, name) / "health.sock"


def lb_socket(state_dir: Path, name: str) -> Path:
    return run_dir(state_dir, name) / "lb.sock"


def tap_socket(state_dir: Path, name: str) -> Path:
    """Target ``name``'s TAPA socket (``ambassador.v1.Tap``)."""
    return run_dir(state_dir, name) / "ambassador.sock"


def target_state_file(state_dir: Path, name: str) -> Path:
    """What target ``name`` keeps across restarts (its open streams, identifiers, ...)."""
    return run_dir(state_dir, name) / "target-state.json"


def nsp_config_path(state_dir: Path) -> Path:
    return role_dir(state_dir, "nsp") / "meridio-configuration.yaml"


def bird_config_path(state_dir: Path, name: str) -> Path:
    return role_dir(state_dir, name) / "bird.conf"


def bird_socket(state_dir: Path, name: str) -> Path:
    """A BIRD's control socket (``birdc -s``)."""
    return run_dir(state_dir, name) / "bird.ctl"


def bird_pid_path(state_dir: Path, name: str) -> Path:
    return run_dir(state_dir, name) / "bird.pid"


def pki_dir(state_dir: Path) -> Path:
    """The lab's throwaway CA (``ca.crt``, ``ca.key``) and a directory of credentials per
    instance (docs/security.md)."""
    return state_dir / "pki"


def tls_dir(state_dir: Path, name: str) -> Path:
    """Instance ``name``'s certificate, key and trust bundle: its ``--tls-dir``."""
    return pki_dir(state_dir) / name


def _common(state_dir: Path, name: str) -> list[str]:
    return [
        f"--instance={name}",
        f"--run-dir={run_dir(state_dir, name)}",
        "--log-format=json",
        f"--tls-dir={tls_dir(state_dir, name)}",
    ]


def nsp_args(state_dir: Path) -> list[str]:
    return [
        "--role=nsp",
        *_common(state_dir, "nsp"),
        f"--listen={nsp_address()}",
        f"--database={role_dir(state_dir, 'nsp') / 'nsp.db'}",
        f"--configuration-file={nsp_config_path(state_dir)}",
        f"--trench={TRENCH}",
    ]


def ipam_args(state_dir: Path, families: Iterable[int]) -> list[str]:
    fams = set(families)
    return [
        "--role=ipam",
        *_common(state_dir, "ipam"),
        f"--listen={ipam_address()}",
        f"--database={role_dir(state_dir, 'ipam') / 'ipam.db'}",
        f"--trench={TRENCH}",
        f"--prefix-ipv4={IPAM_PREFIXES[4] if 4 in fams else ''}",
        f"--prefix-ipv6={IPAM_PREFIXES[6] if 6 in fams else ''}",
    ]


def gateway_bird_args(state_dir: Path, router: int, bird: str = "bird") -> list[str]:
    """BIRD of gateway router ``router``, in the foreground (``-f``: the lab supervises it),
    with its own configuration, control socket and pid file."""
    name = gateway_instance(router)
    return [
        bird,
        "-f",
        "-c",
        str(bird_config_path(state_dir, name)),
        "-s",
        str(bird_socket(state_dir, name)),
        "-P",
        str(bird_pid_path(state_dir, name)),
    ]


def lb_args(
    state_dir: Path, spec: LabSpec, index: int, conduit: ConduitPlan = CONDUIT_A
) -> list[str]:
    """The command line of LB ``index`` of ``conduit``: with ``bgp`` or ``static-bfd`` routing
    it takes its gateways and VIPs from the NSP's attractor of its conduit; with ``static`` it
    is given the gateways' addresses."""
    name = lb_host(index, conduit)
    addresses = ",".join(external_address(f, index, conduit) for f in spec.families)
    external = [f"--external-addresses={addresses}"]
    if spec.dynamic:
        external.append(f"--attractor={conduit.attractor}")
    else:
        gateways = [gateway_router_address(f, r) for r in spec.routers for f in spec.families]
        external.append(f"--gateways={','.join(gateways)}")
    if spec.external == "veth":
        external.append("--external-interface=eth1")
    else:
        external += ["--external-parent=eth1", f"--external-kind={spec.external}"]
        if spec.external == "vlan":
            external.append(f"--external-vlan-id={VLAN_ID}")
    return [
        "--role=lb",
        *_common(state_dir, name),
        f"--nsp={nsp_address()}",
        f"--trench={TRENCH}",
        f"--conduit={conduit.name}",
        f"--mode={spec.lb_mode}",
        f"--connect-listen={hostport(primary_address(conduit.lb_kind, index), LB_CONNECT_PORT)}",
        # several LBs behind one gateway: replies may return through another LB
        *(["--untrack-syn"] if spec.lb_mode == "first-packet" else []),
        *external,
    ]


def proxy_address(node: int, conduit: ConduitPlan = CONDUIT_A) -> str:
    """Where targets reach node ``node``'s proxy of ``conduit``."""
    return hostport(primary_address(conduit.node_kind, node), PROXY_CONNECT_PORT)


def proxy_args(
    state_dir: Path, spec: LabSpec, index: int, conduit: ConduitPlan = CONDUIT_A
) -> list[str]:
    """Node ``index``'s proxy of ``conduit``. The proxies of one node share its name (the
    IPAM gives a node prefix per node and conduit), so a target tells both the same node."""
    name = proxy_instance(index, conduit)
    return [
        "--role=proxy",
        *_common(state_dir, name),
        f"--node={node_host(index)}",
        f"--nsp={nsp_address()}",
        f"--ipam={ipam_address()}",
        f"--trench={TRENCH}",
        f"--conduit={conduit.name}",
        f"--connect-listen={proxy_address(index, conduit)}",
        f"--mechanism={spec.mechanism}",
        f"--ip-family={spec.ip_family}",
    ]


def target_args(state_dir: Path, spec: LabSpec, index: int, node: int) -> list[str]:
    """The target's sidecar: TAPA on its socket, no stream of its own (the lab opens them
    through TAPA), the node's proxy of each conduit of the lab."""
    name = target_host(index)
    proxies = ",".join(f"{c.name}={proxy_address(node, c)}" for c in spec.conduit_plans)
    return [
        "--role=target",
        *_common(state_dir, name),
        f"--socket={tap_socket(state_dir, name)}",
        f"--node={node_host(node)}",
        f"--proxies={proxies}",
        f"--nsp={nsp_address()}",
        f"--mechanism={spec.mechanism}",
        "--drain-time=1",
    ]


def server_ports(spec: LabSpec) -> list[int]:
    """The ports the traffic servers listen on: every stream's."""
    return sorted({s.port for s in spec.stream_plans})


def server_args(index: int, ports: Iterable[int] = (PORT,)) -> list[str]:
    """The traffic server beside target ``index`` (``meridioctl traffic server``)."""
    addresses = [word for port in sorted(set(ports)) for word in ("--address", f"[::]:{port}")]
    return ["server", "--name", target_host(index), *addresses]


# --- supervision -------------------------------------------------------------------------------

SUPERVISED_ROLES = ("nsp", "ipam", "lb", "proxy", "target", "server")
"""The lab's processes that run under a supervisor (``meridio.lab.supervise``), as a pod's
containers run under the kubelet: every role daemon and the targets' traffic servers (the
applications). The gateway routers' BIRD is the world outside the cluster: not supervised."""
RESTART_DELAY_MIN = 0.2
RESTART_DELAY_MAX = 10.0
RESTART_RESET_AFTER = 10.0
"""A child that ran at least this long (seconds) before it died is started again after the
shortest pause, as if it had never died before."""


def restart_delay(previous: float | None, ran: float) -> float:
    """How long a supervisor waits before it starts its child again, which ran ``ran`` seconds
    before it ended; ``previous`` is the pause before that run (None: there was none).

    0.2 s, then twice the previous pause while the child keeps dying young, at most 10 s (a
    kubelet's CrashLoopBackOff, shortened); a child that ran 10 s or more starts afresh at
    0.2 s.
    """
    if previous is None or ran >= RESTART_RESET_AFTER:
        return RESTART_DELAY_MIN
    return min(max(previous, RESTART_DELAY_MIN) * 2, RESTART_DELAY_MAX)


def supervise_status_path(state_dir: Path, name: str) -> Path:
    """Where the supervisor of instance ``name`` keeps its status (``meridio.lab.supervise``)."""
    return role_dir(state_dir, name) / "supervise.json"


def hold_path(state_dir: Path) -> Path:
    """While this file exists the lab's supervisors start nothing again (``down`` makes it
    first)."""
    return state_dir / "down"


def supervise_args(state_dir: Path, name: str, *, restart: bool = True) -> list[str]:
    """The arguments of instance ``name``'s supervisor, up to the ``--`` before the program it
    runs."""
    return [
        "--status",
        str(supervise_status_path(state_dir, name)),
        "--name",
        name,
        "--hold",
        str(hold_path(state_dir)),
        *([] if restart else ["--no-restart"]),
        "--",
    ]


# --- chaos -------------------------------------------------------------------------------------

CHAOS_KINDS = ("nsp", "ipam", "lb", "proxy", "target")
"""What ``lab chaos`` kills by default: a role's process (SIGKILL), which its supervisor
starts again."""
CHAOS_KIND_CHOICES = (*CHAOS_KINDS, "server")
"""``server``: a target's application (its traffic server) crashes; its connections break."""
CHAOS_GOALS = {
    "nsp": "no connection lost, no connect failed",
    "ipam": "no connection lost, no connect failed",
    "lb": "no connection lost; new connects fail for under 1 s",
    "target": "only the killed target's connections lost",
    "server": "only the killed target's connections lost",
}
"""The goals ``lab chaos`` judges each kind of kill by (issue 15); proxies' are reported."""
LB_FAILOVER_LIMIT = 1.0
"""An LB kill may fail new connections for less than this long (seconds, from the first failed
attempt's start to the last one's)."""


def chaos_kind(name: str) -> str | None:
    """The kind of a lab instance for ``lab chaos``: ``nsp``, ``ipam``, ``lb`` (``lb-N``,
    ``lbb-N``), ``proxy`` (``proxy-N``, ``proxyb-N``), ``target``, ``server``; None for any
    other (the gateways)."""
    if name in ("nsp", "ipam"):
        return name
    if lb_from_name(name) is not None:
        return "lb"
    if proxy_from_name(name) is not None:
        return "proxy"
    kind, _, number = name.partition("-")
    if kind in ("target", "server") and number.isdigit():
        return kind
    return None


def parse_chaos_kinds(text: str) -> tuple[str, ...]:
    """``--kinds nsp,lb``: the kinds, in the order of ``CHAOS_KIND_CHOICES``."""
    asked = {k.strip() for k in text.split(",") if k.strip()}
    unknown = sorted(asked - set(CHAOS_KIND_CHOICES))
    if unknown or not asked:
        raise PlanError(
            f"--kinds {text!r}: a comma-separated list of {', '.join(CHAOS_KIND_CHOICES)}"
        )
    return tuple(k for k in CHAOS_KIND_CHOICES if k in asked)


def chaos_pick(
    rand: Any, candidates: Iterable[str], kinds: Sequence[str]
) -> tuple[str, str] | None:
    """The next victim of ``lab chaos``: a kind drawn evenly from ``kinds`` that has a
    candidate, then one of its candidates, evenly (so an NSP dies as often as all the targets
    together). ``rand`` is a ``random.Random``. (kind, name); None when nothing can be
    killed."""
    by_kind: dict[str, list[str]] = {}
    for name in sorted(set(candidates)):
        kind = chaos_kind(name)
        if kind is not None and kind in kinds:
            by_kind.setdefault(kind, []).append(name)
    present = [k for k in kinds if k in by_kind]
    if not present:
        return None
    kind = present[rand.randrange(len(present))]
    names = by_kind[kind]
    return kind, names[rand.randrange(len(names))]


@dataclass(frozen=True)
class ChaosKill:
    """One kill of ``lab chaos``: when (seconds since the epoch), what, and how long until
    the instance was ready again (``back``), the whole lab was (``whole``) and every kernel
    held again what it held before (``settled``); seconds after the kill, None when it was
    not within the time allowed (or, for ``settled``, not looked at)."""

    at: float
    kind: str
    name: str
    back: float | None = None
    whole: float | None = None
    settled: float | None = None

    @property
    def recovered(self) -> float | None:
        """When the lab was itself again after this kill (seconds since the epoch)."""
        end = self.settled if self.settled is not None else self.whole
        return None if end is None else self.at + end


@dataclass(frozen=True)
class ChaosLoss:
    """A long-lived connection lost (``at``: when it broke, seconds since the epoch; ``host``:
    the target that served it), or a new connection that failed (``host`` None)."""

    at: float
    host: str | None = None
    error: str = ""


def broke_at(started: float, connection: Mapping[str, Any], timeout: float) -> float | None:
    """When a lost connection of a traffic client's report broke (seconds since the epoch;
    ``started``: the run's start): its end, less the timeout when it ended for want of a reply
    (it broke when the first unanswered packet left). None when it was not lost."""
    if connection.get("state") != "lost" or connection.get("ended") is None:
        return None
    ended = started + float(connection["ended"])
    error = str(connection.get("error") or "")
    return ended - timeout if error.startswith("no reply") else ended


ATTRIBUTION_SLACK = 0.1
"""Seconds a loss may seem to come before the kill that caused it (the traffic tools' clocks
start a moment after the times their reports count from)."""
RECOVERED_GRACE = 1.0
"""Seconds after the lab was itself again during which a loss is still put down to the kill."""


def attribute(
    kills: Sequence[ChaosKill],
    losses: Iterable[ChaosLoss],
    slack: float = ATTRIBUTION_SLACK,
    grace: float = RECOVERED_GRACE,
) -> tuple[dict[int, list[ChaosLoss]], list[ChaosLoss]]:
    """Each loss to the kill it followed: the last kill before it (``slack`` seconds of
    leeway), unless the lab had been itself again (``ChaosKill.recovered``) for more than
    ``grace`` seconds by then. Per kill (its index in ``kills``) the losses it caused, and
    those no kill explains: before the first kill, or while the lab was whole."""
    order = sorted(range(len(kills)), key=lambda i: kills[i].at)
    per_kill: dict[int, list[ChaosLoss]] = {i: [] for i in order}
    unexplained: list[ChaosLoss] = []
    for loss in sorted(losses, key=lambda x: x.at):
        blamed = [i for i in order if kills[i].at <= loss.at + slack]
        if not blamed:
            unexplained.append(loss)
            continue
        recovered = kills[blamed[-1]].recovered
        if recovered is not None and loss.at > recovered + grace:
            unexplained.append(loss)
        else:
            per_kill[blamed[-1]].append(loss)
    return per_kill, unexplained


def target_of(name: str) -> str | None:
    """The target a kill of ``name`` takes connections from: ``target-N`` for ``target-N`` and
    ``server-N``; None for anything else."""
    kind, _, number = name.partition("-")
    return f"target-{number}" if kind in ("target", "server") and number.isdigit() else None


def failure_span(failures: Sequence[ChaosLoss]) -> float:
    """From the first failed new connection's start to the last one's (0 for one or none)."""
    if len(failures) < 2:
        return 0.0
    times = [f.at for f in failures]
    return max(times) - min(times)


@dataclass(frozen=True)
class ChaosKindFigures:
    """What the kills of one kind cost."""

    kind: str
    kills: int
    lost: int
    """Long-lived connections lost after a kill of this kind."""
    lost_elsewhere: int
    """Of those, connections to another target than the one killed (target and server kills;
    every loss for the other kinds)."""
    failed_connects: int
    """New connections (the probe's) and reconnects (the client's) that failed."""
    failure_span: float
    """The longest span of failed new connections after one kill."""
    back_max: float | None
    """The longest time until the killed instance was ready again."""
    whole_max: float | None
    """The longest time until the whole lab was ready again."""
    not_recovered: int
    """Kills after which the lab was not whole again within the time allowed."""


def chaos_figures(
    kills: Sequence[ChaosKill],
    lost: Mapping[int, Sequence[ChaosLoss]],
    failed: Mapping[int, Sequence[ChaosLoss]],
    kinds: Sequence[str],
) -> list[ChaosKindFigures]:
    """Per kind (in the order of ``kinds``): kills and what they cost (``lost`` and ``failed``
    per kill index, from ``attribute``)."""
    out = []
    for kind in kinds:
        mine = [i for i, k in enumerate(kills) if k.kind == kind]
        lost_here = [loss for i in mine for loss in lost.get(i, ())]
        elsewhere = sum(
            1
            for i in mine
            for loss in lost.get(i, ())
            if target_of(kills[i].name) is None or loss.host != target_of(kills[i].name)
        )
        backs = [b for i in mine if (b := kills[i].back) is not None]
        wholes = [w for i in mine if (w := kills[i].whole) is not None]
        out.append(
            ChaosKindFigures(
                kind=kind,
                kills=len(mine),
                lost=len(lost_here),
                lost_elsewhere=elsewhere,
                failed_connects=sum(len(failed.get(i, ())) for i in mine),
                failure_span=max((failure_span(failed.get(i, ())) for i in mine), default=0.0),
                back_max=max(backs) if backs else None,
                whole_max=max(wholes) if wholes else None,
                not_recovered=sum(1 for i in mine if kills[i].whole is None),
            )
        )
    return out


def chaos_verdict(figures: Iterable[ChaosKindFigures]) -> list[str]:
    """What missed the goals (``CHAOS_GOALS``); empty when every goal was met. Proxy kills
    have no goal of their own here: they are reported."""
    missed = []
    for f in figures:
        if f.not_recovered:
            missed.append(f"{f.kind}: the lab was not whole again after {f.not_recovered} kill(s)")
        if f.kind in ("nsp", "ipam"):
            if f.lost:
                missed.append(f"{f.kind}: {f.lost} connection(s) lost")
            if f.failed_connects:
                missed.append(f"{f.kind}: {f.failed_connects} connect(s) failed")
        elif f.kind == "lb":
            if f.lost:
                missed.append(f"lb: {f.lost} connection(s) lost")
            if f.failure_span >= LB_FAILOVER_LIMIT:
                missed.append(
                    f"lb: new connects failed for {f.failure_span:.2f} s "
                    f"(at most {LB_FAILOVER_LIMIT:g} s)"
                )
        elif f.kind in ("target", "server") and f.lost_elsewhere:
            missed.append(f"{f.kind}: {f.lost_elsewhere} connection(s) to other targets lost")
    return missed
