"""The LB's ``kernel`` mode: flows, Maglev tables and fwmarks as one nftables table.

Rendering is pure (:func:`render_table`, :func:`render_map_update`, :func:`render_delete`); a
thin runner (:func:`apply`, :func:`counters`, :func:`map_elements`) feeds scripts to ``nft -f -``
and reads state back with ``nft -j``, optionally inside a network namespace.

The table (``inet meridio-lb`` by default)
------------------------------------------
::

    counter no-flow, no-target, icmp-error, flow-<flow> (one per flow)
    set vips4 { type ipv4_addr; flags interval }      every VIP: the spec's and the flows'
    set vips6 { type ipv6_addr; flags interval }
    map stream-<stream> { typeof numgen random mod M : meta mark }   Maglev table, index -> mark
    chain defrag      hook prerouting priority raw (-300): VIP traffic is ``notrack``
    chain conntrack   not hooked; its ``ct`` rule makes the kernel load nf_defrag (see below)
    chain prerouting  hook prerouting priority mangle (-150): VIP destinations jump to ``vips``
    chain vips        ICMP errors: accept unmarked; then one rule per flow and family, in match
                      order (descending priority, then name):
                        ip daddr {VIPs} [meta l4proto {..}] [th dport {..}] [th sport {..}]
                        [ip saddr {..}] counter name "flow-<flow>"
                        meta mark set jhash ip saddr . ip daddr . th sport . th dport
                            mod M seed S map @stream-<stream> goto verdict
                      (the same with ip6); finally: counter name "no-flow" drop
    chain verdict     meta mark != 0 accept; otherwise counter name "no-target" and drop
                      (or reject: TCP reset, else ICMP/ICMPv6 port unreachable)

Decisions, each checked on nft 1.0.6 / kernel 6.18 (see tests/netns/test_nftables_kernel.py):

- **Map key type.** ``typeof numgen random mod M : meta mark`` loads, lists and works as the
  target of a ``jhash ... map @m`` lookup. ``typeof jhash ip saddr mod 2 : meta mark`` also
  loads, but ``nft list`` of such a table **segfaults** in nft 1.0.6, so it is not used.
  (``type mark : mark`` is refused with "datatype mismatch".)
- **No target.** Every index 0..M-1 is always in the map; a mark of 0 means "no target". A map
  lookup that misses would make the rule *break* and fall through to lower-priority flows,
  which nfqlb does not do (a packet belongs to the first flow it matches, target or not).
  Keeping all M elements makes the lookup always succeed; the ``verdict`` chain then accepts
  marked packets and counts and drops (or rejects) mark 0. A side effect: an update never has
  to know whether an element exists, it is always "delete, then add" (see below).
- **Updates.** ``add element`` of an existing key with another value fails with "File exists"
  on nft 1.0.6 (there is no ``replace``/``destroy`` element yet), so a changed entry is deleted
  and added again in the same transaction; one ``nft -f`` script is one atomic batch.
- **Interval maps.** ``flags interval`` on the map works with the jhash lookup (checked bucket by
  bucket against the user-space jhash), so runs of consecutive indexes with one mark could be
  ``a-b : mark`` elements. It is not used: in a Maglev table neighbouring entries rarely
  share a target. With M = 10007 the table has 6200 runs for 2 targets, 8522 for 10 and 9961
  for 100 (only 1 target, or none, collapses to one element), while updates would have to
  split and merge intervals and the kernel keeps two internal elements per interval.
- **ICMP errors** (destination-unreachable, time-exceeded, parameter-problem, and for IPv6 also
  packet-too-big) to a VIP are accepted **unmarked** before any flow rule: ``th`` would read their
  type/code and checksum as ports. An iptables NFQUEUE rule (:mod:`meridio.lb.iptables`) hands them
  to user space, which hashes the quoted packet.
- **Fragments.** Non-first fragments carry no ports, so VIP traffic must be reassembled before
  the ``vips`` chain. ``notrack`` alone does not register the kernel's defragmentation hooks
  (checked: the mangle chain still saw 3 fragments); any rule with a ``ct`` expression in the
  namespace does (nf_defrag hooks at -400, before ``defrag`` at -300). The unhooked
  ``conntrack`` chain holds such a rule and is never traversed; the ``defrag`` chain then marks
  VIP traffic untracked, so it is reassembled but gets no conntrack entry (as Meridio does).
  Note the ``ct`` expression turns conntrack on for the namespace's other traffic.
- The whole table is replaced atomically (``table inet X {}`` + ``delete table inet X`` + the new
  table, in one script). A reload resets the counters.

Load times (``nft -f`` through ``ip netns exec``, nft 1.0.6, kernel 6.18, 2-vCPU VM; measured
by ``python -m bench.bench_maglev nft``): the whole table with two 10007-entry
maps loads in about 75 ms, with one 65537-entry map in about 215 ms (a replacement of an
existing table costs the same); 4096 entries took 29 ms in the reference measurement. The size
of the ``add element`` chunks (1024, 8192 or all in one) makes no measurable difference. Reading
a 65537-entry map back with ``nft -j`` takes 0.3-0.5 s; updating 6554 entries about 40-80 ms,
100 entries about 14 ms; an empty ``nft`` run about 3-15 ms.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from meridio.core.classifier import FlowSpec, IPAddress, IPNetwork, PortRange, StreamKey

__all__ = [
    "CHUNK",
    "DEFAULT_SEED",
    "DEFAULT_TABLE",
    "ICMP_ERROR_COUNTER",
    "NO_FLOW_COUNTER",
    "NO_TARGET_COUNTER",
    "NftError",
    "StreamMap",
    "TableSpec",
    "apply",
    "counters",
    "exists",
    "flow_counter_name",
    "map_elements",
    "render_delete",
    "render_map_update",
    "render_table",
]

DEFAULT_TABLE: Final = "meridio-lb"
DEFAULT_SEED: Final = 0x4D455249
"""The jhash seed. Every LB instance of a trench must use the same one (stateless LBs agree)."""

NO_FLOW_COUNTER: Final = "no-flow"
NO_TARGET_COUNTER: Final = "no-target"
ICMP_ERROR_COUNTER: Final = "icmp-error"

CHUNK: Final = 8192
"""Elements per ``add element``/``delete element`` statement."""

_MARK_MAX: Final = 0xFFFFFFFF
_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_IDENT_RE: Final = re.compile(r"[^A-Za-z0-9_-]")
_PROTO_NAMES: Final = {6: "tcp", 17: "udp", 132: "sctp"}
_ICMP_ERRORS: Final = "destination-unreachable, time-exceeded, parameter-problem"
_ICMPV6_ERRORS: Final = "destination-unreachable, packet-too-big, time-exceeded, parameter-problem"
_L3: Final = {4: "ip", 6: "ip6"}


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


def flow_counter_name(flow: str) -> str:
    """The named counter that counts the packets matching a flow."""
    return f"flow-{_ident(flow)}"


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


@dataclass(frozen=True)
class TableSpec:
    """Everything :func:`render_table` needs. Checked on construction (ValueError).

    ``flows`` come from :func:`meridio.core.classifier.parse_flows` (byte-match flows are
    already left out); every flow's stream must have a map in ``streams``. ``vips`` are extra
    VIP CIDRs (e.g. all of the trench's): traffic to them that matches no flow is counted as
    ``no-flow`` and dropped; the flows' own VIPs are always included.
    """

    streams: tuple[StreamMap, ...]
    flows: tuple[FlowSpec, ...]
    seed: int = DEFAULT_SEED
    name: str = DEFAULT_TABLE
    vips: tuple[str, ...] = ()
    reject_no_target: bool = False
    defrag: bool = True
    """Reassemble fragments of VIP traffic before the flows (costs a conntrack hook per packet)."""
    _map_names: dict[StreamKey, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"table name {self.name!r} is not [A-Za-z][A-Za-z0-9_-]{{0,63}}")
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
        for vip in self.vips:
            ipaddress.ip_interface(vip)  # ValueError if it is not a CIDR
        # map names: stream-<stream name>, plus a digest of the whole key when two streams of
        # different conduits/trenches share a name
        bases = {key: _ident(key[2]) for key in keys}
        seen = Counter(bases.values())
        names_by_key = {
            key: f"stream-{base}" if seen[base] == 1 else f"stream-{base}-{_digest('/'.join(key))}"
            for key, base in bases.items()
        }
        object.__setattr__(self, "_map_names", names_by_key)

    def map_name(self, key: StreamKey) -> str:
        """The name of a stream's map in this table (for :func:`render_map_update`)."""
        return self._map_names[key]

    def structure(self) -> tuple[object, ...]:
        """Everything but the map entries. While it stays equal, :func:`render_map_update`
        scripts are enough; when it changes, load :func:`render_table` again."""
        maps = tuple((s.key, s.modulus) for s in self.streams)
        return (
            self.name,
            self.seed,
            maps,
            self.flows,
            self.vips,
            self.reject_no_target,
            self.defrag,
        )

    def ordered_flows(self) -> tuple[FlowSpec, ...]:
        return tuple(sorted(self.flows, key=lambda f: f.order))

    def vip_networks(self, family: int) -> list[IPNetwork]:
        """The ``vips4``/``vips6`` set contents: the spec's VIPs and the flows', collapsed."""
        texts = [*self.vips, *(str(a) for f in self.flows for a in f.vips)]
        nets = [ipaddress.ip_interface(t).network for t in texts]
        if family == 4:
            v4 = (n for n in nets if isinstance(n, ipaddress.IPv4Network))
            return list(ipaddress.collapse_addresses(v4))
        v6 = (n for n in nets if isinstance(n, ipaddress.IPv6Network))
        return list(ipaddress.collapse_addresses(v6))


# --------------------------------------------------------------------------------------------
# Rendering


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


def _chunks(items: Sequence[str]) -> Iterator[str]:
    for start in range(0, len(items), CHUNK):
        yield ", ".join(items[start : start + CHUNK])


def _elements(table: str, map_name: str, items: Sequence[str], verb: str = "add") -> list[str]:
    return [f"{verb} element inet {table} {map_name} {{ {chunk} }}" for chunk in _chunks(items)]


def _flow_rules(flow: FlowSpec, map_name: str, modulus: int, seed: int) -> list[str]:
    rules: list[str] = []
    for family, l3 in _L3.items():
        vips = flow.vips_of(family)
        sources = flow.sources_of(family)
        if not vips or sources == ():
            continue  # no packet of this family can match
        parts = [f"{l3} daddr {_match([str(a) for a in vips])}"]
        if flow.protocols:
            protos = [_PROTO_NAMES.get(p, str(p)) for p in flow.protocols]
            parts.append(f"meta l4proto {_match(protos)}")
        # a range covering every port is no condition: leave it out of the packet path
        if flow.dports and not _every_port(flow.dports):
            parts.append(f"th dport {_ports(flow.dports)}")
        if flow.sports and not _every_port(flow.sports):
            parts.append(f"th sport {_ports(flow.sports)}")
        if sources is not None:
            parts.append(f"{l3} saddr {_match([str(a) for a in sources])}")
        parts.append(f'counter name "{flow_counter_name(flow.name)}"')
        parts.append(
            f"meta mark set jhash {l3} saddr . {l3} daddr . th sport . th dport"
            f" mod {modulus} seed 0x{seed:08x} map @{map_name}"
        )
        parts.append("goto verdict")
        rules.append(" ".join(parts))
    return rules


def render_table(spec: TableSpec) -> str:
    """An nft script that atomically (re)creates the whole table, maps filled."""
    t = spec.name
    out = [f"table inet {t} {{}}", f"delete table inet {t}", f"table inet {t} {{"]
    counter_names = [NO_FLOW_COUNTER, NO_TARGET_COUNTER, ICMP_ERROR_COUNTER]
    counter_names += [flow_counter_name(f.name) for f in spec.ordered_flows()]
    out += [f"\tcounter {name} {{ }}" for name in counter_names]
    for family, set_type in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        out += [f"\tset vips{family} {{", f"\t\ttype {set_type}", "\t\tflags interval"]
        nets = spec.vip_networks(family)
        if nets:
            out.append(f"\t\telements = {_addresses(nets)}")
        out.append("\t}")
    streams = {s.key: s for s in spec.streams}
    for stream in spec.streams:
        name = spec.map_name(stream.key)
        out += [
            f"\tmap {name} {{",
            f"\t\ttypeof numgen random mod {stream.modulus} : meta mark",
            "\t}",
        ]
    if spec.defrag:
        # Any ct expression registers nf_defrag, so chains after priority -400 see whole
        # datagrams; notrack keeps VIP flows out of the conntrack table all the same.
        out += [
            "\tchain defrag {",
            "\t\ttype filter hook prerouting priority raw; policy accept;",
            "\t\tip daddr @vips4 notrack",
            "\t\tip6 daddr @vips6 notrack",
            "\t}",
            "\tchain conntrack {",
            "\t\tct state untracked accept",
            "\t}",
        ]
    out += [
        # ICMP errors about VIP flows are left unmarked for the user-space reader (the nft rule
        # would hash their type and checksum); only ICMP packets take this detour.
        "\tchain icmp-errors {",
        f'\t\tip daddr @vips4 icmp type {{ {_ICMP_ERRORS} }} counter name "{ICMP_ERROR_COUNTER}"'
        " accept",
        f"\t\tip6 daddr @vips6 icmpv6 type {{ {_ICMPV6_ERRORS} }}"
        f' counter name "{ICMP_ERROR_COUNTER}" accept',
        "\t}",
        # Flow rules sit directly in the hooked chain (each matches its VIPs itself): the
        # common packet takes no extra jump before its hash.
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority mangle; policy accept;",
        "\t\tmeta l4proto { icmp, ipv6-icmp } jump icmp-errors",
    ]
    for flow in spec.ordered_flows():
        stream = streams[flow.stream]
        rules = _flow_rules(flow, spec.map_name(flow.stream), stream.modulus, spec.seed)
        out += [f"\t\t{rule}" for rule in rules]
    out += [
        f'\t\tip daddr @vips4 counter name "{NO_FLOW_COUNTER}" drop',
        f'\t\tip6 daddr @vips6 counter name "{NO_FLOW_COUNTER}" drop',
        "\t}",
        "\tchain verdict {",
        "\t\tmeta mark != 0 accept",
    ]
    if spec.reject_no_target:
        out += [
            f'\t\tmeta l4proto tcp counter name "{NO_TARGET_COUNTER}" reject with tcp reset',
            f'\t\tcounter name "{NO_TARGET_COUNTER}" reject with icmpx port-unreachable',
        ]
    else:
        out.append(f'\t\tcounter name "{NO_TARGET_COUNTER}" drop')
    out += ["\t}", "}"]
    for stream in spec.streams:
        items = [f"{i} : {mark}" for i, mark in enumerate(stream.entries)]
        out += _elements(t, spec.map_name(stream.key), items)
    return "\n".join(out) + "\n"


def render_map_update(table: str, map_name: str, changes: Iterable[tuple[int, int | None]]) -> str:
    """One atomic script that sets the given entries of a map: ``(index, mark)``.

    A mark of ``None`` or 0 means "no target". Later changes to an index win. Each changed index
    is deleted and added again (nft 1.0.6 cannot replace an element's value); the map holds
    every index 0..M-1 (:func:`render_table` fills it), so the delete always finds it. Returns
    ``""`` when there is nothing to change (:func:`apply` then does nothing).
    """
    final: dict[int, int] = {}
    for index, mark in changes:
        value = 0 if mark is None else mark
        if index < 0 or not 0 <= value <= _MARK_MAX:
            raise ValueError(f"bad map entry {index} : {mark}")
        final[index] = value
    if not final:
        return ""
    indexes = sorted(final)
    out = _elements(table, map_name, [str(i) for i in indexes], verb="delete")
    out += _elements(table, map_name, [f"{i} : {final[i]}" for i in indexes])
    return "\n".join(out) + "\n"


def render_delete(table: str) -> str:
    """A script that removes the table, whether it exists or not."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


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


async def exists(table: str, netns: str | None = None) -> bool:
    """Whether the table is there (``nft -t list table``: set contents are not read)."""
    try:
        await _nft(["-t", "list", "table", "inet", table], netns)
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


async def map_elements(table: str, map_name: str, netns: str | None = None) -> dict[int, int]:
    """A map's elements as ``{index: mark}`` (interval elements expanded)."""
    out = await _nft(["-j", "list", "map", "inet", table, map_name], netns)
    elements: dict[int, int] = {}
    for found in _objects(out, "map"):
        for key, value in found.get("elem", []):
            for index in _element_key(key):
                elements[index] = int(value)
    return elements
