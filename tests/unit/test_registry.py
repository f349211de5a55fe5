"""The NSP target registry (pure core) and its sqlite store."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meridio.api.nsp.v1 import Conduit, Stream, Target, TargetStatus, TargetType, Trench
from meridio.core.registry import (
    Entry,
    InvalidTarget,
    TargetRegistry,
    canonical_ips,
    canonical_target,
    encode_stored,
    matches,
    target_key,
    validate,
)
from meridio.store.registry import SCHEMA_VERSION, PersistentRegistry, RegistryStore, StoreError

TIMEOUT = 60.0


def stream(name: str = "stream-a", conduit: str = "conduit-a", trench: str = "trench-a") -> Stream:
    return Stream(name=name, conduit=Conduit(name=conduit, trench=Trench(name=trench)))


def target(
    *ips: str,
    identifier: str | None = "1",
    status: TargetStatus = TargetStatus.ENABLED,
    type_: TargetType = TargetType.DEFAULT,
    strm: Stream | None = None,
    context: dict[str, str] | None = None,
) -> Target:
    ctx = dict(context or {})
    if identifier is not None:
        ctx["identifier"] = identifier
    t = Target(
        ips=list(ips or ("172.16.1.3/24", "fd00::3/64")), context=ctx, status=status, type=type_
    )
    t.stream = strm if strm is not None else stream()
    return t


# --- keys ------------------------------------------------------------------------------------


def test_key_format() -> None:
    t = target("fd00::3/64", "172.16.1.3/24")
    assert target_key(t) == "172.16.1.3/24,fd00::3/64-0-stream-a.conduit-a.trench-a"


def test_key_canonical_ip_forms_and_order() -> None:
    assert canonical_ips(["FD00::0003/64", "10.0.0.10/24", "10.0.0.9", "10.0.0.9/24"]) == [
        "10.0.0.9",
        "10.0.0.9/24",
        "10.0.0.10/24",
        "fd00::3/64",
    ]
    assert canonical_ips(["192.0.2.1/255.255.255.0"]) == ["192.0.2.1/24"]
    a = target("fd00::3/64", "172.16.1.3/24")
    b = target("172.16.1.3/24", "FD00:0::3/64")
    assert target_key(a) == target_key(b)


def test_key_of_frontend_with_trench_only() -> None:
    fe = Target(ips=["192.0.2.7/24"], type=TargetType.FRONTEND)
    fe.stream = Stream(conduit=Conduit(trench=Trench(name="trench-a")))
    assert target_key(fe) == "192.0.2.7/24-1-..trench-a"
    assert target_key(Target(ips=["192.0.2.7"], type=TargetType.FRONTEND)) == "192.0.2.7-1-.."


# --- register / refresh / unregister -----------------------------------------------------------


def test_first_registration_is_disabled_then_enabled() -> None:
    reg = TargetRegistry()
    assert reg.register(target(status=TargetStatus.ENABLED), 0.0)
    (stored,) = reg.all()
    assert stored.status == TargetStatus.DISABLED
    g = reg.generation
    assert reg.register(target(status=TargetStatus.ENABLED), 1.0)
    assert reg.all()[0].status == TargetStatus.ENABLED
    assert reg.generation == g + 1
    # A later DISABLED registration disables again.
    assert reg.register(target(status=TargetStatus.DISABLED), 2.0)
    assert reg.all()[0].status == TargetStatus.DISABLED


def test_refresh_without_change_is_unchanged() -> None:
    reg = TargetRegistry()
    reg.register(target(status=TargetStatus.DISABLED), 0.0)
    g = reg.generation
    before = reg.all()[0]
    assert not reg.register(target("fd00::3/64", "172.16.1.3/24", status=TargetStatus.DISABLED), 5)
    assert reg.generation == g
    entry = reg.get(target_key(target()))
    assert entry is not None
    assert entry.last_seen == 5
    assert entry.target is before  # stored targets are never mutated or replaced needlessly


def test_context_update_replaces_context() -> None:
    reg = TargetRegistry()
    reg.register(target(context={"a": "1", "b": "2"}), 0.0)
    assert reg.register(target(identifier="7", context={"c": "3"}), 1.0)
    assert reg.all()[0].context == {"c": "3", "identifier": "7"}
    assert reg.all()[0].status == TargetStatus.ENABLED


def test_stored_target_is_a_copy() -> None:
    reg = TargetRegistry()
    t = target()
    reg.register(t, 0.0)
    t.context["identifier"] = "99"
    t.ips.append("192.0.2.1")
    assert reg.all()[0].context == {"identifier": "1"}
    assert reg.all()[0].ips == ["172.16.1.3/24", "fd00::3/64"]


def test_unregister_is_idempotent() -> None:
    reg = TargetRegistry()
    reg.register(target(), 0.0)
    g = reg.generation
    assert reg.unregister(target(), 1.0)
    assert reg.generation == g + 1
    assert not reg.unregister(target(), 2.0)
    assert not reg.unregister(target("192.0.2.99/24"), 2.0)
    assert reg.generation == g + 1
    assert len(reg) == 0
    # Registering again starts over, DISABLED.
    reg.register(target(), 3.0)
    assert reg.all()[0].status == TargetStatus.DISABLED


# --- expiry ----------------------------------------------------------------------------------


def test_expiry_with_time_passed_in() -> None:
    reg = TargetRegistry()
    assert reg.next_expiry(TIMEOUT) is None
    a, b = target("192.0.2.1/24"), target("192.0.2.2/24")
    reg.register(a, 0.0)
    reg.register(b, 10.0)
    assert reg.next_expiry(TIMEOUT) == 60.0
    assert reg.expire(59.9, TIMEOUT) == []
    g = reg.generation
    assert reg.expire(60.0, TIMEOUT) == [target_key(a)]
    assert reg.generation == g + 1
    assert reg.next_expiry(TIMEOUT) == 70.0
    reg.register(b, 65.0)  # a keepalive pushes the expiry out
    assert reg.next_expiry(TIMEOUT) == 125.0
    assert reg.expire(124.0, TIMEOUT) == []
    assert reg.expire(200.0, TIMEOUT) == [target_key(b)]
    assert reg.next_expiry(TIMEOUT) is None


def test_expiry_survives_many_refreshes() -> None:
    reg = TargetRegistry()
    keys = [target(f"198.18.0.{i}/24") for i in range(1, 11)]
    now = 0.0
    for _ in range(100):
        for t in keys:
            now += 0.1
            reg.register(t, now)
    assert len(reg._heap) <= 2 * len(reg) + 65  # lazily compacted
    assert reg.next_expiry(TIMEOUT) == pytest.approx(now - 0.9 + TIMEOUT)
    assert len(reg.expire(now + TIMEOUT, TIMEOUT)) == 10


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["reg", "unreg", "expire"]), st.integers(0, 5), st.floats(0, 30)),
        max_size=60,
    )
)
def test_expiry_agrees_with_a_naive_model(ops: list[tuple[str, int, float]]) -> None:
    reg = TargetRegistry()
    model: dict[str, float] = {}
    now = 0.0
    for op, i, dt in ops:
        now += dt
        t = target(f"198.18.1.{i + 1}/24")
        key = target_key(t)
        if op == "reg":
            reg.register(t, now)
            model[key] = now
        elif op == "unreg":
            reg.unregister(t, now)
            model.pop(key, None)
        else:
            gone = sorted(k for k, seen in model.items() if seen + TIMEOUT <= now)
            assert reg.expire(now, TIMEOUT) == gone
            for k in gone:
                del model[k]
        expected = min(model.values()) + TIMEOUT if model else None
        assert reg.next_expiry(TIMEOUT) == expected
        assert reg.keys() == sorted(model)


# --- Watch filter ----------------------------------------------------------------------------


def _frontend() -> Target:
    fe = Target(ips=["192.0.2.7/24"], type=TargetType.FRONTEND, status=TargetStatus.ENABLED)
    fe.stream = Stream(conduit=Conduit(trench=Trench(name="trench-a")))
    return fe


def _filter(
    status: TargetStatus | None = None,
    type_: TargetType | None = None,
    strm: Stream | None = None,
) -> Target:
    f = Target()
    if status is not None:
        f.status = status
    if type_ is not None:
        f.type = type_
    if strm is not None:
        f.stream = strm
    return f


ENABLED_A = target(status=TargetStatus.ENABLED)
DISABLED_A = target(status=TargetStatus.DISABLED)


@pytest.mark.parametrize(
    ("filt", "tgt", "expected"),
    [
        (_filter(), ENABLED_A, True),  # default: ENABLED, DEFAULT, every stream
        (_filter(), DISABLED_A, False),
        (_filter(TargetStatus.DISABLED), DISABLED_A, True),
        (_filter(TargetStatus.DISABLED), ENABLED_A, False),
        (_filter(TargetStatus.ANY), DISABLED_A, True),
        (_filter(TargetStatus.ANY), ENABLED_A, True),
        (_filter(), _frontend(), False),  # type must be equal
        (_filter(type_=TargetType.FRONTEND), _frontend(), True),
        (_filter(type_=TargetType.FRONTEND), ENABLED_A, False),
        (_filter(strm=stream()), ENABLED_A, True),
        (_filter(strm=stream("stream-b")), ENABLED_A, False),
        (_filter(strm=stream("", "", "")), ENABLED_A, True),
        (_filter(strm=stream("", "", "trench-a")), ENABLED_A, True),
        (_filter(strm=stream("", "", "trench-b")), ENABLED_A, False),
        (_filter(strm=stream("", "conduit-a", "")), ENABLED_A, True),
        (_filter(strm=stream("", "conduit-b", "trench-a")), ENABLED_A, False),
        (_filter(strm=stream("stream-a", "", "")), ENABLED_A, True),
        (_filter(strm=stream("stream-a", "conduit-a", "trench-b")), ENABLED_A, False),
        (_filter(strm=Stream(name="stream-a")), ENABLED_A, True),  # unset conduit: wildcard
        (_filter(type_=TargetType.FRONTEND, strm=stream("", "", "trench-a")), _frontend(), True),
        (_filter(type_=TargetType.FRONTEND, strm=stream("s", "", "trench-a")), _frontend(), False),
    ],
)
def test_matches(filt: Target, tgt: Target, expected: bool) -> None:
    assert matches(filt, tgt) is expected


def test_snapshot_filters_and_orders_by_key() -> None:
    reg = TargetRegistry()
    b = target("192.0.2.20/24", identifier="2")
    a = target("192.0.2.3/24", identifier="1")
    other = target("192.0.2.5/24", strm=stream("stream-b"))
    for t in (b, a, other):
        reg.register(t, 0.0)
    assert reg.snapshot(_filter()) == []  # all DISABLED so far
    for t in (b, a, other):
        reg.register(t, 1.0)
    got = reg.snapshot(_filter(strm=stream()))
    assert [t.ips for t in got] == [["192.0.2.20/24"], ["192.0.2.3/24"]]  # key (string) order
    assert [t.ips[0] for t in reg.snapshot(_filter(TargetStatus.ANY))] == [
        "192.0.2.20/24",
        "192.0.2.3/24",
        "192.0.2.5/24",
    ]


# --- validation ------------------------------------------------------------------------------

STREAMS = {("trench-a", "conduit-a", "stream-a"): 100, ("trench-a", "conduit-a", "stream-z"): 0}


def lookup(trench: str, conduit: str, name: str) -> int | None:
    return STREAMS.get((trench, conduit, name))


def _with(**changes: Any) -> Callable[[], Target]:
    def make() -> Target:
        t = target(**{k: v for k, v in changes.items() if k != "ips"})
        if "ips" in changes:
            t.ips = list(changes["ips"])
        return t

    return make


def _fe(**kw: Any) -> Callable[[], Target]:
    def make() -> Target:
        t = Target(ips=["192.0.2.7/24"], type=TargetType.FRONTEND, context=kw.get("context", {}))
        if "strm" in kw:
            t.stream = kw["strm"]
        return t

    return make


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_with(status=TargetStatus.ANY), "status ANY is only valid in a Watch filter"),
        (_with(status=7), "unknown target status 7"),
        (_with(type_=5), "unknown target type 5"),
        (_with(ips=[]), "at least one IP is required"),
        (_with(ips=[f"198.18.0.{i}" for i in range(1, 18)]), "too many IPs: 17 (at most 16)"),
        (_with(ips=["172.16.1.300/24"]), 'IP "172.16.1.300/24" is not an IP address or CIDR'),
        (_with(ips=["bogus"]), 'IP "bogus" is not an IP address or CIDR'),
        (_with(ips=[""]), 'IP "" is not an IP address or CIDR'),
        (_with(ips=["fd00::3/129"]), 'IP "fd00::3/129" is not an IP address or CIDR'),
        (_with(ips=["fe80::1%eth0"]), "scoped addresses are not supported"),
        (_with(ips=["1" * 70]), "too long: 70 characters"),
        (
            _with(ips=["172.16.1.3/24", "172.16.1.3/32"]),
            'duplicate IP "172.16.1.3/32" (same address as "172.16.1.3/24")',
        ),
        (_with(ips=["fd00::3/64", "FD00::0003/64"]), 'duplicate IP "FD00::0003/64"'),
        (_with(strm=stream("")), "stream name is required for DEFAULT targets"),
        (_with(strm=stream("stream-a", "")), "conduit name is required for DEFAULT targets"),
        (_with(strm=Stream(name="stream-a")), "conduit name is required for DEFAULT targets"),
        (_with(strm=stream("stream-a", "conduit-a", "")), "trench name is required"),
        (_with(strm=stream("x" * 300)), "stream name 'xxx"),
        (_with(strm=stream("x" * 300)), "longer than 253 characters (300)"),
        (_with(strm=stream("stream-a", "../c\n0")), "conduit name '../c\\n0' must not contain"),
        (_with(strm=stream("stream-a", "conduit-a", "   ")), "trench name '   ' must not contain"),
        (_with(strm=stream("a\u200bb")), "must not contain control or invisible characters"),
        (_fe(strm=Stream(conduit=Conduit(trench=Trench(name="..")))), "must not be . or .."),
        (
            _with(strm=stream("stream-q")),
            "stream stream-q of conduit conduit-a in trench trench-a does not exist",
        ),
        (_with(identifier=None), 'context "identifier" is required for DEFAULT targets'),
        (_with(identifier="0"), 'identifier "0" out of range 1..100 for stream stream-a'),
        (_with(identifier="101"), 'identifier "101" out of range 1..100 for stream stream-a'),
        (_with(identifier="-1"), 'identifier "-1" is not a decimal integer'),
        (_with(identifier="abc"), 'identifier "abc" is not a decimal integer'),
        (_with(identifier=""), 'identifier "" is not a decimal integer'),
        (_with(identifier="\u0663"), "is not a decimal integer"),  # Arabic-Indic digit three
        (
            _with(strm=stream("stream-z"), identifier="101"),  # max_targets 0: default 100
            'identifier "101" out of range 1..100 for stream stream-z',
        ),
        (
            _with(context={f"k{i}": "v" for i in range(32)}),
            "too many context entries: 33 (at most 32)",
        ),
        (_with(context={"": "v"}), "context key must not be empty"),
        (_with(context={"k" * 65: "v"}), "too long: 65 characters (at most 64)"),
        (
            _with(context={"big": "v" * 1025}),
            'context value for key "big" too long: 1025 characters (at most 1024)',
        ),
        (_fe(strm=Stream(conduit=Conduit(name="conduit-a"))), "given without a trench name"),
        (_fe(strm=Stream(name="s", conduit=Conduit())), "stream s given without a conduit name"),
        (_fe(strm=stream("stream-q")), "stream stream-q of conduit conduit-a in trench trench-a"),
        (_fe(context={"identifier": "0"}), 'identifier "0" must be at least 1'),
        (
            _fe(strm=stream(), context={"identifier": "101"}),
            'identifier "101" out of range 1..100 for stream stream-a',
        ),
    ],
)
def test_validate_rejects(make: Callable[[], Target], reason: str) -> None:
    with pytest.raises(InvalidTarget) as info:
        validate(make(), lookup)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        _with(),
        _with(ips=["172.16.1.3/24"], identifier="100"),
        _with(ips=["fd00::3/64"], status=TargetStatus.DISABLED),
        _with(ips=["192.0.2.1", "2001:db8::1"]),
        _with(strm=stream("stream-z"), identifier="100"),
        _fe(),
        _fe(strm=Stream(conduit=Conduit(trench=Trench(name="trench-a")))),
        _fe(strm=Stream(conduit=Conduit(name="any", trench=Trench(name="trench-a")))),
        _fe(strm=stream(), context={"identifier": "3"}),
        _fe(context={"identifier": "5000"}),
    ],
)
def test_validate_accepts(make: Callable[[], Target]) -> None:
    validate(make(), lookup)


# --- rollback support in the core --------------------------------------------------------------


def test_restore_rolls_back() -> None:
    reg = TargetRegistry()
    key = target_key(target())
    reg.register(target(), 0.0)
    before = reg.get(key)
    reg.register(target(), 1.0)  # enables
    reg.restore(key, before)
    assert reg.get(key) is before
    assert reg.all()[0].status == TargetStatus.DISABLED
    assert reg.next_expiry(TIMEOUT) == TIMEOUT
    reg.restore(key, None)
    assert len(reg) == 0
    assert reg.next_expiry(TIMEOUT) is None
    with pytest.raises(ValueError):
        reg.restore("other", Entry(key, target(), 0.0))


# --- order independence --------------------------------------------------------------------

_TARGETS = st.builds(
    lambda ip, ident, strm: target(
        f"198.18.2.{ip}/24", f"fd00::{ip:x}/64", identifier=ident, strm=stream(strm)
    ),
    st.integers(1, 40),
    st.sampled_from(["1", "2", "3"]),
    st.sampled_from(["stream-a", "stream-b"]),
)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(_TARGETS, st.lists(st.sampled_from([0, 1]), min_size=1, max_size=3)),
        max_size=12,
        unique_by=lambda pair: target_key(pair[0]),
    ),
    st.randoms(use_true_random=False),
)
def test_snapshot_independent_of_register_order(
    plan: list[tuple[Target, list[int]]], rnd: Any
) -> None:
    """Each target's own registrations keep their order; interleaving them differently does not
    change the snapshot."""
    ops = [(i, status) for i, (_, statuses) in enumerate(plan) for status in statuses]
    shuffled = list(range(len(ops)))
    rnd.shuffle(shuffled)
    # Re-deal each target's operations, in their original order, to the shuffled positions.
    per_target: dict[int, list[int]] = {}
    for i, status in ops:
        per_target.setdefault(i, []).append(status)
    interleaved = []
    for pos in shuffled:
        i = ops[pos][0]
        interleaved.append((i, per_target[i].pop(0)))

    def run(sequence: list[tuple[int, int]]) -> list[bytes]:
        reg = TargetRegistry()
        for n, (i, status) in enumerate(sequence):
            t = plan[i][0]
            t.status = TargetStatus(status)
            reg.register(t, float(n))
        return [bytes(t) for t in reg.snapshot(_filter(TargetStatus.ANY))]

    assert run(ops) == run(interleaved)


# --- the sqlite store ------------------------------------------------------------------------


def test_persistence_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with PersistentRegistry(path, 100.0) as preg:
        assert preg.restored == 0
        assert preg.register(target(context={"x": "y"}), 100.0)
        assert preg.register(target(context={"x": "y"}), 101.0)  # enable
        assert preg.register(target("192.0.2.9/24", identifier="2"), 102.0)
        assert preg.store.schema_version == SCHEMA_VERSION
        before = [bytes(t) for t in preg.all()]
    with PersistentRegistry(path, 130.0) as preg:
        assert preg.restored == 2
        assert [bytes(t) for t in preg.all()] == before
        assert preg.snapshot(_filter())[0].context == {"x": "y", "identifier": "1"}
        # Every restored entry gets a full timeout from the restart.
        assert preg.next_expiry() == 130.0 + TIMEOUT
        assert not preg.register(target(context={"x": "y"}), 131.0)  # a keepalive, not a change
        assert preg.unregister(target("192.0.2.9/24"), 132.0)
    with PersistentRegistry(path, 500.0) as preg:  # down far longer than the timeout
        assert preg.restored == 1
        assert preg.expire(500.0 + TIMEOUT - 0.001) == []
        assert preg.expire(500.0 + TIMEOUT) == [target_key(target())]
        assert preg.all() == [] and preg.store.keys() == []


def test_restart_gives_every_restored_entry_a_full_timeout(tmp_path: Path) -> None:
    """The issue: an NSP back after more than entry-timeout must not drop live targets."""
    path = tmp_path / "registry.db"
    with PersistentRegistry(path, 0.0, entry_timeout=10.0) as preg:
        for i in range(1, 4):
            preg.register(target(f"192.0.2.{i}/24", identifier=str(i)), float(i))
    # Back at t=100, long after every entry's last refresh (1..3) + 10 s.
    preg = PersistentRegistry(path, 100.0, entry_timeout=10.0)
    assert (preg.restored, preg.restored_pending, len(preg)) == (3, 3, 3)
    assert preg.stage_expire(109.9) == []
    preg.register(target("192.0.2.1/24", identifier="1"), 105.0)  # its owner is alive
    assert preg.restored_pending == 2
    assert preg.expire(110.0) == sorted(
        [target_key(target("192.0.2.2/24")), target_key(target("192.0.2.3/24"))]
    )
    assert preg.restored_pending == 0
    assert [t.ips[0] for t in preg.all()] == ["192.0.2.1/24"]
    assert preg.next_expiry() == 115.0
    preg.close()


def test_persistence_after_unclean_drop(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    code = textwrap.dedent(
        f"""
        import os
        from meridio.api.nsp.v1 import Conduit, Stream, Target, Trench
        from meridio.store.registry import PersistentRegistry
        c = Conduit(name="conduit-a", trench=Trench(name="trench-a"))
        s = Stream(name="stream-a", conduit=c)
        preg = PersistentRegistry({str(path)!r}, 10.0)
        for i in range(1, 4):
            t = Target(ips=[f"192.0.2.{{i}}/24"], context={{"identifier": str(i)}}, stream=s)
            preg.register(t, 10.0)
            preg.register(t, 11.0)
        preg.register(Target(ips=["192.0.2.1/24"], context={{"identifier": "9"}}, stream=s), 12.0)
        os._exit(0)  # no close, no flush
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    with PersistentRegistry(path, 20.0) as preg:
        got = preg.snapshot(_filter())
        assert [t.ips[0] for t in got] == ["192.0.2.1/24", "192.0.2.2/24", "192.0.2.3/24"]
        assert got[0].context == {"identifier": "9"}
        assert preg.next_expiry() == 20.0 + TIMEOUT


def test_keepalives_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    preg = PersistentRegistry(path, 0.0)
    a = target("192.0.2.1/24")
    assert preg.register(a, 0.0)
    assert preg.register(a, 1.0)  # enable: a change, written at once (last_seen 1.0)
    for now in (5.0, 10.0, 30.0):
        assert preg.stage_register(a, now) == (False, 0)  # nothing to wait for
    assert not preg.pending
    assert preg.store.last_seen(target_key(a)) == 1.0
    assert preg.registry.get(target_key(a)).last_seen == 30.0  # type: ignore[union-attr]
    preg.close()


def test_group_commit_one_batch_for_many_changes(tmp_path: Path) -> None:
    preg = PersistentRegistry(tmp_path / "r.db", 0.0)
    targets = [target(f"192.0.2.{i}/24", identifier=str(i)) for i in range(1, 21)]
    seqs = {preg.stage_register(t, 1.0)[1] for t in targets}
    assert seqs == {1}
    # Not committed: readers that answer clients do not see them, nor does the disk.
    assert len(preg) == 0 and preg.store.keys() == []
    batch = preg.seal()
    assert batch is not None and batch.seq == 1 and len(batch.upsert) == 20
    # Changes made while the batch is written go in the next one; a keepalive of a key in the
    # batch being written waits for it.
    assert preg.stage_register(targets[0], 2.0) == (True, 2)  # enable: a change
    disabled = target("192.0.2.2/24", identifier="2", status=TargetStatus.DISABLED)
    assert preg.stage_register(disabled, 2.0) == (False, 1)  # keepalive, key in flight
    assert preg.stage_register(target("192.0.2.99/24", identifier="99"), 2.0) == (True, 2)
    assert preg.stage_unregister(target("192.0.2.99/24"), 2.0) == (True, 2)
    preg.write(batch)
    assert preg.finish(batch, None) == ()
    assert len(preg) == 20 and len(preg.store.keys()) == 20
    assert preg.committed_seq == 1
    second = preg.seal()
    assert second is not None and second.seq == 2
    assert {k for k, _, _ in second.upsert} == {target_key(targets[0])}
    assert second.delete == [target_key(target("192.0.2.99/24"))]
    preg.write(second)
    preg.finish(second, None)
    assert preg.snapshot(_filter())[0].ips == ["192.0.2.1/24"]  # the enabled one
    assert preg.seal() is None
    preg.close()


def test_failed_commit_undoes_the_batch_and_the_open_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.db"
    preg = PersistentRegistry(path, 0.0)
    preg.register(target(), 0.0)
    snapshot = [bytes(t) for t in preg.all()]
    keys = preg.registry.keys()
    preg.stage_register(target("192.0.2.50/24"), 1.0)  # new
    preg.stage_register(target(), 1.0)  # enable
    batch = preg.seal()
    assert batch is not None
    preg.stage_unregister(target(), 1.0)  # in the open batch, on top of the failing one
    monkeypatch.setattr(preg.store, "write_rows", _fail)
    with pytest.raises(StoreError):
        preg.write(batch)
    assert preg.finish(batch, StoreError("disk on fire")) == (2, 3)
    assert preg.registry.keys() == keys  # memory is the disk again
    assert [bytes(t) for t in preg.all()] == snapshot
    assert [bytes(e.target) for e in preg.registry.entries()] == snapshot
    assert not preg.pending
    # The next changes get new sequence numbers and commit as usual.
    monkeypatch.undo()
    assert preg.stage_register(target("192.0.2.51/24"), 2.0) == (True, 4)
    preg.commit()
    assert len(preg.store.keys()) == 2
    # commit() re-raises after undoing.
    monkeypatch.setattr(preg.store, "write_rows", _fail)
    with pytest.raises(StoreError):
        preg.unregister(target(), 3.0)
    assert len(preg.registry) == 2
    monkeypatch.undo()
    preg.close()
    with PersistentRegistry(path, 5.0) as again:
        assert len(again) == 2


def _fail(*args: Any, **kwargs: Any) -> None:
    raise StoreError("disk on fire")


def test_encode_stored_is_betterprotos_encoding() -> None:
    reg = TargetRegistry()
    samples = [
        target(),
        target("192.0.2.1", "2001:db8::1/128", context={"a": "", "b": "c" * 200}),
        target(status=TargetStatus.DISABLED, strm=Stream(name="s", max_targets=300)),
        Target(ips=["192.0.2.7/24"], type=TargetType.FRONTEND),
        Target(ips=["192.0.2.8/24"], type=TargetType.FRONTEND, stream=Stream(max_targets=5)),
        target(strm=stream("s" * 200, "c" * 200, "t")),
    ]
    for n, t in enumerate(samples):
        reg.register(t, float(n))
        reg.register(t, float(n))
    for entry in reg.entries():
        assert encode_stored(entry.target) == bytes(entry.target)
        assert reg.wire(entry) == bytes(entry.target)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.text(max_size=20), min_size=1, max_size=4),
    st.dictionaries(st.text(max_size=8), st.text(max_size=150), max_size=3),
    st.sampled_from([TargetStatus.ENABLED, TargetStatus.DISABLED]),
    st.sampled_from([TargetType.DEFAULT, TargetType.FRONTEND]),
    st.one_of(st.none(), st.tuples(st.text(max_size=130), st.text(max_size=5), st.text())),
    st.integers(0, 2**32 - 1),
)
def test_encode_stored_matches_betterproto_on_any_stored_target(
    ips: list[str],
    context: dict[str, str],
    status: TargetStatus,
    type_: TargetType,
    path: tuple[str, str, str] | None,
    max_targets: int,
) -> None:
    t = Target(ips=ips, context=context, status=status, type=type_)
    if path is not None:
        t.stream = Stream(
            name=path[0],
            conduit=Conduit(name=path[1], trench=Trench(name=path[2])),
            max_targets=max_targets,
        )
    stored = canonical_target(t)
    assert encode_stored(stored) == bytes(stored)


def test_store_rejects_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    RegistryStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        RegistryStore(path)


def test_store_uses_wal(tmp_path: Path) -> None:
    with RegistryStore(tmp_path / "r.db") as store:
        assert store.journal_mode == "wal"


def test_load_drops_corrupt_rows_rekeys_and_clamps_future(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    good = target()
    with RegistryStore(path) as store:
        store.upsert(Entry(target_key(good), good, 1000.0))  # in the future
        store.upsert(Entry("old-format-key", target("192.0.2.4/24"), 5.0))
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO targets VALUES ('junk', x'ffffffff', 1.0)")
    conn.commit()
    conn.close()
    reg = TargetRegistry()
    with RegistryStore(path) as store:
        assert store.load(reg, 10.0) == 2
        assert store.keys() == sorted([target_key(good), target_key(target("192.0.2.4/24"))])
    assert reg.get(target_key(good)).last_seen == 10.0  # type: ignore[union-attr]


def test_invalid_timeout(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PersistentRegistry(tmp_path / "r.db", 0.0, entry_timeout=0)


def test_nsp_reply_bytes_equal_betterproto_serialization(tmp_path: Path) -> None:
    """The NSP builds Watch replies from cached per-target bytes; they must parse back."""
    from meridio.api.nsp.v1 import TargetResponse
    from meridio.core.nspconfig import NspConfig
    from meridio.roles.nsp import NspState

    preg = PersistentRegistry(tmp_path / "r.db", 0.0)
    for n in (1, 5, 16):
        preg.register(
            Target(
                ips=[f"198.18.{i}.{n}/24" for i in range(n)],
                context={"identifier": str(n)},
                type=TargetType.FRONTEND,
            ),
            0.0,
        )
    state = NspState(preg, NspConfig())
    wanted = Target(type=TargetType.FRONTEND, status=TargetStatus.ANY)
    data = state.targets_bytes(wanted, bytes(wanted))
    targets = preg.snapshot(wanted)
    assert len(targets) == 3
    assert data == bytes(TargetResponse(targets=targets))
    assert TargetResponse().parse(data).targets == targets
    preg.close()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["register", "unregister", "expire", "restore-none", "view"]),
            st.integers(0, 7),
            st.sampled_from([TargetStatus.ENABLED, TargetStatus.DISABLED]),
        ),
        max_size=40,
    )
)
def test_view_is_always_the_entries_in_key_order(
    ops: list[tuple[str, int, TargetStatus]],
) -> None:
    """The view is kept up to date incrementally; it must equal a view built from scratch."""
    reg = TargetRegistry()
    now = 0.0
    for op, i, status in ops:
        now += 1.0
        t = target(f"192.0.2.{i + 1}/24", identifier=str(i + 1), status=status)
        if i % 3 == 0:
            t.type = TargetType.FRONTEND
        if op == "register":
            reg.register(t, now)
        elif op == "unregister":
            reg.unregister(t, now)
        elif op == "expire":
            reg.expire(now, 5.0)
        elif op == "restore-none":
            reg.restore(target_key(t), None)
        view = reg.view()
        entries = reg.entries()
        assert view.targets() == [e.target for e in entries]
        for f in (
            Target(status=TargetStatus.ANY),
            Target(),
            Target(status=TargetStatus.DISABLED, type=TargetType.FRONTEND),
            Target(status=TargetStatus.ANY, stream=stream()),
        ):
            expected = [e.target for e in entries if matches(f, e.target)]
            assert view.snapshot(f) == expected
            assert view.wire(f) == [bytes(x) for x in expected]
        for entry in entries:
            assert reg.wire(entry) == bytes(entry.target)
