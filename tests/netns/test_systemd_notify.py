"""``meridiod`` under ``Type=notify``: this test plays systemd's side of the notify socket.

The daemon runs in a namespace made by the test, with ``NOTIFY_SOCKET`` naming a datagram socket
the test bound (with ``SO_PASSCRED``, as systemd does, so every message carries the sender's
pid: ``NotifyAccess=main`` only accepts the main process) and a small ``WATCHDOG_USEC``.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.daemons import SERVING, Daemon, aio_test, health_status
from tests.waiting import HANG, wait_until_async

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO / "config" / "examples" / "meridio-configuration.yaml"
WATCHDOG_USEC = 600_000
UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Message:
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
            self.messages.append(Message(pid, tuple(data.decode().split("\n"))))

    async def wait_for(self, assignment: str) -> Message:
        """The first message carrying ``assignment`` (also one that arrived before)."""
        (message,) = await self.wait_count(assignment, 1)
        return message

    async def wait_count(self, assignment: str, count: int, after: int = 0) -> list[Message]:
        """The first ``count`` messages from ``messages[after]`` on that carry ``assignment``,
        waiting for them if needed."""

        def seen() -> list[Message] | None:
            self.poll()
            found = [m for m in self.messages[after:] if assignment in m.assignments]
            return found[:count] if len(found) >= count else None

        return await wait_until_async(seen, what=f"{count} x {assignment}", interval=0.005)

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

        # It keeps pinging, from the main process (at half the interval: tests/unit/
        # test_systemd.py checks the schedule on trio's mock clock).
        after = systemd_side.messages.index(ready) + 1
        await systemd_side.wait_count("WATCHDOG=1", 5, after)
        assert {m.pid for m in systemd_side.messages} == {nsp.pid}

        sent_before_stop = len(systemd_side.messages)
        nsp.signal(signal.SIGTERM)
        assert await nsp.wait_exit(HANG) == 0
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

    The LB runs with the unit's capabilities only, so becoming ready (its nftables table,
    iptables rules and NFQUEUE reader installed) also shows they are enough.
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
        # not ready, yet alive: pings go on, and no READY=1 comes with them
        after = systemd_side.messages.index(waiting) + 1
        await systemd_side.wait_count("WATCHDOG=1", 3, after)
        assert "READY=1" not in systemd_side.all()
        assert await health_status(lb.health_socket, "Readiness") != SERVING

        await nsp.start()
        await systemd_side.wait_for("READY=1")
        assert await health_status(lb.health_socket, "Readiness") == SERVING
        # Installed with CAP_NET_ADMIN and CAP_NET_RAW only: the Maglev table and the
        # iptables chain that queues ICMP errors for the VIPs.
        assert "meridio-lb" in netns.run("nft", "list", "tables").stdout  # type: ignore[attr-defined]
        chains = netns.run("iptables", "-t", "mangle", "-S").stdout  # type: ignore[attr-defined]
        assert "NFQUEUE" in chains, chains
        assert await lb.stop() == 0
        assert "STOPPING=1" in systemd_side.all()
    finally:
        for daemon in (lb, nsp):
            if daemon.alive():
                with contextlib.suppress(Exception):
                    daemon.kill()
