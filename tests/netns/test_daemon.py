"""``meridiod`` itself: refusing bad input up front, health, signals and graceful exit."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status

from meridio.api.grpc.health.v1 import HealthCheckRequest, HealthStub
from tests.netns.daemons import (
    IPAM_PREFIXES,
    MERIDIOD,
    NOT_SERVING,
    SERVING,
    Daemon,
    aio_test,
    channel,
    grpc_error,
    health_status,
    watching,
)
from tests.waiting import HANG

pytestmark = pytest.mark.netns


def test_unknown_role_exits_2_listing_the_roles(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [MERIDIOD, "--role=bogus", f"--run-dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "'bogus'" in lines[0]
    available = lines[0].split("available roles:")[1]
    assert {r.strip() for r in available.split(",")} >= {"ipam", "nsp"}
    assert not run_dir.exists()


def _bad_settings_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str], list[str]]]:
    """name -> (extra args, extra env, words the single error line must contain)."""
    unknown_key = tmp_path / "unknown-key.yaml"
    unknown_key.write_text("entry-timeout: 5\nno-such-setting: 1\n")
    missing = tmp_path / "missing.yaml"
    return {
        "unknown flag": (["--no-such-setting=1"], {}, ["'no-such-setting'", "flag"]),
        "ill-typed flag": (["--entry-timeout=soon"], {}, ["'entry-timeout'", "flag"]),
        "ill-typed env": (
            [],
            {"MERIDIOD_ENTRY_TIMEOUT": "soon"},
            ["'entry-timeout'", "environment variable MERIDIOD_ENTRY_TIMEOUT"],
        ),
        "unknown env": (
            [],
            {"MERIDIOD_NO_SUCH_SETTING": "1"},
            ["'no-such-setting'", "MERIDIOD_NO_SUCH_SETTING"],
        ),
        "unknown key in --config": (
            [f"--config={unknown_key}"],
            {},
            ["'no-such-setting'", str(unknown_key)],
        ),
        "unreadable --config": ([f"--config={missing}"], {}, [str(missing), "cannot read"]),
        "refused value": (["--entry-timeout=0"], {}, ["'entry-timeout'"]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown flag",
        "ill-typed flag",
        "ill-typed env",
        "unknown env",
        "unknown key in --config",
        "unreadable --config",
        "refused value",
    ],
)
def test_bad_settings_exit_2_with_one_line_and_start_nothing(
    netns: Any, tmp_path: Path, case: str
) -> None:
    args, env, words = _bad_settings_cases(tmp_path)[case]
    daemon = Daemon(netns, "nsp", tmp_path / "d", *args, env=env)
    proc = daemon.spawn()
    assert proc.wait(30) == 2
    lines = daemon.log_text().splitlines()
    assert len(lines) == 1, daemon.log_text()
    assert lines[0].startswith("meridiod: error: ")
    for word in words:
        assert word in lines[0]
    # Nothing was started: no run-dir, no health socket, no service socket, no database.
    assert not daemon.health_socket.exists()
    assert not daemon.run_dir.exists()
    assert not daemon.socket.exists()
    assert not daemon.database.exists()


@aio_test
async def test_nsp_health_serving_then_not_serving_and_exit_0_on_sigterm(
    netns: Any, tmp_path: Path
) -> None:
    daemon = await Daemon(netns, "nsp", tmp_path / "d").start()
    for service in ("Readiness", "Liveness", "Startup", "NSP", ""):
        assert await health_status(daemon.health_socket, service) == SERVING, service
    async with channel(daemon.health_socket) as ch:
        stub = HealthStub(ch)
        err = await grpc_error(stub.check(HealthCheckRequest(service="NoSuchService")))
        assert err.status == Status.NOT_FOUND
        async with watching(
            lambda: stub.watch(HealthCheckRequest(service="Readiness"))
        ) as readiness:
            assert (await readiness.next()).status == SERVING
            await readiness.assert_quiet(0.2)
            # readiness off first, then the exit (how long it takes: bench_footprint)
            daemon.signal(signal.SIGTERM)
            assert (await readiness.next(HANG)).status == NOT_SERVING
            assert await daemon.wait_exit(HANG) == 0
            await readiness.end()
    assert not daemon.health_socket.exists()
    assert not daemon.socket.exists()
    assert any(r.get("event") == "stopped" for r in daemon.log_records())


@aio_test
async def test_sigint_also_exits_0(netns: Any, tmp_path: Path) -> None:
    daemon = await Daemon(netns, "ipam", tmp_path / "d").start()
    daemon.signal(signal.SIGINT)
    assert await daemon.wait_exit(HANG) == 0


@aio_test
async def test_a_killed_daemon_restarts_over_its_stale_sockets(netns: Any, tmp_path: Path) -> None:
    daemon = await Daemon(netns, "nsp", tmp_path / "d").start()
    daemon.kill()
    assert daemon.health_socket.exists()  # left behind by SIGKILL
    assert await health_status(daemon.health_socket) is None
    await daemon.restart()
    assert await health_status(daemon.health_socket) == SERVING


@aio_test
async def test_sigusr1_sigusr2_change_the_log_level(netns: Any, tmp_path: Path) -> None:
    # SIGHUP logs "reload requested" at info level, so it shows which level is in force. The
    # order in which two signals sent back to back are handled is not guaranteed (the kernel
    # may hand them to different threads), so a SIGHUP that must be logged is awaited before
    # the level signal, and one that must not be is checked only before the level change line.
    daemon = await Daemon(netns, "nsp", tmp_path / "d", "--log-level=warning").start()

    def events() -> list[str]:
        return [str(r.get("event")) for r in daemon.log_records()]

    async def change_level(level_signal: int) -> None:
        changes = events().count("log level changed")
        daemon.signal(level_signal)
        await daemon.wait_log(lambda _: events().count("log level changed") > changes)

    async def hup_is_silent_then(level_signal: int) -> None:
        before = len(events())
        daemon.signal(signal.SIGHUP)
        await change_level(level_signal)
        since = events()[before:]
        assert "reload requested" not in since[: since.index("log level changed")]

    await hup_is_silent_then(signal.SIGUSR1)  # at warning; SIGUSR1: warning -> info
    daemon.signal(signal.SIGHUP)  # at info: logged
    await daemon.wait_log(lambda r: r.get("event") == "reload requested")
    await change_level(signal.SIGUSR2)  # info -> warning
    await hup_is_silent_then(signal.SIGUSR1)  # at warning again
    assert daemon.alive()
    assert await health_status(daemon.health_socket) == SERVING
    assert await daemon.stop() == 0


@aio_test
async def test_log_level_change_line_names_the_new_level(netns: Any, tmp_path: Path) -> None:
    daemon = await Daemon(netns, "nsp", tmp_path / "d").start()
    daemon.signal(signal.SIGUSR1)
    record = await daemon.wait_log(lambda r: r.get("event") == "log level changed")
    await daemon.stop()
    assert "debug" in record.values()


@aio_test
async def test_ipam_serves_health_and_stops_cleanly(netns: Any, tmp_path: Path) -> None:
    daemon = await Daemon(netns, "ipam", tmp_path / "d", *IPAM_PREFIXES).start()
    for service in ("Readiness", "Liveness", "Startup", "IPAM"):
        assert await health_status(daemon.health_socket, service) == SERVING, service
    assert await daemon.stop() == 0
    assert not daemon.health_socket.exists()
