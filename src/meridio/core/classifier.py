"""Flow classification: which flow, and so which stream, a packet to a VIP belongs to (pure).

A Meridio flow (``nsp.v1.Flow``) is a 5-tuple classifier: destination VIPs, protocols, source
subnets, source and destination port ranges, and a priority. This module checks and normalises
flows once (:func:`parse_flow`, :func:`parse_flows`), then answers per-packet questions
(:meth:`Classifier.lookup`) cheaply enough for a Python NFQUEUE reader. The nftables renderer
(:mod:`meridio.lb.nftables`) renders the same :class:`FlowSpec` objects, so the user-space and
the in-kernel classifications agree by construction.

Semantics (those of nfqlb, the classifier Meridio uses, except where noted)
---------------------------------------------------------------------------
- Flows are tried by **descending priority**, ties broken by flow **name** (nfqlb's order
  among equal priorities is unspecified; ours is deterministic). The first flow that matches
  wins; a packet that matches no flow gets ``None`` (the LB drops it).
- An empty ``protocols`` list, an empty port-range list or one containing ``"any"``, and an
  empty ``source_subnets`` list each mean "anything".
- Source subnets are per family: a flow whose subnets are all IPv6 matches no IPv4 source, and
  ``0.0.0.0/0`` (or ``::/0``) means any source of that family. (nfqlb maps IPv4 into
  ``::ffff:0:0/96``, so there ``::/0`` would also match IPv4 sources; we do not.)
- Port ranges ``"N"`` and ``"N-M"`` are inclusive; overlapping and adjacent ranges are merged.
- **Byte matches** (``byte_matches``, nfqlb's syntax ``proto[offset:length] (& mask)? =
  value``, e.g. ``tcp[2:2] = 4002``; ``length`` 1, 2 or 4; ``proto`` tcp, udp or sctp) compare
  bytes of the packet's L4 header, read as a big-endian number, masked when a non-zero mask is
  given. As in nfqlb, a match applies only to packets of its protocol: ``tcp[2:2] = 4002`` on a
  flow of TCP and UDP restricts the TCP packets and leaves the UDP ones alone; all matches of a
  packet's protocol must hold (AND); ``offset + length`` must lie within the protocol's minimal
  header (TCP 20, UDP 8, SCTP 12 bytes), and a packet too short to hold the bytes does not
  match. An ICMP error is classified by the flow it quotes, and no byte match applies to it
  (its own protocol is ICMP; nfqlb does the same).
- A flow without VIPs never matches; it is left out and reported as a warning, so its traffic
  falls through to lower-priority flows (or to the drop), as is a flow whose fields cannot be
  parsed (the configuration is normally validated by the NSP, see
  :mod:`meridio.core.nspconfig`, so these warnings mean a bug or a newer peer).
- Two flows with the same name: the later one replaces the earlier (as ``nfqlb flow-set``
  does), with a warning.

Lookup cost
-----------
:meth:`Classifier.lookup` takes the packet too when a flow may have byte matches (the readers
pass it; without one, as for a "which target" question, the matches are read from a header
holding only the ports). Flows are pre-bucketed by ``(family, protocol, VIP address bytes)``
in a dict, each bucket a tuple of the candidate flows in match order; a protocol that no flow
at that VIP names falls back to the flows without a protocol restriction. Within a bucket,
port ranges are tuples of ints and source subnets ``(network, mask)`` integer pairs; the
source address is converted to an int only when a candidate flow has subnets. Measured on the
development VM (CPython 3.11.7, ``tests/unit/test_classifier.py::test_lookup_cost_report``):
0.2 µs for a hit on the first candidate, 1.2 µs for a hit on the 21st candidate of a bucket (20
port mismatches, then a source-subnet check), 0.15 µs for a packet to an address that is no VIP.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from meridio.api.nsp.v1 import Flow
from meridio.core.packet import l4_header

__all__ = [
    "L4_HEADER_LENGTHS",
    "PROTOCOLS",
    "ByteMatch",
    "Classifier",
    "FlowError",
    "FlowMatch",
    "FlowSpec",
    "IPAddress",
    "IPNetwork",
    "PortRange",
    "StreamKey",
    "compile_flows",
    "parse_byte_match",
    "parse_flow",
    "parse_flows",
    "parse_port_ranges",
]

StreamKey = tuple[str, str, str]
"""``(trench, conduit, stream)``, as in :mod:`meridio.core.lbstate`."""

PortRange = tuple[int, int]
"""An inclusive ``(low, high)`` port range."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS: Final[dict[str, int]] = {"tcp": 6, "udp": 17, "sctp": 132}
"""Flow protocol names and their IP protocol numbers."""

L4_HEADER_LENGTHS: Final[dict[int, int]] = {6: 20, 17: 8, 132: 12}
"""The minimal header of each flow protocol: where byte matches may look (as in nfqlb)."""

_BYTE_MATCH_RE: Final = re.compile(
    r"\s*(tcp|udp|sctp)\s*\[\s*([0-9]+)\s*:\s*([0-9]+)\s*\]"
    r"(?:\s*&\s*(0x[0-9a-f]+|[0-9]+))?\s*=\s*(0x[0-9a-f]+|[0-9]+)\s*",
    re.IGNORECASE,
)

_PORT_MAX: Final = 65535
_FAMILIES: Final = (4, 6)


class FlowError(ValueError):
    """A flow that cannot be used; the message names the flow."""


@dataclass(frozen=True, slots=True)
class FlowMatch:
    """The answer of a successful lookup: the flow's name and its stream."""

    flow: str
    stream: StreamKey


@dataclass(frozen=True, slots=True)
class ByteMatch:
    """One byte match: ``length`` bytes at ``offset`` of the L4 header of a ``proto`` packet,
    big-endian, ``& mask`` when ``mask`` is not 0, equal to ``value``."""

    proto: int
    offset: int
    length: int
    mask: int
    value: int

    def __str__(self) -> str:
        name = {v: k for k, v in PROTOCOLS.items()}[self.proto]
        mask = f" & 0x{self.mask:x}" if self.mask else ""
        return f"{name}[{self.offset}:{self.length}]{mask} = {self.value}"

    def matches(self, header: bytes | memoryview, start: int, end: int) -> bool:
        """Whether the L4 header at ``header[start:end]`` holds the value."""
        at = start + self.offset
        if at + self.length > end:
            return False
        found = int.from_bytes(header[at : at + self.length], "big")
        if self.mask:
            found &= self.mask
        return found == self.value


def parse_byte_match(text: str) -> ByteMatch:
    """nfqlb's ``proto[offset:length] (& mask)? = value``; ValueError naming what is wrong."""
    found = _BYTE_MATCH_RE.fullmatch(text)
    if found is None:
        raise ValueError(
            f"byte match {text!r} is not (tcp|udp|sctp)[offset:length] (& mask)? = value"
        )
    proto = PROTOCOLS[found[1].lower()]
    offset, length = int(found[2]), int(found[3])
    mask = int(found[4], 0) if found[4] is not None else 0
    value = int(found[5], 0)
    if length not in (1, 2, 4):
        raise ValueError(f"byte match {text!r}: length must be 1, 2 or 4")
    if offset + length > L4_HEADER_LENGTHS[proto]:
        raise ValueError(
            f"byte match {text!r}: bytes {offset}..{offset + length - 1} are beyond the "
            f"{L4_HEADER_LENGTHS[proto]}-byte {found[1].lower()} header"
        )
    if mask >= 256**length or value >= 256**length:
        raise ValueError(f"byte match {text!r}: the mask or value does not fit in {length} bytes")
    return ByteMatch(proto, offset, length, mask, value)


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """A checked, normalised flow. Build it with :func:`parse_flow` (or directly in tests).

    Empty ``protocols``, ``dports``, ``sports`` and ``sources`` mean "any". ``protocols`` are IP
    protocol numbers, sorted; port ranges are merged and sorted; ``vips`` are single addresses,
    sorted IPv4 first; ``sources`` are collapsed networks, sorted IPv4 first; ``byte_matches``
    in the order given (all must hold, each for packets of its protocol).
    """

    name: str
    stream: StreamKey
    vips: tuple[IPAddress, ...]
    priority: int = 0
    protocols: tuple[int, ...] = ()
    dports: tuple[PortRange, ...] = ()
    sports: tuple[PortRange, ...] = ()
    sources: tuple[IPNetwork, ...] = ()
    byte_matches: tuple[ByteMatch, ...] = ()

    @property
    def order(self) -> tuple[int, str]:
        """The sort key of the match order: descending priority, then name."""
        return (-self.priority, self.name)

    def vips_of(self, family: int) -> tuple[IPAddress, ...]:
        return tuple(v for v in self.vips if v.version == family)

    def matches_of(self, proto: int) -> tuple[ByteMatch, ...]:
        """The byte matches that apply to packets of protocol ``proto``."""
        return tuple(m for m in self.byte_matches if m.proto == proto)

    def sources_of(self, family: int) -> tuple[IPNetwork, ...] | None:
        """The source networks of one family: ``None`` for any source, ``()`` for none."""
        if not self.sources:
            return None
        nets = tuple(n for n in self.sources if n.version == family)
        if any(n.prefixlen == 0 for n in nets):
            return None
        return nets


# --------------------------------------------------------------------------------------------
# Parsing


def parse_port_ranges(values: Iterable[str | int]) -> tuple[PortRange, ...]:
    """``"any"``, ``"N"`` and ``"N-M"`` strings to merged, sorted ranges; ``()`` means any.

    Raises ValueError for anything else, a port above 65535 or a range that ends before it
    starts. A result covering 0..65535 is returned as ``()`` too.
    """
    ranges: list[PortRange] = []
    for value in values:
        text = str(value).strip().lower()
        if text == "any":
            return ()
        low_text, sep, high_text = text.partition("-")
        try:
            low = int(low_text.strip())
            high = int(high_text.strip()) if sep else low
        except ValueError:
            raise ValueError(f'port range {value!r} is not "any", "N" or "N-M"') from None
        if not 0 <= low <= high <= _PORT_MAX:
            raise ValueError(f"port range {value!r} is not within 0..{_PORT_MAX} in order")
        ranges.append((low, high))
    ranges.sort()
    merged: list[PortRange] = []
    for low, high in ranges:
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    if merged == [(0, _PORT_MAX)]:
        return ()
    return tuple(merged)


def _protocols(values: Iterable[str]) -> tuple[int, ...]:
    numbers: set[int] = set()
    for value in values:
        number = PROTOCOLS.get(value.strip().lower())
        if number is None:
            raise ValueError(f"protocol {value!r} is not one of {', '.join(PROTOCOLS)}")
        numbers.add(number)
    return tuple(sorted(numbers))


def _vips(values: Iterable[str]) -> tuple[IPAddress, ...]:
    found: set[IPAddress] = set()
    for text in values:
        try:
            iface = ipaddress.ip_interface(text.strip())
        except ValueError:
            raise ValueError(f"VIP address {text!r} is not an address or CIDR") from None
        if iface.network.prefixlen != iface.max_prefixlen:
            raise ValueError(f"VIP address {text!r} is not a single address (/32 or /128)")
        found.add(iface.ip)
    return tuple(sorted(found, key=lambda a: (a.version, int(a))))


def _sources(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for text in values:
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(f"source subnet {text!r} is not a CIDR") from None
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))


def parse_flow(flow: Flow) -> FlowSpec:
    """Check and normalise one ``nsp.v1.Flow``; raises :class:`FlowError` if it cannot match."""
    name = str(flow.name)
    stream = flow.stream
    if stream is None or not stream.name:
        raise FlowError(f"flow {name!r}: no stream; it never matches")
    conduit = stream.conduit
    trench = None if conduit is None else conduit.trench
    key: StreamKey = (
        "" if trench is None else str(trench.name),
        "" if conduit is None else str(conduit.name),
        str(stream.name),
    )
    try:
        vips = _vips(str(v.address) for v in flow.vips)
        spec = FlowSpec(
            name=name,
            stream=key,
            vips=vips,
            priority=int(flow.priority),
            protocols=_protocols(flow.protocols),
            dports=parse_port_ranges(flow.destination_port_ranges),
            sports=parse_port_ranges(flow.source_port_ranges),
            sources=_sources(flow.source_subnets),
            byte_matches=tuple(parse_byte_match(str(b)) for b in flow.byte_matches),
        )
    except ValueError as exc:
        raise FlowError(f"flow {name!r}: {exc}; it never matches") from None
    if not vips:
        raise FlowError(f"flow {name!r}: no VIPs; it never matches")
    return spec


def parse_flows(flows: Iterable[Flow]) -> tuple[tuple[FlowSpec, ...], tuple[str, ...]]:
    """Parse many flows: the usable ones in match order, and a warning for each one left out."""
    by_name: dict[str, FlowSpec] = {}
    warnings: list[str] = []
    for flow in flows:
        name = str(flow.name)
        if name in by_name:
            warnings.append(f"flow {name!r} is defined twice; the later definition is used")
            del by_name[name]
        try:
            by_name[name] = parse_flow(flow)
        except FlowError as exc:
            warnings.append(str(exc))
    return tuple(sorted(by_name.values(), key=lambda s: s.order)), tuple(warnings)


# --------------------------------------------------------------------------------------------
# Lookup

# One candidate in a bucket: dport ranges, source (network, mask) pairs, sport ranges (each
# None for "any"), byte matches (None for none), and the shared answer.
_Ranges = tuple[PortRange, ...] | None
_Nets = tuple[tuple[int, int], ...] | None
_Checks = tuple[ByteMatch, ...] | None
_Entry = tuple[_Ranges, _Nets, _Ranges, _Checks, FlowMatch]
# Where byte matches read: (L4 protocol, bytes, start of the L4 header, end of the packet)
_Header = tuple[int, bytes | memoryview, int, int]


def _net_pairs(nets: tuple[IPNetwork, ...] | None) -> _Nets:
    if nets is None:
        return None
    return tuple((int(n.network_address), int(n.netmask)) for n in nets)


def _header(packet: bytes | memoryview | None, proto: int, sport: int, dport: int) -> _Header:
    """Where the byte matches of a lookup read: the packet's own L4 header, or without a
    packet a header holding only the ports."""
    if packet is None:
        return proto, sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(16), 0, 20
    found = l4_header(packet)
    if found is None:  # no L4 header to read (a later fragment): no byte match holds
        return proto, b"", 0, 0
    l4proto, start, end = found
    return l4proto, packet, start, end


class Classifier:
    """Flows compiled for per-packet lookups. Immutable once built; rebuild on any change."""

    __slots__ = ("_buckets", "_other", "flows", "warnings")

    def __init__(self, flows: Iterable[FlowSpec], warnings: Sequence[str] = ()) -> None:
        ordered = sorted(flows, key=lambda s: s.order)
        self.flows: tuple[FlowSpec, ...] = tuple(ordered)
        """The flows in match order."""
        self.warnings: tuple[str, ...] = tuple(warnings)
        """The flows left out by :meth:`compile`, one message each."""

        # (family, vip bytes) -> candidates as (rank, entry), per protocol and "any protocol"
        explicit: dict[tuple[int, bytes], dict[int, list[tuple[int, _Entry]]]] = {}
        wildcard: dict[tuple[int, bytes], list[tuple[int, _Entry]]] = {}
        for rank, spec in enumerate(ordered):
            match = FlowMatch(spec.name, spec.stream)
            for family in _FAMILIES:
                vips = spec.vips_of(family)
                sources = spec.sources_of(family)
                if not vips or sources == ():
                    continue  # no address of this family can match
                entry = (
                    spec.dports or None,
                    _net_pairs(sources),
                    spec.sports or None,
                    spec.byte_matches or None,
                    match,
                )
                for vip in vips:
                    where = (family, vip.packed)
                    if spec.protocols:
                        per_proto = explicit.setdefault(where, {})
                        for proto in spec.protocols:
                            per_proto.setdefault(proto, []).append((rank, entry))
                    else:
                        wildcard.setdefault(where, []).append((rank, entry))
        # A protocol bucket also holds the "any protocol" flows of its VIP, in match order; a
        # protocol no flow names at that VIP falls back to those alone (``_other``).
        self._buckets: dict[tuple[int, int, bytes], tuple[_Entry, ...]] = {}
        for (family, packed), per_proto in explicit.items():
            extra = wildcard.get((family, packed), [])
            for proto, entries in per_proto.items():
                merged = sorted((*entries, *extra), key=lambda item: item[0])
                self._buckets[(family, proto, packed)] = tuple(e for _, e in merged)
        self._other: dict[tuple[int, bytes], tuple[_Entry, ...]] = {
            where: tuple(e for _, e in entries) for where, entries in wildcard.items()
        }

    @classmethod
    def compile(cls, flows: Iterable[Flow]) -> Classifier:
        """Parse ``nsp.v1.Flow`` messages and compile them; unusable ones go to ``warnings``."""
        specs, warnings = parse_flows(flows)
        return cls(specs, warnings)

    def lookup(
        self,
        family: int,
        proto: int,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        packet: bytes | memoryview | None = None,
    ) -> FlowMatch | None:
        """The first flow (in match order) the packet matches, or None.

        ``family`` is 4 or 6, ``proto`` the IP protocol number, ``src``/``dst`` the packed
        addresses (4 or 16 bytes, as in the IP header), ports as host integers (for an ICMP
        error, those of the flow it quotes). ``packet`` (from the IP header on) is read only
        by byte matches; without it they read a header holding only the ports.
        """
        entries = self._buckets.get((family, proto, dst))
        if entries is None:
            entries = self._other.get((family, dst))
            if entries is None:
                return None
        src_int = -1
        header: _Header | None = None
        for dports, nets, sports, checks, match in entries:
            if dports is not None:
                for low, high in dports:
                    if low <= dport <= high:
                        break
                else:
                    continue
            if nets is not None:
                if src_int < 0:
                    src_int = int.from_bytes(src, "big")
                for network, mask in nets:
                    if src_int & mask == network:
                        break
                else:
                    continue
            if sports is not None:
                for low, high in sports:
                    if low <= sport <= high:
                        break
                else:
                    continue
            if checks is not None:
                if header is None:
                    header = _header(packet, proto, sport, dport)
                l4proto, data, start, end = header
                if not all(m.matches(data, start, end) for m in checks if m.proto == l4proto):
                    continue
            return match
        return None


def compile_flows(flows: Iterable[Flow]) -> Classifier:
    """Same as :meth:`Classifier.compile`."""
    return Classifier.compile(flows)
