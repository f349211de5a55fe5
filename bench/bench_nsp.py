"""NSP target registry: Register throughput and Watch fan-out delay on a real daemon.

The daemon runs in a throw-away network namespace and listens on unix sockets; the clients run
in this process (watchers) or in forked client processes (load). Baselines come from the same
daemon in the same run: a unary ``grpc.health.v1`` Check over its health socket, with the same
client layout, for calls per second; the Check round-trip time for the Watch delay.

State changes under watchers (issue 15): 50 Watch streams follow a stream of 100 targets while
client processes flip those targets between ENABLED and DISABLED, every call a change that must
be committed before its reply; the rate, the latency of each call (p50, p99), the daemon's CPU
time per call and the time until every watcher has the final state. The clients of this part
(load, watchers and its health Check baseline) are grpcio's C core in processes of their own,
with requests encoded before the clock starts (see ``bench/grpcio_load.py``): a Python client
costs about what the daemon does per call and would take the CPU the daemon is measured for.

Configuration edits: the file replaced (as a ConfigMap mount is) until a Watch of the streams
shows the change, picked up by the file poll (default interval, and the file must read the
same twice before it is applied) and by SIGHUP (applied at once); the daemon runs with its
default settings apart from the entry timeout.

    python -m bench.bench_nsp
    python -m bench.bench_nsp config          # the configuration edits only (about 20 s)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from grpclib.client import Channel

from bench import grpcio_load
from bench.common import health_call, health_warmup, progress, row
from meridio.api.grpc.health.v1 import HealthCheckRequest, HealthStub
from meridio.api.nsp.v1 import (
    Conduit,
    ConfigurationManagerStub,
    Stream,
    Target,
    TargetRegistryStub,
    TargetResponse,
    TargetStatus,
    Trench,
)
from meridio.roles.nsp import PUBLISH_INTERVAL
from tests.netns.daemons import (
    Daemon,
    RawCodec,
    bench_netns,
    measure_rate,
    percentile,
    raw_watch,
    run_async,
)

TARGETS = 1000
PROCESSES = 2
TASKS_PER_PROCESS = 4
CHURN_TARGETS = 100
CHURN_WATCHERS = 50
CHURN_ROUNDS = 40
CHURN_TASKS_PER_PROCESS = 8
REFRESH_PASSES = 2
BASELINE_CALLS = 2000
WATCHERS = 20
CHANGES = 50
STREAM_B = 20
BIG_CHANGES = 6
CONFIG_EDITS = 5

CONFIG = {
    "trench": {"name": "trench-a"},
    "conduits": {"items": [{"name": "conduit-a", "trench": "trench-a"}]},
    "streams": {
        "items": [
            {"name": "stream-a", "conduit": "conduit-a", "max-targets": TARGETS},
            {"name": "stream-b", "conduit": "conduit-a", "max-targets": TARGETS},
            {"name": "stream-c", "conduit": "conduit-a", "max-targets": CHURN_TARGETS},
        ]
    },
}


def stream(name: str) -> Stream:
    return Stream(name=name, conduit=Conduit(name="conduit-a", trench=Trench(name="trench-a")))


def make_target(
    i: int, stream_name: str = "stream-a", status: TargetStatus = TargetStatus.ENABLED
) -> Target:
    """Target i: one IPv4 and one IPv6 address, identifier i+1."""
    base = {"stream-a": 0, "stream-b": 8, "stream-c": 16}[stream_name]
    return Target(
        ips=[f"198.18.{base + i // 250}.{i % 250 + 1}/16", f"fd00:20::{base:x}:{i + 1:x}/64"],
        context={"identifier": str(i + 1)},
        status=status,
        stream=stream(stream_name),
    )


# -- configuration edits -------------------------------------------------------------------------


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Replace the file atomically, as a ConfigMap mount does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)


async def config_delays(daemon: Daemon, path: Path, edits: int) -> dict[str, list[float]]:
    """Seconds from each edit of the file to a Watch of the streams showing it: picked up by
    the poll, then with a SIGHUP right after the edit. The file is as it was afterwards."""
    ch = Channel(path=str(daemon.socket))
    seen: asyncio.Queue[set[str]] = asyncio.Queue()

    async def pump() -> None:
        async for reply in ConfigurationManagerStub(ch).watch_stream(Stream()):
            seen.put_nowait({s.name for s in reply.streams})

    task = asyncio.create_task(pump())
    delays: dict[str, list[float]] = {"poll": [], "sighup": []}
    try:
        await asyncio.wait_for(seen.get(), 10)
        for way in ("poll", "sighup"):
            for i in range(edits):
                name = f"edit-{way}-{i}"
                config = yaml.safe_load(yaml.safe_dump(CONFIG))
                config["streams"]["items"].append(
                    {"name": name, "conduit": "conduit-a", "max-targets": 10}
                )
                write_config(path, config)
                started = time.monotonic()
                if way == "sighup":
                    daemon.signal(signal.SIGHUP)
                while name not in await asyncio.wait_for(seen.get(), 30):
                    pass
                delays[way].append(time.monotonic() - started)
                await asyncio.sleep(0.5)  # apart, so that every edit is a change of its own
        write_config(path, CONFIG)
        daemon.signal(signal.SIGHUP)
        while any(n.startswith("edit-") for n in await asyncio.wait_for(seen.get(), 30)):
            pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        ch.close()
    return delays


def print_config_delays(delays: dict[str, list[float]]) -> None:
    for way, label in (("poll", "by the file poll (every 1 s)"), ("sighup", "with SIGHUP")):
        values = delays[way]
        row(
            f"configuration edit -> Watch, {label}, p50 / max",
            f"{ms(statistics.median(values))} / {ms(max(values))}",
        )


# -- calls made by the load processes ------------------------------------------------------------


def register_call(ch: Channel) -> Any:
    stub = TargetRegistryStub(ch, timeout=10)

    async def call(target: Target) -> None:
        await stub.register(target)

    return call


async def registry_warmup(ch: Channel) -> None:
    # Unregistering an unknown target changes nothing: it only opens the connection.
    unknown = Target(ips=["192.0.2.255/32"], context={"identifier": "1"}, stream=stream("stream-a"))
    await TargetRegistryStub(ch, timeout=10).unregister(unknown)


# -- watch fan-out -------------------------------------------------------------------------------


async def health_rtt(daemon: Daemon, calls: int = 200) -> float:
    """Median round-trip of a sequential Check on one connection (seconds)."""
    ch = Channel(path=str(daemon.health_socket))
    try:
        stub = HealthStub(ch, timeout=10)
        request = HealthCheckRequest(service="Readiness")
        await stub.check(request)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            await stub.check(request)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        ch.close()


async def fanout_delays(
    daemon: Daemon, watch_filter: Target, extra: Target, *, watchers: int, changes: int
) -> tuple[list[float], list[float]]:
    """Alternately register and unregister ``extra`` (each is a change of the filtered view)
    and time each change until every watcher has its update: (delays to the last watcher,
    delays of every watcher).

    The next change is only made once every watcher has its update, and a little more than the
    NSP's publish interval later (back-to-back changes are coalesced into one Watch reply per
    interval, see ``NspState.publish``): each change is an isolated one, and the n-th message
    after the snapshot answers the n-th change.
    """
    counts = [0] * watchers
    arrived: list[list[float]] = [[] for _ in range(watchers)]
    progress = asyncio.Event()

    def receiver(k: int) -> Any:
        def on_message(_: bytes) -> None:
            counts[k] += 1
            arrived[k].append(time.perf_counter())
            progress.set()

        return on_message

    async def all_reached(n: int) -> None:
        while min(counts) < n:
            progress.clear()
            await progress.wait()

    channels = [Channel(path=str(daemon.socket), codec=RawCodec()) for _ in range(watchers)]
    client = Channel(path=str(daemon.socket))
    path = "/nsp.v1.TargetRegistry/Watch"
    tasks = [
        asyncio.create_task(raw_watch(ch, path, watch_filter, receiver(k)))
        for k, ch in enumerate(channels)
    ]
    try:
        registry = TargetRegistryStub(client, timeout=60)
        await asyncio.wait_for(all_reached(1), 60)  # the snapshots
        to_last: list[float] = []
        each: list[float] = []
        for n in range(2, changes + 2):
            change = registry.register if n % 2 == 0 else registry.unregister
            started = time.perf_counter()
            await change(extra)
            try:
                await asyncio.wait_for(all_reached(n), 60)
            except TimeoutError:
                raise RuntimeError(
                    f"change {n - 1}: watchers got {counts}, expected {n} messages each; "
                    f"daemon alive: {daemon.alive()}\n{daemon.log_text()[-2000:]}"
                ) from None
            times = [arrived[k][n - 1] - started for k in range(watchers)]
            to_last.append(max(times))
            each.extend(times)
            if max(counts) > n:
                raise RuntimeError("a watcher got more updates than changes were made")
            await asyncio.sleep(PUBLISH_INTERVAL * 1.5)
        return to_last, each
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in (*channels, client):
            ch.close()


async def register_all(daemon: Daemon, targets: list[Target]) -> None:
    ch = Channel(path=str(daemon.socket))
    try:
        stub = TargetRegistryStub(ch, timeout=60)
        for _ in range(2):  # new (stored DISABLED), then ENABLED
            await asyncio.gather(*(stub.register(t) for t in targets))
    finally:
        ch.close()


# -- state changes under watchers ----------------------------------------------------------------


def churn_plan() -> list[list[bytes]]:
    """Per client task, its Register requests in order (encoded): each task owns some of the
    stream-c targets and flips each of them every round, so every call is a state change."""
    tasks = PROCESSES * CHURN_TASKS_PER_PROCESS
    encoded = {
        (i, status): bytes(make_target(i, "stream-c", status))
        for i in range(CHURN_TARGETS)
        for status in (TargetStatus.ENABLED, TargetStatus.DISABLED)
    }
    plan: list[list[bytes]] = []
    for k in range(tasks):
        own = range(k, CHURN_TARGETS, tasks)
        plan.append(
            [
                encoded[i, TargetStatus.ENABLED if r % 2 == 0 else TargetStatus.DISABLED]
                for r in range(CHURN_ROUNDS)
                for i in own
            ]
        )
    return plan


def final_status() -> TargetStatus:
    return TargetStatus.ENABLED if (CHURN_ROUNDS - 1) % 2 == 0 else TargetStatus.DISABLED


def measure_churn(daemon: Daemon) -> dict[str, Any]:
    run_async(register_all(daemon, [make_target(i, "stream-c") for i in range(CHURN_TARGETS)]))
    watched = Target(status=TargetStatus.ANY, stream=stream("stream-c"))
    plan = churn_plan()
    tasks = PROCESSES * CHURN_TASKS_PER_PROCESS
    health = bytes(HealthCheckRequest(service="Readiness"))
    health_plan = [[health] * (BASELINE_CALLS // tasks + 1) for _ in range(tasks)]
    socket = f"unix://{daemon.socket}"
    with grpcio_load.Watchers(
        socket, "/nsp.v1.TargetRegistry/Watch", bytes(watched), CHURN_WATCHERS
    ) as watchers:
        cpu = cpu_seconds(daemon.pid)
        n, secs, _ = grpcio_load.run_unary(
            f"unix://{daemon.health_socket}", "/grpc.health.v1.Health/Check", health_plan, PROCESSES
        )
        baseline = n / secs
        baseline_cpu = (cpu_seconds(daemon.pid) - cpu) / n
        progress(f"baseline with {CHURN_WATCHERS} idle watchers measured")
        before = watchers.counts()
        cpu = cpu_seconds(daemon.pid)
        calls, seconds, latencies = grpcio_load.run_unary(
            socket, "/nsp.v1.TargetRegistry/Register", plan, PROCESSES
        )
        done = time.monotonic()
        change_cpu = (cpu_seconds(daemon.pid) - cpu) / calls
        # What every watcher must end with: the NSP's own reply for the final state.
        expected = run_async(_current_reply(daemon, watched))
        targets = TargetResponse().parse(expected).targets
        statuses = {int(t.status) for t in targets}
        if len(targets) != CHURN_TARGETS or statuses != {int(final_status())}:
            raise RuntimeError(f"final state: {len(targets)} targets, statuses {statuses}")
        deadline = done + 60
        while not watchers.all_have(expected):
            if time.monotonic() > deadline:
                raise RuntimeError("watchers did not all reach the final state")
            time.sleep(0.002)
        converged = time.monotonic() - done
        updates = [c - b for c, b in zip(watchers.counts(), before, strict=True)]
    progress("state changes done")
    return {
        "baseline": baseline,
        "rate": calls / seconds,
        "calls": calls,
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "converged": converged,
        "updates": statistics.median(updates),
        "baseline_cpu": baseline_cpu,
        "change_cpu": change_cpu,
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used so far (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _current_reply(daemon: Daemon, watched: Target) -> bytes:
    ch = Channel(path=str(daemon.socket), codec=RawCodec())
    got: list[bytes] = []
    done = asyncio.Event()

    def on_message(data: bytes) -> None:
        got.append(data)
        done.set()

    task = asyncio.create_task(raw_watch(ch, "/nsp.v1.TargetRegistry/Watch", watched, on_message))
    try:
        await asyncio.wait_for(done.wait(), 30)
        return got[0]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        ch.close()


# -- report ----------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def measure(daemon: Daemon, config_path: Path) -> None:
    layout = {"processes": PROCESSES, "tasks": TASKS_PER_PROCESS}
    targets = [make_target(i) for i in range(TARGETS)]

    def register_pass() -> float:
        n, secs = measure_rate(
            daemon.socket, register_call, targets, warmup=registry_warmup, **layout
        )
        return n / secs

    def baseline_pass() -> float:
        n, secs = measure_rate(
            daemon.health_socket,
            health_call,
            list(range(BASELINE_CALLS)),
            warmup=health_warmup,
            **layout,
        )
        return n / secs

    before = baseline_pass()
    progress("baseline measured")
    first = register_pass()
    enable = register_pass()
    refresh = statistics.mean(register_pass() for _ in range(REFRESH_PASSES))
    progress("register passes done")
    after = baseline_pass()
    baseline = (before + after) / 2
    progress("baseline measured again")

    rtt = run_async(health_rtt(daemon))
    # The watched stream holds STREAM_B targets; the 1000 stream-a targets are elsewhere in the
    # registry. One more target comes and goes: every change is seen by the filter.
    run_async(register_all(daemon, [make_target(i, "stream-b") for i in range(STREAM_B)]))
    extra = make_target(STREAM_B, "stream-b")
    per_stream = Target(status=TargetStatus.ANY, stream=stream("stream-b"))
    fan_last, fan_each = run_async(
        fanout_delays(daemon, per_stream, extra, watchers=WATCHERS, changes=CHANGES)
    )
    progress(f"{WATCHERS}-watcher fan-out done")
    whole = Target(status=TargetStatus.ANY)
    big_last, _ = run_async(fanout_delays(daemon, whole, extra, watchers=1, changes=BIG_CHANGES))
    progress("whole-registry watch done")
    churn = measure_churn(daemon)
    progress("state changes done")
    edits = run_async(config_delays(daemon, config_path, CONFIG_EDITS))
    alive = daemon.alive()
    code = run_async(daemon.stop())

    print(f"\n  {'metric':<52} {'value':>16} {'vs baseline':>14}")
    row("baseline: Health Check (unary round trips)", f"{baseline:,.0f} /s", "1.00x")
    row("  (measured before / after the calls below)", f"{before:,.0f} / {after:,.0f}")
    for label, rate in (
        (f"Register, pass 1: {TARGETS} new targets (commit)", first),
        ("Register, pass 2: same calls enable them (commit)", enable),
        (f"Register, passes 3-{2 + REFRESH_PASSES}: refresh (keepalive)", refresh),
    ):
        row(label, f"{rate:,.0f} /s", f"{rate / baseline:.2f}x")
    print()
    row("baseline: Health Check round trip, median", ms(rtt), "1.00x")
    for label, value in (
        (f"Register -> all {WATCHERS} Watch streams, p50", statistics.median(fan_last)),
        (f"Register -> all {WATCHERS} Watch streams, p95", percentile(fan_last, 0.95)),
        (f"Register -> one of the {WATCHERS} Watch streams, p50", statistics.median(fan_each)),
        (
            f"Register -> 1 Watch of all {TARGETS + STREAM_B + 1} targets, p50",
            statistics.median(big_last),
        ),
    ):
        row(label, ms(value), f"{value / rtt:.1f}x")
    print()
    churn_layout = f"{PROCESSES}x{CHURN_TASKS_PER_PROCESS} connections"
    row(
        f"baseline: Health Check (grpcio), {CHURN_WATCHERS} watchers",
        f"{churn['baseline']:,.0f} /s",
        "1.00x",
    )
    row(
        f"Register, state changes under {CHURN_WATCHERS} watchers",
        f"{churn['rate']:,.0f} /s",
        f"{churn['rate'] / churn['baseline']:.2f}x",
    )
    row("  its latency, p50 / p99", f"{ms(churn['p50'])} / {ms(churn['p99'])}")
    row("  its latency, max", ms(churn["max"]))
    row(
        "  daemon CPU per call: Register / Health Check",
        f"{ms(churn['change_cpu'])} / {ms(churn['baseline_cpu'])}",
        f"{churn['change_cpu'] / churn['baseline_cpu']:.2f}x",
    )
    row(f"  last reply -> all {CHURN_WATCHERS} watchers final", ms(churn["converged"]))
    print()
    print_config_delays(edits)
    print(
        f"\n  state changes: {churn['calls']} Register calls on the clock ({CHURN_TARGETS} "
        f"stream-c targets flipped ENABLED/DISABLED {CHURN_ROUNDS} times by {churn_layout} "
        "of grpcio clients), "
        f"every one a change committed before its reply; {CHURN_WATCHERS} Watch streams of "
        f"stream-c (ANY) got {churn['updates']:.0f} updates each (median) and all ended with "
        "the final state",
        flush=True,
    )
    print(
        f"\n  fan-out: {CHANGES} isolated changes (register/unregister alternating, "
        f"{PUBLISH_INTERVAL * 1.5 * 1000:.0f} ms apart), filter stream-b "
        f"(ANY) with {STREAM_B}-{STREAM_B + 1} targets, {TARGETS} stream-a targets also in the "
        f"registry; whole-registry watch: {BIG_CHANGES} changes; daemon alive at the end: "
        f"{alive}; exit status after SIGTERM: {code}",
        flush=True,
    )


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mbench-nsp-", dir="/tmp"))
    try:
        with bench_netns() as ns:
            config = workdir / "meridio-configuration.yaml"
            config.write_text(yaml.safe_dump(CONFIG))
            # A long entry timeout: nothing may expire while the benchmark runs.
            daemon = Daemon(
                ns, "nsp", workdir / "d", f"--configuration-file={config}", "--entry-timeout=3600"
            )
            run_async(daemon.start())
            print(
                f"NSP daemon in netns {ns.name}; {os.cpu_count()} CPUs; database on "
                f"{daemon.database.parent}; load: {PROCESSES} client processes x "
                f"{TASKS_PER_PROCESS} connections",
                flush=True,
            )
            try:
                if "config" in sys.argv[1:]:
                    print_config_delays(run_async(config_delays(daemon, config, CONFIG_EDITS)))
                else:
                    measure(daemon, config)
            except BaseException:
                print(f"daemon log (tail):\n{daemon.log_text()[-3000:]}", flush=True)
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
