"""The lab's gateway routers (``bgp`` and ``static-bfd`` routing) against LBs played by BIRD.

``Lab.up_network`` builds the lab's namespaces and links and starts the gateways' BIRD, and no
role daemon; each LB namespace then runs a BIRD configured as an LB's is (VIPs announced by
BGP, or a static default route supervised by BFD), so the gateway side is checked on its own:
the gateways route the VIPs over the LBs, send them a default route, drop an LB whose BIRD
dies or whose namespace goes (as its session closes, or by BFD: never at the end of the hold
time; how fast: ``bench/bench_attraction.py``), and ``status`` reports the sessions and routes.
Namespaces are ``mlab-g<pid>-...``; those of a test process that died are removed.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from meridio.lab import plan, system
from meridio.lab.lab import Lab
from meridio.lab.plan import LabSpec
from meridio.lab.state import Process
from meridio.lab.system import LabError
from tests.waiting import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = f"mlab-g{os.getpid()}-"
FAMILIES = (4, 6)


def reap_stale_labs() -> None:
    for name in system.netns_list():
        match = re.fullmatch(r"mlab-g(\d+)-.*", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            system.delete_netns(name)


@pytest.fixture
def bird() -> str:
    found = system.find_bird()
    if found is None:
        pytest.skip("BIRD 2 is not installed (apt-get install bird2)")
    return found


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    reap_stale_labs()
    the_lab = Lab(tmp_path / "lab", PREFIX)
    try:
        yield the_lab
    finally:
        the_lab.down()
        assert not [n for n in system.netns_list() if n.startswith(PREFIX)]


def lb_bird_config(index: int, routing: str, routers: tuple[int, ...]) -> str:
    """What an LB's BIRD looks like: the VIPs announced to every gateway by BGP (routes from
    the gateways into table 4096), or a default route via every gateway, each supervised by
    BFD."""
    lines = [
        "log stderr all;",
        "debug protocols { states, events };",
        f"router id {plan.external_address(4, index).split('/')[0]};",
        "protocol device { }",
        'protocol bfd { interface "eth1" { min rx interval 100 ms; min tx interval 100 ms; '
        "multiplier 3; }; }",
    ]
    for family in FAMILIES:
        channel = f"ipv{family}"
        lines.append(
            f"protocol kernel K{family} {{ {channel} {{ import none; export where proto != "
            f'"VIP{family}"; }}; kernel table 4096; merge paths on; }}'
        )
        gateways = [plan.gateway_router_address(family, r) for r in routers]
        if routing == "bgp":
            lines.append(
                f"protocol static VIP{family} {{ {channel}; route {plan.vip_cidr(family)} "
                "blackhole; }"
            )
            for router, address in zip(routers, gateways, strict=True):
                lines.append(
                    f"protocol bgp 'gateway-{router}-v{family}' {{ interface \"eth1\"; "
                    f"local port 10179 as 8103; neighbor {address} port 10179 as 4248829953; "
                    f"bfd on; hold time 3; direct; {channel} {{ import all; export where "
                    f'proto = "VIP{family}"; }}; }}'
                )
        else:
            default = "0.0.0.0/0" if family == 4 else "::/0"
            hops = " ".join(f"via {a}%'eth1' bfd" for a in gateways)
            lines.append(f"protocol static DEF{family} {{ {channel}; route {default} {hops}; }}")
    return "\n".join(lines) + "\n"


def start_lb_bird(
    lab: Lab, bird: str, index: int, routing: str, routers: tuple[int, ...]
) -> Process:
    """The LB's external addresses on its ``eth1`` and a BIRD in its namespace."""
    netns = lab.netns(plan.lb_host(index))
    system.ip_batch(
        [
            f"addr add {plan.external_address(4, index)} dev eth1",
            f"addr add {plan.external_address(6, index)} dev eth1 nodad",
            "link set eth1 up",
        ],
        netns,
    )
    workdir = lab.state_dir / f"fake-lb-{index}"
    workdir.mkdir(parents=True)
    config = workdir / "bird.conf"
    config.write_text(lb_bird_config(index, routing, routers))
    argv = [bird, "-f", "-c", str(config), "-s", str(workdir / "bird.ctl")]
    argv += ["-P", str(workdir / "bird.pid")]
    return system.spawn(f"fake-lb-{index}", "fake-lb", netns, argv, workdir / "bird.log")


def default_hops(lab: Lab, index: int, family: int) -> set[str]:
    """The next hops of LB ``index``'s default route in table 4096."""
    netns = lab.netns(plan.lb_host(index))
    out = system.run(
        "ip", "-n", netns, f"-{family}", "-j", "route", "show", "table", "4096", "exact",
        "0.0.0.0/0" if family == 4 else "::/0", check=False,
    ).stdout  # fmt: skip
    return set(system.route_gateways(json.loads(out or "[]")))


def log_of(proc: Process) -> str:
    return Path(proc.log).read_text(errors="replace")


def logged_since(proc: Process, before: str, pattern: str) -> str:
    """The first line ``proc`` (a BIRD) logged after ``before`` (an earlier :func:`log_of`)
    that matches ``pattern``; fails if there is none."""
    new = log_of(proc)[len(before) :]
    found = re.search(f".*{pattern}.*", new)
    assert found is not None, f"no {pattern!r} in what {proc.name} logged:\n{new}"
    assert "Hold timer expired" not in new, new
    return found.group(0)


def gateway_bird(lab: Lab, router: int = 1) -> Process:
    return lab.load().processes[plan.gateway_instance(router)]


def test_bgp_gateways_route_over_the_lbs_and_drop_one_that_dies(lab: Lab, bird: str) -> None:
    spec = LabSpec(
        lbs=2, proxies=1, targets=0, external="veth", routing="bgp", gateways=2, prefix=PREFIX
    )
    state = lab.up_network(spec)
    assert lab.netns("gw-2") in state.namespaces
    assert sorted(state.processes) == ["bird-gw", "bird-gw-2"]
    lbs = {i: start_lb_bird(lab, bird, i, "bgp", (1, 2)) for i in (1, 2)}

    # both gateways route each VIP over both LBs (the BGP sessions take about 5 s)
    lab.wait_gateway_routes([1, 2], timeout=30)
    assert lab.gateway_route_lbs(1) == {4: [1, 2], 6: [1, 2]}
    assert lab.gateway_route_lbs(2) == {4: [1, 2], 6: [1, 2]}
    assert lab.load().gateway_lbs == [1, 2]
    # the default route goes to the LBs (both gateways: ECMP), never into gw's own table
    for index in (1, 2):
        assert default_hops(lab, index, 4) == {"192.0.2.1", "192.0.2.2"}
        assert default_hops(lab, index, 6) == {"fd00:e::1", "fd00:e::2"}
    assert system.route_next_hops(lab.netns("gw"), 4, "0.0.0.0/0") == []

    status = lab.status()
    gateway = status["gateway"]
    assert status["routing"] == "bgp" and status["gateways"] == 2
    assert gateway["routes_over"] == ["lb-1", "lb-2"]
    assert gateway["routes"] == {
        "203.0.113.1/32": ["lb-1", "lb-2"],
        "2001:db8::1/128": ["lb-1", "lb-2"],
    }
    first, second = gateway["routers"]
    assert (first["host"], first["bird"], second["host"], second["bird"]) == (
        "gw", "bird-gw", "gw-2", "bird-gw-2",
    )  # fmt: skip
    sessions = {(s["lb"], s["family"]): s for s in first["sessions"]}
    assert sorted(sessions) == [("lb-1", 4), ("lb-1", 6), ("lb-2", 4), ("lb-2", 6)]
    assert all(s["state"] == "Established" and s["established"] for s in sessions.values())
    assert sessions[("lb-2", 6)]["neighbor"] == "fd00:e::c"
    assert sessions[("lb-1", 4)]["protocol"].startswith("lb4_")
    rows = {row["name"]: row for row in status["instances"]}
    assert rows["bird-gw"]["ready"] and rows["bird-gw"]["established"] == 4
    assert rows["bird-gw-2"]["addresses"] == ["192.0.2.2/24", "fd00:e::2/64"]

    # the second gateway's BIRD dies: the LBs' default routes keep only the first, as the
    # sessions' connections close
    before = {i: log_of(lbs[i]) for i in (1, 2)}
    lab.kill("gateway-2")
    wait_until(lambda: default_hops(lab, 1, 4) == {"192.0.2.1"}, what="gw-2 left lb-1's route")
    wait_until(lambda: default_hops(lab, 2, 6) == {"fd00:e::1"}, what="gw-2 left lb-2's route")
    for i in (1, 2):
        logged_since(lbs[i], before[i], "gateway-2-v4: Connection closed")
    status = lab.status()
    assert not status["gateway"]["routers"][1]["running"]
    assert not {row["name"]: row for row in status["instances"]}["bird-gw-2"]["running"]

    # an LB's BIRD dies: gw routes over the other as the TCP session closes
    gw = gateway_bird(lab)
    before_gw = log_of(gw)
    os.kill(lbs[1].pid, signal.SIGKILL)
    wait_until(lambda: lab.gateway_route_lbs(1) == {4: [2], 6: [2]}, what="lb-1 left gw's route")
    logged_since(gw, before_gw, r"lb4_\d+: Connection closed")
    status = lab.status()
    assert status["gateway"]["routes_over"] == ["lb-2"]
    lb1 = [s for s in status["gateway"]["routers"][0]["sessions"] if s["lb"] == "lb-1"]
    assert lb1 and not any(s["established"] for s in lb1)

    # the other LB's pod goes with its namespace: out as its session closes, or by BFD
    before_gw = log_of(gw)
    lab.kill("lb-2", netns=True)
    assert lab.netns("lb-2") not in system.netns_list()
    assert lab.netns("lb-2") not in lab.load().namespaces
    wait_until(lambda: lab.gateway_route_lbs(1) == {4: [], 6: []}, what="lb-2 left gw's route")
    logged_since(gw, before_gw, r"lb4_\d+: (Connection closed|BFD session down)")

    lab.down()
    assert not system.alive(lbs[2]) and not system.alive(state.processes["bird-gw"])


def test_static_bfd_gateway_routes_over_the_lbs_whose_bfd_is_up(lab: Lab, bird: str) -> None:
    spec = LabSpec(
        lbs=2, proxies=1, targets=0, external="veth", routing="static-bfd", prefix=PREFIX
    )
    lab.up_network(spec)
    lbs = {i: start_lb_bird(lab, bird, i, "static-bfd", (1,)) for i in (1, 2)}
    lab.wait_gateway_routes([1, 2], timeout=15)
    for index in (1, 2):
        assert default_hops(lab, index, 4) == {"192.0.2.1"}
        assert default_hops(lab, index, 6) == {"fd00:e::1"}
    status = lab.status()
    assert status["gateway"]["routes_over"] == ["lb-1", "lb-2"]
    sessions = status["gateway"]["routers"][0]["sessions"]
    # the sessions of the lab's LBs, not of the 14 other possible ones
    assert sorted((s["lb"], s["family"], s["state"]) for s in sessions) == [
        ("lb-1", 4, "Up"), ("lb-1", 6, "Up"), ("lb-2", 4, "Up"), ("lb-2", 6, "Up"),
    ]  # fmt: skip
    assert all(s["protocol"] == "bfd" for s in sessions)

    gw = gateway_bird(lab)
    before_gw = log_of(gw)
    os.kill(lbs[2].pid, signal.SIGKILL)
    wait_until(lambda: lab.gateway_route_lbs() == {4: [1], 6: [1]}, what="lb-2 left gw's route")
    logged_since(gw, before_gw, r"Session to 192\.0\.2\.12 changed state from Up to Down")
    with pytest.raises(LabError, match="do not route the VIPs over lb-1, lb-2"):
        lab.wait_gateway_routes([1, 2], timeout=0.5)
