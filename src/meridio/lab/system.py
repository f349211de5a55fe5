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
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpclib
import grpclib.client
from grpclib.exceptions import StreamTerminatedError

from meridio.api.ambassador.v1 import Conduit as TapConduit
from meridio.api.ambassador.v1 import Stream as TapStream
from meridio.api.ambassador.v1 import StreamResponse, StreamStatusStatus, TapStub
from meridio.api.ambassador.v1 import Trench as TapTrench
from meridio.api.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponseServingStatus,
    HealthStub,
)
from meridio.api.meridio.admin.v1 import LbInspectStub, ShowRequest, ShowResponse
from meridio.lab.state import Process
from meridio.lab.supervise import SuperviseStatus, read_status

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


def process_name(pid: int) -> str | None:
    """``/proc/<pid>/comm`` (e.g. ``bird``), None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def netns_processes(name: str, command: str | None = None) -> list[int]:
    """The pids of the processes in namespace ``name`` (only those whose command name is
    ``command``, when given): e.g. an LB's BIRD."""
    pids = netns_pids(name)
    return [p for p in pids if command is None or process_name(p) == command]


def is_supervisor(pid: int) -> bool:
    """Whether ``pid`` is a lab supervisor (``python -m meridio.lab.supervise``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"meridio.lab.supervise" in cmdline


def delete_netns(name: str, timeout: float = 5.0) -> None:
    """Kill every process left in the namespace, then delete it (its links go with it). The
    supervisors go first, so that none starts its program again; and again until nothing is
    left, so that nothing outlives the namespace's name."""
    deadline = time.monotonic() + timeout
    while True:
        pids = netns_pids(name)
        if not pids:
            break
        for pid in sorted(pids, key=lambda p: not is_supervisor(p)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            reap(pid)
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
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


def spawn(
    name: str,
    role: str,
    netns: str,
    argv: Sequence[str],
    log: Path,
    supervisor: Sequence[str] | None = None,
    status_file: Path | None = None,
) -> Process:
    """Start ``argv`` in ``netns`` in a session of its own, output appended to ``log``; with
    ``supervisor`` (the supervisor's command line up to its ``--``) under that supervisor,
    which keeps ``status_file``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [*supervisor, *argv] if supervisor is not None else list(argv)
    if status_file is not None:
        with contextlib.suppress(FileNotFoundError):
            status_file.unlink()
    with log.open("ab") as out:
        child = subprocess.Popen(
            ["ip", "netns", "exec", netns, *command],
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
        supervised=supervisor is not None,
        status_file=str(status_file or ""),
    )


def supervised(proc: Process) -> SuperviseStatus | None:
    """What the supervisor of ``proc`` says (None when it is not supervised, or its status
    file is not there yet)."""
    if not proc.supervised or not proc.status_file:
        return None
    return read_status(proc.status_file)


def role_pid(proc: Process) -> int | None:
    """The pid of the instance's own program while it runs: the supervisor's child, or the
    process itself when it is not supervised; None when it does not run."""
    if not alive(proc):
        return None
    if not proc.supervised:
        return proc.pid
    status = supervised(proc)
    if status is None or status.pid is None or status.start_time is None:
        return None
    return status.pid if proc_start_time(status.pid) == status.start_time else None


def signal_role(proc: Process, signum: int) -> int | None:
    """Send ``signum`` to the instance's own program (not to its supervisor, which starts it
    again when it dies); the pid signalled, None when it was not running."""
    pid = role_pid(proc)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return pid


def kill_role(proc: Process, signum: int = signal.SIGKILL, wait: float = 2.0) -> int | None:
    """``signal_role`` with SIGKILL (a crash), then wait up to ``wait`` seconds until that
    process is gone; the pid killed, None when it was not running."""
    pid = role_pid(proc)
    if pid is None:
        return None
    start = proc_start_time(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
    if start is not None:
        wait_pid_gone(pid, wait, start)
    return pid


def wait_pid_gone(pid: int, timeout: float, start_time: int | None = None) -> bool:
    """Wait until ``pid`` (started at ``start_time``, when given) has exited (or is a zombie);
    whether it has."""
    deadline = time.monotonic() + timeout
    while True:
        now = proc_start_time(pid)
        if now is None or (start_time is not None and now != start_time):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def wait_restarted(proc: Process, old_pid: int | None, timeout: float) -> int | None:
    """Wait until the supervisor of ``proc`` runs its program again, under another pid than
    ``old_pid``; the new pid, None when it does not within ``timeout`` (or the supervisor
    is gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = role_pid(proc)
        if pid is not None and pid != old_pid:
            return pid
        if not alive(proc):
            return None
        time.sleep(0.02)
    return None


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


# --- routes ------------------------------------------------------------------------------------


def route_next_hops(netns: str, family: int, prefix: str) -> list[str]:
    """The next hops (gateway addresses) of the route to exactly ``prefix`` in ``netns``'s
    main table: one per path of a multipath route; empty when there is none (or it has no
    gateway)."""
    out = run(
        "ip", "-n", netns, f"-{family}", "-j", "route", "show", "exact", prefix, check=False
    ).stdout
    try:
        routes = json.loads(out or "[]")
    except json.JSONDecodeError:
        return []
    return route_gateways(routes)


def route_gateways(routes: Sequence[Mapping[str, Any]]) -> list[str]:
    """The gateways of ``ip -j route`` entries (``gateway``, or ``nexthops[].gateway``)."""
    hops: list[str] = []
    for route in routes:
        if isinstance(route.get("gateway"), str):
            hops.append(str(route["gateway"]))
        nexthops = route.get("nexthops")
        if isinstance(nexthops, list):
            hops += [str(h["gateway"]) for h in nexthops if isinstance(h, dict) and "gateway" in h]
    return hops


# --- BIRD --------------------------------------------------------------------------------------

BIRD_PATHS = ("/usr/sbin/bird", "/usr/local/sbin/bird")


def find_bird() -> str | None:
    """BIRD 2's daemon (``bird``), None when it is not installed."""
    found = shutil.which("bird")
    if found:
        return found
    return next((p for p in BIRD_PATHS if os.access(p, os.X_OK)), None)


class BirdError(LabError):
    """BIRD did not answer, or answered with an error."""


def bird_query(sock: Path | str, command: str, timeout: float = 2.0) -> list[tuple[int, str]]:
    """One command over a BIRD control socket (what ``birdc -s SOCK COMMAND`` does): the
    reply's lines as (code, text), continuation lines with the code of the line they
    continue. Raises BirdError when BIRD cannot be reached or replies with an error."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(sock))
            with conn.makefile("rwb") as stream:
                hello = read_bird_reply(stream)
                if not hello or hello[0][0] != 1:
                    raise BirdError(f"{sock}: not a BIRD control socket: {hello}")
                stream.write(command.encode() + b"\n")
                stream.flush()
                reply = read_bird_reply(stream)
    except OSError as exc:
        raise BirdError(f"BIRD at {sock}: {exc}") from None
    if reply and reply[-1][0] >= 8000:
        raise BirdError(f"BIRD at {sock}: {command}: {reply[-1][1]}")
    return reply


def read_bird_reply(stream: Iterable[bytes]) -> list[tuple[int, str]]:
    """Read one reply of BIRD's control protocol: lines ``NNNN-text`` (more follow), `` text``
    (continuing the previous code) and the last one ``NNNN text``."""
    lines: list[tuple[int, str]] = []
    code = 0
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        if len(line) >= 5 and line[:4].isdigit() and line[4] in "- ":
            code = int(line[:4])
            lines.append((code, line[5:]))
            if line[4] == " ":
                return lines
        elif len(line) == 4 and line.isdigit():
            lines.append((int(line), ""))
            return lines
        else:
            lines.append((code, line[1:] if line.startswith(" ") else line))
    raise BirdError("BIRD closed its control socket in the middle of a reply")


@dataclass(frozen=True)
class BirdProtocol:
    """One line of ``show protocols`` (with ``all``: the BGP neighbour's address too)."""

    name: str
    proto: str
    table: str
    state: str
    since: str
    info: str
    neighbor: str = ""
    bgp_state: str = ""


def parse_bird_protocols(reply: Sequence[tuple[int, str]]) -> list[BirdProtocol]:
    """The protocols of a ``show protocols [all]`` reply (``timeformat protocol iso long``:
    the time is two words, date and time)."""
    found: list[BirdProtocol] = []
    current: dict[str, str] | None = None

    def close() -> None:
        if current is not None:
            found.append(BirdProtocol(**current))

    for code, text in reply:
        if code == 1002:
            close()
            words = text.split(maxsplit=6)
            if len(words) < 4:
                current = None
                continue
            since = " ".join(words[4:6])
            current = {
                "name": words[0],
                "proto": words[1],
                "table": words[2],
                "state": words[3],
                "since": since,
                "info": words[6].strip() if len(words) > 6 else "",
            }
        elif code == 1006 and current is not None:
            key, _, value = text.strip().partition(":")
            if key == "Neighbor address":
                current["neighbor"] = value.strip()
            elif key == "BGP state":
                current["bgp_state"] = value.strip()
    close()
    return found


@dataclass(frozen=True)
class BfdSession:
    address: str
    interface: str
    state: str
    since: str


def parse_bfd_sessions(reply: Sequence[tuple[int, str]]) -> list[BfdSession]:
    """The sessions of a ``show bfd sessions`` reply (times as two words)."""
    sessions: list[BfdSession] = []
    for code, text in reply:
        words = text.split()
        if code != 1020 or len(words) < 5 or words[0] == "IP" or words[0].endswith(":"):
            continue
        sessions.append(BfdSession(words[0], words[1], words[2], " ".join(words[3:5])))
    return sessions


def bird_ready(sock: Path | str) -> bool:
    """Whether a BIRD answers on its control socket."""
    try:
        bird_query(sock, "show status", timeout=1.0)
    except BirdError:
        return False
    return True


# --- asking the daemons ------------------------------------------------------------------------


def run_async(coro: Awaitable[T]) -> T:
    """Run a coroutine on a plain asyncio loop (not trio-asyncio's, should it be imported)."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


CLIENT_ERRORS = (OSError, TimeoutError, grpclib.GRPCError, StreamTerminatedError)
ASK_ERRORS = (*CLIENT_ERRORS, AttributeError)
"""What asking a daemon that may be dying raises: grpclib raises AttributeError (``'Connection'
object has no attribute '_transport'``) when the server goes while the connection is made."""


async def readiness(socket: Path, timeout: float = 1.0, service: str = "Readiness") -> bool:
    """Whether the daemon behind ``socket`` (its health.sock) says Readiness (or another
    health service, e.g. a sub-check) is SERVING."""
    if not socket.exists():
        return False
    channel = grpclib.client.Channel(path=str(socket))
    try:
        reply = await HealthStub(channel).check(
            HealthCheckRequest(service=service), timeout=timeout
        )
        return bool(reply.status == HealthCheckResponseServingStatus.SERVING)
    except ASK_ERRORS:
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
    except ASK_ERRORS:
        return None
    finally:
        channel.close()


def lb_target_ips(show: ShowResponse | None) -> set[tuple[str, ...]]:
    """The IPs of every target in an LB's tables."""
    if show is None:
        return set()
    return {tuple(t.ips) for stream in show.streams for t in stream.targets}


def lb_stream_counts(show: ShowResponse | None) -> dict[str, int]:
    """Per stream (by name), how many targets an LB's table holds."""
    if show is None:
        return {}
    return {stream.name: len(stream.targets) for stream in show.streams}


def lb_digests(show: ShowResponse | None) -> dict[str, str]:
    """Per stream (by name), the digest of an LB's Maglev table (equal tables, equal
    digests)."""
    if show is None:
        return {}
    return {stream.name: stream.digest for stream in show.streams}


# --- a target's TAPA (ambassador.v1.Tap) ---------------------------------------------------------


def tap_stream(trench: str, conduit: str, stream: str) -> TapStream:
    return TapStream(name=stream, conduit=TapConduit(name=conduit, trench=TapTrench(name=trench)))


async def tap_call(socket: Path, method: str, stream: TapStream, timeout: float = 15.0) -> None:
    """``Open`` or ``Close`` (``method``) over a target's TAPA socket; LabError naming the
    stream and the target's answer when it fails."""
    channel = grpclib.client.Channel(path=str(socket))
    try:
        stub = TapStub(channel)
        call = stub.open if method == "open" else stub.close
        await call(stream, timeout=timeout)
    except grpclib.GRPCError as exc:
        raise LabError(
            f"{method} {stream.conduit.name}/{stream.name}: {exc.status.name}: {exc.message}"
        ) from None
    except (OSError, TimeoutError, StreamTerminatedError) as exc:
        raise LabError(
            f"{method} {stream.name}: no TAPA at {socket}: {exc or 'timed out'}"
        ) from None
    finally:
        channel.close()


async def tap_list(socket: Path, timeout: float = 2.0) -> list[dict[str, str]] | None:
    """The streams a target has open, with their status (``Watch``'s first reply): dicts with
    ``trench``, ``conduit``, ``stream`` and ``status`` (``OPEN``, ``PENDING``, ...); None when
    its TAPA does not answer."""
    if not socket.exists():
        return None
    channel = grpclib.client.Channel(path=str(socket))
    replies = TapStub(channel).watch(TapStream(), timeout=timeout)
    try:
        reply = await anext(replies)
    except (*ASK_ERRORS, StopAsyncIteration):
        return None
    finally:
        await replies.aclose()
        channel.close()
    return tap_rows(reply)


def tap_rows(reply: StreamResponse) -> list[dict[str, str]]:
    return [
        {
            "trench": s.stream.conduit.trench.name,
            "conduit": s.stream.conduit.name,
            "stream": s.stream.name,
            "status": StreamStatusStatus(s.status).name,
        }
        for s in reply.stream_status
    ]


SUPERVISOR_START = '{"event": "started", '
"""How a supervisor's line saying it started its program begins (``meridio.lab.supervise``)."""


def announced(log: Path | str, words: str) -> bool:
    """Whether ``words`` appear in the log (e.g. the traffic server's "serving on") since the
    program was last started by its supervisor (the whole log when it has none)."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return False
    return words in text[text.rfind(SUPERVISOR_START) + 1 :]


# --- what a namespace's kernel holds -------------------------------------------------------------

KernelState = dict[str, list[str]]
"""Per kind (``links``, ``addresses``, ``routes``, ``rules``, ``nft``, ``xtables``,
``processes``), what a namespace holds, each item a canonical line, sorted: two states are
equal when nothing was added, left behind or lost, whatever the handles, indexes, MAC addresses
and counters (which a restarted process may change without leaving anything stale)."""

_VOLATILE_ROUTE_KEYS = {"expires", "cacheinfo", "age", "flags", "pref"}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _link_local(text: object) -> bool:
    return isinstance(text, str) and text.lower().startswith("fe80:")


def normal_links(links: Sequence[Mapping[str, Any]]) -> list[str]:
    """``ip -j -d link show``: name, kind, master, alias and whether it is up."""
    out = []
    for link in links:
        info = link.get("linkinfo") or {}
        up = "UP" in (link.get("flags") or [])
        item = {
            "name": link.get("ifname"),
            "kind": info.get("info_kind"),
            "master": link.get("master"),
            "alias": link.get("ifalias"),
            "up": up,
        }
        out.append(_canonical(item))
    return sorted(out)


def normal_addresses(links: Sequence[Mapping[str, Any]]) -> list[str]:
    """``ip -j addr show``: ``ifname address/prefixlen``, link-local ones left out (they follow
    the MAC address of a link made again)."""
    out = []
    for link in links:
        for addr in link.get("addr_info") or []:
            if addr.get("scope") == "link" or _link_local(addr.get("local")):
                continue
            out.append(f"{link.get('ifname')} {addr.get('local')}/{addr.get('prefixlen')}")
    return sorted(out)


def normal_routes(routes: Sequence[Mapping[str, Any]], family: int) -> list[str]:
    """``ip -j route show table all``: every route but those of link-local addresses."""
    out = []
    for route in routes:
        if _link_local(route.get("dst")):
            continue
        item = {k: v for k, v in route.items() if k not in _VOLATILE_ROUTE_KEYS}
        if isinstance(item.get("nexthops"), list):
            item["nexthops"] = sorted(
                (
                    {k: v for k, v in hop.items() if k not in _VOLATILE_ROUTE_KEYS}
                    for hop in item["nexthops"]
                    if isinstance(hop, dict)
                ),
                key=_canonical,
            )
        out.append(f"v{family} {_canonical(item)}")
    return sorted(out)


def normal_rules(rules: Sequence[Mapping[str, Any]], family: int) -> list[str]:
    return sorted(f"v{family} {_canonical(dict(rule))}" for rule in rules)


def _strip_nft(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"counter"} and isinstance(value["counter"], dict):
            return {"counter": {}}
        return {k: _strip_nft(v) for k, v in value.items() if k not in ("handle", "expires")}
    if isinstance(value, list):
        return [_strip_nft(v) for v in value]
    return value


def normal_nft(ruleset: Mapping[str, Any]) -> list[str]:
    """``nft -j list ruleset``: every table, chain, rule, set, map and element, without
    handles, counters' values and timeouts' remaining times."""
    items = [i for i in ruleset.get("nftables", []) if isinstance(i, dict) and "metainfo" not in i]
    return sorted(_canonical(_strip_nft(i)) for i in items)


def normal_xtables(text: str, family: int) -> list[str]:
    """``iptables-save`` (``ip6tables-save``): its tables, chains and rules, without comments
    and counters."""
    out = []
    table = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
            continue
        line = re.sub(r"\s*\[\d+:\d+\]$", "", line)
        out.append(f"v{family} {table} {line}")
    return sorted(out)


LASTING_AGE = 2.0
"""Seconds a process must have run to count in a namespace's state: the roles run tools for a
moment (``nft``, ``ip``, ``iptables-restore``, a BIRD checking a configuration, helper
processes), and a reading must not catch them; what a killed process left behind is older."""


def process_age(pid: int) -> float | None:
    """How long ``pid`` has run (seconds), None when it is gone."""
    start = proc_start_time(pid)
    if start is None:
        return None
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start / os.sysconf("SC_CLK_TCK")


def lasting_processes(netns: str) -> list[str]:
    """The command names of the processes in ``netns`` that have run for ``LASTING_AGE``
    seconds or more (not the tools the roles run for a moment)."""
    names = []
    for pid in netns_pids(netns):
        age = process_age(pid)
        name = process_name(pid)
        if age is None or name is None or age < LASTING_AGE:
            continue
        names.append(name)
    return sorted(names)


NICE = ("nice", "-n", "19") if shutil.which("nice") else ()
"""How the tools that read a namespace's kernel are run: at the lowest CPU priority."""


def kernel_state(netns: str, families: Iterable[int] = (4, 6)) -> KernelState:
    """What namespace ``netns`` holds now (see ``KernelState``); the processes by command name
    (an LB's BIRD, its ``meridiod``, a supervisor's ``python``). The reading tools run at the
    lowest priority (``NICE``): a burst of them must not starve the lab's BIRDs, whose BFD
    gives up on a peer silent for 300 ms."""

    def ip_json(*args: str) -> Any:
        out = run(*NICE, "ip", "-n", netns, "-j", *args, check=False).stdout
        try:
            return json.loads(out or "[]")
        except json.JSONDecodeError:
            return []

    state: KernelState = {
        "links": normal_links(ip_json("-d", "link", "show")),
        "addresses": normal_addresses(ip_json("addr", "show")),
        "routes": [],
        "rules": [],
        "nft": [],
        "xtables": [],
        "processes": lasting_processes(netns),
    }
    for family in families:
        state["routes"] += normal_routes(
            ip_json(f"-{family}", "route", "show", "table", "all"), family
        )
        state["rules"] += normal_rules(ip_json(f"-{family}", "rule", "show"), family)
        save = "iptables-save" if family == 4 else "ip6tables-save"
        if shutil.which(save):
            text = run(*NICE, "ip", "netns", "exec", netns, save, check=False).stdout
            state["xtables"] += normal_xtables(text, family)
    if shutil.which("nft"):
        nft = ("ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset")
        out = run(*NICE, *nft, check=False).stdout
        try:
            state["nft"] = normal_nft(json.loads(out or "{}"))
        except json.JSONDecodeError:
            state["nft"] = [f"unreadable: {out[:200]}"]
    for key in ("routes", "rules", "xtables"):
        state[key].sort()
    return state


def kernel_state_diff(before: KernelState, after: KernelState) -> list[str]:
    """What changed from ``before`` to ``after``: ``+ kind item`` (there now, not before: left
    behind, or made twice) and ``- kind item`` (gone); empty when nothing did. Duplicates count
    (two BIRDs where there was one)."""
    lines = []
    for kind in sorted(set(before) | set(after)):
        old = Counter(before.get(kind, []))
        new = Counter(after.get(kind, []))
        lines += [f"+ {kind} {item}" for item in sorted((new - old).elements())]
        lines += [f"- {kind} {item}" for item in sorted((old - new).elements())]
    return lines
