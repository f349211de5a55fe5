"""The LB's reconcile plan: the ordered steps from what the kernel has to what it should have.

Pure: the role observes the kernel (rules and routes it owns), computes the desired state
(:mod:`meridio.core.lbstate`), asks :func:`plan` for the steps and executes them in order.

The order is the point (make before break):

1. routes of new targets (and of targets whose address changed) go in first;
2. then the rules that send marked packets to those tables; a rule whose route could not be
   installed (the target's subnet not reachable yet) is skipped by the executor: a rule never
   points at a table without its route;
3. then the data path (the Maglev tables) starts using the new targets and stops using the
   removed ones;
4. then the rules of removed targets go;
5. then their routes (a table that is still wanted got its new route in step 1, by replace);
6. in first-packet mode, conntrack entries still carrying a removed target's mark are forgotten,
   so its flows are balanced again instead of following a stale mark.

Applying the steps and planning again from the result gives no routing step: a plan is complete.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meridio.core.lbstate import RouteSpec, RuleSpec


@dataclass(frozen=True, slots=True)
class AddRoute:
    route: RouteSpec


@dataclass(frozen=True, slots=True)
class AddRule:
    rule: RuleSpec


@dataclass(frozen=True, slots=True)
class InstallDatapath:
    """Load the new tables into the data path (nft maps, readers)."""


@dataclass(frozen=True, slots=True)
class DeleteRule:
    rule: RuleSpec


@dataclass(frozen=True, slots=True)
class DeleteRoute:
    route: RouteSpec


@dataclass(frozen=True, slots=True)
class ForgetConnections:
    marks: tuple[int, ...]


Step = AddRoute | AddRule | InstallDatapath | DeleteRule | DeleteRoute | ForgetConnections


@dataclass(frozen=True)
class Observed:
    """The rules and routes of ours the kernel has (read back, or as last installed)."""

    rules: frozenset[RuleSpec]
    routes: frozenset[RouteSpec]


def plan(
    desired_rules: Iterable[RuleSpec],
    desired_routes: Iterable[RouteSpec],
    observed: Observed,
    *,
    forget_connections: bool = False,
) -> list[Step]:
    """The ordered steps from ``observed`` to the desired rules and routes."""
    want_rules, want_routes = frozenset(desired_rules), frozenset(desired_routes)
    steps: list[Step] = [AddRoute(r) for r in sorted(want_routes - observed.routes)]
    steps += [AddRule(r) for r in sorted(want_rules - observed.rules)]
    steps.append(InstallDatapath())
    gone_rules = sorted(observed.rules - want_rules)
    steps += [DeleteRule(r) for r in gone_rules]
    kept_tables = {(r.family, r.table) for r in want_routes}
    steps += [
        DeleteRoute(r)
        for r in sorted(observed.routes - want_routes)
        if (r.family, r.table) not in kept_tables  # else replaced by an AddRoute above
    ]
    if forget_connections:
        gone = {r.fwmark for r in gone_rules} - {r.fwmark for r in want_rules}
        if gone:
            steps.append(ForgetConnections(tuple(sorted(gone))))
    return steps


def installed_after(
    desired_rules: Iterable[RuleSpec],
    desired_routes: Iterable[RouteSpec],
    failed_routes: Iterable[RouteSpec],
    observed: Observed,
) -> Observed:
    """What the kernel holds once a plan from ``observed`` ran with ``failed_routes`` not
    installed: their new rules were skipped, and a table whose route could not be replaced
    keeps its old route and rule."""
    failed = frozenset(failed_routes)
    blocked = {(r.family, r.table) for r in failed}
    want_rules = frozenset(desired_rules)
    return Observed(
        rules=frozenset(
            r for r in want_rules if (r.family, r.table) not in blocked or r in observed.rules
        ),
        routes=frozenset(r for r in desired_routes if r not in failed)
        | frozenset(r for r in observed.routes if (r.family, r.table) in blocked),
    )


def blocked_by(failed: Iterable[RouteSpec]) -> set[tuple[int, int]]:
    """(family, table) of routes that failed: their rules must not go in."""
    return {(r.family, r.table) for r in failed}


def routing_changes(steps: Sequence[Step]) -> dict[str, int]:
    """How many of each routing step, for the log."""
    counts = {"routes_added": 0, "rules_added": 0, "rules_removed": 0, "routes_removed": 0}
    for step in steps:
        if isinstance(step, AddRoute):
            counts["routes_added"] += 1
        elif isinstance(step, AddRule):
            counts["rules_added"] += 1
        elif isinstance(step, DeleteRule):
            counts["rules_removed"] += 1
        elif isinstance(step, DeleteRoute):
            counts["routes_removed"] += 1
    return counts
