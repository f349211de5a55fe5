"""Chaos: the lab as ``lab up`` makes it, a role's process killed every 5 s for 10 minutes.

``lab up`` with the defaults (BGP routing, 2 LBs in first-packet mode, 2 proxies, 4 targets,
dual-stack, every role's process supervised), in namespaces of its own, then what ``meridioctl
lab chaos --duration 600 --interval 5`` does: a kind drawn evenly from nsp, ipam, lb, proxy and
target, one of its instances SIGKILLed, the next kill once the lab is whole again and at least
5 s later, while 40 long-lived TCP connections (200 packets/s) and 20 new connections per
second run from the external host. Prints the chaos report (per kind: kills, time until the
instance and the whole lab were back, connections lost, connects failed, stale kernel state)
and writes its JSON next to the temporary lab (path printed).

    python -m bench chaos
    MERIDIO_CHAOS_DURATION=120 MERIDIO_CHAOS_SEED=1 python -m bench chaos
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from bench.common import progress
from meridio.lab import system
from meridio.lab.chaos import ChaosSettings, run_chaos
from meridio.lab.cli import out_console, print_chaos
from meridio.lab.lab import Lab
from meridio.lab.plan import LabSpec


def main() -> None:
    if system.find_bird() is None:
        print("BIRD 2 is not installed (Debian bird2): the default lab routes with BGP")
        return
    duration = float(os.environ.get("MERIDIO_CHAOS_DURATION", "600"))
    seed_text = os.environ.get("MERIDIO_CHAOS_SEED", "")
    seed = int(seed_text) if seed_text else None
    workdir = Path(tempfile.mkdtemp(prefix="mbench-chaos-", dir="/tmp"))
    prefix = f"mlab-b{os.getpid()}c-"
    lab = Lab(workdir / "lab", prefix)
    try:
        lab.up(LabSpec(prefix=prefix))
        progress("lab up (the defaults)")
        report = run_chaos(lab, ChaosSettings(duration=duration, interval=5.0, seed=seed), progress)
    finally:
        lab.down()
    saved = Path(tempfile.gettempdir()) / f"mbench-chaos-{report['seed']}.json"
    saved.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    print_chaos(out_console(), report)
    print(f"  report: {saved}")


if __name__ == "__main__":
    main()
