"""TAPA's pure state (meridio.core.tapa): requests, conduits and the trench, identifiers,
statuses and what survives a restart."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meridio.api.ambassador.v1 import Conduit, Stream, StreamStatusStatus, Trench
from meridio.core import identifiers, tapa
from meridio.core.tapa import (
    MAX_SLOTS,
    REREGISTER_AFTER,
    InvalidStream,
    OtherTrench,
    Reach,
    Registered,
    Status,
    StreamFilter,
    StreamRef,
    TapState,
    TooManyConduits,
)

A = StreamRef("trench-a", "conduit-a", "stream-a")
B = StreamRef("trench-a", "conduit-a", "stream-b")
C = StreamRef("trench-a", "conduit-b", "stream-c")
OTHER = StreamRef("trench-b", "conduit-a", "stream-a")
MINE = ("198.18.1.5/24", "fd00:10::5/64")
PEER = ("198.18.1.9/24", "fd00:10::9/64")
LOWER = ("198.18.1.2/24", "fd00:10::2/64")
CONFIG = {A.key: 4, B.key: 4, C.key: 2}


def msg(trench: str = "trench-a", conduit: str = "conduit-a", name: str = "stream-a") -> Stream:
    return Stream(name=name, conduit=Conduit(name=conduit, trench=Trench(name=trench)))


# --- requests ----------------------------------------------------------------------------------


def test_a_request_names_a_stream() -> None:
    assert tapa.stream_ref(msg()) == A


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (Stream(), "trench name must not be empty"),
        (Stream(name="s"), "trench name must not be empty"),
        (Stream(name="s", conduit=Conduit(name="c")), "trench name must not be empty"),
        (msg(conduit=""), "conduit name must not be empty"),
        (msg(name=""), "stream name must not be empty"),
        (msg(name="a/b"), "stream name 'a/b' must not contain a path separator"),
        (msg(name="a,b"), "stream name 'a,b' must not contain ','"),
        (msg(conduit="a b"), "must not contain whitespace"),
        (msg(trench="t\x00"), "must not contain control"),
        (msg(name="s" * 54), "is longer than 53 characters"),
        (msg(trench="t" * 254), "is longer than 253 characters"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(message: Stream, error: str) -> None:
    with pytest.raises(InvalidStream, match=error.replace("(", r"\(")):
        tapa.stream_ref(message)


def test_the_stream_name_fits_a_connect_context_key() -> None:
    name = "s" * tapa.MAX_STREAM_NAME
    assert len(f"{identifiers.CONTEXT_PREFIX}{name}") == 64
    assert tapa.stream_ref(msg(name=name)).name == name


def test_status_numbers_are_meridios() -> None:
    for status in Status:
        assert StreamStatusStatus(int(status)).name == status.name


def test_the_streams_setting() -> None:
    refs = tapa.parse_streams(" stream-a, conduit-b/stream-c,stream-a,", "trench-a", "conduit-a")
    assert refs == [A, C]
    assert tapa.parse_streams("", "", "") == []
    with pytest.raises(ValueError, match="stream 'stream-a': no conduit"):
        tapa.parse_streams("stream-a", "trench-a", "")
    with pytest.raises(ValueError, match="trench name must not be empty"):
        tapa.parse_streams("conduit-b/stream-c", "", "")


def test_watch_filters_match_by_every_name_given() -> None:
    assert StreamFilter.of(Stream()).matches(C)
    assert StreamFilter.of(Stream(name="stream-c")).matches(C)
    assert not StreamFilter.of(Stream(name="stream-c")).matches(A)
    by_conduit = StreamFilter.of(Stream(conduit=Conduit(name="conduit-a")))
    assert by_conduit.matches(A) and by_conduit.matches(B) and not by_conduit.matches(C)
    by_trench = StreamFilter.of(Stream(conduit=Conduit(trench=Trench(name="trench-b"))))
    assert by_trench.matches(OTHER) and not by_trench.matches(A)
    with pytest.raises(InvalidStream, match="stream name 'a/b' must not"):
        StreamFilter.of(Stream(name="a/b"))


# --- conduits and the trench -------------------------------------------------------------------


def test_open_connects_trench_and_conduit_once_and_is_idempotent() -> None:
    state = TapState()
    assert state.open(A)
    assert not state.open(A)
    assert state.open(B)
    assert state.open(C)
    assert state.trench == "trench-a"
    assert {n: c.slot for n, c in state.conduits.items()} == {"conduit-a": 0, "conduit-b": 1}
    assert state.streams_of("conduit-a") == [A, B]
    assert state.open_conduits() == ["conduit-a", "conduit-b"]


def test_one_trench_at_a_time() -> None:
    state = TapState()
    state.open(A)
    with pytest.raises(OtherTrench, match="connected to trench trench-a") as caught:
        state.open(OTHER)
    assert caught.value.connected == "trench-a"
    assert set(state.streams) == {A}
    state.close(A, now=10.0)
    with pytest.raises(OtherTrench):  # still leaving
        state.open(OTHER)
    assert state.expire(now=11.0, linger=2.0) == []
    assert state.expire(now=12.0, linger=2.0) == ["conduit-a"]
    assert state.trench is None
    assert state.open(OTHER)
    assert state.trench == "trench-b"


def test_close_unregisters_first_and_the_conduit_lingers() -> None:
    state = TapState()
    state.open(A)
    state.open(B)
    state.streams[A].identifier = 3
    state.streams[B].identifier = 1
    assert state.close(B, now=5.0)
    assert not state.close(B, now=5.0)
    assert state.context("conduit-a") == {"stream-a": 3}
    assert state.close(A, now=6.0)
    assert state.context("conduit-a") == {}  # both unregistered at once
    assert "conduit-a" in state.conduits and state.open_conduits() == []
    assert state.wake_at(linger=2.0) == 8.0
    assert state.expire(now=7.9, linger=2.0) == []
    assert state.expire(now=8.0, linger=2.0) == ["conduit-a"]
    assert state.trench is None and state.wake_at(linger=2.0) is None


def test_reopening_a_leaving_conduit_keeps_it() -> None:
    state = TapState()
    state.open(A)
    state.open(C)
    state.close(A, now=1.0)
    state.open(B)
    assert state.conduits["conduit-a"].leaving_since is None
    assert state.conduits["conduit-a"].slot == 0
    assert state.expire(now=100.0, linger=2.0) == []


def test_slots_are_reused_smallest_first_and_limited() -> None:
    state = TapState()
    refs = [StreamRef("t", f"c{i}", "s") for i in range(MAX_SLOTS)]
    for ref in refs:
        state.open(ref)
    with pytest.raises(TooManyConduits, match=f"already in {MAX_SLOTS} conduits"):
        state.open(StreamRef("t", "one-more", "s"))
    state.close(refs[3], now=0.0)
    state.close(refs[7], now=0.0)
    state.expire(now=1.0, linger=0.5)
    state.open(StreamRef("t", "late", "s"))
    assert state.conduits["late"].slot == 3


# --- identifiers -------------------------------------------------------------------------------


def settle(
    state: TapState,
    registered: dict[tapa.StreamKey, list[Registered]] | None = None,
    *,
    config: dict[tapa.StreamKey, int] | None = CONFIG,
    mine: tuple[str, ...] | None = MINE,
    up: bool = True,
    now: float = 0.0,
    seed: int = 0,
) -> list[tuple[str, str, int | None]]:
    events = state.settle(
        config,
        {} if registered is None else registered,
        {c: mine for c in state.conduits} if mine is not None else {},
        state.conduits if up else (),
        now,
        random.Random(seed),
    )
    return [(e.kind, e.stream.name, e.identifier) for e in events]


def test_an_identifier_is_chosen_among_the_free_ones_then_confirmed() -> None:
    state = TapState()
    state.open(A)
    taken = {A.key: [Registered(PEER, 1), Registered(LOWER, 2), Registered(PEER, 4, False)]}
    assert settle(state, taken) == [("chosen", "stream-a", 3)]
    assert state.context("conduit-a") == {"stream-a": 3}
    assert not state.streams[A].confirmed
    taken[A.key].append(Registered(MINE, 3))
    assert settle(state, taken) == [("confirmed", "stream-a", 3)]
    assert settle(state, taken) == []
    assert state.remembered == {A.key: 3}


def test_nothing_is_chosen_before_the_configuration_and_registry_are_known() -> None:
    state = TapState()
    state.open(A)
    assert settle(state, config=None) == []
    assert state.streams[A].identifier is None
    assert state.settle(CONFIG, None, {}, (), 0.0, random.Random(0)) == []
    assert state.streams[A].identifier is None


def test_the_remembered_identifier_is_asked_for_first() -> None:
    state = TapState(remembered={A.key: 4})
    state.open(A)
    for seed in range(20):
        state.streams[A].identifier = None
        assert settle(state, seed=seed) == [("chosen", "stream-a", 4)]
    state.streams[A].identifier = None
    assert settle(state, {A.key: [Registered(PEER, 4)]}, seed=1)[0][2] != 4


def test_the_lower_address_list_keeps_a_shared_identifier() -> None:
    state = TapState()
    state.open(A)
    state.streams[A].identifier = 2
    shared = {A.key: [Registered(MINE, 2), Registered(PEER, 2)]}
    assert settle(state, shared) == [("confirmed", "stream-a", 2)]
    shared[A.key].append(Registered(LOWER, 2))
    kinds = settle(state, shared)
    assert kinds[0] == ("taken", "stream-a", 2)
    assert kinds[1][0] == "chosen" and kinds[1][2] not in (2, None)


def test_a_full_stream_is_a_problem_said_once() -> None:
    state = TapState()
    state.open(C)
    full = {C.key: [Registered(PEER, 1), Registered(LOWER, 2)]}
    events = state.settle(CONFIG, full, {"conduit-b": MINE}, ["conduit-b"], 0.0, random.Random(0))
    assert [(e.kind, e.problem) for e in events] == [
        ("problem", "stream stream-c is full: all 2 identifiers (max-targets) are taken")
    ]
    assert settle(state, full) == []
    assert state.status(C, nsp=Reach.UP, config=CONFIG, conduits={}, routed=()) == (
        Status.UNAVAILABLE
    )
    full[C.key].pop()
    assert settle(state, full) == [("chosen", "stream-c", 2)]
    assert state.streams[C].problem == ""


def test_a_stream_the_configuration_lacks_has_no_identifier() -> None:
    state = TapState()
    state.open(A)
    settle(state)
    assert state.streams[A].identifier is not None
    events = state.settle({}, {}, {}, (), 0.0, random.Random(0))
    assert [e.problem for e in events] == ["stream stream-a is not configured in conduit conduit-a"]
    assert state.context("conduit-a") == {}


def test_a_registration_the_registry_dropped_gets_a_free_identifier_again() -> None:
    state = TapState()
    state.open(A)
    state.streams[A].identifier = 2
    listed = {A.key: [Registered(MINE, 2)]}
    settle(state, listed)
    assert state.streams[A].confirmed
    disabled = {A.key: [Registered(MINE, 2, enabled=False)]}
    assert settle(state, disabled, now=100.0) == []
    assert not state.streams[A].confirmed
    assert state.wake_at(linger=2.0) == 100.0 + REREGISTER_AFTER
    assert settle(state, disabled, now=100.0 + REREGISTER_AFTER - 0.1) == []
    events = settle(state, disabled, now=100.0 + REREGISTER_AFTER)
    assert events[0] == ("dropped", "stream-a", 2)
    assert events[1][0] == "chosen" and events[1][2] not in (2, None)
    # missing altogether counts the same; a conduit that is down does not
    state.streams[A].identifier = 2
    assert settle(state, {}, now=200.0, up=False) == []
    assert settle(state, {}, now=300.0, up=False) == []
    assert settle(state, {}, now=400.0) == []
    assert settle(state, {}, now=400.0 + REREGISTER_AFTER)[0] == ("dropped", "stream-a", 2)


def test_a_dropped_registration_keeps_its_identifier_when_it_is_the_only_free_one() -> None:
    state = TapState()
    state.open(C)
    state.streams[C].identifier = 2
    listed = {C.key: [Registered(PEER, 1), Registered(MINE, 2, False)]}
    settle(state, listed, now=0.0)
    assert settle(state, listed, now=REREGISTER_AFTER) == [
        ("dropped", "stream-c", 2),
        ("chosen", "stream-c", 2),
    ]


def test_a_smaller_max_targets_moves_an_identifier_out_of_range() -> None:
    state = TapState()
    state.open(A)
    state.streams[A].identifier = 4
    events = settle(state, config={A.key: 2})
    assert events[0][0] == "chosen" and events[0][2] in (1, 2)


# --- statuses ----------------------------------------------------------------------------------


def test_statuses_have_meridios_meanings() -> None:
    state = TapState()
    state.open(A)
    state.streams[A].identifier = 1
    state.streams[A].confirmed = True
    up = {"conduit-a": Reach.UP}

    def status(**kw: object) -> Status | None:
        args: dict[str, object] = {
            "nsp": Reach.UP,
            "config": CONFIG,
            "conduits": up,
            "routed": ["conduit-a"],
        }
        args.update(kw)
        return state.status(A, **args)  # type: ignore[arg-type]

    assert status() is Status.OPEN
    assert status(routed=[]) is Status.PENDING
    assert status(nsp=Reach.CONNECTING) is Status.PENDING
    assert status(nsp=Reach.DOWN) is Status.UNAVAILABLE
    assert status(config=None) is Status.PENDING
    assert status(config={}) is Status.UNDEFINED
    assert status(conduits={}) is Status.PENDING
    assert status(conduits={"conduit-a": Reach.DOWN}) is Status.UNAVAILABLE
    state.streams[A].confirmed = False
    assert status() is Status.PENDING
    assert state.status(B, nsp=Reach.UP, config=CONFIG, conduits=up, routed=()) is None


# --- restarts ----------------------------------------------------------------------------------


def test_what_was_open_survives_a_restart_with_its_identifiers() -> None:
    state = TapState()
    for ref in (A, B, C):
        state.open(ref)
    settle(state)
    ids = {r: e.identifier for r, e in state.streams.items()}
    for ref, n in ids.items():
        assert n is not None
        state.remembered[ref.key] = n
    state.conduits["conduit-a"].addresses = MINE
    state.vips = ("203.0.113.10/32",)
    state.close(C, now=1.0)
    data = json.loads(json.dumps(state.to_dict()))
    again = TapState.from_dict(data, now=50.0)
    assert again.trench == "trench-a"
    assert {r: e.identifier for r, e in again.streams.items()} == {A: ids[A], B: ids[B]}
    assert again.context("conduit-a") == {"stream-a": ids[A], "stream-b": ids[B]}
    assert again.conduits["conduit-a"].addresses == MINE
    assert again.conduits["conduit-b"].leaving_since == 50.0  # no stream: it leaves
    assert {n: c.slot for n, c in again.conduits.items()} == {"conduit-a": 0, "conduit-b": 1}
    assert again.remembered[C.key] == ids[C]
    assert again.vips == ("203.0.113.10/32",)


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"version": 2},
        {"version": 1, "trench": "t", "conduits": {"c": {"slot": 99}}},
        {"version": 1, "trench": "t", "conduits": {"c": {"slot": 0}, "d": {"slot": 0}}},
        {"version": 1, "trench": "t", "conduits": {}, "streams": [["c", "s"]]},
        {"version": 1, "trench": "t", "conduits": {"c": {}}},
        {"version": 1, "trench": "t/x", "conduits": {}},
        {"version": 1, "trench": "t", "conduits": [1]},
    ],
)
def test_a_bad_state_file_is_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TapState.from_dict(data, now=0.0)


# --- properties --------------------------------------------------------------------------------

REFS = st.builds(
    StreamRef,
    st.sampled_from(["trench-a", "trench-b"]),
    st.sampled_from([f"c{i}" for i in range(5)]),
    st.sampled_from(["s1", "s2", "s3"]),
)
OPS = st.lists(st.tuples(st.sampled_from(["open", "close", "expire"]), REFS), max_size=60)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_open_close_expire_keep_the_state_consistent(ops: list[tuple[str, StreamRef]]) -> None:
    state = TapState()
    now = 0.0
    for op, ref in ops:
        now += 1.0
        if op == "open":
            try:
                state.open(ref)
            except OtherTrench:
                assert state.trench not in (None, ref.trench)
        elif op == "close":
            state.close(ref, now)
        else:
            state.expire(now, linger=2.5)
        slots = [c.slot for c in state.conduits.values()]
        assert len(slots) == len(set(slots)) and all(0 <= s < MAX_SLOTS for s in slots)
        assert (state.trench is None) == (not state.conduits)
        for r in state.streams:
            assert r.trench == state.trench
            assert state.conduits[r.conduit].leaving_since is None
        for name, c in state.conduits.items():
            assert (c.leaving_since is None) == bool(state.streams_of(name))
        again = TapState.from_dict(json.loads(json.dumps(state.to_dict())), now)
        assert set(again.streams) == set(state.streams)
        assert {n: c.slot for n, c in again.conduits.items()} == {
            n: c.slot for n, c in state.conduits.items()
        }


IPS = st.sampled_from([MINE, PEER, LOWER, ("198.18.1.7/24",)])
LISTED = st.lists(
    st.builds(Registered, IPS, st.integers(1, 6), st.booleans()), max_size=8, unique=True
)


@settings(max_examples=300, deadline=None)
@given(LISTED, st.integers(1, 6), st.one_of(st.none(), st.integers(1, 6)), st.integers(0, 99))
def test_an_identifier_kept_or_chosen_is_never_another_targets(
    listed: list[Registered], max_targets: int, current: int | None, seed: int
) -> None:
    state = TapState()
    state.open(A)
    state.streams[A].identifier = current
    rng = random.Random(seed)
    state.settle({A.key: max_targets}, {A.key: listed}, {"conduit-a": MINE}, [], 0.0, rng)
    entry = state.streams[A]
    holders = [identifiers.Holder(r.ips, r.identifier) for r in listed]
    others = identifiers.taken_by_others(MINE, holders)
    if entry.identifier is None:
        assert entry.problem and not identifiers.free_identifiers(max_targets, others)
    else:
        assert 1 <= entry.identifier <= max_targets
        assert identifiers.keeps(MINE, entry.identifier, holders)
        if entry.identifier != current:
            assert entry.identifier not in others
