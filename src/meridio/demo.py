"""``meridioctl demo`` (``make demo``): the whole system on this host, working, in half a minute.

It brings a dual-stack lab up (2 LBs, 2 proxies, 4 targets, an external host routing the VIPs
over the LBs), sends traffic from the external host to the IPv4 VIP and to the IPv6 VIP and
shows which target served each connection, scales the targets out by one while connections are
running (none is lost, and new connections reach the new target), and takes the lab down.

It runs a lab of its own (namespaces ``mlab-demo-...``, state in ``/run/meridio-demo``), so a
lab made with ``meridioctl lab up`` is left alone.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from meridio.lab import plan
from meridio.lab.cli import RichReporter, err_console, out_console, print_summary
from meridio.lab.lab import Lab, QuietReporter, resolve_external
from meridio.lab.plan import LabSpec
from meridio.lab.system import LabError
from meridio.traffic.render import render_report

PREFIX = "mlab-demo-"
STATE_DIR = Path("/run/meridio-demo")
TOOLS = ("ip", "iptables", "ip6tables", "nft", "conntrack")


def _check_host() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the demo makes network namespaces: run it as root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise click.ClickException(
            f"missing {', '.join(missing)}: `make venv` installs them (Debian packages "
            "iproute2, iptables, nftables, conntrack)"
        )


def _traffic(lab: Lab, console: Console, title: str, *args: str) -> dict[str, Any]:
    console.rule(f"[bold]{title}")
    report = lab.traffic(args)
    render_report(console, report)
    return report


def run_demo() -> None:
    _check_host()
    console = out_console()
    started = time.monotonic()
    lab = Lab(STATE_DIR, PREFIX)
    console.rule("[bold]meridio demo: the lab")
    console.print(
        "An external host (gateway and traffic client) routes the VIPs over two load balancers "
        "(equal-cost multipath); the LBs spread the connections over four targets with Maglev, "
        "through the proxies of two nodes; the replies go back through the LBs and the gateway.",
        highlight=False,
    )
    try:
        spec = LabSpec(external=resolve_external("auto"), prefix=PREFIX)
        with RichReporter(err_console()) as reporter:
            lab.reporter = reporter
            lab.up(spec)
        lab.reporter = QuietReporter()
        print_summary(lab.status(), time.monotonic() - started, hints=False)

        vip4, vip6 = plan.vip_endpoints((4, 6))
        _traffic(
            lab,
            console,
            f"TCP to the IPv4 VIP {vip4}: 40 connections for 3 s",
            "--address", vip4, "--connections", "40", "--rate", "400", "--duration", "3",
        )  # fmt: skip
        _traffic(
            lab,
            console,
            f"TCP to the IPv6 VIP {vip6}: 40 connections for 3 s",
            "--address", vip6, "--connections", "40", "--rate", "400", "--duration", "3",
        )  # fmt: skip
        _traffic(
            lab,
            console,
            "UDP to both VIPs: 40 flows for 3 s",
            "--udp", "--connections", "40", "--rate", "400", "--duration", "3",
        )  # fmt: skip

        console.rule("[bold]Scaling the targets out by one, with connections running")
        running = lab.start_traffic(["--connections", "40", "--rate", "200", "--duration", "7"])
        time.sleep(2)
        with RichReporter(err_console()) as reporter:
            lab.reporter = reporter
            lab.scale(targets=5)
        lab.reporter = QuietReporter()
        console.print("target-5 is up and in both LBs' tables.", highlight=False)
        new = _traffic(
            lab,
            console,
            "New connections after the scale-out (TCP, both VIPs): target-5 gets its share",
            "--connections", "50", "--rate", "500", "--duration", "3",
        )  # fmt: skip
        console.rule("[bold]The connections that ran through the scale-out")
        kept = running.result()
        render_report(console, kept)
        console.print(
            f"target-5 served {new['hosts'].get('target-5', 0)} of the new connections; "
            f"{kept['lost_connections']} of the running connections were lost while it joined.",
            highlight=False,
        )
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        console.rule("[bold]Taking the lab down")
        removed = lab.down()
        console.print(
            f"removed {len(removed)} namespaces and every process in them; "
            f"the demo took {time.monotonic() - started:.0f} s",
            highlight=False,
        )
