"""Property tests of the Maglev pure core (meridio.core.maglev)."""

from __future__ import annotations

import hashlib
import math
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meridio.core import maglev
from meridio.core.maglev import (
    DEFAULT_MAX_TARGETS,
    MAX_IDENTIFIER,
    NO_TARGET,
    MaglevTable,
    build_table,
    default_table_size,
    flow_hash,
    flow_hasher,
    is_prime,
    permutation,
    smallest_prime_at_least,
)

M = 65537  # the paper's default table size, and ours for the disruption goals

# Builds take milliseconds but the host may be busy: no per-example deadline.
FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

identifiers = st.integers(min_value=1, max_value=MAX_IDENTIFIER)


def target_sets(min_size: int, max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(identifiers, min_size=min_size, max_size=max_size, unique=True)


def changed_fraction(a: MaglevTable, b: MaglevTable) -> float:
    return int(np.count_nonzero(a.entries != b.entries)) / a.size


# ----------------------------------------------------------------------------------------------
# Prime helpers
# ----------------------------------------------------------------------------------------------


def _sieve(limit: int) -> list[bool]:
    flags = [True] * (limit + 1)
    flags[0] = flags[1] = False
    for i in range(2, math.isqrt(limit) + 1):
        if flags[i]:
            flags[i * i :: i] = [False] * len(flags[i * i :: i])
    return flags


def test_is_prime_matches_a_sieve() -> None:
    flags = _sieve(20000)
    assert [n for n in range(20001) if is_prime(n)] == [n for n, p in enumerate(flags) if p]
    assert not is_prime(-7)


@FAST
@given(st.integers(min_value=-10, max_value=2_000_000))
def test_smallest_prime_at_least(n: int) -> None:
    p = smallest_prime_at_least(n)
    assert p >= max(n, 2)
    assert is_prime(p)
    assert all(not is_prime(k) for k in range(max(n, 2), p))


def test_known_primes_and_default_size() -> None:
    assert smallest_prime_at_least(65537) == 65537  # the paper's M is prime
    assert smallest_prime_at_least(655373) == 655373
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1)
    assert is_prime(3_825_123_056_546_413_051) is False  # a strong pseudoprime to bases 2..23
    assert DEFAULT_MAX_TARGETS == 100
    assert default_table_size() == 10007  # smallest prime >= 100 * 100
    assert default_table_size(1000) == 100003
    assert default_table_size(1) == 101
    with pytest.raises(ValueError):
        default_table_size(0)


# ----------------------------------------------------------------------------------------------
# Preference lists and determinism
# ----------------------------------------------------------------------------------------------


@FAST
@given(identifiers, st.sampled_from([2, 3, 7, 13, 10007, 65537, 655373]))
def test_permutation_parameters(identity: int, size: int) -> None:
    offset, skip = permutation(identity, size)
    assert 0 <= offset < size
    assert 1 <= skip < size  # coprime with the prime size: the list visits every slot
    assert permutation(str(identity), size) == (offset, skip)  # identity is its str()
    key = hashlib.blake2b(str(identity).encode(), digest_size=16, key=maglev.TABLE_KEY).digest()
    assert offset == int.from_bytes(key[:8], "little") % size
    assert skip == int.from_bytes(key[8:], "little") % (size - 1) + 1


def test_golden_digest() -> None:
    # Pinned so that a change of key, hash or turn order, which would make LB instances of
    # different versions disagree, cannot go unnoticed.
    expected = "8899cf8ade7c8011040fdb60f5dcabfa786b39a535a0d3a264c8b9d4ec88e0f2"
    assert build_table(range(1, 11), 10007).digest() == expected
    assert maglev._build_reference(range(1, 11), 10007).digest() == expected
    assert build_table([3, 1, 2], 13).entries.tolist() == [3, 2, 2, 1, 2, 3, 1, 2, 3, 1, 3, 1, 1]


@SLOW
@given(target_sets(1, 1200), st.randoms(use_true_random=False))
def test_order_and_duplicates_do_not_matter(targets: list[int], rnd: random.Random) -> None:
    table = build_table(targets, M)
    shuffled = targets + rnd.sample(targets, min(len(targets), 5))  # with duplicates
    rnd.shuffle(shuffled)
    other = build_table(iter(shuffled), M)
    assert other.digest() == table.digest()
    assert other == table and hash(other) == hash(table)
    assert other.targets == tuple(sorted(targets))


def test_same_digest_in_another_process() -> None:
    # 700 targets go through the round engine, the first 50 through the scalar loop.
    targets = random.Random(5).sample(range(1, 100_000), 700)
    size = 65537
    code = (
        "import sys\n"
        "from meridio.core.maglev import build_table\n"
        "ids = [int(x) for x in sys.stdin.read().split()]\n"
        f"print(build_table(reversed(ids), {size}).digest())\n"
        f"print(build_table(ids[49::-1], {size}).digest())\n"
    )
    # A different hash seed too: nothing may depend on Python's per-process hash randomisation.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=" ".join(map(str, targets)),
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    expected = [build_table(targets, size).digest(), build_table(targets[:50], size).digest()]
    assert out.stdout.split() == expected


# ----------------------------------------------------------------------------------------------
# The fast build is the paper's algorithm
# ----------------------------------------------------------------------------------------------

# Small sizes (the endgame is the last 2 * sqrt(M) turns) and, below, numbers of targets around
# the engine switch (320), including more targets than slots.
small_sizes = st.sampled_from([2, 3, 7, 13, 101, 509, 521, 1009, 2003, 4099])


@settings(max_examples=150, deadline=None)
@given(small_sizes, st.integers(min_value=0, max_value=1500), st.randoms(use_true_random=False))
def test_fast_build_equals_reference_small(size: int, n: int, rnd: random.Random) -> None:
    targets = rnd.sample(range(1, MAX_IDENTIFIER), n)
    assert build_table(targets, size) == maglev._build_reference(targets, size)


@SLOW
@given(st.sampled_from([2, 17, 150, 319, 320, 700, 1000, 3000]), st.randoms(use_true_random=False))
def test_fast_build_equals_reference_full_size(n: int, rnd: random.Random) -> None:
    targets = rnd.sample(range(1, MAX_IDENTIFIER), n)
    assert build_table(targets, M).digest() == maglev._build_reference(targets, M).digest()


def test_both_engines_equal_reference() -> None:
    # Each fast engine, forced on inputs the dispatch would give to the other one.
    rnd = random.Random(3)
    for n in (2, 40, 400):
        params = [permutation(t, 4099) for t in rnd.sample(range(1, 10**6), n)]
        offsets = np.array([p[0] for p in params], dtype=np.int64)
        skips = np.array([p[1] for p in params], dtype=np.int64)
        expected = maglev._populate_reference(offsets.tolist(), skips.tolist(), 4099)
        for engine in (maglev._rounds, maglev._scalar):
            owner = np.full(4099, -1, dtype=np.int32)
            cur = offsets.copy()
            engine(owner, cur, skips, 4099, 3000)
            maglev._endgame(owner, cur, skips, n, 4099, 3000)
            assert owner.tolist() == expected, (engine.__name__, n)


def test_hand_worked_example() -> None:
    # M = 7; lists: A (offset 3, skip 4) = 3 0 4 1 5 2 6, B (0, 2) = 0 2 4 6 1 3 5,
    # C (3, 1) = 3 4 5 6 0 1 2. Round 1: A takes 3, B 0, C 4 (3 is taken). Round 2: A 1, B 2,
    # C 5. Round 3: A 6. Without B: A 3, C 4, A 0, C 5, A 1, C 6, A 2.
    for offsets, skips, expected in (([3, 0, 3], [4, 2, 1], [1, 0, 1, 0, 2, 2, 0]),
                                     ([3, 3], [4, 1], [0, 0, 0, 0, 1, 1, 1])):  # fmt: skip
        assert maglev._populate_reference(offsets, skips, 7) == expected
        fast = maglev._populate_fast(np.array(offsets), np.array(skips), 7)
        assert fast.tolist() == expected


# ----------------------------------------------------------------------------------------------
# Quality: balance and disruption (reference/load-balancing.md, sections 5 and 6)
# ----------------------------------------------------------------------------------------------


@SLOW
@given(st.integers(min_value=1, max_value=M // 100), st.randoms(use_true_random=False))
def test_balance(n: int, rnd: random.Random) -> None:
    targets = rnd.sample(range(1, MAX_IDENTIFIER), n)
    table = build_table(targets, M)
    counts = table.counts()
    assert set(counts) == set(targets)  # every target is in the table
    assert set(counts.values()) <= {M // n, -(-M // n)}  # floor(M/N) or ceil(M/N) each
    assert max(counts.values()) / (M / n) <= 1 + n / M


@FAST
@given(small_sizes, target_sets(1, 300))
def test_balance_any_size(size: int, targets: list[int]) -> None:
    counts = build_table(targets, size).counts()
    n = len(targets)
    assert sum(counts.values()) == size
    if n <= size:
        assert set(counts) == set(targets)
        assert set(counts.values()) <= {size // n, -(-size // n)}
    else:  # only the first `size` targets in turn order get a turn
        assert set(counts) == set(sorted(targets)[:size])


def _one_removed_and_one_added(targets: list[int], rnd: random.Random) -> tuple[float, float]:
    n = len(targets) - 1
    base = build_table(targets[:n], M)
    removed = rnd.choice(targets[:n])
    without = build_table([t for t in targets[:n] if t != removed], M)
    with_one_more = build_table(targets, M)
    return changed_fraction(base, without) - 1 / n, changed_fraction(base, with_one_more) - 1 / n


@pytest.mark.parametrize("n", [100, 1000])
def test_disruption_goal(n: int) -> None:
    # Goal 2 of the reference: remove-1 and add-1 change at most 1/N + 0.7 % at M = 65537, as the
    # reference measured it: the mean over random removals and additions, at N = 100 and 1000.
    # (A single removal can exceed it: 0.9 % was seen at N = 91; see the test below.)
    rnd = random.Random(n)
    runs = [_one_removed_and_one_added(rnd.sample(range(1, 10**6), n + 1), rnd) for _ in range(5)]
    assert sum(r for r, _ in runs) / len(runs) <= 0.007
    assert sum(a for _, a in runs) / len(runs) <= 0.007


@SLOW
@given(st.integers(min_value=2, max_value=1000), st.randoms(use_true_random=False))
def test_disruption_any_n(n: int, rnd: random.Random) -> None:
    # A single removal or addition, any N: the paper's algorithm moves more than the mean. At
    # M = 65537 its excess churn (changed share beyond 1/N) peaks near 1.0 % around N = 400, and
    # a single change exceeds 0.7 % now and then even below N = 100. This is the algorithm, not
    # the implementation: the reference implementation builds the same tables.
    targets = rnd.sample(range(1, 10**6), n + 1)
    excess_removed, excess_added = _one_removed_and_one_added(targets, rnd)
    assert excess_removed <= 0.012
    assert excess_added <= 0.012


# ----------------------------------------------------------------------------------------------
# The table object
# ----------------------------------------------------------------------------------------------


@FAST
@given(small_sizes, target_sets(0, 60), st.integers(min_value=0, max_value=2**64 - 1))
def test_entries_lookup_and_membership(size: int, targets: list[int], h: int) -> None:
    table = build_table(targets, size)
    assert table.size == size and table.entries.shape == (size,)
    assert table.entries.dtype == np.uint32
    members = set(targets) if targets else {NO_TARGET}
    assert set(table.entries.tolist()) <= members
    assert table.lookup(h) == int(table.entries[h % size])
    with pytest.raises(ValueError):
        table.entries[0] = 1  # immutable


def test_empty_set_means_no_target() -> None:
    table = build_table([], 10007)
    assert not table.entries.any()
    assert table.counts() == {}
    assert table.lookup(12345) == NO_TARGET == 0
    assert table == maglev._build_reference([], 10007)


def test_digest_is_sha256_of_size_and_little_endian_entries() -> None:
    table = build_table([7, 8, 9], 13)
    raw = struct.pack("<I", 13) + struct.pack("<13I", *table.entries.tolist())
    assert table.to_bytes() == raw
    assert table.digest() == hashlib.sha256(raw).hexdigest()
    assert table.digest() != build_table([7, 8, 9], 17).digest()


@FAST
@given(target_sets(1, 40), target_sets(0, 40))
def test_diff_applies(before: list[int], after: list[int]) -> None:
    old, new = build_table(before, 1009), build_table(after, 1009)
    changes = old.diff(new)
    patched = old.entries.copy()
    for index, value in changes:
        patched[index] = value
    assert np.array_equal(patched, new.entries)
    assert [i for i, _ in changes] == sorted({i for i, _ in changes})
    assert len(changes) == int(np.count_nonzero(old.entries != new.entries))
    assert old.diff(old) == []


def test_diff_needs_same_size() -> None:
    with pytest.raises(ValueError):
        build_table([1], 7).diff(build_table([1], 11))


def test_invalid_inputs() -> None:
    for size in (0, 1, 4, 65536, 2**31 + 11):
        with pytest.raises(ValueError):
            build_table([1], size)
    for bad in (0, -1, MAX_IDENTIFIER + 1):
        with pytest.raises(ValueError):
            build_table([bad], 7)
    for wrong in (True, 1.0, "1", None):
        with pytest.raises(TypeError):
            build_table([wrong], 7)  # type: ignore[list-item]
    assert build_table([np.uint16(5)], 7) == build_table([5], 7)


# ----------------------------------------------------------------------------------------------
# Flow hash
# ----------------------------------------------------------------------------------------------

KEY = b"meridio-test-key"
flow_fields = st.tuples(
    st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=0, max_value=65535),
    st.integers(min_value=0, max_value=65535),
)


@FAST
@given(flow_fields, st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16))
def test_flow_hash_is_deterministic_and_keyed(
    fields: tuple[bytes, int, int, int], dst: bytes
) -> None:
    src, proto, sport, dport = fields
    h = flow_hash(src, dst, proto, sport, dport, KEY)
    assert 0 <= h < 2**64
    assert h == flow_hasher(KEY)(src, dst, proto, sport, dport)
    message = src + dst + struct.pack("!BHH", proto, sport, dport)
    digest = hashlib.blake2s(message, digest_size=8, key=KEY).digest()
    assert h == int.from_bytes(digest, "little")  # the documented construction
    assert h != flow_hash(src, dst, proto, sport, dport, KEY + b"2")
    assert h != flow_hash(src, dst, proto, sport ^ 1, dport, KEY)
    assert h != flow_hash(src, dst, proto, sport, dport ^ 0x100, KEY)


def test_flow_hash_in_another_process() -> None:
    code = (
        "from meridio.core.maglev import flow_hash\n"
        "print(flow_hash(bytes([198, 18, 0, 1]), bytes([203, 0, 113, 5]), 6, 40000, 80,"
        " b'meridio-test-key'))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "99"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    expected = flow_hash(bytes([198, 18, 0, 1]), bytes([203, 0, 113, 5]), 6, 40000, 80, KEY)
    assert int(out.stdout) == expected


def test_flow_hash_spreads_flows_over_the_table() -> None:
    # 100 000 flows differing only in the source port and address: the flows per target should
    # look like a multinomial draw (Maglev's own balance is exact, so any skew is the hash's).
    table = build_table(range(1, 101), 10007)
    hasher = flow_hasher(KEY)
    dst = bytes([203, 0, 113, 5])
    counts = np.zeros(101, dtype=np.int64)
    flows = 0
    for a in range(4):
        src = bytes([198, 18, 0, a])
        for port in range(1024, 1024 + 25_000):
            counts[table.lookup(hasher(src, dst, 6, port, 443))] += 1
            flows += 1
    per_target = counts[1:]
    mean = flows / 100
    chi2 = float(((per_target - mean) ** 2 / mean).sum())
    assert chi2 < 160  # 99 degrees of freedom: P(chi2 > 160) is about 1e-4
    assert per_target.max() / mean < 1.1
    # Low bits and high bits of the hash both look uniform.
    hashes = np.array([hasher(bytes(4), dst, 17, p, 53) for p in range(20_000)], dtype=np.uint64)
    assert abs(float(np.mean(hashes & np.uint64(1))) - 0.5) < 0.02
    assert abs(float(np.mean(hashes >> np.uint64(63))) - 0.5) < 0.02
