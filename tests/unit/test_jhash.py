"""meridio.core.jhash: lookup3 vectors, nft key layout, bucket arithmetic, kernel-recorded marks."""

from __future__ import annotations

import struct
import sys
from ipaddress import ip_address

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from meridio.core import jhash as jh
from meridio.core.jhash import (
    check_byte_order,
    flow_bucket,
    flow_key,
    jhash,
    nft_bucket,
    reciprocal_scale,
)

M32 = 0xFFFFFFFF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & M32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """__jhash_mix"""
    a = (a - c) & M32
    a ^= _rol(c, 4)
    c = (c + b) & M32
    b = (b - a) & M32
    b ^= _rol(a, 6)
    a = (a + c) & M32
    c = (c - b) & M32
    c ^= _rol(b, 8)
    b = (b + a) & M32
    a = (a - c) & M32
    a ^= _rol(c, 16)
    c = (c + b) & M32
    b = (b - a) & M32
    b ^= _rol(a, 19)
    a = (a + c) & M32
    c = (c - b) & M32
    c ^= _rol(b, 4)
    b = (b + a) & M32
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    """__jhash_final"""
    c ^= b
    c = (c - _rol(b, 14)) & M32
    a ^= c
    a = (a - _rol(c, 11)) & M32
    b ^= a
    b = (b - _rol(a, 25)) & M32
    c ^= b
    c = (c - _rol(b, 16)) & M32
    a ^= c
    a = (a - _rol(c, 4)) & M32
    b ^= a
    b = (b - _rol(a, 14)) & M32
    c ^= b
    c = (c - _rol(b, 24)) & M32
    return c


def reference_jhash(key: bytes, seed: int, byteorder: str = "little") -> int:
    """include/linux/jhash.h transliterated: CPU-order words, then the bytewise tail switch."""
    length = len(key)
    a = b = c = (0xDEADBEEF + length + seed) & M32
    k = 0
    fmt = "<I" if byteorder == "little" else ">I"
    while length > 12:
        a = (a + struct.unpack_from(fmt, key, k)[0]) & M32
        b = (b + struct.unpack_from(fmt, key, k + 4)[0]) & M32
        c = (c + struct.unpack_from(fmt, key, k + 8)[0]) & M32
        a, b, c = _mix(a, b, c)
        length -= 12
        k += 12
    if length == 0:
        return c
    # case 12: c += (u32)k[11] << 24; ... case 1: a += k[0]; whatever the CPU's byte order
    for i, byte in enumerate(key[k:]):
        shift = 8 * (i % 4)
        if i < 4:
            a = (a + (byte << shift)) & M32
        elif i < 8:
            b = (b + (byte << shift)) & M32
        else:
            c = (c + (byte << shift)) & M32
    return _final(a, b, c)


def _p(address: str) -> bytes:
    return ip_address(address).packed


# ---------------------------------------------------------------------------------------------
# lookup3


@pytest.mark.parametrize(
    ("key", "seed", "expected"),
    [
        (b"", 0, 0xDEADBEEF),
        (b"", 0xDEADBEEF, 0xBD5B7DDE),
        (b"Four score and seven years ago", 0, 0x17770551),
        (b"Four score and seven years ago", 1, 0xCD628161),
    ],
)
def test_published_lookup3_vectors(key: bytes, seed: int, expected: int) -> None:
    assert jhash(key, seed) == expected
    assert jhash(key, seed, byteorder="little") == expected
    assert reference_jhash(key, seed) == expected


@given(st.binary(max_size=100), st.integers(0, M32), st.sampled_from(["little", "big"]))
def test_matches_the_line_by_line_reference(key: bytes, seed: int, order: str) -> None:
    assert jhash(key, seed, byteorder=order) == reference_jhash(key, seed, order)  # type: ignore[arg-type]


@pytest.mark.parametrize("length", [16, 20, 40, 44, 12, 24, 13, 1, 3])
def test_fixed_size_paths(length: int) -> None:
    key = bytes(range(7, 7 + length))
    for seed in (0, 1, 0x9E3779B9, M32):
        assert jhash(key, seed) == reference_jhash(key, seed)


def test_big_endian_reads_blocks_big_and_tail_little() -> None:
    # 12 bytes or fewer: all tail, so both orders agree; beyond that they differ.
    key = bytes(range(1, 13))
    assert jhash(key, 5, byteorder="big") == jhash(key, 5, byteorder="little")
    key = bytes(range(1, 17))
    assert jhash(key, 5, byteorder="big") != jhash(key, 5, byteorder="little")


def test_seed_is_a_u32() -> None:
    key = bytes(16)
    assert jhash(key, 1 << 32 | 7) == jhash(key, 7)


def test_bad_byteorder() -> None:
    with pytest.raises(ValueError):
        jhash(b"abc", 0, byteorder="middle")  # type: ignore[arg-type]


def test_check_byte_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_byte_order() == sys.byteorder
    monkeypatch.setattr(jh, "HOST_BYTEORDER", "big")
    with pytest.raises(RuntimeError, match="byte order"):
        check_byte_order()
    assert check_byte_order(allow_unverified=True) == "big"


# ---------------------------------------------------------------------------------------------
# nft key layout


def test_ipv4_key_layout_from_the_reference() -> None:
    key = flow_key(_p("198.18.0.1"), _p("203.0.113.5"), 12345, 443)
    assert key.hex() == "c6120001cb0071053039000001bb0000"
    # jhash reads it as little-endian words: the first one is 0x010012c6
    assert struct.unpack_from("<I", key)[0] == 0x010012C6
    key = flow_key(_p("198.18.0.1"), _p("203.0.113.5"), 12345, 443, l4proto=6)
    assert key.hex() == "06000000c6120001cb0071053039000001bb0000"


def test_ipv6_key_layout() -> None:
    src, dst = _p("2001:db8::1"), _p("fd00::2")
    key = flow_key(src, dst, 0x1234, 0xFFFF)
    assert len(key) == 40
    assert key == src + dst + b"\x12\x34\0\0" + b"\xff\xff\0\0"
    key = flow_key(src, dst, 0x1234, 0xFFFF, l4proto=17)
    assert len(key) == 44
    assert key == b"\x11\0\0\0" + src + dst + b"\x12\x34\0\0" + b"\xff\xff\0\0"


@pytest.mark.parametrize(
    ("src", "dst", "sport", "dport", "l4proto"),
    [
        (b"1234", b"1234567890123456", 1, 2, None),  # mixed families
        (b"123", b"123", 1, 2, None),
        (b"1234", b"1234", 65536, 2, None),
        (b"1234", b"1234", 1, -1, None),
        (b"1234", b"1234", 1, 2, 256),
    ],
)
def test_flow_key_rejects(
    src: bytes, dst: bytes, sport: int, dport: int, l4proto: int | None
) -> None:
    with pytest.raises(ValueError):
        flow_key(src, dst, sport, dport, l4proto)


# ---------------------------------------------------------------------------------------------
# bucket arithmetic


def test_mod_is_reciprocal_scale_not_remainder() -> None:
    key = flow_key(_p("198.18.0.1"), _p("203.0.113.5"), 12345, 443)
    h = jhash(key, 1)
    assert nft_bucket(key, 65537, 1) == (h * 65537) >> 32 == reciprocal_scale(h, 65537)
    assert nft_bucket(key, 65537, 1, offset=100) == ((h * 65537) >> 32) + 100
    assert reciprocal_scale(M32, 1000) == 999
    assert reciprocal_scale(0, 1000) == 0


@pytest.mark.parametrize(
    ("modulus", "offset"), [(0, 0), (1, 0), (1 << 32, 0), (2, -1), (1000, M32 - 998)]
)
def test_modulus_and_offset_range(modulus: int, offset: int) -> None:
    with pytest.raises(ValueError):
        nft_bucket(bytes(16), modulus, 0, offset)
    assert nft_bucket(bytes(16), M32, 0, 0) < M32
    assert nft_bucket(bytes(16), 1000, 0, M32 - 999) <= M32


@given(
    src=st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16),
    sport=st.integers(0, 0xFFFF),
    dport=st.integers(0, 0xFFFF),
    modulus=st.integers(2, M32),
    seed=st.integers(0, M32),
    offset=st.integers(0, 1 << 16),
    l4proto=st.none() | st.integers(0, 255),
)
def test_bucket_in_range_and_deterministic(
    src: bytes,
    sport: int,
    dport: int,
    modulus: int,
    seed: int,
    offset: int,
    l4proto: int | None,
) -> None:
    assume(offset + modulus - 1 <= M32)
    dst = bytes(reversed(src))
    key = flow_key(src, dst, sport, dport, l4proto)
    assert len(key) == {4: 16, 16: 40}[len(src)] + (0 if l4proto is None else 4)
    bucket = nft_bucket(key, modulus, seed, offset)
    assert offset <= bucket < offset + modulus
    assert bucket == nft_bucket(bytes(key), modulus, seed, offset)
    assert bucket == flow_bucket(
        src, dst, sport, dport, modulus, seed, l4proto=l4proto, offset=offset
    )
    assert jhash(key, seed) == reference_jhash(key, seed)


# Marks recorded from the kernel (6.18, nft 1.0.6) by tests/netns/test_jhash_kernel.py's rules,
# so that the comparison also runs without root.
KERNEL_MARKS = [
    # src, dst, sport, dport, mark: jhash 4-tuple mod 65537 seed 0x9e3779b9
    ("198.18.0.2", "203.0.113.7", 4000, 53, 3433),
    ("198.18.0.1", "198.19.125.102", 44188, 596, 21125),
    ("198.18.0.1", "198.19.136.34", 50060, 22504, 28072),
    ("fd00:18::2", "2001:db8::7", 4000, 53, 19383),
    ("fd00:18::1", "2001:db8::9", 4001, 443, 19669),
    ("fd00:18::1", "2001:db8::16ac:2ab9:a28f:738c", 27479, 30970, 35887),
    ("fd00:18::1", "2001:db8::1f73:a4f6:9ef7:ad6a", 32014, 9187, 49724),
]
KERNEL_MARKS_L4PROTO = [
    # l4proto, src, dst, sport, dport, mark:
    # jhash meta l4proto . 4-tuple mod 65537 seed 0xc0ffee offset 100
    (6, "198.18.0.1", "198.19.136.34", 50060, 22504, 47456),
    (6, "198.18.0.1", "198.19.189.133", 48938, 5739, 12639),
    (17, "198.18.0.1", "198.19.125.102", 44188, 596, 10193),
    (17, "198.18.0.1", "198.19.138.215", 1594, 65535, 2094),
    (6, "fd00:18::1", "2001:db8::16ac:2ab9:a28f:738c", 27479, 30970, 46761),
    (6, "fd00:18::1", "2001:db8::1f73:a4f6:9ef7:ad6a", 32014, 9187, 32764),
    (17, "fd00:18::1", "2001:db8::421b:18b4:fe17:3a99", 30161, 17875, 63898),
    (17, "fd00:18::1", "2001:db8::ac3c:aaac:6665:d666", 10520, 11342, 54745),
]


@pytest.mark.parametrize(("src", "dst", "sport", "dport", "mark"), KERNEL_MARKS)
def test_marks_recorded_from_the_kernel(
    src: str, dst: str, sport: int, dport: int, mark: int
) -> None:
    key = flow_key(_p(src), _p(dst), sport, dport)
    assert nft_bucket(key, 65537, 0x9E3779B9, byteorder="little") == mark


@pytest.mark.parametrize(("proto", "src", "dst", "sport", "dport", "mark"), KERNEL_MARKS_L4PROTO)
def test_l4proto_marks_recorded_from_the_kernel(
    proto: int, src: str, dst: str, sport: int, dport: int, mark: int
) -> None:
    key = flow_key(_p(src), _p(dst), sport, dport, l4proto=proto)
    assert nft_bucket(key, 65537, 0xC0FFEE, 100, byteorder="little") == mark
