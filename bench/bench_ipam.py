"""IPAM: Allocate / Release throughput on a real daemon, every change committed (fsync) first.

The daemon runs in a throw-away network namespace and listens on unix sockets; its sqlite
database is on the same disk as /tmp (WAL, ``synchronous=FULL``: one fsync per commit). Load
comes from forked client processes. The baseline is a unary ``grpc.health.v1`` Check on the same
daemon with the same client layout (calls per second) or on one connection (round-trip time).

    python -m bench.bench_ipam
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from grpclib.client import Channel

from bench.common import health_call, health_warmup, progress, row
from meridio.api.grpc.health.v1 import HealthCheckRequest, HealthStub
from meridio.api.ipam.v1 import Child, IpamStub, IpFamily, Subnet
from meridio.api.meridio.admin.v1 import IpamInspectStub, ListAllocationsRequest
from meridio.api.nsp.v1 import Conduit, Trench
from tests.netns.daemons import IPAM_PREFIXES, Daemon, bench_netns, measure_rate, run_async

CHILDREN = 2000
NODES = 10
PROCESSES = 2
TASKS_PER_PROCESS = 4
BASELINE_CALLS = 2000
SEQUENTIAL_CALLS = 200


def make_child(i: int, prefix: str = "conn") -> Child:
    """Child i: half IPv4, half IPv6, spread over NODES nodes of one conduit."""
    family = IpFamily.IPV4 if i % 2 == 0 else IpFamily.IPV6
    return Child(
        name=f"{prefix}-{i}",
        subnet=Subnet(
            conduit=Conduit(name="conduit-a", trench=Trench(name="trench-a")),
            node=f"node-{i % NODES}",
            ip_family=family,
        ),
    )


def allocate_call(ch: Channel) -> Any:
    stub = IpamStub(ch, timeout=30)

    async def call(child: Child) -> None:
        await stub.allocate(child)

    return call


def release_call(ch: Channel) -> Any:
    stub = IpamStub(ch, timeout=30)

    async def call(child: Child) -> None:
        await stub.release(child)

    return call


async def ipam_warmup(ch: Channel) -> None:
    # Releasing an unknown child changes nothing (and commits nothing): it only connects.
    await IpamStub(ch, timeout=30).release(make_child(0, "warm-up"))


async def sequential(daemon: Daemon) -> tuple[float, float]:
    """Median round trip of a Health Check and of a new-child Allocate, one call at a time."""
    health = Channel(path=str(daemon.health_socket))
    ipam = Channel(path=str(daemon.socket))
    try:
        check = HealthStub(health, timeout=30)
        request = HealthCheckRequest(service="Readiness")
        stub = IpamStub(ipam, timeout=30)
        await check.check(request)
        await stub.release(make_child(0, "warm-up"))
        check_times, allocate_times = [], []
        for i in range(SEQUENTIAL_CALLS):
            started = time.perf_counter()
            await check.check(request)
            check_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            await stub.allocate(make_child(i, "seq"))
            allocate_times.append(time.perf_counter() - started)
        return statistics.median(check_times), statistics.median(allocate_times)
    finally:
        health.close()
        ipam.close()


async def allocation_count(daemon: Daemon) -> tuple[int, int]:
    """(allocations, distinct addresses) as the daemon lists them."""
    ch = Channel(path=str(daemon.socket))
    try:
        reply = await IpamInspectStub(ch, timeout=30).list(ListAllocationsRequest())
        rows = reply.allocations
        return len(rows), len({(a.family, a.address) for a in rows})
    finally:
        ch.close()


def measure(daemon: Daemon) -> None:
    layout = {"processes": PROCESSES, "tasks": TASKS_PER_PROCESS}
    children = [make_child(i) for i in range(CHILDREN)]

    def rate(socket: Path, call: Any, items: list[Any], warmup: Any) -> float:
        n, secs = measure_rate(socket, call, items, warmup=warmup, **layout)
        return n / secs

    def baseline_pass() -> float:
        return rate(daemon.health_socket, health_call, list(range(BASELINE_CALLS)), health_warmup)

    before = baseline_pass()
    progress("baseline measured")
    new = rate(daemon.socket, allocate_call, children, ipam_warmup)
    progress("allocations done")
    allocated, distinct = run_async(allocation_count(daemon))
    again = rate(daemon.socket, allocate_call, children, ipam_warmup)
    progress("re-allocations done")
    released = rate(daemon.socket, release_call, children, ipam_warmup)
    progress("releases done")
    after = baseline_pass()
    baseline = (before + after) / 2
    progress("baseline measured again")
    left, _ = run_async(allocation_count(daemon))
    rtt, allocate_rtt = run_async(sequential(daemon))
    progress("sequential calls done")
    code = run_async(daemon.stop())

    print(f"\n  {'metric':<52} {'value':>16} {'vs baseline':>14}")
    row("baseline: Health Check (unary round trips)", f"{baseline:,.0f} /s", "1.00x")
    row("  (measured before / after the calls below)", f"{before:,.0f} / {after:,.0f}")
    for label, value in (
        (f"Allocate: {CHILDREN} new children (commit + fsync)", new),
        ("Allocate again: same names (refresh, commit + fsync)", again),
        (f"Release: the {CHILDREN} children (commit + fsync)", released),
    ):
        row(label, f"{value:,.0f} /s", f"{value / baseline:.2f}x")
    print()
    row("baseline: Health Check round trip, median", f"{rtt * 1000:.2f} ms", "1.00x")
    row(
        "Allocate round trip (new child), median",
        f"{allocate_rtt * 1000:.2f} ms",
        f"{allocate_rtt / rtt:.1f}x",
    )
    print(
        f"\n  {CHILDREN} children (half IPv4, half IPv6) on {NODES} nodes of one conduit; "
        f"listed after allocating: {allocated} allocations, {distinct} distinct addresses; "
        f"after releasing: {left}; exit status after SIGTERM: {code}",
        flush=True,
    )
    if (allocated, distinct, left) != (CHILDREN, CHILDREN, 0):
        raise RuntimeError("the IPAM state after the run is not what the calls asked for")


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mbench-ipam-", dir="/tmp"))
    try:
        with bench_netns() as ns:
            daemon = Daemon(ns, "ipam", workdir / "d", *IPAM_PREFIXES)
            run_async(daemon.start())
            fs = subprocess.run(
                ["stat", "-f", "-c", "%T", str(workdir)], capture_output=True, text=True
            ).stdout.strip()
            print(
                f"IPAM daemon in netns {ns.name}; {os.cpu_count()} CPUs; database on "
                f"{workdir} ({fs or 'unknown fs'}); load: {PROCESSES} client processes x "
                f"{TASKS_PER_PROCESS} connections",
                flush=True,
            )
            try:
                measure(daemon)
            except BaseException:
                print(f"daemon log (tail):\n{daemon.log_text()[-3000:]}", flush=True)
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
