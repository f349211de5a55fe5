"""Tests for the pure part of meridio.lb.nftables: the scripts it renders."""

from __future__ import annotations

import ipaddress

import pytest

from meridio.core.classifier import FlowSpec, StreamKey
from meridio.lb import nftables
from meridio.lb.nftables import (
    StreamMap,
    TableSpec,
    flow_counter_name,
    render_delete,
    render_map_update,
    render_table,
)

A: StreamKey = ("t1", "c1", "stream-a")
B: StreamKey = ("t1", "c1", "b")
ip = ipaddress.ip_address
net = ipaddress.ip_network


def spec(**kwargs: object) -> TableSpec:
    defaults: dict[str, object] = {
        "name": "lb-test",
        "seed": 0x1234,
        "streams": (StreamMap(A, (5001, 5002, 0, 5001, 5002)), StreamMap(B, (7001, 7001, 7001))),
        "flows": (
            FlowSpec(
                "web",
                A,
                (ip("203.0.113.1"), ip("2001:db8::1")),
                priority=5,
                protocols=(6,),
                dports=((80, 80), (8000, 8080)),
                sources=(net("192.168.0.0/16"), net("2001:db8:f::/48")),
            ),
            FlowSpec("rest", B, (ip("203.0.113.1"),), priority=1, protocols=(6, 17, 132)),
            FlowSpec(
                "dns", B, (ip("203.0.113.2"),), priority=1, protocols=(17,), sports=((53, 53),)
            ),
        ),
        "vips": ("203.0.113.3/32", "2001:db8::3/128"),
    }
    defaults.update(kwargs)
    return TableSpec(**defaults)  # type: ignore[arg-type]


def lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines()]


def test_table_is_replaced_atomically() -> None:
    got = lines(render_table(spec()))
    assert got[:3] == ["table inet lb-test {}", "delete table inet lb-test", "table inet lb-test {"]
    # the table block is closed before the elements are added
    assert got.index("}", got.index("chain verdict {")) < got.index(
        "add element inet lb-test stream-stream-a { 0 : 5001, 1 : 5002, 2 : 0, 3 : 5001, 4 : 5002 }"
    )


def test_sets_counters_and_maps() -> None:
    got = lines(render_table(spec()))
    for name in ("no-flow", "no-target", "icmp-error", "flow-web", "flow-rest", "flow-dns"):
        assert f"counter {name} {{ }}" in got
    # the flows' VIPs and the extra ones, collapsed (203.0.113.2 and .3 make a /31)
    assert "elements = { 203.0.113.1/32, 203.0.113.2/31 }" in got
    assert "elements = { 2001:db8::1/128, 2001:db8::3/128 }" in got
    assert "map stream-stream-a {" in got
    assert "typeof numgen random mod 5 : meta mark" in got
    assert "map stream-b {" in got
    assert "typeof numgen random mod 3 : meta mark" in got
    assert "add element inet lb-test stream-b { 0 : 7001, 1 : 7001, 2 : 7001 }" in got


def test_chains() -> None:
    got = lines(render_table(spec()))
    start = got.index("chain defrag {")
    assert got[start + 1 : start + 4] == [
        "type filter hook prerouting priority raw; policy accept;",
        "ip daddr @vips4 notrack",
        "ip6 daddr @vips6 notrack",
    ]
    assert "ct state untracked accept" in got
    start = got.index("chain prerouting {")
    assert got[start + 1 : start + 3] == [
        "type filter hook prerouting priority mangle; policy accept;",
        "meta l4proto { icmp, ipv6-icmp } jump icmp-errors",
    ]
    start = got.index("chain icmp-errors {")
    assert got[start + 1 : start + 3] == [
        "ip daddr @vips4 icmp type { destination-unreachable, time-exceeded, parameter-problem }"
        ' counter name "icmp-error" accept',
        "ip6 daddr @vips6 icmpv6 type"
        " { destination-unreachable, packet-too-big, time-exceeded, parameter-problem }"
        ' counter name "icmp-error" accept',
    ]


def test_flow_rules_in_match_order() -> None:
    got = lines(render_table(spec()))
    start = got.index("chain prerouting {")
    end = got.index("}", start)
    body = got[start + 3 : end]
    jhash4 = "jhash ip saddr . ip daddr . th sport . th dport"
    jhash6 = "jhash ip6 saddr . ip6 daddr . th sport . th dport"
    assert body == [
        "ip daddr 203.0.113.1 meta l4proto tcp th dport { 80, 8000-8080 }"
        ' ip saddr 192.168.0.0/16 counter name "flow-web"'
        f" meta mark set {jhash4} mod 5 seed 0x00001234 map @stream-stream-a goto verdict",
        "ip6 daddr 2001:db8::1 meta l4proto tcp th dport { 80, 8000-8080 }"
        ' ip6 saddr 2001:db8:f::/48 counter name "flow-web"'
        f" meta mark set {jhash6} mod 5 seed 0x00001234 map @stream-stream-a goto verdict",
        # priority 1: "dns" before "rest" by name; "any" ports and sources are left out
        'ip daddr 203.0.113.2 meta l4proto udp th sport 53 counter name "flow-dns"'
        f" meta mark set {jhash4} mod 3 seed 0x00001234 map @stream-b goto verdict",
        'ip daddr 203.0.113.1 meta l4proto { tcp, udp, sctp } counter name "flow-rest"'
        f" meta mark set {jhash4} mod 3 seed 0x00001234 map @stream-b goto verdict",
        'ip daddr @vips4 counter name "no-flow" drop',
        'ip6 daddr @vips6 counter name "no-flow" drop',
    ]


def test_source_families() -> None:
    flows = (
        # IPv4 sources only: no IPv6 rule, since no IPv6 source can match
        FlowSpec(
            "v4src", A, (ip("203.0.113.1"), ip("2001:db8::1")), sources=(net("198.18.0.0/15"),)
        ),
        # a /0 means any source of that family: no saddr match at all
        FlowSpec("any", B, (ip("203.0.113.1"),), sources=(net("0.0.0.0/0"),)),
    )
    got = lines(render_table(spec(flows=flows)))
    rules = [line for line in got if "goto verdict" in line]
    assert len(rules) == 2
    assert rules[0].startswith('ip daddr 203.0.113.1 counter name "flow-any" meta mark set')
    assert rules[1].startswith("ip daddr 203.0.113.1 ip saddr 198.18.0.0/15 counter")


def test_no_target_drop_or_reject() -> None:
    got = lines(render_table(spec()))
    start = got.index("chain verdict {")
    assert got[start + 1 : start + 3] == ["meta mark != 0 accept", 'counter name "no-target" drop']
    got = lines(render_table(spec(reject_no_target=True)))
    start = got.index("chain verdict {")
    assert got[start + 1 : start + 4] == [
        "meta mark != 0 accept",
        'meta l4proto tcp counter name "no-target" reject with tcp reset',
        'counter name "no-target" reject with icmpx port-unreachable',
    ]


def test_names_are_sanitised_and_unique() -> None:
    assert flow_counter_name("web") == "flow-web"
    odd = flow_counter_name("a.b c")
    assert odd.startswith("flow-a_b_c-") and len(odd) == len("flow-a_b_c-") + 8
    assert flow_counter_name("a_b_c") != odd
    # the same stream name in two conduits gets two maps
    x1: StreamKey = ("t1", "c1", "x")
    x2: StreamKey = ("t1", "c2", "x")
    table = spec(streams=(StreamMap(x1, (1, 2)), StreamMap(x2, (1, 2))), flows=())
    assert table.map_name(x1) != table.map_name(x2)
    assert table.map_name(x1).startswith("stream-x-")
    assert spec().map_name(B) == "stream-b"


def test_large_maps_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nftables, "CHUNK", 4)
    table = spec(streams=(StreamMap(A, tuple(range(1, 11))), StreamMap(B, (1, 1))))
    adds = [line for line in lines(render_table(table)) if line.startswith("add element")]
    assert adds == [
        "add element inet lb-test stream-stream-a { 0 : 1, 1 : 2, 2 : 3, 3 : 4 }",
        "add element inet lb-test stream-stream-a { 4 : 5, 5 : 6, 6 : 7, 7 : 8 }",
        "add element inet lb-test stream-stream-a { 8 : 9, 9 : 10 }",
        "add element inet lb-test stream-b { 0 : 1, 1 : 1 }",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "1bad"}, "table name"),
        ({"name": "bad name"}, "table name"),
        ({"seed": 1 << 32}, "seed"),
        ({"streams": (StreamMap(A, (1,)), StreamMap(B, (1, 2)))}, "M = 1"),
        ({"streams": (StreamMap(A, (1, -1)), StreamMap(B, (1, 2)))}, "32 bits"),
        ({"streams": (StreamMap(A, (1, 2)), StreamMap(A, (1, 2)))}, "two maps"),
        ({"streams": (StreamMap(A, (1, 2)),)}, "has no map"),
        ({"vips": ("nonsense",)}, "nonsense"),
    ],
)
def test_spec_is_checked(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**change)


def test_duplicate_flow_names_are_refused() -> None:
    twice = FlowSpec("f", A, (ip("203.0.113.1"),))
    with pytest.raises(ValueError, match="same name"):
        spec(flows=(twice, twice))


def test_structure_ignores_map_entries() -> None:
    one = spec()
    other = spec(streams=(StreamMap(A, (1, 2, 3, 4, 5)), StreamMap(B, (0, 0, 0))))
    assert one.structure() == other.structure()
    assert (
        one.structure()
        != spec(streams=(StreamMap(A, (1,) * 7), StreamMap(B, (0,) * 3))).structure()
    )
    assert one.structure() != spec(reject_no_target=True).structure()
    assert one.structure() != spec(flows=one.flows[:1]).structure()


def test_map_update_touches_only_the_changes() -> None:
    script = render_map_update("lb-test", "stream-b", [(7, 5003), (2, None), (9, 5001), (7, 5004)])
    assert lines(script) == [
        "delete element inet lb-test stream-b { 2, 7, 9 }",
        "add element inet lb-test stream-b { 2 : 0, 7 : 5004, 9 : 5001 }",
    ]
    assert render_map_update("lb-test", "stream-b", []) == ""
    with pytest.raises(ValueError):
        render_map_update("lb-test", "stream-b", [(-1, 5)])
    with pytest.raises(ValueError):
        render_map_update("lb-test", "stream-b", [(1, 1 << 32)])


def test_map_update_is_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nftables, "CHUNK", 2)
    got = lines(render_map_update("t", "m", [(i, 9) for i in range(3)]))
    assert got == [
        "delete element inet t m { 0, 1 }",
        "delete element inet t m { 2 }",
        "add element inet t m { 0 : 9, 1 : 9 }",
        "add element inet t m { 2 : 9 }",
    ]


def test_delete() -> None:
    assert render_delete("lb-test") == "table inet lb-test {}\ndelete table inet lb-test\n"


def test_a_range_of_every_port_is_no_condition() -> None:
    flows = (FlowSpec("all", A, (ip("203.0.113.1"),), protocols=(17,), dports=((1, 65535),)),)
    got = render_table(TableSpec(streams=(StreamMap(A, (1, 2, 3)),), flows=flows))
    rule = next(line for line in lines(got) if 'counter name "flow-all"' in line)
    assert "th dport {" not in rule and "th dport 1" not in rule
    assert rule.startswith("ip daddr 203.0.113.1 meta l4proto udp counter")
