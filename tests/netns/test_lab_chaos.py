"""End to end: a short chaos run (``meridioctl lab chaos``) on the default lab.

The lab as ``lab up`` makes it (BGP routing, 2 LBs in first-packet mode, 2 proxies, 4 targets,
every role's process supervised); for 40 s a role's process is SIGKILLed every 5 s or more
(the next kill waits until the lab is whole again) while long-lived TCP connections and a
probe of new connections run. The seed draws every kind of the default list in the first five
kills. It passes only when every goal is met: no connection lost and no connect failed for
NSP, IPAM and LB kills (an LB kill may fail new connects for under a second), a target kill
losing only that target's connections (none: the sidecar's restart costs nothing), every kill
followed by a whole lab, and every namespace's kernel after each restart as it was before it
(nothing stale: rules, routes, links, nftables and xtables rules, one BIRD per LB).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from meridio.lab import plan, system
from meridio.lab.cli import print_chaos
from meridio.lab.lab import Lab
from meridio.lab.plan import LabSpec
from tests.netns.test_lab import diagnose, meridioctl, reap_stale_labs

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = f"mlab-t{os.getpid()}c-"
SEED = 43
"""Draws nsp, ipam, lb-1, proxy-2 and target-1 first."""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if system.find_bird() is None:
        pytest.skip("BIRD 2 is not installed (Debian bird2; `make deps` installs it)")
    reap_stale_labs()
    the_lab = Lab(tmp_path_factory.mktemp("lab"), PREFIX)
    try:
        the_lab.up(LabSpec(prefix=PREFIX))
        yield the_lab
    finally:
        # the logs outlive the lab in pytest's base temp (the last three runs are kept)
        the_lab.down(keep_logs=tmp_path_factory.getbasetemp() / "lab-logs" / PREFIX)


def test_a_short_chaos_meets_every_goal(lab: Lab, tmp_path: Path) -> None:
    saved = tmp_path / "chaos.json"
    done = meridioctl(
        lab, "chaos", "--duration", "40", "--interval", "5", "--seed", str(SEED),
        "-o", "json", "--save", str(saved),
    )  # fmt: skip
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    assert json.loads(saved.read_text()) == report
    out = io.StringIO()
    print_chaos(Console(file=out, width=200), report)
    print(done.stderr, out.getvalue())
    assert done.returncode == (0 if report["ok"] else 1), done.stderr
    kills = report["kills"]
    assert [k["name"] for k in kills[:5]] == ["nsp", "ipam", "lb-1", "proxy-2", "target-1"]
    assert {f["kind"] for f in report["kinds"] if f["kills"]} == set(plan.CHAOS_KINDS)
    assert all(k["whole"] is not None and k["back"] is not None for k in kills), kills
    stale = [line for k in kills for line in k["stale"]]
    assert stale == [], stale
    assert report["missed"] == [] and report["ok"], f"{report['missed']}\n{diagnose(lab)}"
    tcp = report["traffic"]["tcp"]
    assert tcp["lost"] == 0 and tcp["failed_connects"] == 0, tcp
    assert set(tcp["hosts"]) == {f"target-{i}" for i in range(1, 5)}, tcp
    assert report["traffic"]["probe"]["ok"] > 0
    # the restarts are the lab's own count too
    status = lab.status()
    restarts = {row["name"]: row["restarts"] for row in status["instances"]}
    for name in {k["name"] for k in kills}:
        assert restarts[name] == sum(1 for k in kills if k["name"] == name), restarts
