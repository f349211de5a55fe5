"""The traffic probe: new connections at a fixed rate, to measure how long new connections fail.

Attempt ``i`` starts at ``i / rate`` seconds (see :class:`~meridio.traffic.core.ProbeSchedule`)
whatever the earlier ones are doing: each is its own trio task, at most :data:`IN_FLIGHT_CAP`
at a time. An attempt that would start more than 0.1 s late (a busy host, the cap reached) is
skipped and counted, so a stall never turns into a burst.

One attempt is a fresh socket to the next address (round-robin): TCP connects, sends
:data:`REQUEST`, reads the reply up to the end of the server name the traffic server writes over
its first bytes (``core.server_header``), and closes; UDP sends :data:`REQUEST` as one datagram
from a new (connected) socket and waits for the reply datagram. The whole of it must finish
within ``connect_timeout``, or the attempt failed with ``timeout``; other failures are
classified by ``core.classify_error`` (``refused``, ``reset``, ``unreachable``, ...), and a TCP
connection the server closes before its name arrived failed with ``closed``.

On SIGINT or SIGTERM the probe stops at once: attempts still in flight are aborted (counted as
``aborted``, neither ok nor failed).
"""

from __future__ import annotations

import resource
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from meridio.traffic.core import (
    HEADER_SIZE,
    HostPort,
    ProbeAttempt,
    ProbeCounts,
    ProbeSettings,
    build_probe_report,
    classify_error,
    parse_name,
)
from meridio.traffic.server import raise_fd_limit

IN_FLIGHT_CAP = 2000
# Descriptors kept free of attempts for everything else the process has open.
FD_RESERVE = 64
# The request: HEADER_SIZE bytes, so that the (equally long) reply holds any server name.
REQUEST = b"meridio traffic probe\n".ljust(HEADER_SIZE, b".")

ProbeProgressCallback = Callable[[float, ProbeCounts], None]


class ProbeFailure(Exception):
    """An attempt failed for a reason without an errno; the message is its kind."""


@dataclass(frozen=True)
class Target:
    """A resolved address: what a fresh socket needs, or why it cannot have it."""

    address: HostPort
    family: int = socket.AF_INET
    proto: int = 0
    sockaddr: Any = None
    error: str | None = None


class ProbeRun:
    """Shared state of one probe run: the clock, the attempts and the counts so far."""

    def __init__(self, settings: ProbeSettings) -> None:
        self.settings = settings
        self.t0 = trio.current_time()
        self.attempts: list[ProbeAttempt] = []
        self.skipped: list[tuple[int, int]] = []
        self.ok = 0
        self.failed = 0
        self.in_flight = 0
        self.stopped_by: str | None = None
        self.scope: trio.CancelScope | None = None

    def now(self) -> float:
        return trio.current_time() - self.t0

    def counts(self) -> ProbeCounts:
        return ProbeCounts(
            attempts=self.ok + self.failed,
            ok=self.ok,
            failed=self.failed,
            skipped=sum(stop - start for start, stop in self.skipped),
            in_flight=self.in_flight,
        )

    def stop(self, reason: str) -> None:
        self.stopped_by = reason
        if self.scope is not None:
            self.scope.cancel()


def in_flight_cap() -> int:
    """:data:`IN_FLIGHT_CAP`, or fewer if the descriptor limit (once raised) is lower."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return IN_FLIGHT_CAP
    return max(1, min(IN_FLIGHT_CAP, soft - FD_RESERVE))


async def resolve(address: HostPort, kind: socket.SocketKind) -> Target:
    """Resolve once, before the run, so that attempts measure connections, not DNS."""
    try:
        infos = await trio.socket.getaddrinfo(address.host, address.port, type=kind)
    except OSError as exc:
        return Target(address, error=classify_error(exc))
    if not infos:
        return Target(address, error="resolve")
    family, _type, proto, _canon, sockaddr = infos[0]
    return Target(address, family, proto, sockaddr)


async def _tcp_once(target: Target) -> str:
    sock = trio.socket.socket(target.family, socket.SOCK_STREAM, target.proto)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect(target.sockaddr)
        sent = 0
        while sent < len(REQUEST):
            sent += await sock.send(REQUEST[sent:])
        head = b""
        # The name ends at its NUL; a name cut at 63 bytes fills the whole header.
        while b"\0" not in head and len(head) < HEADER_SIZE:
            data = await sock.recv(HEADER_SIZE - len(head))
            if not data:
                raise ProbeFailure("closed")
            head += data
        return parse_name(head)


async def _udp_once(target: Target) -> str:
    sock = trio.socket.socket(target.family, socket.SOCK_DGRAM, target.proto)
    with sock:
        await sock.connect(target.sockaddr)
        await sock.send(REQUEST)
        return parse_name(await sock.recv(65536))


async def attempt_once(target: Target, udp: bool, timeout: float) -> str:
    """One attempt: the name of the server that answered, or :class:`ProbeFailure`."""
    if target.error is not None:
        raise ProbeFailure(target.error)
    try:
        with trio.fail_after(timeout):
            return await (_udp_once(target) if udp else _tcp_once(target))
    except trio.TooSlowError:
        raise ProbeFailure("timeout") from None
    except OSError as exc:
        raise ProbeFailure(classify_error(exc)) from exc


async def _attempt(
    run: ProbeRun, attempt: ProbeAttempt, target: Target, slots: trio.Semaphore
) -> None:
    run.in_flight += 1
    try:
        host = await attempt_once(target, run.settings.udp, run.settings.connect_timeout)
    except ProbeFailure as exc:
        attempt.fail(run.now(), str(exc))
        run.failed += 1
    else:
        attempt.succeed(run.now(), host)
        run.ok += 1
    finally:
        run.in_flight -= 1
        slots.release()


async def _schedule(run: ProbeRun, targets: dict[HostPort, Target], nursery: trio.Nursery) -> None:
    settings = run.settings
    schedule = settings.schedule
    slots = trio.Semaphore(in_flight_cap())
    index = 0
    while index < schedule.count:
        await trio.sleep_until(run.t0 + schedule.due(index))
        await slots.acquire()
        now = run.now()
        if schedule.late(index, now):
            slots.release()
            resume = schedule.first_on_time(index, now)
            run.skipped.append((index, resume))
            index = resume
            continue
        address = settings.address(index)
        attempt = ProbeAttempt(index=index, address=str(address), started=now)
        run.attempts.append(attempt)
        nursery.start_soon(_attempt, run, attempt, targets[address], slots)
        index += 1


async def _monitor(run: ProbeRun, progress: ProbeProgressCallback, interval: float) -> None:
    k = 1
    while True:
        await trio.sleep_until(run.t0 + k * interval)
        progress(run.now(), run.counts())
        k += 1


async def _stop_on_signal(run: ProbeRun, signals: Any) -> None:
    async for signum in signals:
        run.stop(signal.Signals(signum).name)


async def run_probe(
    settings: ProbeSettings,
    progress: ProbeProgressCallback | None = None,
    progress_interval: float = 1.0,
    *,
    handle_signals: bool = True,
) -> dict[str, Any]:
    """Run the probe to the end and return its report (see ``core.build_probe_report``)."""
    raise_fd_limit()
    kind = socket.SOCK_DGRAM if settings.udp else socket.SOCK_STREAM
    targets = {a: await resolve(a, kind) for a in dict.fromkeys(settings.addresses)}
    started = datetime.now(UTC).isoformat(timespec="milliseconds")
    run = ProbeRun(settings)
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    with trio.open_signal_receiver(*signals) if signals else _no_signals() as receiver:
        async with trio.open_nursery() as outer:
            if progress is not None:
                outer.start_soon(_monitor, run, progress, progress_interval)
            if receiver is not None:
                outer.start_soon(_stop_on_signal, run, receiver)
            async with trio.open_nursery() as attempts:
                run.scope = attempts.cancel_scope
                await _schedule(run, targets, attempts)
            outer.cancel_scope.cancel()
    return build_probe_report(
        settings,
        run.attempts,
        run.skipped,
        started=started,
        elapsed=run.now(),
        stopped_by=run.stopped_by,
    )


@contextmanager
def _no_signals() -> Iterator[None]:
    yield None
