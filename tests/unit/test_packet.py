"""meridio.core.packet (parser) and tests.packetbuild (test packet builder)."""

from __future__ import annotations

import dataclasses
import struct
from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meridio.core.jhash import flow_key
from meridio.core.packet import (
    REASONS,
    FlowTuple,
    Fragment,
    MalformedPacket,
    l4_header,
    parse,
)
from tests import packetbuild as pb

CLIENT4, VIP4, ROUTER4 = "198.18.0.1", "203.0.113.5", "198.19.255.1"
CLIENT6, VIP6, ROUTER6 = "2001:db8:c::1", "fd00:5::5", "2001:db8:ff::1"


def _p(address: str) -> bytes:
    return ip_address(address).packed


def _reason(packet: bytes) -> str:
    with pytest.raises(MalformedPacket) as info:
        parse(packet)
    assert info.value.reason in REASONS
    assert str(info.value) == info.value.reason
    return info.value.reason


# ---------------------------------------------------------------------------------------------
# plain packets


def test_ipv4_tcp() -> None:
    flow = parse(pb.tcp_packet(CLIENT4, VIP4, 12345, 443))
    assert flow == FlowTuple(4, 6, _p(CLIENT4), _p(VIP4), 12345, 443)
    assert not flow.from_icmp_error
    assert flow.fragment is Fragment.NONE
    assert flow.nft_key() == flow_key(_p(CLIENT4), _p(VIP4), 12345, 443)
    assert flow.nft_key(with_l4proto=True)[:4] == b"\x06\0\0\0"
    assert str(flow) == "tcp 198.18.0.1:12345 -> 203.0.113.5:443"


def test_ipv4_with_options() -> None:
    options = b"\x94\x04\x00\x00" + b"\x01" * 7  # router alert + NOPs, padded to 12 bytes
    packet = pb.ipv4(CLIENT4, VIP4, 17, pb.udp(CLIENT4, VIP4, 5000, 53), options=options)
    assert packet[0] == 0x48  # IHL 8: 20 + 12 bytes
    assert parse(packet) == FlowTuple(4, 17, _p(CLIENT4), _p(VIP4), 5000, 53)


def test_ipv6_udp() -> None:
    flow = parse(pb.udp_packet(CLIENT6, VIP6, 5353, 53, b"q"))
    assert flow == FlowTuple(6, 17, _p(CLIENT6), _p(VIP6), 5353, 53)
    assert str(flow) == "udp [2001:db8:c::1]:5353 -> [fd00:5::5]:53"


def test_ipv6_destination_options_before_udp() -> None:
    packet = pb.ipv6(
        CLIENT6, VIP6, 17, pb.udp(CLIENT6, VIP6, 1111, 2222), ext=[pb.destination_options(16)]
    )
    assert packet[6] == 60
    assert parse(packet) == FlowTuple(6, 17, _p(CLIENT6), _p(VIP6), 1111, 2222)


def test_ipv6_extension_header_chain() -> None:
    routing = pb.ext_header(43, bytes([4, 0]) + bytes(4))  # type 4 (SRH), 0 segments left
    ext = [pb.hop_by_hop(), routing, pb.destination_options(24), pb.ah_header()]
    packet = pb.ipv6(CLIENT6, VIP6, 6, pb.tcp(CLIENT6, VIP6, 40000, 80), ext=ext)
    assert parse(packet) == FlowTuple(6, 6, _p(CLIENT6), _p(VIP6), 40000, 80)


@pytest.mark.parametrize("stop", [50, 59])
def test_ipv6_walk_stops_at_esp_and_no_next_header(stop: int) -> None:
    packet = pb.ipv6(CLIENT6, VIP6, stop, b"\x00\x00\x01\x00" + bytes(12), ext=[pb.hop_by_hop()])
    assert parse(packet) == FlowTuple(6, stop, _p(CLIENT6), _p(VIP6), 0, 0)


@pytest.mark.parametrize("proto", [6, 17, 33, 132, 136])
def test_port_protocols(proto: int) -> None:
    l4 = struct.pack("!HH", 3868, 2905) + bytes(8)
    assert parse(pb.ip_packet(CLIENT4, VIP4, proto, l4)).sport == 3868
    assert parse(pb.ip_packet(CLIENT6, VIP6, proto, l4)).dport == 2905


def test_sctp() -> None:
    packet = pb.sctp_packet(CLIENT4, VIP4, 36412, 38412, vtag=7)
    assert parse(packet) == FlowTuple(4, 132, _p(CLIENT4), _p(VIP4), 36412, 38412)
    six = pb.sctp_packet(CLIENT6, VIP6, 36412, 38412)
    assert parse(six) == FlowTuple(6, 132, _p(CLIENT6), _p(VIP6), 36412, 38412)


@pytest.mark.parametrize("proto", [47, 50, 4, 255])
def test_other_protocols_have_no_ports(proto: int) -> None:
    assert parse(pb.ip_packet(CLIENT4, VIP4, proto, b"\x12\x34\x56\x78")).sport == 0
    flow = parse(pb.ip_packet(CLIENT6, VIP6, proto, b"\x12\x34\x56\x78"))
    assert (flow.proto, flow.sport, flow.dport) == (proto, 0, 0)


@pytest.mark.parametrize(
    ("packet", "proto"),
    [
        (pb.icmp_echo(CLIENT4, VIP4, 77, 1), 1),
        (pb.icmp_echo(VIP4, CLIENT4, 77, 1, reply=True), 1),
        (pb.icmpv6_echo(CLIENT6, VIP6, 77, 1), 58),
        (pb.ip_packet(CLIENT6, VIP6, 58, bytes([135, 0, 0, 0]) + bytes(20)), 58),  # NS
        (pb.ip_packet(CLIENT4, VIP4, 1, bytes([5, 1, 0, 0]) + bytes(32)), 1),  # redirect
    ],
)
def test_non_error_icmp_has_ports_zero(packet: bytes, proto: int) -> None:
    flow = parse(packet)
    assert (flow.proto, flow.sport, flow.dport, flow.from_icmp_error) == (proto, 0, 0, False)
    assert flow.src == packet[12:16] or flow.src == packet[8:24]


# ---------------------------------------------------------------------------------------------
# fragments


def test_ipv4_fragments() -> None:
    whole = pb.udp_packet(CLIENT4, VIP4, 4444, 5555, b"x" * 100)
    first, *later = pb.fragment_ipv4(whole, 48)
    assert len(later) == 2
    assert parse(first) == FlowTuple(
        4, 17, _p(CLIENT4), _p(VIP4), 4444, 5555, False, Fragment.FIRST
    )
    for packet in later:
        assert parse(packet) == FlowTuple(4, 17, _p(CLIENT4), _p(VIP4), 0, 0, False, Fragment.LATER)
    # a later fragment whose data happens to look like ports still has none
    odd = pb.ipv4(CLIENT4, VIP4, 6, b"\x01\x02\x03\x04", frag_offset=8)
    assert parse(odd).sport == 0
    assert parse(pb.ipv4(CLIENT4, VIP4, 6, b"", frag_offset=8)).fragment is Fragment.LATER


def test_ipv4_dont_fragment_is_not_a_fragment() -> None:
    packet = pb.ipv4(CLIENT4, VIP4, 17, pb.udp(CLIENT4, VIP4, 1, 2), dont_fragment=True)
    assert parse(packet).fragment is Fragment.NONE


def test_ipv6_fragments() -> None:
    whole = pb.udp_packet(CLIENT6, VIP6, 4444, 5555, b"x" * 100)
    first, *later = pb.fragment_ipv6(whole, 48, ident=9)
    assert first[6] == 44
    assert parse(first) == FlowTuple(
        6, 17, _p(CLIENT6), _p(VIP6), 4444, 5555, False, Fragment.FIRST
    )
    assert later
    for packet in later:
        assert parse(packet) == FlowTuple(6, 17, _p(CLIENT6), _p(VIP6), 0, 0, False, Fragment.LATER)


def test_ipv6_fragment_after_other_headers_and_atomic_fragment() -> None:
    udp = pb.udp(CLIENT6, VIP6, 7, 9)
    ext = [pb.hop_by_hop(), pb.fragment_header(0, more=True), pb.destination_options()]
    first = parse(pb.ipv6(CLIENT6, VIP6, 17, udp, ext=ext))
    assert (first.sport, first.dport, first.fragment) == (7, 9, Fragment.FIRST)
    atomic = parse(pb.ipv6(CLIENT6, VIP6, 17, udp, ext=[pb.fragment_header(0, more=False)]))
    assert (atomic.sport, atomic.fragment) == (7, Fragment.NONE)
    later = parse(pb.ipv6(CLIENT6, VIP6, 17, udp, ext=[pb.fragment_header(1024, more=True)]))
    assert (later.proto, later.sport, later.fragment) == (17, 0, Fragment.LATER)


# ---------------------------------------------------------------------------------------------
# ICMP errors: the forward tuple of the flow the error is about


def test_icmp_frag_needed_about_a_reply_gives_the_forward_flow() -> None:
    reply = pb.tcp_packet(VIP4, CLIENT4, 443, 12345, flags=pb.TCP_SYN | pb.TCP_ACK)
    error = pb.icmp_frag_needed(ROUTER4, reply, mtu=1400)
    assert error[16:20] == _p(VIP4)  # the router sends it to the VIP, the reply's source
    flow = parse(error)
    forward = parse(pb.tcp_packet(CLIENT4, VIP4, 12345, 443))
    assert flow == dataclasses.replace(forward, from_icmp_error=True)
    assert flow.dst == _p(VIP4) == error[16:20]
    assert flow.swapped() == FlowTuple(4, 6, _p(VIP4), _p(CLIENT4), 443, 12345, True)
    assert str(flow) == "tcp 198.18.0.1:12345 -> 203.0.113.5:443 (icmp error)"


def test_icmp_error_with_the_rfc792_minimum_quote() -> None:
    reply = pb.udp_packet(VIP4, CLIENT4, 53, 33000, b"answer" * 50)
    error = pb.icmp_frag_needed(ROUTER4, reply, quote=28)  # IP header + 8 bytes
    assert parse(error) == FlowTuple(4, 17, _p(CLIENT4), _p(VIP4), 33000, 53, True)


def test_icmp_error_quoting_a_packet_with_options() -> None:
    udp = pb.udp(VIP4, CLIENT4, 53, 33000)
    reply = pb.ipv4(VIP4, CLIENT4, 17, udp, options=b"\x01\x01\x01\x01\x01\x01\x01\x00")
    flow = parse(pb.icmp_error(ROUTER4, reply, 11, 0))
    assert (flow.src, flow.sport, flow.dport) == (_p(CLIENT4), 33000, 53)


@pytest.mark.parametrize(("icmp_type", "code"), [(3, 1), (3, 3), (3, 4), (11, 0), (12, 0)])
def test_every_icmp_error_type(icmp_type: int, code: int) -> None:
    reply = pb.sctp_packet(VIP4, CLIENT4, 38412, 36412)
    flow = parse(pb.icmp_error(ROUTER4, reply, icmp_type, code))
    assert flow == FlowTuple(4, 132, _p(CLIENT4), _p(VIP4), 36412, 38412, True)


def test_icmp_error_quoting_fragments() -> None:
    reply = pb.udp_packet(VIP4, CLIENT4, 53, 33000, b"a" * 200)
    first, second, *_ = pb.fragment_ipv4(reply, 64)
    assert parse(pb.icmp_frag_needed(ROUTER4, first)).fragment is Fragment.FIRST
    about_later = parse(pb.icmp_frag_needed(ROUTER4, second))
    assert about_later == FlowTuple(4, 17, _p(CLIENT4), _p(VIP4), 0, 0, True, Fragment.LATER)


def test_icmp_error_quoting_icmp() -> None:
    echo_reply = pb.icmp_echo(VIP4, CLIENT4, 5, 6, reply=True)
    flow = parse(pb.icmp_error(ROUTER4, echo_reply, 3, 1))
    assert flow == FlowTuple(4, 1, _p(CLIENT4), _p(VIP4), 0, 0, True)


def test_icmpv6_packet_too_big_about_a_reply_gives_the_forward_flow() -> None:
    reply = pb.udp_packet(VIP6, CLIENT6, 443, 50000, b"quic" * 400)
    error = pb.icmpv6_packet_too_big(ROUTER6, reply, mtu=1280)
    assert len(error) == 1280
    assert error[24:40] == _p(VIP6)
    flow = parse(error)
    assert flow == FlowTuple(6, 17, _p(CLIENT6), _p(VIP6), 50000, 443, True)
    assert flow.dst == _p(VIP6)
    assert flow.swapped().src == _p(VIP6)


@pytest.mark.parametrize("icmp_type", [1, 2, 3, 4])
def test_every_icmpv6_error_type_and_quoted_extension_headers(icmp_type: int) -> None:
    tcp = pb.tcp(VIP6, CLIENT6, 443, 50001, flags=pb.TCP_ACK)
    reply = pb.ipv6(VIP6, CLIENT6, 6, tcp, ext=[pb.destination_options(8)])
    flow = parse(pb.icmpv6_error(ROUTER6, reply, icmp_type, 0))
    assert flow == FlowTuple(6, 6, _p(CLIENT6), _p(VIP6), 50001, 443, True)


def test_icmpv6_error_quoting_a_later_fragment() -> None:
    reply = pb.udp_packet(VIP6, CLIENT6, 443, 50000, b"q" * 300)
    later = pb.fragment_ipv6(reply, 128)[1]
    flow = parse(pb.icmpv6_packet_too_big(ROUTER6, later))
    assert flow == FlowTuple(6, 17, _p(CLIENT6), _p(VIP6), 0, 0, True, Fragment.LATER)


def test_later_fragment_of_an_icmp_error_has_no_quote() -> None:
    error = pb.icmp_frag_needed(ROUTER4, pb.udp_packet(VIP4, CLIENT4, 1, 2, bytes(600)))
    _, later = pb.fragment_ipv4(error, 400)
    flow = parse(later)
    assert (flow.proto, flow.from_icmp_error, flow.fragment) == (1, False, Fragment.LATER)
    assert flow.dst == _p(VIP4)


# ---------------------------------------------------------------------------------------------
# malformed


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "empty"),
        (b"\x00" * 40, "bad_version"),
        (b"\x55" * 40, "bad_version"),
        (b"\x45" + bytes(10), "truncated_ip"),
        (b"\x60" + bytes(30), "truncated_ip"),
        (b"\x44" + bytes(39), "bad_ihl"),
        # IHL 15 (60 bytes) and total length 60, in a 40-byte packet
        (
            (lambda p: b"\x4f" + p[1:2] + b"\x00\x3c" + p[4:])(pb.tcp_packet(CLIENT4, VIP4, 1, 2)),
            "truncated_ip",
        ),
        # IHL 15 (60 bytes) but total length 40
        (b"\x4f" + pb.tcp_packet(CLIENT4, VIP4, 1, 2)[1:], "bad_length"),
        # total length 10 < header length 20
        (pb.tcp_packet(CLIENT4, VIP4, 1, 2)[:2] + b"\x00\x0a" + bytes(36), "bad_length"),
        # total length 22: only 2 bytes of TCP are in the packet, the rest is trailer
        (
            (lambda p: p[:2] + b"\x00\x16" + p[4:])(pb.tcp_packet(CLIENT4, VIP4, 1, 2)),
            "truncated_l4",
        ),
        (pb.ip_packet(CLIENT4, VIP4, 17, b"\x00\x01\x00"), "truncated_l4"),
        (pb.ip_packet(CLIENT6, VIP6, 132, b"\x00"), "truncated_l4"),
        (pb.ip_packet(CLIENT4, VIP4, 1, b"\x08\x00\x00\x00"), "truncated_l4"),
        (pb.ip_packet(CLIENT6, VIP6, 58, b"\x80\x00"), "truncated_l4"),
        (pb.ip_packet(CLIENT6, VIP6, 60, b"\x11\x00\x00"), "truncated_exthdr"),
        (pb.ip_packet(CLIENT6, VIP6, 0, b"\x11\x05" + bytes(14)), "truncated_exthdr"),
        (pb.ip_packet(CLIENT6, VIP6, 44, b"\x11\x00\x00\x01"), "truncated_exthdr"),
        (pb.ip_packet(CLIENT6, VIP6, 51, b"\x11\x04" + bytes(10)), "truncated_exthdr"),
    ],
)
def test_malformed(packet: bytes, reason: str) -> None:
    assert _reason(packet) == reason


def test_malformed_icmp_errors() -> None:
    reply4 = pb.tcp_packet(VIP4, CLIENT4, 443, 1234)
    reply6 = pb.tcp_packet(VIP6, CLIENT6, 443, 1234)
    assert _reason(pb.icmp_frag_needed(ROUTER4, reply4, quote=19)) == "icmp_quote_truncated"
    assert _reason(pb.icmp_frag_needed(ROUTER4, reply4, quote=23)) == "icmp_quote_truncated"
    with_options = pb.ipv4(VIP4, CLIENT4, 6, pb.tcp(VIP4, CLIENT4, 1, 2), options=bytes(8))
    assert _reason(pb.icmp_frag_needed(ROUTER4, with_options, quote=26)) == ("icmp_quote_truncated")
    assert _reason(pb.icmp_frag_needed(ROUTER4, b"\x44" + reply4[1:])) == "icmp_quote_bad_ihl"
    assert _reason(pb.icmpv6_packet_too_big(ROUTER6, reply6, quote=39)) == "icmp_quote_truncated"
    assert _reason(pb.icmpv6_packet_too_big(ROUTER6, reply6, quote=42)) == "icmp_quote_truncated"
    # an ICMPv4 error must quote IPv4, an ICMPv6 error IPv6
    v4_quoting_v6 = pb.ip_packet(ROUTER4, VIP4, 1, bytes([3, 4, 0, 0, 0, 0, 5, 120]) + reply6)
    assert _reason(v4_quoting_v6) == "icmp_quote_bad_version"
    v6_quoting_v4 = pb.ip_packet(ROUTER6, VIP6, 58, bytes([2, 0, 0, 0, 0, 0, 5, 120]) + reply4)
    assert _reason(v6_quoting_v4 + bytes(20)) == "icmp_quote_bad_version"
    # extension headers of the quote cut short
    dst_opts = pb.ipv6(VIP6, CLIENT6, 17, pb.udp(VIP6, CLIENT6, 1, 2), ext=[pb.hop_by_hop(16)])
    assert _reason(pb.icmpv6_packet_too_big(ROUTER6, dst_opts, quote=50)) == (
        "icmp_quote_truncated"
    )


def test_zero_total_length_means_the_whole_buffer() -> None:
    packet = pb.tcp_packet(CLIENT4, VIP4, 1, 2)
    assert parse(packet[:2] + b"\0\0" + packet[4:]).dport == 2  # IPv4 BIG TCP
    packet6 = pb.udp_packet(CLIENT6, VIP6, 3, 4)
    assert parse(packet6[:4] + b"\0\0" + packet6[6:]).dport == 4  # jumbogram


def test_lengths_longer_than_the_bytes_are_tolerated() -> None:
    # a queue copy range may cut the packet after the headers
    packet = pb.tcp_packet(CLIENT4, VIP4, 1, 2, payload=bytes(1000))[:60]
    assert parse(packet).dport == 2
    packet6 = pb.udp_packet(CLIENT6, VIP6, 3, 4, bytes(1000))[:60]
    assert parse(packet6).dport == 4


def test_valid_packets_cut_at_every_length_only_raise_malformed() -> None:
    packets = [
        pb.tcp_packet(CLIENT4, VIP4, 1, 2),
        pb.ipv6(CLIENT6, VIP6, 17, pb.udp(CLIENT6, VIP6, 1, 2), ext=[pb.destination_options()]),
        pb.icmp_frag_needed(ROUTER4, pb.tcp_packet(VIP4, CLIENT4, 443, 1)),
        pb.icmpv6_packet_too_big(ROUTER6, pb.udp_packet(VIP6, CLIENT6, 443, 1)),
    ]
    for packet in packets:
        for cut in range(len(packet) + 1):
            try:
                parse(packet[:cut])
            except MalformedPacket as exc:
                assert exc.reason in REASONS


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_malformed(data: bytes) -> None:
    try:
        flow = parse(data)
    except MalformedPacket as exc:
        assert exc.reason in REASONS
    else:
        assert flow.family in (4, 6)
        assert len(flow.src) == len(flow.dst) == (4 if flow.family == 4 else 16)
        assert 0 <= flow.sport <= 0xFFFF and 0 <= flow.dport <= 0xFFFF


_SEEDS = [
    pb.tcp_packet(CLIENT4, VIP4, 1, 2),
    pb.udp_packet(CLIENT6, VIP6, 1, 2),
    pb.ipv6(CLIENT6, VIP6, 6, pb.tcp(CLIENT6, VIP6, 1, 2), ext=[pb.hop_by_hop(), pb.ah_header()]),
    pb.icmp_frag_needed(ROUTER4, pb.udp_packet(VIP4, CLIENT4, 53, 9)),
    pb.icmpv6_packet_too_big(ROUTER6, pb.tcp_packet(VIP6, CLIENT6, 443, 9)),
]


@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 1300), st.integers(0, 255)), max_size=8),
    st.integers(0, 1400),
)
def test_mutated_packets_never_raise_anything_but_malformed(
    seed: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for index, value in edits:
        if index < len(data):
            data[index] = value
    try:
        parse(bytes(data[:cut]))
    except MalformedPacket as exc:
        assert exc.reason in REASONS


# ---------------------------------------------------------------------------------------------
# FlowTuple


def test_flow_tuple_is_frozen_hashable_and_has_slots() -> None:
    flow = FlowTuple(4, 6, _p(CLIENT4), _p(VIP4), 1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        flow.sport = 3  # type: ignore[misc]
    assert not hasattr(flow, "__dict__")
    assert {flow: 1}[FlowTuple(4, 6, _p(CLIENT4), _p(VIP4), 1, 2)] == 1
    assert flow != FlowTuple(4, 6, _p(CLIENT4), _p(VIP4), 1, 2, True)
    assert [f.name for f in dataclasses.fields(flow)] == [
        "family",
        "proto",
        "src",
        "dst",
        "sport",
        "dport",
        "from_icmp_error",
        "fragment",
    ]
    assert flow.swapped().swapped() == flow
    assert "later fragment" in str(dataclasses.replace(flow, fragment=Fragment.LATER))


# ---------------------------------------------------------------------------------------------
# packetbuild checksums


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!xBH", proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3: the one's complement sum of these words is 0xddf2
    assert pb.checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF
    assert pb.checksum(b"\x01") == ~0x0100 & 0xFFFF


def test_ipv4_header_checksum_verifies() -> None:
    for packet in [
        pb.tcp_packet(CLIENT4, VIP4, 1, 2),
        pb.ipv4(CLIENT4, VIP4, 17, b"x", options=b"\x01\x01\x01", ttl=1, tos=0x10),
        *pb.fragment_ipv4(pb.udp_packet(CLIENT4, VIP4, 1, 2, bytes(100)), 32),
    ]:
        hl = (packet[0] & 15) * 4
        assert pb.checksum(packet[:hl]) == 0
        assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
    # a known header: RFC 1071-style example from the Wikipedia IPv4 checksum article
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert pb.checksum(header) == 0xB861


@pytest.mark.parametrize(("src", "dst"), [(CLIENT4, VIP4), (CLIENT6, VIP6)])
def test_l4_checksums_verify(src: str, dst: str) -> None:
    s, d = _p(src), _p(dst)
    segment = pb.tcp(src, dst, 1000, 80, seq=7, payload=b"odd")
    assert pb.checksum(_pseudo(s, d, 6, len(segment)) + segment) == 0
    datagram = pb.udp(src, dst, 1000, 53, b"query")
    assert pb.checksum(_pseudo(s, d, 17, len(datagram)) + datagram) == 0
    sctp = pb.sctp(1, 2, vtag=3)
    stored = struct.unpack_from("<I", sctp, 8)[0]
    assert pb.crc32c(sctp[:8] + bytes(4) + sctp[12:]) == stored


def test_icmp_checksums_verify() -> None:
    error = pb.icmp_frag_needed(ROUTER4, pb.tcp_packet(VIP4, CLIENT4, 443, 1), mtu=1400)
    assert pb.checksum(error[20:]) == 0
    assert error[20:22] == b"\x03\x04"
    assert struct.unpack_from("!H", error, 26)[0] == 1400
    echo = pb.icmp_echo(CLIENT4, VIP4, 1, 2, b"abc")
    assert pb.checksum(echo[20:]) == 0
    ptb = pb.icmpv6_packet_too_big(ROUTER6, pb.udp_packet(VIP6, CLIENT6, 443, 1), mtu=1400)
    message = ptb[40:]
    assert pb.checksum(_pseudo(_p(ROUTER6), _p(VIP6), 58, len(message)) + message) == 0
    assert struct.unpack_from("!I", message, 4)[0] == 1400
    echo6 = pb.icmpv6_echo(CLIENT6, VIP6, 1, 2, b"abc")
    assert pb.checksum(_pseudo(_p(CLIENT6), _p(VIP6), 58, len(echo6) - 40) + echo6[40:]) == 0


def test_crc32c_check_value() -> None:
    assert pb.crc32c(b"123456789") == 0xE3069283


def test_icmp_quote_defaults() -> None:
    big = pb.udp_packet(VIP4, CLIENT4, 1, 2, bytes(2000))
    assert len(pb.icmp_frag_needed(ROUTER4, big)) == 576
    big6 = pb.udp_packet(VIP6, CLIENT6, 1, 2, bytes(2000))
    assert len(pb.icmpv6_packet_too_big(ROUTER6, big6)) == 1280
    with pytest.raises(ValueError):
        pb.icmp_frag_needed(ROUTER4, big6)
    with pytest.raises(ValueError):
        pb.icmpv6_packet_too_big(ROUTER6, big)


def test_builder_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pb.ip_packet(CLIENT4, VIP6, 6, b"")
    with pytest.raises(ValueError):
        pb.ipv4(CLIENT4, VIP4, 6, b"", frag_offset=3)
    with pytest.raises(ValueError):
        pb.ipv4(CLIENT4, VIP4, 6, b"", options=bytes(41))
    with pytest.raises(ValueError):
        pb.ext_header(60, bytes(5))
    with pytest.raises(ValueError):
        pb.pack_address(b"abc")
    assert pb.pack_address(ip_address(VIP6)) == _p(VIP6)


@settings(max_examples=300, deadline=None)
@given(
    family=st.sampled_from([4, 6]),
    proto=st.sampled_from([6, 17, 132, 136, 33]),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    payload=st.binary(max_size=40),
)
def test_five_tuple_agrees_with_parse(
    family: int, proto: int, sport: int, dport: int, payload: bytes
) -> None:
    from meridio.core.packet import five_tuple

    src, dst = ("198.18.0.2", "203.0.113.1") if family == 4 else ("fd00::2", "2001:db8::1")
    if proto == 6:
        packet = bytes(pb.tcp_packet(src, dst, sport, dport, payload=payload))
    elif proto == 17:
        packet = bytes(pb.udp_packet(src, dst, sport, dport, payload))
    elif proto == 132:
        packet = bytes(pb.sctp_packet(src, dst, sport, dport))
    else:
        l4 = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + payload
        packet = bytes(pb.ip_packet(src, dst, proto, l4))
    t = parse(packet)
    assert five_tuple(packet) == (t.family, t.proto, t.src, t.dst, t.sport, t.dport)


def test_five_tuple_falls_back_for_icmp_errors_and_fragments() -> None:
    from meridio.core.packet import five_tuple

    reply = bytes(pb.udp_packet("203.0.113.1", "198.18.0.2", 5001, 40000, b"x" * 8))
    error = bytes(pb.icmp_frag_needed("192.0.2.1", reply, mtu=1400))
    t = parse(error)
    assert five_tuple(error) == (4, 17, t.src, t.dst, 40000, 5001)
    with pytest.raises(MalformedPacket):
        five_tuple(b"\x45\x00")


# ---------------------------------------------------------------------------------------------
# the packet's own L4 header (what byte matches read)


def test_l4_header_of_plain_packets_options_and_extension_headers() -> None:
    packet = pb.tcp_packet(CLIENT4, VIP4, 1, 2)
    assert l4_header(packet) == (6, 20, len(packet))
    with_options = pb.ipv4(CLIENT4, VIP4, 17, pb.udp(CLIENT4, VIP4, 1, 2), options=b"\x01" * 8)
    assert l4_header(with_options) == (17, 28, len(with_options))
    udp = pb.udp(CLIENT6, VIP6, 7, 9)
    ext = pb.ipv6(CLIENT6, VIP6, 17, udp, ext=[pb.hop_by_hop(), pb.destination_options()])
    assert l4_header(ext) == (17, len(ext) - len(udp), len(ext))
    # the buffer beyond the IP length is not the packet's
    assert l4_header(packet + b"pad") == (6, 20, len(packet))
    # an ICMP error is an ICMP packet: its quote is not its header
    error = pb.icmp_frag_needed(ROUTER4, pb.udp_packet(VIP4, CLIENT4, 80, 999))
    assert l4_header(error) == (1, 20, len(error))


def test_l4_header_of_fragments_and_bad_packets() -> None:
    first, later, *_ = pb.fragment_ipv4(pb.udp_packet(CLIENT4, VIP4, 1, 2, b"x" * 100), 48)
    assert l4_header(first) == (17, 20, len(first))
    assert l4_header(later) is None
    first6, later6, *_ = pb.fragment_ipv6(pb.udp_packet(CLIENT6, VIP6, 1, 2, b"x" * 100), 48)
    assert l4_header(first6) == (17, 48, len(first6))
    assert l4_header(later6) is None
    assert l4_header(b"") is None
    assert l4_header(b"\x45" + bytes(10)) is None
    assert l4_header(b"\x75" + bytes(39)) is None
    cut = pb.ipv6(CLIENT6, VIP6, 0, b"\x11\x05")  # hop-by-hop header cut short
    assert l4_header(cut) is None
    assert l4_header(memoryview(pb.tcp_packet(CLIENT6, VIP6, 1, 2))) == (6, 40, 60)
