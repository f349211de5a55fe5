"""The LB's control path at scale: N targets per stream, kept alive by re-registration.

A real NSP and a real LB (``kernel`` mode) in a throw-away namespace; the targets are only
registrations (their addresses are on a veth of the namespace, so the LB can route to them).
A keeper re-registers every target every 5 s, as target sidecars do. Per case:

* cold start: LB spawned with N targets registered, until N fwmark rules per family are in;
* steady state: the LB's CPU (share of one core) over 15 s of keepalives, and its RSS;
* one change: a target unregistered (or registered again) until its rule leaves (or enters)
  the kernel, p50 and max over several changes.

The baseline is the smallest case (N = 10) of the same run: ratios are against it.

    python -m bench lbscale            # all cases
    python -m bench.bench_lbscale 1000 # one N
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from grpclib.client import Channel

from bench.common import progress, row
from meridio.api.nsp.v1 import Conduit, Stream, Target, TargetRegistryStub, TargetStatus, Trench
from tests.netns.daemons import Daemon, bench_netns, run_async
from tests.netns.lbtopo import LbDaemon

TRENCH, CONDUIT = "trench-a", "conduit-a"
OFFSET, PRIORITY = 5000, 100
KEEPALIVE = 5.0
STEADY = 15.0
CHANGES = 10
CHANGE_LIMIT = 60.0
CASES = {"10": (1, 10), "100": (1, 100), "1000": (1, 1000), "10x100": (10, 100)}


def stream(index: int) -> Stream:
    return Stream(name=f"s{index}", conduit=Conduit(name=CONDUIT, trench=Trench(name=TRENCH)))


def target(s: int, i: int) -> Target:
    n = s * 1000 + i
    return Target(
        ips=[f"198.18.{n // 250}.{n % 250 + 2}", f"fd00:20::{n + 2:x}"],
        context={"identifier": str(i + 1)},
        status=TargetStatus.ENABLED,
        stream=stream(s),
    )


def config(streams: int, per_stream: int) -> dict[str, Any]:
    return {
        "trench": {"name": TRENCH},
        "conduits": {"items": [{"name": CONDUIT, "trench": TRENCH}]},
        "streams": {
            "items": [
                {"name": f"s{s}", "conduit": CONDUIT, "max-targets": per_stream}
                for s in range(streams)
            ]
        },
        "vips": {"items": [{"name": "v4", "address": "203.0.113.1/32", "trench": TRENCH}]},
        "flows": {
            "items": [
                {
                    "name": f"f{s}",
                    "stream": f"s{s}",
                    "vips": ["v4"],
                    "protocols": ["tcp"],
                    "destination-port-ranges": [str(1000 + s)],
                }
                for s in range(streams)
            ]
        },
    }


class Keeper:
    """Re-registers the live targets every KEEPALIVE seconds, in a thread of its own."""

    def __init__(self, socket: Path, targets: list[Target]) -> None:
        self.socket = socket
        self.live = {id(t): t for t in targets}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: run_async(self._run()), daemon=True)

    async def _run(self) -> None:
        ch = Channel(path=str(self.socket))
        try:
            stub = TargetRegistryStub(ch, timeout=60)
            while not self.stop.is_set():
                batch = list(self.live.values())
                for i in range(0, len(batch), 200):
                    await asyncio.gather(*(stub.register(t) for t in batch[i : i + 200]))
                await asyncio.sleep(KEEPALIVE)
        finally:
            ch.close()


async def call(socket: Path, method: str, targets: list[Target], passes: int = 1) -> None:
    ch = Channel(path=str(socket))
    try:
        stub = TargetRegistryStub(ch, timeout=60)
        for _ in range(passes):
            for i in range(0, len(targets), 200):
                await asyncio.gather(*(getattr(stub, method)(t) for t in targets[i : i + 200]))
    finally:
        ch.close()


def fwmarks(ns: Any) -> set[int]:
    out = ns.run("ip", "-4", "rule", "show", "priority", str(PRIORITY), check=False).stdout
    return {int(w, 16) for w in out.split() if w.startswith("0x")}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Result:
    case: str
    targets: int
    cold: float
    cpu: float
    rss: float
    change_p50: float
    change_p95: float
    change_max: float


def wait_for(predicate: Any, limit: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            return float("inf")
        time.sleep(0.01)
    return time.monotonic() - start


def run_case(name: str, workdir: Path) -> Result:
    streams, per_stream = CASES[name]
    targets = [target(s, i) for s in range(streams) for i in range(per_stream)]
    marks = {OFFSET + s * per_stream + i + 1 for s in range(streams) for i in range(per_stream)}
    with bench_netns() as ns:
        ns.run("ip", "link", "add", "tgt0", "type", "veth", "peer", "name", "tgt1")
        for cmd in (
            "addr add 198.18.0.1/15 dev tgt0",
            "addr add fd00:20::1/64 dev tgt0 nodad",
            "link set tgt0 up",
            "link set tgt1 up",
        ):
            ns.run("ip", *cmd.split())
        conf = workdir / "config.yaml"
        conf.write_text(yaml.safe_dump(config(streams, per_stream)))
        nsp = Daemon(
            ns, "nsp", workdir / "nsp", f"--configuration-file={conf}", "--entry-timeout=60"
        )
        run_async(nsp.start())
        run_async(call(nsp.socket, "register", targets, passes=2))  # stored, then enabled
        lb = LbDaemon(
            ns,
            "lb",
            workdir / "lb",
            f"--nsp=unix://{nsp.socket}",
            f"--trench={TRENCH}",
            f"--conduit={CONDUIT}",
            "--mode=kernel",
            f"--identifier-offset={OFFSET}",
        )
        keeper = Keeper(nsp.socket, targets)
        keeper.thread.start()
        try:
            lb.spawn()
            cold = wait_for(lambda: fwmarks(ns) >= marks, 120)
            progress(f"{name}: cold start {cold:.2f} s")
            time.sleep(2)
            before = cpu_seconds(lb.pid)
            time.sleep(STEADY)
            cpu = (cpu_seconds(lb.pid) - before) / STEADY
            rss = rss_mb(lb.pid)
            progress(f"{name}: steady CPU {cpu * 100:.1f} %, RSS {rss:.0f} MB")
            changes = []
            for k in range(CHANGES):
                victim = targets[(k * 7919) % len(targets)]
                mark = OFFSET + int(victim.stream.name[1:]) * per_stream
                mark += int(victim.context["identifier"])
                keeper.live.pop(id(victim))
                run_async(call(nsp.socket, "unregister", [victim]))
                changes.append(wait_for(lambda m=mark: m not in fwmarks(ns), CHANGE_LIMIT))
                keeper.live[id(victim)] = victim
                run_async(call(nsp.socket, "register", [victim], passes=2))
                changes.append(wait_for(lambda m=mark: m in fwmarks(ns), CHANGE_LIMIT))
                if changes[-1] == float("inf"):
                    break
            progress(f"{name}: changes {', '.join(f'{c:.2f}' for c in changes)} s")
        finally:
            keeper.stop.set()
            if lb.alive():
                run_async(lb.stop(timeout=30))
            run_async(nsp.stop())
    return Result(
        name,
        len(targets),
        cold,
        cpu,
        rss,
        statistics.median(changes),
        sorted(changes)[int(0.95 * (len(changes) - 1))],
        max(changes),
    )


def main() -> None:
    wanted = [a for a in sys.argv[1:] if a in CASES] or list(CASES)
    if "10" not in wanted:
        wanted.insert(0, "10")
    results = []
    for name in wanted:
        workdir = Path(tempfile.mkdtemp(prefix=f"mbench-lbscale-{name}-", dir="/tmp"))
        try:
            results.append(run_case(name, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    base = results[0]

    def ratio(value: float, baseline: float) -> str:
        return f"{value / baseline:.1f}x" if baseline > 0 else "-"

    print(f"\n  {'case (streams x targets)':<52} {'value':>16} {'vs N=10':>14}")
    for r in results:
        print(f"  --- {r.case}: {r.targets} targets")
        row("cold start to every rule in", f"{r.cold:.2f} s", ratio(r.cold, base.cold))
        row("LB CPU, steady (keepalive every 5 s)", f"{r.cpu * 100:.1f} %", ratio(r.cpu, base.cpu))
        row("LB RSS", f"{r.rss:.0f} MB", ratio(r.rss, base.rss))
        row(
            "one target change in the kernel, p50",
            f"{r.change_p50:.3f} s",
            ratio(r.change_p50, base.change_p50),
        )
        row(
            "one target change in the kernel, p95",
            f"{r.change_p95:.3f} s",
            ratio(r.change_p95, base.change_p95),
        )
        row(
            f"one target change in the kernel, max of {2 * CHANGES}",
            f"{r.change_max:.3f} s",
            ratio(r.change_max, base.change_max),
        )


if __name__ == "__main__":
    main()
