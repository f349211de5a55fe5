"""``meridioctl``: inspect running roles, and (in later issues) drive the lab and traffic tools.

Client commands are one-shot: they open a grpclib channel in a plain asyncio loop, ask, print
and exit. Listings print a table by default, or ``-o json`` / ``-o yaml`` for machines.

rich (the ``cli`` extra) draws the tables, and the lab, traffic and demo commands need it; a
daemon image has no rich, and its ``meridioctl`` prints plain columns and says, for those
commands, what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
import grpclib
import grpclib.client
import yaml
from grpclib.exceptions import StreamTerminatedError

from meridio import __version__
from meridio.api.grpc.health.v1 import HealthCheckRequest, HealthStub
from meridio.api.meridio.admin.v1 import (
    GatewaysRequest,
    IpamInspectStub,
    LbInspectStub,
    ListAllocationsRequest,
    ShowRequest,
    WhichRequest,
)
from meridio.api.nsp.v1 import (
    Conduit,
    ConfigurationManagerStub,
    Stream,
    Target,
    TargetStatus,
    TargetType,
    Trench,
)
from meridio.runtime.grpc import Endpoint, LimitedCodec
from meridio.runtime.health import PROBES

T = TypeVar("T")
OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)


# TLS of TCP targets, from the group's options (MERIDIOCTL_* variables); see docs/security.md.
CLIENT_TLS: dict[str, Any] = {"insecure": False}


def open_channel(target: str) -> grpclib.client.Channel:
    """A channel to ``target``: a unix socket as is, TCP over mutual TLS with the certificate
    given to the group (``--tls-dir``; an ``admin`` one from ``meridioctl pki issue admin
    NAME``), or in plain text with ``--insecure``."""
    endpoint = Endpoint.parse(target, "localhost")
    if endpoint.path is not None:
        return grpclib.client.Channel(path=endpoint.path, codec=LimitedCodec())
    assert endpoint.host is not None and endpoint.port is not None
    if CLIENT_TLS["insecure"]:
        return grpclib.client.Channel(endpoint.host, endpoint.port, codec=LimitedCodec())
    from meridio.runtime.tls import Tls, TlsError, resolve_paths

    try:
        paths = resolve_paths(
            CLIENT_TLS.get("tls_dir", ""),
            CLIENT_TLS.get("tls_cert", ""),
            CLIENT_TLS.get("tls_key", ""),
            CLIENT_TLS.get("tls_ca", ""),
        )
        if paths is None:
            raise click.UsageError(
                f"{target} is TCP: give --tls-dir (a certificate from 'meridioctl pki issue "
                "admin NAME', or MERIDIOCTL_TLS_DIR) or --insecure for a plain-text role"
            )
        tls = Tls(paths, None, trust_domain=CLIENT_TLS.get("trust_domain", ""))
    except TlsError as exc:
        raise click.ClickException(str(exc)) from exc
    return tls.channel(endpoint.host, endpoint.port, codec=LimitedCodec())


def run_client(
    target: str,
    body: Callable[[grpclib.client.Channel], Awaitable[T]],
    timeout: float | None = 10,
) -> T:
    """Run ``body(channel)`` to completion; connection problems become one clear line."""

    async def main() -> T:
        channel = open_channel(target)
        try:
            return await asyncio.wait_for(body(channel), timeout)
        finally:
            channel.close()

    try:
        return asyncio.run(main())
    except grpclib.GRPCError as exc:
        raise click.ClickException(f"{target}: {exc.status.name}: {exc.message}") from exc
    except (TimeoutError, OSError) as exc:
        raise click.ClickException(f"cannot reach {target}: {exc or 'timed out'}") from exc
    except StreamTerminatedError as exc:
        raise click.ClickException(
            f"cannot reach {target}: connection lost (plain text to a TLS port, or a "
            "certificate the server refuses: its log says which)"
        ) from exc


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], output: str, title: str) -> None:
    if output == "json":
        click.echo(json.dumps(list(rows), indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(list(rows), sort_keys=False), nl=False)
    else:
        if title:
            click.echo(title)
        cells = [[_cell(row.get(c)) for c in columns] for row in rows]
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # no cli extra: plain columns
            click.echo(_plain_table(columns, cells))
            return
        table = Table()
        for column in columns:
            table.add_column(column)
        for line in cells:
            table.add_row(*line)
        # Off a terminal (pipes, CI logs) do not squeeze columns into 80 characters.
        Console(width=None if sys.stdout.isatty() else 200).print(table)


def _plain_table(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """``columns`` and ``cells`` as left-aligned text columns, two spaces apart."""
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip()
        for line in [list(columns), *cells]
    )


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return "" if value is None else str(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meridioctl")
@click.option(
    "--tls-dir",
    envvar="MERIDIOCTL_TLS_DIR",
    default="",
    help="Certificate for TCP targets: tls.crt/tls.key/ca.crt or svid.pem/svid_key.pem/"
    "bundle.pem (MERIDIOCTL_TLS_DIR).",
)
@click.option("--tls-cert", envvar="MERIDIOCTL_TLS_CERT", default="", hidden=True)
@click.option("--tls-key", envvar="MERIDIOCTL_TLS_KEY", default="", hidden=True)
@click.option("--tls-ca", envvar="MERIDIOCTL_TLS_CA", default="", hidden=True)
@click.option("--trust-domain", envvar="MERIDIOCTL_TRUST_DOMAIN", default="", hidden=True)
@click.option(
    "--insecure",
    envvar="MERIDIOCTL_INSECURE",
    is_flag=True,
    help="Plain text to TCP targets (roles run with --insecure).",
)
def main(
    tls_dir: str, tls_cert: str, tls_key: str, tls_ca: str, trust_domain: str, insecure: bool
) -> None:
    """Inspect and drive meridio."""
    CLIENT_TLS.update(
        tls_dir=tls_dir,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        trust_domain=trust_domain,
        insecure=insecure,
    )


# --- health -----------------------------------------------------------------------------------


@main.command()
@click.option("--socket", "socket_path", help="Health socket (default <run-dir>/health.sock).")
@click.option("--role", help="Role whose default run dir to use (/run/meridio/<role>).")
@click.argument("services", nargs=-1)
@OUTPUT
def health(
    socket_path: str | None, role: str | None, services: tuple[str, ...], output: str
) -> None:
    """Ask a role's health service; exit status 1 unless every service asked is SERVING."""
    if not socket_path:
        if not role:
            raise click.UsageError("give --socket or --role")
        socket_path = f"/run/meridio/{role}/health.sock"
    names = list(services) or list(PROBES)

    async def ask(channel: grpclib.client.Channel) -> list[dict[str, Any]]:
        stub = HealthStub(channel)
        rows = []
        for name in names:
            try:
                reply = await stub.check(HealthCheckRequest(service=name))
                status = reply.status.name
            except grpclib.GRPCError as exc:
                status = exc.status.name
            rows.append({"service": name, "status": status})
        return rows

    rows = run_client(f"unix://{socket_path}", ask)
    render(rows, ["service", "status"], output, f"health of {socket_path}")
    if any(r["status"] != "SERVING" for r in rows):
        sys.exit(1)


# --- nsp --------------------------------------------------------------------------------------


@main.group()
def nsp() -> None:
    """The NSP: registered targets and configuration."""


NSP_OPTION = click.option(
    "--nsp",
    "nsp_addr",
    envvar="MERIDIOCTL_NSP",
    default="localhost:7778",
    show_default=True,
    help="NSP address, host:port or unix:///path.",
)


def target_row(t: Target) -> dict[str, Any]:
    stream = t.stream
    conduit = stream.conduit if stream else None
    return {
        "ips": list(t.ips),
        "identifier": t.context.get("identifier", ""),
        "status": TargetStatus(t.status).name,
        "type": TargetType(t.type).name,
        "stream": stream.name if stream else "",
        "conduit": conduit.name if conduit else "",
        "trench": conduit.trench.name if conduit and conduit.trench else "",
        "context": dict(t.context),
    }


@nsp.command("targets")
@NSP_OPTION
@click.option("--status", type=click.Choice(["any", "enabled", "disabled"]), default="any")
@click.option("--type", "kind", type=click.Choice(["default", "frontend"]), default="default")
@click.option("--trench", default="")
@click.option("--conduit", default="")
@click.option("--stream", default="")
@OUTPUT
def nsp_targets(
    nsp_addr: str, status: str, kind: str, trench: str, conduit: str, stream: str, output: str
) -> None:
    """List registered targets (the first message of a Watch)."""
    flt = Target(
        status=TargetStatus[status.upper()],
        type=TargetType[kind.upper()],
        stream=Stream(name=stream, conduit=Conduit(name=conduit, trench=Trench(name=trench))),
    )

    async def ask(channel: grpclib.client.Channel) -> list[Target]:
        from meridio.api.nsp.v1 import TargetRegistryStub

        async for reply in TargetRegistryStub(channel).watch(flt):
            return list(reply.targets)
        return []

    rows = [target_row(t) for t in run_client(nsp_addr, ask)]
    columns = ["ips", "identifier", "status", "type", "stream", "conduit", "trench"]
    render(rows, columns, output, f"targets at {nsp_addr}")


CONFIG_KINDS = ("trench", "conduits", "streams", "flows", "vips", "attractors", "gateways")


@nsp.command("config")
@NSP_OPTION
@OUTPUT
def nsp_config(nsp_addr: str, output: str) -> None:
    """Show the configuration the NSP serves (the first message of each Watch stream)."""
    from meridio.api.nsp.v1 import Attractor, Flow, Gateway, Vip

    async def ask(channel: grpclib.client.Channel) -> dict[str, Any]:
        stub = ConfigurationManagerStub(channel)
        calls: dict[str, Any] = {
            "trench": (stub.watch_trench, Trench()),
            "conduits": (stub.watch_conduit, Conduit()),
            "streams": (stub.watch_stream, Stream()),
            "flows": (stub.watch_flow, Flow()),
            "vips": (stub.watch_vip, Vip()),
            "attractors": (stub.watch_attractor, Attractor()),
            "gateways": (stub.watch_gateway, Gateway()),
        }
        result: dict[str, Any] = {}
        for key, (call, request) in calls.items():
            async for reply in call(request):
                result[key] = reply.to_pydict(casing=_kebab)
                break
        return result

    config = run_client(nsp_addr, ask)
    if output != "table":
        render([config], [], output, "")
        return
    rows = []
    for key in CONFIG_KINDS:
        body = config.get(key, {})
        # TrenchResponse holds one trench; the other responses hold a list under their key
        items = [body["trench"]] if key == "trench" and "trench" in body else body.get(key, [])
        for item in items:
            rows.append({"kind": key, "name": item.get("name", ""), "detail": _detail(item)})
    render(rows, ["kind", "name", "detail"], output, f"configuration at {nsp_addr}")


def _kebab(name: str) -> str:
    out = "".join("-" + c.lower() if c.isupper() else c for c in name)
    return out.replace("_", "-").lstrip("-")


def _detail(item: dict[str, Any]) -> str:
    parts = []
    for key, value in item.items():
        if key in ("name", "trench"):
            continue
        if isinstance(value, dict):
            value = value.get("name", "")
        elif isinstance(value, list):
            value = ",".join(v.get("name", "") if isinstance(v, dict) else str(v) for v in value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


# --- ipam -------------------------------------------------------------------------------------


@main.group()
def ipam() -> None:
    """The IPAM: allocations."""


@ipam.command("list")
@click.option(
    "--ipam",
    "ipam_addr",
    envvar="MERIDIOCTL_IPAM",
    default="localhost:7777",
    show_default=True,
    help="IPAM address, host:port or unix:///path.",
)
@click.option("--trench", default="")
@click.option("--conduit", default="")
@click.option("--node", default="")
@OUTPUT
def ipam_list(ipam_addr: str, trench: str, conduit: str, node: str, output: str) -> None:
    """List allocated addresses."""

    async def ask(channel: grpclib.client.Channel) -> list[dict[str, Any]]:
        reply = await IpamInspectStub(channel).list(
            ListAllocationsRequest(trench=trench, conduit=conduit, node=node)
        )
        return [
            {
                "trench": a.trench,
                "conduit": a.conduit,
                "node": a.node,
                "family": a.family,
                "prefix": a.prefix,
                "name": a.name,
                "address": a.address,
                "updated": a.updated,
            }
            for a in reply.allocations
        ]

    rows = run_client(ipam_addr, ask)
    columns = ["trench", "conduit", "node", "family", "prefix", "name", "address"]
    render(rows, columns, output, f"allocations at {ipam_addr}")


# --- lb ---------------------------------------------------------------------------------------


@main.group()
def lb() -> None:
    """A load balancer: its Maglev tables and where a flow goes."""


LB_OPTION = click.option(
    "--lb",
    "lb_addr",
    envvar="MERIDIOCTL_LB",
    default="unix:///run/meridio/lb/lb.sock",
    show_default=True,
    help="LB inspection address, unix:///path or host:port.",
)


@lb.command("show")
@LB_OPTION
@OUTPUT
def lb_show(lb_addr: str, output: str) -> None:
    """M, N, the active identifiers with fwmark, table and target IPs, and the table digest."""

    async def ask(channel: grpclib.client.Channel) -> Any:
        return await LbInspectStub(channel).show(ShowRequest())

    reply = run_client(lb_addr, ask)
    if output != "table":
        render([reply.to_pydict()], [], output, "")
        return
    click.echo(f"mode {reply.mode}, instance {reply.instance}, VIPs {', '.join(reply.vips) or '-'}")
    for stream in reply.streams:
        click.echo(
            f"\nstream {stream.trench}/{stream.conduit}/{stream.name}: M={stream.table_size} "
            f"N={stream.max_targets} offset={stream.offset} digest={stream.digest[:16]}"
        )
        rows = [
            {
                "identifier": t.identifier,
                "fwmark": t.fwmark,
                "table": t.fwmark,
                "ips": list(t.ips),
                "entries": t.entries,
                "share": f"{100 * t.entries / max(1, stream.table_size):.1f}%",
            }
            for t in stream.targets
        ]
        render(rows, ["identifier", "fwmark", "table", "ips", "entries", "share"], output, "")
    for problem in reply.problems:
        click.echo(f"problem: {problem}")
    if reply.counters:
        click.echo("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(reply.counters.items())))


def _endpoint(text: str) -> tuple[str, int]:
    """``A``, ``A:port``, ``[v6]:port`` or a bare IPv6 address."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host, int(port or 0)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 0


@lb.command("which")
@LB_OPTION
@click.option("--src", required=True, help="Source address[:port].")
@click.option("--dst", required=True, help="Destination (VIP) address[:port].")
@click.option("--proto", default="tcp", type=click.Choice(["tcp", "udp", "sctp"]))
@OUTPUT
def lb_which(lb_addr: str, src: str, dst: str, proto: str, output: str) -> None:
    """Which target a flow maps to."""
    src_ip, sport = _endpoint(src)
    dst_ip, dport = _endpoint(dst)
    request = WhichRequest(src=src_ip, dst=dst_ip, sport=sport, dport=dport, protocol=proto)

    async def ask(channel: grpclib.client.Channel) -> Any:
        return await LbInspectStub(channel).which(request)

    reply = run_client(lb_addr, ask)
    row = {
        "flow": reply.flow or "(no flow: dropped)",
        "stream": reply.stream,
        "index": reply.index,
        "identifier": reply.identifier or "(no target)",
        "fwmark": reply.fwmark,
        "ips": list(reply.ips),
    }
    render([row], list(row), output, "")


@lb.command("gateways")
@LB_OPTION
@OUTPUT
def lb_gateways(lb_addr: str, output: str) -> None:
    """The frontend's sessions with the attractor's gateways and the VIPs announced."""

    async def ask(channel: grpclib.client.Channel) -> Any:
        return await LbInspectStub(channel).gateways(GatewaysRequest())

    reply = run_client(lb_addr, ask)
    rows = [
        {
            "gateway": g.name,
            "address": g.address,
            "protocol": g.protocol,
            "state": g.state,
            "bfd": g.bfd,
            "since": g.since,
            "announced": g.routes_announced,
            "received": g.routes_received,
            "info": g.info,
        }
        for g in reply.gateways
    ]
    if output != "table":
        body = reply.to_pydict(include_default_values=True)
        body["gateways"] = rows
        render([body], [], output, "")
        return
    click.echo(
        f"attractor {reply.attractor or '-'}, BIRD {reply.bird or '-'}, router ID "
        f"{reply.router_id or '-'}, announcing {', '.join(reply.announced) or 'nothing'}"
    )
    if reply.error:
        click.echo(f"error: {reply.error}")
    columns = ["gateway", "address", "protocol", "state", "bfd", "since", "announced"]
    render(rows, [*columns, "received", "info"], output, "")


# --- tap --------------------------------------------------------------------------------------


@main.group()
def tap() -> None:
    """A target's TAPA (ambassador.v1.Tap): open, close and watch its streams."""


def _tap_socket(value: str | None) -> str:
    text = value or os.environ.get("MERIDIO_SOCKET") or "/run/meridio/target/ambassador.sock"
    return text if "://" in text or text.startswith("unix:") else f"unix://{text}"


TAP_SOCKET = click.option(
    "--socket",
    "socket_path",
    help="The target's TAPA socket [default: $MERIDIO_SOCKET, else "
    "/run/meridio/target/ambassador.sock].",
)


def _tap_stream(required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in ("stream", "conduit", "trench"):
            if required:
                fn = click.option(f"--{name}", required=True, help=f"The {name}.")(fn)
            else:
                fn = click.option(f"--{name}", default="", help=f"Only this {name}.")(fn)
        return fn

    return decorate


def _tap_message(trench: str, conduit: str, stream: str) -> Any:
    from meridio.api.ambassador.v1 import Conduit as TapConduit
    from meridio.api.ambassador.v1 import Stream as TapStream
    from meridio.api.ambassador.v1 import Trench as TapTrench

    return TapStream(name=stream, conduit=TapConduit(name=conduit, trench=TapTrench(name=trench)))


def _tap_rows(reply: Any) -> list[dict[str, Any]]:
    from meridio.api.ambassador.v1 import StreamStatusStatus

    return [
        {
            "trench": s.stream.conduit.trench.name,
            "conduit": s.stream.conduit.name,
            "stream": s.stream.name,
            "status": StreamStatusStatus(s.status).name,
        }
        for s in reply.stream_status
    ]


TAP_COLUMNS = ["trench", "conduit", "stream", "status"]


@tap.command("open")
@TAP_SOCKET
@_tap_stream(required=True)
@click.option(
    "--wait",
    type=float,
    default=0.0,
    show_default=True,
    help="Then wait this many seconds for the stream to be OPEN (exit status 1 if not).",
)
def tap_open(socket_path: str | None, trench: str, conduit: str, stream: str, wait: float) -> None:
    """Open a stream: the target joins the trench and the conduit if needed, and registers."""
    from meridio.api.ambassador.v1 import StreamStatusStatus, TapStub

    target = _tap_socket(socket_path)
    message = _tap_message(trench, conduit, stream)

    async def ask(channel: grpclib.client.Channel) -> None:
        await TapStub(channel).open(message)

    run_client(target, ask)
    if wait <= 0:
        return

    async def until_open(channel: grpclib.client.Channel) -> str:
        last = "not listed"
        try:
            async with asyncio.timeout(wait):
                async for reply in TapStub(channel).watch(message):
                    for row in _tap_rows(reply):
                        last = row["status"]
                    if last == StreamStatusStatus.OPEN.name:
                        return last
        except TimeoutError:
            pass
        return last

    status = run_client(target, until_open, timeout=wait + 10)
    if status != "OPEN":
        click.echo(f"stream {stream} not OPEN within {wait:g}s: {status}", err=True)
        sys.exit(1)


@tap.command("close")
@TAP_SOCKET
@_tap_stream(required=True)
def tap_close(socket_path: str | None, trench: str, conduit: str, stream: str) -> None:
    """Close a stream: the target unregisters, then leaves the conduit and trench if unused."""
    from meridio.api.ambassador.v1 import TapStub

    message = _tap_message(trench, conduit, stream)

    async def ask(channel: grpclib.client.Channel) -> None:
        await TapStub(channel).close(message)

    run_client(_tap_socket(socket_path), ask)


@tap.command("list")
@TAP_SOCKET
@_tap_stream(required=False)
@OUTPUT
def tap_list(socket_path: str | None, trench: str, conduit: str, stream: str, output: str) -> None:
    """The open streams and their status (OPEN, PENDING, UNAVAILABLE, UNDEFINED)."""
    from meridio.api.ambassador.v1 import TapStub

    target = _tap_socket(socket_path)
    message = _tap_message(trench, conduit, stream)

    async def ask(channel: grpclib.client.Channel) -> list[dict[str, Any]]:
        async for reply in TapStub(channel).watch(message):
            return _tap_rows(reply)
        return []

    render(run_client(target, ask), TAP_COLUMNS, output, f"streams of {target}")


@tap.command("watch")
@TAP_SOCKET
@_tap_stream(required=False)
@click.option("--count", type=int, default=0, help="Stop after this many updates (0: never).")
@OUTPUT
def tap_watch(
    socket_path: str | None, trench: str, conduit: str, stream: str, count: int, output: str
) -> None:
    """Print the open streams' statuses now and on every change (-o json: one line each)."""
    from meridio.api.ambassador.v1 import TapStub

    target = _tap_socket(socket_path)
    message = _tap_message(trench, conduit, stream)

    async def follow(channel: grpclib.client.Channel) -> None:
        seen = 0
        async for reply in TapStub(channel).watch(message):
            rows = _tap_rows(reply)
            if output == "json":
                click.echo(json.dumps(rows))
            elif output == "yaml":
                click.echo("---\n" + yaml.safe_dump(rows, sort_keys=False), nl=False)
            else:
                render(rows, TAP_COLUMNS, output, f"streams of {target}")
            sys.stdout.flush()
            seen += 1
            if count and seen >= count:
                return

    with contextlib.suppress(KeyboardInterrupt):
        run_client(target, follow, timeout=None)


@main.command()
def demo() -> None:
    """Bring the lab up, run traffic to both VIPs, scale out a target, take it down."""
    try:
        from meridio.demo import run_demo
    except ModuleNotFoundError as exc:
        if not _rich_missing(exc):
            raise
        raise click.ClickException(
            "'meridioctl demo' needs rich, which is not installed: pip install 'meridio[cli]'"
        ) from exc
    run_demo()


def _needs_rich(name: str, summary: str) -> click.Command:
    """A stand-in for a command that cannot load without rich: it says what to install."""

    @click.command(
        name,
        help=f"{summary} (needs rich: pip install 'meridio[cli]')",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    def unavailable() -> None:
        raise click.ClickException(
            f"'meridioctl {name}' needs rich, which is not installed: pip install 'meridio[cli]'"
        )

    return unavailable


def _rich_missing(exc: ModuleNotFoundError) -> bool:
    return (exc.name or "").partition(".")[0] == "rich"


def _add_commands() -> None:
    from meridio.manifest import manifest
    from meridio.pki import pki

    main.add_command(manifest)
    main.add_command(pki)
    try:
        from meridio.traffic.cli import traffic

        main.add_command(traffic)
    except ModuleNotFoundError as exc:
        if not _rich_missing(exc):
            raise
        main.add_command(
            _needs_rich(
                "traffic", "Continuous traffic: an echo server and a client that reports on it"
            )
        )
    try:
        from meridio.lab.cli import lab

        main.add_command(lab)
    except ModuleNotFoundError as exc:
        if not _rich_missing(exc):
            raise
        main.add_command(_needs_rich("lab", "The whole system on this host, in network namespaces"))


_add_commands()

if __name__ == "__main__":
    main()
