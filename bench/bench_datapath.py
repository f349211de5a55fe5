"""Data-path benchmark: what each LB mode costs against plain kernel forwarding, in one run.

The topology is the LB test topology (tests/netns/lbtopo.py): a client namespace, the LB
namespace and four target namespaces with the VIP on lo. The cases:

* ``baseline``: no meridiod; the LB namespace marks VIP packets with a fixed mark (iptables
  ``MARK``) that an ip rule routes to one target: plain kernel forwarding, the yardstick;
* ``kernel``: ``meridiod --role=lb --mode=kernel`` with its ingress fast path on the client
  link (``--fast-path-interfaces=c0``): VIP packets are steered and forwarded at ingress;
* ``kernel-routed``: kernel mode without the fast path (``--no-fast-path``): mark, ip rule,
  routing, as for every packet the fast path leaves to the routed path;
* ``first-packet``, ``nfqueue``: meridiod in those modes; ``nfqueue-2q``: with two queues, a
  reader each (``--queues=2``), and each reader's share of the packets;
* ``nfqueue-c``: no meridiod; the same NFQUEUE rule and fwmark routing, read by the minimal C
  reader ``bench/nfq_reader.c`` (libnetfilter_queue, one verdict with a mark per packet from a
  hash lookup, the same queue length and copy range as the LB's reader), built with gcc.

The machine is shared and its load changes by the second, so cases are never compared across
minutes: every case is measured in rounds, and in each round the baseline and the case (for
``nfqueue`` also the C reader) are measured back to back, in alternating order. A ratio is
taken within a round; the table shows the median ratio over the rounds and their range.

Measured per case and round:

* UDP packets per second: trafgen (netsniff-ng) in the client namespace sends 60-byte IPv4/UDP
  frames over 256 flows to the VIP as fast as it can; delivered packets are counted at the
  targets (nft counters at raw priority, which then drop them), offered ones by the LB's
  client link statistics;
* TCP connections per second: wrk with ``Connection: close`` against nginx in every target;
* ``nfqueue`` and ``nfqueue-c`` also get runs paced at 100,000 packets/s by ``bench/paced_udp.c``
  (a raw-socket sender that spreads each 100 µs's share evenly): loss must be zero.

On 2 cores the generator, the forwarding and the queue reader share the machine: compare
ratios, not absolute rates. The generator runs on CPU 0, the LB (and the C reader) on CPU 1.
Run: ``make bench`` or ``.venv/bin/python -m bench datapath``; needs root. Environment:
``MERIDIO_BENCH_CASES=kernel,nfqueue`` runs a subset, ``MERIDIO_BENCH_ROUNDS`` (default 10)
and ``MERIDIO_BENCH_SECONDS`` (default 1.5) set the UDP rounds and the length of each UDP
measurement (TCP: half the rounds, at least 3, of 2 s each).
``MERIDIO_BENCH_NO_ARGS=1`` leaves out the cases' LB flags (to measure an older meridiod that
does not know them, with ``PYTHONPATH`` pointing at its sources).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meridio.lb import nfq  # noqa: E402
from tests.netns.lbtopo import (  # noqa: E402
    CLIENT4,
    COUNTER_TABLE,
    MAX_TARGETS,
    OFFSET,
    PORT,
    VIP4,
    LbTopology,
)

ROUNDS = int(os.environ.get("MERIDIO_BENCH_ROUNDS", "10"))
SECONDS = float(os.environ.get("MERIDIO_BENCH_SECONDS", "1.5"))
TCP_ROUNDS = max(3, ROUNDS // 2)
TCP_SECONDS = 2.0
PACED_PPS = 100_000
PACED_SECONDS = 5.0
# the LB reader's queue length and copy range (an older meridio's: 4096 and 512)
QUEUE_LEN = int(getattr(nfq, "QUEUE_LENGTH", 4096))
COPY_RANGE = int(getattr(nfq, "COPY_RANGE", 512))
TARGETS = 4

# case -> (LB mode or None for no meridiod, LB flags)
CASES: dict[str, tuple[str | None, list[str]]] = {
    "kernel": ("kernel", ["--fast-path-interfaces=c0"]),
    "kernel-routed": ("kernel", ["--no-fast-path"]),
    "first-packet": ("first-packet", []),
    "nfqueue": ("nfqueue", []),
    # two queues, a reader each (``--queues``): packets spread over them by flow
    "nfqueue-2q": ("nfqueue", ["--queues=2"]),
}
LB_ARGS = ["--resync-period=5"]  # the default (the test topology resyncs every second)
# measured together, in each round: the baseline, the case and these
COMPANIONS = {"nfqueue": ["nfqueue-c"]}

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server {{
        listen {vip}:80 reuseport backlog=4096;
        location / {{ return 204; }}
    }}
}}
"""


@dataclass
class Sample:
    udp_pps: float = 0.0
    udp_offered: float = 0.0
    gen_cpu: float = 0.0
    """Share of a CPU the generator used, with the forwarding it did in its softirq context."""
    cost: float = 0.0
    """CPU seconds per million delivered packets: the generator's, the softirq threads', and
    the queue reader's (meridiod or the C reader, nfqueue cases only: in the other modes the
    LB's daemon does no per-packet work)."""
    reader_cost: float = 0.0
    """The queue reader's CPU seconds per million delivered packets."""
    tcp_cps: float = 0.0
    tcp_errors: int = 0


@dataclass
class Runner:
    """One topology under test, ready to measure."""

    name: str
    topo: LbTopology
    workdir: Path
    reader_pid: int | None = None
    samples: list[Sample] = field(default_factory=list)
    last_cost: float = 0.0
    last_reader_cost: float = 0.0
    spread: bool = False
    """The baseline spreads by client port (TCP) instead of its fixed mark (UDP)."""
    paced: list[tuple[float, float]] = field(default_factory=list)  # (offered, delivered)


def ns_run(ns: str, *cmd: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd],
        capture_output=True,
        text=True,
        check=True,
        **kwargs,  # type: ignore[arg-type]
    )


def mac_of(ns: str, dev: str) -> str:
    info = json.loads(ns_run(ns, "ip", "-j", "link", "show", dev).stdout)
    return str(info[0]["address"])


def trafgen_config(dst_mac: str, src_mac: str) -> str:
    """One IPv4/UDP frame of 60 bytes; the low byte of the source port is random (256 flows)."""
    mac = lambda m: ", ".join(f"0x{b}" for b in m.split(":"))  # noqa: E731
    return f"""{{
  {mac(dst_mac)},
  {mac(src_mac)},
  c16(0x0800),
  0x45, 0x00, c16(46), c16(0), c16(0x4000), 64, 17, csumip(14, 33),
  198, 18, 0, 2,
  203, 0, 113, 1,
  0x40, drnd(),
  c16({PORT}),
  c16(26),
  c16(0),
  fill(0x61, 18),
}}
"""


def build_tools(workdir: Path) -> dict[str, Path]:
    """Compile the C reader and the paced sender (gcc, libnetfilter-queue-dev)."""
    tools = {}
    for name, libs in (("nfq_reader", ["-lnetfilter_queue"]), ("paced_udp", [])):
        out = workdir / name
        subprocess.run(
            ["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / f"{name}.c"), *libs],
            check=True,
            capture_output=True,
        )
        tools[name] = out
    return tools


def offered_count(topo: LbTopology) -> int:
    """Packets received on the LB's client link (its statistics: no hook in the path)."""
    info = json.loads(ns_run(topo.lb_ns.name, "ip", "-j", "-s", "link", "show", "c0").stdout)
    return int(info[0]["stats64"]["rx"]["packets"])


def delivered(topo: LbTopology) -> int:
    return sum(t.counters().get("udp4", 0) for t in topo.targets)


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int | None) -> float:
    """CPU seconds a process (all its threads) used so far; 0 when it is gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def softirq_threads() -> list[int]:
    """The ksoftirqd threads: softirq work the kernel defers runs there, not in the sender."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


SOFTIRQ_THREADS = softirq_threads()


def udp_run(
    runner: Runner, seconds: float, rate: int | None, tools: dict[str, Path]
) -> tuple[float, float, float]:
    """(delivered pps, offered pps, generator CPU share): trafgen flat out, or paced at ``rate``."""
    topo = runner.topo
    client = topo.client_ns.name
    before_in, before_out = offered_count(topo), delivered(topo)
    if rate:
        cmd = ["taskset", "-c", "0", str(tools["paced_udp"]), CLIENT4, VIP4, str(PORT)]
        cmd += [str(rate), str(seconds)]
    else:
        conf = runner.workdir / "udp.cfg"
        trafgen = ["trafgen", "--dev", "eth0", "--conf", str(conf), "--cpus", "1", "-q"]
        cmd = ["timeout", "-s", "INT", str(seconds), "taskset", "-c", "0", *trafgen]
        cmd.append("--no-cpu-stats")
    cpu0 = child_cpu()
    softirq0 = sum(process_cpu(pid) for pid in SOFTIRQ_THREADS)
    reader0 = process_cpu(runner.reader_pid)
    started = time.monotonic()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", client, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = proc.communicate(timeout=seconds + 15)
    elapsed = time.monotonic() - started
    if proc.returncode not in (0, 124, 130):
        raise RuntimeError(f"generator failed ({proc.returncode}): {err.decode().strip()}")
    time.sleep(0.3)  # let queues drain before counting
    offered = offered_count(topo) - before_in
    got = delivered(topo) - before_out
    gen = child_cpu() - cpu0
    softirq = sum(process_cpu(pid) for pid in SOFTIRQ_THREADS) - softirq0
    reader = process_cpu(runner.reader_pid) - reader0
    runner.last_cost = (gen + softirq + reader) / got * 1e6 if got else 0.0
    runner.last_reader_cost = reader / got * 1e6 if got else 0.0
    return got / seconds, offered / seconds, gen / elapsed


def tcp_run(topo: LbTopology, seconds: float) -> tuple[float, int]:
    """(connections per second, errors) from wrk with Connection: close."""
    out = ns_run(
        topo.client_ns.name,
        "taskset",
        "-c",
        "0",
        "wrk",
        "-t1",
        "-c64",
        f"-d{max(1, round(seconds))}s",
        "-H",
        "Connection: close",
        f"http://{VIP4}/",
    ).stdout
    rate, errors = 0.0, 0
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            rate = float(line.split()[1])
        if "Socket errors" in line or "Non-2xx" in line:
            errors += sum(int(x) for x in line.replace(",", " ").split() if x.isdigit())
    return rate, errors


def start_nginx(stack: ExitStack, topo: LbTopology, workdir: Path) -> None:
    for target in topo.targets:
        d = workdir / f"nginx-{target.name}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, vip=VIP4))
        proc = subprocess.Popen(
            ["ip", "netns", "exec", target.ns.name, "nginx", "-c", f"{d}/nginx.conf", "-p", str(d)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(_stop, proc)
    time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


FIXED_MARK = ["-t", "mangle", "-A", "PREROUTING", "-d", VIP4, "-j", "MARK", "--set-mark"]
# For TCP the baseline spreads connections over the targets by the low bits of the client's
# port (a fixed mark per port class): one nginx alone would bound the connection rate, and on
# a shared machine one process gets a fourth of the CPU four get.
SPREAD = f"""
table ip mbench {{
    chain pre {{
        type filter hook prerouting priority mangle; policy accept;
        ip daddr {VIP4} meta mark set tcp sport & 3 map {{ {
    ", ".join(f"{i} : {OFFSET + 1 + i}" for i in range(TARGETS))
} }}
    }}
}}
"""


def install_fixed_mark(topo: LbTopology) -> None:
    """The baseline: every VIP packet gets mark 5001, routed to target 1 by a rule and a table
    (the tables of the other targets are there for the TCP spread)."""
    lb = topo.lb_ns.name
    ns_run(lb, "iptables", *FIXED_MARK, str(OFFSET + 1))
    _fwmark_routes(topo, [t.ipv4 for t in topo.targets])


def spread_for_tcp(topo: LbTopology) -> None:
    lb = topo.lb_ns.name
    delete = ["-D" if arg == "-A" else arg for arg in FIXED_MARK]
    ns_run(lb, "iptables", *delete, str(OFFSET + 1))
    ns_run(lb, "nft", "-f", "-", input=SPREAD)


def _fwmark_routes(topo: LbTopology, gateways: list[str]) -> None:
    lb = topo.lb_ns.name
    for i, gateway in enumerate(gateways, start=1):
        table = str(OFFSET + i)
        ns_run(lb, "ip", "rule", "add", "fwmark", table, "lookup", table, "priority", "100")
        ns_run(lb, "ip", "route", "add", "default", "via", gateway, "table", table)


def start_c_reader(stack: ExitStack, topo: LbTopology, tools: dict[str, Path]) -> int:
    """The NFQUEUE rule, a table and route per target, and the C reader on CPU 1."""
    lb = topo.lb_ns.name
    ns_run(lb, "iptables", "-t", "mangle", "-A", "PREROUTING", "-d", VIP4, "-j", "NFQUEUE")
    _fwmark_routes(topo, [t.ipv4 for t in topo.targets])
    size = 1009  # the LB's M for max-targets 10
    assert MAX_TARGETS == 10
    args = [str(n) for n in (0, QUEUE_LEN, COPY_RANGE, size, OFFSET + 1, TARGETS)]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lb, "taskset", "-c", "1", str(tools["nfq_reader"]), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"nfq_reader did not start: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
    stack.callback(_stop, proc)
    return proc.pid  # ip netns exec and taskset exec it: the reader's own pid


def pin_lb(topo: LbTopology) -> None:
    """Keep the LB (and its queue reader) on CPU 1, the generator runs on CPU 0."""
    if topo.lb is not None and topo.lb.proc is not None:
        subprocess.run(
            ["taskset", "-a", "-pc", "1", str(topo.lb.proc.pid)], capture_output=True, check=False
        )


@contextmanager
def topology(name: str, workdir: Path, tools: dict[str, Path], no_args: bool) -> Iterator[Runner]:
    """A topology for one case, with nginx in every target."""
    mode, args = CASES.get(name, (None, []))
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        topo = stack.enter_context(
            LbTopology(
                workdir,
                targets=TARGETS,
                mode=mode or "kernel",
                lb_args=LB_ARGS + ([] if no_args else args),
                servers=False,
                start_lb=mode is not None,
                fast_path=not no_args,
            )
        )
        reader = None
        if name == "baseline":
            install_fixed_mark(topo)
        elif name == "nfqueue-c":
            reader = start_c_reader(stack, topo, tools)
        elif mode == "nfqueue" and topo.lb is not None and topo.lb.proc is not None:
            reader = topo.lb.proc.pid  # meridiod's queue readers
        pin_lb(topo)
        # the targets count the datagrams and drop them: their own handling (a port
        # unreachable for each, routed back) would cost as much again as the forwarding
        for target in topo.targets:
            target.ns.run("nft", "add", "rule", "inet", COUNTER_TABLE, "prerouting", "udp",
                          "dport", str(PORT), "drop")  # fmt: skip
        runner = Runner(name, topo, workdir, reader)
        (workdir / "udp.cfg").write_text(
            trafgen_config(mac_of(topo.lb_ns.name, "c0"), mac_of(topo.client_ns.name, "eth0"))
        )
        start_nginx(stack, topo, workdir)
        udp_run(runner, 1.0, None, tools)  # warm up: neighbours, conntrack, queue
        yield runner


def measure(group: list[Runner], tools: dict[str, Path]) -> None:
    """``ROUNDS`` rounds of UDP, then ``TCP_ROUNDS`` of TCP; in each round every runner once,
    back to back, the order rotating from round to round."""
    samples = [{runner.name: Sample() for runner in group} for _ in range(ROUNDS)]
    for r in range(ROUNDS):
        for runner in group[r % len(group) :] + group[: r % len(group)]:
            s = samples[r][runner.name]
            s.udp_pps, s.udp_offered, s.gen_cpu = udp_run(runner, SECONDS, None, tools)
            s.cost, s.reader_cost = runner.last_cost, runner.last_reader_cost
    for runner in group:
        if runner.name == "baseline" and not runner.spread:
            spread_for_tcp(runner.topo)
            runner.spread = True
    for r in range(TCP_ROUNDS):
        for runner in group[r % len(group) :] + group[: r % len(group)]:
            s = samples[r][runner.name]
            s.tcp_cps, s.tcp_errors = tcp_run(runner.topo, TCP_SECONDS)
    for runner in group:
        runner.samples = [samples[r][runner.name] for r in range(ROUNDS)]


def ratios(case: Runner, base: Runner, attr: str) -> list[float]:
    return [
        getattr(c, attr) / getattr(b, attr)
        for c, b in zip(case.samples, base.samples, strict=True)
        if getattr(b, attr) and getattr(c, attr)
    ]


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return f"{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})"


def report(case: Runner, base: Runner) -> None:
    udp = [s.udp_pps for s in case.samples]
    tcp = [s.tcp_cps for s in case.samples if s.tcp_cps]
    loss = [1 - s.udp_pps / s.udp_offered for s in case.samples if s.udp_offered]
    errors = sum(s.tcp_errors for s in case.samples)
    udp_ratio = spread(ratios(case, base, "udp_pps"))
    # the baseline's CPU cost per packet over the case's: the throughput ratio the case would
    # have where it had the machine to itself (forwarding is CPU-bound), much less sensitive
    # to what else the machine runs
    per_cpu = ratios(base, case, "cost")
    print(
        f"  {case.name:<14} {spread(udp, '{:,.0f}'):>26} {udp_ratio:>18}"
        f" {spread(per_cpu):>18} {spread(loss, '{:.1%}'):>22}   {spread(tcp, '{:,.0f}'):>22}"
        f" {spread(ratios(case, base, 'tcp_cps')):>18} {errors:>6}",
        flush=True,
    )


def main() -> None:
    missing = [
        tool for tool in ("trafgen", "wrk", "nginx", "taskset", "gcc") if shutil.which(tool) is None
    ]
    if os.geteuid() != 0 or missing:
        print(f"skipped: needs root and {', '.join(missing) or 'nothing else'} (make bench-deps)")
        return
    wanted = os.environ.get("MERIDIO_BENCH_CASES", "")
    no_args = bool(os.environ.get("MERIDIO_BENCH_NO_ARGS"))
    cases = [c for c in CASES if not wanted or c in wanted.split(",")]
    print(
        f"  UDP: {ROUNDS} rounds of {SECONDS:g} s, TCP: {TCP_ROUNDS} rounds of {TCP_SECONDS:g} s;"
        " median (range) over the rounds; ratios to the baseline of the same round",
        flush=True,
    )
    header = (
        f"  {'case':<14} {'UDP pps':>26} {'ratio':>18} {'CPU cost ratio':>18} {'loss':>22}"
        f"   {'TCP conn/s':>22} {'ratio':>18} {'errors':>6}"
    )
    with tempfile.TemporaryDirectory(prefix="mbench-dp-") as tmp:
        work = Path(tmp)
        tools = build_tools(work)
        with topology("baseline", work / "baseline", tools, no_args) as base:
            for case in cases:
                print(f"\n  measuring {case} ...", flush=True)
                names = [case, *COMPANIONS.get(case, [])]
                with ExitStack() as stack:
                    group = [base] + [
                        stack.enter_context(topology(n, work / n, tools, no_args)) for n in names
                    ]
                    base.samples.clear()
                    if base.spread:  # back to the fixed mark for UDP
                        ns_run(base.topo.lb_ns.name, "nft", "delete", "table", "ip", "mbench")
                        ns_run(base.topo.lb_ns.name, "iptables", *FIXED_MARK, str(OFFSET + 1))
                        base.spread = False
                    measure(group, tools)
                    print(header)
                    for runner in group:
                        report(runner, base)
                    if len(names) > 1:
                        ours, c_reader = group[1], group[2]
                        reader_ratio = ratios(c_reader, ours, "reader_cost")
                        print(
                            f"  {ours.name} / {c_reader.name}: UDP"
                            f" {spread(ratios(ours, c_reader, 'udp_pps'))}, reader CPU per"
                            f" packet (C's / ours) {spread(reader_ratio)}, TCP"
                            f" {spread(ratios(ours, c_reader, 'tcp_cps'))}"
                        )
                    for runner in group[1:]:
                        if CASES.get(runner.name, (None,))[0] == "nfqueue":
                            per_reader(runner)
                        if runner.name.startswith("nfqueue"):
                            paced(runner, tools)


def queued_per_queue(ns: str) -> dict[int, int]:
    """Packets each queue of ``ns`` has taken so far (the kernel's id sequence per queue)."""
    text = ns_run(ns, "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    return {int(f[0]): int(f[7]) for f in (line.split() for line in text.splitlines()) if f}


def per_reader(runner: Runner) -> None:
    """Each reader's share of the packets queued in the whole run, and its UDP rate (the
    case's median delivered rate times that share)."""
    counts = queued_per_queue(runner.topo.lb_ns.name)
    total = sum(counts.values())
    if not total:
        return
    rate = statistics.median(s.udp_pps for s in runner.samples)
    text = ", ".join(
        f"queue {q}: {n / total:.0%}, {rate * n / total:,.0f} pps"
        for q, n in sorted(counts.items())
    )
    print(f"  {runner.name} per reader: {text}", flush=True)


def paced(runner: Runner, tools: dict[str, Path]) -> None:
    for _ in range(2):
        pps, offered, _ = udp_run(runner, PACED_SECONDS, PACED_PPS, tools)
        runner.paced.append((offered, pps))
    text = ", ".join(
        f"offered {o:,.0f} delivered {d:,.0f} (loss {max(0.0, 1 - d / o) if o else 0:.2%})"
        for o, d in runner.paced
    )
    print(f"  {runner.name} paced at {PACED_PPS:,} pps: {text}", flush=True)


if __name__ == "__main__":
    main()
