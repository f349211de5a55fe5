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
from meridio.lab.chaos import ChaosSettings, kill_lines, run_chaos
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
@click.option(
    "--restart/--no-restart",
    default=True,
    show_default=True,
    help="Supervise every role's process and start it again, with backoff, when it dies (a "
    "pod's restart policy); --no-restart leaves a dead process dead, to study a failure.",
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
    restart: bool,
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
            restart=restart,
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
        "meridioctl lab kill lb-2                 # an LB crashes; its supervisor restarts it",
        "meridioctl lab tap target-1 close stream-a   # the application leaves a stream (TAPA)",
        "meridioctl lab restart nsp --kill        # the NSP crashes and comes back",
        "meridioctl lab chaos --duration 60       # a random role killed every 5 s, under traffic",
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


def _gone_text(row: dict[str, Any]) -> str:
    """An instance whose process does not run: waiting for its supervisor to start it again,
    exited (``--no-restart``), or gone."""
    supervisor = row.get("supervisor")
    end = (supervisor or {}).get("last_exit") or {}
    how = end.get("signal") or (f"status {end['code']}" if end.get("code") is not None else "")
    if supervisor and supervisor["state"] == "waiting":
        return f"[yellow]restarting in {supervisor['next_start'] or 0:g} s" + (
            f" ({how})" if how else ""
        )
    if supervisor and supervisor["state"] == "exited":
        return f"[red]exited ({how or '?'}), not restarted"
    return "[red]gone"


def _instances_table(status: dict[str, Any]) -> Table:
    table = Table(title=None)
    for column in ("name", "role", "namespace", "pid", "restarts", "state", "addresses", "log"):
        table.add_column(column)
    for row in status["instances"]:
        state = "ready" if row["ready"] else ("running" if row["running"] else _gone_text(row))
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
            str(row["restarts"]) if row.get("supervisor") else "-",
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
@click.option(
    "--keep-logs",
    type=click.Path(file_okay=False, path_type=Path),
    help="Copy every instance's logs into this directory before they are removed.",
)
@click.pass_context
def down(ctx: click.Context, keep_logs: Path | None) -> None:
    """Stop every process and remove every namespace and link of the lab."""
    try:
        removed = _lab(ctx).down(keep_logs)
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
            + ("" if report.get("restart", True) else ", no restarts (--no-restart)")
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
    help="target-N, lb-N, gateway-2: the pod is gone: its supervisors, everything in its "
    "namespace and the namespace (scale replaces it).",
)
@click.pass_context
def kill(ctx: click.Context, name: str, netns: bool) -> None:
    """Kill an instance at once with SIGKILL: the process of nsp, ipam, lb-N, lbb-N, proxy-N,
    proxyb-N, target-N (the sidecar) or server-N (the target's application) crashes, as a
    container does, and its supervisor starts it again (not after `up --no-restart`: then
    `restart` does); gateway-N: the gateway router's BIRD (gateway-1 is gw's, gateway-2
    gw-2's), which only `restart gateway-N` starts again."""
    try:
        pid = _lab(ctx).kill(name, netns=netns)
    except LabError as exc:
        raise _fail(exc) from None
    if netns:
        click.echo(f"{name}'s pod is gone: its processes and its namespace")
    elif pid is not None:
        click.echo(f"{name} killed (pid {pid})")
    else:
        click.echo(f"{name} killed")


@lab.command()
@click.argument("name")
@click.option("--kill", is_flag=True, help="SIGKILL (a crash) instead of SIGTERM.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.pass_context
def restart(ctx: click.Context, name: str, kill: bool, quiet: bool) -> None:
    """Stop an instance's process (SIGTERM, or SIGKILL with --kill) if it runs and have it
    started again in its namespace: nsp, ipam, lb-N, lbb-N, proxy-N, proxyb-N, target-N (the
    sidecar: it reopens its streams by itself) or gateway-N; then wait until it is ready and
    the LBs' tables are whole again. Its supervisor starts it again (the restart is counted);
    after `up --no-restart` a new supervisor does."""
    try:
        if quiet:
            _lab(ctx).restart(name, kill=kill)
        else:
            with RichReporter(err_console()) as reporter:
                _lab(ctx, reporter).restart(name, kill=kill)
    except LabError as exc:
        raise _fail(exc) from None
    click.echo(f"{name} restarted")


@lab.command()
@click.argument("names", nargs=-1)
@click.option(
    "--ca",
    is_flag=True,
    help="Rotate the lab's CA: the new CA into every trust bundle, every instance a "
    "certificate of it, then the old CA out of the bundles (each step waited for).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.pass_context
def rotate(ctx: click.Context, names: tuple[str, ...], ca: bool, quiet: bool) -> None:
    """Issue new certificates from the lab's CA to instances NAMES (nsp, ipam, lb-N, lbb-N,
    proxy-N, proxyb-N, target-N; all when none) and wait until each running one has loaded
    them (its log says so): new handshakes use them, established connections go on. With
    --ca, rotate the CA itself without losing a connection."""
    try:
        if quiet:
            report = _lab(ctx).rotate(names, ca=ca)
        else:
            with RichReporter(err_console()) as reporter:
                report = _lab(ctx, reporter).rotate(names, ca=ca)
    except LabError as exc:
        raise _fail(exc) from None
    what = f"{len(report.instances)} certificates re-issued ({', '.join(report.instances)})"
    if ca:
        what += f"; CA {report.ca_before} -> {report.ca_after}"
    click.echo(f"{what} in {report.seconds:g} s")


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


@lab.command()
@click.option(
    "-d",
    "--duration",
    type=click.FloatRange(1),
    default=600.0,
    show_default=True,
    help="Seconds during which instances are killed.",
)
@click.option(
    "-i",
    "--interval",
    type=click.FloatRange(0.5),
    default=5.0,
    show_default=True,
    help="Seconds between kills (at least: a kill waits until the lab is whole again).",
)
@click.option("--seed", type=int, help="Seed of the draws (default: a random one, printed).")
@click.option(
    "--kinds",
    default=",".join(plan.CHAOS_KINDS),
    show_default=True,
    help="What may be killed: a comma-separated list of "
    + ", ".join(plan.CHAOS_KIND_CHOICES)
    + " (server: a target's application).",
)
@click.option(
    "-c", "--connections", type=click.IntRange(1), default=40, show_default=True,
    help="Long-lived connections of the traffic client.",
)  # fmt: skip
@click.option(
    "-r", "--rate", type=click.FloatRange(1), default=200.0, show_default=True,
    help="Packets per second over all the long-lived connections.",
)  # fmt: skip
@click.option(
    "--probe-rate", type=click.FloatRange(0.1), default=20.0, show_default=True,
    help="New connections per second (traffic probe).",
)  # fmt: skip
@click.option("--udp", is_flag=True, help="UDP flows beside the TCP connections.")
@click.option(
    "--recover-timeout", type=click.FloatRange(1), default=60.0, show_default=True,
    help="Seconds the lab may take to be whole again after a kill; longer ends the run.",
)  # fmt: skip
@click.option(
    "--check-kernel/--no-check-kernel",
    default=True,
    show_default=True,
    help="Compare every namespace's kernel state before each kill and once the lab is whole "
    "again after it (stale rules, routes, links, nft and xtables rules, processes).",
)
@click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the JSON report to this file.",
)
@click.pass_context
def chaos(
    ctx: click.Context,
    duration: float,
    interval: float,
    seed: int | None,
    kinds: str,
    connections: int,
    rate: float,
    probe_rate: float,
    udp: bool,
    recover_timeout: float,
    check_kernel: bool,
    output: str,
    save: Path | None,
) -> None:
    """Kill a random role instance every few seconds while traffic runs, and report.

    Long-lived connections (the traffic client) and new ones (traffic probe) run from the
    external host to the VIPs; every INTERVAL seconds a kind is drawn from KINDS, then one of
    its instances, whose process gets SIGKILL (its supervisor starts it again). Each lost
    connection and failed connect is put down to the last kill before it. Goals (issue 15):
    no connection lost to an NSP, IPAM or LB kill, new connects failing for under 1 s after
    an LB kill, and a target kill losing that target's connections only. Exit status 1 when
    a goal is missed.
    """
    try:
        kind_list = plan.parse_chaos_kinds(kinds)
    except PlanError as exc:
        raise click.BadParameter(str(exc), param_hint="--kinds") from None
    settings = ChaosSettings(
        duration=duration,
        interval=interval,
        seed=seed,
        kinds=kind_list,
        connections=connections,
        rate=rate,
        probe_rate=probe_rate,
        udp=udp,
        recover_timeout=recover_timeout,
        check_kernel=check_kernel,
    )
    console = err_console()
    try:
        report = run_chaos(_lab(ctx), settings, lambda text: console.print(text, highlight=False))
    except LabError as exc:
        raise _fail(exc) from None
    if save is not None:
        save.write_text(json.dumps(report, indent=2) + "\n")
    if output == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        print_chaos(out_console(), report)
    if not report["ok"]:
        sys.exit(1)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_chaos(console: Console, report: dict[str, Any]) -> None:
    """The chaos report as tables: per kind, what the kills cost; the kills that cost
    something; the traffic; the goals missed."""
    settings = report["settings"]
    console.print(
        f"\n[bold]chaos[/]: {len(report['kills'])} kills in {report['elapsed']:.0f} s "
        f"(seed {report['seed']}, a kill every {settings['interval']:g} s or more)"
        + (f"; stopped: {report['stopped']}" if report["stopped"] else ""),
        highlight=False,
    )
    table = Table(title=None)
    for column in (
        "kind", "kills", "back (max s)", "whole (max s)", "lost", "lost elsewhere",
        "failed connects", "failure span (s)", "goal",
    ):  # fmt: skip
        table.add_column(column)
    for f in report["kinds"]:
        table.add_row(
            f["kind"],
            str(f["kills"]),
            _seconds(f["back_max"]),
            _seconds(f["whole_max"]),
            str(f["lost"]),
            str(f["lost_elsewhere"]),
            str(f["failed_connects"]),
            f"{f['failure_span']:.2f}",
            report["goals"].get(f["kind"], "(reported)"),
        )
    console.print(table)
    lines = kill_lines(report)
    if lines:
        console.print("Kills that cost something:", highlight=False)
        for line in lines:
            console.print(f"  {line}", highlight=False)
    for name, t in report["traffic"].items():
        if name == "probe":
            console.print(
                f"new connections (probe): {t['attempts']} attempts, {t['failed']} failed "
                f"{t['errors'] or ''}",
                highlight=False,
            )
        else:
            console.print(
                f"long-lived {name}: {t['connections']} connections, {t['lost']} lost "
                f"{t['lost_per_host'] or ''}, {t['failed_connects']} failed connects",
                highlight=False,
            )
    unexplained = report.get("unexplained", {})
    if unexplained.get("lost") or unexplained.get("failed"):
        first = min((k["at"] for k in report["kills"]), default=0.0)
        console.print(
            f"no kill to blame: {len(unexplained['lost'])} lost, {len(unexplained['failed'])} "
            "connects failed (before the first kill, or while the lab was whole), at "
            + ", ".join(
                f"{x['at'] - first:.1f} s"
                for x in [*unexplained["lost"], *unexplained["failed"]][:10]
            ),
            highlight=False,
        )
    stale = [line for k in report["kills"] for line in k["stale"]]
    for line in stale[:20]:
        console.print(f"  [red]stale[/] {line}", highlight=False)
    if report["missed"]:
        for line in report["missed"]:
            console.print(f"[red]missed:[/] {line}", highlight=False)
    else:
        console.print("[green]every goal met[/]", highlight=False)
