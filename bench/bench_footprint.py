"""Role footprint: what each role costs to start and to hold (issue 11, "Footprint").

Per role (nsp, ipam, lb, proxy, target):

* **load**: a fresh interpreter loads what the role uses the way ``meridiod`` does before it
  runs the role (``meridio.lean.install()``, ``meridio.daemon``, ``meridio.runtime``, the role's
  plugin): the wall time from spawn until it says so, and its CPU time until then (on a shared
  machine the CPU time is the steadier figure); then it hands the garbage of its imports back
  (``lean.trim()``, as the daemon does once the role has started) and reports its RSS and PSS.
* **ready**: ``meridiod --role=ROLE`` spawned in a throw-away namespace (``mbench-``) until its
  Readiness probe (the health socket) answers SERVING, then its RSS and PSS 0.5 s later. The
  NSP and IPAM the LB and proxy need run beside them (the target opens no stream: it is ready
  without any); every instance measured starts afresh (own run-dir and database).
* **stop**: the same daemons, SIGTERM until the process has exited (readiness off, the
  role's own clean-up: the LB removes its rules, routes and tables, the proxy its links).
* **steady**: a small lab (``meridio.lab``: one LB, one proxy, two targets, two streams on
  conduit-a, static routing, TLS as ``lab up`` sets it; namespaces ``mlab-b<pid>f-``, removed
  afterwards) in which ``target-2`` has both streams open; every role's RSS and PSS 25 s after
  the lab is up. The goal of the issue: the target at <= 45 MB RSS there. Then, in the same
  lab, ``target-2`` closes and opens ``stream-b`` through its TAPA a few times: the time until
  the LB's tables hold exactly the targets with the stream open (the lab polls them every
  0.1 s).

The baseline, measured in the same run: a bare interpreter (``python -c``, reading its own
memory the way the loaders do): its wall time and RSS; ratios are against it. Medians and
minimums of several runs (the machine is shared: the minimum is the least disturbed).

    python -m bench footprint
    MERIDIO_FOOTPRINT_RUNS=20 MERIDIO_FOOTPRINT_STEADY=0 python -m bench footprint
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.common import progress
from meridio.lab import system
from meridio.lab.lab import Lab
from meridio.lab.plan import LabSpec
from tests.netns.daemons import IPAM_PREFIXES, MERIDIOD, Daemon, bench_netns, run_async

ROLES = ("nsp", "ipam", "lb", "proxy", "target")
LOAD_RUNS = int(os.environ.get("MERIDIO_FOOTPRINT_RUNS", "10"))
READY_RUNS = max(2, LOAD_RUNS // 2)
STEADY = float(os.environ.get("MERIDIO_FOOTPRINT_STEADY", "25"))
SETTLE = 0.5
TAPA_ROUNDS = 5
TRENCH, CONDUIT, STREAM = "trench-a", "conduit-a", "stream-a"
CONFIG: dict[str, Any] = {
    "trench": {"name": TRENCH},
    "conduits": {"items": [{"name": CONDUIT, "trench": TRENCH}]},
    "streams": {"items": [{"name": STREAM, "conduit": CONDUIT, "max-targets": 10}]},
    "vips": {"items": [{"name": "vip4", "address": "203.0.113.1/32", "trench": TRENCH}]},
    "flows": {
        "items": [
            {
                "name": "flow-a",
                "stream": STREAM,
                "vips": ["vip4"],
                "protocols": ["tcp"],
                "destination-port-ranges": ["5000"],
            }
        ]
    },
}

# What every loader prints last: its own RSS and PSS (kB), without importing anything.
MEMORY = (
    "def _kb(path, key):\n"
    "    for line in open(path):\n"
    "        if line.startswith(key):\n"
    "            return int(line.split()[1])\n"
    "    return 0\n"
    "print(_kb('/proc/self/status', 'VmRSS:'), _kb('/proc/self/smaps_rollup', 'Pss:'))\n"
)
BARE = MEMORY
# The loader: what ``meridiod`` does before it runs the role, then a line ("loaded" and its
# CPU time so far) the moment that is done; then, as the daemon does once the role has started,
# garbage collected and freed memory handed back (``lean.trim``), and its memory.
LOAD = (
    "import sys\n"
    "from meridio import lean\n"
    "lean.install()\n"
    "import meridio.daemon, meridio.runtime\n"
    "meridio.daemon.load_role(sys.argv[1])\n"
    "import os\n"
    "_t = os.times()\n"
    "print('loaded', _t.user + _t.system, flush=True)\n"
    "getattr(lean, 'loaded', lambda: None)()\n"
    "lean.trim()\n" + MEMORY
)


def memory_kb(pid: int | str) -> tuple[int, int]:
    """RSS and PSS of ``pid`` in kB (``/proc/PID/status``, ``/proc/PID/smaps_rollup``)."""

    def field(path: str, key: str) -> int:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        return 0

    return field(f"/proc/{pid}/status", "VmRSS:"), field(f"/proc/{pid}/smaps_rollup", "Pss:")


def timed(argv: list[str]) -> tuple[float, float, tuple[int, int] | None]:
    """Wall time from spawn to exit, or to its line ``loaded CPU`` when it prints one; its CPU
    time (user and system) until then; the RSS and PSS (kB) it printed last, if any."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        elapsed = time.monotonic() - started
        rest, errors = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:2]} failed ({proc.returncode}): {errors.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if first.startswith("loaded "):
        cpu = float(first.split()[1])
    else:
        elapsed = time.monotonic() - started
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        rest = first + rest
    words = rest.split()
    memory = (int(words[-2]), int(words[-1])) if len(words) >= 2 and words[-1].isdigit() else None
    return elapsed, cpu, memory


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Samples:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.rss: dict[str, list[int]] = {}
        self.pss: dict[str, list[int]] = {}
        self.stop: dict[str, list[float]] = {}

    def add(self, key: str, seconds: float, cpu: float, memory: tuple[int, int] | None) -> None:
        self.times.setdefault(key, []).append(seconds)
        self.cpu.setdefault(key, []).append(cpu)
        if memory is not None:
            self.rss.setdefault(key, []).append(memory[0])
            self.pss.setdefault(key, []).append(memory[1])


# -- load -------------------------------------------------------------------------------------


def measure_load(samples: Samples) -> None:
    """Interleaved: every round runs the baseline, ``meridiod --version`` and each role's
    loader once, so that a busy moment of the machine does not fall on one kind only."""
    kinds: dict[str, list[str]] = {
        "bare": [sys.executable, "-c", BARE],
        "version": [MERIDIOD, "--version"],
        **{role: [sys.executable, "-c", LOAD, role] for role in ROLES},
    }
    for argv in kinds.values():  # warm the page cache and the bytecode caches
        timed(argv)
    for _ in range(LOAD_RUNS):
        for kind, argv in kinds.items():
            seconds, cpu, memory = timed(argv)
            samples.add(kind, seconds, cpu, memory)
    target = samples.times["target"]
    progress(
        f"load: {LOAD_RUNS} rounds; target {statistics.median(target):.3f} s median, "
        f"{min(target):.3f} s min"
    )


# -- ready ------------------------------------------------------------------------------------


class RoleDaemon(Daemon):
    """``meridiod --role=ROLE`` with exactly the arguments given (no --listen/--database)."""

    @property
    def argv(self) -> list[str]:
        return [
            MERIDIOD,
            f"--role={self.role}",
            f"--run-dir={self.run_dir}",
            "--log-format=json",
            *self.extra_args,
        ]


def role_args(role: str, workdir: Path, nsp: Path, ipam: Path, config: Path) -> list[str]:
    if role == "nsp":
        return [
            f"--listen=unix://{workdir / 'nsp.sock'}",
            f"--database={workdir / 'nsp.db'}",
            f"--configuration-file={config}",
        ]
    if role == "ipam":
        return [
            f"--listen=unix://{workdir / 'ipam.sock'}",
            f"--database={workdir / 'ipam.db'}",
            *IPAM_PREFIXES,
        ]
    if role == "lb":
        return [
            f"--nsp=unix://{nsp}",
            f"--trench={TRENCH}",
            f"--conduit={CONDUIT}",
            "--mode=kernel",
        ]
    if role == "proxy":
        return [
            "--instance=proxy-bench",
            "--node=node-bench",
            f"--nsp=unix://{nsp}",
            f"--ipam=unix://{ipam}",
            f"--trench={TRENCH}",
            f"--conduit={CONDUIT}",
            f"--connect-listen=unix://{workdir / 'connect.sock'}",
        ]
    return [
        "--instance=target-bench",
        f"--socket={workdir / 'tapa.sock'}",
        f"--nsp=unix://{nsp}",
        f"--proxies={CONDUIT}=unix://{workdir / 'no-proxy.sock'}",
    ]


def stop(daemon: Daemon) -> float | None:
    """SIGTERM; the seconds until the process exited (None: it had to be killed)."""
    if not daemon.alive():
        return None
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    try:
        run_async(daemon.wait_exit(15))
    except AssertionError:
        daemon.kill()
        return None
    return time.monotonic() - started


def measure_ready(samples: Samples, workdir: Path) -> None:
    config = workdir / "meridio-configuration.yaml"
    config.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    with bench_netns() as ns:
        nsp = Daemon(ns, "nsp", workdir / "nsp", f"--configuration-file={config}")
        ipam = Daemon(ns, "ipam", workdir / "ipam", *IPAM_PREFIXES)
        try:
            for daemon in (nsp, ipam):
                daemon.spawn()
            for daemon in (nsp, ipam):
                run_async(daemon.ready(30))
            progress(f"ready: NSP and IPAM serving in {ns.name}")
            for k in range(READY_RUNS + 1):  # round 0 warms the caches: not counted
                for role in ROLES:
                    where = workdir / f"{role}-{k}"
                    args = role_args(role, where, nsp.socket, ipam.socket, config)
                    daemon = RoleDaemon(ns, role, where, *args)
                    try:
                        started = time.monotonic()
                        daemon.spawn()
                        run_async(daemon.ready(30))
                        seconds = time.monotonic() - started
                        cpu = cpu_seconds(daemon.pid)
                        time.sleep(SETTLE)
                        if k > 0:
                            samples.add(role, seconds, cpu, memory_kb(daemon.pid))
                    finally:
                        stopped = stop(daemon)
                    if k > 0 and stopped is not None:
                        samples.stop.setdefault(role, []).append(stopped)
            target = samples.times["target"]
            progress(
                f"ready: {READY_RUNS} rounds; target {statistics.median(target):.3f} s median, "
                f"{min(target):.3f} s min"
            )
        finally:
            stop(ipam)
            stop(nsp)


# -- steady -----------------------------------------------------------------------------------


STEADY_NAMES = {
    "nsp": "nsp",
    "ipam": "ipam",
    "lb": "lb-1",
    "proxy": "proxy-1",
    "target (stream-a)": "target-1",
    "target (stream-a, stream-b)": "target-2",
}


def measure_tapa(lab: Lab) -> dict[str, list[float]]:
    """``target-2`` closes and opens ``stream-b`` through its TAPA, TAPA_ROUNDS times: the
    seconds until the LB's tables hold exactly the targets with the stream open."""
    times: dict[str, list[float]] = {"close": [], "open": []}
    for _ in range(TAPA_ROUNDS):
        for action in ("close", "open"):
            started = time.monotonic()
            lab.tap("target-2", action, ["stream-b"])
            times[action].append(time.monotonic() - started)
    return times


def measure_steady(workdir: Path) -> tuple[dict[str, tuple[int, int]], dict[str, list[float]]]:
    prefix = f"mlab-b{os.getpid()}f-"
    lab = Lab(workdir / "lab", prefix)
    try:
        started = time.monotonic()
        lab.up(LabSpec(prefix=prefix, lbs=1, proxies=1, targets=2, streams=2, routing="static"))
        streams = {r["stream"]: r["status"] for r in lab.tap_list("target-2")}
        progress(f"steady: lab up in {time.monotonic() - started:.1f} s; target-2 {streams}")
        time.sleep(STEADY)
        state = lab.load()
        out = {}
        for label, name in STEADY_NAMES.items():
            pid = system.role_pid(state.processes[name])
            if pid is not None:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    out[label] = memory_kb(pid)
        if {r["stream"] for r in lab.tap_list("target-2")} != {"stream-a", "stream-b"}:
            progress("steady: target-2 no longer has both streams open!")
        return out, measure_tapa(lab)
    finally:
        lab.down()


# -- report -----------------------------------------------------------------------------------


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def spread(values: Sequence[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    """``median / min`` of ``values`` (times ``scale``), or ``-`` without any."""
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values) * scale)} / {fmt.format(min(values) * scale)}"


def upto(values: Sequence[float]) -> str:
    """``median / max`` of ``values``, or ``-`` without any."""
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} / {max(values):.3f}"


def report(
    load: Samples,
    ready: Samples,
    steady: dict[str, tuple[int, int]],
    tapa: dict[str, list[float]],
) -> None:
    bare_time = statistics.median(load.times["bare"])
    bare_rss = statistics.median(load.rss["bare"])
    wall_ms = spread(load.times["bare"], 1000, "{:.0f}")
    cpu_ms = spread(load.cpu["bare"], 1000, "{:.0f}")
    print(
        f"\n  baseline, a bare interpreter (python -c): wall {wall_ms} ms, CPU {cpu_ms} ms, "
        f"RSS {mb(bare_rss)} MB, PSS {mb(statistics.median(load.pss['bare']))} MB (median / min)"
    )
    version = load.times["version"]
    print(
        f"  meridiod --version: wall {spread(version)} s, CPU {spread(load.cpu['version'])} s, "
        f"x{statistics.median(version) / bare_time:.1f} the baseline's wall time"
    )
    print(
        f"\n  start, s (median / min; load: {LOAD_RUNS} runs, spawn->ready: {READY_RUNS} runs;"
        " x bare: median load wall over the baseline's; SIGTERM->exit: median / max)"
    )
    print(
        f"  {'role':<8} {'load wall':>13} {'load CPU':>13} {'x bare':>7}"
        f" {'ready wall':>13} {'ready CPU':>13} {'SIGTERM->exit':>14}"
    )
    for role in ROLES:
        ratio = statistics.median(load.times[role]) / bare_time
        print(
            f"  {role:<8} {spread(load.times[role]):>13} {spread(load.cpu[role]):>13}"
            f" {ratio:>7.1f} {spread(ready.times.get(role, [])):>13}"
            f" {spread(ready.cpu.get(role, [])):>13} {upto(ready.stop.get(role, [])):>14}"
        )
    print("\n  memory, MB (median / min; x bare: median loaded RSS over the baseline's)")
    print(
        f"  {'role':<8} {'RSS loaded':>13} {'PSS loaded':>13} {'x bare':>7}"
        f" {'RSS ready':>13} {'PSS ready':>13}"
    )
    for role in ROLES:
        ratio = statistics.median(load.rss[role]) / bare_rss
        cells = [
            spread(samples, 1 / 1024, "{:.1f}") for samples in (load.rss[role], load.pss[role])
        ]
        late = [
            spread(samples, 1 / 1024, "{:.1f}")
            for samples in (ready.rss.get(role, []), ready.pss.get(role, []))
        ]
        print(
            f"  {role:<8} {cells[0]:>13} {cells[1]:>13} {ratio:>7.1f} {late[0]:>13} {late[1]:>13}"
        )
    if steady:
        print(f"\n  steady, in the lab {STEADY:.0f} s after it is up (MB; one reading each)")
        print(f"  {'instance':<30} {'RSS':>7} {'PSS':>7} {'x bare':>7}")
        for label, (rss, pss) in steady.items():
            print(f"  {label:<30} {mb(rss):>7} {mb(pss):>7} {rss / bare_rss:>7.1f}")
        two = steady.get("target (stream-a, stream-b)")
        if two is not None:
            verdict = "met" if two[0] <= 45 * 1024 else f"missed by {mb(two[0] - 45 * 1024)} MB"
            print(f"  goal, the target with two streams open at <= 45 MB RSS: {verdict}")
    if tapa:
        print(
            f"\n  TAPA, target-2's stream-b ({TAPA_ROUNDS} times, median / max): close -> out of"
            f" the LB's table {upto(tapa['close'])} s, open -> in it {upto(tapa['open'])} s"
        )
    for what, values in (("wall", load.times["target"]), ("CPU", load.cpu["target"])):
        median = statistics.median(values)
        verdict = "met" if median <= 0.3 else f"missed by {median - 0.3:.3f} s"
        print(f"  goal, the target loaded in <= 0.3 s (median {what} time): {verdict}")


@contextlib.contextmanager
def bytecode_cache(where: Path) -> Iterator[None]:
    """Every process started meanwhile reads (and writes) compiled modules under ``where``,
    as an installed wheel has them: an editable install's sources are not compiled ahead,
    and with PYTHONDONTWRITEBYTECODE set every start would compile meridio again."""
    saved = {k: os.environ.get(k) for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(where)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mbench-footprint-", dir="/tmp"))
    try:
        with bytecode_cache(workdir / "pycache"):
            load, ready = Samples(), Samples()
            measure_load(load)
            measure_ready(ready, workdir)
            steady, tapa = measure_steady(workdir) if STEADY > 0 else ({}, {})
        report(load, ready, steady, tapa)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
