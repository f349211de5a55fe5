"""The sd_notify client: addresses, environment, and what it tells systemd about health."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from meridio.runtime.health import Health
from meridio.runtime.systemd import (
    Notifier,
    describe,
    parse_address,
    report,
    watchdog_interval,
)


@pytest.fixture
def systemd_socket() -> Iterator[tuple[str, socket.socket]]:
    """systemd's side: a datagram socket in the abstract namespace, and its NOTIFY_SOCKET."""
    name = f"meridio-test-{os.getpid()}-{secrets.token_hex(4)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    try:
        yield f"@{name}", sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[list[str]]:
    """Every datagram waiting on ``sock``, each as its list of assignments."""
    out = []
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return out
        out.append(data.decode().split("\n"))


def flat(messages: list[list[str]]) -> list[str]:
    return [a for m in messages for a in m]


def test_addresses() -> None:
    assert parse_address("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_address("@sd-notify") == b"\0sd-notify"
    for bad in ("", "@", "relative/path", "vsock:2:1234"):
        with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
            parse_address(bad)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "42"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "43"}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, pid=42) == expected


def test_from_environ_takes_the_variables_away(systemd_socket: tuple[str, socket.socket]) -> None:
    address, sock = systemd_socket
    environ = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "PATH": "/bin"}
    with Notifier.from_environ(environ) as notifier:  # type: ignore[union-attr]
        assert environ == {"PATH": "/bin"}  # children (nft, iptables) do not inherit them
        assert notifier.watchdog == 2.0
        assert notifier.send("STATUS=hello", "READY=1")
    assert received(sock) == [["STATUS=hello", "READY=1"]]


def test_no_notifier_outside_systemd() -> None:
    environ = {"WATCHDOG_USEC": "2000000"}
    assert Notifier.from_environ(environ) is None
    assert environ == {}
    assert Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:99"}) is None


def test_send_failures_do_not_raise(tmp_path: object) -> None:
    notifier = Notifier("/nonexistent/notify.sock")
    assert not notifier.send("READY=1")
    assert not notifier.send("READY=1")  # warned once, still no exception
    notifier.close()
    assert not notifier.send("READY=1")


def test_describe() -> None:
    health = Health()
    boot = health.register("Boot", ["Startup", "Liveness"])
    nsp = health.register("NSPCli", ["Readiness"])
    health.start()
    assert describe(health) == "starting; not serving: Boot, NSPCli"
    boot.set(True)
    assert describe(health) == "not ready; not serving: NSPCli"
    nsp.set(True)
    assert describe(health) == "ready"
    boot.set(False)
    assert describe(health) == "ready, not live; not serving: Boot"
    health.begin_shutdown()
    assert describe(health) == "stopping: draining"


async def test_ready_status_watchdog_and_stopping(
    systemd_socket: tuple[str, socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    address, sock = systemd_socket
    health = Health()  # not started: Readiness is NOT_SERVING whatever the checks say
    started = trio.Event()
    notifier = Notifier(parse_address(address), watchdog=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(report, health, notifier, started)
        # Pings every half interval, also while the role is starting.
        await trio.sleep(2.1)
        got = flat(received(sock))
        assert got.count("WATCHDOG=1") == 5
        assert "STATUS=starting" in got
        assert "READY=1" not in got

        live = health.register("Loop", ["Startup", "Liveness"])
        ready = health.register("NSPCli", ["Readiness"])
        live.set(True)
        health.start()  # as meridio.daemon does, with the event
        started.set()
        await trio.testing.wait_all_tasks_blocked()
        assert received(sock) == [["STATUS=not ready; not serving: NSPCli"]]

        ready.set(True)
        await trio.testing.wait_all_tasks_blocked()
        assert received(sock) == [["READY=1", "STATUS=ready"]]

        # READY=1 is sent once, even when readiness comes and goes.
        ready.set(False)
        await trio.testing.wait_all_tasks_blocked()
        ready.set(True)
        await trio.testing.wait_all_tasks_blocked()
        assert "READY=1" not in flat(received(sock))

        # Once started, a failing Liveness withholds the pings: systemd restarts the process.
        await trio.sleep(0.6)
        received(sock)
        live.set(False)
        await trio.sleep(2.1)
        got = flat(received(sock))
        assert "WATCHDOG=1" not in got
        assert "STATUS=ready, not live; not serving: Loop" in got
        live.set(True)
        await trio.sleep(1.1)
        assert "WATCHDOG=1" in flat(received(sock))

        health.begin_shutdown()
        await trio.testing.wait_all_tasks_blocked()
        assert received(sock) == [["STOPPING=1", "STATUS=stopping: draining"]]
        # Draining: still alive, still pinging, whatever the checks say.
        live.set(False)
        await trio.sleep(1.1)
        assert "WATCHDOG=1" in flat(received(sock))
        nursery.cancel_scope.cancel()
    assert received(sock) == []  # STOPPING=1 is not repeated on the way out
    assert not notifier.send("WATCHDOG=1")  # closed


async def test_stopping_is_sent_when_the_runtime_ends_without_a_shutdown(
    systemd_socket: tuple[str, socket.socket],
) -> None:
    address, sock = systemd_socket
    health = Health()
    with trio.move_on_after(0.05):
        await report(health, Notifier(parse_address(address)), trio.Event())
    assert received(sock) == [["STATUS=starting"], ["STOPPING=1", "STATUS=stopping"]]


async def test_trio_side_wait_for_health_changes() -> None:
    health = Health()
    seen = health.version
    check = health.register("X")
    await health.wait_changed(seen)  # already past: returns at once
    seen = health.version
    async with trio.open_nursery() as nursery:
        nursery.start_soon(health.wait_changed, seen)
        await trio.testing.wait_all_tasks_blocked()
        check.set(True)
    assert health.version > seen
