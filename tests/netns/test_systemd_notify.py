"""``meridiod`` under ``Type=notify``: this test plays systemd's side of the notify socket.

The daemon runs in a namespace made by the test, with ``NOTIFY_SOCKET`` naming a datagram socket
the test bound (with ``SO_PASSCRED``, as systemd does, so every message carries the sender's
pid: ``NotifyAccess=main`` only accepts the main process) and a small ``WATCHDOG_USEC``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.daemons import SERVING, Daemon, aio_test, health_status

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO / "config" / "examples" / "meridio-configuration.yaml"
WATCHDOG_USEC = 600_000
UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Message:
    at: float
    pid: int
    assignments: tuple[str, ...]


class SystemdSide:
    """The notify socket as systemd binds it; collects what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.messages: list[Message] = []

    def poll(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except BlockingIOError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = UCRED.unpack(payload[: UCRED.size])[0]
            now = time.monotonic()
            self.messages.append(Message(now, pid, tuple(data.decode().split("\n"))))

    async def wait_for(self, assignment: str, timeout: float = 15.0) -> Message:
        """The first message carrying ``assignment`` (also one that arrived before)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            for message in self.messages:
                if assignment in message.assignments:
                    return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no {assignment} within {timeout}s: {self.messages}")
            await asyncio.sleep(0.005)

    async def collect(self, seconds: float) -> list[Message]:
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            await asyncio.sleep(0.01)
        self.poll()
        return self.messages[start:]

    def all(self) -> list[str]:
        self.poll()
        return [a for m in self.messages for a in m.assignments]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd_side(tmp_path: Path) -> Iterator[SystemdSide]:
    side = SystemdSide(tmp_path / "notify.sock")
    try:
        yield side
    finally:
        side.close()


def notify_env(side: SystemdSide) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(side.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def bounded(capabilities: str) -> list[str]:
    """Run as the unit runs the role: root, with only ``capabilities`` in the bounding set
    (CapabilityBoundingSet=) and NoNewPrivileges=yes."""
    return ["setpriv", f"--bounding-set=-all{capabilities}", "--no-new-privs", "--"]


class NspDaemon(Daemon):
    """The nsp role with no capability at all (meridiod@nsp.service.d/capabilities.conf)."""

    @property
    def argv(self) -> list[str]:
        return [*bounded(""), *super().argv]


class LbDaemon(Daemon):
    """The lb role, bounded to CAP_NET_ADMIN and CAP_NET_RAW as in meridiod@.service.

    It has no listen or database setting; its inspection socket is in its run-dir.
    """

    @property
    def socket(self) -> Path:
        return self.run_dir / "lb.sock"

    @property
    def argv(self) -> list[str]:
        return [
            *bounded(",+net_admin,+net_raw"),
            *super().argv[:3],  # meridiod --role=lb --run-dir=...
            "--log-format=json",
            *self.extra_args,
        ]


@aio_test
async def test_nsp_ready_watchdog_status_and_stopping(
    netns: object, tmp_path: Path, systemd_side: SystemdSide
) -> None:
    nsp = NspDaemon(
        netns,
        "nsp",
        tmp_path / "nsp",
        f"--configuration-file={CONFIGURATION}",
        env=notify_env(systemd_side),
    )
    nsp.spawn()
    try:
        ready = await systemd_side.wait_for("READY=1")
        # READY=1 means Readiness is SERVING: ask right away.
        assert await health_status(nsp.health_socket, "Readiness") == SERVING
        assert ready.pid == nsp.pid, "sent by a process other than the main one"
        before = systemd_side.messages[: systemd_side.messages.index(ready)]
        assert any("STATUS=starting" in m.assignments for m in before)
        assert "STATUS=ready" in ready.assignments
        assert systemd_side.all().count("READY=1") == 1

        # Pings at half the interval, never a gap as long as the interval.
        period = WATCHDOG_USEC / 1e6
        window = await systemd_side.collect(4 * period)
        pings = [m.at for m in window if "WATCHDOG=1" in m.assignments]
        assert len(pings) >= 5, window
        assert max(b - a for a, b in itertools.pairwise(pings)) < period
        assert {m.pid for m in systemd_side.messages} == {nsp.pid}

        sent_before_stop = len(systemd_side.messages)
        nsp.signal(signal.SIGTERM)
        assert await nsp.wait_exit(15) == 0
        systemd_side.poll()
        after = [a for m in systemd_side.messages[sent_before_stop:] for a in m.assignments]
        assert "STOPPING=1" in after
        assert "STATUS=stopping: draining" in after
        assert after.count("STOPPING=1") == 1
        assert "READY=1" not in after
    finally:
        if nsp.alive():
            nsp.kill()


@aio_test
async def test_ready_waits_for_readiness(
    netns: object, tmp_path: Path, systemd_side: SystemdSide
) -> None:
    """An LB whose NSP is not there yet is started but not ready: no READY=1, pings go on.

    The LB runs with the unit's capabilities only, so becoming ready (in its default kernel
    mode: its nftables table installed) also shows they are enough.
    """
    nsp = Daemon(netns, "nsp", tmp_path / "nsp", f"--configuration-file={CONFIGURATION}")
    lb = LbDaemon(
        netns,
        "lb",
        tmp_path / "lb",
        f"--nsp=unix://{nsp.socket}",
        "--trench=trench-a",
        "--conduit=load-balancer",
        env=notify_env(systemd_side),
    )
    lb.spawn()
    try:
        waiting = await systemd_side.wait_for("STATUS=not ready; not serving: NSPCli, Stream")
        assert waiting.pid == lb.pid
        window = await systemd_side.collect(3 * WATCHDOG_USEC / 1e6)
        assert sum("WATCHDOG=1" in m.assignments for m in window) >= 3
        assert "READY=1" not in systemd_side.all()
        assert await health_status(lb.health_socket, "Readiness") != SERVING

        await nsp.start()
        await systemd_side.wait_for("READY=1", timeout=20)
        assert await health_status(lb.health_socket, "Readiness") == SERVING
        # Installed with CAP_NET_ADMIN and CAP_NET_RAW only: the table with the flows and the
        # Maglev map; kernel mode queues nothing and puts nothing in iptables (its ICMP errors
        # are steered in the table too).
        tables = netns.run("nft", "list", "tables").stdout  # type: ignore[attr-defined]
        assert "table inet meridio-lb" in tables, tables
        chains = netns.run("iptables", "-t", "mangle", "-S").stdout  # type: ignore[attr-defined]
        assert "MERIDIO" not in chains and "NFQUEUE" not in chains, chains
        assert await lb.stop(15) == 0
        assert "STOPPING=1" in systemd_side.all()
    finally:
        for daemon in (lb, nsp):
            if daemon.alive():
                with contextlib.suppress(Exception):
                    daemon.kill()
