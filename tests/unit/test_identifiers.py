"""Target identifiers (meridio.core.identifiers): choice, collisions, the context encoding."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meridio.core import identifiers
from meridio.core.identifiers import Holder, StreamFull


def test_choose_picks_a_free_identifier() -> None:
    rng = random.Random(1)
    picks = {identifiers.choose("s", 10, {1, 2, 3}, rng) for _ in range(200)}
    assert picks == set(range(4, 11))


def test_a_full_stream_says_so() -> None:
    with pytest.raises(StreamFull, match="stream s is full: all 3 identifiers"):
        identifiers.choose("s", 3, {1, 2, 3}, random.Random(0))


def test_the_lowest_address_list_keeps_a_shared_identifier() -> None:
    a, b = ("198.18.0.4/24",), ("198.18.0.5/24",)
    holders = [Holder(a, 3), Holder(b, 3), Holder(("198.18.0.2/24",), 4)]
    assert identifiers.keeps(a, 3, holders)
    assert not identifiers.keeps(b, 3, holders)
    assert identifiers.keeps(b, 5, holders)  # nobody else holds 5
    assert identifiers.taken_by_others(b, holders) == {3, 4}


def test_context_encoding_round_trips() -> None:
    context = identifiers.encode({"stream-a": 3, "stream-b": 10})
    assert context == {"identifier/stream-a": "3", "identifier/stream-b": "10"}
    assert identifiers.decode({**context, "node": "n1"}) == {"stream-a": 3, "stream-b": 10}


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"identifier/": "1"}, "names no stream"),
        ({"identifier/s": "x"}, "not a positive integer"),
        ({"identifier/s": "0"}, "not a positive integer"),
        ({"identifier/s": "-1"}, "not a positive integer"),
    ],
)
def test_bad_context_entries(context: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        identifiers.decode(context)


@settings(max_examples=200, deadline=None)
@given(
    n_targets=st.integers(1, 12),
    max_targets=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_targets_starting_together_end_with_unique_identifiers(
    n_targets: int, max_targets: int, seed: int
) -> None:
    """Every target picks from what it sees; after each round of registrations the losers of a
    collision pick again. The stream ends with unique identifiers (all targets when they fit,
    max-targets of them when not) and the others told the stream is full."""
    rng = random.Random(seed)
    ips = [(f"198.18.0.{10 + i}/24",) for i in range(n_targets)]
    holding: dict[tuple[str, ...], int] = {}
    full: set[tuple[str, ...]] = set()
    for _ in range(50):
        # everyone without an identifier (or who lost one) picks from the last snapshot
        snapshot = [Holder(k, v) for k, v in holding.items()]
        changed = False
        for mine in ips:
            current = holding.get(mine)
            if current is not None and identifiers.keeps(mine, current, snapshot):
                continue
            taken = identifiers.taken_by_others(mine, snapshot)
            try:
                holding[mine] = identifiers.choose("s", max_targets, taken, rng)
                full.discard(mine)
            except StreamFull:
                holding.pop(mine, None)
                full.add(mine)
            changed = True
        if not changed:
            break
    assert len(set(holding.values())) == len(holding)
    assert all(1 <= i <= max_targets for i in holding.values())
    assert len(holding) == min(n_targets, max_targets)
    assert len(full) == n_targets - len(holding)
