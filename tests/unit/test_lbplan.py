"""The LB's reconcile planner: make before break, complete, and safe when routes fail."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from meridio.core import lbplan
from meridio.core.lbstate import RouteSpec, RuleSpec, StreamSpec, TargetSpec, desired_state

STREAM = ("trench-a", "conduit-a", "stream-a")
SPEC = StreamSpec(STREAM, 16)


def targets_from(assignments: dict[int, int]) -> list[TargetSpec]:
    """identifier -> host number: one IPv4 and one IPv6 address per target."""
    return [
        TargetSpec(STREAM, identifier, (f"198.18.0.{host}", f"fd00:20::{host:x}"))
        for identifier, host in sorted(assignments.items())
    ]


class FakeKernel:
    """Rules and routes of the LB, with routes that may refuse to go in."""

    def __init__(self) -> None:
        self.rules: set[RuleSpec] = set()
        self.routes: dict[tuple[int, int], RouteSpec] = {}  # one default route per table

    def observed(self) -> lbplan.Observed:
        return lbplan.Observed(frozenset(self.rules), frozenset(self.routes.values()))

    def check(self) -> None:
        for rule in self.rules:
            assert (rule.family, rule.table) in self.routes, f"{rule} points at an empty table"

    def run(self, steps: list[lbplan.Step], unreachable: set[str]) -> list[RouteSpec]:
        """Execute like the role does; after every step no rule points at a missing route."""
        failed: list[RouteSpec] = []
        blocked: set[tuple[int, int]] = set()
        for step in steps:
            if isinstance(step, lbplan.AddRoute):
                if step.route.gateway in unreachable:
                    failed.append(step.route)
                    blocked.add((step.route.family, step.route.table))
                else:
                    self.routes[(step.route.family, step.route.table)] = step.route
            elif isinstance(step, lbplan.AddRule):
                if (step.rule.family, step.rule.table) not in blocked:
                    self.rules.add(step.rule)
            elif isinstance(step, lbplan.DeleteRule):
                self.rules.discard(step.rule)
            elif isinstance(step, lbplan.DeleteRoute):
                self.routes.pop((step.route.family, step.route.table), None)
            self.check()
        return failed


assignments = st.dictionaries(st.integers(1, 16), st.integers(2, 40), max_size=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(assignments, st.sets(st.integers(2, 40), max_size=3)), max_size=8))
def test_no_rule_ever_points_at_a_missing_route(
    changes: list[tuple[dict[int, int], set[int]]],
) -> None:
    kernel = FakeKernel()
    installed = lbplan.Observed(frozenset(), frozenset())
    for wanted, down in changes:
        desired = desired_state([SPEC], targets_from(wanted), {STREAM: 5000})
        unreachable = {f"198.18.0.{h}" for h in down} | {f"fd00:20::{h:x}" for h in down}
        observed = kernel.observed() if len(changes) % 2 else installed
        steps = lbplan.plan(desired.rules, desired.routes, observed)
        failed = kernel.run(steps, unreachable)
        installed = lbplan.installed_after(desired.rules, desired.routes, failed, observed)
        # what the role believes it installed is what the kernel holds
        assert installed == kernel.observed()
        if not unreachable:
            assert installed.rules == desired.rules and installed.routes == desired.routes


@settings(max_examples=200, deadline=None)
@given(assignments, assignments)
def test_a_plan_applied_twice_is_a_no_op(before: dict[int, int], after: dict[int, int]) -> None:
    kernel = FakeKernel()
    for wanted in (before, after):
        desired = desired_state([SPEC], targets_from(wanted), {STREAM: 5000})
        kernel.run(lbplan.plan(desired.rules, desired.routes, kernel.observed()), set())
    again = lbplan.plan(desired.rules, desired.routes, kernel.observed())
    assert again == [lbplan.InstallDatapath()]


def test_the_order_is_make_before_break() -> None:
    old = desired_state([SPEC], targets_from({1: 2, 2: 3}), {STREAM: 5000})
    new = desired_state([SPEC], targets_from({2: 3, 3: 4}), {STREAM: 5000})
    observed = lbplan.Observed(old.rules, old.routes)
    steps = lbplan.plan(new.rules, new.routes, observed, forget_connections=True)
    kinds = [type(s).__name__ for s in steps]
    assert kinds == [
        "AddRoute",
        "AddRoute",
        "AddRule",
        "AddRule",
        "InstallDatapath",
        "DeleteRule",
        "DeleteRule",
        "DeleteRoute",
        "DeleteRoute",
        "ForgetConnections",
    ]
    assert steps[-1] == lbplan.ForgetConnections((5001,))
    assert {s.route.table for s in steps if isinstance(s, lbplan.AddRoute)} == {5003}


def test_a_target_with_a_new_address_keeps_its_table_and_its_rule() -> None:
    old = desired_state([SPEC], targets_from({1: 2}), {STREAM: 5000})
    new = desired_state([SPEC], targets_from({1: 9}), {STREAM: 5000})
    steps = lbplan.plan(
        new.rules, new.routes, lbplan.Observed(old.rules, old.routes), forget_connections=True
    )
    # the route is replaced in place; the rule, the table and the conntrack marks stay
    assert steps == [
        lbplan.AddRoute(RouteSpec(socket.AF_INET, 5001, "198.18.0.9")),
        lbplan.AddRoute(RouteSpec(socket.AF_INET6, 5001, "fd00:20::9")),
        lbplan.InstallDatapath(),
    ]
