"""Where the routed path's cost goes: hand-written nftables variants against the baseline.

The LB's routed path (``kernel-routed`` in ``bench_datapath``) is one chain: a flow rule that
hashes the packet's 5-tuple with ``jhash`` into the stream's Maglev map, a verdict that jumps
to the target's chain (its mark and hit counter), then the kernel's ``ip rule`` per mark. This
benchmark takes it apart, in the same topology and run as ``bench_datapath``'s baseline (no
meridiod; an iptables ``MARK`` of every VIP packet and one ip rule): each variant replaces the
baseline's rule with a hand-written ``inet`` table, everything else unchanged, so the ratios
say what each piece costs on this kernel. UDP only (the routed path's open goal).

* ``nft-mark``: the baseline's mark set by nft instead of iptables;
* ``goto-chain``: a jump to one target chain (mark, counter);
* ``jhash-offset``: ``meta mark set jhash <5-tuple> mod 4 offset <mark>``: the hash alone,
  spread over the 4 targets, no map (not Maglev);
* ``anon-map``: the hash into an anonymous 4-entry mark map;
* ``mark-map``, ``mark-map-counters``: the hash into a Maglev-sized (1,009 entries) mark map,
  without and with per-element counters (the per-target hits would be summed from them);
* ``lb-shape``: what the LB installs: the hash into a 1,009-entry verdict map, a jump to the
  target's chain (mark, named counter); ``lb-shape-1``: the same with every entry on one
  target (one ip rule walked, not up to four); ``lb-shape-defrag``: with the unhooked
  ``tproxy`` chain that registers the defragmentation hooks, as the LB has.

Run: ``.venv/bin/python -m bench routed_floor`` (as root; what ``bench_datapath`` needs),
``MERIDIO_BENCH_CASES=mark-map,lb-shape`` for a subset, ``MERIDIO_BENCH_ROUNDS`` (default 10).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench import bench_datapath as dp
from tests.netns.lbtopo import VIP4

M = 1009  # the LB's Maglev size for max-targets 10, as bench_datapath's LB
SEED = "0x1234"
MARKS = [dp.OFFSET + 1 + i for i in range(dp.TARGETS)]
KEY = "@nh,96,64 . th sport . th dport"  # saddr . daddr in one load, then the ports
HOOK = "type filter hook prerouting priority raw; policy accept;"
VIP_RULE = f"ip daddr {VIP4} meta l4proto {{ tcp, udp }}"


def _table(body: list[str], counters: list[int]) -> str:
    decl = [f"counter hit-{m} {{ }}" for m in counters]
    return "table inet mbench-floor {\n" + "\n".join(decl + body) + "\n}\n"


def _target_chains(marks: list[int]) -> list[str]:
    return [
        f'chain r-{m} {{ meta mark set {m} counter name "hit-{m}" accept; }}'
        for m in sorted(set(marks))
    ]


def _mark_map(counters: bool) -> str:
    elements = ", ".join(f"{i} : {MARKS[i % len(MARKS)]}" for i in range(M))
    flag = " counter;" if counters else ""
    return _table(
        [
            f"map marks {{ typeof numgen random mod {M} : meta mark;{flag}"
            f" elements = {{ {elements} }} }}",
            f"chain pre {{ {HOOK} {VIP_RULE} meta mark set jhash {KEY}"
            f" mod {M} seed {SEED} map @marks; }}",
        ],
        [],
    )


def _lb_shape(marks: list[int], defrag: bool = False) -> str:
    elements = ", ".join(f"{i} : goto r-{marks[i % len(marks)]}" for i in range(M))
    body = [
        f"map stream {{ typeof numgen random mod {M} : verdict; elements = {{ {elements} }} }}",
        *_target_chains(marks),
    ]
    if defrag:
        body.append("chain defrag { meta l4proto tcp tproxy to :1; }")
    body.append(f"chain pre {{ {HOOK} {VIP_RULE} jhash {KEY} mod {M} seed {SEED} vmap @stream; }}")
    return _table(body, sorted(set(marks)))


VARIANTS = {
    "nft-mark": _table([f"chain pre {{ {HOOK} ip daddr {VIP4} meta mark set {MARKS[0]}; }}"], []),
    "goto-chain": _table(
        [*_target_chains(MARKS[:1]), f"chain pre {{ {HOOK} ip daddr {VIP4} goto r-{MARKS[0]}; }}"],
        MARKS[:1],
    ),
    "jhash-offset": _table(
        [
            f"chain pre {{ {HOOK} {VIP_RULE} meta mark set jhash {KEY} mod 4 seed {SEED}"
            f" offset {MARKS[0]}; }}"
        ],
        [],
    ),
    "anon-map": _table(
        [
            f"chain pre {{ {HOOK} {VIP_RULE} meta mark set jhash {KEY} mod 4 seed {SEED} map {{ "
            + ", ".join(f"{i} : {m}" for i, m in enumerate(MARKS))
            + " }; }"
        ],
        [],
    ),
    "mark-map": _mark_map(False),
    "mark-map-counters": _mark_map(True),
    "lb-shape": _lb_shape(MARKS),
    "lb-shape-1": _lb_shape(MARKS[:1]),
    "lb-shape-defrag": _lb_shape(MARKS, defrag=True),
}


def main() -> None:
    missing = [t for t in ("trafgen", "taskset", "gcc", "nft") if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        print(f"skipped: needs root and {', '.join(missing) or 'nothing else'} (make bench-deps)")
        return
    wanted = [c for c in os.environ.get("MERIDIO_BENCH_CASES", "").split(",") if c]
    names = [n for n in VARIANTS if not wanted or n in wanted]
    dp.TCP_ROUNDS = 0  # UDP only
    print(
        f"  UDP: {dp.ROUNDS} rounds of {dp.SECONDS:g} s; median (range) over the rounds; ratios"
        " to the baseline (iptables MARK, one ip rule) of the same round",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="mbench-floor-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        tools = dp.build_tools(work)
        base = stack.enter_context(dp.topology("baseline", work / "baseline", tools, False))
        group = [base]
        for name in names:
            runner = stack.enter_context(dp.topology("baseline", work / name, tools, False))
            runner.name = name
            lb = runner.topo.lb_ns.name
            dp.ns_run(
                lb,
                "iptables",
                *["-D" if a == "-A" else a for a in dp.FIXED_MARK],
                str(dp.OFFSET + 1),
            )
            dp.ns_run(lb, "nft", "-f", "-", input=VARIANTS[name])
            group.append(runner)
        dp.measure(group, tools)
        print(f"  {'case':<14} {'UDP pps':>26} {'ratio':>18} {'CPU cost ratio':>18} {'loss':>22}")
        for runner in group:
            dp.report(runner, base)


if __name__ == "__main__":
    main()
