"""Attraction: how fast the gateway follows the LBs, and what new connections pay for it.

A lab (2 LBs in first-packet mode, 1 proxy, 3 targets, IPv4 and IPv6) with BGP and BFD (each
LB drives its BIRD; the gateway runs BIRD), and the same lab with today's static multipath
route as the baseline. Per event, a probe opens new TCP connections at a fixed rate from the
external host while the gateway's route to the VIP is watched every few milliseconds:

* LB killed (``kill -9`` of meridiod; its BIRD dies with it);
* LB pod gone (its network namespace deleted with everything in it);
* LB hung (its process alive, every packet of its namespace dropped: only BFD can tell);
* graceful withdraw (``scale --lbs 1``: SIGTERM, the LB withdraws first);
* LB (re)joining (``scale --lbs 2``: announced once it forwards to every target).

Convergence is the time from the event to the gateway's route losing (or gaining) the LB;
failed connections are the probe's, with the time from the start of the first one to that of
the last one. Static routing never converges on a crash: its figures
are over the rest of the run.

    python -m bench attraction
    MERIDIO_BENCH_CASES=gone python -m bench attraction     # some of the cases only
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import progress, row
from meridio.lab import plan, system
from meridio.lab.lab import Lab
from meridio.lab.plan import LabSpec
from meridio.lab.system import LabError

RATE = 200
RUN = 8.0
EVENT_AT = 2.0
REPEAT = 3
ALL_CASES = ("killed", "gone", "hung", "withdraw", "join")
# MERIDIO_BENCH_CASES=gone,hung runs some of them (names of other benchmarks' cases ignored)
CASES = (
    tuple(c for c in os.environ.get("MERIDIO_BENCH_CASES", "").split(",") if c in ALL_CASES)
    or ALL_CASES
)


def routed(lab: Lab, lb: int) -> bool:
    address = plan.external_address(4, lb).split("/")[0]
    return address in system.route_next_hops(lab.netns("gw"), 4, plan.vip_cidr(4))


def hang(lab: Lab, lb: int) -> None:
    system.run(
        "ip",
        "netns",
        "exec",
        lab.netns(plan.lb_host(lb)),
        "nft",
        "add table inet mbench-hang; "
        "add chain inet mbench-hang in { type filter hook prerouting priority -500; "
        "policy drop; }; "
        "add chain inet mbench-hang out { type filter hook output priority -500; policy drop; }",
    )


def one(lab: Lab, case: str, dynamic: bool) -> tuple[float | None, dict[str, Any]]:
    """Run one event under the probe: (convergence in seconds or None, the probe's report)."""
    if case == "join":
        lab.scale(lbs=1)
        time.sleep(1)
    probe = lab.start_traffic(
        ["--rate", str(RATE), "--duration", str(RUN), "--connect-timeout", "1"],
        families=(4,),
        command="probe",
    )
    time.sleep(EVENT_AT)
    started = time.monotonic()
    converged: float | None = None
    if case == "killed":
        lab.kill("lb-2")
    elif case == "gone":
        lab.kill("lb-2", netns=True)
    elif case == "hung":
        hang(lab, 2)
    elif case == "withdraw":
        # scale() returns once lb-2 stopped; the route leaves well before: watch meanwhile
        done: list[float] = []

        def watch() -> None:
            while routed(lab, 2) and time.monotonic() - started < 10:
                time.sleep(0.002)
            done.append(time.monotonic() - started)

        watcher = threading.Thread(target=watch)
        watcher.start()
        lab.scale(lbs=1)
        watcher.join()
        converged = done[0] if done and done[0] < 10 else None
    if case in ("killed", "gone", "hung"):
        limit = RUN - EVENT_AT - 0.5
        while routed(lab, 2) and time.monotonic() - started < limit:
            time.sleep(0.002)
        converged = None if routed(lab, 2) else time.monotonic() - started
    elif case == "join":
        joined: list[float] = []

        def watch_join() -> None:
            while not routed(lab, 2) and time.monotonic() - started < 30:
                time.sleep(0.002)
            joined.append(time.monotonic() - started)

        watcher = threading.Thread(target=watch_join)
        watcher.start()
        try:
            lab.scale(lbs=2)
        except LabError as exc:
            progress(f"join: {str(exc)[:200]}")
        watcher.join()
        converged = joined[0] if joined and joined[0] < 30 else None
    report = probe.result(timeout=60)
    # back to two healthy LBs, both routed (a slow rejoin is reported, not fatal)
    if case == "hung":
        lab.kill("lb-2", netns=True)
    for attempt in range(3):
        try:
            lab.scale(lbs=2)
            if dynamic:
                lab.wait_gateway_routes([1, 2], timeout=60)
            break
        except LabError as exc:
            progress(f"restoring after {case} (attempt {attempt + 1}): {str(exc)[:200]}")
    return converged, report


def run_lab(routing: str, workdir: Path) -> dict[str, list[tuple[float | None, dict[str, Any]]]]:
    prefix = f"mlab-b{os.getpid()}{routing[0]}-"
    lab = Lab(workdir / routing, prefix)
    results: dict[str, list[tuple[float | None, dict[str, Any]]]] = {c: [] for c in CASES}
    try:
        # without restarts: a killed LB stays dead for the rest of the run, which is what the
        # figures are about (its supervisor would otherwise start it again within seconds)
        spec = LabSpec(prefix=prefix, lbs=2, proxies=1, targets=3, routing=routing, restart=False)
        lab.up(spec)
        progress(f"{routing} lab up")
        for case in CASES:
            for _ in range(REPEAT):
                results[case].append(one(lab, case, routing != "static"))
            conv = [c for c, _ in results[case]]
            failed = [r["failed"] for _, r in results[case]]
            progress(f"{routing} {case}: convergence {conv}, failed {failed}")
    finally:
        lab.down()
    return results


def starts_span(report: dict[str, Any]) -> float:
    """Seconds from the start of the first failed new connection to that of the last one (an
    attempt that times out fails a connect timeout later, but it started when it started)."""
    starts = [f["t"] for f in report["failures"]]
    return max(starts) - min(starts) if starts else 0.0


def fmt_conv(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "never"
    text = f"{statistics.median(got) * 1000:.0f} ms"
    return text if len(got) == len(values) else f"{text} ({len(values) - len(got)} never)"


def main() -> None:
    if system.find_bird() is None:
        print("BIRD 2 is not installed (Debian bird2): nothing to measure")
        return
    workdir = Path(tempfile.mkdtemp(prefix="mbench-attraction-", dir="/tmp"))
    try:
        static = run_lab("static", workdir)
        bgp = run_lab("bgp", workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\n  probe: {RATE} new TCP connections/s for {RUN:g} s, event at {EVENT_AT:g} s, "
        f"{REPEAT} runs per case (median)"
    )
    print(f"  {'case':<52} {'BGP+BFD':>16} {'static (base)':>14}")
    for case in CASES:
        row(
            f"{case}: gateway convergence",
            fmt_conv([c for c, _ in bgp[case]]),
            fmt_conv([c for c, _ in static[case]]),
        )
        b = statistics.median(r["failed"] for _, r in bgp[case])
        s = statistics.median(r["failed"] for _, r in static[case])
        row(f"{case}: failed new connections (of {int(RATE * RUN)})", f"{b:g}", f"{s:g}")
        b = statistics.median(starts_span(r) for _, r in bgp[case])
        s = statistics.median(starts_span(r) for _, r in static[case])
        row(f"{case}: their starts, first to last", f"{b * 1000:.0f} ms", f"{s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
