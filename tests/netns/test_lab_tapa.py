"""End to end: applications open and close their streams through TAPA (``ambassador.v1.Tap``),
in the lab, with real daemons and the traffic tool.

One dual-stack lab with two streams on conduit-a (``stream-a`` on port 5000, ``stream-b`` on
port 6000 of the same VIPs) and a second conduit (``stream-c``, VIPs of its own, its own LBs
``lbb-N`` and proxies ``proxyb-N``) serves the module; the lab opens every target's streams
through its TAPA:

    target-1  stream-a, stream-c   (two conduits)
    target-2  stream-a, stream-b
    target-3  stream-a, stream-c
    target-4  stream-b

Static routing (the gateway's routes are the lab's own): what is tested here is the targets'
side. Every test leaves the streams as the lab opened them (the ``restore`` fixture checks).
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meridio.lab import plan, system
from meridio.lab.lab import Lab
from meridio.lab.plan import LabSpec
from tests.netns.test_lab import diagnose, meridioctl, reap_stale_labs, summary
from tests.waiting import HANG, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.lab_tapa]

PREFIX = f"mlab-t{os.getpid()}p-"
SPEC = LabSpec(prefix=PREFIX, streams=2, conduits=2, routing="static")
OPENED = {
    "target-1": {"stream-a", "stream-c"},
    "target-2": {"stream-a", "stream-b"},
    "target-3": {"stream-a", "stream-c"},
    "target-4": {"stream-b"},
}
LBS = {"conduit-a": ("lb-1", "lb-2"), "conduit-b": ("lbb-1", "lbb-2")}
LONG = ("--connections", "30", "--rate", "150")


def serving(stream: str) -> set[str]:
    return {t for t, streams in OPENED.items() if stream in streams}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reap_stale_labs()
    the_lab = Lab(tmp_path_factory.mktemp("lab"), PREFIX)
    try:
        the_lab.up(SPEC)
        yield the_lab
    finally:
        # the logs outlive the lab in pytest's base temp (the last three runs are kept)
        the_lab.down(keep_logs=tmp_path_factory.getbasetemp() / "lab-logs" / PREFIX)


@pytest.fixture
def restore(lab: Lab) -> Iterator[Lab]:
    """After the test: every target runs with the streams the lab opened on it, all OPEN."""
    yield lab
    for target, streams in OPENED.items():
        rows = lab.tap_list(target)
        assert {r["stream"]: r["status"] for r in rows} == dict.fromkeys(streams, "OPEN"), rows


def tap_rows(lab: Lab, target: str) -> dict[str, str]:
    return {r["stream"]: r["status"] for r in lab.tap_list(target)}


def lb_tables(lab: Lab, lb: str) -> dict[str, dict[tuple[str, ...], int]]:
    """Per stream of the LB, its targets (addresses without prefix length) -> identifier."""
    show = system.run_async(system.lb_show(plan.lb_socket(lab.state_dir, lb)))
    assert show is not None, f"{lb} does not answer"
    return {
        stream.name: {
            tuple(sorted(str(ipaddress.ip_interface(ip).ip) for ip in t.ips)): t.identifier
            for t in stream.targets
        }
        for stream in show.streams
    }


def digests(lab: Lab) -> dict[str, dict[str, str]]:
    out = {}
    for lb in (*LBS["conduit-a"], *LBS["conduit-b"]):
        show = system.run_async(system.lb_show(plan.lb_socket(lab.state_dir, lb)))
        out[lb] = system.lb_digests(show)
    return out


def conduit_ips(lab: Lab, target: str) -> dict[str, set[str]]:
    """The target's global addresses per conduit interface (``conduit0``, ``conduit1``)."""
    out = system.run("ip", "-n", lab.netns(target), "-j", "addr", "show")
    return {
        link["ifname"]: {a["local"] for a in link["addr_info"] if a.get("scope") == "global"}
        for link in json.loads(out.stdout)
        if link["ifname"].startswith("conduit")
    }


def holders(lab: Lab, lb: str, stream: str) -> set[str]:
    """The targets (by name) in ``stream``'s table of ``lb``."""
    addresses = {t: set().union(*conduit_ips(lab, t).values()) for t in OPENED}
    held = set()
    for ips in lb_tables(lab, lb).get(stream, {}):
        held |= {t for t, mine in addresses.items() if set(ips) <= mine}
    return held


def assert_clean(report: dict[str, Any], targets: set[str], lab: Lab, what: str) -> None:
    assert report["lost_connections"] == 0, f"{what}: {summary(report)}\n{diagnose(lab)}"
    assert report["failed_connects"] == 0, f"{what}: {summary(report)}\n{diagnose(lab)}"
    assert set(report["hosts"]) == targets, f"{what}: {summary(report)}"


# --- each stream to its own targets --------------------------------------------------------------


def test_traffic_to_each_stream_reaches_only_that_stream_s_targets(restore: Lab) -> None:
    lab = restore
    runs = {
        stream: lab.start_traffic(["--duration", "2", *LONG], stream=stream)
        for stream in ("stream-a", "stream-b", "stream-c")
    }
    runs["stream-b/udp"] = lab.start_traffic(["--udp", "--duration", "2", *LONG], stream="stream-b")
    for what, run in runs.items():
        stream = what.split("/")[0]
        assert_clean(run.result(), serving(stream), lab, what)
    # every LB of a conduit holds exactly the targets with each of its streams open
    for lb in LBS["conduit-a"]:
        assert holders(lab, lb, "stream-a") == serving("stream-a")
        assert holders(lab, lb, "stream-b") == serving("stream-b")
    for lb in LBS["conduit-b"]:
        assert set(lb_tables(lab, lb)) == {"stream-c"}
        assert holders(lab, lb, "stream-c") == serving("stream-c")
    # target-1 is in two conduits: an interface each
    assert sorted(conduit_ips(lab, "target-1")) == ["conduit0", "conduit1"]
    status = json.loads(meridioctl(lab, "status", "-o", "json").stdout)
    rows = {r["name"]: r for r in status["instances"]}
    assert {s["stream"]: s["status"] for s in rows["target-2"]["streams"]} == {
        "stream-a": "OPEN",
        "stream-b": "OPEN",
    }
    assert rows["lbb-1"]["streams"] == {"stream-c": 2}


# --- a stream closed and opened again while traffic runs -----------------------------------------


def test_a_stream_closed_on_one_target_moves_nothing_else_and_opened_again_gets_new_connections(
    restore: Lab,
) -> None:
    lab = restore
    victim = "target-2"
    runs = {
        "stream-a": lab.start_traffic(["--duration", "6", *LONG], stream="stream-a", progress=True),
        "stream-b": lab.start_traffic(["--duration", "6", *LONG], stream="stream-b", progress=True),
    }
    for run in runs.values():
        run.wait_connected()
    before = {lb: lb_tables(lab, lb) for lb in LBS["conduit-a"]}
    lab.tap(victim, "close", ["stream-a"])  # returns once every LB's tables say so
    assert tap_rows(lab, victim) == {"stream-b": "OPEN"}
    for lb in LBS["conduit-a"]:
        assert holders(lab, lb, "stream-a") == serving("stream-a") - {victim}, lb
        assert holders(lab, lb, "stream-b") == serving("stream-b"), lb
        # stream-b's table has not changed at all; the others keep their identifiers
        after = lb_tables(lab, lb)
        assert after["stream-b"] == before[lb]["stream-b"], lb
        assert set(after["stream-a"].items()) < set(before[lb]["stream-a"].items()), lb
    reports = {stream: run.result() for stream, run in runs.items()}
    print("close: " + json.dumps({s: summary(r) for s, r in reports.items()}))
    # the other stream of the target keeps its traffic, untouched
    assert_clean(reports["stream-b"], serving("stream-b"), lab, "stream-b across the close")
    assert reports["stream-b"]["host_changes"] == 0, summary(reports["stream-b"])
    # the other targets of the stream lose nothing; only the victim's connections may go
    a = reports["stream-a"]
    assert set(a["lost_per_host"]) <= {victim}, f"{summary(a)}\n{diagnose(lab)}"
    assert a["failed_connects"] == 0, summary(a)
    assert a["hosts"].get(victim, 0) > 0, summary(a)

    # open again: the target is back in stream-a's tables and gets new connections
    lab.tap(victim, "open", ["stream-a"])
    assert tap_rows(lab, victim) == {"stream-a": "OPEN", "stream-b": "OPEN"}
    for lb in LBS["conduit-a"]:
        assert holders(lab, lb, "stream-a") == serving("stream-a"), lb
    report = lab.start_traffic(
        ["--duration", "2", "--connections", "40", "--rate", "200"], stream="stream-a"
    ).result()
    assert_clean(report, serving("stream-a"), lab, "new stream-a connections after the open")


def test_closing_a_conduit_s_last_stream_leaves_the_conduit_and_the_cli_drives_tapa(
    restore: Lab,
) -> None:
    lab = restore
    target = "target-3"
    links = conduit_ips(lab, target)
    assert sorted(links) == ["conduit0", "conduit1"]
    # which link is conduit-b's: slots go in the order the conduits were opened
    in_stream_c = {
        ip for ips in lb_tables(lab, LBS["conduit-b"][0]).get("stream-c", {}) for ip in ips
    }
    (link_b,) = [name for name, ips in links.items() if ips & in_stream_c]
    done = meridioctl(lab, "tap", target, "close", "stream-c")
    assert done.returncode == 0, done.stderr
    for lb in LBS["conduit-b"]:
        assert holders(lab, lb, "stream-c") == serving("stream-c") - {target}, lb
    listed = json.loads(meridioctl(lab, "tap", target, "list", "-o", "json").stdout)
    assert [(r["conduit"], r["stream"], r["status"]) for r in listed] == [
        ("conduit-a", "stream-a", "OPEN")
    ]
    # its conduit-b link goes once the conduit's drain time (1 s) has passed
    wait_until(lambda: link_b not in conduit_ips(lab, target), what=f"{link_b} gone", interval=0.1)
    report = lab.start_traffic(["--duration", "2", *LONG], stream="stream-c").result()
    assert_clean(report, serving("stream-c") - {target}, lab, "stream-c without target-3")
    done = meridioctl(lab, "tap", target, "open", "conduit-b/stream-c")
    assert done.returncode == 0, done.stderr
    assert tap_rows(lab, target) == {"stream-a": "OPEN", "stream-c": "OPEN"}
    for lb in LBS["conduit-b"]:
        assert holders(lab, lb, "stream-c") == serving("stream-c"), lb
    refused = meridioctl(lab, "tap", target, "open", "stream-x")
    assert refused.returncode != 0 and "no stream 'stream-x'" in refused.stderr
    # a stream the trench does not define: open, but UNDEFINED; it changes no table
    before = digests(lab)
    lab.tap(target, "open", ["conduit-a/stream-z"])
    assert tap_rows(lab, target)["stream-z"] == "UNDEFINED"
    lab.tap(target, "close", ["conduit-a/stream-z"])
    assert tap_rows(lab, target) == {"stream-a": "OPEN", "stream-c": "OPEN"}
    assert digests(lab) == before


# --- restarts -------------------------------------------------------------------------------------


def test_a_restarted_target_gets_its_identifiers_back_and_the_tables_stay_the_same(
    restore: Lab,
) -> None:
    lab = restore
    target = "target-1"  # in two conduits
    before = digests(lab)
    identifiers = {lb: lb_tables(lab, lb) for lb in ("lb-1", "lbb-1")}
    run = lab.start_traffic(["--duration", "5", *LONG], stream="stream-a", progress=True)
    run.wait_connected()
    proc = lab.load().processes[target]
    old = system.role_pid(proc)
    # SIGKILL; its supervisor starts it again; this waits for OPEN and the tables
    lab.restart(target, kill=True)
    new = system.role_pid(proc)
    assert old is not None and new is not None and new != old
    assert system.proc_start_time(old) is None
    status = system.supervised(proc)
    assert status is not None and status.restarts == 1
    assert tap_rows(lab, target) == {"stream-a": "OPEN", "stream-c": "OPEN"}
    assert digests(lab) == before
    assert {lb: lb_tables(lab, lb) for lb in ("lb-1", "lbb-1")} == identifiers
    assert "reopening the streams of the last run" in Path(proc.log).read_text()
    # the application (the traffic server) never noticed its sidecar crashing
    assert_clean(run.result(), serving("stream-a"), lab, "stream-a across the sidecar restart")


def test_watch_shows_unavailable_while_the_nsp_is_down_and_open_again_after_it_is_back(
    restore: Lab,
) -> None:
    lab = restore
    target = "target-3"
    sock = lab.tap_socket(target)
    watch = subprocess.Popen(
        [sys.executable, "-m", "meridio.ctl", "tap", "watch", "--socket", str(sock), "-o", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[dict[str, str]] = queue.Queue()

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            lines.put({r["stream"]: r["status"] for r in json.loads(line)})

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[dict[str, str]] = []

    def until(wanted: dict[str, str]) -> None:
        """Wait for the watch to show ``wanted`` (HANG: a bound for a hang, not a goal)."""
        try:
            while seen[-1:] != [wanted]:
                seen.append(lines.get(timeout=HANG))
        except queue.Empty:
            raise AssertionError(f"no {wanted} within {HANG:g}s; seen {seen}") from None

    try:
        opened = dict.fromkeys(OPENED[target], "OPEN")
        until(opened)
        before = digests(lab)
        lab.kill("nsp")  # its supervisor starts it again; nobody calls Open
        until(dict.fromkeys(OPENED[target], "UNAVAILABLE"))
        until(opened)
        lab.wait_whole(HANG)
    finally:
        watch.terminate()
        watch.wait(5)
    # the registrations are there as before: the tables have not moved
    assert digests(lab) == before
    report = lab.start_traffic(["--duration", "2", *LONG], stream="stream-c").result()
    assert_clean(report, serving("stream-c"), lab, "stream-c after the NSP came back")
