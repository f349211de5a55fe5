"""``meridioctl lab``: build, inspect, scale and remove the whole system in namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from meridio.lab import plan
from meridio.lab.lab import DEFAULT_STATE_DIR, Lab, Step, resolve_external
from meridio.lab.plan import LabSpec, PlanError
from meridio.lab.system import LabError


class _RichStep:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress = progress
        self.task = task

    def update(self, done: int, detail: str = "") -> None:
        self.progress.update(self.task, completed=done, detail=detail)

    def finish(self) -> None:
        total = self.progress.tasks[self._index()].total
        self.progress.update(self.task, completed=total, detail="done")

    def _index(self) -> int:
        return [t.id for t in self.progress.tasks].index(self.task)


class RichReporter:
    """Progress on stderr: one line per step, with a bar, a count and what it still waits for."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description:<44}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("[dim]{task.fields[detail]}"),
            console=console,
        )

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step(self, title: str, total: int) -> Step:
        task = self.progress.add_task(title, total=max(total, 1), detail="")
        return _RichStep(self.progress, task)

    def note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{text}")


def err_console() -> Console:
    return Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def out_console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group(name="lab")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="MERIDIO_LAB_DIR",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Where the lab keeps its state, logs, sockets and databases.",
)
@click.option(
    "--prefix",
    envvar="MERIDIO_LAB_PREFIX",
    default=plan.PREFIX,
    show_default=True,
    help="Prefix of the lab's network namespaces (mlab- or mlab-<name>-).",
)
@click.pass_context
def lab(ctx: click.Context, state_dir: Path, prefix: str) -> None:
    """The whole system on this host, in network namespaces (needs root)."""
    try:
        plan.check_prefix(prefix)
    except PlanError as exc:
        raise click.BadParameter(str(exc), param_hint="--prefix") from None
    ctx.obj = (state_dir, prefix)


def _lab(ctx: click.Context, reporter: RichReporter | None = None) -> Lab:
    state_dir, prefix = ctx.obj
    if os.geteuid() != 0:
        raise click.ClickException("the lab makes network namespaces: run it as root")
    return Lab(state_dir, prefix, reporter)


@lab.command()
@click.option("--lbs", type=int, default=2, show_default=True, help="Load balancers.")
@click.option("--proxies", type=int, default=2, show_default=True, help="Proxies (nodes).")
@click.option("--targets", type=int, default=4, show_default=True, help="Targets.")
@click.option(
    "--ip-family", type=click.Choice(list(plan.FAMILIES)), default="dualstack", show_default=True
)
@click.option(
    "--mechanism",
    type=click.Choice(plan.MECHANISMS),
    default="veth",
    show_default=True,
    help="How conduits are linked: veth pairs, or vxlan over the primary network.",
)
@click.option(
    "--lb-mode",
    type=click.Choice(plan.LB_MODES),
    default="first-packet",
    show_default=True,
    help="The LBs' mode (first-packet keeps connections where they are while targets come and go).",
)
@click.option(
    "--external",
    type=click.Choice(["auto", *plan.EXTERNAL_KINDS]),
    default="auto",
    show_default=True,
    help="The LBs' external interface: a macvlan or an 802.1Q VLAN the LB makes on its link "
    "to the gateway, or that veth link itself; auto: macvlan if the kernel has it, else veth.",
)
@click.option(
    "--routing",
    type=click.Choice(plan.ROUTINGS),
    default="bgp",
    show_default=True,
    help="How the gateways route the VIPs: bgp (BIRD on the gateways, the LBs announce the "
    "VIPs, with BFD), static-bfd (BIRD: static routes over every possible LB, each supervised "
    "by BFD), or static (routes the lab edits itself).",
)
@click.option(
    "--gateways",
    type=click.IntRange(*plan.LIMITS["gateways"]),
    default=1,
    show_default=True,
    help="Gateway routers: 1 (gw) or 2 (gw and gw-2, on the same external network).",
)
@click.option(
    "--streams",
    type=click.IntRange(*plan.LIMITS["streams"]),
    default=1,
    show_default=True,
    help="Streams of conduit-a: 1 (stream-a, port 5000) or 2 (and stream-b, port 6000: the "
    "even targets open it, and all but every fourth keep stream-a).",
)
@click.option(
    "--conduits",
    type=click.IntRange(*plan.LIMITS["conduits"]),
    default=1,
    show_default=True,
    help="Conduits: 1 (conduit-a) or 2 (and conduit-b: stream-c on the VIPs 203.0.113.2 and "
    "2001:db8::2, port 5000, opened by the odd targets; its own LBs lbb-N and proxies "
    "proxyb-N).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress display and no summary.")
@click.pass_context
def up(
    ctx: click.Context,
    lbs: int,
    proxies: int,
    targets: int,
    ip_family: str,
    mechanism: str,
    lb_mode: str,
    external: str,
    routing: str,
    gateways: int,
    streams: int,
    conduits: int,
    quiet: bool,
) -> None:
    """Build the lab and wait until every role is ready (a lab already here is removed first)."""
    started = time.monotonic()
    prefix = ctx.obj[1]
    try:
        spec = LabSpec(
            lbs=lbs,
            proxies=proxies,
            targets=targets,
            ip_family=ip_family,
            mechanism=mechanism,
            lb_mode=lb_mode,
            external=resolve_external(external),
            routing=routing,
            gateways=gateways,
            prefix=prefix,
            streams=streams,
            conduits=conduits,
        )
        spec.check()
    except (PlanError, LabError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        if quiet:
            _lab(ctx).up(spec)
        else:
            with RichReporter(err_console()) as reporter:
                _lab(ctx, reporter).up(spec)
    except LabError as exc:
        hint = ""
        if _lab(ctx).exists():
            hint = (
                "\n(the lab is left as it is for a look: `meridioctl lab status`, "
                "`meridioctl lab logs NAME`; `meridioctl lab down` removes it, `up` starts afresh)"
            )
        raise click.ClickException(f"{exc}{hint}") from None
    if not quiet:
        print_summary(_lab(ctx).status(), time.monotonic() - started)


def print_summary(status: dict[str, Any], seconds: float, *, hints: bool = True) -> None:
    console = out_console()
    console.print(
        f"\n[bold]meridio lab up[/] in {seconds:.1f} s: {status['lbs']} LBs "
        f"({status['lb_mode']}), {status['proxies']} proxies, {status['targets']} targets, "
        f"{status['ip_family']}, {status['mechanism']} conduits, {status['external']} external "
        f"interfaces, {status['routing']} routing"
    )
    console.print(_instances_table(status))
    gateway = status["gateway"]
    console.print(
        f"gateway and traffic client: namespace {gateway['namespace']} "
        f"({', '.join(gateway['addresses'])}), VIPs routed over {', '.join(gateway['routes_over'])}"
    )
    _print_gateways(console, status)
    _print_streams(console, status)
    if not hints:
        return
    console.print("\nTry:", highlight=False)
    for line in (
        "meridioctl lab traffic                   # 10 s of TCP to every VIP, a report per target",
        "meridioctl lab traffic --udp -c 50 -r 500",
        "meridioctl lab scale --targets 5         # and --lbs N",
        "meridioctl lab kill lb-2                 # an LB crashes; `scale --lbs 2` replaces it",
        "meridioctl lab tap target-1 close stream-a   # the application leaves a stream (TAPA)",
        "meridioctl lab restart nsp --kill        # the NSP crashes and comes back",
        "meridioctl lab status | logs lb-1 | down",
        f"ip netns exec {gateway['namespace']} bash  # a shell on the external host",
    ):
        console.print(f"  {line}", highlight=False)


def _print_streams(console: Console, status: dict[str, Any]) -> None:
    """Each stream: its conduit and where it is reached (TCP, UDP and SCTP)."""
    for stream in status.get("streams", []):
        console.print(
            f"{stream['name']} ({stream['conduit']}): {', '.join(stream['endpoints'])} "
            "(TCP, UDP and SCTP)",
            highlight=False,
        )


def _streams_text(row: dict[str, Any]) -> str:
    """A target's streams (``stream-a OPEN``) or an LB's (``stream-a 4``)."""
    streams = row.get("streams")
    if streams is None:
        return "TAPA not answering" if row["role"] == "target" and row["running"] else ""
    if isinstance(streams, dict):
        return ", ".join(f"{name} {count}" for name, count in streams.items())
    if not streams:
        return "no stream open"
    return ", ".join(
        f"{s['stream']} {s['status']}"
        if s["status"] == "OPEN"
        else f"{s['stream']} [red]{s['status']}[/]"
        for s in streams
    )


def _instances_table(status: dict[str, Any]) -> Table:
    table = Table(title=None)
    for column in ("name", "role", "namespace", "pid", "state", "addresses", "log"):
        table.add_column(column)
    for row in status["instances"]:
        state = "ready" if row["ready"] else ("running" if row["running"] else "[red]gone")
        if "targets" in row:
            state += f", {row['targets']} targets"
        if "sessions" in row:
            state += f", {row['established']}/{row['sessions']} sessions up"
        if row.get("bird"):
            state += f", BIRD pid {' '.join(map(str, row['bird']))}"
        if "node" in row and row["role"] == "target":
            state += f", on {row['node']}"
        streams = _streams_text(row)
        if streams:
            state += f"; {streams}"
        table.add_row(
            row["name"],
            row["role"],
            row["namespace"],
            str(row["pid"] or "-"),
            state,
            ", ".join(row["addresses"]),
            row["log"],
        )
    return table


def _print_gateways(console: Console, status: dict[str, Any]) -> None:
    """Each gateway router's sessions with the LBs and its routes to the VIPs."""
    gateway = status["gateway"]
    for router in gateway.get("routers", []):
        routes = "; ".join(
            f"{vip} over {', '.join(hops) or 'nothing'}" for vip, hops in router["routes"].items()
        )
        head = f"{router['host']}"
        if router["bird"]:
            head += f" ({router['bird']}, {'running' if router['running'] else '[red]gone[/]'})"
        console.print(f"{head}: {routes}", highlight=False)
        if router.get("error"):
            console.print(f"  [red]{router['error']}", highlight=False)
        if not router["sessions"]:
            continue
        table = Table(title=None)
        for column in ("LB", "neighbor", "protocol", "state", "since"):
            table.add_column(column)
        for session in router["sessions"]:
            state = session["state"]
            table.add_row(
                session["lb"] or "-",
                session["neighbor"],
                session["protocol"] or "-",
                state if session["established"] else f"[red]{state}",
                session["since"] or "-",
            )
        console.print(table)


@lab.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop every process and remove every namespace and link of the lab."""
    try:
        removed = _lab(ctx).down()
    except LabError as exc:
        raise _fail(exc) from None
    click.echo(f"removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))


@lab.command()
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)
@click.pass_context
def status(ctx: click.Context, output: str) -> None:
    """What runs where, and whether it is ready; exit status 1 unless everything is."""
    try:
        report = _lab(ctx).status()
    except LabError as exc:
        raise _fail(exc) from None
    if output == "json":
        click.echo(json.dumps(report, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(report, sort_keys=False), nl=False)
    else:
        console = out_console()
        console.print(
            f"lab {report['phase']} ({report['state_dir']}): {report['lbs']} LBs, "
            f"{report['proxies']} proxies, {report['targets']} targets, {report['ip_family']}, "
            f"{report['mechanism']}, LB mode {report['lb_mode']}, {report['routing']} routing"
        )
        console.print(_instances_table(report))
        gateway = report["gateway"]
        console.print(
            f"VIPs routed by {gateway['namespace']} over "
            f"{', '.join(gateway['routes_over']) or 'nothing'}"
        )
        _print_streams(console, report)
        _print_gateways(console, report)
    if not all(row["ready"] for row in report["instances"]):
        sys.exit(1)


@lab.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is appended.")
@click.option("-n", "--lines", type=int, default=0, help="Only the last N lines.")
@click.pass_context
def logs(ctx: click.Context, name: str, follow: bool, lines: int) -> None:
    """The log of one instance: nsp, ipam, lb-N, lbb-N, proxy-N, proxyb-N, target-N, server-N
    or bird-gw(-2)."""
    try:
        path = _lab(ctx).log_file(name)
    except LabError as exc:
        raise _fail(exc) from None
    argv = ["tail", *(["-F"] if follow else []), "-n", str(lines) if lines else "+1", str(path)]
    try:
        sys.exit(subprocess.call(argv))
    except KeyboardInterrupt:
        sys.exit(0)


@lab.command()
@click.option("--targets", type=int, help="Run this many targets.")
@click.option("--lbs", type=int, help="Run this many load balancers.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.pass_context
def scale(ctx: click.Context, targets: int | None, lbs: int | None, quiet: bool) -> None:
    """Add or remove targets (gracefully) or LBs (stopped gracefully: with static routing out
    of the gateway's route first, otherwise the LB withdraws itself; a new one is waited for
    until the gateways route to it); dead ones are replaced."""
    if targets is None and lbs is None:
        raise click.UsageError("give --targets N and/or --lbs N")
    try:
        if quiet:
            _lab(ctx).scale(targets=targets, lbs=lbs)
        else:
            with RichReporter(err_console()) as reporter:
                _lab(ctx, reporter).scale(targets=targets, lbs=lbs)
    except LabError as exc:
        raise _fail(exc) from None
    if not quiet:
        report = _lab(ctx).status()
        click.echo(
            f"{report['lbs']} LBs, {report['targets']} targets; gateway routes over "
            f"{', '.join(report['gateway']['routes_over'])}"
        )


@lab.command()
@click.argument("name")
@click.option(
    "--netns",
    is_flag=True,
    help="lb-N, gateway-2: remove the namespace too, with everything in it (the pod is gone).",
)
@click.pass_context
def kill(ctx: click.Context, name: str, netns: bool) -> None:
    """Kill an instance at once with SIGKILL: target-N (its namespace goes too, as when a
    pod dies), lb-N or lbb-N (the LB process crashes; its namespace stays unless --netns),
    gateway-N (the gateway router's BIRD: gateway-1 is gw's, gateway-2 gw-2's), or nsp,
    ipam, proxy-N, proxyb-N (the process crashes). `scale` replaces a killed target or LB;
    `restart` starts the others again."""
    try:
        _lab(ctx).kill(name, netns=netns)
    except LabError as exc:
        raise _fail(exc) from None
    click.echo(f"{name} killed" + (" and its namespace removed" if netns else ""))


@lab.command()
@click.argument("name")
@click.option("--kill", is_flag=True, help="SIGKILL (a crash) instead of SIGTERM.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.pass_context
def restart(ctx: click.Context, name: str, kill: bool, quiet: bool) -> None:
    """Stop an instance (SIGTERM, or SIGKILL with --kill) if it runs and start it again in its
    namespace: nsp, ipam, lb-N, lbb-N, proxy-N, proxyb-N, target-N (the sidecar: it reopens
    its streams by itself) or gateway-N; then wait until it is ready and the LBs' tables are
    whole again."""
    try:
        if quiet:
            _lab(ctx).restart(name, kill=kill)
        else:
            with RichReporter(err_console()) as reporter:
                _lab(ctx, reporter).restart(name, kill=kill)
    except LabError as exc:
        raise _fail(exc) from None
    click.echo(f"{name} restarted")


TAP_ACTIONS = ("open", "close", "list", "watch")


@lab.command()
@click.argument("target")
@click.argument("action", type=click.Choice(TAP_ACTIONS))
@click.argument("streams", nargs=-1)
@click.option(
    "--no-wait",
    is_flag=True,
    help="open, close: return once the target took the request, without waiting for OPEN "
    "and for the LBs' tables.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)
@click.pass_context
def tap(
    ctx: click.Context,
    target: str,
    action: str,
    streams: tuple[str, ...],
    no_wait: bool,
    output: str,
) -> None:
    """Drive target TARGET's TAPA (ambassador.v1.Tap) as its application would.

    \b
    meridioctl lab tap target-3 close stream-a     # and open; several streams at once too
    meridioctl lab tap target-3 list [-o json]     # its open streams and their status
    meridioctl lab tap target-3 watch              # every change (meridioctl tap watch)

    A stream is one of the lab's (stream-a, stream-b, stream-c: the conduit is known) or
    CONDUIT/STREAM. open waits until the stream is OPEN, and both until every LB's tables
    hold exactly the targets with the stream open.
    """
    try:
        if action == "list":
            rows = _lab(ctx).tap_list(target)
        elif action == "watch":
            sock = _lab(ctx).tap_socket(target)
        else:
            _lab(ctx).tap(target, action, streams, wait=not no_wait)
    except LabError as exc:
        raise _fail(exc) from None
    if action == "list":
        if output == "json":
            click.echo(json.dumps(rows, indent=2))
        elif output == "yaml":
            click.echo(yaml.safe_dump(rows, sort_keys=False), nl=False)
        else:
            table = Table(title=None)
            for column in ("trench", "conduit", "stream", "status"):
                table.add_column(column)
            for row in rows:
                table.add_row(row["trench"], row["conduit"], row["stream"], row["status"])
            out_console().print(table)
    elif action == "watch":
        argv = [sys.executable, "-m", "meridio.ctl", "tap", "watch", "--socket", str(sock)]
        argv += ["-o", output]
        try:
            sys.exit(subprocess.call(argv))
        except KeyboardInterrupt:
            sys.exit(0)
    else:
        click.echo(f"{target}: {action} {' '.join(streams)}")


STREAM_OPTION = click.option(
    "--stream",
    default=None,
    help="Against this stream's VIPs and port (default stream-a's: port 5000 of conduit-a's VIPs).",
)


@lab.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.option("--ipv4", "families", flag_value=4, multiple=True, help="Only the IPv4 VIP.")
@click.option("--ipv6", "families", flag_value=6, multiple=True, help="Only the IPv6 VIP.")
@STREAM_OPTION
@click.argument("probe_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def probe(
    ctx: click.Context,
    families: tuple[int, ...],
    stream: str | None,
    probe_args: tuple[str, ...],
) -> None:
    """Open new connections to the lab's VIPs at a fixed rate, from the external host.

    Every other option goes to `meridioctl traffic probe`: e.g. -r RATE, -d SECONDS, --udp,
    -o json. The report says how many failed and over which window (a failover's cost).
    """
    if "--help" in probe_args or "-h" in probe_args:
        click.echo(ctx.get_help())
        return
    try:
        argv = _lab(ctx).traffic_argv(probe_args, families or None, "probe", stream)
    except LabError as exc:
        raise _fail(exc) from None
    try:
        sys.exit(subprocess.call(argv))
    except KeyboardInterrupt:
        sys.exit(130)


@lab.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.option("--ipv4", "families", flag_value=4, multiple=True, help="Only the IPv4 VIP.")
@click.option("--ipv6", "families", flag_value=6, multiple=True, help="Only the IPv6 VIP.")
@STREAM_OPTION
@click.argument("client_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def traffic(
    ctx: click.Context,
    families: tuple[int, ...],
    stream: str | None,
    client_args: tuple[str, ...],
) -> None:
    """Run the traffic client on the external host against the lab's VIPs.

    Every other option goes to `meridioctl traffic client` (see `meridioctl traffic client
    --help`): e.g. --udp, -c CONNECTIONS, -r RATE, -d SECONDS, -o json.
    """
    if "--help" in client_args or "-h" in client_args:
        click.echo(ctx.get_help())
        return
    try:
        argv = _lab(ctx).traffic_argv(client_args, families or None, stream=stream)
    except LabError as exc:
        raise _fail(exc) from None
    try:
        sys.exit(subprocess.call(argv))
    except KeyboardInterrupt:
        sys.exit(130)
