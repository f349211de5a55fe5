"""The host's side of the lab: namespaces, links, sysctls, processes and their health.

Links and addresses are made with ``ip`` (one ``ip -batch`` per namespace where possible),
sysctls are written from a thread that entered the namespace (no process per write), and the
daemons run under ``ip netns exec`` in a session of their own, so they outlive the command
that started them. A process is known by its pid and its start time, so a recycled pid is never
mistaken for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import grpclib
import grpclib.client
from grpclib.exceptions import StreamTerminatedError

from meridio.api.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponseServingStatus,
    HealthStub,
)
from meridio.api.meridio.admin.v1 import LbInspectStub, ShowRequest, ShowResponse
from meridio.lab.state import Process

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
# Popen objects of the processes this process started, so that they are reaped (not zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class LabError(Exception):
    """Something the lab could not do; the message says what and, where it can, why."""


# --- commands ----------------------------------------------------------------------------------


def run(
    *cmd: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, input=input, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {result.stderr.strip() or 'failed'}")
    return result


def ip_batch(lines: Iterable[str], netns: str | None = None) -> None:
    """Run ``ip`` commands (without the leading ``ip``) in one process, in ``netns``; the
    first that fails stops it."""
    script = "\n".join(lines) + "\n"
    if script.strip():
        run("ip", *(["-n", netns] if netns else []), "-batch", "-", input=script)


def netns_list() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()]


def netns_pids(name: str) -> list[int]:
    out = run("ip", "netns", "pids", name, check=False).stdout
    return [int(pid) for pid in out.split() if pid.isdigit()]


def delete_netns(name: str) -> None:
    """Kill every process left in the namespace, then delete it (its links go with it)."""
    for pid in netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        reap(pid)
    run("ip", "netns", "del", name, check=False)


# --- inside a namespace ------------------------------------------------------------------------


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a fresh thread that entered namespace ``name`` (sockets it makes, and
    ``/proc/sys/net`` files it opens, are the namespace's)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            _setns(f"/run/netns/{name}")
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def write_sysctls(netns: str, values: dict[str, str]) -> None:
    """Set net sysctls (``net.ipv4.ip_forward`` style names) in ``netns``."""

    def write() -> None:
        for key, value in values.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(value)
            except FileNotFoundError:
                # IPv6 may be off, conntrack not loaded yet (it has its defaults then)
                if not key.startswith(("net.ipv6", "net.netfilter")):
                    raise LabError(f"sysctl {key} does not exist in this kernel") from None

    in_netns(netns, write)


def link_kind_supported(kind: str, **args: str) -> str | None:
    """None when this kernel makes ``kind`` links on a veth; else the kernel's refusal
    (tried in a throwaway namespace)."""
    name = f"mlab-probe-{os.getpid()}-{threading.get_ident() % 10000}"
    run("ip", "netns", "add", name)
    try:
        ip_batch(["link add p0 type veth peer name p1"], name)
        extra = [word for key, value in args.items() for word in (key, value)]
        made = run(
            "ip",
            "-n",
            name,
            "link",
            "add",
            "link",
            "p0",
            "name",
            "x0",
            "type",
            kind,
            *extra,
            check=False,
        )
        return None if made.returncode == 0 else made.stderr.strip() or "refused"
    finally:
        run("ip", "netns", "del", name, check=False)


# --- processes ---------------------------------------------------------------------------------


def proc_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        reap(pid)
        return None
    return int(fields[19])


def reap(pid: int) -> None:
    """Collect the exit status of a child of this process, if it is one."""
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(0.05)
            return
        _CHILDREN[pid] = child
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def alive(proc: Process) -> bool:
    return proc_start_time(proc.pid) == proc.start_time


def clean_environment() -> dict[str, str]:
    """This process's environment without ``MERIDIOD_*`` settings (each daemon gets its own
    on its command line)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MERIDIOD_")}


def spawn(name: str, role: str, netns: str, argv: Sequence[str], log: Path) -> Process:
    """Start ``argv`` in ``netns`` in a session of its own, output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        child = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env=clean_environment(),
        )
    _CHILDREN[child.pid] = child
    start = proc_start_time(child.pid)
    if start is None:
        raise LabError(f"{name} exited at once: {tail(log)}")
    return Process(
        name=name,
        role=role,
        netns=netns,
        pid=child.pid,
        start_time=start,
        log=str(log),
        argv=list(argv),
    )


def send_signal(proc: Process, signum: int) -> None:
    if alive(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)


def wait_gone(procs: Iterable[Process], timeout: float) -> list[Process]:
    """Wait until every process has exited; those still running after ``timeout``."""
    waiting = list(procs)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        time.sleep(0.05)
        waiting = [p for p in waiting if alive(p)]
    return waiting


def stop(procs: Iterable[Process], timeout: float) -> None:
    """SIGTERM, and SIGKILL what is still running after ``timeout``."""
    procs = list(procs)
    for proc in procs:
        send_signal(proc, signal.SIGTERM)
    for proc in wait_gone(procs, timeout):
        send_signal(proc, signal.SIGKILL)
    wait_gone(procs, 2)


def tail(path: Path | str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


# --- asking the daemons ------------------------------------------------------------------------


def run_async(coro: Awaitable[T]) -> T:
    """Run a coroutine on a plain asyncio loop (not trio-asyncio's, should it be imported)."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


CLIENT_ERRORS = (OSError, TimeoutError, grpclib.GRPCError, StreamTerminatedError)


async def readiness(socket: Path, timeout: float = 1.0) -> bool:
    """Whether the daemon behind ``socket`` (its health.sock) says Readiness is SERVING."""
    if not socket.exists():
        return False
    channel = grpclib.client.Channel(path=str(socket))
    try:
        reply = await HealthStub(channel).check(
            HealthCheckRequest(service="Readiness"), timeout=timeout
        )
        return bool(reply.status == HealthCheckResponseServingStatus.SERVING)
    except CLIENT_ERRORS:
        return False
    finally:
        channel.close()


async def lb_show(socket: Path, timeout: float = 2.0) -> ShowResponse | None:
    """The LB's Show (its Maglev tables), or None when it does not answer."""
    if not socket.exists():
        return None
    channel = grpclib.client.Channel(path=str(socket))
    try:
        reply: ShowResponse = await LbInspectStub(channel).show(ShowRequest(), timeout=timeout)
        return reply
    except CLIENT_ERRORS:
        return None
    finally:
        channel.close()


def lb_target_ips(show: ShowResponse | None) -> set[tuple[str, ...]]:
    """The IPs of every target in an LB's tables."""
    if show is None:
        return set()
    return {tuple(t.ips) for stream in show.streams for t in stream.targets}


def announced(log: Path | str, words: str) -> bool:
    """Whether ``words`` appear in the log (e.g. the traffic server's "serving on")."""
    try:
        return words in Path(log).read_text(errors="replace")
    except OSError:
        return False
