"""nftables ``jhash ... mod M seed S [offset O]`` reproduced in user space (pure, no I/O).

The kernel expression (``nft_jhash_eval`` in net/netfilter/nft_hash.c) computes::

    bucket = reciprocal_scale(jhash(&regs[sreg], len, seed), M) + offset
    reciprocal_scale(h, M) = (u32)(((u64)h * M) >> 32)      # not h % M

``jhash()`` (include/linux/jhash.h) is Bob Jenkins' lookup3 ``hashlittle``: while more than 12
bytes remain, three u32 words read in **CPU byte order** are added and mixed; the last 1..12 bytes
are added bytewise as little-endian shifts (``c += k[11] << 24`` ...) whatever the CPU, then the
final mix runs. An empty key returns ``c`` unmixed.

Byte order: on a little-endian CPU (x86_64, arm64; the kernel comparison was made on x86_64) all
words are little-endian. On a big-endian kernel the full
12-byte blocks are read big-endian while the tail stays little-endian. Both orders are
implemented (``byteorder=``), the default being the host's, so the module imports and computes on
any host; only the little-endian result has been checked against a kernel.
:func:`check_byte_order` lets a daemon refuse to start where that check has not been made.

Keys: nft puts every field of a concatenation at a 4-byte register boundary and zeroes the unused
tail of a register; bytes are in packet (network) order. So ``ip saddr . ip daddr . th sport .
th dport`` is 16 bytes ``saddr daddr sp_hi sp_lo 00 00 dp_hi dp_lo 00 00``, the IPv6 form is
40 bytes, and a leading ``meta l4proto`` adds ``proto 00 00 00`` (20 / 44 bytes). See
:func:`flow_key`.

Speed (CPython 3.11, 2-vCPU VM): a 16-byte key (the IPv4 4-tuple) takes about 2.1 us per
:func:`nft_bucket` call, through a straight-line version of the one-mix-plus-tail case; the
20-byte form about 2.4 us and the 40/44-byte IPv6 forms about 4.2 us (three mixes). Building the
key with :func:`flow_key` adds about 0.13 us. This is meant for the slow path (ICMP errors), where
user space must land a packet in the bucket an in-kernel rule would have chosen.
"""

from __future__ import annotations

import struct
import sys
from typing import Final, Literal

__all__ = [
    "HOST_BYTEORDER",
    "JHASH_INITVAL",
    "check_byte_order",
    "flow_bucket",
    "flow_key",
    "jhash",
    "nft_bucket",
    "reciprocal_scale",
]

ByteOrder = Literal["little", "big"]

JHASH_INITVAL: Final = 0xDEADBEEF
HOST_BYTEORDER: Final[ByteOrder] = "little" if sys.byteorder == "little" else "big"

_M32: Final = 0xFFFFFFFF

# Key layouts (network order, every field padded to 4 bytes with zeroes).
_KEY4 = struct.Struct("!4s4sH2xH2x")
_KEY4P = struct.Struct("!B3x4s4sH2xH2x")
_KEY6 = struct.Struct("!16s16sH2xH2x")
_KEY6P = struct.Struct("!B3x16s16sH2xH2x")

# Little-endian word views of the four nft key sizes (16, 20, 40, 44 bytes).
_LE4 = struct.Struct("<4I")
_LE5 = struct.Struct("<5I")
_LE10 = struct.Struct("<10I")
_LE11 = struct.Struct("<11I")
_LE_BY_WORDS: Final = {4: _LE4, 5: _LE5, 10: _LE10, 11: _LE11}


def check_byte_order(*, allow_unverified: bool = False) -> ByteOrder:
    """Return the host byte order; refuse (``RuntimeError``) an order not checked against a kernel.

    Only little-endian has been compared with the kernel's buckets. A daemon that steers packets
    with :func:`nft_bucket` next to in-kernel ``jhash`` rules calls this at start-up; pass
    ``allow_unverified=True`` to accept the (implemented but unverified) big-endian variant.
    """
    if HOST_BYTEORDER != "little" and not allow_unverified:
        raise RuntimeError(
            f"meridio.core.jhash: host byte order is {sys.byteorder!r}; the kernel's jhash reads "
            "CPU-order words and only the little-endian variant has been verified against nft. "
            "Refusing to run (pass allow_unverified=True to use the big-endian variant)."
        )
    return HOST_BYTEORDER


def reciprocal_scale(value: int, modulus: int) -> int:
    """The kernel's ``reciprocal_scale``: ``(value * modulus) >> 32`` for u32 operands."""
    return ((value & _M32) * modulus) >> 32


# Masking: the rotate-by-shifts below need their operand in 0..2**32-1, so every value that is
# rotated next is masked; the sums in between (``c = c + b``) are left unmasked, since they are
# only added, subtracted or xor-ed into a value that is masked before it is rotated (x & M only
# depends on x mod 2**32). ``(b << k) | (b >> 32 - k)`` differs from rol32 by a multiple of 2**32,
# which the mask removes.


def _jhash_words(words: tuple[int, ...], length: int, seed: int) -> int:
    """lookup3 over ``words``: all full blocks, then a zero-padded 1..12 byte tail (len(words)
    is a multiple of 3 and covers the tail). ``length`` is the key length in bytes (> 0)."""
    a = b = c = (0xDEADBEEF + length + seed) & 0xFFFFFFFF
    last = len(words) - 3
    i = 0
    while i < last:
        a += words[i]
        b += words[i + 1]
        c = (c + words[i + 2]) & 0xFFFFFFFF
        # __jhash_mix
        a = ((a - c) ^ ((c << 4) | (c >> 28))) & 0xFFFFFFFF
        c += b
        b = ((b - a) ^ ((a << 6) | (a >> 26))) & 0xFFFFFFFF
        a += c
        c = ((c - b) ^ ((b << 8) | (b >> 24))) & 0xFFFFFFFF
        b += a
        a = ((a - c) ^ ((c << 16) | (c >> 16))) & 0xFFFFFFFF
        c += b
        b = ((b - a) ^ ((a << 19) | (a >> 13))) & 0xFFFFFFFF
        a += c
        c = ((c - b) ^ ((b << 4) | (b >> 28))) & 0xFFFFFFFF
        b += a
        i += 3
    a += words[i]
    b = (b + words[i + 1]) & 0xFFFFFFFF
    c += words[i + 2]
    # __jhash_final
    c = ((c ^ b) - ((b << 14) | (b >> 18))) & 0xFFFFFFFF
    a = ((a ^ c) - ((c << 11) | (c >> 21))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 25) | (a >> 7))) & 0xFFFFFFFF
    c = ((c ^ b) - ((b << 16) | (b >> 16))) & 0xFFFFFFFF
    a = ((a ^ c) - ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 14) | (a >> 18))) & 0xFFFFFFFF
    return ((c ^ b) - ((b << 24) | (b >> 8))) & 0xFFFFFFFF


def _jhash16_le(w0: int, w1: int, w2: int, w3: int, seed: int) -> int:
    """jhash of a 16-byte key given as four little-endian words: one mix, a 4-byte tail."""
    a = b = c = (0xDEADBEEF + 16 + seed) & 0xFFFFFFFF
    c = (c + w2) & 0xFFFFFFFF
    a = ((a + w0 - c) ^ ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    c += b + w1
    b = ((b + w1 - a) ^ ((a << 6) | (a >> 26))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 8) | (b >> 24))) & 0xFFFFFFFF
    b += a
    a = ((a - c) ^ ((c << 16) | (c >> 16))) & 0xFFFFFFFF
    c += b
    b = ((b - a) ^ ((a << 19) | (a >> 13))) & 0xFFFFFFFF
    a += c
    c = ((c - b) ^ ((b << 4) | (b >> 28))) & 0xFFFFFFFF
    b = (b + a) & 0xFFFFFFFF
    c = ((c ^ b) - ((b << 14) | (b >> 18))) & 0xFFFFFFFF
    a = (((a + w3) ^ c) - ((c << 11) | (c >> 21))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 25) | (a >> 7))) & 0xFFFFFFFF
    c = ((c ^ b) - ((b << 16) | (b >> 16))) & 0xFFFFFFFF
    a = ((a ^ c) - ((c << 4) | (c >> 28))) & 0xFFFFFFFF
    b = ((b ^ a) - ((a << 14) | (a >> 18))) & 0xFFFFFFFF
    return ((c ^ b) - ((b << 24) | (b >> 8))) & 0xFFFFFFFF


def jhash(key: bytes, seed: int = 0, *, byteorder: ByteOrder = HOST_BYTEORDER) -> int:
    """The Linux kernel's ``jhash(key, len(key), seed)`` (lookup3 ``hashlittle``), as a u32.

    ``byteorder`` is the CPU order the kernel would read full 12-byte blocks in (default: this
    host's); the 1..12 byte tail is always added as little-endian, as the kernel does.
    """
    length = len(key)
    seed &= _M32
    if length == 0:
        return (JHASH_INITVAL + seed) & _M32
    if byteorder == "little":
        if length == 16:
            w0, w1, w2, w3 = _LE4.unpack(key)
            return _jhash16_le(w0, w1, w2, w3, seed)
        if length & 3 == 0:
            nwords = length >> 2
            fixed = _LE_BY_WORDS.get(nwords)
            words = fixed.unpack(key) if fixed is not None else struct.unpack(f"<{nwords}I", key)
            pad = (-nwords) % 3
            return _jhash_words(words + (0,) * pad if pad else words, length, seed)
    elif byteorder != "big":
        raise ValueError(f"byteorder must be 'little' or 'big', not {byteorder!r}")
    blocks = (length - 1) // 12
    head = 12 * blocks
    fmt = "<" if byteorder == "little" else ">"
    head_words = struct.unpack(f"{fmt}{3 * blocks}I", key[:head])
    tail_words = struct.unpack("<3I", key[head:].ljust(12, b"\0"))
    return _jhash_words(head_words + tail_words, length, seed)


def nft_bucket(
    key: bytes,
    modulus: int,
    seed: int,
    offset: int = 0,
    *,
    byteorder: ByteOrder = HOST_BYTEORDER,
) -> int:
    """The value nft's ``jhash <key> mod modulus seed seed offset offset`` gives for ``key``.

    ``key`` is the register content (see :func:`flow_key`). As in the kernel, ``modulus`` is a
    u32 greater than 1 and ``offset + modulus - 1`` must fit in a u32. The result is
    ``reciprocal_scale(jhash(key, seed), modulus) + offset``.
    """
    if not 1 < modulus <= _M32 or offset < 0 or offset + modulus - 1 > _M32:
        raise ValueError(f"modulus {modulus} / offset {offset} out of the kernel's range")
    return ((jhash(key, seed, byteorder=byteorder) * modulus) >> 32) + offset


def flow_key(src: bytes, dst: bytes, sport: int, dport: int, l4proto: int | None = None) -> bytes:
    """The register bytes nft hashes for ``[meta l4proto .] ip[6] saddr . ip[6] daddr . th sport .
    th dport``: 16 bytes (IPv4), 40 bytes (IPv6), 4 more with ``l4proto``.

    Addresses are packed (4 or 16 bytes, both the same family); ports and ``l4proto`` are ints.
    Example: 198.18.0.1 -> 203.0.113.5, 12345 -> 443 gives ``c6120001 cb007105 30390000
    01bb0000``.
    """
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError("src and dst must both be 4 (IPv4) or 16 (IPv6) bytes")
    try:
        if len(src) == 4:
            if l4proto is None:
                return _KEY4.pack(src, dst, sport, dport)
            return _KEY4P.pack(l4proto, src, dst, sport, dport)
        if l4proto is None:
            return _KEY6.pack(src, dst, sport, dport)
        return _KEY6P.pack(l4proto, src, dst, sport, dport)
    except struct.error as exc:
        raise ValueError(f"port or l4proto out of range: {exc}") from None


def flow_bucket(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    modulus: int,
    seed: int,
    *,
    l4proto: int | None = None,
    offset: int = 0,
) -> int:
    """``nft_bucket(flow_key(src, dst, sport, dport, l4proto), modulus, seed, offset)``: the
    bucket nft's ``jhash [meta l4proto .] ip saddr . ip daddr . th sport . th dport mod modulus
    seed seed offset offset`` gives this flow."""
    return nft_bucket(flow_key(src, dst, sport, dport, l4proto), modulus, seed, offset)
