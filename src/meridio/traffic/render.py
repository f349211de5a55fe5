"""Showing a traffic report: rich tables for people, a PNG bar chart (matplotlib, optional)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from meridio.traffic.core import host_rows

CHART_HINT = "pip install 'meridio[chart]' (or: pip install matplotlib)"


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def describe_settings(report: Mapping[str, Any]) -> str:
    settings = report.get("settings") or {}
    parts = []
    if settings:
        get = settings.get
        parts.append(
            f"{get('protocol', '?')} to {', '.join(get('addresses', []))}: "
            f"{get('connections', '?')} connections, {get('rate', '?')} packets/s, "
            f"{get('packet_size', '?')} bytes, {get('duration', '?')} s"
        )
    if report.get("started"):
        parts.append(f"started {report['started']}")
    if report.get("elapsed") is not None:
        parts.append(f"ran {report['elapsed']} s")
    if report.get("stopped_by"):
        parts.append(f"stopped by {report['stopped_by']}")
    return "; ".join(parts)


def hosts_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Connections per target")
    for column in ("host", "connections", "share", "lasting", "lost"):
        table.add_column(column, justify="left" if column == "host" else "right")
    rows = host_rows(report)
    for row in rows:
        table.add_row(
            row.host, str(row.connections), f"{row.share:.1%}", str(row.lasting), str(row.lost)
        )
    table.add_section()
    table.add_row(
        "total",
        str(sum(r.connections for r in rows)),
        "100.0%" if rows else "-",
        str(sum(r.lasting for r in rows)),
        str(sum(r.lost for r in rows)),
    )
    return table


def totals_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Totals", show_header=False)
    table.add_column("counter")
    table.add_column("value", justify="right")
    for key in (
        "lost_connections",
        "failed_connects",
        "sent",
        "received",
        "dropped",
        "retransmits",
        "host_changes",
    ):
        if key in report:
            table.add_row(key.replace("_", " "), str(report[key]))
    return table


def connections_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Connections")
    columns = (
        ("conn", "id"),
        ("state", "state"),
        ("host", "host"),
        ("local", "local"),
        ("remote", "remote"),
        ("started", "started"),
        ("ended", "ended"),
        ("sent", "sent"),
        ("received", "received"),
        ("dropped", "dropped"),
        ("error", "error"),
    )
    for title, _key in columns:
        table.add_column(title)
    for conn in report.get("connections", []):
        cells = [_fmt(conn.get(key)) for _title, key in columns]
        cells[0] = f"{conn.get('id', '?')}.{conn.get('attempt', 0)}"
        table.add_row(*cells)
    return table


def samples_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Per-second samples")
    keys = ("time", "sent", "received", "dropped", "active", "connecting", "lost_connections")
    for key in keys:
        table.add_column(key.replace("_connections", ""), justify="right")
    for sample in report.get("samples", []):
        table.add_row(*(_fmt(sample.get(key)) for key in keys))
    return table


def render_report(
    console: Console,
    report: Mapping[str, Any],
    *,
    connections: bool = False,
    samples: bool = False,
) -> None:
    summary = describe_settings(report)
    if summary:
        console.print(summary, highlight=False, soft_wrap=True)
    console.print(hosts_table(report))
    console.print(totals_table(report))
    if samples:
        console.print(samples_table(report))
    if connections:
        console.print(connections_table(report))


def write_chart(report: Mapping[str, Any], path: Path) -> None:
    """A PNG bar chart of the connections per target, lasting and lost stacked."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ChartUnavailable(
            f"--chart needs matplotlib, which is not installed: {CHART_HINT}"
        ) from exc

    rows = host_rows(report)
    names = [row.host for row in rows]
    lasting = [row.lasting for row in rows]
    lost = [row.lost for row in rows]
    figure = Figure(figsize=(max(6.0, 0.7 * len(rows) + 3.0), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = list(range(len(rows)))
    axes.bar(positions, lasting, label="lasting", color="#4c72b0")
    bars = axes.bar(positions, lost, bottom=lasting, label="lost", color="#dd8452")
    axes.bar_label(bars, labels=[str(row.connections) for row in rows], padding=2)
    tilt = len(rows) > 4
    axes.set_xticks(positions, names, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(0, max([row.connections for row in rows], default=1) * 1.15 or 1)
    axes.set_ylabel("connections")
    axes.set_xlabel("target")
    figure.suptitle("Connections per target")
    settings = report.get("settings") or {}
    if settings:
        addresses = ", ".join(settings.get("addresses", []))
        if len(addresses) > 60:
            addresses = addresses[:57] + "..."
        axes.set_title(f"{settings.get('protocol', '?')} to {addresses}", fontsize="small")
    if rows:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path, format="png", dpi=100)


# ---------------------------------------------------------------------------------- probe


def describe_probe(report: Mapping[str, Any]) -> str:
    get = report.get
    parts = [
        f"probe: new {get('protocol', '?')} connections to {', '.join(get('addresses', []))}, "
        f"{get('rate', '?')}/s for {get('duration', '?')} s, "
        f"timeout {get('connect_timeout', '?')} s"
    ]
    if get("started"):
        parts.append(f"started {get('started')}")
    if get("stopped_by"):
        parts.append(f"stopped by {get('stopped_by')}")
    return "; ".join(parts)


def probe_summary_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="New connections", show_header=False)
    table.add_column("counter")
    table.add_column("value", justify="right")
    for key in ("attempts", "ok", "failed", "skipped", "aborted"):
        if key in report and (key != "aborted" or report[key]):
            table.add_row(key, str(report[key]))
        if key == "failed":
            for kind, count in sorted((report.get("errors") or {}).items()):
                table.add_row(f"  {kind}", str(count))
    window = report.get("failure_window", 0)
    table.add_row("failure window", f"{window:.3f} s")
    if report.get("first_failure") is not None:
        table.add_row(
            "failures started", f"{report['first_failure']:.3f} to {report['last_failure']:.3f} s"
        )
    periods = report.get("failure_periods") or []
    if len(periods) > 1:
        table.add_row("failure periods", str(len(periods)))
    return table


def probe_hosts_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="New connections per target")
    table.add_column("host")
    table.add_column("ok", justify="right")
    table.add_column("share", justify="right")
    hosts: Mapping[str, int] = report.get("hosts") or {}
    total = sum(hosts.values())
    for host, count in sorted(hosts.items()):
        table.add_row(host, str(count), f"{count / total:.1%}")
    table.add_section()
    table.add_row("total", str(total), "100.0%" if total else "-")
    return table


def probe_samples_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Per-second samples (by due time)")
    keys = ("t", "ok", "failed", "skipped")
    for key in keys:
        table.add_column(key, justify="right")
    for sample in report.get("samples", []):
        table.add_row(*(_fmt(sample.get(key)) for key in keys))
    return table


def probe_failures_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Failed attempts")
    for key in ("t", "address", "error"):
        table.add_column(key, justify="right" if key == "t" else "left")
    for failure in report.get("failures", []):
        table.add_row(*(_fmt(failure.get(key)) for key in ("t", "address", "error")))
    return table


def render_probe_report(
    console: Console,
    report: Mapping[str, Any],
    *,
    failures: bool = False,
    samples: bool = False,
) -> None:
    console.print(describe_probe(report), highlight=False, soft_wrap=True)
    console.print(probe_summary_table(report))
    console.print(probe_hosts_table(report))
    if samples:
        console.print(probe_samples_table(report))
    if failures:
        console.print(probe_failures_table(report))
