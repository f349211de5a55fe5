"""``meridioctl traffic``: continuous-traffic server, client, new-connection probe, analysis.

The tool measures disturbances (failover, scaling, upgrades), not throughput: the client keeps
N long-lived connections at a steady rate and records which server ("target") answered each one,
which connections broke, and how many packets went unanswered. The ideas are those of Nordix's
ctraffic; the wire format and accounting are described in ``meridio.traffic.core``.

``probe`` opens new connections at a fixed rate instead (``meridio.traffic.probe``), to measure
how long new connections fail during a failover (the failure window).

Exit status of ``client``: 0 when it ran (the report tells how well it went), 1 when not a
single connection could be established, 2 for usage errors; of ``probe`` likewise, 1 when not
one attempt succeeded.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any, TextIO

import click
import trio
from rich.console import Console

from meridio.traffic.client import ClientSettings, run_client
from meridio.traffic.core import (
    DEFAULT_PORT,
    MAX_PACKET_SIZE,
    MIN_PACKET_SIZE,
    PROBE_REPORT_KIND,
    HostPort,
    ProbeCounts,
    ProbeSettings,
    Totals,
    parse_hostport,
    probe_progress_line,
    progress_line,
    validate_report,
)
from meridio.traffic.probe import run_probe
from meridio.traffic.render import (
    ChartUnavailable,
    render_probe_report,
    render_report,
    write_chart,
)
from meridio.traffic.server import BindError, Server, run_server


def _addresses(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[HostPort, ...]:
    try:
        return tuple(parse_hostport(v, DEFAULT_PORT, allow_zero=True) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@click.group(name="traffic")
def traffic() -> None:
    """Continuous traffic: an echo server that names itself, a client that reports which
    server answered each of its long-lived connections and which connections broke, and a
    probe of new connections at a fixed rate that reports how long they failed."""


@traffic.command()
@click.option(
    "-a",
    "--address",
    "addresses",
    multiple=True,
    default=("[::]:5000",),
    show_default=True,
    callback=_addresses,
    help="HOST[:PORT] to listen on (TCP and UDP); repeat for more. [::] is dual-stack.",
)
@click.option(
    "--name",
    default=socket.gethostname,
    show_default="host name",
    help="Name written into the replies, so a client learns which server answered.",
)
@click.option("--tcp/--no-tcp", default=True, show_default=True, help="Serve TCP.")
@click.option("--udp/--no-udp", default=True, show_default=True, help="Serve UDP.")
@click.option("-q", "--quiet", is_flag=True, help="No start and stop lines on stderr.")
def server(addresses: tuple[HostPort, ...], name: str, tcp: bool, udp: bool, quiet: bool) -> None:
    """Echo TCP and UDP, naming the server in the replies, until SIGTERM or SIGINT.

    The first bytes of each TCP connection's reply stream, and of every UDP reply, are the
    server's name and a NUL; everything else is echoed unchanged. Exit status 0 after a signal,
    1 when an address cannot be bound.
    """
    if not tcp and not udp:
        raise click.UsageError("nothing to serve: --no-tcp and --no-udp together")
    if not name:
        raise click.BadParameter("must not be empty", param_hint="--name")

    def announce(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    try:
        trio.run(run_server, Server(name=name, addresses=addresses, tcp=tcp, udp=udp), announce)
    except BindError as exc:
        raise click.ClickException(str(exc)) from exc


class _StatusLine:
    """A status line on stderr: rewritten in place on a terminal, one line per call otherwise."""

    def __init__(self, stream: TextIO, live: bool) -> None:
        self.stream = stream
        self.live = live

    def show(self, line: str) -> None:
        if self.live:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class _Progress(_StatusLine):
    """The client's progress line."""

    def __init__(self, stream: TextIO, duration: float, live: bool) -> None:
        super().__init__(stream, live)
        self.duration = duration

    def __call__(self, elapsed: float, totals: Totals) -> None:
        self.show(progress_line(elapsed, self.duration, totals))


class _ProbeProgress(_StatusLine):
    """The probe's progress line."""

    def __init__(self, stream: TextIO, duration: float, live: bool) -> None:
        super().__init__(stream, live)
        self.duration = duration

    def __call__(self, elapsed: float, counts: ProbeCounts) -> None:
        self.show(probe_progress_line(elapsed, self.duration, counts))


PROGRESS_OPTION = click.option(
    "--progress",
    type=click.Choice(["auto", "live", "line", "none"]),
    default="auto",
    show_default=True,
    help="Status on stderr: live (one line rewritten in place), line (one line per second), "
    "auto (live on a terminal, none otherwise).",
)


def _progress_mode(progress: str) -> str:
    if progress == "auto":
        return "live" if sys.stderr.isatty() else "none"
    return progress


@traffic.command()
@click.option(
    "-a",
    "--address",
    "addresses",
    multiple=True,
    required=True,
    callback=_addresses,
    help="Server HOST:PORT or [IPV6]:PORT (port 5000 if left out). Repeat to spread the "
    "connections over several; a reconnect goes to the next one.",
)
@click.option("--udp", is_flag=True, help="UDP flows instead of TCP connections.")
@click.option(
    "-c",
    "--connections",
    type=click.IntRange(1, 100_000),
    default=10,
    show_default=True,
    help="Parallel long-lived connections (for UDP: flows, one local port each).",
)
@click.option(
    "-r",
    "--rate",
    type=click.FloatRange(0, min_open=True),
    default=100.0,
    show_default=True,
    help="Total packets per second, spread evenly over the connections.",
)
@click.option(
    "-d",
    "--duration",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to send.",
)
@click.option(
    "-s",
    "--size",
    "packet_size",
    type=click.IntRange(MIN_PACKET_SIZE, MAX_PACKET_SIZE),
    default=1024,
    show_default=True,
    help="Packet size in bytes (the first 64 carry the server name in replies).",
)
@click.option(
    "--reconnect/--no-reconnect",
    default=True,
    show_default=True,
    help="Reconnect a connection that failed or broke.",
)
@click.option(
    "--retries",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    help="Reconnects allowed per connection over the whole run.",
)
@click.option(
    "--retry-delay",
    type=click.FloatRange(0),
    default=0.1,
    show_default=True,
    help="Seconds before the first reconnect; doubles each time, up to 1 s.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(0, min_open=True),
    default=2.0,
    show_default=True,
    help="Seconds a connect (UDP: the first reply) may take.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    default=3.0,
    show_default=True,
    help="An established connection is lost when a packet goes unanswered this long "
    "(UDP: three datagrams in a row).",
)
@PROGRESS_OPTION
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the JSON report to this file (for `traffic analyze`).",
)
@click.option("--details", is_flag=True, help="Table output: list every connection too.")
def client(
    addresses: tuple[HostPort, ...],
    udp: bool,
    connections: int,
    rate: float,
    duration: float,
    packet_size: int,
    reconnect: bool,
    retries: int,
    retry_delay: float,
    connect_timeout: float,
    timeout: float,
    progress: str,
    output: str,
    save: Path | None,
    details: bool,
) -> None:
    """Keep N connections to a server at a steady rate, then report per target.

    The report has connections per target, lost connections (broke after being established)
    per target, failed connects, and packets sent, received and dropped (skipped because the
    sender fell more than 0.1 s behind). Exit status 0 when it ran, 1 when no connection could
    be established at all, 2 for usage errors.
    """
    for address in addresses:
        if address.port == 0:
            raise click.BadParameter(f"{address}: port 0", param_hint="--address")
    settings = ClientSettings(
        addresses=addresses,
        udp=udp,
        connections=connections,
        rate=rate,
        duration=duration,
        packet_size=packet_size,
        reconnect=reconnect,
        retries=retries,
        retry_delay=retry_delay,
        connect_timeout=connect_timeout,
        timeout=timeout,
    )
    progress = _progress_mode(progress)
    reporter = None
    if progress != "none":
        reporter = _Progress(sys.stderr, duration, live=progress == "live")
    try:
        report = trio.run(run_client, settings, reporter, 0.25 if progress == "live" else 1.0)
    finally:
        if reporter is not None:
            reporter.close()
    if save is not None:
        save.write_text(json.dumps(report, indent=2) + "\n")
    if output == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        render_report(Console(), report, connections=details)
    if sum(report["hosts"].values()) == 0:
        click.echo("traffic client: no connection could be established", err=True)
        sys.exit(1)


@traffic.command()
@click.option(
    "-a",
    "--address",
    "addresses",
    multiple=True,
    required=True,
    callback=_addresses,
    help="Server HOST:PORT or [IPV6]:PORT (port 5000 if left out). Repeat for several: the "
    "attempts take them round-robin.",
)
@click.option("--udp", is_flag=True, help="UDP: each attempt one datagram from a new socket.")
@click.option(
    "-r",
    "--rate",
    type=click.FloatRange(0, 100_000, min_open=True),
    default=100.0,
    show_default=True,
    help="New connections per second.",
)
@click.option(
    "-d",
    "--duration",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to start new connections for.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds an attempt (connect, request and the reply) may take before it failed.",
)
@PROGRESS_OPTION
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the JSON report to this file (for `traffic analyze`).",
)
@click.option("--details", is_flag=True, help="Table output: list every failed attempt too.")
def probe(
    addresses: tuple[HostPort, ...],
    udp: bool,
    rate: float,
    duration: float,
    connect_timeout: float,
    progress: str,
    output: str,
    save: Path | None,
    details: bool,
) -> None:
    """Open new connections at a fixed rate and report how long new connections failed.

    Attempt i starts at i/rate s whatever the earlier ones do: a fresh socket connects, sends a
    request, reads the reply naming the server, and closes, all within --connect-timeout. One
    more than 0.1 s behind schedule is skipped, not sent in a burst. The report counts the
    attempts that succeeded per server and those that failed (refused, reset, unreachable,
    timeout, ...), and gives the failure window: from the start of the first failed attempt to
    the end of the last. Exit status 0 when it ran, 1 when no attempt succeeded, 2 for usage
    errors.
    """
    for address in addresses:
        if address.port == 0:
            raise click.BadParameter(f"{address}: port 0", param_hint="--address")
    settings = ProbeSettings(
        addresses=addresses,
        udp=udp,
        rate=rate,
        duration=duration,
        connect_timeout=connect_timeout,
    )
    progress = _progress_mode(progress)
    reporter = None
    if progress != "none":
        reporter = _ProbeProgress(sys.stderr, duration, live=progress == "live")
    try:
        report = trio.run(run_probe, settings, reporter, 0.25 if progress == "live" else 1.0)
    finally:
        if reporter is not None:
            reporter.close()
    if save is not None:
        save.write_text(json.dumps(report, indent=2) + "\n")
    if output == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        render_probe_report(Console(), report, failures=details)
    if report["ok"] == 0:
        click.echo("traffic probe: no attempt succeeded", err=True)
        sys.exit(1)


def load_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path}: not JSON: {exc}") from exc
    try:
        return validate_report(data)
    except ValueError as exc:
        raise click.ClickException(f"{path}: {exc}") from exc


@traffic.command()
@click.argument("report_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--chart",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write a PNG bar chart of the connections per target here (needs matplotlib).",
)
@click.option("--samples", is_flag=True, help="Also list the per-second samples.")
@click.option(
    "--details", is_flag=True, help="Also list every connection (probe: every failed attempt)."
)
def analyze(report_file: Path, chart: Path | None, samples: bool, details: bool) -> None:
    """Show a saved client or probe report (from `-o json` or `--save`) as tables; chart a
    client report."""
    report = load_report(report_file)
    if report.get("kind") == PROBE_REPORT_KIND:
        if chart is not None:
            raise click.UsageError("--chart: only for client reports, this is a probe report")
        render_probe_report(Console(), report, failures=details, samples=samples)
        return
    render_report(Console(), report, connections=details, samples=samples)
    if chart is not None:
        try:
            write_chart(report, chart)
        except ChartUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            raise click.ClickException(f"{chart}: {exc.strerror or exc}") from exc
        click.echo(f"chart written to {chart}", err=True)
