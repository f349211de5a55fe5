from __future__ import annotations

import itertools
import socket

from hypothesis import given
from hypothesis import strategies as st

from meridio.core.lbstate import (
    RouteSpec,
    RuleSpec,
    StreamSpec,
    TargetSpec,
    assign_offsets,
    desired_state,
    plan,
)

A = ("t", "c", "a")
B = ("t", "c", "b")


def test_offsets_do_not_overlap_and_stay_put_when_streams_come_and_go() -> None:
    first = assign_offsets([StreamSpec(A, 100), StreamSpec(B, 100)], {}, 5000)
    assert first == {A: 5000, B: 5100}
    # b stays where it was when a goes away and a new stream c arrives
    c = ("t", "c", "c")
    second = assign_offsets([StreamSpec(B, 100), StreamSpec(c, 50)], first, 5000)
    assert second[B] == 5100
    assert second[c] == 5000


@given(st.lists(st.integers(1, 300), min_size=1, max_size=12))
def test_offset_ranges_never_overlap(sizes: list[int]) -> None:
    specs = [StreamSpec(("t", "c", f"s{i}"), n) for i, n in enumerate(sizes)]
    previous = assign_offsets(specs[: len(specs) // 2], {}, 5000)
    offsets = assign_offsets(specs, previous, 5000)
    ranges = sorted((offsets[s.key] + 1, offsets[s.key] + s.max_targets) for s in specs)
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi < lo
    assert min(lo for lo, _ in ranges) > 5000


def test_rules_and_routes_per_target_and_family() -> None:
    targets = [
        TargetSpec(A, 1, ("198.18.1.2/24", "fd00:1::2/64")),
        TargetSpec(A, 2, ("198.18.1.3/24",)),
    ]
    state = desired_state([StreamSpec(A, 10)], targets, {}, rule_priority=100)
    v4, v6 = socket.AF_INET, socket.AF_INET6
    assert state.rules == {
        RuleSpec(v4, 5001, 5001, 100),
        RuleSpec(v6, 5001, 5001, 100),
        RuleSpec(v4, 5002, 5002, 100),
    }
    assert RouteSpec(v6, 5001, "fd00:1::2") in state.routes
    assert RouteSpec(v4, 5002, "198.18.1.3") in state.routes
    assert state.problems == ()


def test_bad_targets_are_left_out_and_reported() -> None:
    targets = [
        TargetSpec(A, 11, ("198.18.1.2/24",)),  # out of range
        TargetSpec(B, 1, ("198.18.1.3/24",)),  # stream not served
        TargetSpec(A, 1, ("198.18.1.5/24",)),
        TargetSpec(A, 1, ("198.18.1.4/24",)),  # same identifier: lowest address list wins
    ]
    state = desired_state([StreamSpec(A, 10)], targets, {})
    assert list(state.streams[A].targets) == [1]
    assert state.streams[A].targets[1].ips == ("198.18.1.4/24",)
    assert len(state.problems) == 3


def test_plan_is_a_set_difference() -> None:
    assert plan([1, 2, 3], [2, 3, 4]) == ([4], [1])
