"""IPAM: pure allocator (meridio.core.ipam) and its sqlite store (meridio.store.ipam)."""

from __future__ import annotations

import itertools
import sqlite3
import subprocess
import sys
import textwrap
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from meridio.core.ipam import (
    ChildAdded,
    ChildInfo,
    ChildKey,
    ChildRefreshed,
    ChildRemoved,
    ConduitPrefixAdded,
    ConduitPrefixRemoved,
    IpamAllocator,
    IpamConfig,
    IpamExhausted,
    IpamInvalid,
    IpamStateError,
    IpFamily,
    NodeKey,
    NodePrefixAdded,
    NodePrefixRefreshed,
    NodePrefixRemoved,
    OffsetPool,
    parse_family,
)
from meridio.store.ipam import SCHEMA_VERSION, IpamStore, IpamStoreError, PersistentIpam

V4 = IpFamily.IPV4
V6 = IpFamily.IPV6

# Default lengths (/16 -> /20 -> /24, /48 -> /56 -> /64) on lab-safe prefixes.
LAB = IpamConfig(
    ipv4_trench_prefix=IPv4Network("198.18.0.0/16"),
    ipv6_trench_prefix=IPv6Network("fd00:1::/48"),
)

# Tiny prefixes: 2 conduits per trench, 2 nodes per conduit, 6 usable addresses per node (v4)
# and 2 (v6).
SMALL = IpamConfig(
    ipv4_trench_prefix=IPv4Network("198.18.0.0/26"),
    ipv4_conduit_prefix_length=27,
    ipv4_node_prefix_length=28,
    ipv6_trench_prefix=IPv6Network("fd00:2::/122"),
    ipv6_conduit_prefix_length=123,
    ipv6_node_prefix_length=126,
)


def addr(result: Any) -> str:
    return str(result.address)


# ------------------------------------------------------------------------------------------
# Configuration


def test_default_config_is_meridios() -> None:
    config = IpamConfig()
    assert config.ipv4_trench_prefix == IPv4Network("169.255.0.0/16")
    assert (config.ipv4_conduit_prefix_length, config.ipv4_node_prefix_length) == (20, 24)
    assert config.ipv6_trench_prefix == IPv6Network("fd00::/48")
    assert (config.ipv6_conduit_prefix_length, config.ipv6_node_prefix_length) == (56, 64)
    assert config.lease_time is None
    assert config.families == (V4, V6)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"ipv4_conduit_prefix_length": 15}, "ipv4_trench_prefix"),
        ({"ipv4_conduit_prefix_length": 25}, "ipv4_conduit_prefix_length"),
        ({"ipv4_node_prefix_length": 31}, "ipv4_node_prefix_length"),
        ({"ipv4_node_prefix_length": 19}, "ipv4_conduit_prefix_length"),
        ({"ipv6_conduit_prefix_length": 40}, "ipv6_trench_prefix"),
        ({"ipv6_node_prefix_length": 127}, "ipv6_node_prefix_length"),
        ({"ipv6_conduit_prefix_length": 65}, "ipv6_conduit_prefix_length"),
        ({"ipv4_trench_prefix": IPv6Network("fd00::/48")}, "ipv4_trench_prefix"),
        ({"ipv6_trench_prefix": IPv4Network("198.18.0.0/16")}, "ipv6_trench_prefix"),
        ({"ipv4_node_prefix_length": "24"}, "ipv4_node_prefix_length"),
        ({"lease_time": 0}, "lease_time"),
        ({"lease_time": -5.0}, "lease_time"),
    ],
)
def test_config_validation_names_the_setting(kwargs: dict[str, Any], setting: str) -> None:
    base: dict[str, Any] = {
        "ipv4_trench_prefix": IPv4Network("198.18.0.0/16"),
        "ipv6_trench_prefix": IPv6Network("fd00:1::/48"),
    }
    with pytest.raises(ValueError, match=setting):
        IpamConfig(**(base | kwargs))


def test_config_disabled_family_skips_its_checks() -> None:
    config = IpamConfig(ipv6_trench_prefix=None, ipv4_trench_prefix=IPv4Network("198.18.0.0/16"))
    assert config.families == (V4,)


def test_parse_family() -> None:
    assert parse_family("IPv4") is V4
    assert parse_family(" ipv6 ") is V6
    assert parse_family(V6) is V6
    for bad in ("ipv5", "", "4", 4):
        with pytest.raises(IpamInvalid, match="unknown IP family"):
            parse_family(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Allocation


def test_allocate_both_families_hierarchy() -> None:
    a = IpamAllocator(LAB)
    r = a.allocate("t1", "c1", "n1", V4, "bridge", 0.0)
    assert (str(r.address), r.prefix_length) == ("198.18.0.1", 24)
    assert addr(a.allocate("t1", "c1", "n1", "ipv4", "x-src", 0.0)) == "198.18.0.2"
    assert addr(a.allocate("t1", "c1", "n2", V4, "bridge", 0.0)) == "198.18.1.1"
    assert addr(a.allocate("t1", "c2", "n1", V4, "bridge", 0.0)) == "198.18.16.1"
    r6 = a.allocate("t1", "c1", "n1", V6, "bridge", 0.0)
    assert (str(r6.address), r6.prefix_length) == ("fd00:1::1", 64)
    assert addr(a.allocate("t1", "c1", "n2", V6, "bridge", 0.0)) == "fd00:1:0:1::1"
    assert addr(a.allocate("t1", "c2", "n1", "IPV6", "bridge", 0.0)) == "fd00:1:0:100::1"
    assert a.conduit_prefix("t1", "c2", V6) == IPv6Network("fd00:1:0:100::/56")
    assert a.node_prefix("t1", "c1", "n2", V4) == IPv4Network("198.18.1.0/24")
    # Another trench is another address space.
    assert addr(a.allocate("t2", "c9", "n9", V4, "bridge", 0.0)) == "198.18.0.1"


def test_first_allocation_changes_and_refresh() -> None:
    a = IpamAllocator(LAB)
    r = a.allocate("t1", "c1", "n1", V4, "a", 1.0)
    assert [type(c) for c in r.changes] == [ConduitPrefixAdded, NodePrefixAdded, ChildAdded]
    r2 = a.allocate("t1", "c1", "n1", V4, "a", 2.0)
    assert r2.address == r.address
    assert [type(c) for c in r2.changes] == [NodePrefixRefreshed, ChildRefreshed]
    (row,) = a.children()
    assert row.updated == 2.0


def test_dual_stack_side_by_side() -> None:
    a = IpamAllocator(LAB)
    for i in range(5):
        a.allocate("t1", "c1", "n1", V4, f"conn{i}-src", 0.0)
        a.allocate("t1", "c1", "n1", V6, f"conn{i}-src", 0.0)
    a.release("t1", "c1", "n1", V4, "conn1-src")
    assert a.lookup("t1", "c1", "n1", V4, "conn1-src") is None
    assert a.lookup("t1", "c1", "n1", V6, "conn1-src") == IPv6Address("fd00:1::2")
    # First fit: the hole is reused in IPv4, IPv6 continues.
    assert addr(a.allocate("t1", "c1", "n1", V4, "new", 0.0)) == "198.18.0.2"
    assert addr(a.allocate("t1", "c1", "n1", V6, "new", 0.0)) == "fd00:1::6"


def test_idempotent_by_name_and_scoped_per_node() -> None:
    a = IpamAllocator(LAB)
    first = addr(a.allocate("t1", "c1", "n1", V4, "bridge", 0.0))
    a.allocate("t1", "c1", "n1", V4, "other", 0.0)
    assert addr(a.allocate("t1", "c1", "n1", V4, "bridge", 5.0)) == first
    # The same name on another node, conduit or trench is another child.
    assert addr(a.allocate("t1", "c1", "n2", V4, "bridge", 0.0)) == "198.18.1.1"
    assert addr(a.allocate("t1", "c2", "n1", V4, "bridge", 0.0)) == "198.18.16.1"
    assert len(a.children()) == 4


def test_first_and_last_never_handed_out_v4() -> None:
    a = IpamAllocator(SMALL)
    got = [a.allocate("t1", "c1", "n1", V4, f"x{i}", 0.0).address for i in range(14)]
    assert got == [IPv4Address("198.18.0.0") + i for i in range(1, 15)]
    with pytest.raises(IpamExhausted, match=r"no free address left in 198\.18\.0\.0/28") as exc:
        a.allocate("t1", "c1", "n1", V4, "x14", 0.0)
    assert "node n1 of conduit c1 of trench t1" in str(exc.value)
    assert exc.value.prefix == IPv4Network("198.18.0.0/28")
    assert exc.value.level == "address"


def test_first_and_last_never_handed_out_v6() -> None:
    a = IpamAllocator(SMALL)
    got = [str(a.allocate("t1", "c1", "n1", V6, f"x{i}", 0.0).address) for i in range(2)]
    assert got == ["fd00:2::1", "fd00:2::2"]
    with pytest.raises(IpamExhausted, match=r"no free address left in fd00:2::/126"):
        a.allocate("t1", "c1", "n1", V6, "x2", 0.0)


def test_release_and_reuse_first_fit() -> None:
    a = IpamAllocator(SMALL)
    for i in range(5):
        a.allocate("t1", "c1", "n1", V4, f"x{i}", 0.0)
    (removed,) = a.release("t1", "c1", "n1", V4, "x1")
    assert isinstance(removed, ChildRemoved)
    assert removed.address == IPv4Address("198.18.0.2")
    assert a.release("t1", "c1", "n1", V4, "x1") == ()  # idempotent
    assert a.release("t1", "c1", "nope", V4, "x1") == ()  # unknown node: silent
    assert a.release("t9", "c9", "n9", V6, "zz") == ()  # unknown everything: silent
    assert addr(a.allocate("t1", "c1", "n1", V4, "y", 0.0)) == "198.18.0.2"
    assert addr(a.allocate("t1", "c1", "n1", V4, "z", 0.0)) == "198.18.0.6"


def test_exhaustion_of_conduit_and_trench_levels() -> None:
    a = IpamAllocator(SMALL)
    a.allocate("t1", "c1", "n1", V4, "a", 0.0)
    a.allocate("t1", "c1", "n2", V4, "a", 0.0)
    before = a.records()
    with pytest.raises(
        IpamExhausted, match=r"no free /28 left in 198\.18\.0\.0/27 \(conduit c1 of trench t1\)"
    ) as exc:
        a.allocate("t1", "c1", "n3", V4, "a", 0.0)
    assert exc.value.level == "node"
    assert a.records() == before
    a.allocate("t1", "c2", "n1", V4, "a", 0.0)
    assert a.conduit_prefix("t1", "c2", V4) == IPv4Network("198.18.0.32/27")
    before = a.records()
    with pytest.raises(
        IpamExhausted, match=r"no free /27 left in 198\.18\.0\.0/26 \(trench t1\)"
    ) as exc:
        a.allocate("t1", "c3", "n1", V4, "a", 0.0)
    assert exc.value.level == "conduit"
    assert a.records() == before
    with pytest.raises(IpamExhausted, match=r"no free /123 left in fd00:2::/122 \(trench t1\)"):
        for c in ("c1", "c2", "c3"):
            a.allocate("t1", c, "n1", V6, "a", 0.0)
    # Freed node prefixes are reused first-fit.
    a.remove_node("t1", "c1", "n1", V4)
    assert addr(a.allocate("t1", "c1", "n3", V4, "a", 0.0)) == "198.18.0.1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", "c1", "n1", V4, "a", 1.0), "trench name must not be empty"),
        (("t1", "", "n1", V4, "a", 1.0), "conduit name must not be empty"),
        (("t1", "c1", "", V4, "a", 1.0), "node name must not be empty"),
        (("t1", "c1", "n1", V4, "", 1.0), "child name must not be empty"),
        (("t1", "c1", "n1", "ipv5", "a", 1.0), "unknown IP family"),
        (("t1", "c1", "n1", 1, "a", 1.0), "unknown IP family"),
        (("t1", "c1", "n1", V6, "a", 1.0), "ipv6 is disabled"),
        (("t1", "c1", "n1", V4, "x" * 300, 1.0), "longer than"),
        (("t1", "c1", None, V4, "a", 1.0), "node name must be a string"),
        (("t1", "c1", "n1", V4, "a", float("nan")), "time"),
    ],
)
def test_bad_input_raises_and_changes_nothing(
    tmp_path: Path, args: tuple[Any, ...], message: str
) -> None:
    config = IpamConfig(ipv4_trench_prefix=IPv4Network("198.18.0.0/16"), ipv6_trench_prefix=None)
    with PersistentIpam(tmp_path / "ipam.db", config) as ipam:
        ipam.allocate("t1", "c1", "n1", V4, "a", 0.0)
        before = ipam.list_children()
        with pytest.raises(IpamInvalid, match=message):
            ipam.allocate(*args)
        if args[-1] == 1.0:
            with pytest.raises(IpamInvalid, match=message):
                ipam.release(*args[:-1])
        assert ipam.list_children() == before
    with PersistentIpam(tmp_path / "ipam.db", config) as ipam:
        assert ipam.list_children() == before


def test_bad_input_in_pure_core_leaves_records() -> None:
    a = IpamAllocator(LAB)
    a.allocate("t1", "c1", "n1", V4, "a", 0.0)
    before = a.records()
    for bad in (("", "c", "n", V4, "a"), ("t", "c", "n", "x", "a"), ("t", "c", "n", V4, "")):
        with pytest.raises(IpamInvalid):
            a.plan_allocate(*bad, 0.0)
        with pytest.raises(IpamInvalid):
            a.allocate(*bad, 0.0)
    assert a.records() == before


def test_ipv6_slash_64_is_not_enumerated() -> None:
    # A pool holds what is used, never the range: a /64 with nothing used holds nothing, and
    # one with thousands used holds those (enumerating 2**64 offsets would never end).
    pool = OffsetPool(1, (1 << 64) - 2)
    assert pool.first_free() == 1 and len(pool) == 0 and pool.capacity == (1 << 64) - 2
    pool.add((1 << 64) - 2)
    assert pool.first_free() == 1 and list(pool) == [(1 << 64) - 2]
    a = IpamAllocator(LAB)
    for i in range(3000):
        a.allocate("t1", "c1", "n1", V6, f"c{i}", 0.0)
    for i in range(0, 3000, 2):
        a.release("t1", "c1", "n1", V6, f"c{i}")
    assert addr(a.allocate("t1", "c1", "n1", V6, "again", 0.0)) == "fd00:1::1"
    assert addr(a.allocate("t1", "c1", "n1", V6, "next", 0.0)) == "fd00:1::3"


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=200))
def test_offset_pool_is_first_fit(ops: list[tuple[bool, int]]) -> None:
    pool = OffsetPool(3, 30)
    model: set[int] = set()
    for take, value in ops:
        if take:
            expected = min((i for i in range(3, 31) if i not in model), default=None)
            got = pool.first_free()
            assert got == expected
            if got is not None:
                pool.add(got)
                model.add(got)
        elif value in model:
            pool.remove(value)
            model.remove(value)
        assert sorted(pool) == sorted(model)
        assert len(pool) == len(model)


# ------------------------------------------------------------------------------------------
# Lease and garbage collection


def test_collect_children_then_empty_nodes() -> None:
    a = IpamAllocator(IpamConfig(**(LAB.__dict__ | {"lease_time": 10.0})))
    a.allocate("t1", "c1", "n1", V4, "old", 0.0)
    a.allocate("t1", "c1", "n1", V4, "new", 5.0)
    a.allocate("t1", "c1", "n2", V6, "x", 0.0)
    assert a.collect(10.0) == ()  # exactly the lease: not older than it
    removed = a.collect(10.5)
    assert [(type(c).__name__, getattr(c.key, "name", None)) for c in removed] == [
        ("ChildRemoved", "old"),
        ("ChildRemoved", "x"),
        ("NodePrefixRemoved", None),
    ]
    assert a.node_prefix("t1", "c1", "n2", V6) is None
    assert a.node_prefix("t1", "c1", "n1", V4) is not None  # "new" keeps it alive
    a.allocate("t1", "c1", "n1", V4, "new", 12.0)  # refresh extends the lease
    assert a.collect(21.0) == ()
    removed = a.collect(22.5)
    assert [type(c) for c in removed] == [ChildRemoved, NodePrefixRemoved]
    assert a.children() == []
    # Conduit prefixes are kept (stable conduit subnets); remove_conduit removes them.
    assert a.conduit_prefix("t1", "c1", V4) == IPv4Network("198.18.0.0/20")
    assert [type(c) for c in a.remove_conduit("t1", "c1", V4)] == [ConduitPrefixRemoved]
    assert a.records() == [
        r for r in a.records() if isinstance(r, ConduitPrefixAdded) and r.key.family is V6
    ]


def test_collect_released_node_after_lease() -> None:
    a = IpamAllocator(IpamConfig(**(SMALL.__dict__ | {"lease_time": 60.0})))
    a.allocate("t1", "c1", "n1", V4, "a", 100.0)
    a.release("t1", "c1", "n1", V4, "a")
    assert a.collect(150.0) == ()  # node idle for less than the lease
    assert [type(c) for c in a.collect(161.0)] == [NodePrefixRemoved]


def test_collect_without_lease_does_nothing() -> None:
    a = IpamAllocator(LAB)
    a.allocate("t1", "c1", "n1", V4, "a", 0.0)
    assert a.collect(1e12) == ()
    assert len(a.children()) == 1


def test_remove_node_removes_children() -> None:
    a = IpamAllocator(LAB)
    a.allocate("t1", "c1", "n1", V4, "a", 0.0)
    a.allocate("t1", "c1", "n1", V4, "b", 0.0)
    changes = a.remove_node("t1", "c1", "n1", V4)
    assert [type(c) for c in changes] == [ChildRemoved, ChildRemoved, NodePrefixRemoved]
    assert a.remove_node("t1", "c1", "n1", V4) == ()
    assert a.children() == []


# ------------------------------------------------------------------------------------------
# Records and restore


def test_records_round_trip_and_validation() -> None:
    a = IpamAllocator(SMALL)
    for node in ("n1", "n2"):
        for fam in (V4, V6):
            a.allocate("t1", "c1", node, fam, "a", 3.0)
    b = IpamAllocator.from_records(SMALL, a.records())
    assert b.records() == a.records()
    assert b.children() == a.children()
    # Records that do not fit the configuration are refused.
    other = IpamConfig(**(SMALL.__dict__ | {"ipv4_node_prefix_length": 29}))
    with pytest.raises(IpamStateError, match="node prefix length /29"):
        IpamAllocator.from_records(other, a.records())
    no_v6 = IpamConfig(**(SMALL.__dict__ | {"ipv6_trench_prefix": None}))
    with pytest.raises(IpamStateError, match="ipv6 is disabled"):
        IpamAllocator.from_records(no_v6, a.records())
    dup = a.records()
    first_child = next(r for r in dup if isinstance(r, ChildAdded))
    clash = ChildAdded(
        ChildKey(V4, "t1", "c1", first_child.key.node, "b"), first_child.address, 0.0
    )
    with pytest.raises(IpamStateError, match="already in use"):
        IpamAllocator.from_records(SMALL, [*dup, clash])
    edge = ChildAdded(ChildKey(V4, "t1", "c1", "n1", "c"), IPv4Address("198.18.0.15"), 0.0)
    with pytest.raises(IpamStateError, match="first or last"):
        IpamAllocator.from_records(SMALL, [*dup, edge])


def test_child_info_as_dict() -> None:
    a = IpamAllocator(LAB)
    a.allocate("t1", "c1", "n1", V6, "bridge", 7.5)
    (row,) = a.children()
    assert isinstance(row, ChildInfo)
    assert row.prefix_length == 64
    assert row.as_dict() == {
        "trench": "t1",
        "conduit": "c1",
        "node": "n1",
        "family": "ipv6",
        "prefix": "fd00:1::/64",
        "name": "bridge",
        "address": "fd00:1::1",
        "updated": 7.5,
    }


# ------------------------------------------------------------------------------------------
# Store


def test_store_pragmas_and_schema(tmp_path: Path) -> None:
    with IpamStore(tmp_path / "ipam.db") as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store.schema_version == SCHEMA_VERSION
        assert store.load() == []
    conn = sqlite3.connect(tmp_path / "ipam.db")
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(IpamStoreError, match="schema version 99"):
        IpamStore(tmp_path / "ipam.db")


def test_persistent_reopen_gives_same_addresses(tmp_path: Path) -> None:
    path = tmp_path / "ipam.db"
    with PersistentIpam(path, LAB) as ipam:
        got = {
            (fam, node, name): ipam.allocate("t1", "c1", node, fam, name, 1.0)
            for fam in (V4, V6)
            for node in ("n1", "n2")
            for name in ("bridge", "x-src", "x-dst")
        }
        ipam.release("t1", "c1", "n1", V4, "x-src")
        records = ipam.records()
    with PersistentIpam(path, LAB) as ipam:
        assert ipam.records() == records
        for (fam, node, name), result in got.items():
            if (fam, node, name) == (V4, "n1", "x-src"):
                assert ipam.lookup("t1", "c1", node, fam, name) is None
                continue
            assert ipam.allocate("t1", "c1", node, fam, name, 2.0) == result
        # The released hole is reused first-fit after the restart.
        assert ipam.allocate("t1", "c1", "n1", V4, "y", 2.0) == ("198.18.0.2", 24)
        rows = ipam.list_children()
        assert {r.updated for r in rows} == {2.0}


def test_wrong_config_on_reopen_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ipam.db"
    with PersistentIpam(path, LAB) as ipam:
        ipam.allocate("t1", "c1", "n1", V4, "a", 0.0)
    other = IpamConfig(**(LAB.__dict__ | {"ipv4_trench_prefix": IPv4Network("198.19.0.0/16")}))
    with pytest.raises(IpamStateError, match=r"outside the trench prefix 198\.19\.0\.0/16"):
        PersistentIpam(path, other)


def test_crash_without_close(tmp_path: Path) -> None:
    path = tmp_path / "ipam.db"
    ipam = PersistentIpam(path, LAB)
    results = [ipam.allocate("t1", "c1", "n1", V4, f"n{i}", 1.0) for i in range(10)]
    records = ipam.records()
    # No close(): the first object is still alive (no checkpoint, WAL not merged) while a new
    # one opens the same file, as after a crash.
    leftover = [ipam]
    del ipam
    again = PersistentIpam(path, LAB)
    assert again.records() == records
    assert [again.allocate("t1", "c1", "n1", V4, f"n{i}", 2.0) for i in range(10)] == results
    again.close()
    leftover[0].close()


def test_crash_by_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "ipam.db"
    script = textwrap.dedent(
        f"""
        import os, signal
        from ipaddress import IPv4Network, IPv6Network
        from meridio.core.ipam import IpamConfig
        from meridio.store.ipam import PersistentIpam
        config = IpamConfig(
            ipv4_trench_prefix=IPv4Network("198.18.0.0/16"),
            ipv6_trench_prefix=IPv6Network("fd00:1::/48"),
        )
        ipam = PersistentIpam({str(path)!r}, config)
        for i in range(20):
            address, length = ipam.allocate("t1", "c1", "n1", "ipv6", f"x{{i}}", 1.0)
            print(address, length, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr
    replied = [tuple(line.split()) for line in proc.stdout.splitlines()]
    assert len(replied) == 20
    with PersistentIpam(path, LAB) as ipam:
        for i, (address, length) in enumerate(replied):
            assert ipam.lookup("t1", "c1", "n1", V6, f"x{i}") == address
            assert int(length) == 64


def test_failed_persist_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ipam.db"
    ipam = PersistentIpam(path, LAB)
    ipam.allocate("t1", "c1", "n1", V4, "a", 0.0)
    before = ipam.records()
    store = ipam._store
    original = store._write

    def failing_write(conn: sqlite3.Connection, change: Any) -> None:
        if isinstance(change, ChildAdded):
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        original(conn, change)

    monkeypatch.setattr(store, "_write", failing_write)
    with pytest.raises(IpamStoreError, match="simulated"):
        ipam.allocate("t1", "c2", "n7", V4, "b", 1.0)  # conduit + node + child, all or nothing
    with pytest.raises(IpamStoreError):
        ipam.allocate("t1", "c1", "n1", V4, "c", 1.0)
    assert ipam.records() == before
    monkeypatch.undo()
    assert store.load() == before
    # And the instance keeps working afterwards.
    assert ipam.allocate("t1", "c2", "n7", V4, "b", 1.0) == ("198.18.16.1", 24)
    ipam.close()
    with pytest.raises(IpamStoreError, match="closed"):
        ipam.allocate("t1", "c1", "n1", V4, "a", 0.0)
    with PersistentIpam(path, LAB) as reopened:
        assert len(reopened.list_children()) == 2


def test_persistent_collect_and_remove(tmp_path: Path) -> None:
    path = tmp_path / "ipam.db"
    config = IpamConfig(**(SMALL.__dict__ | {"lease_time": 30.0}))
    with PersistentIpam(path, config) as ipam:
        ipam.allocate("t1", "c1", "n1", V4, "a", 0.0)
        ipam.allocate("t1", "c1", "n2", V4, "b", 20.0)
        ipam.allocate("t1", "c2", "n1", V6, "c", 20.0)
        assert [type(c) for c in ipam.collect(40.0)] == [ChildRemoved, NodePrefixRemoved]
        assert [type(c) for c in ipam.remove_conduit("t1", "c2", V6)] == [
            ChildRemoved,
            NodePrefixRemoved,
            ConduitPrefixRemoved,
        ]
        assert [type(c) for c in ipam.remove_node("t1", "c1", "n2", V4)] == [
            ChildRemoved,
            NodePrefixRemoved,
        ]
        records = ipam.records()
    with PersistentIpam(path, config) as ipam:
        assert ipam.records() == records
        assert [type(r) for r in records] == [ConduitPrefixAdded]


def test_collect_counts_leases_from_since() -> None:
    config = IpamConfig(**(SMALL.__dict__ | {"lease_time": 30.0}))
    a = IpamAllocator(config)
    a.allocate("t1", "c1", "n1", V4, "old", 0.0)
    a.allocate("t1", "c1", "n1", V4, "new", 100.0)
    # Without a floor "old" is long gone at 120; from a restart at 100 it has until 130.
    assert [c.key.name for c in a.plan_collect(120.0) if isinstance(c, ChildRemoved)] == ["old"]
    assert a.plan_collect(130.0, since=100.0) == ()
    removed = a.collect(130.5, since=100.0)
    assert [type(c) for c in removed] == [ChildRemoved, ChildRemoved, NodePrefixRemoved]


def test_restarted_ipam_gives_restored_children_a_whole_lease(tmp_path: Path) -> None:
    """The issue: a restart after more than the lease time must not collect live children."""
    path = tmp_path / "ipam.db"
    config = IpamConfig(**(SMALL.__dict__ | {"lease_time": 30.0}))
    with PersistentIpam(path, config, now=0.0) as ipam:
        assert ipam.restored == 0
        for name in ("a", "b", "c"):
            ipam.allocate("t1", "c1", "n1", V4, name, 0.0)
    with PersistentIpam(path, config, now=1000.0) as ipam:
        assert (ipam.restored, ipam.restored_pending) == (3, 3)
        assert ipam.collect(1030.0) == ()
        assert ipam.allocate("t1", "c1", "n1", V4, "a", 1010.0) == ("198.18.0.1", 28)
        assert ipam.restored_pending == 2
        removed = ipam.collect(1030.5)
        assert sorted(c.key.name for c in removed if isinstance(c, ChildRemoved)) == ["b", "c"]
        assert ipam.restored_pending == 0
        assert [c.name for c in ipam.list_children()] == ["a"]


def test_group_commit_writes_many_allocations_in_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "ipam.db"
    ipam = PersistentIpam(path, LAB)
    staged = [ipam.stage_allocate("t1", "c1", "n1", V4, f"x{i}", 1.0) for i in range(20)]
    assert {seq for _, _, seq in staged} == {1}
    assert len({address for address, _, _ in staged}) == 20  # memory is ahead: no duplicates
    assert ipam.pending_seq() == 1
    batch = ipam.seal()
    assert batch is not None and batch.seq == 1
    assert ipam._store.load() == []  # nothing on disk before the write
    # A release of a child whose allocation is being written waits for that batch; a new
    # change goes in the next one.
    changes, seq = ipam.stage_release("t1", "c1", "n1", V4, "x3")
    assert len(changes) == 1 and seq == 2
    assert ipam.stage_release("t1", "c1", "n1", V4, "x3") == ((), 2)
    assert ipam.stage_release("t1", "c1", "n1", V4, "never") == ((), 0)
    ipam.write(batch)
    assert ipam.finish(batch, None) == ()
    assert ipam.pending_seq() == 2
    ipam.commit()
    assert ipam.pending_seq() == 0
    ipam.close()
    with PersistentIpam(path, LAB) as again:
        assert sorted(c.name for c in again.list_children()) == sorted(
            f"x{i}" for i in range(20) if i != 3
        )


def test_failed_batch_goes_back_to_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ipam.db"
    ipam = PersistentIpam(path, LAB)
    ipam.allocate("t1", "c1", "n1", V4, "kept", 0.0)
    before = ipam.records()
    ipam.stage_allocate("t1", "c1", "n1", V4, "lost-1", 1.0)
    batch = ipam.seal()
    assert batch is not None
    ipam.stage_allocate("t1", "c1", "n1", V4, "lost-2", 1.0)  # on top, in the open batch
    monkeypatch.setattr(ipam._store, "apply", _fail_apply)
    with pytest.raises(IpamStoreError):
        ipam.write(batch)
    assert ipam.finish(batch, IpamStoreError("x")) == (2, 3)
    assert ipam.records() == before
    assert ipam.pending_seq() == 0
    monkeypatch.undo()
    assert ipam.allocate("t1", "c1", "n1", V4, "next", 2.0) == ("198.18.0.2", 24)
    ipam.close()


def _fail_apply(*args: Any) -> None:
    raise IpamStoreError("disk I/O error (simulated)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("t1", "../c\n0", "n1", V4, "a"), "conduit name '../c\\\\n0' must not contain a path"),
        (("t1", "c1", "n1", V4, "   "), "child name '   ' must not contain whitespace"),
        (("t1", "c1", "n 1", V4, "a"), "node name 'n 1' must not contain whitespace"),
        (("t\x001", "c1", "n1", V4, "a"), "trench name .* control or invisible"),
        (("t1", "c1", "n1", V4, ".."), "child name '..' must not be . or .."),
        (("t1", "c1", "n1", V4, "a\u202eb"), "control or invisible"),
    ],
)
def test_request_names_must_be_names(args: tuple[Any, ...], message: str) -> None:
    a = IpamAllocator(LAB)
    with pytest.raises(IpamInvalid, match=message):
        a.plan_allocate(*args, 0.0)
    with pytest.raises(IpamInvalid, match=message):
        a.plan_release(*args)
    assert a.records() == []


# ------------------------------------------------------------------------------------------
# Stateful property test: allocate / release / collect / restart / crash against sqlite

LEASE = 10.0
TRENCHES = ("t1", "t2")
CONDUITS = ("c1", "c2", "c3")  # 3 > 2 conduit prefixes per trench
NODES = ("n1", "n2", "n3")  # 3 > 2 node prefixes per conduit
NAMES = ("a", "b", "c", "d", "e", "f", "g")  # 7 > 6 usable IPv4 addresses per node (/29)
MACHINE_CONFIG = IpamConfig(
    ipv4_trench_prefix=IPv4Network("198.18.0.0/27"),
    ipv4_conduit_prefix_length=28,
    ipv4_node_prefix_length=29,
    ipv6_trench_prefix=IPv6Network("fd00:3::/122"),
    ipv6_conduit_prefix_length=123,
    ipv6_node_prefix_length=124,
    lease_time=LEASE,
)
_Key = tuple[str, str, str, IpFamily, str]


class IpamMachine(RuleBasedStateMachine):
    path: Path

    def __init__(self) -> None:
        super().__init__()
        self.ipam = PersistentIpam(self.path, MACHINE_CONFIG)
        self.abandoned: list[PersistentIpam] = []
        self.now = 0.0
        self.model: dict[_Key, tuple[str, float]] = {}  # child -> (address, updated)

    def teardown(self) -> None:
        self.ipam.close()
        for old in self.abandoned:
            old.close()

    @rule(
        trench=st.sampled_from(TRENCHES),
        conduit=st.sampled_from(CONDUITS),
        node=st.sampled_from(NODES),
        family=st.sampled_from([V4, V6]),
        name=st.sampled_from(NAMES),
    )
    def allocate(self, trench: str, conduit: str, node: str, family: IpFamily, name: str) -> None:
        key = (trench, conduit, node, family, name)
        before = self.ipam.records()
        try:
            address, length = self.ipam.allocate(trench, conduit, node, family, name, self.now)
        except IpamExhausted as exc:
            assert key not in self.model
            assert self.ipam.records() == before
            self._check_really_full(exc, key)
            return
        assert length == MACHINE_CONFIG.node_prefix_length(family)
        if key in self.model:
            assert address == self.model[key][0]  # idempotent
        self.model[key] = (address, self.now)

    @rule(
        conduit=st.sampled_from(CONDUITS[:2]),
        node=st.sampled_from(NODES[:2]),
        family=st.sampled_from([V4, V6]),
    )
    def fill_node(self, conduit: str, node: str, family: IpFamily) -> None:
        """Allocate every name on one node: reaches address exhaustion (and idempotency)."""
        for name in NAMES:
            self.allocate("t1", conduit, node, family, name)

    def _check_really_full(self, exc: IpamExhausted, key: _Key) -> None:
        trench, conduit, node, family, _ = key
        rows = self.ipam.records()
        if exc.level == "address":
            used = [
                r
                for r in rows
                if isinstance(r, ChildAdded)
                and r.key.node_key == NodeKey(family, trench, conduit, node)
            ]
            assert len(used) == exc.prefix.num_addresses - 2
        elif exc.level == "node":
            nodes = [
                r
                for r in rows
                if isinstance(r, NodePrefixAdded)
                and (r.key.trench, r.key.conduit, r.key.family) == (trench, conduit, family)
            ]
            assert len(nodes) == 2
        else:
            conduits = [
                r
                for r in rows
                if isinstance(r, ConduitPrefixAdded)
                and (r.key.trench, r.key.family) == (trench, family)
            ]
            assert len(conduits) == 2

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def release_known(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model, key=str)))
        (removed,) = self.ipam.release(*key)
        assert str(getattr(removed, "address", "")) == self.model.pop(key)[0]

    @rule(
        trench=st.sampled_from(TRENCHES),
        node=st.sampled_from(NODES),
        name=st.sampled_from(NAMES),
    )
    def release_any(self, trench: str, node: str, name: str) -> None:
        key = (trench, "c1", node, V4, name)
        changes = self.ipam.release(*key)
        assert len(changes) == (1 if key in self.model else 0)
        self.model.pop(key, None)

    @rule(dt=st.sampled_from([0.0, 0.5, 3.0, 7.0, 11.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def collect(self) -> None:
        self.ipam.collect(self.now)
        expired = {k for k, (_, updated) in self.model.items() if self.now - updated > LEASE}
        for k in expired:
            del self.model[k]
        for r in self.ipam.records():
            if isinstance(r, NodePrefixAdded):
                node = (r.key.trench, r.key.conduit, r.key.node, r.key.family)
                has_child = any(k[:4] == node for k in self.model)
                assert has_child or self.now - r.updated <= LEASE

    @rule()
    def restart(self) -> None:
        before = self.ipam.records()
        self.ipam.close()
        self.ipam = PersistentIpam(self.path, MACHINE_CONFIG)
        assert self.ipam.records() == before

    @rule()
    def crash(self) -> None:
        before = self.ipam.records()
        self.abandoned.append(self.ipam)  # never closed before the new one opens
        self.ipam = PersistentIpam(self.path, MACHINE_CONFIG)
        assert self.ipam.records() == before

    @invariant()
    def matches_model(self) -> None:
        got = {
            (r.trench, r.conduit, r.node, r.family, r.name): (str(r.address), r.updated)
            for r in self.ipam.list_children()
        }
        assert got == self.model

    @invariant()
    def nothing_overlaps(self) -> None:
        records = self.ipam.records()
        conduits = {r.key: r.prefix for r in records if isinstance(r, ConduitPrefixAdded)}
        nodes = {r.key: r.prefix for r in records if isinstance(r, NodePrefixAdded)}
        for family in (V4, V6):
            trench_prefix = MACHINE_CONFIG.trench_prefix(family)
            assert trench_prefix is not None
            for trench in TRENCHES:
                cps = [p for k, p in conduits.items() if (k.family, k.trench) == (family, trench)]
                nps = [p for k, p in nodes.items() if (k.family, k.trench) == (family, trench)]
                for group in (cps, nps):
                    for p, q in itertools.combinations(group, 2):
                        assert not p.overlaps(q)
                assert all(p.subnet_of(trench_prefix) for p in cps)  # type: ignore[arg-type]
                addresses = [
                    ip_address(a)
                    for k, (a, _) in self.model.items()
                    if (k[3], k[0]) == (family, trench)
                ]
                assert len(addresses) == len(set(addresses))  # never handed out twice
        for k, p in nodes.items():
            assert p.subnet_of(conduits[k.conduit_key])  # type: ignore[arg-type]
        for row in self.ipam.list_children():
            assert row.address in row.prefix
            assert row.address not in (row.prefix.network_address, row.prefix.broadcast_address)
            assert nodes[NodeKey(row.family, row.trench, row.conduit, row.node)] == row.prefix


def test_ipam_state_machine(tmp_path: Path) -> None:
    counter = itertools.count()

    class Machine(IpamMachine):
        def __init__(self) -> None:
            self.path = tmp_path / f"machine-{next(counter)}.db"
            super().__init__()

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=100,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
