"""Maglev table: build time against the plain-Python reference, table quality, per-packet cost.

For each (M, N) the fast build (:func:`meridio.core.maglev.build_table`) and the reference
(:func:`meridio.core.maglev._build_reference`, the paper's Pseudocode 1 in plain Python) build
the same table in the same run; the ratio is fast / reference. Quality uses the metric names of
``reference/load-balancing.md`` section 5: balance (max and min entries per target over the mean)
and disruption when one target is removed or added (changed share of entries, against the ideal
1/N, and the excess). Targets are identifiers 1..N, as in a Meridio stream.

In kernel mode the table goes into an nftables map: as root, with ``nft``, the last part loads
the LB's whole table (two 10007-entry maps, or one of 65537) into a throw-away namespace, loads
it again over itself (a replacement), reads the map back (``nft -j``), updates every tenth
entry, and times a transaction that changes nothing (what running ``nft`` costs at all).

    python -m bench.bench_maglev
    python -m bench.bench_maglev nft          # the nftables part only
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import statistics
import struct
import sys
import time
import timeit
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from meridio.core import maglev

CASES = ((65537, 100), (65537, 1000), (655373, 1000))
FAST_RUNS = 9
REF_RUNS = 5  # and 3 fast, 1 reference at M = 655373, where one reference build takes seconds
DISRUPTION_SAMPLES = 5
HASH_CALLS = 200_000
NFT_RUNS = 3
GOAL_MS = 20.0  # M = 65537, N = 1000 (reference/load-balancing.md, goal 5)


def median_ms(build: Callable[[], object], runs: int) -> float:
    build()  # warm-up (imports, allocator)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        build()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def changed(a: maglev.MaglevTable, b: maglev.MaglevTable) -> float:
    return int(np.count_nonzero(a.entries != b.entries)) / a.size


def quality(size: int, n: int) -> dict[str, float]:
    targets = list(range(1, n + 1))
    table = maglev.build_table(targets, size)
    counts = np.array(list(table.counts().values()), dtype=np.float64)
    mean = size / n
    rnd = random.Random(size * 7919 + n)
    removed = []
    for victim in rnd.sample(targets, DISRUPTION_SAMPLES):
        removed.append(changed(table, maglev.build_table(set(targets) - {victim}, size)))
    added = []
    for extra in rnd.sample(range(n + 1, 100 * n), DISRUPTION_SAMPLES):
        added.append(changed(table, maglev.build_table([*targets, extra], size)))
    return {
        "max_avg": float(counts.max()) / mean,
        "min_avg": float(counts.min()) / mean,
        "remove": statistics.mean(removed),
        "add": statistics.mean(added),
    }


def ns_per_call(call: Callable[[], object]) -> float:
    return min(timeit.repeat(call, number=HASH_CALLS, repeat=5)) / HASH_CALLS * 1e9


def nft_times() -> None:
    """Load, replace, read back and update the LB's nftables table (kernel mode)."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        print("\nnftables: needs root and nft; not measured")
        return
    import trio

    from meridio.core.classifier import FlowSpec
    from meridio.lb.nftables import (
        StreamMap,
        TableSpec,
        apply,
        map_elements,
        render_delete,
        render_map_update,
        render_table,
    )
    from tests.netns.daemons import bench_netns

    table = "mbench-lb"
    a, b = ("t", "c", "a"), ("t", "c", "b")
    vips = (ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("2001:db8::1"))
    flows = (
        FlowSpec("udp", a, vips, priority=2, protocols=(17,), dports=((7777, 7777),)),
        FlowSpec("tcp", b, vips[:1], priority=1, protocols=(6, 17), dports=((7778, 7778),)),
    )
    rng = random.Random(5)

    def marks(count: int) -> tuple[int, ...]:
        return tuple(rng.choice((5001, 5002, 5003, 5004, 0)) for _ in range(count))

    print(f"\nnftables (nft through ip netns exec; median of {NFT_RUNS}), ms:")
    print(
        f"  {'maps':<12} {'script':>9} {'load':>7} {'replace':>8} {'read back':>10} "
        f"{'update (entries)':>18}"
    )
    with bench_netns() as ns:
        for label, sizes in (("2 x 10007", (10007, 10007)), ("1 x 65537", (65537, 2))):
            spec = TableSpec(
                streams=(StreamMap(a, marks(sizes[0])), StreamMap(b, marks(sizes[1]))),
                flows=flows,
                seed=0x9E3779B9,
                name=table,
            )
            script = render_table(spec)
            changes: list[tuple[int, int | None]] = [(i, 6000) for i in range(0, sizes[0], 10)]
            update = render_map_update(table, spec.map_name(a), changes)
            times: dict[str, list[float]] = {}

            def timed(what: str, *call: Any, times: dict[str, list[float]] = times) -> None:
                started = time.perf_counter()
                trio.run(*call)
                times.setdefault(what, []).append((time.perf_counter() - started) * 1000)

            for _ in range(NFT_RUNS):
                trio.run(partial(apply, render_delete(table), ns.name, check=False))
                timed("load", apply, script, ns.name)
                timed("replace", apply, script, ns.name)
                timed("read", map_elements, table, spec.map_name(a), ns.name)
                timed("update", apply, update, ns.name)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"  {label:<12} {len(script) // 1024:>5} KiB {med['load']:>7.0f} "
                f"{med['replace']:>8.0f} {med['read']:>10.0f} {med['update']:>7.0f} "
                f"({len(changes)})"
            )
        empty = []
        for _ in range(NFT_RUNS):
            started = time.perf_counter()
            trio.run(apply, render_delete("mbench-nothing-here"), ns.name)
            empty.append((time.perf_counter() - started) * 1000)
        print(f"  a transaction that changes nothing: {statistics.median(empty):.0f} ms")


def main() -> None:
    if "nft" in sys.argv[1:]:
        nft_times()
        return
    print(
        f"Build: median of {FAST_RUNS} fast and {REF_RUNS} reference runs "
        "(3 and 1 at M = 655373); targets 1..N."
    )
    header = (
        f"{'M':>7} {'N':>5} {'fast ms':>8} {'ref ms':>8} {'fast/ref':>8} {'max/avg':>8} "
        f"{'min/avg':>8} {'remove-1 (ideal)':>17} {'excess':>7} {'add-1 (ideal)':>15}"
    )
    print(header)
    print("-" * len(header))
    goal_ms = None
    for size, n in CASES:
        targets = list(range(1, n + 1))
        large = size > 100_000
        fast = median_ms(partial(maglev.build_table, targets, size), 3 if large else FAST_RUNS)
        ref = median_ms(partial(maglev._build_reference, targets, size), 1 if large else REF_RUNS)
        if maglev.build_table(targets, size) != maglev._build_reference(targets, size):
            raise SystemExit(f"fast and reference tables differ at M={size}, N={n}")
        if (size, n) == (65537, 1000):
            goal_ms = fast
        q = quality(size, n)
        excess = (q["remove"] - 1 / n) * 100
        print(
            f"{size:>7} {n:>5} {fast:>8.2f} {ref:>8.2f} {fast / ref:>8.3f} {q['max_avg']:>8.4f} "
            f"{q['min_avg']:>8.4f} {q['remove'] * 100:>7.2f} % ({100 / n:.2f} %) {excess:>5.2f} % "
            f"{q['add'] * 100:>5.2f} % ({100 / (n + 1):.2f} %)"
        )
    if goal_ms is not None:
        verdict = "met" if goal_ms <= GOAL_MS else "NOT met"
        print(f"Goal: build M=65537, N=1000 in <= {GOAL_MS:.0f} ms: {goal_ms:.2f} ms, {verdict}.")

    print(f"\nPer packet (best of 5 x {HASH_CALLS} calls), IPv4 5-tuple:")
    key = b"bench-flow-key-0"
    src, dst = bytes([198, 18, 0, 1]), bytes([203, 0, 113, 5])
    hasher = maglev.flow_hasher(key)
    table = maglev.build_table(range(1, 101), 65537)
    h = hasher(src, dst, 6, 40000, 80)
    ports = struct.Struct("!BHH").pack
    rows = [
        ("flow_hasher(key)(...)  [keyed BLAKE2s]", lambda: hasher(src, dst, 6, 40000, 80)),
        ("flow_hash(..., key)", lambda: maglev.flow_hash(src, dst, 6, 40000, 80, key)),
        ("table.lookup(h)", lambda: table.lookup(h)),
        ("hash + lookup", lambda: table.lookup(hasher(src, dst, 6, 40000, 80))),
        ("baseline: zlib.crc32 (not keyed)", lambda: zlib.crc32(src + dst + ports(6, 40000, 80))),
    ]
    for name, call in rows:
        print(f"  {name:<40} {ns_per_call(call):7.0f} ns")
    nft_times()


if __name__ == "__main__":
    main()
