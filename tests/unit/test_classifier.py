"""Tests for meridio.core.classifier: flow parsing, match order and per-packet lookups."""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
import timeit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meridio.api.nsp.v1 import Conduit, Flow, Stream, Trench, Vip
from meridio.core.classifier import (
    ByteMatch,
    Classifier,
    FlowError,
    FlowMatch,
    FlowSpec,
    parse_byte_match,
    parse_flow,
    parse_flows,
    parse_port_ranges,
)

TCP, UDP, SCTP, ICMP = 6, 17, 132, 1


def a(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def stream(name: str) -> Stream:
    return Stream(name=name, conduit=Conduit(name="c1", trench=Trench(name="t1")), max_targets=10)


def flow(
    name: str,
    vips: list[str],
    *,
    priority: int = 0,
    protocols: list[str] | None = None,
    dports: list[str] | None = None,
    sports: list[str] | None = None,
    sources: list[str] | None = None,
    stream_name: str | None = None,
    byte_matches: list[str] | None = None,
) -> Flow:
    return Flow(
        name=name,
        source_subnets=sources or [],
        destination_port_ranges=dports or [],
        source_port_ranges=sports or [],
        protocols=protocols or [],
        priority=priority,
        stream=stream(f"s-{name}" if stream_name is None else stream_name),
        vips=[Vip(name=f"v{i}", address=v) for i, v in enumerate(vips)],
        byte_matches=byte_matches or [],
    )


def name_of(result: FlowMatch | None) -> str | None:
    return None if result is None else result.flow


# --------------------------------------------------------------------------------------------
# Parsing


def test_port_ranges_are_merged_and_any_wins() -> None:
    assert parse_port_ranges(["80", "90-95", "81", "94-100", "200"]) == (
        (80, 81),
        (90, 100),
        (200, 200),
    )
    assert parse_port_ranges(["80", "any"]) == ()
    assert parse_port_ranges([]) == ()
    assert parse_port_ranges(["0-65535"]) == ()
    assert parse_port_ranges([" 7 - 9 "]) == ((7, 9),)
    for bad in ("x", "9-7", "70000", "1-2-3", ""):
        with pytest.raises(ValueError):
            parse_port_ranges([bad])


def test_parse_flow_normalises() -> None:
    spec = parse_flow(
        flow(
            "f",
            ["2001:db8::1/128", "10.0.0.2/32", "10.0.0.1"],
            priority=3,
            protocols=["UDP", "tcp", "tcp"],
            dports=["443", "80"],
            sources=["10.1.2.3/16", "10.1.0.0/24", "2001:db8:1::/48"],
        )
    )
    assert spec.stream == ("t1", "c1", "s-f")
    assert [str(v) for v in spec.vips] == ["10.0.0.1", "10.0.0.2", "2001:db8::1"]
    assert spec.protocols == (TCP, UDP)
    assert spec.dports == ((80, 80), (443, 443))
    assert spec.sports == ()
    assert [str(n) for n in spec.sources] == ["10.1.0.0/16", "2001:db8:1::/48"]
    assert spec.sources_of(6) == (ipaddress.ip_network("2001:db8:1::/48"),)


def test_sources_per_family() -> None:
    only4 = parse_flow(flow("f", ["10.0.0.1"], sources=["10.0.0.0/8"]))
    assert only4.sources_of(6) == ()  # no IPv6 source can match
    any4 = parse_flow(flow("f", ["10.0.0.1"], sources=["0.0.0.0/0", "2001:db8::/32"]))
    assert any4.sources_of(4) is None
    assert parse_flow(flow("f", ["10.0.0.1"])).sources_of(4) is None


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (flow("f", ["10.0.0.1"], byte_matches=["tcp[2:3] = 80"]), "length must be"),
        (flow("f", ["10.0.0.1"], byte_matches=["udp[6:4] = 1"]), "beyond the 8-byte udp"),
        (flow("f", ["10.0.0.1"], byte_matches=["tcp[0:1] = 256"]), "does not fit"),
        (flow("f", ["10.0.0.1"], byte_matches=["ip[0:1] = 4"]), "is not"),
        (flow("f", []), "no VIPs"),
        (flow("f", ["10.0.0.0/24"]), "single address"),
        (flow("f", ["10.0.0.1"], protocols=["icmp"]), "protocol"),
        (flow("f", ["10.0.0.1"], dports=["http"]), "port range"),
        (flow("f", ["10.0.0.1"], sources=["nonsense"]), "source subnet"),
        (flow("f", ["10.0.0.1"], stream_name=""), "no stream"),
    ],
)
def test_unusable_flows_are_reported(bad: Flow, why: str) -> None:
    with pytest.raises(FlowError, match=why):
        parse_flow(bad)
    classifier = Classifier.compile([bad, flow("ok", ["10.0.0.1"])])
    assert len(classifier.warnings) == 1
    assert why in classifier.warnings[0]
    assert [f.name for f in classifier.flows] == ["ok"]


def test_byte_match_parsing() -> None:
    assert parse_byte_match("tcp[2:2] = 4002") == ByteMatch(TCP, 2, 2, 0, 4002)
    assert parse_byte_match(" UDP[ 0 : 4 ] & 0xffff0000 = 0x13890000 ") == ByteMatch(
        UDP, 0, 4, 0xFFFF0000, 0x13890000
    )
    assert parse_byte_match("sctp[11:1]=0x7") == ByteMatch(SCTP, 11, 1, 0, 7)
    assert str(parse_byte_match("tcp[13:1] & 0x12 = 2")) == "tcp[13:1] & 0x12 = 2"
    spec = parse_flow(flow("f", ["10.0.0.1"], byte_matches=["tcp[2:2] = 1", "udp[0:2] = 2"]))
    assert [str(m) for m in spec.byte_matches] == ["tcp[2:2] = 1", "udp[0:2] = 2"]
    assert spec.matches_of(UDP) == (ByteMatch(UDP, 0, 2, 0, 2),)


def tcp_header(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 1024, 0, 0)


def ipv4(proto: int, l4: bytes, *, frag: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                       a("1.2.3.4"), a("10.0.0.1")) + l4  # fmt: skip


def ipv6(proto: int, l4: bytes) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, a("fd00::1"), a("2001:db8::1"))
    return header + l4


def test_byte_matches_read_the_l4_header_of_their_protocol() -> None:
    classifier = Classifier.compile(
        [
            flow(
                "syn-to-4002",
                ["10.0.0.1", "2001:db8::1"],
                priority=9,
                protocols=["tcp", "udp"],
                byte_matches=["tcp[2:2] = 4002", "tcp[13:1] & 0x12 = 0x2"],
            ),
            flow("rest", ["10.0.0.1", "2001:db8::1"], priority=1),
        ]
    )

    def who(family: int, proto: int, packet: bytes | None, sport: int, dport: int) -> str | None:
        src, dst = (
            (a("1.2.3.4"), a("10.0.0.1")) if family == 4 else (a("fd00::1"), a("2001:db8::1"))
        )
        return name_of(classifier.lookup(family, proto, src, dst, sport, dport, packet))

    syn, ack = tcp_header(1000, 4002, 0x02), tcp_header(1000, 4002, 0x10)
    assert who(4, TCP, ipv4(TCP, syn), 1000, 4002) == "syn-to-4002"
    assert who(4, TCP, ipv4(TCP, ack), 1000, 4002) == "rest"  # the flag does not match
    assert who(6, TCP, ipv6(TCP, syn), 1000, 4002) == "syn-to-4002"
    assert who(6, TCP, ipv6(TCP, tcp_header(1000, 4003, 0x02)), 1000, 4003) == "rest"
    # UDP is in the flow and no match is about UDP: it matches whatever its bytes
    udp = struct.pack("!HHHH", 1000, 9, 8, 0)
    assert who(4, UDP, ipv4(UDP, udp), 1000, 9) == "syn-to-4002"
    # a header cut before the bytes: no match; a later fragment has no header to read
    assert who(4, TCP, ipv4(TCP, syn[:3]), 1000, 4002) == "rest"
    assert who(4, TCP, ipv4(TCP, syn, frag=8), 1000, 4002) == "rest"
    # without the packet ("which target"), a header with only the ports
    assert who(4, TCP, None, 1000, 4002) == "rest"  # flags read as 0
    ports_only = Classifier.compile(
        [flow("p", ["10.0.0.1"], byte_matches=["tcp[2:2] = 4002"]), flow("z", ["10.0.0.1"])]
    )
    assert name_of(ports_only.lookup(4, TCP, a("1.2.3.4"), a("10.0.0.1"), 7, 4002)) == "p"
    assert name_of(ports_only.lookup(4, TCP, a("1.2.3.4"), a("10.0.0.1"), 7, 4003)) == "z"


def test_an_icmp_error_skips_byte_matches() -> None:
    """Classified by the flow it quotes, an ICMP error is no TCP packet: no byte match holds
    it back (nfqlb's rule too)."""
    classifier = Classifier.compile(
        [flow("f", ["10.0.0.1"], protocols=["tcp"], byte_matches=["tcp[2:2] = 9"])]
    )
    quote = ipv4(TCP, tcp_header(4002, 1000, 0x10))  # the quoted packet: a reply
    error = ipv4(1, struct.pack("!BBHI", 3, 4, 0, 1400) + quote)
    got = classifier.lookup(4, TCP, a("1.2.3.4"), a("10.0.0.1"), 1000, 4002, error)
    assert name_of(got) == "f"


def test_duplicate_names_keep_the_later_definition() -> None:
    specs, warnings = parse_flows([flow("f", ["10.0.0.1"]), flow("f", ["10.0.0.2"])])
    assert [str(v) for s in specs for v in s.vips] == ["10.0.0.2"]
    assert "twice" in warnings[0]


# --------------------------------------------------------------------------------------------
# Lookups


def test_priority_then_name_order() -> None:
    classifier = Classifier.compile(
        [
            flow("b", ["10.0.0.1"], priority=1),
            flow("a", ["10.0.0.1"], priority=1),
            flow("z", ["10.0.0.1"], priority=5, dports=["80"]),
        ]
    )
    assert [f.name for f in classifier.flows] == ["z", "a", "b"]
    assert name_of(classifier.lookup(4, TCP, a("1.1.1.1"), a("10.0.0.1"), 1, 80)) == "z"
    assert name_of(classifier.lookup(4, TCP, a("1.1.1.1"), a("10.0.0.1"), 1, 81)) == "a"


def test_each_field_restricts() -> None:
    classifier = Classifier.compile(
        [
            flow(
                "web",
                ["10.0.0.1", "2001:db8::1"],
                priority=2,
                protocols=["tcp"],
                dports=["80", "8000-8080"],
                sports=["1024-65535"],
                sources=["192.168.0.0/16", "2001:db8:f::/48"],
            ),
            flow("rest", ["10.0.0.1"], protocols=["udp", "sctp"]),
        ]
    )
    src, vip = a("192.168.3.4"), a("10.0.0.1")
    hit = classifier.lookup(4, TCP, src, vip, 40000, 8080)
    assert hit == FlowMatch("web", ("t1", "c1", "s-web"))
    assert classifier.lookup(4, TCP, src, vip, 40000, 8081) is None  # dport
    assert classifier.lookup(4, TCP, src, vip, 1000, 80) is None  # sport
    assert classifier.lookup(4, TCP, a("192.169.0.1"), vip, 40000, 80) is None  # source
    assert classifier.lookup(4, TCP, src, a("10.0.0.2"), 40000, 80) is None  # not a VIP
    assert name_of(classifier.lookup(4, UDP, src, vip, 40000, 80)) == "rest"
    assert name_of(classifier.lookup(4, SCTP, src, vip, 1, 1)) == "rest"
    assert classifier.lookup(4, ICMP, src, vip, 0, 0) is None
    v6 = classifier.lookup(6, TCP, a("2001:db8:f::9"), a("2001:db8::1"), 2000, 80)
    assert name_of(v6) == "web"
    assert classifier.lookup(6, TCP, a("2001:db8:e::9"), a("2001:db8::1"), 2000, 80) is None
    # the family must agree with the address
    assert classifier.lookup(6, TCP, src, vip, 40000, 80) is None


def test_any_protocol_flows_join_every_protocol_bucket_in_order() -> None:
    classifier = Classifier.compile(
        [
            flow("any-hi", ["10.0.0.1"], priority=3, dports=["53"]),
            flow("tcp-mid", ["10.0.0.1"], priority=2, protocols=["tcp"]),
            flow("any-lo", ["10.0.0.1"], priority=1),
        ]
    )
    src, vip = a("1.1.1.1"), a("10.0.0.1")
    assert name_of(classifier.lookup(4, TCP, src, vip, 1, 53)) == "any-hi"
    assert name_of(classifier.lookup(4, TCP, src, vip, 1, 80)) == "tcp-mid"
    assert name_of(classifier.lookup(4, UDP, src, vip, 1, 80)) == "any-lo"
    assert name_of(classifier.lookup(4, 47, src, vip, 0, 53)) == "any-hi"  # GRE: any protocol


def test_no_flows() -> None:
    classifier = Classifier([])
    assert classifier.lookup(4, TCP, a("1.1.1.1"), a("10.0.0.1"), 1, 1) is None


def test_specs_can_be_given_directly() -> None:
    vip = ipaddress.ip_address("10.0.0.1")
    classifier = Classifier([FlowSpec("f", ("t", "c", "s"), (vip,), dports=((80, 80),))])
    assert classifier.lookup(4, UDP, a("1.1.1.1"), vip.packed, 9, 80) == FlowMatch(
        "f", ("t", "c", "s")
    )


# --------------------------------------------------------------------------------------------
# Against a naive reference

PROTO_NUMBERS = {"tcp": TCP, "udp": UDP, "sctp": SCTP}
VIPS = ["10.0.0.1", "10.0.0.2/32", "2001:db8::1", "2001:db8::2/128"]
SOURCES = [
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.9.9.9/32",
    "0.0.0.0/0",
    "2001:db8:1::/48",
    "::/0",
    "192.168.0.0/16",
]
PACKET_SOURCES4 = ["10.1.2.3", "10.1.9.9", "10.9.9.9", "192.168.1.1", "172.16.0.1"]
PACKET_SOURCES6 = ["2001:db8:1::5", "2001:db8:2::5", "fe80::1"]
PACKET_DESTS4 = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
PACKET_DESTS6 = ["2001:db8::1", "2001:db8::2", "2001:db8::3"]
PORTS = [0, 1, 53, 80, 81, 443, 1024, 8080, 40000, 65535]


def port_text() -> st.SearchStrategy[str]:
    single = st.sampled_from(PORTS).map(str)
    pair = st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS)).map(
        lambda p: f"{min(p)}-{max(p)}"
    )
    return st.one_of(st.just("any"), single, pair)


flows_strategy = st.lists(
    st.builds(
        flow,
        name=st.sampled_from(["a", "b", "c", "d", "e"]),
        vips=st.lists(st.sampled_from(VIPS), max_size=3),
        priority=st.integers(0, 3),
        protocols=st.lists(st.sampled_from(["tcp", "udp", "sctp"]), max_size=3),
        dports=st.lists(port_text(), max_size=3),
        sports=st.lists(port_text(), max_size=2),
        sources=st.lists(st.sampled_from(SOURCES), max_size=3),
        byte_matches=st.one_of(st.just([]), st.just(["tcp[2:2] = 80"])),
    ),
    max_size=6,
)


@st.composite
def packets(draw: st.DrawFn) -> tuple[int, int, bytes, bytes, int, int]:
    family = draw(st.sampled_from([4, 6]))
    srcs, dsts = (
        (PACKET_SOURCES4, PACKET_DESTS4) if family == 4 else (PACKET_SOURCES6, PACKET_DESTS6)
    )
    return (
        family,
        draw(st.sampled_from([TCP, UDP, SCTP, ICMP])),
        a(draw(st.sampled_from(srcs))),
        a(draw(st.sampled_from(dsts))),
        draw(st.sampled_from(PORTS)),
        draw(st.sampled_from(PORTS)),
    )


def ports_ok(ranges: list[str], port: int) -> bool:
    if not ranges or "any" in ranges:
        return True
    for text in ranges:
        low, _, high = text.partition("-")
        if int(low) <= port <= int(high or low):
            return True
    return False


def naive_lookup(
    flows: list[Flow], family: int, proto: int, src: bytes, dst: bytes, sport: int, dport: int
) -> str | None:
    """The flow semantics written out directly, one flow at a time, from the messages."""
    latest = {f.name: f for f in flows}  # a later definition replaces an earlier one
    saddr = ipaddress.ip_address(src)
    daddr = ipaddress.ip_address(dst)
    assert saddr.version == daddr.version == family
    for f in sorted(latest.values(), key=lambda f: (-f.priority, f.name)):
        # the only byte match drawn, read from a header of ports alone: TCP to port 80
        if f.byte_matches and proto == TCP and dport != 80:
            continue
        if not any(ipaddress.ip_interface(v.address).ip == daddr for v in f.vips):
            continue
        if f.protocols and proto not in {PROTO_NUMBERS[p] for p in f.protocols}:
            continue
        if not ports_ok(f.destination_port_ranges, dport):
            continue
        if not ports_ok(f.source_port_ranges, sport):
            continue
        nets = [ipaddress.ip_network(s) for s in f.source_subnets]
        if nets and not any(n.version == family and saddr in n for n in nets):
            continue
        return str(f.name)
    return None


@settings(max_examples=300, deadline=None)
@given(flows=flows_strategy, probes=st.lists(packets(), min_size=1, max_size=20))
def test_lookup_agrees_with_naive_reference(
    flows: list[Flow], probes: list[tuple[int, int, bytes, bytes, int, int]]
) -> None:
    classifier = Classifier.compile(flows)
    for probe in probes:
        got = classifier.lookup(*probe)
        want = naive_lookup(flows, *probe)
        assert name_of(got) == want, (probe, [f.to_dict() for f in flows])
        if got is not None:
            assert got.stream == ("t1", "c1", f"s-{want}")


# --------------------------------------------------------------------------------------------
# Cost


def test_lookup_cost_report() -> None:
    """Prints µs per lookup (run with -s); asserts nothing about speed."""
    flows = [
        flow(
            f"f{i}", ["10.0.0.1", "10.0.0.2"], priority=i, protocols=["tcp"], dports=[str(1000 + i)]
        )
        for i in range(20)
    ]
    flows.append(flow("catch", ["10.0.0.1"], protocols=["tcp", "udp"], sources=["192.168.0.0/16"]))
    classifier = Classifier.compile(flows)
    src, vip = socket.inet_aton("192.168.1.1"), socket.inet_aton("10.0.0.1")
    cases = {
        "first candidate": (4, TCP, src, vip, 40000, 1019),
        "21st candidate (subnet)": (4, TCP, src, vip, 40000, 80),
        "miss (no VIP)": (4, TCP, src, socket.inet_aton("10.0.0.9"), 40000, 80),
    }
    n = 20000
    for label, args in cases.items():
        timer = timeit.Timer(functools.partial(classifier.lookup, *args))
        best = min(timer.repeat(number=n, repeat=5))
        print(f"classifier lookup, {label}: {best / n * 1e6:.2f} µs")
