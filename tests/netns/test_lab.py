"""End to end: the lab (``meridioctl lab``) with the traffic tool, as a user runs them.

A scenario passes only when no connection is lost where it allows none, and every target with
the stream open answered (as Meridio's e2e suite judges with ctraffic and mconnect).

One dual-stack lab (2 LBs in first-packet mode, 2 proxies, 4 targets, veth conduits, macvlan
external interfaces) serves the module; every test leaves it as it found it (2 LBs, 4 targets:
the ``restore`` fixture scales back and replaces what a test killed). The single-family labs
(IPv4 over veth, IPv6 over vxlan) come and go in the first test, which also checks that ``up``
recovers a crashed lab and that ``down`` leaves nothing behind.

Namespaces are ``mlab-t<pid>-...`` (a lab of their own, beside any ``mlab-`` lab of the user);
those of a test process that died are removed at the start.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meridio.lab import plan, system
from meridio.lab.lab import Lab, TrafficRun
from meridio.lab.plan import LabSpec
from meridio.lab.state import Process, load
from tests.waiting import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = f"mlab-t{os.getpid()}-"
TARGETS = {f"target-{i}" for i in range(1, 5)}
# Long-lived clients: 40 connections at 200 packets/s (5 per second each), so that a broken
# connection shows within the client's 3 s reply timeout and every target gets some.
LONG = ("--connections", "40", "--rate", "200")


def reap_stale_labs() -> None:
    """Namespaces of test labs whose process is gone (``mlab-t<pid>-``, ``mlab-t<pid>a-``...)."""
    for name in system.netns_list():
        match = re.fullmatch(r"mlab-t(\d+)[a-z]?-.*", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            system.delete_netns(name)


def diagnose(lab: Lab) -> str:
    """The end of every log of the lab, for assertion messages."""
    state = load(lab.state_dir)
    if state is None:
        return "(no lab state)"
    return "\n".join(
        f"--- {name}\n{system.tail(proc.log, 12)}" for name, proc in sorted(state.processes.items())
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reap_stale_labs()
    the_lab = Lab(tmp_path_factory.mktemp("lab"), PREFIX)
    try:
        the_lab.up(LabSpec(prefix=PREFIX))
        yield the_lab
    finally:
        # the logs outlive the lab in pytest's base temp (the last three runs are kept)
        the_lab.down(keep_logs=tmp_path_factory.getbasetemp() / "lab-logs" / PREFIX)


@pytest.fixture
def restore(lab: Lab) -> Iterator[Lab]:
    """The shared lab, back to 2 LBs and 4 running targets after the test."""
    yield lab
    lab.scale(lbs=2, targets=4)
    state = lab.load()
    assert state.gateway_lbs == [1, 2]


def clients(
    lab: Lab, *args: str, udp: bool = True, families: tuple[int, ...] = (4, 6)
) -> dict[str, TrafficRun]:
    runs = {"tcp": lab.start_traffic(args, families, progress=True)}
    if udp:
        runs["udp"] = lab.start_traffic(["--udp", *args], families, progress=True)
    return runs


def connected(runs: dict[str, TrafficRun]) -> dict[str, dict[str, int]]:
    """Wait until every connection of every run is up (each has had an answer: a UDP flow
    counts once answered); their progress counts."""
    return {proto: run.wait_connected() for proto, run in runs.items()}


def answered(runs: dict[str, TrafficRun], more: int) -> None:
    """Wait until each run has had ``more`` replies after now (counted from its next progress
    line on)."""
    for run in runs.values():
        last = run.progress
        start = run.wait_progress(lambda p, last=last: p is not last, "a progress line")
        total = start["received"] + more
        run.wait_progress(lambda p, total=total: p["received"] >= total, f"{more} replies")


def reports(runs: dict[str, TrafficRun]) -> dict[str, dict[str, Any]]:
    return {proto: run.result() for proto, run in runs.items()}


def summary(report: dict[str, Any]) -> str:
    keys = ("hosts", "lost_per_host", "lost_connections", "failed_connects", "sent", "received")
    out = {k: report.get(k) for k in keys}
    # what failed, when (seconds into the run) and why
    failed = [c for c in report.get("connections", []) if c.get("state") == "failed"]
    if failed:
        out["run_started"] = report.get("started")
        out["failed"] = [
            {k: c.get(k) for k in ("started", "ended", "error", "local", "retransmits")}
            for c in failed[:10]
        ]
    return json.dumps(out)


def assert_clean(report: dict[str, Any], targets: set[str], lab: Lab, what: str) -> None:
    """No connection lost or failed, every target answered."""
    assert report["lost_connections"] == 0, f"{what}: {summary(report)}\n{diagnose(lab)}"
    assert report["failed_connects"] == 0, f"{what}: {summary(report)}\n{diagnose(lab)}"
    assert set(report["hosts"]) == targets, f"{what}: {summary(report)}\n{lb_kernel_view(lab)}"


def lb_kernel_view(lab: Lab) -> str:
    """Where each LB's kernel sends what: its per-target hit counters, its fwmark rules and
    the routes of their tables (for a message when traffic missed a target)."""
    out = []
    for lb in ("lb-1", "lb-2"):
        ns = lab.netns(lb)
        for cmd in (
            ("nft", "list", "counters", "table", "inet", "meridio-lb"),
            ("ip", "-4", "rule"),
            ("ip", "-4", "route", "show", "table", "all", "type", "unicast"),
        ):
            done = system.run("ip", "netns", "exec", ns, *cmd, check=False)
            out.append(f"--- {lb}: {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return "\n".join(out)


def lb_ips(lab: Lab, lb: str) -> set[str]:
    """Every target address in the LB's tables (without prefix length)."""
    show = system.run_async(system.lb_show(plan.lb_socket(lab.state_dir, lb)))
    return {str(ipaddress.ip_interface(ip).ip) for ips in system.lb_target_ips(show) for ip in ips}


def conduit_ips(lab: Lab, target: str) -> set[str]:
    out = system.run("ip", "-n", lab.netns(target), "-j", "addr", "show", "dev", "conduit0")
    return {
        a["local"]
        for link in json.loads(out.stdout)
        for a in link["addr_info"]
        if a.get("scope") == "global"
    }


def gateway_hops(lab: Lab, family: int) -> set[str]:
    out = system.run("ip", "-n", lab.netns("gw"), f"-{family}", "-j", "route", "show")
    hops: set[str] = set()
    for route in json.loads(out.stdout):
        if route.get("dst") == plan.VIPS[family]:
            if "gateway" in route:
                hops.add(route["gateway"])
            hops |= {nh["gateway"] for nh in route.get("nexthops", [])}
    return hops


# --- one family at a time; recovery; nothing left behind ------------------------------------


def meridioctl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """``meridioctl lab`` in a new process (state from the lab's JSON file)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meridio.ctl",
            "lab",
            "--state-dir",
            str(lab.state_dir),
            "--prefix",
            lab.prefix,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_single_family_labs_recover_from_a_crash_and_leave_nothing(tmp_path: Path) -> None:
    reap_stale_labs()
    prefix = f"mlab-t{os.getpid()}x-"
    lab = Lab(tmp_path / "lab", prefix)
    procs: list[Process] = []
    pids: list[int] = []
    try:
        # IPv4 only, veth conduits, the LBs' veth link to the gateway as external interface
        lab.up(
            LabSpec(lbs=2, proxies=2, targets=2, ip_family="ipv4", external="veth", prefix=prefix)
        )
        got = reports(clients(lab, "--duration", "2", *LONG, families=(4,)))
        for proto, report in got.items():
            assert_clean(report, {"target-1", "target-2"}, lab, f"ipv4 {proto}")
        status = json.loads(meridioctl(lab, "status", "-o", "json").stdout)
        assert all(row["ready"] for row in status["instances"]), status
        # the lab opened each target's stream through its TAPA
        streams = {r["name"]: r["streams"] for r in status["instances"] if r["role"] == "target"}
        opened = [{"trench": "trench-a", "conduit": "conduit-a", "stream": "stream-a"}]
        assert streams == {
            t: [{**s, "status": "OPEN"} for s in opened] for t in ("target-1", "target-2")
        }, streams

        # a crash in the middle: processes killed, the state file gone with the rest
        state = lab.load()
        for proc in list(state.processes.values())[:6]:
            system.send_signal(proc, signal.SIGKILL)
        (lab.state_dir / "lab.json").unlink()

        # up again over the wreck: IPv6 only, vxlan conduits, macvlan external interfaces;
        # without restarts, to study a failure: a process that dies stays dead
        spec = LabSpec(
            lbs=2,
            proxies=2,
            targets=2,
            ip_family="ipv6",
            mechanism="vxlan",
            prefix=prefix,
            restart=False,
        )
        lab.up(spec)
        got = reports(clients(lab, "--duration", "2", *LONG, families=(6,)))
        for proto, report in got.items():
            assert_clean(report, {"target-1", "target-2"}, lab, f"ipv6/vxlan {proto}")
        killed = meridioctl(lab, "kill", "proxy-2")
        assert killed.returncode == 0, killed.stderr
        row = instance_row(lab, "proxy-2")
        assert not row["running"] and row["supervisor"]["state"] == "exited", row
        assert row["supervisor"]["last_exit"]["signal"] == "SIGKILL" and row["restarts"] == 0
        assert meridioctl(lab, "status").returncode == 1
        lab.restart("proxy-2")  # a new supervisor starts it, and the lab is whole again
        assert instance_row(lab, "proxy-2")["ready"]
        lab.wait_whole(30)
        procs = list(lab.load().processes.values())
        pids = [p for p in (system.role_pid(proc) for proc in procs) if p is not None]
    finally:
        done = meridioctl(lab, "down")
    assert done.returncode == 0, done.stderr
    assert not [n for n in system.netns_list() if n.startswith(prefix)]
    # the supervisors and what they ran: all gone
    assert procs and not [p.name for p in procs if system.alive(p)]
    assert pids and not [pid for pid in pids if system.proc_start_time(pid) is not None]
    assert not (tmp_path / "lab").exists()


def instance_row(lab: Lab, name: str) -> dict[str, Any]:
    rows = {row["name"]: row for row in lab.status()["instances"]}
    return rows[name]


# --- the shared dual-stack lab ----------------------------------------------------------------


def test_tcp_and_udp_over_ipv4_ipv6_and_dual_stack(lab: Lab) -> None:
    runs: dict[str, TrafficRun] = {}
    for name, families in (("ipv4", (4,)), ("ipv6", (6,)), ("dual", (4, 6))):
        for proto, run in clients(lab, "--duration", "3", *LONG, families=families).items():
            runs[f"{proto}/{name}"] = run
    for what, report in reports(runs).items():
        assert_clean(report, TARGETS, lab, what)
        if what.startswith("tcp"):
            assert report["sent"] == report["received"] > 0, f"{what}: {summary(report)}"
    status = lab.status()
    assert status["gateway"]["routes_over"] == ["lb-1", "lb-2"]
    assert gateway_hops(lab, 4) == {"192.0.2.11", "192.0.2.12"}
    assert gateway_hops(lab, 6) == {"fd00:e::b", "fd00:e::c"}


def test_port_80_reaches_the_targets_through_the_conduits_port_nat(lab: Lab) -> None:
    # conduit-a NATs VIP:80 to the targets' port 5080, statelessly in the LBs: a TCP answer
    # that left the LB from 5080 would be refused by the client, a UDP one ignored
    nat = [
        word
        for endpoint in plan.vip_endpoints((4, 6), port=plan.NAT_PORT)
        for word in ("--address", endpoint)
    ]
    for proto, report in reports(clients(lab, *nat, "--duration", "3", *LONG)).items():
        assert_clean(report, TARGETS, lab, f"{proto} to port {plan.NAT_PORT}")
        assert report["sent"] == report["received"] > 0, f"{proto}: {summary(report)}"


def test_target_scale_out_gives_the_new_target_new_connections(restore: Lab) -> None:
    lab = restore
    before = clients(lab, "--duration", "6", *LONG)
    connected(before)
    lab.scale(targets=5)
    after = reports(clients(lab, "--duration", "2", *LONG))
    for proto, report in after.items():
        assert_clean(report, TARGETS | {"target-5"}, lab, f"new {proto} connections")
    for proto, report in reports(before).items():
        # established connections stay where they are: none is lost, none moves
        assert report["lost_connections"] == 0, f"{proto}: {summary(report)}\n{diagnose(lab)}"
        assert report["failed_connects"] == 0, f"{proto}: {summary(report)}"
        assert set(report["hosts"]) == TARGETS, f"{proto}: {summary(report)}"
        assert report["host_changes"] == 0, f"{proto}: {summary(report)}"


def test_graceful_scale_in_loses_no_connection_to_a_remaining_target(restore: Lab) -> None:
    lab = restore
    lab.scale(targets=5)
    runs = clients(lab, "--duration", "7", *LONG)
    connected(runs)  # target-5 among the hosts
    lab.scale(targets=4)  # target-5 (the newest) leaves gracefully
    assert "target-5" not in lab.load().processes
    for proto, report in reports(runs).items():
        assert set(report["hosts"]) >= TARGETS | {"target-5"}, f"{proto}: {summary(report)}"
        lost_elsewhere = {h: n for h, n in report["lost_per_host"].items() if h != "target-5"}
        assert lost_elsewhere == {}, f"{proto}: {summary(report)}\n{diagnose(lab)}"
        remaining = [c for c in report["connections"] if c["host"] in TARGETS and c["attempt"] == 0]
        assert remaining and all(c["state"] == "lasted" for c in remaining), summary(report)


def test_an_lb_leaving_gracefully_loses_no_connection(restore: Lab) -> None:
    lab = restore
    runs = clients(lab, "--duration", "8", *LONG)
    connected(runs)
    lab.scale(lbs=1)  # out of the gateway's route first, then SIGTERM
    assert gateway_hops(lab, 4) == {"192.0.2.11"} and gateway_hops(lab, 6) == {"fd00:e::b"}
    assert not [n for n in system.netns_list() if n == lab.netns("lb-2")]
    # traffic through lb-1 alone for a while: 200 more replies (a second's worth)
    answered(runs, 200)
    lab.scale(lbs=2)  # and back: into the route once ready, with every target routable
    assert gateway_hops(lab, 4) == {"192.0.2.11", "192.0.2.12"}
    for proto, report in reports(runs).items():
        assert_clean(report, TARGETS, lab, f"{proto} across the LB leaving and coming back")
        # the other LB took the flows over with the same Maglev choice: no flow moved
        assert report["host_changes"] == 0, f"{proto}: {summary(report)}"


def test_a_target_pod_gone_fails_its_connections_only_and_leaves_every_lb(
    restore: Lab,
) -> None:
    lab = restore
    victim = "target-3"
    ips = conduit_ips(lab, victim)
    assert len(ips) == 2 and all(ips <= lb_ips(lab, lb) for lb in ("lb-1", "lb-2"))
    runs = clients(lab, "--duration", "6", *LONG, udp=False)
    connected(runs)
    # the pod is gone (a crashing sidecar is started again by its supervisor: see below); its
    # proxy sees its link go and it leaves every LB (how soon: bench_proxyscale, "namespace
    # gone -> gone from NSP")
    print(f"{victim} killed at {datetime.now(UTC).isoformat()}")  # shown when it fails
    lab.kill(victim, netns=True)
    wait_until(
        lambda: not any(ips & lb_ips(lab, lb) for lb in ("lb-1", "lb-2")),
        what=f"{victim} out of every LB",
        interval=0.02,
    )
    report = reports(runs)["tcp"]
    served = report["hosts"].get(victim, 0)
    assert served > 0, summary(report)
    # every connection the killed target served failed; the others are untouched
    assert report["lost_per_host"] == {victim: served}, f"{summary(report)}\n{diagnose(lab)}"
    assert report["failed_connects"] == 0, summary(report)


# --- supervision: every role's process is started again, and leaves nothing stale --------------


def test_a_killed_role_process_is_started_again_and_leaves_nothing_stale(restore: Lab) -> None:
    """Each role's process SIGKILLed in turn while connections run: its supervisor starts it
    again, ``status`` counts the restart, the lab is whole again, no connection is lost, and
    every namespace's kernel holds what it held before (no rule, route, link, nftables or
    xtables rule left behind or missing; one BIRD per LB, the killed one's gone with it)."""
    lab = restore
    lab.wait_whole(30)
    runs = clients(lab, "--duration", "300", *LONG)
    # the clients count among the gateway's processes once they are LASTING_AGE old
    time.sleep(system.LASTING_AGE + 1)
    before = lab.kernel_states()
    timings = {}
    for name in ("nsp", "ipam", "lb-2", "proxy-1", "target-2"):
        row = instance_row(lab, name)
        killed = lab.kill(name)
        assert killed == row["pid"], (name, row)
        timings[name] = round(lab.wait_whole(30), 2)
        again = instance_row(lab, name)
        assert again["restarts"] == row["restarts"] + 1 and again["pid"] != killed, again
        assert again["supervisor"]["last_exit"]["signal"] == "SIGKILL", again
        # every kernel holds again what it held (a proxy routes replies over a restarted
        # LB again once that LB says it takes them): nothing left behind, nothing missing
        stale, _ = lab.kernel_changes(before, timeout=10)
        assert stale == [], f"after {name} was killed"
    # a graceful restart goes through the supervisor too
    row = instance_row(lab, "lb-1")
    lab.restart("lb-1")
    assert instance_row(lab, "lb-1")["restarts"] == row["restarts"] + 1
    lab.wait_whole(30)
    stale, _ = lab.kernel_changes(before, timeout=10)
    assert stale == [], "after lb-1 was restarted"
    print(f"whole again after the kill of (s): {timings}")
    for run in runs.values():
        run.proc.send_signal(signal.SIGTERM)
    for proto, report in reports(runs).items():
        assert_clean(report, TARGETS, lab, f"{proto} across the restarts")


def test_a_killed_application_loses_its_own_connections_and_is_started_again(
    restore: Lab,
) -> None:
    lab = restore
    runs = clients(lab, "--duration", "6", *LONG, udp=False)
    connected(runs)
    lab.kill("server-4")  # the application's container crashes
    lab.wait_whole(30)
    assert instance_row(lab, "server-4")["restarts"] >= 1
    report = reports(runs)["tcp"]
    # its connections break (reset); reconnects that the LBs send to it while it starts again
    # may fail (its sidecar keeps the stream open meanwhile), the other targets lose nothing
    assert set(report["lost_per_host"]) == {"target-4"}, summary(report)
    print(f"application killed: {summary(report)}")
