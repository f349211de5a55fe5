"""The LB's frontend: one BIRD 2 child that attracts the VIPs' traffic from the gateways.

The LB decides (see :mod:`meridio.core.birdconf`); this module makes BIRD do it:

* BIRD runs in the foreground as a child of ``meridiod`` with ``PR_SET_PDEATHSIG``: when the
  daemon dies, even by ``kill -9``, the kernel kills its BIRD, the BGP session closes and the
  gateway stops sending to this LB at once. When BIRD dies, it is started again (with a
  growing pause) and the ``Gateways`` check is false meanwhile.
* Its files live under the run dir: ``bird.conf`` (the last configuration BIRD accepted),
  ``bird.ctl`` (control socket) and ``bird.pid``.
* Every change is applied with ``configure``, so sessions that did not change stay up. A
  configuration BIRD refuses leaves the previous one running; BIRD's message is logged and
  reported by ``meridioctl lb gateways``.
* Session state is read over the control socket every ``poll-interval``
  (``show protocols all`` and ``show bfd sessions``, parsed by :mod:`meridio.core.birdc`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from meridio.core import birdc
from meridio.core.birdconf import (
    KERNEL_PROTOCOL,
    FrontendConfig,
    FrontendConfigError,
    Peer,
    render,
)

PR_SET_PDEATHSIG = 1
SOCKET_WAIT = 10.0
RESTART_PAUSE = (0.2, 5.0)
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class GatewayState:
    """One gateway's session as the LB sees it."""

    name: str
    address: str
    protocol: str
    state: str
    """``up``; for BGP otherwise BGP's state in lower case (``idle``, ``connect``, ``active``,
    ``opensent``, ``openconfirm``); ``down`` for a static route that is not imported."""
    bfd: str
    """``up``, ``down``, ``init``, ``admindown`` or ``off``."""
    since: str = ""
    routes_announced: int = 0
    routes_received: int = 0
    info: str = ""

    @property
    def up(self) -> bool:
        return self.state == "up"


def gateway_states(
    peers: tuple[Peer, ...],
    protocols: list[birdc.Protocol],
    sessions: list[birdc.BfdSession],
    announcing: bool,
) -> list[GatewayState]:
    """What BIRD's answers say about each configured gateway."""
    by_name = {p.name: p for p in protocols}
    bfd_by_address = {s.address: s for s in sessions}
    states = []
    for peer in peers:
        proto = by_name.get(peer.name)
        wants_bfd = peer.bfd is not None and (peer.protocol == "bgp" or announcing)
        session = bfd_by_address.get(peer.address) if wants_bfd else None
        bfd = "off" if not wants_bfd else (session.state.lower() if session else "down")
        if proto is None:
            states.append(GatewayState(peer.name, peer.address, peer.protocol, "down", bfd))
            continue
        if peer.protocol == "bgp":
            state = "up" if proto.up else (proto.bgp_state or proto.state).lower()
        else:
            state = "up" if proto.state == "up" and proto.imported > 0 else "down"
        since = proto.since.isoformat(sep=" ", timespec="milliseconds") if proto.since else ""
        states.append(
            GatewayState(
                name=peer.name,
                address=peer.address,
                protocol=peer.protocol,
                state=state,
                bfd=bfd,
                since=since,
                routes_announced=proto.exported if peer.protocol == "bgp" else 0,
                routes_received=proto.imported,
                info=proto.last_error,
            )
        )
    return states


class BirdControl:
    """BIRD's control socket: one connection, one command at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stream: trio.SocketStream | None = None
        self._buffer = b""
        self._lock = trio.Lock()

    async def _read_reply(self, stream: trio.SocketStream) -> birdc.Reply:
        while True:
            end = birdc.reply_end(self._buffer)
            if end >= 0:
                data, self._buffer = self._buffer[:end], self._buffer[end:]
                return birdc.parse_reply(data)
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("BIRD closed its control socket")
            self._buffer += chunk

    async def ask(self, command: str, timeout: float = 5.0) -> birdc.Reply:
        async with self._lock:
            try:
                with trio.fail_after(timeout):
                    if self._stream is None:
                        self._buffer = b""
                        self._stream = await trio.open_unix_socket(str(self.path))
                        await self._read_reply(self._stream)  # "0001 BIRD 2.0.12 ready."
                    await self._stream.send_all(command.encode() + b"\n")
                    return await self._read_reply(self._stream)
            except BaseException:
                await self.aclose_unlocked()
                raise

    async def aclose_unlocked(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def aclose(self) -> None:
        async with self._lock:
            await self.aclose_unlocked()


def _die_with_parent(parent: int) -> Callable[[], None]:
    def setup() -> None:
        # run in the child between fork and exec
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: do not outlive it
            os._exit(1)

    return setup


class Frontend:
    """Runs BIRD for the LB and keeps it configured as :meth:`set_config` last asked."""

    def __init__(
        self,
        run_dir: Path,
        log: Any,
        *,
        binary: str = "bird",
        poll_interval: float = 0.25,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.run_dir = run_dir
        self.conf = run_dir / "bird.conf"
        self.candidate = run_dir / "bird.conf.new"
        self.ctl = run_dir / "bird.ctl"
        self.pidfile = run_dir / "bird.pid"
        self.binary = binary
        self.log = log
        self.poll_interval = poll_interval
        self.on_change = on_change
        self.desired: FrontendConfig | None = None
        self.applied: FrontendConfig | None = None
        self._applied_text = ""
        self.error = ""
        """Why the desired configuration is not running (BIRD's message or ours), or ""."""
        self.bird = "stopped"
        self.gateways: list[GatewayState] = []
        self.kernel_routes = 0
        """Routes BIRD has exported to the kernel (the gateways' routes for the replies)."""
        self.control = BirdControl(self.ctl)
        self._wake = trio.Event()
        self._applied_event = trio.Event()
        self.starts = 0

    # --- what the LB asks --------------------------------------------------------------

    def set_config(self, config: FrontendConfig) -> None:
        if config != self.desired:
            self.desired = config
            self._wake.set()

    def set_error(self, error: str) -> None:
        if error != self.error:
            self.error = error
            self.on_change()

    @property
    def announced(self) -> tuple[str, ...]:
        return self.applied.announce if self.applied is not None and self.running else ()

    @property
    def running(self) -> bool:
        return self.bird == "running"

    def any_gateway_up(self) -> bool:
        return self.running and any(g.up for g in self.gateways)

    def egress_up(self) -> bool:
        """A gateway is up and gave us a route, and BIRD has put it in the kernel: replies
        from the VIPs can leave (a reply sent before the kernel had the route was lost)."""
        return (
            self.running
            and self.kernel_routes > 0
            and any(g.up and g.routes_received > 0 for g in self.gateways)
        )

    async def withdraw(self) -> None:
        """Announce nothing from now on, and return once BIRD has taken it (or is gone)."""
        if self.desired is None:
            return
        self.set_config(dataclasses.replace(self.desired, announce=()))
        with trio.move_on_after(2.0):
            while self.running and self.applied is not None and self.applied.announce:
                event = self._applied_event
                await event.wait()
        self.log.info("VIPs withdrawn", running=self.running)

    # --- the supervisor ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._kill_leftover()
        task_status.started()
        pause = RESTART_PAUSE[0]
        while True:
            while self.desired is None:
                await self._wake.wait()
                self._wake = trio.Event()
            started = trio.current_time()
            try:
                await self._run_once()
            except (OSError, FrontendConfigError, birdc.BirdError) as exc:
                self.log.error("BIRD could not run", error=str(exc))
                self.set_error(str(exc))
            self._set_bird("restarting")
            if trio.current_time() - started > 30:
                pause = RESTART_PAUSE[0]
            await trio.sleep(pause)
            pause = min(pause * 2, RESTART_PAUSE[1])

    def _set_bird(self, state: str) -> None:
        if state != self.bird:
            self.bird = state
            if state != "running":
                self.gateways = []
                self.kernel_routes = 0
            self.on_change()

    def _kill_leftover(self) -> None:
        """A BIRD an earlier instance left (it should have died with it): ours if its command
        line names our control socket."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return
        if str(self.ctl).encode() in cmdline:
            self.log.warning("killing the BIRD an earlier LB left running", pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def _first_config(self) -> str:
        """Render the desired configuration and have BIRD parse it; the last accepted one when
        BIRD refuses it (its message reported), or the error when there is none."""
        # what is rendered is what is recorded as applied: the LB may change its mind while
        # BIRD parses (an announcement that came then, taken as applied, was never made)
        desired = self.desired
        assert desired is not None
        text = render(desired)
        self.candidate.write_text(text)
        check = await trio.run_process(
            [self.binary, "-p", "-c", str(self.candidate)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if check.returncode == 0:
            self.candidate.replace(self.conf)
            self.applied, self._applied_text = desired, text
            self.set_error("")
            return text
        message = (check.stderr or check.stdout).decode(errors="replace").strip()
        self.log.error("BIRD refused the configuration", bird=message)
        self.set_error(f"BIRD refused the configuration: {message}")
        if self.applied is None or not self.conf.exists():
            raise FrontendConfigError(f"BIRD refused the configuration: {message}")
        return self._applied_text

    async def _run_once(self) -> None:
        self._set_bird("starting")
        await self._first_config()
        with contextlib.suppress(FileNotFoundError):
            self.ctl.unlink()
        argv = [
            self.binary,
            "-f",
            "-c",
            str(self.conf),
            "-s",
            str(self.ctl),
            "-P",
            str(self.pidfile),
        ]
        # Started from this (the main) thread: PDEATHSIG follows the thread that forked.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent(os.getpid()),
            close_fds=True,
        )
        self.starts += 1
        pidfd = os.pidfd_open(proc.pid)
        self.log.info("BIRD started", pid=proc.pid, config=str(self.conf))
        try:
            async with trio.open_nursery() as nursery:
                assert proc.stderr is not None
                nursery.start_soon(self._forward_log, os.dup(proc.stderr.fileno()))
                nursery.start_soon(self._control, nursery)
                await trio.lowlevel.wait_readable(pidfd)
                nursery.cancel_scope.cancel()
            code = proc.wait()
            self.log.error("BIRD exited", code=code)
            self.set_error(f"BIRD exited with status {code}")
        finally:
            with trio.CancelScope(shield=True):
                await self.control.aclose()
                await self._stop(proc, pidfd)

    async def _stop(self, proc: subprocess.Popen[bytes], pidfd: int) -> None:
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # a Cease to every peer: they drop us at once
                with trio.move_on_after(2.0):
                    await trio.lowlevel.wait_readable(pidfd)
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        finally:
            os.close(pidfd)
            if proc.stderr is not None:
                proc.stderr.close()

    async def _forward_log(self, fd: int) -> None:
        stream = trio.lowlevel.FdStream(fd)
        buffer = b""
        async with stream:
            while True:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.log.info("bird", line=line.decode(errors="replace").strip())

    async def _control(self, nursery: trio.Nursery) -> None:
        await self._wait_socket()
        self._set_bird("running")
        next_poll = trio.current_time()
        while True:
            if self.desired is not None and self.desired != self.applied:
                await self._configure()
            if trio.current_time() >= next_poll:
                await self._poll()
                next_poll = trio.current_time() + self.poll_interval
            with trio.move_on_at(next_poll):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _wait_socket(self) -> None:
        with trio.fail_after(SOCKET_WAIT):
            while True:
                try:
                    await self.control.ask("show status", timeout=1.0)
                    return
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, None):
                        raise
                await trio.sleep(0.02)

    async def _configure(self) -> None:
        desired = self.desired
        assert desired is not None
        try:
            text = render(desired)
        except FrontendConfigError as exc:
            self.log.error("frontend configuration refused", error=str(exc))
            self.set_error(str(exc))
            self.applied = desired  # do not retry the same thing; the error stays reported
            return
        if text != self._applied_text:
            self.candidate.write_text(text)
            try:
                birdc.configure_result(
                    await self.control.ask(f'configure "{self.candidate}"', timeout=10.0)
                )
            except birdc.BirdError as exc:
                # BIRD keeps running what it had; say why the new one is not
                self.log.error("BIRD refused the configuration", bird=str(exc))
                self.set_error(f"BIRD refused the configuration: {exc}")
                self.applied = desired
                return
            self.candidate.replace(self.conf)  # what BIRD would start with next time
            self._applied_text = text
            self.log.info(
                "BIRD reconfigured",
                announced=list(desired.announce),
                gateways=[p.name for p in desired.peers],
            )
        self.applied = desired
        self.set_error("")
        self._applied_event.set()
        self._applied_event = trio.Event()
        self.on_change()

    async def _poll(self) -> None:
        protocols = birdc.parse_protocols((await self.control.ask("show protocols all")).check())
        sessions = birdc.parse_bfd_sessions(await self.control.ask("show bfd sessions"))
        peers = self.applied.peers if self.applied else ()
        states = gateway_states(peers, protocols, sessions, bool(self.announced))
        kernel_routes = sum(p.exported for p in protocols if p.name in KERNEL_PROTOCOL.values())
        egress_changed = (kernel_routes > 0) != (self.kernel_routes > 0)
        self.kernel_routes = kernel_routes
        if egress_changed:
            self.on_change()
        if states != self.gateways:
            before = {g.name: (g.state, g.bfd) for g in self.gateways}
            for gateway in states:
                if before.get(gateway.name) != (gateway.state, gateway.bfd):
                    self.log.info(
                        "gateway session",
                        gateway=gateway.name,
                        state=gateway.state,
                        bfd=gateway.bfd,
                        info=gateway.info or None,
                    )
            self.gateways = states
            self.on_change()
