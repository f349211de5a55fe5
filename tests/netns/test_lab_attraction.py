"""End to end: attraction by BGP and BFD, real BIRDs on both sides, real traffic.

A dual-stack lab with BGP routing (each LB runs its BIRD; the gateway ``gw`` and a second
gateway ``gw-2`` run theirs), 2 LBs, 2 proxies and 3 targets. Every case runs long-lived TCP
connections (the traffic client) and a probe of new connections (100 per second) through an
event, and judges with their reports: no established connection may be lost, and new
connections may fail only during the gateway's detection, which must stay under a second.

A killed LB is started again by its supervisor (the lab's pods restart their processes), so
it rejoins while the load still runs: that must cost nothing either. The shared lab is in
``first-packet`` mode (new connections need the LB's queue reader, the
harder case); a small ``kernel`` lab repeats the crash cases.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meridio.lab import plan, system
from meridio.lab.lab import Lab, TrafficRun
from meridio.lab.plan import LabSpec
from tests.netns.test_lab import diagnose, reap_stale_labs, summary

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = f"mlab-t{os.getpid()}a-"
TARGETS = {"target-1", "target-2", "target-3"}
LONG = ("--connections", "30", "--rate", "300")
PROBE_RATE = 100
DETECTION_LIMIT = 1.0


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
        the_lab.down()


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
        self.long: TrafficRun = lab.start_traffic(["--duration", str(seconds), *LONG])
        self.probe: TrafficRun = lab.start_traffic(
            ["--rate", str(PROBE_RATE), "--duration", str(seconds)], command="probe"
        )

    def results(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.long.result(), self.probe.result()


def probe_summary(report: dict[str, Any]) -> str:
    keys = ("attempts", "ok", "failed", "errors", "failure_window", "failure_periods")
    return json.dumps({k: report.get(k) for k in keys})


def routed_over(lab: Lab, router: int = 1) -> set[int]:
    """LB indexes the gateway routes every VIP over (the intersection of the families)."""
    per_family = lab.gateway_route_lbs(router)
    sets = [set(lbs) for lbs in per_family.values()]
    return set.intersection(*sets) if sets else set()


def wait_until_not_routed(lab: Lab, lb: int, started: float, limit: float = 5.0) -> float:
    while lb in routed_over(lab) or any(lb in v for v in lab.gateway_route_lbs(1).values()):
        if time.monotonic() - started > limit:
            raise AssertionError(f"lb-{lb} still routed after {limit}s\n{diagnose(lab)}")
        time.sleep(0.005)
    return time.monotonic() - started


def judge(lab: Lab, what: str, load: Load, *, window: float = DETECTION_LIMIT) -> dict[str, Any]:
    long, probe = load.results()
    print(f"{what}: long-lived {summary(long)}; probe {probe_summary(probe)}")
    assert long["lost_connections"] == 0, f"{what}: {summary(long)}\n{diagnose(lab)}"
    assert set(long["hosts"]) == TARGETS, f"{what}: {summary(long)}"
    assert probe["ok"] > 0, f"{what}: {probe_summary(probe)}"
    # the window in which a new connection failed: from the first failed attempt's start to
    # the last one's (an attempt in flight at the event fails by its timeout, later)
    starts = [f["t"] for f in probe["failures"]]
    span = max(starts) - min(starts) if starts else 0.0
    print(
        f"{what}: {len(starts)} of {probe['attempts']} new connections failed, within {span:.3f} s"
    )
    assert span < window, f"{what}: {probe_summary(probe)}\n{diagnose(lab)}"
    assert len(starts) <= PROBE_RATE * window, f"{what}: {probe_summary(probe)}"
    return probe


def test_a_killed_lb_costs_new_connections_under_a_second_and_no_established_one(
    restore: Lab,
) -> None:
    lab = restore
    assert routed_over(lab) == {1, 2}
    load = Load(lab, 6)
    time.sleep(2)
    killed = time.monotonic()
    lab.kill("lb-2")  # its supervisor starts it again while the load runs
    detected = wait_until_not_routed(lab, 2, killed)
    print(f"LB kill -9: gateway converged in {detected:.3f} s")
    assert detected < DETECTION_LIMIT
    judge(lab, "LB kill -9", load)
    # it came back by itself (not replaced by the restore fixture's scale) and announces again
    lab.wait_gateway_routes([1, 2])
    rows = {row["name"]: row for row in lab.status()["instances"]}
    assert rows["lb-2"]["restarts"] >= 1 and rows["lb-2"]["ready"], rows["lb-2"]
    assert len(rows["lb-2"]["bird"]) == 1, rows["lb-2"]  # the killed LB's BIRD died with it


def test_an_lb_pod_gone_costs_new_connections_under_a_second(restore: Lab) -> None:
    lab = restore
    load = Load(lab, 6)
    time.sleep(2)
    gone = time.monotonic()
    lab.kill("lb-2", netns=True)
    detected = wait_until_not_routed(lab, 2, gone)
    print(f"LB pod gone: gateway converged in {detected:.3f} s")
    assert detected < DETECTION_LIMIT
    judge(lab, "LB pod gone", load)


def test_a_hung_lb_is_dropped_by_bfd_within_a_second(restore: Lab) -> None:
    """The gateway's side only: the proxies still send replies through the hung LB until its
    NSP registration expires (they have no BFD of their own), so the traffic figures of this
    case are reported, not judged."""
    lab = restore
    load = Load(lab, 6)
    time.sleep(2)
    hung = time.monotonic()
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
        detected = wait_until_not_routed(lab, 2, hung)
        print(f"LB hung: gateway dropped it by BFD in {detected:.3f} s")
        assert detected < DETECTION_LIMIT
        long, probe = load.results()
        print(f"LB hung: long-lived {summary(long)}; probe {probe_summary(probe)}")
    finally:
        lab.kill("lb-2", netns=True)  # the hung one is replaced by the restore fixture


def test_scale_in_withdraws_first_and_scale_out_joins_only_when_ready(restore: Lab) -> None:
    lab = restore
    load = Load(lab, 10)
    time.sleep(2)
    lab.scale(lbs=1)  # SIGTERM: withdraw, grace, then the data path goes
    assert routed_over(lab) == {1}
    time.sleep(1)
    # scale out: lb-2 comes back; watch the gateway and lb-2's readiness while it joins
    seen: list[tuple[float, bool, int]] = []
    errors: list[str] = []
    gw = lab.netns("gw")
    lb2 = {plan.external_address(f, 2).split("/")[0] for f in (4, 6)}

    def watch() -> None:
        started = time.monotonic()
        while time.monotonic() - started < 60:
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
                    seen.append((time.monotonic() - started, ready, targets))
                    return
            except Exception as exc:  # reported below; the watch goes on
                errors.append(repr(exc))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    lab.scale(lbs=2)
    watcher.join()
    assert seen, f"lb-2 never announced; {errors[-3:]}"
    _, ready, targets = seen[0]
    assert ready and targets == len(TARGETS), seen
    probe = judge(lab, "LB scale-in and scale-out", load, window=0.001)
    assert probe["failed"] == 0, probe_summary(probe)


def test_vips_are_withdrawn_while_no_target_serves_them(restore: Lab) -> None:
    lab = restore
    lab.scale(targets=0)
    deadline = time.monotonic() + 10
    while any(lab.gateway_route_lbs(1).values()):
        assert time.monotonic() < deadline, f"still routed: {lab.gateway_route_lbs(1)}"
        time.sleep(0.05)
    lab.scale(targets=3)
    lab.wait_gateway_routes([1, 2], timeout=15)
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
        "tcp": lab.start_traffic(["--duration", "6", *LONG]),
        "udp": lab.start_traffic(["--udp", "--duration", "6", *LONG]),
    }
    time.sleep(2)
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
            time.sleep(1.5)
            killed = time.monotonic()
            lab.kill("lb-2", netns=how == "netns")
            detected = wait_until_not_routed(lab, 2, killed)
            print(f"kernel mode, LB {how}: gateway converged in {detected:.3f} s")
            assert detected < DETECTION_LIMIT
            judge(lab, f"kernel mode, LB {how}", load)
            lab.scale(lbs=2)
            lab.wait_gateway_routes([1, 2])
    finally:
        lab.down()
