"""The proxy's desired state (meridio.core.proxystate)."""

from __future__ import annotations

from meridio.api.nsp.v1 import Target, TargetStatus, TargetType
from meridio.core import proxystate as ps
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
