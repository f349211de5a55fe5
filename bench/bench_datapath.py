"""Data-path benchmark: what each LB mode costs against plain kernel forwarding, in one run.

The topology is the LB test topology (tests/netns/lbtopo.py): a client namespace, the LB
namespace and four target namespaces with the VIP on lo. For each case, in the same run:

* ``baseline``: no meridiod; the LB namespace marks VIP packets with a fixed mark (iptables
  ``MARK``) that an ip rule routes to one target: plain kernel forwarding, the ceiling here;
* ``kernel``, ``first-packet`` and ``nfqueue``: ``meridiod --role=lb`` in that mode, four
  targets registered; ``kernel-no-defrag`` is kernel mode with ``--no-defrag`` (no fragment
  reassembly, so no conntrack hook on the path).

Measured per case:

* UDP packets per second: trafgen (netsniff-ng) in the client namespace sends 60-byte IPv4/UDP
  frames over 256 flows to the VIP as fast as it can for a few seconds; delivered packets are
  counted at the targets (nft counters at raw priority), offered ones at the LB's ingress;
* TCP connections per second: wrk with ``Connection: close`` against nginx in every target;
* for ``nfqueue``, also a run paced at 100,000 packets/s by a raw-socket sender: its loss must
  be zero.

Every figure is printed with its ratio to the baseline of the same run; the generator's CPU
use is printed too, to show it is not what limits a case (on 2 cores the generator, the
forwarding and the queue reader share the machine: compare ratios, not absolute rates).
Run: ``make bench`` or ``.venv/bin/python -m bench datapath``; needs root.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netns.lbtopo import VIP4, LbTopology  # noqa: E402

UDP_SECONDS = 5.0
TCP_SECONDS = 5.0
PACED_PPS = 100_000
FLOWS = 256
CASES = ("baseline", "kernel", "kernel-no-defrag", "first-packet", "nfqueue")

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
class Result:
    udp_pps: float = 0.0
    udp_offered: float = 0.0
    udp_loss: float = 0.0
    udp_gen_cpu: float = 0.0
    tcp_cps: float = 0.0
    tcp_errors: int = 0
    tcp_gen_cpu: float = 0.0
    paced_pps: float = 0.0
    paced_offered: float = 0.0
    paced_loss: float | None = None


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
  c16(5001),
  c16(26),
  c16(0),
  fill(0x61, 18),
}}
"""


# A paced sender (trafgen cannot pace evenly): every millisecond it sends that millisecond's
# share of prebuilt IPv4/UDP packets over 256 flows through a raw socket, and spins otherwise.
PACED_SENDER = r"""
import socket, sys, time
from tests.packetbuild import udp_packet
rate, seconds = int(sys.argv[1]), float(sys.argv[2])
packets = [bytes(udp_packet("198.18.0.2", "203.0.113.1", 0x4000 + i, 5001, b"a" * 18))
           for i in range(256)]
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
per_ms, sent, start = rate / 1000.0, 0, time.perf_counter()
while True:
    now = time.perf_counter() - start
    if now >= seconds:
        break
    due = int(now * 1000 * per_ms)
    while sent < due:
        sock.sendto(packets[sent & 255], ("203.0.113.1", 0))
        sent += 1
print(sent)
"""


LB_INGRESS_NFT = """
table inet mbench {
    counter ingress {}
    chain pre {
        type filter hook prerouting priority -400;
        iifname "c0" ip daddr 203.0.113.1 counter name "ingress"
    }
}
"""


def counter(ns: str, table: str, name: str) -> int:
    out = json.loads(ns_run(ns, "nft", "-j", "list", "counter", "inet", table, name).stdout)
    for item in out["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    return 0


def delivered(topo: LbTopology) -> int:
    return sum(t.counters().get("udp4", 0) for t in topo.targets)


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def udp_run(
    topo: LbTopology, workdir: Path, seconds: float, rate: int | None
) -> tuple[float, float, float]:
    """(delivered pps, offered pps, generator CPU share): trafgen flat out, or paced at ``rate``."""
    client, lb = topo.client_ns.name, topo.lb_ns.name
    conf = workdir / "udp.cfg"
    conf.write_text(trafgen_config(mac_of(lb, "c0"), mac_of(client, "eth0")))
    ns_run(lb, "nft", "-f", "-", input=LB_INGRESS_NFT)
    before_in, before_out = counter(lb, "mbench", "ingress"), delivered(topo)
    if rate:
        cmd = ["taskset", "-c", "0", sys.executable, "-c", PACED_SENDER, str(rate), str(seconds)]
    else:
        trafgen = ["trafgen", "--dev", "eth0", "--conf", str(conf), "--cpus", "1", "-q"]
        cmd = ["timeout", "-s", "INT", str(seconds), "taskset", "-c", "0", *trafgen]
        cmd.append("--no-cpu-stats")
    cpu0 = child_cpu()
    started = time.monotonic()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", client, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,  # the paced sender imports tests.packetbuild
    )
    _, err = proc.communicate(seconds + 15)
    elapsed = time.monotonic() - started
    if proc.returncode not in (0, 124, 130):
        raise RuntimeError(f"trafgen failed ({proc.returncode}): {err.decode().strip()}")
    time.sleep(0.5)  # let queues drain before counting
    offered = counter(lb, "mbench", "ingress") - before_in
    got = delivered(topo) - before_out
    ns_run(lb, "nft", "delete", "table", "inet", "mbench")
    return got / seconds, offered / seconds, (child_cpu() - cpu0) / elapsed


def start_nginx(topo: LbTopology, workdir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for target in topo.targets:
        d = workdir / f"nginx-{target.name}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, vip=VIP4))
        procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    target.ns.name,
                    "nginx",
                    "-c",
                    str(d / "nginx.conf"),
                    "-p",
                    str(d),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(0.5)
    return procs


def tcp_run(topo: LbTopology, seconds: float) -> tuple[float, int, float]:
    """(connections per second, errors, generator CPU share) from wrk with Connection: close."""
    cpu0 = child_cpu()
    started = time.monotonic()
    out = ns_run(
        topo.client_ns.name,
        "taskset",
        "-c",
        "0",
        "wrk",
        "-t1",
        "-c64",
        f"-d{int(seconds)}s",
        "-H",
        "Connection: close",
        f"http://{VIP4}/",
    ).stdout
    elapsed = time.monotonic() - started
    rate, errors = 0.0, 0
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            rate = float(line.split()[1])
        if "Socket errors" in line or "Non-2xx" in line:
            errors += sum(int(x) for x in line.replace(",", " ").split() if x.isdigit())
    return rate, errors, (child_cpu() - cpu0) / elapsed


def install_fixed_mark(topo: LbTopology) -> None:
    """The baseline: every VIP packet gets mark 5001, routed to target 1 by a rule and a table."""
    lb = topo.lb_ns.name
    target_ip = topo.targets[0].ipv4
    ns_run(
        lb,
        "iptables",
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-d",
        VIP4,
        "-j",
        "MARK",
        "--set-mark",
        "5001",
    )
    ns_run(lb, "ip", "rule", "add", "fwmark", "5001", "lookup", "5001", "priority", "100")
    ns_run(lb, "ip", "route", "add", "default", "via", target_ip, "table", "5001")


def pin_lb(topo: LbTopology) -> None:
    """Keep the LB (and its queue reader) on CPU 1, the generator runs on CPU 0."""
    if topo.lb is not None and topo.lb.proc is not None:
        subprocess.run(
            ["taskset", "-a", "-pc", "1", str(topo.lb.proc.pid)], capture_output=True, check=False
        )


def run_case(case: str, workdir: Path) -> Result:
    result = Result()
    mode = "kernel" if case in ("baseline", "kernel-no-defrag") else case
    lb_args = ["--no-defrag"] if case == "kernel-no-defrag" else []
    with LbTopology(
        workdir / case,
        targets=4,
        mode=mode,
        lb_args=lb_args,
        servers=False,
        start_lb=case != "baseline",
    ) as topo:
        if case == "baseline":
            install_fixed_mark(topo)
        pin_lb(topo)
        udp_run(topo, workdir, 1.0, None)  # warm up: neighbours, conntrack, queue
        result.udp_pps, result.udp_offered, result.udp_gen_cpu = udp_run(
            topo, workdir, UDP_SECONDS, None
        )
        result.udp_loss = 1 - result.udp_pps / result.udp_offered if result.udp_offered else 0.0
        if case == "nfqueue":
            pps, offered, _ = udp_run(topo, workdir, UDP_SECONDS, PACED_PPS)
            result.paced_pps = pps
            result.paced_offered = offered
            result.paced_loss = 1 - pps / offered if offered else None
        servers = start_nginx(topo, workdir / case)
        try:
            result.tcp_cps, result.tcp_errors, result.tcp_gen_cpu = tcp_run(topo, TCP_SECONDS)
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait(5)
    return result


def main() -> None:
    missing = [
        tool for tool in ("trafgen", "wrk", "nginx", "taskset") if shutil.which(tool) is None
    ]
    if os.geteuid() != 0 or missing:
        print(f"skipped: needs root and {', '.join(missing) or 'nothing else'} (make bench-deps)")
        return
    results: dict[str, Result] = {}
    # MERIDIO_BENCH_CASES=baseline,nfqueue runs a subset (the baseline always runs)
    wanted = os.environ.get("MERIDIO_BENCH_CASES", "")
    cases = [c for c in CASES if not wanted or c == "baseline" or c in wanted.split(",")]
    with tempfile.TemporaryDirectory(prefix="mbench-dp-") as tmp:
        for case in cases:
            print(f"  running {case} ...", flush=True)
            results[case] = run_case(case, Path(tmp))
    base = results["baseline"]
    print()
    print(
        f"  {'case':<13} {'UDP pps':>10} {'ratio':>6} {'loss':>6} {'gen CPU':>8}"
        f"   {'TCP conn/s':>10} {'ratio':>6} {'errors':>6} {'gen CPU':>8}"
    )
    for case, r in results.items():
        print(
            f"  {case:<13} {r.udp_pps:>10,.0f} {r.udp_pps / base.udp_pps:>6.2f} {r.udp_loss:>6.1%}"
            f" {r.udp_gen_cpu:>8.0%}   {r.tcp_cps:>10,.0f} {r.tcp_cps / base.tcp_cps:>6.2f}"
            f" {r.tcp_errors:>6} {r.tcp_gen_cpu:>8.0%}"
        )
    nfq = results.get("nfqueue", Result())
    print(
        f"\n  nfqueue paced at {PACED_PPS:,} pps: offered {nfq.paced_offered:,.0f} pps, "
        f"delivered {nfq.paced_pps:,.0f} pps, "
        f"loss {nfq.paced_loss:.2%}"
        if nfq.paced_loss is not None
        else ""
    )
    print(
        "  goals: kernel >= 0.9 of baseline (UDP); first-packet TCP conn/s >= 0.8 of baseline;"
        " nfqueue >= 100,000 pps without loss"
    )


if __name__ == "__main__":
    main()
