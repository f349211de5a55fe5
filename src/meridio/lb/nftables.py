"""The LB's in-kernel data path: flows, Maglev tables and fwmarks as nftables tables.

Rendering is pure (:func:`render_table`, :func:`render_update`, :func:`render_delete`); a thin
runner (:func:`apply`, :func:`read_counters`, :func:`probe_features`, ...) feeds scripts to
``nft -f -`` and reads state back with ``nft -j``, optionally inside a network namespace.

Modes (``TableSpec.mode``)
--------------------------
``kernel``
    The routed path: one ``inet`` table with **one hooked chain** (prerouting, priority raw).
    A packet's flow rule hashes its 5-tuple into the stream's Maglev map, whose verdicts send
    it to its target's chain ``r-<mark>``: ``meta mark set <mark>``, the target's hit counter,
    accept; an ``ip rule fwmark <mark> lookup <mark>`` per target then routes it. Plus, when
    ``fast`` is given, the **ingress fast path** (below).
``first-packet``
    The same table, its chain after conntrack (priority mangle). A packet to a VIP of a
    connection the LB steered, or an ICMP error to a VIP related to one, goes where the
    connection's first packet went while that target is live (``ct mark vmap @targets``);
    any other packet is hashed as in ``kernel`` and its target's chain also saves the mark
    in the connection (``ct mark set``). The test is the packet's destination, not the
    connection's direction: with several LBs a connection's replies may reach this LB before
    its client's packets (conntrack then takes the reply for the original direction), and
    the replies, which leave to the client by the main table, must never get the mark. So
    connections to the remaining targets stay put when the target set changes, with no
    packet in user space: the first packet is steered by the same in-kernel map as in
    ``kernel`` mode, identical on every LB, so an LB that takes a connection over (another
    LB killed, scaled in or leaving) picks the same target. As with nfqlb's SYN-only mode,
    the flows decide on a connection's first packet; its later packets follow it.
``nfqueue``
    Packets are queued to the user-space readers (iptables NFQUEUE, see
    :mod:`meridio.lb.iptables`, or the ``queue`` statement where the kernel has it); the table
    then holds only what the readers cannot do: fragment reassembly, port NAT and, with a native
    queue, the queue rules themselves.

The routed table (``inet meridio-lb``)
--------------------------------------
::

    counter no-flow, no-target, hit-<mark> (one per target)
    set vips4, vips6                                   every VIP (the no-flow drop)
    map stream-<s> { typeof numgen random mod M : verdict }   index -> goto r-<mark>|no-target
    [map targets { type mark : verdict }]              first-packet: mark -> goto r-<mark>
    chain r-<mark>       meta mark set <mark> [ct mark set <mark>] counter accept|goto nat
    chain no-target      counter, drop (or reject: TCP reset, else port unreachable)
    chain defrag         not hooked: its tproxy rule makes the kernel reassemble (see below)
    chain icmp-errors    ICMP errors about VIP flows, hashed by their quoted header
    chain prerouting     hook: the flow rules in match order (the ICMP jump before the first
                         flow without a protocol list, else after them all), no-flow drop,
                         the replies' port NAT
    [map natmap4/6, rnatmap4/6; chain nat, nat-*, rnat-*; chain replies]   port NAT

Decisions, each checked on nft 1.0.6 / kernel 6.18 (tests/netns/test_nftables_kernel.py;
costs from ``bench/bench_datapath.py`` and variants of it, on a 2-vCPU VM with retpolines,
where each nft expression of the packet path costs some 15-40 ns):

- **One hook, few expressions.** The common VIP packet crosses one chain: its flow rule
  (destination, protocol, ports; the hash; one map lookup whose verdict is its target's
  chain), that chain (mark, counter), done. No iptables chain (each built-in chain is a hook
  every packet of the namespace crosses), no second table. The Maglev map's values are
  verdicts, not marks: one lookup instead of a map lookup and a mark-keyed verdict map.
- **The hash key** is ``@nh,96,64 . th sport . th dport`` (IPv6 ``@nh,64,256``): both
  addresses in one load, the same 16 (40) register bytes as ``ip saddr . ip daddr . th sport .
  th dport`` (:func:`meridio.core.jhash.flow_key`), one expression less.
- **Map key type.** ``typeof numgen random mod M : verdict`` loads, lists and is the target of
  a ``jhash ... vmap @m`` lookup (``typeof jhash ...`` crashes ``nft list`` in 1.0.6).
- **No target.** Every index 0..M-1 is always in the map; "no target" sends to ``no-target``.
  A lookup that missed would make the rule fall through to lower-priority flows, which nfqlb
  does not do. Updates are "delete, then add" of the changed entries (nft 1.0.6 cannot replace
  an element's value), in one atomic script with the target chains they need.
- **Fragments.** Non-first fragments carry no ports, so VIP traffic is reassembled before the
  chain. Any ``tproxy`` expression makes the kernel register its defragmentation hooks (at
  -400) *without* conntrack; the unhooked ``defrag`` chain holds one, never traversed. (Where
  the kernel has no tproxy, a ``ct`` expression does it, and VIP packets are then marked
  ``notrack``: conntrack hooks on the path.) :func:`probe_features` finds which applies.
- **ICMP errors** (destination-unreachable, time-exceeded, parameter-problem, and for IPv6
  packet-too-big) to a VIP are steered by the packet they quote, in the kernel: the quote is a
  reply (VIP to client), so the forward key is its destination, source, destination port and
  source port, read with raw payload expressions (``@th,192,32 . @th,160,32 . @th,240,16 .
  @th,224,16`` for IPv4: the same 16 bytes as the client's packets' key; 40 for IPv6). The
  flow's fields are matched on the quote the same way (its destination port is the flow's
  source port). Handled: an IPv4 quote without options and an IPv6 quote whose L4 header
  follows the fixed header, carrying TCP, UDP or SCTP: the errors path MTU discovery sends
  about replies. Others fall back to the flow rules as ordinary ICMP packets (a flow without a
  protocol list takes them, hashed on the ICMP header; otherwise they are dropped as no-flow).
- **Byte matches** become raw payload matches on the L4 header (``tcp[2:2] = 4002`` is
  ``meta l4proto tcp @th,16,16 4002``); a flow whose protocols have different matches gets one
  rule per group of protocols (a match applies to packets of its own protocol only).
- **Counters** only where a metric needs them: ``hit-<mark>`` per target (and on the fast
  path), ``no-target`` and ``no-flow``: the per-target hit and drop metrics. No per-flow one.

Port NAT (conduit ``destination-port-nats``), stateless, as Meridio does it in its LB
---------------------------------------------------------------------------------------
After the target is chosen (by the original port), the target's chain goes to ``nat``, which
looks ``daddr . l4proto . dport`` up in ``natmap4``/``natmap6`` and rewrites the destination
port (``tcp dport set 8080``; the kernel updates the checksums). Replies of the targets pass
the LB (the proxies route them over the LBs): a rule looks ``saddr . l4proto . sport`` up in
``rnatmap4``/``rnatmap6`` and rewrites the source port back. In ``kernel`` mode that rule ends
the one chain; in ``first-packet`` it is in a chain before conntrack (``replies``, priority
raw), so the connection sees the original port both ways; in ``nfqueue`` both rewrites are in
one chain after the readers (priority mangle + 10). No conntrack is involved.

The ingress fast path (``table netdev meridio-lb-fast``; ``kernel`` mode)
-------------------------------------------------------------------------
A ``netdev`` table hooked at ingress of the LB's ingress links (``FastPath.devices``) holds
the same flow rules and, per stream and IP family, a copy of the Maglev map whose verdicts
send a packet to its target's chain ``t4-<mark>``/``t6-<mark>``: the hit counter and ``fwd ip
to <target> device <link>``, out of the link before routing. No routing lookup, no
prerouting, forward or postrouting hook, no TTL decrement. What it cannot handle correctly
continues unchanged to the routed path, as if the table were not there:

- fragments, ICMP, other protocols than TCP, UDP and SCTP, IPv6 with extension headers, and
  packets with a TTL (hop limit) of 1 or less (routing answers those with time-exceeded): one
  lookup of IP header bytes 6-9 (IPv6: 6-7) in a set of the allowed values
  (:func:`_fast_header_check`), five expressions cheaper than writing the tests out;
- packets longer than the smallest MTU of the links it forwards to, when that is smaller
  than an ingress link's (routing fragments them or answers fragmentation-needed); with equal
  MTUs no packet can be too long and there is no test (GRO aggregates are GSO packets, which
  the links out segment);
- a target without a resolved neighbour, or not on a link of the LB's own (a route through a
  gateway): its chain is empty, so the packet ends in the chain's policy, accept; the caller
  probes the kernel for the eligible ones (:mod:`meridio.lb.fastpath`);
- no-target packets (verdict accept), to be counted and dropped or rejected there.

The TTL is not decremented, as for any L2-style forwarder (the LB does not show in a
traceroute through the fast path): a loop through it would need the packet to come back in
through an ingress link, and whatever is routed decrements as before. nft 1.0.6 cannot set
``ip ttl`` from an expression (its checksum update needs the ``ip ttl`` statement, which
takes constants only), and a per-packet map of TTLs would cost as much as the routed path.

Load times (``nft -f`` through ``ip netns exec``, nft 1.0.6, kernel 6.18, 2-vCPU VM): measured
by ``python -m bench.bench_maglev nft``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from meridio.core.classifier import (
    ByteMatch,
    FlowSpec,
    IPAddress,
    IPNetwork,
    PortRange,
    StreamKey,
)

__all__ = [
    "CHUNK",
    "DEFAULT_SEED",
    "DEFAULT_TABLE",
    "MODES",
    "NO_FLOW_COUNTER",
    "NO_TARGET_COUNTER",
    "CounterTotals",
    "FastPath",
    "FastTarget",
    "Features",
    "NftError",
    "PortNat",
    "Readings",
    "StreamMap",
    "TableSpec",
    "apply",
    "counters",
    "exists",
    "fast_table_name",
    "map_elements",
    "probe_features",
    "read_counters",
    "render_delete",
    "render_map_update",
    "render_table",
    "render_update",
]

DEFAULT_TABLE: Final = "meridio-lb"
DEFAULT_SEED: Final = 0x4D455249
"""The jhash seed. Every LB instance of a trench must use the same one (stateless LBs agree)."""

MODES: Final = ("kernel", "first-packet", "nfqueue")
NO_FLOW_COUNTER: Final = "no-flow"
NO_TARGET_COUNTER: Final = "no-target"

CHUNK: Final = 8192
"""Elements per ``add element``/``delete element`` statement."""

_MARK_MAX: Final = 0xFFFFFFFF
_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,58}")
_IDENT_RE: Final = re.compile(r"[^A-Za-z0-9_-]")
_DEVICE_RE: Final = re.compile(r"[^\s/\"]{1,15}")
_PROTO_NAMES: Final = {6: "tcp", 17: "udp", 132: "sctp"}
_PORT_PROTOCOLS: Final = (6, 17, 132)
_ICMP_ERRORS: Final = "destination-unreachable, time-exceeded, parameter-problem"
_ICMPV6_ERRORS: Final = "destination-unreachable, packet-too-big, time-exceeded, parameter-problem"
_L3: Final = {4: "ip", 6: "ip6"}
_ADDR_TYPE: Final = {4: "ipv4_addr", 6: "ipv6_addr"}

# Where an ICMP error's quote keeps what the forward key needs, as raw @th bit offsets (the
# ICMP header is 8 bytes; IPv4 quote without options, IPv6 quote without extension headers):
# (version/ihl check, protocol, quoted source, quoted destination, quoted sport, quoted dport,
#  address bits)
_QUOTE: Final = {
    4: ("@th,64,8 0x45", "@th,136,8", "@th,160,32", "@th,192,32", "@th,224,16", "@th,240,16", 32),
    6: ("@th,64,4 6", "@th,112,8", "@th,128,128", "@th,256,128", "@th,384,16", "@th,400,16", 128),
}


class NftError(RuntimeError):
    """``nft`` failed; the message is its stderr."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


# --------------------------------------------------------------------------------------------
# Names


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:8]


def _ident(text: str, limit: int = 40) -> str:
    """An nft-safe identifier part; a digest is appended when the text had to be changed."""
    clean = _IDENT_RE.sub("_", text)[:limit]
    return clean if clean == text and clean else f"{clean}-{_digest(text)}"


def fast_table_name(name: str) -> str:
    """The ``netdev`` table of the ingress fast path that goes with the table ``name``."""
    return f"{name}-fast"


# --------------------------------------------------------------------------------------------
# Spec


@dataclass(frozen=True)
class StreamMap:
    """One stream's Maglev lookup table: ``entries[i]`` is the fwmark of bucket i, 0 = none."""

    key: StreamKey
    entries: tuple[int, ...]

    @property
    def modulus(self) -> int:
        return len(self.entries)


@dataclass(frozen=True, order=True)
class PortNat:
    """One ``destination-port-nats`` entry: traffic to ``vips`` on ``port`` (``protocol``) reaches
    the target on ``target_port``; replies from ``target_port`` leave with ``port``."""

    protocol: int
    port: int
    target_port: int
    vips: tuple[IPAddress, ...]

    def chain(self, reply: bool = False) -> str:
        name = _PROTO_NAMES[self.protocol]
        if reply:
            return f"rnat-{name}-{self.target_port}-{self.port}"
        return f"nat-{name}-{self.port}-{self.target_port}"


@dataclass(frozen=True, order=True)
class FastTarget:
    """Where the fast path sends one family of a target: its address over a link of ours."""

    address: str
    device: str


@dataclass(frozen=True)
class FastPath:
    """The ingress fast path: hooked on ``devices``; ``targets4``/``targets6`` map a mark to
    where its packets go (targets missing here take the routed path); packets longer than
    ``mtu`` (the smallest MTU of the links it forwards to, when that is smaller than an
    ingress link's: else no packet can be too long) take the routed path."""

    devices: tuple[str, ...]
    targets4: tuple[tuple[int, FastTarget], ...] = ()
    targets6: tuple[tuple[int, FastTarget], ...] = ()
    mtu: int | None = None

    def targets(self, family: int) -> dict[int, FastTarget]:
        return dict(self.targets4 if family == 4 else self.targets6)


@dataclass(frozen=True)
class TableSpec:
    """Everything :func:`render_table` needs. Checked on construction (ValueError).

    ``flows`` come from :func:`meridio.core.classifier.parse_flows`; every flow's stream must
    have a map in ``streams``. ``marks`` are the live target marks (each gets a hit counter).
    ``vips`` are extra VIP CIDRs (e.g. all of the trench's): traffic to them that matches no
    flow is counted as ``no-flow`` and dropped; the flows' own VIPs are always included.
    """

    streams: tuple[StreamMap, ...] = ()
    flows: tuple[FlowSpec, ...] = ()
    seed: int = DEFAULT_SEED
    name: str = DEFAULT_TABLE
    vips: tuple[str, ...] = ()
    reject_no_target: bool = False
    defrag: bool = True
    """Reassemble fragments of VIP traffic before the flows."""
    mode: str = "kernel"
    marks: tuple[int, ...] | None = None
    """Live target marks; None: every non-zero mark of the maps."""
    port_nats: tuple[PortNat, ...] = ()
    fast: FastPath | None = None
    untrack_syn: bool = False
    """first-packet: SYNs untracked (connections picked up at the client's first ACK)."""
    defrag_by_conntrack: bool = False
    """The kernel has no tproxy expression: reassemble through conntrack (and notrack)."""
    native_queue: tuple[int, int, bool] | None = None
    """nfqueue with the kernel's queue statement: (first queue, count, bypass)."""
    _map_names: dict[StreamKey, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"table name {self.name!r} is not [A-Za-z][A-Za-z0-9_-]{{0,58}}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= self.seed <= _MARK_MAX:
            raise ValueError(f"seed {self.seed} does not fit in 32 bits")
        keys = [s.key for s in self.streams]
        if len(set(keys)) != len(keys):
            raise ValueError("a stream has two maps")
        for stream in self.streams:
            if not 2 <= stream.modulus <= _MARK_MAX:
                raise ValueError(f"stream {stream.key}: M = {stream.modulus}, needs >= 2")
            if not all(0 <= m <= _MARK_MAX for m in stream.entries):
                raise ValueError(f"stream {stream.key}: a mark does not fit in 32 bits")
        names = [f.name for f in self.flows]
        if len(set(names)) != len(names):
            raise ValueError("two flows have the same name")
        for flow in self.flows:
            if flow.stream not in keys:
                raise ValueError(f"flow {flow.name!r}: stream {flow.stream} has no map")
        for cidr in self.vips:
            ipaddress.ip_interface(cidr)  # ValueError if it is not a CIDR
        seen: set[tuple[int, int, IPAddress]] = set()
        seen_reply: set[tuple[int, int, IPAddress]] = set()
        for nat in self.port_nats:
            if nat.protocol not in _PROTO_NAMES or not nat.vips:
                raise ValueError(f"port NAT {nat}: protocol must be tcp, udp or sctp, with VIPs")
            for port in (nat.port, nat.target_port):
                if not 1 <= port <= 65535:
                    raise ValueError(f"port NAT {nat}: port {port} out of range")
            for vip in nat.vips:
                if (nat.protocol, nat.port, vip) in seen:
                    raise ValueError(f"port NAT: {vip} port {nat.port} is NATed twice")
                if (nat.protocol, nat.target_port, vip) in seen_reply:
                    raise ValueError(f"port NAT: {vip} target port {nat.target_port} twice")
                seen.add((nat.protocol, nat.port, vip))
                seen_reply.add((nat.protocol, nat.target_port, vip))
        if self.fast is not None:
            if self.mode != "kernel":
                raise ValueError("the ingress fast path is for kernel mode")
            if not self.fast.devices or not all(_DEVICE_RE.fullmatch(d) for d in self.fast.devices):
                raise ValueError(f"fast path devices {self.fast.devices!r}")
            for family in (4, 6):
                for mark, target in self.fast.targets(family).items():
                    ipaddress.ip_address(target.address)
                    if not _DEVICE_RE.fullmatch(target.device) or not 0 < mark <= _MARK_MAX:
                        raise ValueError(f"fast path target {mark}: {target}")
        # map names: stream-<stream name>, plus a digest of the whole key when two streams of
        # different conduits/trenches share a name
        bases = {key: _ident(key[2]) for key in keys}
        counts = Counter(bases.values())
        names_by_key = {
            key: f"stream-{base}"
            if counts[base] == 1
            else f"stream-{base}-{_digest('/'.join(key))}"
            for key, base in bases.items()
        }
        object.__setattr__(self, "_map_names", names_by_key)

    def map_name(self, key: StreamKey) -> str:
        """The name of a stream's map in this table (for :func:`render_map_update`)."""
        return self._map_names[key]

    def live_marks(self) -> tuple[int, ...]:
        if self.marks is not None:
            return tuple(sorted(set(self.marks) - {0}))
        return tuple(sorted({m for s in self.streams for m in s.entries} - {0}))

    def structure(self) -> tuple[object, ...]:
        """Everything but the map entries, the live marks and the fast path's targets. While
        it stays equal, :func:`render_update` scripts are enough; when it changes, load
        :func:`render_table` again."""
        maps = tuple((s.key, s.modulus) for s in self.streams)
        fast = None if self.fast is None else (self.fast.devices, self.fast.mtu)
        return (
            self.name,
            self.mode,
            self.seed,
            maps,
            self.flows,
            self.vips,
            self.reject_no_target,
            self.defrag,
            self.port_nats,
            fast,
            self.untrack_syn,
            self.defrag_by_conntrack,
            self.native_queue,
        )

    def ordered_flows(self) -> tuple[FlowSpec, ...]:
        return tuple(sorted(self.flows, key=lambda f: f.order))

    def vip_networks(self, family: int, *, collapse: bool = True) -> list[IPNetwork]:
        """The ``vips4``/``vips6`` set contents: the spec's VIPs and the flows' (and the port
        NATs'), collapsed into the fewest networks, or each one once, sorted."""
        texts = [*self.vips, *(str(a) for f in self.flows for a in f.vips)]
        texts += [str(a) for n in self.port_nats for a in n.vips]
        nets = {ipaddress.ip_interface(t).network for t in texts}
        if family == 4:
            v4 = sorted(n for n in nets if isinstance(n, ipaddress.IPv4Network))
            return list(ipaddress.collapse_addresses(v4)) if collapse else list(v4)
        v6 = sorted(n for n in nets if isinstance(n, ipaddress.IPv6Network))
        return list(ipaddress.collapse_addresses(v6)) if collapse else list(v6)


# --------------------------------------------------------------------------------------------
# Rendering: pieces


def _set(items: Sequence[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _match(items: Sequence[str]) -> str:
    """The right-hand side of a match: one value is compared, several are a set lookup."""
    return items[0] if len(items) == 1 else _set(items)


def _ports(ranges: tuple[PortRange, ...]) -> str:
    return _match([str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges])


def _every_port(ranges: tuple[PortRange, ...]) -> bool:
    return any(lo <= 1 and hi >= 65535 for lo, hi in ranges)


def _addresses(items: Iterable[IPAddress | IPNetwork]) -> str:
    return _set([str(a) for a in items])


def _protos(numbers: Iterable[int]) -> str:
    return _match([_PROTO_NAMES.get(p, str(p)) for p in numbers])


def _hex_ranges(nets: Sequence[IPNetwork], bits: int) -> str:
    """Networks as integer ranges, for a raw payload compare (a quoted address)."""
    digits = bits // 4
    items = []
    for n in nets:
        low, high = int(n.network_address), int(n.broadcast_address)
        items.append(
            f"0x{low:0{digits}x}" if low == high else f"0x{low:0{digits}x}-0x{high:0{digits}x}"
        )
    return _match(items)


def _byte_match(m: ByteMatch) -> str:
    where = f"@th,{m.offset * 8},{m.length * 8}"
    if m.mask:
        return f"{where} & 0x{m.mask:x} == 0x{m.value:x}"
    return f"{where} {m.value}"


def _chunks(items: Sequence[str]) -> Iterator[str]:
    for start in range(0, len(items), CHUNK):
        yield ", ".join(items[start : start + CHUNK])


def _elements(
    family: str, table: str, map_name: str, items: Sequence[str], verb: str = "add"
) -> list[str]:
    return [f"{verb} element {family} {table} {map_name} {{ {chunk} }}" for chunk in _chunks(items)]


# A flow's protocols as one or more groups, each with the byte matches of its packets:
# (protocols, negated, byte matches); protocols () and not negated means "any protocol".
_Group = tuple[tuple[int, ...], bool, tuple[ByteMatch, ...]]


def _groups(flow: FlowSpec) -> list[_Group]:
    if not flow.byte_matches:
        return [(flow.protocols, False, ())]
    with_matches = sorted({m.proto for m in flow.byte_matches})
    groups: list[_Group] = []
    for proto in with_matches:
        if not flow.protocols or proto in flow.protocols:
            groups.append(((proto,), False, flow.matches_of(proto)))
    if not flow.protocols:
        groups.append((tuple(with_matches), True, ()))  # every other protocol: no match applies
    else:
        rest = tuple(p for p in flow.protocols if p not in with_matches)
        if rest:
            groups.append((rest, False, ()))
    return groups


def _protocol_condition(group: _Group, fast_family: int | None) -> str | None:
    """The protocol condition of a group; on the fast path :func:`_fast_header_check`."""
    protos, negated, _ = group
    if fast_family is None:
        if not protos:
            return None
        return f"meta l4proto {'!= ' if negated else ''}{_protos(protos)}"
    allowed = [
        p for p in _PORT_PROTOCOLS if (p not in protos if negated else not protos or p in protos)
    ]
    if not allowed:
        return ""  # nothing of this group takes the fast path
    return _fast_header_check(fast_family, allowed)


def _fast_header_check(family: int, protocols: Sequence[int]) -> str:
    """One lookup that lets a packet on the fast path only if it is no fragment, has a TTL (hop
    limit) above 1 and carries one of ``protocols`` (TCP, UDP, SCTP) right after the IP
    header (IPv6: no extension header).

    IPv4: bytes 6-9 of the header are flags/fragment offset, TTL and protocol; masked with
    0x3fffffff (the reserved and don't-fragment bits cleared) they must be ``ttl << 8 |
    protocol`` with the fragment offset and more-fragments bit 0: a set of 254 values per
    protocol. IPv6: bytes 6-7 are next header and hop limit: a range per protocol. The same
    checks written out (``ip frag-off & 0x3fff == 0 ip ttl > 1 ip protocol {...}``) cost
    five expressions more per packet, about 4 % of the fast path's throughput here.
    """
    if family == 4:
        values = [str(ttl << 8 | p) for p in sorted(protocols) for ttl in range(2, 256)]
        return f"@nh,48,32 & 0x3fffffff {_set(values)}"
    ranges = [f"0x{p << 8 | 2:04x}-0x{p << 8 | 255:04x}" for p in sorted(protocols)]
    return f"@nh,48,16 {_match(ranges)}"


def _flow_matches(flow: FlowSpec, family: int, fast: FastPath | None = None) -> list[str]:
    """The match part of each rule of a flow for one family (several with byte matches)."""
    l3 = _L3[family]
    vips = flow.vips_of(family)
    sources = flow.sources_of(family)
    if not vips or sources == ():
        return []  # no packet of this family can match
    out = []
    for group in _groups(flow):
        parts = [f"{l3} daddr {_match([str(a) for a in vips])}"]
        proto = _protocol_condition(group, family if fast is not None else None)
        if proto == "":
            continue
        if proto is not None:
            parts.append(proto)
        if fast is not None and fast.mtu is not None:
            parts.append(f"meta length <= {fast.mtu}")
        # a range covering every port is no condition: leave it out of the packet path
        if flow.dports and not _every_port(flow.dports):
            parts.append(f"th dport {_ports(flow.dports)}")
        if flow.sports and not _every_port(flow.sports):
            parts.append(f"th sport {_ports(flow.sports)}")
        if sources is not None:
            parts.append(f"{l3} saddr {_match([str(a) for a in sources])}")
        parts += [_byte_match(m) for m in group[2]]
        out.append(" ".join(parts))
    return out


# Both addresses in one load: the same register bytes as ``ip saddr . ip daddr`` (each is a
# whole number of 32-bit registers), one expression less per packet.
_ADDRESSES: Final = {4: "@nh,96,64", 6: "@nh,64,256"}


def _hash(family: int, spec: TableSpec, stream: StreamMap, suffix: str = "") -> str:
    """The lookup of a packet's Maglev bucket: its verdict sends it to its target's chain.
    The key is the 16 (IPv4) or 40 (IPv6) bytes of ``ip saddr . ip daddr . th sport . th
    dport`` (:func:`meridio.core.jhash.flow_key`)."""
    return (
        f"jhash {_ADDRESSES[family]} . th sport . th dport mod {stream.modulus}"
        f" seed 0x{spec.seed:08x} vmap @{spec.map_name(stream.key)}{suffix}"
    )


def _icmp_rules(flow: FlowSpec, family: int, spec: TableSpec, stream: StreamMap) -> list[str]:
    """The rule steering ICMP errors about the flow's traffic by their quoted header."""
    vips = flow.vips_of(family)
    sources = flow.sources_of(family)
    if not vips or sources == ():
        return []
    version, proto, q_src, q_dst, q_sport, q_dport, bits = _QUOTE[family]
    types = _ICMP_ERRORS if family == 4 else _ICMPV6_ERRORS
    icmp = "icmp" if family == 4 else "icmpv6"
    protos = [p for p in _PORT_PROTOCOLS if not flow.protocols or p in flow.protocols]
    parts = [
        f"{_L3[family]} daddr {_match([str(a) for a in vips])}",
        f"{icmp} type {{ {types} }}",
        version,
        f"{proto} {_match([str(p) for p in protos])}",
    ]
    # the quote is a reply: its source port is the flow's destination port and so on
    if flow.dports and not _every_port(flow.dports):
        parts.append(f"{q_sport} {_ports(flow.dports)}")
    if flow.sports and not _every_port(flow.sports):
        parts.append(f"{q_dport} {_ports(flow.sports)}")
    if sources is not None:
        parts.append(f"{q_dst} {_hex_ranges(sources, bits)}")
    parts.append(
        f"jhash {q_dst} . {q_src} . {q_dport} . {q_sport}"
        f" mod {stream.modulus} seed 0x{spec.seed:08x} vmap @{spec.map_name(stream.key)}"
    )
    return [" ".join(parts)]


def _nat_map(spec: TableSpec, family: int, reply: bool) -> list[str]:
    items = []
    for nat in spec.port_nats:
        port = nat.target_port if reply else nat.port
        for vip in nat.vips:
            if vip.version == family:
                items.append(
                    f"{vip} . {_PROTO_NAMES[nat.protocol]} . {port} : goto {nat.chain(reply)}"
                )
    return items


def _nat_decls(spec: TableSpec, *, reply: bool, forward: bool, then: str = " accept") -> list[str]:
    """The NAT maps and their per-entry chains (``forward``: dport rewrites, ``reply``: sport).
    The chains end in ``then``: ``accept`` where they are reached by goto from a chain that a
    rule jumped to (the end of the chain would go back there), nothing on the fast path (the
    ``fwd`` after the jump comes next)."""
    out = []
    for direction, wanted in (("natmap", forward), ("rnatmap", reply)):
        if not wanted:
            continue
        for family in (4, 6):
            items = _nat_map(spec, family, direction == "rnatmap")
            out += [
                f"\tmap {direction}{family} {{",
                f"\t\ttype {_ADDR_TYPE[family]} . inet_proto . inet_service : verdict",
            ]
            if items:
                out.append(f"\t\telements = {_set(items)}")
            out.append("\t}")
    for nat in spec.port_nats:
        name = _PROTO_NAMES[nat.protocol]
        if forward:
            rewrite = f"{name} dport set {nat.target_port}{then}"
            out += [f"\tchain {nat.chain()} {{", f"\t\t{rewrite}", "\t}"]
        if reply:
            rewrite = f"{name} sport set {nat.port}{then}"
            out += [f"\tchain {nat.chain(True)} {{", f"\t\t{rewrite}", "\t}"]
    return out


def _nat_lookup(family: int, reply: bool) -> str:
    l3 = _L3[family]
    where, port = ("saddr", "sport") if reply else ("daddr", "dport")
    prefix = "rnatmap" if reply else "natmap"
    return f"{l3} {where} . meta l4proto . th {port} vmap @{prefix}{family}"


def _vip_sets(spec: TableSpec) -> list[str]:
    """``vips4``/``vips6``: a hash set while every VIP is one address (cheaper than intervals)."""
    out = []
    for family in (4, 6):
        nets = spec.vip_networks(family, collapse=False)
        out += [f"\tset vips{family} {{", f"\t\ttype {_ADDR_TYPE[family]}"]
        if any(n.prefixlen != n.max_prefixlen for n in nets):
            out.append("\t\tflags interval")
            items = [str(n) for n in spec.vip_networks(family)]
        else:
            items = [str(n.network_address) for n in nets]
        if items:
            out.append(f"\t\telements = {_set(items)}")
        out.append("\t}")
    return out


def _defrag_chain(spec: TableSpec) -> list[str]:
    if not spec.defrag:
        return []
    if spec.defrag_by_conntrack:
        return ["\tchain defrag {", "\t\tct state untracked accept", "\t}"]
    # any tproxy expression registers the kernel's defragmentation, without conntrack
    return ["\tchain defrag {", "\t\tmeta l4proto tcp tproxy to :1", "\t}"]


# --------------------------------------------------------------------------------------------
# Rendering: tables


def _routed_verdict(mark: int) -> str:
    return "goto no-target" if mark == 0 else f"goto r-{mark}"


def _fast_verdict(family: int) -> Callable[[int], str]:
    def verdict(mark: int) -> str:
        return "accept" if mark == 0 else f"goto t{family}-{mark}"

    return verdict


def _routed_chain(spec: TableSpec, mark: int) -> list[str]:
    """A target's chain on the routed path: its mark (for the ip rule), its hit counter."""
    save = f" ct mark set {mark}" if spec.mode == "first-packet" else ""
    then = "goto nat" if spec.port_nats else "accept"
    return [f'meta mark set {mark}{save} counter name "hit-{mark}" {then}']


def _fast_chain(spec: TableSpec, family: int, mark: int) -> list[str]:
    """A target's chain on the fast path for one family: out of its link (empty when the
    target may not be sent that way: the chain's end is the routed path)."""
    assert spec.fast is not None
    target = spec.fast.targets(family).get(mark)
    if target is None:
        return []
    fwd = (
        f'counter name "hit-{mark}" fwd {_L3[family]} to {target.address} device "{target.device}"'
    )
    return ["jump nat", fwd] if spec.port_nats else [fwd]


def _chain_decl(name: str, body: Sequence[str]) -> list[str]:
    return [f"\tchain {name} {{", *(f"\t\t{rule}" for rule in body), "\t}"]


def _routed_table(spec: TableSpec) -> list[str]:
    t = spec.name
    sticky = spec.mode == "first-packet"
    marks = spec.live_marks()
    out = [f"table inet {t} {{", f"\tcounter {NO_FLOW_COUNTER} {{ }}"]
    out.append(f"\tcounter {NO_TARGET_COUNTER} {{ }}")
    out += [f"\tcounter hit-{m} {{ }}" for m in marks]
    out += _vip_sets(spec)
    for stream in spec.streams:
        out += [
            f"\tmap {spec.map_name(stream.key)} {{",
            f"\t\ttypeof numgen random mod {stream.modulus} : verdict",
            "\t}",
        ]
    out += _nat_decls(spec, forward=True, reply=True)
    if not sticky:
        out += _defrag_chain(spec)
    no_target = f'counter name "{NO_TARGET_COUNTER}"'
    if spec.reject_no_target:
        out += _chain_decl(
            "no-target",
            [
                f"meta l4proto tcp {no_target} reject with tcp reset",
                f"{no_target} reject with icmpx port-unreachable",
            ],
        )
    else:
        out += _chain_decl("no-target", [f"{no_target} drop"])
    if spec.port_nats:
        # reached by goto from a target's chain, maybe under the icmp-errors jump: accept
        out += _chain_decl("nat", [_nat_lookup(4, False), _nat_lookup(6, False), "accept"])
    for mark in marks:
        out += _chain_decl(f"r-{mark}", _routed_chain(spec, mark))
    if sticky:
        items = [f"{m} : goto r-{m}" for m in marks]
        out += ["\tmap targets {", "\t\ttype mark : verdict"]
        if items:
            out.append(f"\t\telements = {_set(items)}")
        out.append("\t}")
    streams = {s.key: s for s in spec.streams}
    icmp = []
    for flow in spec.ordered_flows():
        for family in (4, 6):
            icmp += _icmp_rules(flow, family, spec, streams[flow.stream])
    out += _chain_decl("icmp-errors", icmp)
    if sticky:
        replies = []
        if spec.untrack_syn:
            # connections seen one way only (replies through another LB) are picked up at the
            # client's first ACK instead of staying half-open in conntrack
            for family in (4, 6):
                replies.append(
                    f"{_L3[family]} daddr @vips{family} tcp flags & (fin | syn | rst | ack) == syn"
                    " notrack"
                )
        if spec.port_nats:
            replies += [_nat_lookup(4, True), _nat_lookup(6, True)]
        if replies:
            hook = "type filter hook prerouting priority raw; policy accept;"
            out += _chain_decl("replies", [hook, *replies])
    rules = [
        f"type filter hook prerouting priority {'mangle' if sticky else 'raw'}; policy accept;"
    ]
    if spec.defrag and spec.defrag_by_conntrack and not sticky:
        rules += ["ip daddr @vips4 notrack", "ip6 daddr @vips6 notrack"]
    if sticky:
        # a packet to a VIP of a connection this LB steered (or an ICMP error related to one)
        # goes where its first packet went while that target is live; by destination, not by
        # direction: a connection whose replies came first has them as its original direction
        rules += ["ip daddr @vips4 ct mark vmap @targets", "ip6 daddr @vips6 ct mark vmap @targets"]
    # ICMP errors go to their chain before the first flow an ICMP packet could match (one
    # without a protocol list); flows of TCP, UDP and SCTP only come first, so their packets
    # skip the test
    icmp_jump = "meta l4proto { icmp, ipv6-icmp } jump icmp-errors"
    for flow in spec.ordered_flows():
        if not flow.protocols and icmp_jump not in rules:
            rules.append(icmp_jump)
        stream = streams[flow.stream]
        for family in (4, 6):
            for match in _flow_matches(flow, family):
                rules.append(f"{match} {_hash(family, spec, stream)}")
    if icmp_jump not in rules:
        rules.append(icmp_jump)
    rules += [
        f'ip daddr @vips4 counter name "{NO_FLOW_COUNTER}" drop',
        f'ip6 daddr @vips6 counter name "{NO_FLOW_COUNTER}" drop',
    ]
    if spec.port_nats and not sticky:
        rules += [_nat_lookup(4, True), _nat_lookup(6, True)]
    out += _chain_decl("prerouting", rules)
    out.append("}")
    return out


def _fast_table(spec: TableSpec) -> list[str]:
    assert spec.fast is not None
    fast = spec.fast
    t = fast_table_name(spec.name)
    marks = spec.live_marks()
    out = [f"table netdev {t} {{"]
    out += [f"\tcounter hit-{m} {{ }}" for m in marks]
    for stream in spec.streams:
        for family in (4, 6):
            out += [
                f"\tmap {spec.map_name(stream.key)}-{family} {{",
                f"\t\ttypeof numgen random mod {stream.modulus} : verdict",
                "\t}",
            ]
    if spec.port_nats:
        out += _nat_decls(spec, forward=True, reply=False, then="")
        out += _chain_decl("nat", [_nat_lookup(4, False), _nat_lookup(6, False)])
    for mark in marks:
        for family in (4, 6):
            out += _chain_decl(f"t{family}-{mark}", _fast_chain(spec, family, mark))
    devices = ", ".join(f'"{d}"' for d in fast.devices)
    rules = [f"type filter hook ingress devices = {{ {devices} }} priority 0; policy accept;"]
    streams = {s.key: s for s in spec.streams}
    for flow in spec.ordered_flows():
        stream = streams[flow.stream]
        for family in (4, 6):
            for match in _flow_matches(flow, family, fast):
                rules.append(f"{match} {_hash(family, spec, stream, f'-{family}')}")
    out += _chain_decl("ingress", rules)
    out.append("}")
    return out


def _nfqueue_table(spec: TableSpec) -> list[str]:
    t = spec.name
    out = [f"table inet {t} {{"]
    out += _vip_sets(spec)
    out += _defrag_chain(spec)
    out += _nat_decls(spec, forward=True, reply=True)
    if spec.native_queue is not None:
        first, count, bypass = spec.native_queue
        target = str(first) if count == 1 else f"{first}-{first + count - 1}"
        flags = " bypass" if bypass else ""
        out += [
            "\tchain enqueue {",
            "\t\ttype filter hook prerouting priority mangle; policy accept;",
            f"\t\tip daddr @vips4 queue num {target}{flags}",
            f"\t\tip6 daddr @vips6 queue num {target}{flags}",
            "\t}",
        ]
    if spec.port_nats:
        out += [
            "\tchain nat {",
            # after the readers (mangle): they hash the original port
            "\t\ttype filter hook prerouting priority mangle + 10; policy accept;",
            f"\t\t{_nat_lookup(4, False)}",
            f"\t\t{_nat_lookup(6, False)}",
            f"\t\t{_nat_lookup(4, True)}",
            f"\t\t{_nat_lookup(6, True)}",
            "\t}",
        ]
    out.append("}")
    return out


def needs_table(spec: TableSpec) -> bool:
    """Whether the mode needs a table at all (nfqueue without defrag, NAT or native queue
    does not)."""
    if spec.mode != "nfqueue":
        return True
    return spec.defrag or bool(spec.port_nats) or spec.native_queue is not None


def render_table(spec: TableSpec) -> str:
    """An nft script that atomically (re)creates the table(s) of ``spec``, maps filled: the
    ``inet`` table, and the ``netdev`` fast path table when ``spec.fast`` is set (removed when
    it is not)."""
    t, ft = spec.name, fast_table_name(spec.name)
    out = [f"table inet {t} {{}}", f"delete table inet {t}"]
    out += [f"table netdev {ft} {{}}", f"delete table netdev {ft}"]
    if spec.mode == "nfqueue":
        if needs_table(spec):
            out += _nfqueue_table(spec)
        return "\n".join(out) + "\n"
    out += _routed_table(spec)
    if spec.fast is not None:
        out += _fast_table(spec)
    for stream in spec.streams:
        name = spec.map_name(stream.key)
        out += _elements("inet", t, name, _verdicts(stream.entries, _routed_verdict))
        if spec.fast is not None:
            for family in (4, 6):
                items = _verdicts(stream.entries, _fast_verdict(family))
                out += _elements("netdev", ft, f"{name}-{family}", items)
    return "\n".join(out) + "\n"


def _verdicts(entries: Iterable[int], verdict: Callable[[int], str]) -> list[str]:
    return [f"{i} : {verdict(mark)}" for i, mark in enumerate(entries)]


def _map_changes(old: StreamMap, new: StreamMap) -> list[tuple[int, int]]:
    return [(i, n) for i, (n, o) in enumerate(zip(new.entries, old.entries, strict=True)) if n != o]


def render_map_update(
    table: str,
    map_name: str,
    changes: Iterable[tuple[int, int | None]],
    family: str = "inet",
) -> str:
    """One atomic script that sets the given entries of a stream's map: ``(index, mark)``.

    A mark of ``None`` or 0 means "no target". Later changes to an index win. Each changed index
    is deleted and added again (nft 1.0.6 cannot replace an element's value); the map holds
    every index 0..M-1 (:func:`render_table` fills it), so the delete always finds it. In the
    ``inet`` table a mark's verdict is ``goto r-<mark>`` (0: ``goto no-target``); ``family``
    ``netdev`` renders the fast path's maps, ``<map>-4`` and ``<map>-6`` (``goto t4-<mark>``,
    0: ``accept``, the routed path). Returns ``""`` when there is nothing to change
    (:func:`apply` then does nothing).
    """
    lines = _map_update(table, map_name, changes, family)
    return "\n".join(lines) + "\n" if lines else ""


def _map_update(
    table: str, map_name: str, changes: Iterable[tuple[int, int | None]], family: str
) -> list[str]:
    final: dict[int, int] = {}
    for index, mark in changes:
        value = 0 if mark is None else mark
        if index < 0 or not 0 <= value <= _MARK_MAX:
            raise ValueError(f"bad map entry {index} : {mark}")
        final[index] = value
    if not final:
        return []
    indexes = sorted(final)
    deleted = [str(i) for i in indexes]
    if family != "netdev":
        out = _elements(family, table, map_name, deleted, verb="delete")
        items = [f"{i} : {_routed_verdict(final[i])}" for i in indexes]
        return out + _elements(family, table, map_name, items)
    out = []
    for ip_family in (4, 6):
        name = f"{map_name}-{ip_family}"
        verdict = _fast_verdict(ip_family)
        out += _elements(family, table, name, deleted, verb="delete")
        out += _elements(family, table, name, [f"{i} : {verdict(final[i])}" for i in indexes])
    return out


def render_update(old: TableSpec, new: TableSpec) -> str:
    """The script that takes the kernel from ``old`` to ``new`` when their
    :meth:`~TableSpec.structure` is equal, in one transaction: target chains and counters
    added, fast path targets changed, map entries moved (in both tables), then chains and
    counters of removed targets deleted. ``""`` if nothing changes."""
    if old.structure() != new.structure():
        raise ValueError("the structure changed: render the whole table")
    if new.mode == "nfqueue":
        return ""
    t, ft = new.name, fast_table_name(new.name)
    sticky = new.mode == "first-packet"
    old_marks, new_marks = set(old.live_marks()), set(new.live_marks())
    added, gone = sorted(new_marks - old_marks), sorted(old_marks - new_marks)
    out: list[str] = []
    for mark in added:
        out += [f"add counter inet {t} hit-{mark}", f"add chain inet {t} r-{mark}"]
        out += [f"add rule inet {t} r-{mark} {rule}" for rule in _routed_chain(new, mark)]
        if sticky:
            out.append(f"add element inet {t} targets {{ {mark} : goto r-{mark} }}")
    if new.fast is not None and old.fast is not None:
        for mark in sorted(new_marks):
            if mark in added:
                out.append(f"add counter netdev {ft} hit-{mark}")
            for family in (4, 6):
                body = _fast_chain(new, family, mark)
                chain = f"t{family}-{mark}"
                if mark in added:
                    out.append(f"add chain netdev {ft} {chain}")
                elif body == _fast_chain(old, family, mark):
                    continue
                else:
                    out.append(f"flush chain netdev {ft} {chain}")
                out += [f"add rule netdev {ft} {chain} {rule}" for rule in body]
    old_streams = {s.key: s for s in old.streams}
    for stream in new.streams:
        changes = _map_changes(old_streams[stream.key], stream)
        name = new.map_name(stream.key)
        out += _map_update(t, name, changes, "inet")
        if new.fast is not None:
            out += _map_update(ft, name, changes, "netdev")
    for mark in gone:
        if sticky:
            out.append(f"delete element inet {t} targets {{ {mark} }}")
        out += [f"delete chain inet {t} r-{mark}", f"delete counter inet {t} hit-{mark}"]
        if new.fast is not None:
            out += [f"delete chain netdev {ft} t{family}-{mark}" for family in (4, 6)]
            out.append(f"delete counter netdev {ft} hit-{mark}")
    return "\n".join(out) + "\n" if out else ""


def render_delete(table: str) -> str:
    """A script that removes the table and its fast path table, whether they exist or not."""
    ft = fast_table_name(table)
    return (
        f"table inet {table} {{}}\ndelete table inet {table}\n"
        f"table netdev {ft} {{}}\ndelete table netdev {ft}\n"
    )


# --------------------------------------------------------------------------------------------
# Counters


@dataclass(frozen=True)
class Readings:
    """Counter values read from the kernel, ``(packets, bytes)``: per target mark (the routed
    and the fast path's hits), the drops without a target and without a flow."""

    routed: Mapping[int, tuple[int, int]]
    fast: Mapping[int, tuple[int, int]]
    no_flow: tuple[int, int] = (0, 0)
    no_target: tuple[int, int] = (0, 0)

    def flat(self) -> dict[str, tuple[int, int]]:
        out = {f"routed/{m}": v for m, v in self.routed.items()}
        out.update({f"fast/{m}": v for m, v in self.fast.items()})
        out[NO_FLOW_COUNTER] = self.no_flow
        out[NO_TARGET_COUNTER] = self.no_target
        return out


class CounterTotals:
    """Running totals of kernel counters that reset now and then (a table reloaded, a target's
    counter deleted and added again): a reading below the last one means the counter started
    again, so what it had counted is kept; a counter that disappears keeps its total too."""

    def __init__(self) -> None:
        self._base: dict[str, tuple[int, int]] = {}
        self._last: dict[str, tuple[int, int]] = {}

    def update(self, readings: Mapping[str, tuple[int, int]]) -> None:
        for name in set(self._last) | set(readings):
            last = self._last.get(name, (0, 0))
            now = readings.get(name)
            if now is None or now[0] < last[0] or now[1] < last[1]:
                base = self._base.get(name, (0, 0))
                self._base[name] = (base[0] + last[0], base[1] + last[1])
            if now is None:
                self._last.pop(name, None)
            else:
                self._last[name] = now

    def total(self, name: str) -> tuple[int, int]:
        base, last = self._base.get(name, (0, 0)), self._last.get(name, (0, 0))
        return base[0] + last[0], base[1] + last[1]

    def names(self) -> set[str]:
        return set(self._base) | set(self._last)


def _named_counters(document: Any) -> dict[str, tuple[int, int]]:
    return {
        str(item["counter"]["name"]): (
            int(item["counter"]["packets"]),
            int(item["counter"]["bytes"]),
        )
        for item in document.get("nftables", [])
        if "counter" in item
    }


def _hits(found: Mapping[str, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    return {int(name[4:]): v for name, v in found.items() if name.startswith("hit-")}


# --------------------------------------------------------------------------------------------
# Runner


def _command(args: Sequence[str], netns: str | None) -> list[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return [*prefix, "nft", *args]


async def _nft(args: Sequence[str], netns: str | None, stdin: bytes | None = None) -> bytes:
    result = await trio.run_process(
        _command(args, netns),
        stdin=stdin if stdin is not None else b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise NftError(message or f"nft exited with {result.returncode}", result.returncode)
    return bytes(result.stdout)


async def apply(script: str, netns: str | None = None, *, check: bool = True) -> None:
    """Run a script with ``nft -f -`` (in ``ip netns exec <netns>`` if given); one transaction.

    Raises :class:`NftError` with nft's stderr when nft refuses it (nothing is applied then),
    unless ``check`` is false. An empty script runs nothing.
    """
    if not script.strip():
        return
    try:
        await _nft(["-f", "-"], netns, script.encode())
    except NftError:
        if check:
            raise


async def exists(table: str, netns: str | None = None, family: str = "inet") -> bool:
    """Whether the table is there (``nft -t list table``: set contents are not read)."""
    try:
        await _nft(["-t", "list", "table", family, table], netns)
    except NftError as exc:
        if "No such file or directory" in str(exc):
            return False
        raise
    return True


def _objects(output: bytes, kind: str) -> list[dict[str, Any]]:
    document = json.loads(output)
    return [item[kind] for item in document.get("nftables", []) if kind in item]


async def counters(table: str, netns: str | None = None) -> dict[str, int]:
    """Packet counts of the table's named counters, by name."""
    out = await _nft(["-j", "list", "counters", "table", "inet", table], netns)
    return {str(c["name"]): int(c["packets"]) for c in _objects(out, "counter")}


async def read_counters(spec: TableSpec, netns: str | None = None) -> Readings:
    """The hit and drop counters of the tables of ``spec`` (kernel and first-packet modes)."""
    out = await _nft(["-j", "list", "counters", "table", "inet", spec.name], netns)
    routed = _named_counters(json.loads(out))
    fast: dict[str, tuple[int, int]] = {}
    if spec.fast is not None:
        ft = fast_table_name(spec.name)
        fast = _named_counters(
            json.loads(await _nft(["-j", "list", "counters", "table", "netdev", ft], netns))
        )
    return Readings(
        _hits(routed),
        _hits(fast),
        routed.get(NO_FLOW_COUNTER, (0, 0)),
        routed.get(NO_TARGET_COUNTER, (0, 0)),
    )


def _element_key(key: Any) -> range:
    if isinstance(key, dict):
        if "range" in key:
            low, high = key["range"]
            return range(int(low), int(high) + 1)
        if "elem" in key:  # an element with its own attributes (timeout, counter, ...)
            return _element_key(key["elem"]["val"])
        if "prefix" in key:
            raise NftError(f"unexpected map key {key!r}")
    return range(int(key), int(key) + 1)


def _mark_of(value: Any) -> int:
    """A Maglev map element's value as a mark: the target chain's suffix, 0 for no target."""
    if isinstance(value, dict):
        chain = str(value.get("goto", {}).get("target", ""))
        kind, _, mark = chain.partition("-")
        return int(mark) if kind in ("r", "t4", "t6") and mark.isdigit() else 0
    return int(value)


async def map_elements(
    table: str, map_name: str, netns: str | None = None, family: str = "inet"
) -> dict[int, int]:
    """A Maglev map's elements as ``{index: mark}`` (0: no target; intervals expanded)."""
    out = await _nft(["-j", "list", "map", family, table, map_name], netns)
    elements: dict[int, int] = {}
    for found in _objects(out, "map"):
        for key, value in found.get("elem", []):
            for index in _element_key(key):
                elements[index] = _mark_of(value)
    return elements


@dataclass(frozen=True)
class Features:
    """What this kernel's nf_tables offers the LB (see :func:`probe_features`)."""

    native_queue: bool
    """The ``queue`` statement (CONFIG_NFT_QUEUE); else queueing needs iptables NFQUEUE."""
    tproxy: bool
    """The ``tproxy`` expression, whose defragmentation comes without conntrack."""
    fwd: bool
    """``fwd`` in a ``netdev`` table (CONFIG_NFT_FWD_NETDEV): the ingress fast path."""


_PROBES: Final = {
    "native_queue": (
        "table inet meridio-probe {\n\tchain c {\n\t\tmeta l4proto udp queue to 0\n\t}\n}\n"
    ),
    "tproxy": (
        "table inet meridio-probe {\n\tchain c {\n\t\tmeta l4proto tcp tproxy to :1\n\t}\n}\n"
    ),
    "fwd": (
        'table netdev meridio-probe {\n\tchain c {\n\t\tfwd ip to 192.0.2.1 device "lo"\n\t}\n}\n'
    ),
}


async def probe_features(netns: str | None = None) -> Features:
    """Ask the kernel, with ``nft --check`` (nothing is kept), which expressions it has."""
    found = {}
    for name, script in _PROBES.items():
        try:
            await _nft(["--check", "-f", "-"], netns, script.encode())
            found[name] = True
        except NftError:
            found[name] = False
    return Features(**found)
