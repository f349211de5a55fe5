"""Build IPv4/IPv6 packets for tests (pure, no I/O): TCP, UDP, SCTP, ICMP and ICMPv6 errors.

Every builder returns bytes starting at the IP header, as NetfilterQueue hands packets over (add
an Ethernet header with :func:`ethernet` to send one through an ``AF_PACKET`` socket).
Checksums are valid: the IPv4 header checksum, TCP/UDP/ICMPv6 with their pseudo-headers, ICMP
over the message and SCTP's CRC32c, so a kernel accepts the packets. Addresses may be given as
text, packed bytes or ``ipaddress`` objects; the family follows from the addresses.

Typical use::

    reply = tcp_packet("203.0.113.5", "198.18.0.1", 443, 12345, flags=TCP_SYN | TCP_ACK)
    error = icmp_frag_needed("198.18.255.1", reply, mtu=1400)   # router -> VIP, quoting reply
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final

__all__ = [
    "TCP_ACK",
    "TCP_FIN",
    "TCP_PSH",
    "TCP_RST",
    "TCP_SYN",
    "Address",
    "ExtHeader",
    "ah_header",
    "checksum",
    "crc32c",
    "destination_options",
    "ethernet",
    "ext_header",
    "fragment_header",
    "fragment_ipv4",
    "fragment_ipv6",
    "hop_by_hop",
    "icmp_echo",
    "icmp_error",
    "icmp_frag_needed",
    "icmpv6_echo",
    "icmpv6_error",
    "icmpv6_packet_too_big",
    "ip_packet",
    "ipv4",
    "ipv6",
    "pack_address",
    "sctp",
    "sctp_packet",
    "tcp",
    "tcp_packet",
    "udp",
    "udp_packet",
]

Address = str | bytes | IPv4Address | IPv6Address

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

# RFC 1812 4.3.2.3: an ICMPv4 error holds as much of the original as fits in 576 bytes;
# RFC 4443 2.4 (c): an ICMPv6 error as much as fits in the minimum MTU, 1280 bytes.
ICMP_MAX_QUOTE: Final = 576 - 20 - 8
ICMPV6_MAX_QUOTE: Final = 1280 - 40 - 8


def pack_address(address: Address) -> bytes:
    """4 or 16 packed bytes for an address given as text, bytes or an ``ipaddress`` object."""
    if isinstance(address, bytes):
        if len(address) not in (4, 16):
            raise ValueError(f"a packed address has 4 or 16 bytes, not {len(address)}")
        return address
    if isinstance(address, IPv4Address | IPv6Address):
        return address.packed
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.inet_pton(family, address)


def _pair(src: Address, dst: Address) -> tuple[bytes, bytes]:
    s, d = pack_address(src), pack_address(dst)
    if len(s) != len(d):
        raise ValueError("source and destination are of different families")
    return s, d


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``, zero-padded to an even length."""
    if len(data) & 1:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!xBH", proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def _l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    return checksum(_pseudo_header(src, dst, proto, len(segment)) + segment)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as SCTP uses it: ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# IP


def ipv4(
    src: Address,
    dst: Address,
    proto: int,
    payload: bytes,
    *,
    ttl: int = 64,
    tos: int = 0,
    ident: int = 0,
    dont_fragment: bool = False,
    more_fragments: bool = False,
    frag_offset: int = 0,
    options: bytes = b"",
) -> bytes:
    """An IPv4 packet with a valid header checksum.

    ``frag_offset`` is in bytes (a multiple of 8); ``options`` are padded with zero bytes
    (end-of-options) to a multiple of 4 and set the IHL accordingly.
    """
    s, d = pack_address(src), pack_address(dst)
    if len(s) != 4 or len(d) != 4:
        raise ValueError("ipv4() needs IPv4 addresses")
    if frag_offset % 8:
        raise ValueError("the fragment offset must be a multiple of 8 bytes")
    options += b"\0" * (-len(options) % 4)
    hl = 20 + len(options)
    if hl > 60:
        raise ValueError("IPv4 options longer than 40 bytes")
    flags = (0x4000 if dont_fragment else 0) | (0x2000 if more_fragments else 0)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | hl // 4,
        tos,
        hl + len(payload),
        ident,
        flags | frag_offset // 8,
        ttl,
        proto,
        0,
        s,
        d,
    )
    header += options
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


@dataclass(frozen=True, slots=True)
class ExtHeader:
    """An IPv6 extension header: its type and its bytes; the first byte (next header) is
    filled in by :func:`ipv6`."""

    kind: int
    data: bytes


def ext_header(kind: int, body: bytes) -> ExtHeader:
    """A generic extension header (hop-by-hop 0, routing 43, destination options 60): ``body``
    follows the next-header and length bytes; ``len(body) + 2`` must be a multiple of 8."""
    if (len(body) + 2) % 8 or len(body) + 2 > 2048:
        raise ValueError("an extension header is 8..2048 bytes, a multiple of 8")
    return ExtHeader(kind, bytes([0, (len(body) + 2) // 8 - 1]) + body)


def _padded_options(length: int) -> bytes:
    if length < 8 or length % 8:
        raise ValueError("an options header is a multiple of 8 bytes")
    pad = length - 2  # one PadN option fills the header
    return bytes([1, pad - 2]) + b"\0" * (pad - 2)


def destination_options(length: int = 8) -> ExtHeader:
    """A Destination Options header (60) of ``length`` bytes holding only padding."""
    return ext_header(60, _padded_options(length))


def hop_by_hop(length: int = 8) -> ExtHeader:
    """A Hop-by-Hop Options header (0) of ``length`` bytes holding only padding."""
    return ext_header(0, _padded_options(length))


def fragment_header(offset: int = 0, more: bool = False, ident: int = 0) -> ExtHeader:
    """A Fragment header (44); ``offset`` in bytes (a multiple of 8)."""
    if offset % 8:
        raise ValueError("the fragment offset must be a multiple of 8 bytes")
    return ExtHeader(44, struct.pack("!BxHI", 0, offset | (1 if more else 0), ident))


def ah_header(spi: int = 0x100, seq: int = 1, icv: bytes = b"\0" * 12) -> ExtHeader:
    """An Authentication Header (51); its length field counts 4-byte units minus 2."""
    size = 12 + len(icv)
    if size % 8:
        raise ValueError("an IPv6 AH is a multiple of 8 bytes")
    return ExtHeader(51, struct.pack("!BBHII", 0, size // 4 - 2, 0, spi, seq) + icv)


def ipv6(
    src: Address,
    dst: Address,
    next_header: int,
    payload: bytes,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
    ext: Sequence[ExtHeader] = (),
) -> bytes:
    """An IPv6 packet; ``ext`` headers come between the fixed header and ``payload``, whose
    protocol is ``next_header``."""
    s, d = pack_address(src), pack_address(dst)
    if len(s) != 16 or len(d) != 16:
        raise ValueError("ipv6() needs IPv6 addresses")
    chain = b""
    kinds = [h.kind for h in ext] + [next_header]
    for header, following in zip(ext, kinds[1:], strict=True):
        chain += bytes([following]) + header.data[1:]
    body = chain + payload
    first = 0x60000000 | (traffic_class & 0xFF) << 20 | (flow_label & 0xFFFFF)
    return struct.pack("!IHBB16s16s", first, len(body), kinds[0], hop_limit, s, d) + body


def ip_packet(src: Address, dst: Address, proto: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 packet (by the addresses' family) with default header fields."""
    s, d = _pair(src, dst)
    if len(s) == 4:
        return ipv4(s, d, proto, payload)
    return ipv6(s, d, proto, payload)


def ethernet(packet: bytes, dst_mac: bytes, src_mac: bytes) -> bytes:
    """An Ethernet II frame carrying the IP ``packet`` (ethertype from its version)."""
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    return dst_mac + src_mac + struct.pack("!H", ethertype) + packet


# --------------------------------------------------------------------------------------------
# L4


def tcp(
    src: Address,
    dst: Address,
    sport: int,
    dport: int,
    *,
    seq: int = 0,
    ack: int = 0,
    flags: int = TCP_SYN,
    window: int = 65535,
    options: bytes = b"",
    payload: bytes = b"",
) -> bytes:
    """A TCP segment whose checksum covers the pseudo-header of ``src``/``dst``."""
    s, d = _pair(src, dst)
    options += b"\0" * (-len(options) % 4)
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window, 0, 0)
    segment = header + options + payload
    csum = _l4_checksum(s, d, 6, segment)
    return segment[:16] + struct.pack("!H", csum) + segment[18:]


def udp(src: Address, dst: Address, sport: int, dport: int, payload: bytes = b"") -> bytes:
    """A UDP datagram whose checksum covers the pseudo-header of ``src``/``dst``."""
    s, d = _pair(src, dst)
    datagram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = _l4_checksum(s, d, 17, datagram) or 0xFFFF
    return datagram[:6] + struct.pack("!H", csum) + datagram[8:]


def sctp(sport: int, dport: int, *, vtag: int = 0, chunks: bytes | None = None) -> bytes:
    """An SCTP packet with a CRC32c checksum; the default chunk is a minimal INIT."""
    if chunks is None:
        # INIT: type 1, flags 0, length 20, initiate tag, a_rwnd, out/in streams, initial TSN.
        chunks = struct.pack("!BBHIIHHI", 1, 0, 20, 0x1234ABCD, 65536, 10, 10, 1)
    packet = struct.pack("!HHII", sport, dport, vtag, 0) + chunks
    return packet[:8] + struct.pack("<I", crc32c(packet)) + packet[12:]


def tcp_packet(
    src: Address,
    dst: Address,
    sport: int,
    dport: int,
    *,
    flags: int = TCP_SYN,
    seq: int = 0,
    ack: int = 0,
    payload: bytes = b"",
) -> bytes:
    """An IPv4 or IPv6 packet carrying a TCP segment."""
    segment = tcp(src, dst, sport, dport, flags=flags, seq=seq, ack=ack, payload=payload)
    return ip_packet(src, dst, 6, segment)


def udp_packet(src: Address, dst: Address, sport: int, dport: int, payload: bytes = b"") -> bytes:
    """An IPv4 or IPv6 packet carrying a UDP datagram."""
    return ip_packet(src, dst, 17, udp(src, dst, sport, dport, payload))


def sctp_packet(src: Address, dst: Address, sport: int, dport: int, *, vtag: int = 0) -> bytes:
    """An IPv4 or IPv6 packet carrying an SCTP INIT."""
    return ip_packet(src, dst, 132, sctp(sport, dport, vtag=vtag))


# --------------------------------------------------------------------------------------------
# ICMP


def _original_source(original: bytes) -> bytes:
    if original[0] >> 4 == 4:
        return original[12:16]
    return original[8:24]


def icmp_error(
    reporter: Address,
    original: bytes,
    icmp_type: int,
    code: int,
    *,
    rest: int = 0,
    quote: int | None = None,
) -> bytes:
    """An ICMPv4 error sent by ``reporter`` to the source of the IPv4 packet ``original``,
    quoting its first ``quote`` bytes (default: as much as RFC 1812 allows, 548 bytes).
    ``rest`` is the 32-bit field after the checksum."""
    if original[0] >> 4 != 4:
        raise ValueError("an ICMPv4 error quotes an IPv4 packet")
    body = original[: ICMP_MAX_QUOTE if quote is None else quote]
    message = struct.pack("!BBHI", icmp_type, code, 0, rest) + body
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    return ipv4(reporter, _original_source(original), 1, message)


def icmp_frag_needed(
    reporter: Address, original: bytes, mtu: int = 1400, *, quote: int | None = None
) -> bytes:
    """ICMP destination unreachable / fragmentation needed (type 3, code 4) about
    ``original`` with next-hop ``mtu`` (RFC 1191)."""
    return icmp_error(reporter, original, 3, 4, rest=mtu & 0xFFFF, quote=quote)


def icmpv6_error(
    reporter: Address,
    original: bytes,
    icmp_type: int,
    code: int,
    *,
    rest: int = 0,
    quote: int | None = None,
) -> bytes:
    """An ICMPv6 error sent by ``reporter`` to the source of the IPv6 packet ``original``,
    quoting its first ``quote`` bytes (default: as much as fits in 1280 bytes)."""
    if original[0] >> 4 != 6:
        raise ValueError("an ICMPv6 error quotes an IPv6 packet")
    s = pack_address(reporter)
    d = _original_source(original)
    body = original[: ICMPV6_MAX_QUOTE if quote is None else quote]
    message = struct.pack("!BBHI", icmp_type, code, 0, rest) + body
    csum = _l4_checksum(s, d, 58, message)
    message = message[:2] + struct.pack("!H", csum) + message[4:]
    return ipv6(s, d, 58, message)


def icmpv6_packet_too_big(
    reporter: Address, original: bytes, mtu: int = 1280, *, quote: int | None = None
) -> bytes:
    """ICMPv6 Packet Too Big (type 2, code 0) about ``original`` with ``mtu``."""
    return icmpv6_error(reporter, original, 2, 0, rest=mtu, quote=quote)


def icmp_echo(
    src: Address,
    dst: Address,
    ident: int = 1,
    seq: int = 1,
    payload: bytes = b"",
    *,
    reply: bool = False,
) -> bytes:
    """An IPv4 ICMP echo request (or reply)."""
    message = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    return ipv4(src, dst, 1, message)


def icmpv6_echo(
    src: Address,
    dst: Address,
    ident: int = 1,
    seq: int = 1,
    payload: bytes = b"",
    *,
    reply: bool = False,
) -> bytes:
    """An ICMPv6 echo request (or reply)."""
    s, d = pack_address(src), pack_address(dst)
    message = struct.pack("!BBHHH", 129 if reply else 128, 0, 0, ident, seq) + payload
    message = message[:2] + struct.pack("!H", _l4_checksum(s, d, 58, message)) + message[4:]
    return ipv6(s, d, 58, message)


# --------------------------------------------------------------------------------------------
# Fragmentation


def fragment_ipv4(packet: bytes, size: int) -> list[bytes]:
    """Split an IPv4 packet into fragments carrying at most ``size`` bytes of its payload each
    (``size`` is rounded down to a multiple of 8). Options are copied into every fragment."""
    size -= size % 8
    if size <= 0:
        raise ValueError("fragment size must be at least 8 bytes")
    hl = (packet[0] & 15) * 4
    (ident,) = struct.unpack_from("!H", packet, 4)
    ttl, proto = packet[8], packet[9]
    src, dst = packet[12:16], packet[16:20]
    options = packet[20:hl]
    payload = packet[hl:]
    fragments = []
    for start in range(0, len(payload), size):
        chunk = payload[start : start + size]
        fragments.append(
            ipv4(
                src,
                dst,
                proto,
                chunk,
                ttl=ttl,
                tos=packet[1],
                ident=ident,
                more_fragments=start + size < len(payload),
                frag_offset=start,
                options=options,
            )
        )
    return fragments


def fragment_ipv6(packet: bytes, size: int, ident: int = 1) -> list[bytes]:
    """Split an IPv6 packet into fragments carrying at most ``size`` bytes (rounded down to a
    multiple of 8) of what follows the fixed 40-byte header, which is taken as the whole
    unfragmentable part (any extension headers of ``packet`` travel in the first fragment)."""
    size -= size % 8
    if size <= 0:
        raise ValueError("fragment size must be at least 8 bytes")
    first_word, _, next_header, hop_limit = struct.unpack_from("!IHBB", packet)
    src, dst = packet[8:24], packet[24:40]
    rest = packet[40:]
    fragments = []
    for start in range(0, len(rest), size):
        fragments.append(
            ipv6(
                src,
                dst,
                next_header,
                rest[start : start + size],
                hop_limit=hop_limit,
                traffic_class=(first_word >> 20) & 0xFF,
                flow_label=first_word & 0xFFFFF,
                ext=[fragment_header(start, start + size < len(rest), ident)],
            )
        )
    return fragments
