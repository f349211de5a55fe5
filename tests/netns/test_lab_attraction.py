"""End to end: attraction by BGP and BFD, real BIRDs on both sides, real traffic.

A dual-stack lab with BGP routing (each LB runs its BIRD; the gateway ``gw`` and a second
gateway ``gw-2`` run theirs), 2 LBs, 2 proxies and 3 targets. Every case runs long-lived TCP
connections (the traffic client) and a probe of new connections (100 per second) through an
event, and judges with their reports: no established connection may be lost, and new
connections may fail only until the gateway has stopped routing to the LB (how long that
takes, and how many new connections it costs, is measured in ``bench/bench_attraction.py``).

A killed LB is started again by its supervisor (the lab's pods restart their processes), so
it rejoins while the load still runs: that must cost nothing either. The shared lab is in
``first-packet`` mode (new connections need the LB's queue reader, the
harder case); a small ``kernel`` lab repeats the crash cases.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from meridio.lab import plan, system
from meridio.lab.lab import Lab, TrafficRun
from meridio.lab.plan import LabSpec
from tests.netns.test_lab import diagnose, reap_stale_labs, summary
from tests.waiting import HANG, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = f"mlab-t{os.getpid()}a-"
TARGETS = {"target-1", "target-2", "target-3"}
LONG = ("--connections", "30", "--rate", "300")
PROBE_RATE = 100


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if system.find_bird() is None:
        pytest.skip("BIRD 2 is not installed (Debian bird2; `make deps` installs it)")
    reap_stale_labs()
    the_lab = Lab(tmp_path_factory.mktemp("lab"), PREFIX)
    try:
        the_lab.up(LabSpec(prefix=PREFIX, targets=3, routing="bgp", gateways=2))
        yield the_lab
    finally:
        # the logs outlive the lab in pytest's base temp (the last three runs are kept)
        the_lab.down(keep_logs=tmp_path_factory.getbasetemp() / "lab-logs" / PREFIX)


@pytest.fixture
def restore(lab: Lab) -> Iterator[Lab]:
    """The shared lab back to 2 LBs and 3 targets, both routed by both gateways."""
    yield lab
    lab.scale(lbs=2, targets=3)
    lab.wait_gateway_routes([1, 2])


class Load:
    """Long-lived TCP connections and a probe of new connections, started together."""

    def __init__(self, lab: Lab, seconds: float) -> None:
        self.lab = lab
        self.long: TrafficRun = lab.start_traffic(
            ["--duration", str(seconds), *LONG], progress=True
        )
        self.probe: TrafficRun = lab.start_traffic(
            ["--rate", str(PROBE_RATE), "--duration", str(seconds)], command="probe", progress=True
        )

    def running(self) -> None:
        """Wait until every long-lived connection is up and new connections succeed."""
        self.long.wait_connected()
        self.probe.wait_progress(lambda p: p.get("ok", 0) > 0, "new connections succeed")

    def results(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.long.result(), self.probe.result()


def gateway_log(lab: Lab) -> str:
    """What the gateway's BIRD logged so far (its sessions' state changes and why)."""
    return Path(lab.load().processes["bird-gw"].log).read_text(errors="replace")


def gateway_logged_since(lab: Lab, before: str, pattern: str) -> bool:
    """Whether a line the gateway's BIRD logged after ``before`` (an earlier
    :func:`gateway_log`) matches ``pattern``."""
    return re.search(pattern, gateway_log(lab)[len(before) :]) is not None


def probe_summary(report: dict[str, Any]) -> str:
    keys = ("attempts", "ok", "failed", "errors", "failure_window", "failure_periods")
    return json.dumps({k: report.get(k) for k in keys})


def routed_over(lab: Lab, router: int = 1) -> set[int]:
    """LB indexes the gateway routes every VIP over (the intersection of the families)."""
    per_family = lab.gateway_route_lbs(router)
    sets = [set(lbs) for lbs in per_family.values()]
    return set.intersection(*sets) if sets else set()


def wait_until_not_routed(lab: Lab, lb: int) -> float:
    """Wait until the gateway routes no VIP over lb-N; the wall-clock time by which it had
    stopped (the end of the reading that showed it)."""

    def gone() -> float | None:
        routed = any(lb in lbs for lbs in lab.gateway_route_lbs(1).values())
        return None if routed else time.time()

    try:
        return wait_until(gone, what=f"lb-{lb} out of the gateway's route", interval=0.005)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose(lab)}") from None


def reply_next_hops(lab: Lab, node: str, family: int) -> int:
    """How many LBs the proxy of ``node`` sends replies over (its egress table's default
    route, table 1)."""
    out = system.run("ip", "-n", lab.netns(node), f"-{family}", "-j", "route", "show", "table", "1")
    hops = 0
    for route in json.loads(out.stdout or "[]"):
        if route.get("dst") == "default":
            hops += len(route.get("nexthops", [])) or ("gateway" in route)
    return hops


def wait_until_replies_avoid_a_gone_lb(lab: Lab, remaining: int) -> float:
    """When an LB's pod is gone the proxies must also stop sending replies to it (a reply to
    a new connection sent there is lost, and the connect fails): wait until every proxy's
    replies go over ``remaining`` LBs only; the wall-clock time of that reading's end."""
    state = lab.load()
    nodes = [f"node-{i}" for i in range(1, state.spec.proxies + 1)]

    def avoided() -> float | None:
        counts = [reply_next_hops(lab, n, f) for n in nodes for f in state.spec.families]
        return time.time() if all(c == remaining for c in counts) else None

    try:
        return wait_until(avoided, what="replies over the remaining LBs only", interval=0.005)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose(lab)}") from None


def failed_after(probe: dict[str, Any], moment: float) -> list[dict[str, Any]]:
    """The probe's failed attempts that started after ``moment`` (wall-clock time)."""
    started = datetime.fromisoformat(probe["started"]).timestamp()
    return [f for f in probe["failures"] if started + f["t"] > moment]


def judge(lab: Lab, what: str, load: Load, converged: float | None = None) -> dict[str, Any]:
    """No long-lived connection lost, every target served; new connections failed only until
    the gateway had stopped routing to the LB (``converged``, wall-clock time; None: none may
    fail at all)."""
    long, probe = load.results()
    print(f"{what}: long-lived {summary(long)}; probe {probe_summary(probe)}")
    assert long["lost_connections"] == 0, f"{what}: {summary(long)}\n{diagnose(lab)}"
    assert set(long["hosts"]) == TARGETS, f"{what}: {summary(long)}"
    assert probe["ok"] > 0, f"{what}: {probe_summary(probe)}"
    if converged is None:
        assert probe["failed"] == 0, f"{what}: {probe_summary(probe)}\n{diagnose(lab)}"
    else:
        late = failed_after(probe, converged)
        assert late == [], f"{what}: failed once the gateway had converged: {late}\n{diagnose(lab)}"
    return probe


def test_a_killed_lb_costs_new_connections_only_until_the_gateway_drops_it_and_no_established_one(
    restore: Lab,
) -> None:
    lab = restore
    assert routed_over(lab) == {1, 2}
    load = Load(lab, 6)
    load.running()
    before = gateway_log(lab)
    lab.kill("lb-2")  # its supervisor starts it again while the load runs
    converged = wait_until_not_routed(lab, 2)
    # the session's connection closed with the LB's BIRD: no waiting for a timer
    assert gateway_logged_since(lab, before, r"lb4_\d+: Connection closed"), diagnose(lab)
    judge(lab, "LB kill -9", load, converged)
    # it came back by itself (not replaced by the restore fixture's scale) and announces again
    lab.wait_gateway_routes([1, 2])
    rows = {row["name"]: row for row in lab.status()["instances"]}
    assert rows["lb-2"]["restarts"] >= 1 and rows["lb-2"]["ready"], rows["lb-2"]
    assert len(rows["lb-2"]["bird"]) == 1, rows["lb-2"]  # the killed LB's BIRD died with it


def test_an_lb_pod_gone_costs_new_connections_only_until_the_gateway_drops_it(
    restore: Lab,
) -> None:
    lab = restore
    load = Load(lab, 6)
    load.running()
    lab.kill("lb-2", netns=True)
    converged = max(wait_until_not_routed(lab, 2), wait_until_replies_avoid_a_gone_lb(lab, 1))
    judge(lab, "LB pod gone", load, converged)


def test_a_hung_lb_is_dropped_by_bfd(restore: Lab) -> None:
    """The gateway's side only: the proxies still send replies through the hung LB until its
    NSP registration expires (they have no BFD of their own), so the traffic figures of this
    case are reported, not judged."""
    lab = restore
    load = Load(lab, 6)
    load.running()
    before = gateway_log(lab)
    try:
        # the process stays alive; every packet in or out of its namespace is dropped
        system.run(
            "ip",
            "netns",
            "exec",
            lab.netns("lb-2"),
            "nft",
            "add table inet mtest-hang; "
            "add chain inet mtest-hang in { type filter hook prerouting priority -500; "
            "policy drop; }; "
            "add chain inet mtest-hang out { type filter hook output priority -500; "
            "policy drop; }",
        )
        wait_until_not_routed(lab, 2)
        # by BFD, not at the end of the BGP hold time (how fast: bench_attraction, "hung")
        assert gateway_logged_since(lab, before, r"lb4_\d+: BFD session down"), diagnose(lab)
        assert not gateway_logged_since(lab, before, "Hold timer expired"), diagnose(lab)
        long, probe = load.results()
        print(f"LB hung: long-lived {summary(long)}; probe {probe_summary(probe)}")
    finally:
        lab.kill("lb-2", netns=True)  # the hung one is replaced by the restore fixture


def test_scale_in_withdraws_first_and_scale_out_joins_only_when_ready(restore: Lab) -> None:
    lab = restore
    load = Load(lab, 10)
    load.running()
    lab.scale(lbs=1)  # SIGTERM: withdraw, grace, then the data path goes
    assert routed_over(lab) == {1}
    # new connections over lb-1 alone for a while: a hundred more succeed (a second's worth)
    last = load.probe.progress
    start = load.probe.wait_progress(lambda p: p is not last, "a progress line")
    load.probe.wait_progress(lambda p: p["ok"] >= start["ok"] + PROBE_RATE, "new connections")
    # scale out: lb-2 comes back; watch the gateway and lb-2's readiness while it joins
    seen: list[tuple[float, bool, int]] = []
    errors: list[str] = []
    gw = lab.netns("gw")
    lb2 = {plan.external_address(f, 2).split("/")[0] for f in (4, 6)}

    def watch() -> None:
        started = time.monotonic()
        while time.monotonic() - started < HANG:
            try:
                hops = {
                    hop for f in (4, 6) for hop in system.route_next_hops(gw, f, plan.vip_cidr(f))
                }
                if hops & lb2:
                    sock = plan.health_socket(lab.state_dir, "lb-2")
                    # its data path installed, routing to every target (the "Stream" check)
                    ready = system.run_async(system.readiness(sock, service="Stream"))
                    show = system.run_async(system.lb_show(plan.lb_socket(lab.state_dir, "lb-2")))
                    targets = len(system.lb_target_ips(show))
                    seen.append((ready, targets))
                    return
            except Exception as exc:  # reported below; the watch goes on
                errors.append(repr(exc))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    lab.scale(lbs=2)
    watcher.join()
    assert seen, f"lb-2 never announced; {errors[-3:]}"
    # announced only once it forwards to every target
    ((ready, targets),) = seen
    assert ready and targets == len(TARGETS), seen
    judge(lab, "LB scale-in and scale-out", load)  # no new connection failed


def test_vips_are_withdrawn_while_no_target_serves_them(restore: Lab) -> None:
    lab = restore
    lab.scale(targets=0)
    wait_until(lambda: not any(lab.gateway_route_lbs(1).values()), what="the VIPs withdrawn")
    lab.scale(targets=3)
    lab.wait_gateway_routes([1, 2], timeout=HANG)
    assert routed_over(lab) == {1, 2}


def test_replies_keep_flowing_when_one_of_two_gateways_stops(restore: Lab) -> None:
    lab = restore
    tables = [
        json.loads(
            system.run(
                "ip", "-n", lab.netns("lb-1"), "-4", "-j", "route", "show", "table", "4096"
            ).stdout
        )
    ]
    hops = {nh["gateway"] for r in tables[0] for nh in r.get("nexthops", [])}
    assert hops == {"192.0.2.1", "192.0.2.2"}, tables  # ECMP over both gateways
    runs = {
        "tcp": lab.start_traffic(["--duration", "6", *LONG], progress=True),
        "udp": lab.start_traffic(["--udp", "--duration", "6", *LONG], progress=True),
    }
    for run in runs.values():
        run.wait_connected()
    lab.kill("gateway-2")
    for proto, run in runs.items():
        report = run.result()
        assert report["lost_connections"] == 0, f"{proto}: {summary(report)}\n{diagnose(lab)}"
        assert report["failed_connects"] == 0, f"{proto}: {summary(report)}"
    table = json.loads(
        system.run(
            "ip", "-n", lab.netns("lb-1"), "-4", "-j", "route", "show", "table", "4096"
        ).stdout
    )
    assert any(r.get("gateway") == "192.0.2.1" for r in table), table
    # gw-2's BIRD comes back for the next tests
    lab.restart_gateway(2)


def test_kernel_mode_crash_cases(tmp_path: Path) -> None:
    if system.find_bird() is None:
        pytest.skip("BIRD 2 is not installed (Debian bird2)")
    reap_stale_labs()
    prefix = f"mlab-t{os.getpid()}k-"
    lab = Lab(tmp_path / "lab", prefix)
    try:
        lab.up(LabSpec(prefix=prefix, lbs=2, proxies=1, targets=3, lb_mode="kernel", routing="bgp"))
        for how in ("kill", "netns"):
            load = Load(lab, 5)
            load.running()
            lab.kill("lb-2", netns=how == "netns")
            converged = wait_until_not_routed(lab, 2)
            if how == "netns":
                converged = max(converged, wait_until_replies_avoid_a_gone_lb(lab, 1))
            judge(lab, f"kernel mode, LB {how}", load, converged)
            lab.scale(lbs=2)
            lab.wait_gateway_routes([1, 2])
    finally:
        lab.down()
