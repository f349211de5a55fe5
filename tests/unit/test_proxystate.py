"""The proxy's desired state (meridio.core.proxystate)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meridio.api.ipam.v1 import Child, IpFamily, Prefix, Subnet
from meridio.api.meridio.ipam.v1 import AllocateResponse, Allocation
from meridio.api.meridio.nsp.v1 import UpdateResponse, UpdateResult
from meridio.api.nsp.v1 import Conduit, Stream, Target, TargetStatus, TargetType, Trench
from meridio.core import proxystate as ps
from meridio.core import wire
from meridio.core.proxystate import Registration, SourceRule, TargetConnection


def frontend(connect: str, instance: str = "") -> Target:
    context = {"connect": connect}
    if instance:
        context["instance"] = instance
    return Target(ips=[connect.rsplit(":", 1)[0]], context=context, type=TargetType.FRONTEND)


def test_child_names_and_cidrs() -> None:
    assert ps.target_child("t1-42") == "t1-42-src"
    assert ps.lb_child("node1>lb") == "node1>lb-dst"
    assert ps.cidr("fd00:10:0:0::0002", 64) == "fd00:10::2/64"
    assert ps.cidr("198.18.0.2", 24) == "198.18.0.2/24"


def test_lb_peers_come_from_frontends_with_a_connect_endpoint() -> None:
    peers = ps.lb_peers(
        [
            frontend("198.51.100.11:7779", "lb1"),
            frontend("198.51.100.12:7779"),
            Target(ips=["198.51.100.13"], type=TargetType.FRONTEND),  # no endpoint: skipped
        ]
    )
    assert peers == {
        "198.51.100.11:7779": ps.LbPeer("198.51.100.11:7779", "lb1"),
        "198.51.100.12:7779": ps.LbPeer("198.51.100.12:7779", "198.51.100.12:7779"),
    }
    assert ps.lb_connection_id("node1", "198.51.100.11:7779") == "node1>198.51.100.11:7779"


def test_a_disabled_frontend_is_connected_but_takes_no_replies() -> None:
    draining = frontend("198.51.100.11:7779", "lb1")
    draining.status = TargetStatus.DISABLED
    assert ps.lb_peers([draining]) == {
        "198.51.100.11:7779": ps.LbPeer("198.51.100.11:7779", "lb1", enabled=False)
    }


def test_egress_rules_per_served_family() -> None:
    vips = ["203.0.113.10/32", "2001:db8::10/128", "203.0.113.10/32", "bogus"]
    assert ps.egress_rules(vips, (4, 6)) == {
        SourceRule(4, "203.0.113.10/32"),
        SourceRule(6, "2001:db8::10/128"),
    }
    assert ps.egress_rules(vips, (6,)) == {SourceRule(6, "2001:db8::10/128")}


def test_egress_next_hops_are_sorted_per_family() -> None:
    hops = ps.egress_next_hops(
        ["198.18.0.10/24", "fd00:10::3/64", "198.18.0.3/24", "198.18.0.10/24"]
    )
    assert hops == {4: ("198.18.0.3", "198.18.0.10"), 6: ("fd00:10::3",)}
    assert ps.egress_next_hops([]) == {}


def test_registrations_follow_connections() -> None:
    conns = [
        TargetConnection("t1", ("fd00:10::4/64", "198.18.0.4/24"), {"a": 1, "b": 2}, True),
        TargetConnection("t2", ("198.18.0.5/24",), {"a": 2}, False),
        TargetConnection("t3", (), {"a": 3}, True),  # no address yet: nothing to register
        TargetConnection("t4", ("198.18.0.6/24",), {}, True),  # opened no stream
    ]
    regs = ps.registrations(conns)
    ips1 = ("198.18.0.4/24", "fd00:10::4/64")  # canonical order: IPv4 first
    assert regs == {
        ("a", ips1): Registration("a", ips1, 1, True),
        ("b", ips1): Registration("b", ips1, 2, True),
        ("a", ("198.18.0.5/24",)): Registration("a", ("198.18.0.5/24",), 2, False),
    }


def test_registration_plans() -> None:
    old = Registration("a", ("198.18.0.4/24",), 1, False)
    gone = Registration("a", ("198.18.0.9/24",), 5, True)
    enabled = Registration("a", ("198.18.0.4/24",), 1, True)
    new = Registration("b", ("198.18.0.4/24",), 7, True)
    plan = ps.plan_registrations(
        {old.key: old, gone.key: gone}, {enabled.key: enabled, new.key: new}
    )
    assert plan.register == (enabled, new)
    assert plan.unregister == (gone,)
    same = ps.plan_registrations({new.key: new}, {new.key: new})
    assert same.register == () and same.unregister == ()


# --- incremental registrations, keepalive schedule, IPAM child bytes ----------------------------

connection_ids = st.sampled_from([f"c{i}" for i in range(6)])
target_connections = st.builds(
    TargetConnection,
    connection_id=st.just(""),  # replaced by the id it is updated under
    addresses=st.sampled_from(
        [(), ("198.18.0.2/24",), ("198.18.0.3/24", "fd00::3/64"), ("fd00::3/64", "198.18.0.3/24")]
    ),
    identifiers=st.dictionaries(st.sampled_from(["s1", "s2"]), st.integers(1, 4), max_size=2),
    up=st.booleans(),
)


@given(st.lists(st.tuples(connection_ids, st.none() | target_connections), max_size=40))
def test_desired_registrations_follow_connections_one_by_one(
    updates: list[tuple[str, TargetConnection | None]],
) -> None:
    """After every update, what is desired equals registrations() of every connection, and
    the keys said to be affected cover every key whose registration changed."""
    wanted = ps.DesiredRegistrations()
    connections: dict[str, TargetConnection] = {}
    for cid, conn in updates:
        before = dict(wanted.desired)
        if conn is None:
            connections.pop(cid, None)
            affected = wanted.update(cid, None)
        else:
            conn = TargetConnection(cid, conn.addresses, conn.identifiers, conn.up)
            connections[cid] = conn
            affected = wanted.update(cid, conn)
        assert wanted.desired == ps.registrations(connections.values())
        changed = {
            k
            for k in before.keys() | wanted.desired.keys()
            if before.get(k) != wanted.desired.get(k)
        }
        assert changed <= affected
    assert wanted.connections() == {
        cid for cid, conn in connections.items() if ps.registrations([conn])
    }


def test_two_connections_with_the_same_addresses_register_once_lowest_id_first() -> None:
    wanted = ps.DesiredRegistrations()
    a = TargetConnection("b", ("198.18.0.2/24",), {"s": 1}, True)
    b = TargetConnection("a", ("198.18.0.2/24",), {"s": 2}, True)
    wanted.update("b", a)
    wanted.update("a", b)
    assert [r.identifier for r in wanted.desired.values()] == [2]
    wanted.update("a", None)
    assert [r.identifier for r in wanted.desired.values()] == [1]


def test_schedule_gives_due_keys_earliest_first_and_forgets_replaced_times() -> None:
    schedule: ps.Schedule[str] = ps.Schedule()
    assert schedule.next() == float("inf")
    schedule.set("a", 5.0)
    schedule.set("b", 3.0)
    schedule.set("c", 4.0)
    schedule.set("b", 6.0)  # later now: its old time is stale
    schedule.discard("c")
    assert len(schedule) == 2 and "b" in schedule and "c" not in schedule
    assert schedule.next() == 5.0
    assert schedule.due(4.9, 10) == []
    assert schedule.due(10.0, 1) == ["a"]
    assert schedule.get("a") is None and schedule.get("b") == 6.0
    assert schedule.due(10.0, 10) == ["b"]
    assert schedule.next() == float("inf")


def test_schedule_keeps_its_heap_small_when_keys_are_set_again_and_again() -> None:
    schedule: ps.Schedule[int] = ps.Schedule()
    for round_ in range(50):
        for key in range(10):
            schedule.set(key, float(round_ * 10 + key))
    assert len(schedule) == 10
    assert len(schedule._heap) <= 4 * 10 + 64
    assert schedule.due(math.inf, 100) == list(range(10))


@given(st.text(max_size=300))
def test_child_bytes_are_what_betterproto_makes(name: str) -> None:
    subnet = Subnet(
        conduit=Conduit(name="conduit-a", trench=Trench(name="trench-a")),
        node="node1",
        ip_family=IpFamily.IPV6,
    )
    assert ps.child_bytes(name, bytes(Child(subnet=subnet))) == bytes(
        Child(name=name, subnet=subnet)
    )


@given(
    st.lists(st.text(max_size=200), max_size=4),
    st.dictionaries(st.text(max_size=20), st.text(max_size=200), max_size=3),
    st.sampled_from(list(TargetStatus)),
    st.sampled_from(list(TargetType)),
    st.sampled_from(["", "stream-a", "s" * 300]),
)
def test_target_bytes_are_what_betterproto_makes(
    ips: list[str],
    context: dict[str, str],
    status: TargetStatus,
    type_: TargetType,
    name: str,
) -> None:
    stream = Stream(name=name, conduit=Conduit(name="conduit-a", trench=Trench(name="trench-a")))
    stream_bytes = bytes(stream) if name else b""
    made = ps.target_bytes(ips, context, int(status), stream_bytes, int(type_))
    assert made == bytes(
        Target(
            ips=ips,
            context=context,
            status=status,
            type=type_,
            stream=stream if name else Stream(),
        )
    )


@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.text(max_size=50)), max_size=20),
    st.binary(max_size=40),
)
def test_update_results_decode_as_the_generated_decoder_does(
    results: list[tuple[int, str]], junk: bytes
) -> None:
    data = bytes(UpdateResponse(results=[UpdateResult(status=s, message=m) for s, m in results]))
    assert ps.update_results(data) == results
    try:
        expected = [(r.status, r.message) for r in wire.decode(UpdateResponse, junk).results]
    except wire.WireError:
        expected = None
    try:
        got = ps.update_results(junk)
    except ValueError:
        got = None
    if got is not None:  # what the hand decoder takes, the strict one takes the same way
        assert got == expected


@given(
    st.lists(
        st.tuples(
            st.text(max_size=40),
            st.integers(-(2**31), 2**31 - 1),
            st.integers(0, 2**32 - 1),
            st.text(max_size=40),
        ),
        max_size=20,
    ),
    st.binary(max_size=40),
)
def test_allocations_decode_as_the_generated_decoder_does(
    items: list[tuple[str, int, int, str]], junk: bytes
) -> None:
    data = bytes(
        AllocateResponse(
            allocations=[
                Allocation(prefix=Prefix(address=a, prefix_length=n), status=s, message=m)
                for a, n, s, m in items
            ]
        )
    )
    assert ps.allocations(data) == items
    try:
        expected = [
            (a.prefix.address, a.prefix.prefix_length, a.status, a.message)
            for a in wire.decode(AllocateResponse, junk).allocations
        ]
    except wire.WireError:
        expected = None
    try:
        got = ps.allocations(junk)
    except ValueError:
        got = None
    if got is not None:
        assert got == expected


@given(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.none() | st.sampled_from([1.0, 2.0, 3.0])),
        max_size=30,
    ),
    st.sampled_from([0.5, 1.0, 2.0, 3.0, math.inf]),
)
def test_schedule_due_takes_exactly_the_keys_due_by_then(
    ops: list[tuple[str, float | None]], horizon: float
) -> None:
    schedule: ps.Schedule[str] = ps.Schedule()
    times: dict[str, float] = {}
    for key, when in ops:
        if when is None:
            schedule.discard(key)
            times.pop(key, None)
        else:
            schedule.set(key, when)
            times[key] = when
    due = schedule.due(horizon, 100)
    assert sorted(due) == sorted(k for k, t in times.items() if t <= horizon)
    assert [times[k] for k in due] == sorted(times[k] for k in due)
    assert len(schedule) == len(times) - len(due)


def test_a_tag_beyond_32_bits_is_refused_as_the_strict_decoder_refuses_it() -> None:
    # found by the property above: field number 2**29 (tag 2**32) in five varint bytes
    junk = b"\x80\x80\x80\x80\x10\x00"
    with pytest.raises(wire.WireError):
        wire.decode(UpdateResponse, junk)
    with pytest.raises(ValueError):
        ps.update_results(junk)


def test_a_known_field_of_a_fixed_size_wire_type_is_refused_as_the_strict_decoder_does() -> None:
    # found by a longer run of the property: results (field 1) sent as a fixed64
    junk = b"\t" + bytes(8)
    with pytest.raises(wire.WireError):
        wire.decode(UpdateResponse, junk)
    with pytest.raises(ValueError):
        ps.update_results(junk)
