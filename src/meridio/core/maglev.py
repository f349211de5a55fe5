"""Maglev consistent hashing: the lookup table, pure and deterministic.

This is the pure core behind every load-balancer data path (NFQUEUE in user space, an nftables
map, or the first-packet-only mode): the table is computed here, once per change of the target
set, and applied elsewhere. Nothing in this module does I/O or reads a clock.

The algorithm is the one in the Maglev paper (Eisenbud et al., NSDI 2016, section 3.4,
Pseudocode 1):

* The table has ``M`` entries, ``M`` prime. Each target gets a preference list, the permutation
  ``slot(j) = (offset + j * skip) mod M`` with ``offset = h1 mod M`` and
  ``skip = h2 mod (M - 1) + 1``; because ``M`` is prime every ``skip`` is coprime with it and the
  list visits every slot once.
* Targets take turns in a fixed order. On its turn a target claims the first slot of its list that
  is still empty. Turns go round until all ``M`` slots are full, so every target ends up with
  ``floor(M/N)`` or ``ceil(M/N)`` entries.

Determinism across load-balancer instances is the point of the exercise, so:

* ``h1`` and ``h2`` are the two halves of a keyed BLAKE2b digest of the target's *identity* (its
  identifier within the stream, ``str()``-ed and UTF-8 encoded) under :data:`TABLE_KEY`. They never
  depend on insertion order, slot indices or a random generator.
* Turn order is the targets' identities in ascending order, so the same set gives a byte-identical
  table whatever order the targets arrived in, in every process and on every host.

Two implementations of the population produce the same table:

* :func:`_build_reference` is Pseudocode 1 written out in plain Python. Tests and the benchmark
  use it as the yardstick.
* :func:`build_table` computes the same thing faster (see :func:`_populate_fast`): with many
  targets it settles a whole round of turns at once with numpy (deferred acceptance, which gives
  the same outcome as taking the turns one by one), and for the last few hundred turns, where the
  paper's loop spends most of its time skipping filled slots, it computes each empty slot's
  position in the lists directly. The property tests check on random inputs that both give
  byte-identical tables.

A table entry holds the identifier of the target that owns the slot. ``0`` is never a valid
identifier and means "no target": it fills the whole table when the target set is empty.
"""

from __future__ import annotations

import hashlib
import math
import struct
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_MAX_TARGETS",
    "MAX_IDENTIFIER",
    "NO_TARGET",
    "TABLE_KEY",
    "FlowHasher",
    "MaglevTable",
    "build_table",
    "default_table_size",
    "flow_hash",
    "flow_hasher",
    "is_prime",
    "permutation",
    "smallest_prime_at_least",
]

TABLE_KEY: Final[bytes] = b"meridio/maglev/table/v1"
"""Key of the BLAKE2b hash that turns a target identity into its ``(offset, skip)`` pair.

It is public and fixed: its job is determinism and domain separation, not secrecy. Every LB
instance must use the same key, and changing it reshuffles every table, so a new value needs a
new version suffix.
"""

DEFAULT_MAX_TARGETS: Final[int] = 100
"""Default maximum number of targets in a stream (Meridio's ``max-targets``)."""

NO_TARGET: Final[int] = 0
"""Table entry meaning "no target": the whole table holds it when the target set is empty."""

MAX_IDENTIFIER: Final[int] = 2**32 - 1
"""Largest target identifier a table can hold (entries are unsigned 32-bit integers)."""

_MAX_SIZE: Final[int] = 2**31 - 2
"""Largest table size: slots are int32 while building, and products of two slots fit in int64."""

# --------------------------------------------------------------------------------------------
# Table size helpers
# --------------------------------------------------------------------------------------------

# Deterministic Miller-Rabin bases: correct for every n < 3.3e24.
_MR_BASES: Final[tuple[int, ...]] = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Return True if ``n`` is prime (deterministic Miller-Rabin, exact for n < 3.3e24)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def smallest_prime_at_least(n: int) -> int:
    """Return the smallest prime ``p >= n`` (2 for any ``n <= 2``)."""
    if n <= 2:
        return 2
    p = n if n % 2 else n + 1
    while not is_prime(p):
        p += 2
    return p


def default_table_size(max_targets: int = DEFAULT_MAX_TARGETS) -> int:
    """Table size for a stream: the smallest prime ``>= 100 * max_targets``.

    The factor 100 is the paper's rule: with ``M > 100 * N`` no target gets more than 1 % more
    entries than another. ``max_targets`` defaults to 100, which gives 10007.
    """
    if max_targets < 1:
        raise ValueError(f"max_targets must be >= 1, got {max_targets}")
    return smallest_prime_at_least(100 * max_targets)


# --------------------------------------------------------------------------------------------
# Preference lists
# --------------------------------------------------------------------------------------------


def permutation(identity: int | str, size: int) -> tuple[int, int]:
    """Return ``(offset, skip)`` of the preference list of ``identity`` in a table of ``size``.

    ``identity`` is the target identifier (any value whose ``str()`` names it; ``7`` and ``"7"``
    are the same target). The list is ``slot(j) = (offset + j * skip) % size``.
    """
    digest = hashlib.blake2b(str(identity).encode("utf-8"), digest_size=16, key=TABLE_KEY).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    return h1 % size, h2 % (size - 1) + 1


def _canonical_targets(identifiers: Iterable[int]) -> tuple[int, ...]:
    """Validate identifiers and return them de-duplicated in turn order (ascending)."""
    seen: set[int] = set()
    for ident in identifiers:
        if isinstance(ident, bool) or not isinstance(ident, int | np.integer):
            raise TypeError(f"target identifiers are integers, got {ident!r}")
        value = int(ident)
        if not 1 <= value <= MAX_IDENTIFIER:
            raise ValueError(f"target identifier {value} outside 1..{MAX_IDENTIFIER}")
        seen.add(value)
    return tuple(sorted(seen))


def _check_size(size: int) -> None:
    if not 2 <= size <= _MAX_SIZE or not is_prime(size):
        raise ValueError(f"table size must be a prime in 2..{_MAX_SIZE}, got {size}")


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

_U32 = npt.NDArray[np.uint32]
_I64 = npt.NDArray[np.int64]
_I32 = npt.NDArray[np.int32]


@dataclass(frozen=True, eq=False)
class MaglevTable:
    """An immutable Maglev lookup table.

    ``entries[i]`` is the identifier of the target owning slot ``i`` (:data:`NO_TARGET` when the
    target set is empty). ``targets`` is the target set in turn order (ascending).
    """

    size: int
    targets: tuple[int, ...]
    entries: _U32
    _lut: array[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        entries = np.array(self.entries, dtype=np.uint32, copy=True)
        if entries.shape != (self.size,):
            raise ValueError(f"entries must have shape ({self.size},), got {entries.shape}")
        entries.setflags(write=False)
        object.__setattr__(self, "entries", entries)
        # A copy as array('I'): indexing it from Python returns a plain int and costs a fraction
        # of indexing the numpy array (which builds a numpy scalar), for the per-packet lookup.
        lut = array("I")
        lut.frombytes(entries.tobytes())
        object.__setattr__(self, "_lut", lut)

    def lookup(self, hash_value: int) -> int:
        """Return the target identifier for a flow hash (the entry at ``hash_value % size``)."""
        return self._lut[hash_value % self.size]

    def counts(self) -> dict[int, int]:
        """Return the number of entries of each target (targets without entries are omitted)."""
        values, counts = np.unique(self.entries, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != NO_TARGET}

    def to_bytes(self) -> bytes:
        """The canonical serialisation: ``size`` then every entry, all little-endian uint32."""
        return struct.pack("<I", self.size) + self.entries.astype("<u4", copy=False).tobytes()

    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`to_bytes`: equal digests mean byte-identical tables."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def diff(self, other: MaglevTable) -> list[tuple[int, int]]:
        """Return ``(index, new_value)`` for every entry that differs in ``other``.

        This is what an nftables map needs to move from this table to ``other`` without
        rewriting unchanged elements. Both tables must have the same size.
        """
        if other.size != self.size:
            raise ValueError(f"cannot diff tables of sizes {self.size} and {other.size}")
        changed = np.flatnonzero(self.entries != other.entries)
        return list(zip(changed.tolist(), other.entries[changed].tolist(), strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaglevTable):
            return NotImplemented
        return self.size == other.size and bool(np.array_equal(self.entries, other.entries))

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        digest = self.digest()[:16]
        return f"MaglevTable(size={self.size}, targets={len(self.targets)}, digest={digest})"


def build_table(identifiers: Iterable[int], size: int) -> MaglevTable:
    """Build the Maglev table of ``size`` entries (a prime) for a set of target identifiers.

    Identifiers are integers in ``1..MAX_IDENTIFIER``; duplicates are ignored and the order is
    irrelevant. An empty set gives a table full of :data:`NO_TARGET`.
    """
    _check_size(size)
    targets = _canonical_targets(identifiers)
    if not targets:
        return MaglevTable(size, targets, np.zeros(size, dtype=np.uint32))
    if len(targets) == 1:
        return MaglevTable(size, targets, np.full(size, targets[0], dtype=np.uint32))
    params = [permutation(t, size) for t in targets]
    offsets = np.array([p[0] for p in params], dtype=np.int64)
    skips = np.array([p[1] for p in params], dtype=np.int64)
    owner = _populate_fast(offsets, skips, size)
    ids = np.array(targets, dtype=np.uint32)
    return MaglevTable(size, targets, ids[owner])


def _build_reference(identifiers: Iterable[int], size: int) -> MaglevTable:
    """Build the same table as :func:`build_table` with the paper's loop in plain Python."""
    _check_size(size)
    targets = _canonical_targets(identifiers)
    if not targets:
        return MaglevTable(size, targets, np.zeros(size, dtype=np.uint32))
    params = [permutation(t, size) for t in targets]
    owner = _populate_reference([p[0] for p in params], [p[1] for p in params], size)
    entries = np.array([targets[i] for i in owner], dtype=np.uint32)
    return MaglevTable(size, targets, entries)


# --------------------------------------------------------------------------------------------
# Population: the reference
# --------------------------------------------------------------------------------------------


def _populate_reference(offsets: list[int], skips: list[int], size: int) -> list[int]:
    """Pseudocode 1 of the paper. Returns the owner (index into the targets) of every slot."""
    n = len(offsets)
    owner = [-1] * size
    nxt = list(offsets)  # slot at each target's pointer
    filled = 0
    while True:
        for i in range(n):
            c = nxt[i]
            s = skips[i]
            while owner[c] >= 0:
                c += s
                if c >= size:
                    c -= size
            owner[c] = i
            c += s
            if c >= size:
                c -= size
            nxt[i] = c
            filled += 1
            if filled == size:
                return owner


# --------------------------------------------------------------------------------------------
# Population: the fast equivalent
# --------------------------------------------------------------------------------------------

_EMPTY: Final[int] = 2**31 - 1
"""Marker of an empty slot in the round engine's claim array (above any agent number)."""

_TAKEN: Final[int] = -1
"""Marker of a slot claimed in an earlier round (below any agent number)."""


def _endgame_turns(size: int) -> int:
    """Turns left to the endgame, which finds slots by list position instead of scanning lists.

    With ``f`` empty slots left, a turn scans about ``size / f`` list positions, while the
    endgame computes ``f`` positions per turn: they cost the same near ``f = sqrt(size)``. Twice
    that measured best (512 turns at M = 65537).
    """
    return min(size, 2 * math.isqrt(size))


_ENDGAME_BATCH: Final[int] = 32
"""Turns per endgame batch."""

_ROUNDS_MIN_TARGETS: Final[int] = 320
"""From this many targets on, the round engine beats the scalar loop.

A vectorised round costs about as much as 330 turns of the Python loop, whatever ``M`` (measured
at M = 10007, 65537 and 655373), so rounds win when they hold more turns than that.
"""


def _populate_fast(offsets: _I64, skips: _I64, size: int) -> _I64:
    """Return the owner (index into the targets) of every slot, exactly as the reference would.

    Two observations make the paper's loop cheaper without changing its result:

    * Round by round, the paper's loop is a serial dictatorship: within a round, target ``i``
      takes its best empty slot after targets ``0 .. i-1`` took theirs. Deferred acceptance
      (Gale-Shapley) with every slot preferring lower turn numbers computes the same outcome in
      parallel steps, whatever order the proposals come in, so a round can be vectorised
      (:func:`_rounds`). That pays off when rounds are few, i.e. with many targets.
    * Near the end, a turn scans about ``M / free`` filled slots before it finds an empty one,
      which dominates the cost of the loop. With few empty slots left, it is cheaper to compute
      each empty slot's position in the target's list directly (:func:`_endgame`).

    With fewer targets the paper's loop runs as is up to the endgame (:func:`_scalar`).
    """
    n = int(offsets.size)
    owner: _I32 = np.full(size, -1, dtype=np.int32)
    cur = offsets.copy()  # the slot at each target's pointer: the next one it will examine
    t0 = size - _endgame_turns(size)  # turns before the endgame
    if t0:
        if n >= _ROUNDS_MIN_TARGETS:
            _rounds(owner, cur, skips, size, t0)
        else:
            _scalar(owner, cur, skips, size, t0)
    _endgame(owner, cur, skips, n, size, t0)
    return owner.astype(np.int64)


def _scalar(owner: _I32, cur: _I64, skips: _I64, size: int, turns: int) -> None:
    """Play the first ``turns`` turns with the paper's loop (as :func:`_populate_reference`)."""
    n = int(cur.size)
    own = [-1] * size
    nxt: list[int] = cur.tolist()
    skip: list[int] = skips.tolist()
    done = 0
    while done < turns:
        k = min(n, turns - done)
        for i in range(k):
            c = nxt[i]
            s = skip[i]
            while own[c] >= 0:
                c += s
                if c >= size:
                    c -= size
            own[c] = i
            c += s
            if c >= size:
                c -= size
            nxt[i] = c
        done += k
    owner[:] = own
    cur[:] = nxt


def _rounds(owner: _I32, cur: _I64, skips: _I64, size: int, turns: int) -> None:
    """Play the first ``turns`` turns, one vectorised round at a time.

    A round is settled by deferred acceptance. Every agent (the round's turns, numbered by target
    index) proposes to the first slot of its list, from its pointer, whose holder has a higher
    number (empty slots count as ``_EMPTY``, slots of earlier rounds as ``_TAKEN``). Each slot
    keeps its lowest-numbered proposer; rejected and displaced agents propose again further down
    their lists, until nobody moves. Agents only skip slots held by lower numbers, and holders
    only ever improve, so the outcome is the serial-dictatorship one: the paper's.
    """
    n = int(cur.size)
    claim: _I32 = np.full(size, _EMPTY, dtype=np.int32)
    done = 0
    while done < turns:
        a = min(n, turns - done)
        free = size - done
        agents: _I64 = np.arange(a, dtype=np.int64)
        number = agents.astype(np.int32)
        step = skips[:a]
        cand = _scan(claim, cur[:a], step, number, free / size, size, 2.0)
        np.minimum.at(claim, cand, number)
        won = claim[cand] == number
        slot = cand
        if not won.all():
            slot = cand.copy()
            held = int(won.sum())
            pend = agents[~won]
            at = cand[~won]
            while pend.size:
                # Pending agents resume after the slot they lost. Slots held this round by
                # higher numbers are acceptable to them too: about free - held / 2 slots.
                pnum = pend.astype(np.int32)
                pstep = skips[pend]
                density = min(1.0, (free - held / 2) / size)
                cand = _scan(claim, (at + pstep) % size, pstep, pnum, density, size, 0.0)
                old = claim[cand]
                np.minimum.at(claim, cand, pnum)
                won = claim[cand] == pnum
                slot[pend[won]] = cand[won]
                prev = old[won]
                held += int(np.count_nonzero(prev == _EMPTY))
                displaced = prev[prev != _EMPTY].astype(np.int64)
                pend = np.concatenate([pend[~won], displaced])
                at = np.concatenate([cand[~won], slot[displaced]])
        owner[slot] = number
        claim[slot] = _TAKEN
        cur[:a] = (slot + step) % size
        done += a


def _scan(
    claim: _I32,
    start: _I64,
    step: _I64,
    number: _I32,
    density: float,
    size: int,
    spread: float,
) -> _I64:
    """For each row, the first slot of ``start, start + step, ...`` with ``claim > number``.

    Scans a window of list positions at once. ``density`` (the fraction of acceptable slots)
    sizes the window so that most rows finish in it: ``spread`` expected hits per row when there
    are many rows, otherwise enough for every row to finish with 90 % probability. Rows that come
    up short scan the next window.
    """
    out: _I64 = np.empty(start.size, dtype=np.int64)
    rows: _I64 = np.arange(start.size, dtype=np.int64)
    base = start
    log_miss = math.inf if density >= 1.0 else -math.log1p(-max(density, 1.0 / size))
    scanned = 0
    while True:
        if scanned > size:  # every list holds an acceptable slot: this would be a bug
            raise AssertionError("Maglev population scanned a whole list without a free slot")
        count = int(rows.size)
        if log_miss == math.inf:
            width = 1
        else:
            hits = spread if spread and count > 64 else math.log(count / 0.1 + 1.0)
            width = max(1, min(size, math.ceil(hits / log_miss)))
        rstep = step[rows]
        slots = np.multiply.outer(rstep, np.arange(width, dtype=np.int64))
        slots += base[:, None]
        slots %= size
        ok = claim[slots] > number[rows][:, None]
        first = ok.argmax(axis=1)
        line = np.arange(count)
        hit = ok[line, first]
        out[rows[hit]] = slots[line, first][hit]
        if hit.all():
            return out
        miss = ~hit
        rows = rows[miss]
        base = (base[miss] + width * rstep[miss]) % size
        scanned += width
        spread = 0.0


def _mod_inverse(values: _I64, size: int) -> _I64:
    """Inverses modulo the prime ``size`` (Fermat: ``v ** (size - 2)``), vectorised."""
    result: _I64 = np.ones_like(values)
    base = values % size
    e = size - 2
    while e:
        if e & 1:
            result = result * base % size
        base = base * base % size
        e >>= 1
    return result


def _endgame(owner: _I32, cur: _I64, skips: _I64, n: int, size: int, t0: int) -> None:
    """Play the last turns, ``t0 .. size - 1``, when few empty slots are left.

    A target's next claim is the empty slot with the smallest position in its list, and the
    position of slot ``x`` is ``(x - pointer) * skip^-1 mod size``. A batch of turns computes, for
    each of its targets, the positions of all empty slots at once; a short Python pass then hands
    out slots in turn order. A target whose best slot an earlier turn of the batch took walks down
    its positions in order (positions from the old pointer keep their order).
    """
    if t0 >= size:
        return
    free: _I64 = np.flatnonzero(owner < 0).astype(np.int64)
    skip_l: list[int] = skips.tolist()
    inverse: dict[int, int] = {}
    while t0 < size:
        k = min(_ENDGAME_BATCH, size - t0)
        batch = [(t0 + i) % n for i in range(k)]
        distinct = sorted(set(batch))
        row_of = {t: j for j, t in enumerate(distinct)}
        fresh = [t for t in distinct if t not in inverse]
        if fresh:
            inv_new = _mod_inverse(skips[np.array(fresh, dtype=np.int64)], size).tolist()
            inverse.update(zip(fresh, inv_new, strict=True))
        targets = np.array(distinct, dtype=np.int64)
        inv = np.array([inverse[t] for t in distinct], dtype=np.int64)
        position = (free[None, :] - cur[targets][:, None]) * inv[:, None] % size
        best: list[int] = position.argmin(axis=1).tolist()
        walks: dict[int, tuple[list[int], int]] = {}
        taken: set[int] = set()
        picks: list[int] = []
        for t in batch:
            j = row_of[t]
            b = best[j]
            if b in taken:
                order, at = walks.get(j) or (np.argsort(position[j]).tolist(), 0)
                while order[at] in taken:
                    at += 1
                walks[j] = (order, at)
                b = order[at]
            taken.add(b)
            picks.append(b)
            x = int(free[b])
            owner[x] = t
            cur[t] = (x + skip_l[t]) % size
        free = np.delete(free, picks)
        t0 += k


# --------------------------------------------------------------------------------------------
# Flow hash for the user-space packet path
# --------------------------------------------------------------------------------------------

_PORTS = struct.Struct("!BHH")

FlowHasher = Callable[[bytes, bytes, int, int, int], int]


@lru_cache(maxsize=16)
def flow_hasher(key: bytes) -> FlowHasher:
    """Return ``hash(src, dst, proto, sport, dport) -> int`` keyed with ``key`` (<= 32 bytes).

    The hash is BLAKE2s with an 8-byte digest, keyed, over ``src + dst + proto (1 byte) +
    sport (2) + dport (2)``, read as a little-endian integer. Every LB instance of a stream uses
    the same key, so a flow maps to the same entry on all of them (ECMP may send its packets to
    any instance); a secret key keeps outsiders from aiming many flows at one target, which an
    unkeyed hash (crc32, djb2 as in nfqlb) allows. BLAKE2s rather than BLAKE2b because it is
    faster for these short inputs, and the keyed state is prepared once and copied per packet:
    about 0.4 us per call on the project's 2-vCPU VM, three times an unkeyed crc32
    (``bench/bench_maglev.py`` measures both). The hash is not symmetric: replies are not looked
    up.
    """
    keyed = hashlib.blake2s(digest_size=8, key=key)
    pack = _PORTS.pack
    from_bytes = int.from_bytes

    def hash_flow(src: bytes, dst: bytes, proto: int, sport: int, dport: int) -> int:
        h = keyed.copy()
        h.update(src + dst + pack(proto, sport, dport))
        return from_bytes(h.digest(), "little")

    return hash_flow


def flow_hash(src: bytes, dst: bytes, proto: int, sport: int, dport: int, key: bytes) -> int:
    """Keyed 64-bit hash of a 5-tuple (see :func:`flow_hasher`, faster in a packet loop)."""
    return flow_hasher(key)(src, dst, proto, sport, dport)
