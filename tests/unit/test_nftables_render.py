"""Tests for the pure part of meridio.lb.nftables: the scripts it renders, the counter totals."""

from __future__ import annotations

import ipaddress

import pytest

from meridio.core.classifier import FlowSpec, StreamKey, parse_byte_match
from meridio.lb import nftables
from meridio.lb.nftables import (
    CounterTotals,
    FastPath,
    FastTarget,
    PortNat,
    Readings,
    StreamMap,
    TableSpec,
    needs_table,
    render_delete,
    render_map_update,
    render_table,
    render_update,
)

A: StreamKey = ("t1", "c1", "stream-a")
B: StreamKey = ("t1", "c1", "b")
ip = ipaddress.ip_address
net = ipaddress.ip_network
JHASH4 = "jhash @nh,96,64 . th sport . th dport"  # ip saddr . ip daddr in one load
JHASH6 = "jhash @nh,64,256 . th sport . th dport"
ICMP_JUMP = "meta l4proto { icmp, ipv6-icmp } jump icmp-errors"


def fast_check4(*protocols: int) -> str:
    values = ", ".join(str(ttl << 8 | p) for p in protocols for ttl in range(2, 256))
    return f"@nh,48,32 & 0x3fffffff {{ {values} }}"


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


FAST = FastPath(
    ("ext0", "ext1"),
    targets4=((5001, FastTarget("198.18.1.11", "conduit-1")),),
    targets6=(
        (5001, FastTarget("fd00:1::11", "conduit-1")),
        (5002, FastTarget("fd00:2::12", "conduit-2")),
    ),
    mtu=1450,
)
NAT = PortNat(6, 80, 8080, (ip("203.0.113.1"), ip("2001:db8::1")))


def lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines()]


def chain(got: list[str], name: str) -> list[str]:
    """The rules of a chain in a rendered table (its lines up to the closing brace)."""
    start = got.index(f"chain {name} {{")
    return got[start + 1 : got.index("}", start)]


def test_tables_are_replaced_atomically() -> None:
    got = lines(render_table(spec(fast=FAST)))
    assert got[:5] == [
        "table inet lb-test {}",
        "delete table inet lb-test",
        "table netdev lb-test-fast {}",
        "delete table netdev lb-test-fast",
        "table inet lb-test {",
    ]
    # the table blocks are closed before the elements are added
    assert got.index("table netdev lb-test-fast {") < got.index(
        "add element inet lb-test stream-stream-a { 0 : goto r-5001, 1 : goto r-5002,"
        " 2 : goto no-target, 3 : goto r-5001, 4 : goto r-5002 }"
    )
    assert (
        "add element netdev lb-test-fast stream-stream-a-4 { 0 : goto t4-5001, 1 : goto t4-5002,"
        " 2 : accept, 3 : goto t4-5001, 4 : goto t4-5002 }"
    ) in got
    assert any(line.startswith("add element netdev lb-test-fast stream-b-6 {") for line in got)


def test_sets_counters_and_maps() -> None:
    got = lines(render_table(spec()))
    for name in ("no-flow", "no-target", "hit-5001", "hit-5002", "hit-7001"):
        assert f"counter {name} {{ }}" in got
    assert not [line for line in got if line.startswith("counter flow-")]  # no metric uses them
    # the flows' VIPs and the extra ones, collapsed, as a set of addresses
    assert "elements = { 203.0.113.1, 203.0.113.2, 203.0.113.3 }" in got
    assert "elements = { 2001:db8::1, 2001:db8::3 }" in got
    assert "flags interval" not in got
    assert "map stream-stream-a {" in got
    assert "typeof numgen random mod 5 : verdict" in got
    assert "typeof numgen random mod 3 : verdict" in got
    assert (
        "add element inet lb-test stream-b { 0 : goto r-7001, 1 : goto r-7001, 2 : goto r-7001 }"
        in got
    )
    # a network among the VIPs: an interval set
    got = lines(render_table(spec(vips=("203.0.113.64/26",))))
    assert "flags interval" in got
    assert "elements = { 203.0.113.1/32, 203.0.113.2/32, 203.0.113.64/26 }" in got


def test_one_hooked_chain_and_the_target_chains() -> None:
    got = lines(render_table(spec()))
    hooked = [line for line in got if line.startswith("type filter hook")]
    assert hooked == ["type filter hook prerouting priority raw; policy accept;"]
    assert chain(got, "defrag") == ["meta l4proto tcp tproxy to :1"]  # not hooked
    assert chain(got, "r-5001") == ['meta mark set 5001 counter name "hit-5001" accept']
    assert chain(got, "no-target") == ['counter name "no-target" drop']
    # every flow lists its protocols: ICMP is looked at after them
    assert chain(got, "prerouting")[-3] == ICMP_JUMP
    # without tproxy: conntrack's defragmentation, and VIP traffic untracked
    got = lines(render_table(spec(defrag_by_conntrack=True)))
    assert chain(got, "defrag") == ["ct state untracked accept"]
    assert chain(got, "prerouting")[1:3] == ["ip daddr @vips4 notrack", "ip6 daddr @vips6 notrack"]
    # no reassembly: no defrag chain at all
    assert "chain defrag {" not in lines(render_table(spec(defrag=False)))


def test_flow_rules_in_match_order() -> None:
    got = lines(render_table(spec()))
    assert chain(got, "prerouting")[1:] == [
        "ip daddr 203.0.113.1 meta l4proto tcp th dport { 80, 8000-8080 }"
        f" ip saddr 192.168.0.0/16 {JHASH4} mod 5 seed 0x00001234 vmap @stream-stream-a",
        "ip6 daddr 2001:db8::1 meta l4proto tcp th dport { 80, 8000-8080 }"
        f" ip6 saddr 2001:db8:f::/48 {JHASH6} mod 5 seed 0x00001234 vmap @stream-stream-a",
        # priority 1: "dns" before "rest" by name; "any" ports and sources are left out
        f"ip daddr 203.0.113.2 meta l4proto udp th sport 53 {JHASH4} mod 3 seed 0x00001234"
        " vmap @stream-b",
        f"ip daddr 203.0.113.1 meta l4proto {{ tcp, udp, sctp }} {JHASH4} mod 3 seed 0x00001234"
        " vmap @stream-b",
        ICMP_JUMP,
        'ip daddr @vips4 counter name "no-flow" drop',
        'ip6 daddr @vips6 counter name "no-flow" drop',
    ]


def test_icmp_errors_are_hashed_by_their_quote() -> None:
    got = lines(render_table(spec()))
    rules = chain(got, "icmp-errors")
    assert rules[0] == (
        "ip daddr 203.0.113.1 icmp type { destination-unreachable, time-exceeded,"
        " parameter-problem } @th,64,8 0x45 @th,136,8 6 @th,224,16 { 80, 8000-8080 }"
        " @th,192,32 0xc0a80000-0xc0a8ffff"
        " jhash @th,192,32 . @th,160,32 . @th,240,16 . @th,224,16 mod 5 seed 0x00001234"
        " vmap @stream-stream-a"
    )
    assert rules[1] == (
        "ip6 daddr 2001:db8::1 icmpv6 type { destination-unreachable, packet-too-big,"
        " time-exceeded, parameter-problem } @th,64,4 6 @th,112,8 6 @th,384,16 { 80, 8000-8080 }"
        " @th,256,128 0x20010db8000f00000000000000000000-0x20010db8000fffffffffffffffffffff"
        " jhash @th,256,128 . @th,128,128 . @th,400,16 . @th,384,16 mod 5 seed 0x00001234"
        " vmap @stream-stream-a"
    )
    # dns: its source port 53 is the quoted reply's destination port
    assert "@th,136,8 17 @th,240,16 53 jhash" in rules[2]
    assert "@th,136,8 { 6, 17, 132 } jhash" in rules[3]


def test_byte_matches_group_the_protocols() -> None:
    matches = tuple(parse_byte_match(t) for t in ("tcp[2:2] = 4002", "udp[4:2] & 0xff00 = 256"))
    explicit = FlowSpec("x", A, (ip("203.0.113.1"),), protocols=(6, 17, 132), byte_matches=matches)
    rules = chain(lines(render_table(spec(flows=(explicit,)))), "prerouting")[1:-3]
    assert [r.split(" jhash")[0] for r in rules] == [
        "ip daddr 203.0.113.1 meta l4proto tcp @th,16,16 4002",
        "ip daddr 203.0.113.1 meta l4proto udp @th,32,16 & 0xff00 == 0x100",
        "ip daddr 203.0.113.1 meta l4proto sctp",  # no match is about SCTP
    ]
    any_protocol = FlowSpec("y", A, (ip("203.0.113.1"),), byte_matches=matches[:1])
    rules = chain(lines(render_table(spec(flows=(any_protocol,)))), "prerouting")[2:-2]
    assert [r.split(" jhash")[0] for r in rules] == [
        "ip daddr 203.0.113.1 meta l4proto tcp @th,16,16 4002",
        "ip daddr 203.0.113.1 meta l4proto != tcp",
    ]
    # a byte match of a protocol the flow does not carry is no rule at all
    udp_only = FlowSpec("z", A, (ip("203.0.113.1"),), protocols=(17,), byte_matches=matches[:1])
    rules = chain(lines(render_table(spec(flows=(udp_only,)))), "prerouting")[1:-3]
    assert [r.split(" jhash")[0] for r in rules] == ["ip daddr 203.0.113.1 meta l4proto udp"]


def test_source_families() -> None:
    flows = (
        # IPv4 sources only: no IPv6 rule, since no IPv6 source can match
        FlowSpec(
            "v4src", A, (ip("203.0.113.1"), ip("2001:db8::1")), sources=(net("198.18.0.0/15"),)
        ),
        # a /0 means any source of that family: no saddr match at all
        FlowSpec("any", B, (ip("203.0.113.1"),), sources=(net("0.0.0.0/0"),)),
    )
    rules = [line for line in chain(lines(render_table(spec(flows=flows))), "prerouting")]
    hashed = [r for r in rules if "jhash" in r]
    assert len(hashed) == 2
    assert hashed[0].startswith(f"ip daddr 203.0.113.1 {JHASH4}")
    assert hashed[1].startswith(f"ip daddr 203.0.113.1 ip saddr 198.18.0.0/15 {JHASH4}")


def test_no_target_drop_or_reject() -> None:
    got = lines(render_table(spec(reject_no_target=True)))
    assert chain(got, "no-target") == [
        'meta l4proto tcp counter name "no-target" reject with tcp reset',
        'counter name "no-target" reject with icmpx port-unreachable',
    ]


def test_first_packet_keeps_the_connections_mark() -> None:
    got = lines(render_table(spec(mode="first-packet", untrack_syn=True)))
    rules = chain(got, "prerouting")
    assert rules[0] == "type filter hook prerouting priority mangle; policy accept;"
    web = "ip daddr 203.0.113.1 meta l4proto tcp th dport { 80, 8000-8080 } ip saddr 192.168.0.0/16"
    assert rules[1:4] == [
        # a tracked connection's packets to a VIP, ICMP errors related to it too, go where it
        # went (never its replies, whichever direction conntrack saw first)
        "ip daddr @vips4 ct mark vmap @targets",
        "ip6 daddr @vips6 ct mark vmap @targets",
        f"{web} {JHASH4} mod 5 seed 0x00001234 vmap @stream-stream-a",
    ]
    assert chain(got, "r-5001") == [
        'meta mark set 5001 ct mark set 5001 counter name "hit-5001" accept'
    ]
    assert "elements = { 5001 : goto r-5001, 5002 : goto r-5002, 7001 : goto r-7001 }" in got
    assert chain(got, "replies") == [
        "type filter hook prerouting priority raw; policy accept;",
        "ip daddr @vips4 tcp flags & (fin | syn | rst | ack) == syn notrack",
        "ip6 daddr @vips6 tcp flags & (fin | syn | rst | ack) == syn notrack",
    ]
    assert "chain defrag {" not in got  # conntrack reassembles


def test_port_nat_after_the_target_and_on_replies() -> None:
    got = lines(render_table(spec(port_nats=(NAT,))))
    assert chain(got, "r-5001") == ['meta mark set 5001 counter name "hit-5001" goto nat']
    assert chain(got, "nat") == [
        "ip daddr . meta l4proto . th dport vmap @natmap4",
        "ip6 daddr . meta l4proto . th dport vmap @natmap6",
        "accept",
    ]
    assert "elements = { 203.0.113.1 . tcp . 80 : goto nat-tcp-80-8080 }" in got
    assert "elements = { 2001:db8::1 . tcp . 8080 : goto rnat-tcp-8080-80 }" in got
    assert chain(got, "nat-tcp-80-8080") == ["tcp dport set 8080 accept"]
    assert chain(got, "rnat-tcp-8080-80") == ["tcp sport set 80 accept"]
    assert chain(got, "prerouting")[-2:] == [
        "ip saddr . meta l4proto . th sport vmap @rnatmap4",
        "ip6 saddr . meta l4proto . th sport vmap @rnatmap6",
    ]
    # first-packet: the replies' rewrite before conntrack, in a chain of its own
    got = lines(render_table(spec(port_nats=(NAT,), mode="first-packet")))
    assert chain(got, "replies")[1:] == [
        "ip saddr . meta l4proto . th sport vmap @rnatmap4",
        "ip6 saddr . meta l4proto . th sport vmap @rnatmap6",
    ]
    # nfqueue: both rewrites after the readers
    got = lines(render_table(spec(port_nats=(NAT,), mode="nfqueue")))
    assert chain(got, "nat")[0] == (
        "type filter hook prerouting priority mangle + 10; policy accept;"
    )
    assert len(chain(got, "nat")) == 5


def test_fast_path_table() -> None:
    got = lines(render_table(spec(fast=FAST, port_nats=(NAT,))))
    fast = got[got.index("table netdev lb-test-fast {") :]
    ingress = chain(fast, "ingress")
    assert ingress[0] == (
        'type filter hook ingress devices = { "ext0", "ext1" } priority 0; policy accept;'
    )
    # no fragment, TTL above 1, TCP: one lookup; longer than 1450: routed
    assert ingress[1] == (
        f"ip daddr 203.0.113.1 {fast_check4(6)} meta length <= 1450"
        " th dport { 80, 8000-8080 } ip saddr 192.168.0.0/16"
        f" {JHASH4} mod 5 seed 0x00001234 vmap @stream-stream-a-4"
    )
    assert ingress[2] == (
        "ip6 daddr 2001:db8::1 @nh,48,16 0x0602-0x06ff meta length <= 1450"
        " th dport { 80, 8000-8080 } ip6 saddr 2001:db8:f::/48"
        f" {JHASH6} mod 5 seed 0x00001234 vmap @stream-stream-a-6"
    )
    assert chain(fast, "t4-5001") == [
        "jump nat",
        'counter name "hit-5001" fwd ip to 198.18.1.11 device "conduit-1"',
    ]
    assert chain(fast, "t6-5001") == [
        "jump nat",
        'counter name "hit-5001" fwd ip6 to fd00:1::11 device "conduit-1"',
    ]
    assert chain(fast, "t4-5002") == []  # IPv6 only
    assert chain(fast, "t4-7001") == chain(fast, "t6-7001") == []  # not on a link of ours
    assert chain(fast, "nat-tcp-80-8080") == ["tcp dport set 8080"]  # back to the fwd
    assert "chain rnat-tcp-8080-80 {" not in fast  # replies do not come in this way


def test_fast_path_leaves_icmp_and_other_protocols_to_routing() -> None:
    any_protocol = FlowSpec("any", A, (ip("203.0.113.1"),))
    same_mtu = FastPath(FAST.devices, FAST.targets4, FAST.targets6)  # no length check
    got = lines(render_table(spec(flows=(any_protocol,), fast=same_mtu)))
    fast = got[got.index("table netdev lb-test-fast {") :]
    assert f"{fast_check4(6, 17, 132)} {JHASH4}" in chain(fast, "ingress")[1]  # no length check
    sctp_bytes = FlowSpec(
        "b", A, (ip("203.0.113.1"),), byte_matches=(parse_byte_match("sctp[0:1] = 1"),)
    )
    got = lines(render_table(spec(flows=(sctp_bytes,), fast=same_mtu)))
    fast = got[got.index("table netdev lb-test-fast {") :]
    assert [r.split(" jhash")[0] for r in chain(fast, "ingress")[1:]] == [
        f"ip daddr 203.0.113.1 {fast_check4(132)} @th,0,8 1",
        f"ip daddr 203.0.113.1 {fast_check4(6, 17)}",
    ]


def test_nfqueue_table() -> None:
    assert not needs_table(spec(mode="nfqueue", defrag=False))
    got = lines(render_table(spec(mode="nfqueue")))
    assert chain(got, "defrag") == ["meta l4proto tcp tproxy to :1"]
    assert "chain prerouting {" not in got and "map stream-b {" not in got
    got = lines(render_table(spec(mode="nfqueue", native_queue=(2, 4, True), defrag=False)))
    assert chain(got, "enqueue") == [
        "type filter hook prerouting priority mangle; policy accept;",
        "ip daddr @vips4 queue num 2-5 bypass",
        "ip6 daddr @vips6 queue num 2-5 bypass",
    ]


def test_names_are_sanitised_and_unique() -> None:
    # the same stream name in two conduits gets two maps
    x1: StreamKey = ("t1", "c1", "x")
    x2: StreamKey = ("t1", "c2", "x")
    table = spec(streams=(StreamMap(x1, (1, 2)), StreamMap(x2, (1, 2))), flows=())
    assert table.map_name(x1) != table.map_name(x2)
    assert table.map_name(x1).startswith("stream-x-")
    assert spec().map_name(B) == "stream-b"
    odd = spec(streams=(StreamMap(("t", "c", "a.b c"), (1, 2)),), flows=())
    assert odd.map_name(("t", "c", "a.b c")).startswith("stream-a_b_c-")


def test_large_maps_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nftables, "CHUNK", 4)
    table = spec(streams=(StreamMap(A, (1,) * 10), StreamMap(B, (1, 1))))
    adds = [line for line in lines(render_table(table)) if line.startswith("add element")]
    assert [a.count(":") for a in adds] == [4, 4, 2, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "1bad"}, "table name"),
        ({"name": "bad name"}, "table name"),
        ({"mode": "bridge"}, "mode"),
        ({"seed": 1 << 32}, "seed"),
        ({"streams": (StreamMap(A, (1,)), StreamMap(B, (1, 2)))}, "M = 1"),
        ({"streams": (StreamMap(A, (1, -1)), StreamMap(B, (1, 2)))}, "32 bits"),
        ({"streams": (StreamMap(A, (1, 2)), StreamMap(A, (1, 2)))}, "two maps"),
        ({"streams": (StreamMap(A, (1, 2)),)}, "has no map"),
        ({"vips": ("nonsense",)}, "nonsense"),
        ({"port_nats": (NAT, NAT)}, "NATed twice"),
        ({"port_nats": (NAT, PortNat(6, 81, 8080, (ip("203.0.113.1"),)))}, "target port"),
        ({"port_nats": (PortNat(1, 80, 81, (ip("203.0.113.1"),)),)}, "protocol"),
        ({"port_nats": (PortNat(6, 0, 81, (ip("203.0.113.1"),)),)}, "out of range"),
        ({"fast": FAST, "mode": "first-packet"}, "kernel mode"),
        ({"fast": FastPath(("bad name",))}, "devices"),
    ],
)
def test_spec_is_checked(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**change)


def test_duplicate_flow_names_are_refused() -> None:
    twice = FlowSpec("f", A, (ip("203.0.113.1"),))
    with pytest.raises(ValueError, match="same name"):
        spec(flows=(twice, twice))


def test_structure_ignores_entries_marks_and_fast_targets() -> None:
    one = spec(fast=FAST)
    other = spec(
        streams=(StreamMap(A, (1, 2, 3, 4, 5)), StreamMap(B, (0, 0, 0))),
        fast=FastPath(FAST.devices, mtu=FAST.mtu),
    )
    assert one.structure() == other.structure()
    assert (
        one.structure()
        != spec(streams=(StreamMap(A, (1,) * 7), StreamMap(B, (0,) * 3))).structure()
    )
    for change in (
        {"reject_no_target": True},
        {"port_nats": (NAT,)},
        {"fast": FastPath(("ext0",))},
        {"fast": None},
    ):
        assert one.structure() != spec(**{"fast": FAST, **change}).structure()  # type: ignore[arg-type]
    assert one.structure() != spec(flows=one.flows[:1], fast=FAST).structure()


def test_map_update_touches_only_the_changes() -> None:
    script = render_map_update("lb-test", "stream-b", [(7, 5003), (2, None), (9, 5001), (7, 5004)])
    assert (
        lines(script)
        == [
            "delete element inet lb-test stream-b { 2, 7, 9 }",
            "add element inet lb-test stream-b { 2 : goto no-target, 7 : goto r-5004,"
            " 9 : goto r-5001 }",
            "",
        ][:2]
    )
    fast = lines(render_map_update("f", "m", [(1, 0), (2, 5)], family="netdev"))
    assert fast == [
        "delete element netdev f m-4 { 1, 2 }",
        "add element netdev f m-4 { 1 : accept, 2 : goto t4-5 }",
        "delete element netdev f m-6 { 1, 2 }",
        "add element netdev f m-6 { 1 : accept, 2 : goto t6-5 }",
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
        "add element inet t m { 0 : goto r-9, 1 : goto r-9 }",
        "add element inet t m { 2 : goto r-9 }",
    ]


def test_update_adds_targets_before_and_removes_them_after_the_entries() -> None:
    old = spec(fast=FAST, mode="kernel")
    new = spec(
        streams=(StreamMap(A, (5001, 5003, 0, 5001, 5003)), StreamMap(B, (7001, 7001, 7001))),
        fast=FastPath(
            FAST.devices,
            targets4=((5001, FastTarget("198.18.1.11", "conduit-9")),),
            targets6=((5003, FastTarget("fd00:3::13", "conduit-3")),),
            mtu=FAST.mtu,
        ),
    )
    got = lines(render_update(old, new))
    assert got == [
        "add counter inet lb-test hit-5003",
        "add chain inet lb-test r-5003",
        'add rule inet lb-test r-5003 meta mark set 5003 counter name "hit-5003" accept',
        "flush chain netdev lb-test-fast t4-5001",  # moved to another link
        'add rule netdev lb-test-fast t4-5001 counter name "hit-5001" fwd ip to 198.18.1.11'
        ' device "conduit-9"',
        "flush chain netdev lb-test-fast t6-5001",  # lost IPv6: the routed path
        "add counter netdev lb-test-fast hit-5003",
        "add chain netdev lb-test-fast t4-5003",
        "add chain netdev lb-test-fast t6-5003",
        'add rule netdev lb-test-fast t6-5003 counter name "hit-5003" fwd ip6 to fd00:3::13'
        ' device "conduit-3"',
        "delete element inet lb-test stream-stream-a { 1, 4 }",
        "add element inet lb-test stream-stream-a { 1 : goto r-5003, 4 : goto r-5003 }",
        "delete element netdev lb-test-fast stream-stream-a-4 { 1, 4 }",
        "add element netdev lb-test-fast stream-stream-a-4 { 1 : goto t4-5003, 4 : goto t4-5003 }",
        "delete element netdev lb-test-fast stream-stream-a-6 { 1, 4 }",
        "add element netdev lb-test-fast stream-stream-a-6 { 1 : goto t6-5003, 4 : goto t6-5003 }",
        "delete chain inet lb-test r-5002",
        "delete counter inet lb-test hit-5002",
        "delete chain netdev lb-test-fast t4-5002",
        "delete chain netdev lb-test-fast t6-5002",
        "delete counter netdev lb-test-fast hit-5002",
    ]
    assert render_update(new, new) == ""
    with pytest.raises(ValueError, match="structure"):
        render_update(old, spec())


def test_update_in_first_packet_mode_keeps_the_targets_map() -> None:
    old = spec(mode="first-packet")
    new = spec(mode="first-packet", marks=(5001, 5002, 7001, 5009))
    assert lines(render_update(old, new)) == [
        "add counter inet lb-test hit-5009",
        "add chain inet lb-test r-5009",
        "add rule inet lb-test r-5009 meta mark set 5009 ct mark set 5009 counter name"
        ' "hit-5009" accept',
        "add element inet lb-test targets { 5009 : goto r-5009 }",
    ]
    assert lines(render_update(new, old))[0] == "delete element inet lb-test targets { 5009 }"


def test_delete() -> None:
    assert render_delete("lb-test") == (
        "table inet lb-test {}\ndelete table inet lb-test\n"
        "table netdev lb-test-fast {}\ndelete table netdev lb-test-fast\n"
    )


def test_a_range_of_every_port_is_no_condition() -> None:
    flows = (FlowSpec("all", A, (ip("203.0.113.1"),), protocols=(17,), dports=((1, 65535),)),)
    got = lines(render_table(TableSpec(streams=(StreamMap(A, (1, 2, 3)),), flows=flows)))
    rule = chain(got, "prerouting")[1]
    assert rule.startswith(f"ip daddr 203.0.113.1 meta l4proto udp {JHASH4}")


def test_counter_totals_survive_resets() -> None:
    totals = CounterTotals()
    totals.update(Readings({5001: (10, 1000)}, {5001: (5, 500)}, (1, 60), (2, 80)).flat())
    assert totals.total("routed/5001") == (10, 1000)
    totals.update({"routed/5001": (12, 1200), "fast/5001": (7, 700)})
    assert totals.total("routed/5001") == (12, 1200)
    assert totals.total("no-flow") == (1, 60)  # gone: its count stays
    totals.update({"routed/5001": (3, 300), "fast/5001": (8, 800)})  # reloaded: started again
    assert totals.total("routed/5001") == (15, 1500)
    assert totals.total("fast/5001") == (8, 800)
    totals.update({"routed/5001": (4, 400), "no-flow": (1, 10)})
    assert totals.total("fast/5001") == (8, 800)
    assert totals.total("no-flow") == (2, 70)
    assert "fast/5001" in totals.names()
