"""``meridioctl traffic`` for real: servers and clients as processes in two namespaces.

Topology: namespace ``cli`` (198.18.0.1, fd00:18::1) and namespace ``srv`` (198.18.0.2,
fd00:18::2) joined by a veth. ``srv`` holds VIP-like addresses on ``lo`` (203.0.113.1-3,
2001:db8::1-3) that ``cli`` routes through the veth, as an external client reaches Meridio's VIPs.

- server ``srv-a`` binds 203.0.113.1:5000 and [2001:db8::1]:5000;
- server ``srv-b`` binds [::]:5001 (dual-stack wildcard), so its UDP replies must leave from
  the VIP the request went to, not from the veth address;
- clients (TCP and UDP, IPv4 and IPv6) spread over both: every packet answered, both named;
- killing the only server of a run: its connections are lost, reconnects fail;
- SIGTERM stops a server with status 0; ``analyze`` renders a saved report and a PNG;
- the probe (new connections at a fixed rate): every attempt answered and named, round-robin
  over IPv4 and IPv6; against a port nobody listens on every attempt refused, the failure
  window the whole run; a server killed and restarted mid-run: one window, about the outage.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from meridio.lab.lab import parse_progress
from tests.conftest import Netns
from tests.waiting import wait_until

pytestmark = pytest.mark.netns

TRAFFIC = (sys.executable, "-m", "meridio.traffic")


class Lab:
    def __init__(self, factory: Callable[[str], Netns]) -> None:
        self.cli = factory("tc-")
        self.srv = factory("ts-")
        for ns in (self.cli, self.srv):
            ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        self.cli.run(
            "ip", "link", "add", "c0", "type", "veth", "peer", "name", "s0", "netns", self.srv.name
        )
        for ns, dev, last in ((self.cli, "c0", 1), (self.srv, "s0", 2)):
            ns.run("ip", "addr", "add", f"198.18.0.{last}/24", "dev", dev)
            ns.run("ip", "addr", "add", f"fd00:18::{last}/64", "dev", dev, "nodad")
            ns.run("ip", "link", "set", dev, "up")
        for n in (1, 2, 3):
            self.srv.run("ip", "addr", "add", f"203.0.113.{n}/32", "dev", "lo")
            self.srv.run("ip", "addr", "add", f"2001:db8::{n}/128", "dev", "lo", "nodad")
        self.cli.run("ip", "route", "add", "203.0.113.0/24", "via", "198.18.0.2")
        self.cli.run("ip", "route", "add", "2001:db8::/32", "via", "fd00:18::2")
        # Resolve the neighbours both ways now, so that no first SYN waits for them (and is
        # sent again only a second later).
        for address in ("203.0.113.1", "2001:db8::1"):
            self.cli.run("ping", "-c", "1", "-W", "2", address)

    def server(self, name: str, *addresses: str) -> subprocess.Popen[bytes]:
        args = [a for address in addresses for a in ("-a", address)]
        proc = self.srv.popen(*TRAFFIC, "server", "--name", name, *args, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 15)
        line = proc.stderr.readline().decode() if ready else ""
        assert "serving on" in line, f"server {name} did not start: {line!r}"
        return proc

    def client(self, *args: str) -> subprocess.Popen[bytes]:
        return self.cli.popen(
            *TRAFFIC, "client", "-o", "json", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def probe(self, *args: str) -> subprocess.Popen[bytes]:
        return self.cli.popen(
            *TRAFFIC, "probe", "-o", "json", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )


def wait_progress(
    proc: subprocess.Popen[bytes], condition: Callable[[dict[str, int]], bool]
) -> None:
    """Read a client's progress lines (``--progress line``) until one satisfies ``condition``."""
    assert proc.stderr is not None
    stderr = proc.stderr

    def met() -> bool:
        ready, _, _ = select.select([stderr], [], [], 0.1)
        if not ready:
            return False
        line = stderr.readline().decode()
        assert line, "the client ended"
        return condition(parse_progress(line))

    wait_until(met, what="the client's progress", interval=0)


def finish(
    proc: subprocess.Popen[bytes], timeout: float = 20, status: int = 0
) -> tuple[dict[str, Any], str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == status, err.decode()
    return json.loads(out), err.decode()


@pytest.fixture
def lab(netns_factory: Callable[[str], Netns]) -> Lab:
    return Lab(netns_factory)


def test_clean_runs_tcp_udp_ipv4_ipv6_and_analyze(lab: Lab, tmp_path: Path) -> None:
    lab.server("srv-a", "203.0.113.1:5000", "[2001:db8::1]:5000")
    lab.server("srv-b", "[::]:5001")
    targets = {
        4: ("203.0.113.1:5000", "203.0.113.2:5001"),
        6: ("[2001:db8::1]:5000", "[2001:db8::2]:5001"),
    }
    runs = {}
    for proto in ("tcp", "udp"):
        for family, (first, second) in targets.items():
            extra = ["--udp"] if proto == "udp" else []
            if (proto, family) == ("tcp", 4):
                extra += ["--progress", "line", "--save", str(tmp_path / "report.json")]
            runs[proto, family] = lab.client(
                "-a", first, "-a", second, "-c", "10", "-r", "200", "-d", "2", *extra
            )
    for (proto, family), proc in runs.items():
        report, err = finish(proc)
        what = f"{proto}/ipv{family}"
        assert report["settings"]["protocol"] == proto
        # Slot i starts on address i mod 2: five connections each.
        assert report["hosts"] == {"srv-a": 5, "srv-b": 5}, what
        assert report["lost_connections"] == 0 and report["lost_per_host"] == {}, what
        assert report["failed_connects"] == 0, what
        assert report["sent"] == report["received"] > 0, what
        # About 400 packets were due; a busy host may make the senders skip some (dropped).
        assert report["sent"] + report["dropped"] >= 300, what
        assert sum(s["sent"] for s in report["samples"]) == report["sent"], what
        for conn in report["connections"]:
            assert conn["state"] == "lasted" and conn["error"] is None, what
            assert conn["sent"] == conn["received"] > 0, what
            if family == 4:
                assert conn["local"].startswith("198.18.0.1:"), what
                assert conn["remote"] in targets[4], what
            else:
                assert conn["local"].startswith("[fd00:18::1]:"), what
                assert conn["remote"] in targets[6], what
            assert conn["host"] == ("srv-a" if conn["remote"] == targets[family][0] else "srv-b")
        if (proto, family) == ("tcp", 4):
            assert "conn active/failed/connecting: 10/0/0" in err
            saved = json.loads((tmp_path / "report.json").read_text())
            assert saved["hosts"] == report["hosts"] and saved["sent"] == report["sent"]

    chart = tmp_path / "hosts.png"
    shown = subprocess.run(
        [*TRAFFIC, "analyze", str(tmp_path / "report.json"), "--chart", str(chart)],
        capture_output=True,
        text=True,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "Connections per target" in shown.stdout
    for text in ("srv-a", "srv-b", "lost connections", "failed connects"):
        assert text in shown.stdout
    data = chart.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"Matplotlib" in data  # the Software text chunk matplotlib writes


def test_killing_the_server_loses_connections_then_connects_fail(lab: Lab) -> None:
    server = lab.server("srv-c", "[::]:5002")
    common = ["-c", "6", "-r", "120", "-d", "3", "--retries", "3", "--retry-delay", "0.1"]
    tcp = lab.client("-a", "203.0.113.3:5002", *common, "--progress", "line")
    udp = lab.client("-a", "[2001:db8::3]:5002", "--udp", *common, "--progress", "line")
    for proc in (tcp, udp):  # both clients up and answered
        wait_progress(proc, lambda p: p.get("active") == 6 and p["received"] >= 6)
    server.kill()
    server.wait(5)
    for proto, proc in (("tcp", tcp), ("udp", udp)):
        report, _ = finish(proc)
        assert report["hosts"].get("srv-c", 0) >= 6, proto
        assert report["lost_connections"] >= 6, proto
        assert report["lost_per_host"] == {"srv-c": report["lost_connections"]}, proto
        # Then every slot tried to reconnect to a port nobody listens on (TCP: refused at once,
        # three times; UDP: refused, or unanswered for the connect timeout where the kernel's
        # ICMP rate limit swallowed the error), and nothing lasted.
        assert report["failed_connects"] >= 6, proto
        if proto == "tcp":
            assert report["failed_connects"] == 6 * 3
        assert {c["state"] for c in report["connections"]} <= {"lost", "failed", "aborted"}
        lost = [c for c in report["connections"] if c["state"] == "lost"]
        assert all(c["error"] for c in lost), proto
        if proto == "udp":
            assert {c["error"] for c in lost} <= {
                "connection refused (port unreachable)",
                "no reply for more than 3s",
            }


def test_server_sigterm_and_garbage(lab: Lab) -> None:
    server = lab.server("srv-d", "[::]:5003")
    garbage = """
import os, socket, struct
for i in range(100):
    s = socket.create_connection(("203.0.113.1", 5003), timeout=5)
    s.sendall(os.urandom(1 + i * 97 % 5000))
    if i % 2:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.settimeout(5)
for size in (0, 1, 64, 1500, 60000):
    u.sendto(os.urandom(size), ("2001:db8::1", 5003))
    data, peer = u.recvfrom(65536)
    assert len(data) == size and peer[0] == "2001:db8::1", (size, peer)
print("ok")
"""
    result = lab.cli.run(sys.executable, "-c", garbage)
    assert result.stdout.strip() == "ok", result.stderr
    report, _ = finish(lab.client("-a", "203.0.113.1:5003", "-c", "5", "-r", "100", "-d", "1"))
    assert report["hosts"] == {"srv-d": 5} and report["sent"] == report["received"] > 0
    server.send_signal(signal.SIGTERM)
    assert server.wait(5) == 0
    assert server.stderr is not None
    rest = server.stderr.read().decode()
    assert "stopping on SIGTERM" in rest and "stopped:" in rest


def test_probe_answered_then_refused(lab: Lab, tmp_path: Path) -> None:
    lab.server("srv-p", "203.0.113.1:5004")
    lab.server("srv-q", "[2001:db8::2]:5004")
    both = ("-a", "203.0.113.1:5004", "-a", "[2001:db8::2]:5004", "-r", "50", "-d", "2")
    save = tmp_path / "probe.json"
    tcp = lab.probe(*both, "--progress", "line", "--save", str(save))
    udp = lab.probe(*both, "--udp")
    dead = lab.probe("-a", "203.0.113.3:5999", "-r", "50", "-d", "2")
    for proto, proc in (("tcp", tcp), ("udp", udp)):
        report, err = finish(proc)
        assert report["kind"] == "probe" and report["protocol"] == proto
        # 100 attempts were due; a busy host may make the prober skip a few.
        assert report["attempts"] + report["skipped"] == 100, proto
        assert report["skipped"] <= 10, proto
        assert report["ok"] == report["attempts"] and report["failed"] == 0, proto
        # Round-robin: even attempts to srv-p, odd ones to srv-q.
        assert set(report["hosts"]) == {"srv-p", "srv-q"}, proto
        assert sum(report["hosts"].values()) == report["ok"], proto
        assert min(report["hosts"].values()) >= 40, proto
        assert report["failures"] == [] and report["failure_window"] == 0, proto
        assert [s["t"] for s in report["samples"]] == [0, 1], proto
        if proto == "tcp":
            assert "new connections ok/failed/skipped:" in err
            assert json.loads(save.read_text()) == report

    report, err = finish(dead, status=1)
    assert "no attempt succeeded" in err
    assert report["ok"] == 0 and report["hosts"] == {}
    assert report["failed"] == report["attempts"] >= 90
    assert report["errors"] == {"refused": report["failed"]}
    assert {f["error"] for f in report["failures"]} == {"refused"}
    assert {f["address"] for f in report["failures"]} == {"203.0.113.3:5999"}
    # Refused at once from the first attempt (due at 0) to the last (due at 1.98).
    assert report["first_failure"] < 0.1 and report["last_failure"] > 1.9
    assert 1.85 < report["failure_window"] < 2.1
    assert len(report["failure_periods"]) == 1

    shown = subprocess.run(
        [*TRAFFIC, "analyze", str(save)],
        capture_output=True,
        text=True,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    for text in ("New connections", "failure window", "0.000 s", "srv-p", "srv-q"):
        assert text in shown.stdout


def test_probe_measures_a_server_outage(lab: Lab) -> None:
    server = lab.server("before", "[::]:5005")
    probe = lab.probe("-a", "203.0.113.1:5005", "-r", "100", "-d", "5", "--progress", "line")
    assert probe.stderr is not None
    # The first progress line: the probe runs (and has had a second of answers).
    ready, _, _ = select.select([probe.stderr], [], [], 15)
    assert ready and b"new connections" in probe.stderr.readline()
    killing = time.time()
    server.kill()
    server.wait(5)
    time.sleep(0.5)  # the outage itself: nothing listens for half a second
    lab.server("after", "[::]:5005")
    back = time.time()
    report, _ = finish(probe)
    assert set(report["hosts"]) == {"before", "after"}
    # Refused while nothing listened; the kill may have reset an attempt in flight.
    assert set(report["errors"]) <= {"refused", "reset"} and report["failed"] > 0
    assert report["errors"].get("reset", 0) <= 2
    assert report["ok"] + report["failed"] == report["attempts"] >= 450
    # One window, from the kill to the restart: what the probe measures is the outage the
    # test made, so it is compared with the test's clock. Every refusal started between the
    # kill and the restart (wall-clock times: the report's start plus each attempt's offset),
    # and the window covers at least most of the half second nothing listened.
    assert len(report["failure_periods"]) == 1
    started = datetime.fromisoformat(report["started"]).timestamp()
    refused = [started + f["t"] for f in report["failures"] if f["error"] == "refused"]
    assert killing - 0.001 <= min(refused) and max(refused) <= back, (killing, refused, back)
    assert report["failure_window"] > 0.4
    assert report["failure_window"] == pytest.approx(
        report["last_failure"] - report["first_failure"], abs=0.05
    )
    assert report["failed"] == pytest.approx(report["failure_window"] * 100, abs=10)
