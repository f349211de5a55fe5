"""The load balancer's desired state, computed from what the NSP says (pure, no I/O).

Inputs are the streams of the LB's conduit (with their max-targets) and the enabled targets
registered for them. Outputs are per-stream fwmark offsets, the targets each stream balances
over, and the ip rules and routes that send a marked packet to its target. The reconcile task
compares these with the kernel and applies only the difference.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


Item = TypeVar("Item", bound=_Ordered)

StreamKey = tuple[str, str, str]  # (trench, conduit, stream)


@dataclass(frozen=True, slots=True)
class StreamSpec:
    key: StreamKey
    max_targets: int


@dataclass(frozen=True, slots=True)
class TargetSpec:
    stream: StreamKey
    identifier: int
    ips: tuple[str, ...]  # as registered: addresses or CIDRs, one or more per family


@dataclass(frozen=True, slots=True, order=True)
class RuleSpec:
    """``ip rule add fwmark <fwmark> lookup <table> priority <priority>`` in one family."""

    family: int
    fwmark: int
    table: int
    priority: int


@dataclass(frozen=True, slots=True, order=True)
class RouteSpec:
    """``ip route replace default via <gateway> table <table>`` in one family."""

    family: int
    table: int
    gateway: str


@dataclass(frozen=True)
class StreamState:
    spec: StreamSpec
    offset: int
    targets: Mapping[int, TargetSpec]  # identifier -> target

    def mark(self, identifier: int) -> int:
        return self.offset + identifier


@dataclass(frozen=True)
class DesiredState:
    streams: Mapping[StreamKey, StreamState]
    rules: frozenset[RuleSpec]
    routes: frozenset[RouteSpec]
    problems: tuple[str, ...] = field(default=())


def assign_offsets(
    streams: Iterable[StreamSpec], previous: Mapping[StreamKey, int], start: int
) -> dict[StreamKey, int]:
    """Give every stream a fwmark range ``offset+1 .. offset+max_targets`` that overlaps no other.

    Streams keep the offset they had while it still fits, so a new stream never renumbers the
    marks (and the rules) of the others; new streams take the lowest free range, in name order.
    """
    ordered = sorted(streams, key=lambda s: s.key)
    taken: list[tuple[int, int]] = []
    result: dict[StreamKey, int] = {}

    def free(lo: int, hi: int) -> bool:
        return all(hi < a or lo > b for a, b in taken)

    for spec in ordered:
        old = previous.get(spec.key)
        if old is not None and old >= start and free(old + 1, old + spec.max_targets):
            result[spec.key] = old
            taken.append((old + 1, old + spec.max_targets))
    for spec in ordered:
        if spec.key in result:
            continue
        offset = start
        while not free(offset + 1, offset + spec.max_targets):
            hi = offset + spec.max_targets
            offset = max(b for a, b in taken if not (hi < a or offset + 1 > b))
        result[spec.key] = offset
        taken.append((offset + 1, offset + spec.max_targets))
    return result


def _family_of(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_interface(ip).version == 6 else socket.AF_INET


def gateway_of(ip: str) -> str:
    return str(ipaddress.ip_interface(ip).ip)


def desired_state(
    streams: Iterable[StreamSpec],
    targets: Iterable[TargetSpec],
    previous_offsets: Mapping[StreamKey, int],
    *,
    offset_start: int = 5000,
    rule_priority: int = 100,
) -> DesiredState:
    """Everything the LB should have installed for these streams and targets.

    Targets of unknown streams, with an identifier outside 1..max-targets, or sharing an
    identifier with another target of the stream are left out and reported in ``problems``
    (for a shared identifier the target with the lowest address list wins, on every LB alike).
    """
    specs = {s.key: s for s in streams}
    offsets = assign_offsets(specs.values(), previous_offsets, offset_start)
    problems: list[str] = []
    chosen: dict[StreamKey, dict[int, TargetSpec]] = {key: {} for key in specs}
    for target in sorted(targets, key=lambda t: (t.stream, t.identifier, t.ips)):
        spec = specs.get(target.stream)
        name = "/".join(target.stream)
        if spec is None:
            problems.append(f"target {','.join(target.ips)}: stream {name} is not served")
            continue
        if not 1 <= target.identifier <= spec.max_targets:
            problems.append(
                f"target {','.join(target.ips)}: identifier {target.identifier} "
                f"outside 1..{spec.max_targets} of stream {name}"
            )
            continue
        current = chosen[target.stream].get(target.identifier)
        if current is not None:
            problems.append(
                f"target {','.join(target.ips)}: identifier {target.identifier} of stream "
                f"{name} already used by {','.join(current.ips)}"
            )
            continue
        chosen[target.stream][target.identifier] = target

    rules: set[RuleSpec] = set()
    routes: set[RouteSpec] = set()
    states: dict[StreamKey, StreamState] = {}
    for key, spec in specs.items():
        state = StreamState(spec, offsets[key], chosen[key])
        states[key] = state
        for identifier, target in state.targets.items():
            mark = state.mark(identifier)
            seen_families: set[int] = set()
            for ip in target.ips:
                family = _family_of(ip)
                if family in seen_families:
                    continue  # one next hop per family and target
                seen_families.add(family)
                rules.add(RuleSpec(family, mark, mark, rule_priority))
                routes.add(RouteSpec(family, mark, gateway_of(ip)))
    return DesiredState(states, frozenset(rules), frozenset(routes), tuple(problems))


def plan(current: Iterable[Item], desired: Iterable[Item]) -> tuple[list[Item], list[Item]]:
    """(to add, to remove) that turn ``current`` into ``desired``, in a stable order."""
    have, want = set(current), set(desired)
    return sorted(want - have), sorted(have - want)
