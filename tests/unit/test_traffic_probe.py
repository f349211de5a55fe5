"""``meridioctl traffic probe``: schedule, error kinds and report, then the probe over loopback."""

from __future__ import annotations

import errno
import json
import math
import socket
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from meridio.traffic import probe as probe_module
from meridio.traffic.cli import _ProbeProgress, traffic
from meridio.traffic.core import (
    NO_REPLY,
    HostPort,
    ProbeAttempt,
    ProbeCounts,
    ProbeSchedule,
    ProbeSettings,
    build_probe_report,
    classify_errno,
    classify_error,
    failure_periods,
    probe_progress_line,
    server_header,
    validate_report,
)
from meridio.traffic.probe import REQUEST, run_probe
from meridio.traffic.server import Server

# -------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("rate", "duration", "count"),
    [(100, 10, 1000), (3, 1, 3), (0.5, 10, 5), (7, 0.1, 1), (10, 0.3, 3), (3, 0.7, 3)],
)
def test_schedule_count(rate: float, duration: float, count: int) -> None:
    assert ProbeSchedule(rate, duration).count == count


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(min_value=0.1, max_value=5000, allow_nan=False),
    duration=st.floats(min_value=0.01, max_value=5, allow_nan=False),
)
def test_schedule_count_is_every_attempt_due_within_the_duration(
    rate: float, duration: float
) -> None:
    schedule = ProbeSchedule(rate, duration)
    n = schedule.count
    assert n >= 1 and schedule.due(n - 1) < duration <= schedule.due(n)


def test_schedule_rejects_nonsense() -> None:
    for rate, duration in ((0, 1), (1, 0), (-1, 1), (math.inf, 1), (math.nan, 1)):
        with pytest.raises(ValueError, match="positive"):
            ProbeSchedule(rate, duration)


def test_late_and_first_on_time() -> None:
    schedule = ProbeSchedule(100, 10)  # slack 0.1 s
    assert not schedule.late(0, 0.1) and schedule.late(0, 0.1001)
    assert schedule.first_on_time(0, 0.05) == 0
    # At 0.5 s, attempts due before 0.4 s are late.
    assert schedule.first_on_time(3, 0.5) == 40
    # Behind past the end: everything left is skipped.
    assert schedule.first_on_time(990, 20.0) == 1000


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=2000, allow_nan=False),
    index=st.integers(min_value=0, max_value=3000),
    lag=st.floats(min_value=0, max_value=20, allow_nan=False),
)
def test_first_on_time_skips_exactly_the_late_ones(rate: float, index: int, lag: float) -> None:
    schedule = ProbeSchedule(rate, 10)
    index = min(index, schedule.count - 1)
    now = schedule.due(index) + lag
    first = schedule.first_on_time(index, now)
    assert index <= first <= schedule.count
    if not schedule.late(index, now):
        assert first == index
    else:
        assert first > index
        assert schedule.late(first - 1, now)
        assert first == schedule.count or not schedule.late(first, now)


def test_per_second() -> None:
    schedule = ProbeSchedule(3, 10)
    assert schedule.per_second(0, 10) == {0: 3, 1: 3, 2: 3, 3: 1}
    assert schedule.per_second(4, 5) == {1: 1}
    assert schedule.per_second(5, 5) == {}


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(min_value=0.3, max_value=500, allow_nan=False),
    start=st.integers(min_value=0, max_value=2000),
    length=st.integers(min_value=0, max_value=2000),
)
def test_per_second_matches_counting_one_by_one(rate: float, start: int, length: int) -> None:
    schedule = ProbeSchedule(rate, 100)
    expected: dict[int, int] = {}
    for i in range(start, start + length):
        expected[schedule.second(i)] = expected.get(schedule.second(i), 0) + 1
    assert schedule.per_second(start, start + length) == expected


def test_settings_round_robin() -> None:
    a, b = HostPort("203.0.113.1", 5000), HostPort("2001:db8::1", 5000)
    settings = ProbeSettings(addresses=(a, b), udp=True)
    assert [settings.address(i) for i in range(3)] == [a, b, a]
    assert settings.protocol == "udp" and settings.schedule.count == 1000


# ------------------------------------------------------------------------------ error kinds


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "refused"),
        (OSError(errno.ECONNREFUSED, "Error connecting to ('198.18.0.2', 5000)"), "refused"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "reset"),
        (BrokenPipeError(errno.EPIPE, "pipe"), "reset"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "unreachable"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "unreachable"),
        (OSError(errno.ETIMEDOUT, "Connection timed out"), "timeout"),
        (TimeoutError(), "timeout"),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), "local-port"),
        (OSError(errno.EMFILE, "Too many open files"), "resources"),
        (PermissionError(errno.EPERM, "Operation not permitted"), "denied"),
        (OSError(errno.EPROTO, "Protocol error"), "eproto"),
        (OSError(9999, "?"), "errno-9999"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "resolve"),
        (ValueError("odd"), "error"),
        (OSError("no errno"), "error"),
    ],
)
def test_classify_error(exc: BaseException, kind: str) -> None:
    assert classify_error(exc) == kind


def test_classify_a_wrapped_error() -> None:
    broken = trio.BrokenResourceError()
    broken.__cause__ = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert classify_error(broken) == "reset"
    assert classify_errno(errno.ECONNREFUSED) == "refused"


# ----------------------------------------------------------------------------------- report


def attempt(
    index: int,
    started: float,
    ended: float,
    *,
    host: str | None = None,
    error: str | None = None,
    address: str = "203.0.113.1:5000",
) -> ProbeAttempt:
    a = ProbeAttempt(index=index, address=address, started=started)
    if error is not None:
        a.fail(ended, error)
    else:
        a.succeed(ended, host or "target-a")
    return a


PROBE = ProbeSettings(
    addresses=(HostPort("203.0.113.1", 5000), HostPort("203.0.113.2", 5000)),
    rate=4.0,
    duration=3.0,
    connect_timeout=0.5,
)


def sample_attempts() -> list[ProbeAttempt]:
    """12 attempts due at i/4 s: 0-3 ok, 4 refused, 5 and 6 timed out, 7-9 ok, 10-11 skipped."""
    attempts = [attempt(i, i / 4 + 0.001, i / 4 + 0.01, host=f"t-{i % 2}") for i in range(4)]
    attempts.append(attempt(4, 1.0, 1.002, error="refused"))
    attempts.append(attempt(5, 1.25, 1.76, error="timeout"))  # ended late: counts to 1.75
    attempts.append(attempt(6, 1.5, 2.0, error="timeout"))
    attempts += [attempt(i, i / 4, i / 4 + 0.01, host="t-0") for i in (7, 8, 9)]
    return attempts


def test_build_probe_report() -> None:
    report = build_probe_report(
        PROBE, sample_attempts(), [(10, 12)], started="2026-01-01T00:00:00Z", elapsed=3.0
    )
    assert report["kind"] == "probe" and report["protocol"] == "tcp"
    assert report["addresses"] == ["203.0.113.1:5000", "203.0.113.2:5000"]
    assert (report["rate"], report["duration"], report["connect_timeout"]) == (4.0, 3.0, 0.5)
    assert (report["attempts"], report["ok"], report["failed"]) == (10, 7, 3)
    assert (report["skipped"], report["aborted"]) == (2, 0)
    assert report["hosts"] == {"t-0": 5, "t-1": 2}
    assert report["errors"] == {"refused": 1, "timeout": 2}
    assert report["failures"] == [
        {"t": 1.0, "address": "203.0.113.1:5000", "error": "refused"},
        {"t": 1.25, "address": "203.0.113.1:5000", "error": "timeout"},
        {"t": 1.5, "address": "203.0.113.1:5000", "error": "timeout"},
    ]
    assert (report["first_failure"], report["last_failure"]) == (1.0, 1.5)
    # From the start of the first failure (1.0) to the end of the last (1.5 + timeout).
    assert report["failure_window"] == 1.0
    assert report["failure_periods"] == [{"start": 1.0, "end": 2.0, "failed": 3}]
    assert report["samples"] == [
        {"t": 0, "ok": 4, "failed": 0, "skipped": 0},
        {"t": 1, "ok": 1, "failed": 3, "skipped": 0},
        {"t": 2, "ok": 2, "failed": 0, "skipped": 2},
    ]
    assert sum(s["ok"] + s["failed"] + s["skipped"] for s in report["samples"]) == 12
    assert validate_report(json.loads(json.dumps(report))) == report


def test_report_without_failures_and_with_aborted_attempts() -> None:
    attempts = [attempt(0, 0.0, 0.01), ProbeAttempt(index=1, address="x", started=0.25)]
    report = build_probe_report(PROBE, attempts, started="t", elapsed=0.3, stopped_by="SIGINT")
    assert (report["attempts"], report["ok"], report["failed"], report["aborted"]) == (1, 1, 0, 1)
    assert report["failures"] == [] and report["failure_periods"] == []
    assert report["first_failure"] is None and report["last_failure"] is None
    assert report["failure_window"] == 0
    assert report["stopped_by"] == "SIGINT"
    assert len(report["samples"]) == 3  # every second of the schedule, even empty ones
    nameless = build_probe_report(
        PROBE, [ProbeAttempt(0, "x", 0.0, ended=0.1, host=None)], started="t", elapsed=1
    )
    assert nameless["hosts"] == {NO_REPLY: 1}


def test_failure_window_ends_with_the_attempt_that_ends_last() -> None:
    # A timeout started before a quick refusal still ends after it.
    attempts = [attempt(0, 0.0, 1.0, error="timeout"), attempt(1, 0.2, 0.21, error="refused")]
    report = build_probe_report(PROBE, attempts, started="t", elapsed=1.0)
    assert report["failure_window"] == 0.5  # 0.0 + timeout 0.5, not 1.0: capped
    assert report["last_failure"] == 0.2


def test_failure_periods_are_split_by_successes() -> None:
    attempts = [
        attempt(0, 0.0, 0.01, error="refused"),
        attempt(1, 0.25, 0.26),
        attempt(2, 0.5, 0.51, error="reset"),
        attempt(3, 0.75, 1.25, error="timeout"),
        attempt(4, 1.0, 1.01),
    ]
    assert failure_periods(attempts, 0.5) == [(0.0, 0.01, 1), (0.5, 1.25, 2)]
    report = build_probe_report(PROBE, attempts, started="t", elapsed=1.0)
    assert report["failure_window"] == 1.25
    assert [p["failed"] for p in report["failure_periods"]] == [1, 2]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(hosts=[]), "'hosts' must map"),
        (lambda r: r.pop("ok"), "'ok' must be an integer"),
        (lambda r: r.update(skipped=True), "'skipped' must be an integer"),
        (lambda r: r.update(failure_window="1s"), "'failure_window' must be a number"),
        (lambda r: r.update(failures={}), "'failures' must be a list"),
    ],
)
def test_validate_probe_report(mutate: Any, message: str) -> None:
    report = build_probe_report(PROBE, sample_attempts(), started="t", elapsed=3.0)
    mutate(report)
    with pytest.raises(ValueError, match=message):
        validate_report(report)


def test_progress() -> None:
    counts = ProbeCounts(attempts=9, ok=7, failed=2, skipped=1, in_flight=3)
    line = probe_progress_line(2.5, 10, counts)
    assert "7/2/1" in line and "in flight: 3" in line and "2.5/10s" in line
    out = StringIO()
    plain = _ProbeProgress(out, 10.0, live=False)
    plain(1.0, counts)
    plain.close()
    assert out.getvalue().endswith("1.0/10s\n") and "\r" not in out.getvalue()
    out = StringIO()
    live = _ProbeProgress(out, 10.0, live=True)
    live(1.0, counts)
    live.close()
    assert out.getvalue().startswith("\r") and out.getvalue().endswith("\r\x1b[K")


# ---------------------------------------------------------------------------- command line


def test_cli_usage_errors() -> None:
    runner = CliRunner()
    for args in (
        ["probe"],
        ["probe", "-a", "198.18.0.1:0"],
        ["probe", "-a", "[2001:db8::1"],
        ["probe", "-a", "198.18.0.1", "--rate", "0"],
        ["probe", "-a", "198.18.0.1", "--duration", "0"],
        ["probe", "-a", "198.18.0.1", "--connect-timeout", "0"],
        ["probe", "-a", "198.18.0.1", "-o", "yaml"],
    ):
        result = runner.invoke(traffic, args)
        assert result.exit_code == 2, (args, result.output)


def test_analyze_probe_report(tmp_path: Path) -> None:
    path = tmp_path / "probe.json"
    path.write_text(
        json.dumps(build_probe_report(PROBE, sample_attempts(), started="t", elapsed=3))
    )
    runner = CliRunner()
    result = runner.invoke(traffic, ["analyze", str(path), "--samples", "--details"])
    assert result.exit_code == 0, result.output
    for text in ("New connections", "failure window", "1.000 s", "t-0", "refused", "timeout"):
        assert text in result.output
    assert "Per-second samples" in result.output and "Failed attempts" in result.output
    result = runner.invoke(traffic, ["analyze", str(path), "--chart", str(tmp_path / "c.png")])
    assert result.exit_code == 2 and "only for client reports" in result.output
    path.write_text(json.dumps({"kind": "probe", "hosts": {}}))
    result = runner.invoke(traffic, ["analyze", str(path)])
    assert result.exit_code == 1 and "not a probe report: 'attempts'" in result.output


# --------------------------------------------------------------------- probe over loopback


async def start_server(nursery: trio.Nursery, name: str) -> dict[str, int]:
    server = Server(name=name, addresses=[HostPort("127.0.0.1", 0)])
    bound: list[str] = await nursery.start(server.serve)
    return {b.split("://")[0]: int(b.rsplit(":", 1)[1]) for b in bound}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def loop_probe(*ports: int, **kw: Any) -> ProbeSettings:
    base: dict[str, Any] = {
        "addresses": tuple(HostPort("127.0.0.1", p) for p in ports),
        "rate": 40.0,
        "duration": 0.5,
        "connect_timeout": 0.5,
    }
    base.update(kw)
    return ProbeSettings(**base)


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
async def test_probe_over_loopback(udp: bool) -> None:
    async with trio.open_nursery() as nursery:
        a = await start_server(nursery, "loop-a")
        b = await start_server(nursery, "a-server-name-of-63-bytes-" + "x" * 50)
        proto = "udp" if udp else "tcp"
        report = await run_probe(loop_probe(a[proto], b[proto], udp=udp), handle_signals=False)
        nursery.cancel_scope.cancel()
    assert report["protocol"] == proto
    assert report["attempts"] + report["skipped"] == 20
    assert report["ok"] == report["attempts"] >= 18 and report["failed"] == 0
    long_name = server_header("a-server-name-of-63-bytes-" + "x" * 50)[:-1].decode()
    assert len(long_name) == 63
    assert set(report["hosts"]) == {"loop-a", long_name}
    assert sum(report["hosts"].values()) == report["ok"]
    assert report["failure_window"] == 0 and report["first_failure"] is None
    assert [s["t"] for s in report["samples"]] == [0]


async def test_probe_refused() -> None:
    port = free_port()
    report = await run_probe(loop_probe(port), handle_signals=False)
    assert report["ok"] == 0 and report["failed"] == report["attempts"] >= 18
    assert report["errors"] == {"refused": report["failed"]}
    assert {f["address"] for f in report["failures"]} == {f"127.0.0.1:{port}"}
    # Refused at once, from the first attempt (due at 0) to the last (due at 0.475).
    assert report["first_failure"] < 0.05
    assert 0.42 < report["failure_window"] < 0.6
    assert len(report["failure_periods"]) == 1


async def _accept_and(listener: trio.SocketListener, close: bool) -> None:
    streams = []
    while True:
        stream = await listener.accept()
        if close:
            # Read the request first: closing with unread data would send a reset.
            await stream.receive_some(len(REQUEST))
            await stream.aclose()
        else:
            streams.append(stream)  # keep it open, say nothing


@pytest.mark.parametrize("close", [False, True], ids=["silent", "closing"])
async def test_probe_timeout_and_closed(close: bool) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_accept_and, listeners[0], close)
        settings = loop_probe(port, rate=20.0, duration=0.2, connect_timeout=0.3)
        report = await run_probe(settings, handle_signals=False)
        nursery.cancel_scope.cancel()
    assert report["failed"] == report["attempts"] == 4
    if close:
        assert report["errors"] == {"closed": 4}
        assert report["failure_window"] < 0.3
    else:
        assert report["errors"] == {"timeout": 4}
        assert report["failure_window"] == pytest.approx(0.15 + 0.3, abs=0.03)
        assert report["elapsed"] >= 0.45


async def test_probe_udp_without_answer_times_out() -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        await sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        settings = loop_probe(port, udp=True, rate=20.0, duration=0.2, connect_timeout=0.2)
        report = await run_probe(settings, handle_signals=False)
        data = await sink.recv(100)
    assert data == REQUEST
    assert report["errors"] == {"timeout": 4}


async def test_probe_skips_what_the_in_flight_cap_holds_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probe_module, "IN_FLIGHT_CAP", 2)
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        await sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        settings = loop_probe(port, udp=True, rate=50.0, duration=1.0, connect_timeout=0.4)
        report = await run_probe(settings, handle_signals=False)
    # Two at a time, 0.4 s each: about six attempts in the second, the rest skipped.
    assert report["attempts"] + report["skipped"] == 50
    assert 4 <= report["attempts"] <= 8 and report["skipped"] >= 40
    assert sum(s["skipped"] for s in report["samples"]) == report["skipped"]


async def test_probe_unresolvable_address() -> None:
    settings = ProbeSettings(addresses=(HostPort("name.invalid", 5000),), rate=10, duration=0.2)
    report = await run_probe(settings, handle_signals=False)
    assert report["errors"] == {"resolve": 2}


def test_probe_cli_exit_status(tmp_path: Path) -> None:
    port = free_port()
    save = tmp_path / "probe.json"
    args = ["probe", "-a", f"127.0.0.1:{port}", "-r", "20", "-d", "0.2", "-o", "json"]
    result = CliRunner().invoke(traffic, [*args, "--save", str(save)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["failed"] == 4 and report["errors"] == {"refused": 4}
    assert json.loads(save.read_text()) == report
    assert "no attempt succeeded" in result.stderr
    result = CliRunner().invoke(
        traffic, ["probe", "-a", f"127.0.0.1:{port}", "-r", "10", "-d", "0.1"]
    )
    assert result.exit_code == 1
    assert "failure window" in result.stdout and "refused" in result.stdout
