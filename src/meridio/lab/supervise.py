"""``python -m meridio.lab.supervise``: run one lab process and start it again when it dies, as
a kubelet does with a pod's container (restart policy ``Always``).

    python -m meridio.lab.supervise --status FILE [--name NAME] [--no-restart] [--hold FILE]
        -- PROGRAM ARGS...

The lab's daemons run detached (they outlive the command that started them), so their
supervisor is a process of its own: one per instance, in the instance's namespace, in a session
of its own. It runs PROGRAM as its child and:

- starts it again when it exits, whatever the exit status, after a pause that doubles from
  0.2 s to 10 s while it keeps dying young and starts afresh once it ran 10 s
  (``plan.restart_delay``); with ``--no-restart`` it exits when its child does (to study a
  failure); nor while the ``--hold`` file exists (``lab down`` makes it before it stops
  anything, so nothing is started again while the lab goes);
- forwards SIGTERM and SIGINT to the child and exits once the child has (nothing is started
  again after a SIGTERM: ``lab down`` and ``scale`` stop the supervisors); SIGHUP, SIGUSR1 and
  SIGUSR2 are forwarded as they are (reload, log level);
- ties the child's life to its own (``PR_SET_PDEATHSIG``): a supervisor killed takes its child
  with it, as a pod's containers go with the pod;
- keeps FILE (JSON, replaced atomically) up to date: the child's pid and start time, how often
  it was restarted, how the last one ended, and whether it runs, waits to start again or has
  stopped. The lab reads it (``system.supervised``) for ``status``, ``kill`` and ``restart``.

Its own lines go to stderr (the instance's log, as JSON like the daemons' lines). It imports
nothing but the standard library and ``meridio.lab.plan``, so it starts in a few tens of
milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meridio.lab import plan

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
HANDLED = {signal.SIGCHLD, *STOP_SIGNALS, *FORWARDED}
POLL = 1.0
"""Seconds between looks at the child even without a signal (a SIGCHLD is never lost, but the
look is cheap)."""


@dataclass
class Exit:
    """How one run of the child ended."""

    code: int | None
    """Its exit status, None when a signal ended it."""
    signal: str | None
    """The signal that ended it (``SIGKILL``), None when it exited."""
    at: float
    """When (seconds since the epoch)."""
    ran: float
    """For how long it had run (seconds)."""


@dataclass
class SuperviseStatus:
    """What the status file holds."""

    name: str
    supervisor: int
    """The supervisor's pid."""
    state: str = "starting"
    """``running``, ``waiting`` (to start the child again), ``stopping`` (a SIGTERM came, the
    child is on its way out), ``stopped`` (after a SIGTERM) or ``exited`` (``--no-restart``:
    the child died, nothing starts it again)."""
    pid: int | None = None
    """The child's pid while it runs."""
    start_time: int | None = None
    """The child's start time (clock ticks since boot, ``/proc/<pid>/stat``): a recycled pid is
    never taken for it."""
    started_at: float | None = None
    """When the running child was started (seconds since the epoch)."""
    starts: int = 0
    restarts: int = 0
    """How often the child was started again after it ended (Kubernetes' restart count)."""
    next_start: float | None = None
    """While ``waiting``: when the child is started again (seconds since the epoch)."""
    last_exit: Exit | None = None
    restart: bool = True
    exits: list[Exit] = field(default_factory=list)
    """The last few ends (at most ``KEEP_EXITS``), oldest first."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SuperviseStatus:
        def exit_of(value: Any) -> Exit | None:
            return Exit(**value) if isinstance(value, dict) else None

        values = dict(data)
        values["last_exit"] = exit_of(values.get("last_exit"))
        values["exits"] = [e for e in map(exit_of, values.get("exits") or []) if e is not None]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


KEEP_EXITS = 20


def read_status(path: Path | str) -> SuperviseStatus | None:
    """The status file, None when there is none or it cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
        return SuperviseStatus.from_json(data)
    except (OSError, ValueError, TypeError):
        return None


def write_status(path: Path, status: SuperviseStatus) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status.to_json(), indent=1) + "\n")
    os.replace(tmp, path)


def proc_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Supervisor:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        status_path: Path,
        *,
        restart: bool = True,
        hold: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.path = status_path
        self.hold = hold
        self.status = SuperviseStatus(name=name, supervisor=os.getpid(), restart=restart)
        self.child: subprocess.Popen[bytes] | None = None
        self.delay: float | None = None
        self.stopping = False
        self._libc = ctypes.CDLL(None, use_errno=True)

    # -- the log and the status file

    def log(self, level: str, event: str, **fields: Any) -> None:
        line = {
            "event": event,
            **fields,
            "instance": self.status.name,
            "level": level,
            "logger": "meridio.lab.supervise",
            "timestamp": datetime.now(UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
        }
        with contextlib.suppress(OSError):
            sys.stderr.write(json.dumps(line) + "\n")
            sys.stderr.flush()

    def save(self) -> None:
        with contextlib.suppress(OSError):
            write_status(self.path, self.status)

    # -- the child

    def _in_child(self) -> None:
        """Between fork and exec: the child's signal mask as a fresh process has it, and its
        death tied to ours."""
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        self._libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.status.supervisor:
            os._exit(1)  # the supervisor died before the line above

    def start(self) -> None:
        try:
            self.child = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, preexec_fn=self._in_child
            )
        except OSError as exc:
            self.log("error", "cannot start the program", error=str(exc), argv=self.argv)
            self.child = None
            self._ended(Exit(code=127, signal=None, at=time.time(), ran=0.0))
            return
        st = self.status
        st.pid = self.child.pid
        st.start_time = proc_start_time(self.child.pid)
        st.started_at = time.time()
        st.next_start = None
        st.state = "running"
        if st.starts:
            st.restarts += 1
        st.starts += 1
        # the lab reads what the program says from the last of these lines on
        # (``system.SUPERVISOR_START``); logged before the status says "running", so whoever
        # sees the new status finds the line
        self.log("info", "started", pid=st.pid, restarts=st.restarts)
        self.save()

    def reap(self) -> None:
        """Collect the child if it has ended."""
        if self.child is None:
            return
        code = self.child.poll()
        if code is None:
            return
        self.child = None
        now = time.time()
        ran = round(now - (self.status.started_at or now), 3)
        if code < 0:
            end = Exit(code=None, signal=signal_name(-code), at=now, ran=ran)
        else:
            end = Exit(code=code, signal=None, at=now, ran=ran)
        self._ended(end)

    def _ended(self, end: Exit) -> None:
        st = self.status
        st.pid = st.start_time = st.started_at = None
        st.last_exit = end
        st.exits = [*st.exits, end][-KEEP_EXITS:]
        how = f"signal {end.signal}" if end.signal else f"status {end.code}"
        if self.stopping:
            st.state = "stopped"
            self.log("info", "stopped", exit=how)
        elif not st.restart:
            st.state = "exited"
            self.log("warning", "exited; not started again (--no-restart)", exit=how)
        elif self.hold is not None and self.hold.exists():
            st.state = "stopped"
            self.log("info", "exited; not started again: the lab is going down", exit=how)
        else:
            self.delay = plan.restart_delay(self.delay, end.ran)
            st.state = "waiting"
            st.next_start = time.time() + self.delay
            self.log(
                "warning",
                "exited; starting it again",
                exit=how,
                ran=end.ran,
                restart_in=round(self.delay, 3),
                restarts=st.restarts,
            )
        self.save()

    def signal_child(self, signum: int) -> None:
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    # -- the loop

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        self.save()
        self.start()
        while True:
            self.reap()
            st = self.status
            if self.child is None:
                if self.stopping or st.state in ("stopped", "exited"):
                    if st.state not in ("stopped", "exited"):
                        st.state = "stopped"
                        self.save()
                    return 0
                if st.next_start is None or time.time() >= st.next_start:
                    self.start()
                    continue
                timeout = max(0.0, min(POLL, st.next_start - time.time()))
            else:
                timeout = POLL
            info = signal.sigtimedwait(HANDLED, timeout)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_signo in STOP_SIGNALS:
                if not self.stopping:
                    self.stopping = True
                    if self.child is not None:
                        st.state = "stopping"
                        self.save()
                        self.log("info", "stopping", signal=signal_name(info.si_signo))
                self.signal_child(info.si_signo)
            else:
                self.signal_child(info.si_signo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meridio.lab.supervise",
        description="Run PROGRAM and start it again when it dies (the lab's pods).",
    )
    parser.add_argument("--status", required=True, type=Path, help="The status file (JSON).")
    parser.add_argument("--name", default="", help="The instance's name, for the log.")
    parser.add_argument(
        "--no-restart", action="store_true", help="Exit when the child does; start nothing."
    )
    parser.add_argument("--hold", type=Path, help="Start nothing again while this file exists.")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("no program to run (after --)")
    args.status.parent.mkdir(parents=True, exist_ok=True)
    name = args.name or Path(program[0]).name
    supervisor = Supervisor(name, program, args.status, restart=not args.no_restart, hold=args.hold)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
