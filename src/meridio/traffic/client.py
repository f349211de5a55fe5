"""The traffic client: N long-lived connections at a steady total rate, then a report.

Each of the ``connections`` slots is one trio task that keeps one connection up for the whole
run: it connects, sends ``packet_size`` packets on its own schedule (the total rate spread evenly
over the slots, their packets interleaved), counts the echoes, and when the connection breaks it
reconnects (after a short, doubling delay) until it has used its retries. Every attempt is one
:class:`~meridio.traffic.core.ConnectionRecord`; the report is built from them.

A TCP connection is established when the handshake completes. It sends one packet at once (to
learn the server's name however slow its schedule), then follows the schedule. It is lost when
the server closes or resets it, or when a packet has waited for its echo longer than
``timeout``. Every (re)connect thus adds one packet to the schedule's, for UDP too (the probe).

A UDP "connection" is a flow from one local port (a connected UDP socket). It is established by
its first reply: it sends a probe at once and again every half second (at most four per
``connect_timeout``) until answered, and fails to connect if nothing comes back within
``connect_timeout``, or on an ICMP error. Once established it is lost on an ICMP error or when
at least three datagrams in a row went unanswered for longer than ``timeout`` (one missing echo
alone is ordinary UDP loss, not a broken flow).

When the duration is over (or on SIGINT/SIGTERM) the slots stop sending, wait up to
:data:`DRAIN` seconds for the echoes still on their way, and close.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from meridio.traffic.core import (
    HEADER_SIZE,
    TERMINAL,
    ConnectionRecord,
    HostPort,
    Pacer,
    ReplyWatch,
    Sampler,
    State,
    Totals,
    backoff,
    build_report,
    connection_interval,
    format_sockaddr,
    parse_name,
    start_offset,
)
from meridio.traffic.server import raise_fd_limit

DRAIN = 1.0
BUFFER = 65536
WATCH_INTERVAL = 0.1
UDP_PROBE_INTERVAL = 0.5
UDP_MIN_UNANSWERED = 3
RETRY_CAP = 1.0
# Offset of tcpi_total_retrans in Linux's struct tcp_info (8 one-byte fields, then 23 u32s).
TCP_INFO_TOTAL_RETRANS = 100

ProgressCallback = Callable[[float, Totals], None]


@dataclass(frozen=True)
class ClientSettings:
    addresses: tuple[HostPort, ...]
    udp: bool = False
    connections: int = 10
    rate: float = 100.0
    duration: float = 10.0
    packet_size: int = 1024
    reconnect: bool = True
    retries: int = 10
    retry_delay: float = 0.1
    connect_timeout: float = 2.0
    timeout: float = 3.0

    @property
    def protocol(self) -> str:
        return "udp" if self.udp else "tcp"

    def to_json(self) -> dict[str, Any]:
        return {
            "addresses": [str(a) for a in self.addresses],
            "protocol": self.protocol,
            "connections": self.connections,
            "rate": self.rate,
            "duration": self.duration,
            "packet_size": self.packet_size,
            "reconnect": self.reconnect,
            "retries": self.retries,
            "retry_delay": self.retry_delay,
            "connect_timeout": self.connect_timeout,
            "timeout": self.timeout,
        }


class Run:
    """Shared state of one client run: the clock, the records and the end of the send phase."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.t0 = trio.current_time()
        self.deadline = self.t0 + settings.duration
        self.records: list[ConnectionRecord] = []
        self.live: set[_Connection] = set()
        self.stopped_by: str | None = None
        self._scopes: set[trio.CancelScope] = set()

    def now(self) -> float:
        return trio.current_time() - self.t0

    @property
    def over(self) -> bool:
        return trio.current_time() >= self.deadline

    @contextmanager
    def active(self) -> Iterator[trio.CancelScope]:
        """A scope that ends with the send phase: at the deadline, or on :meth:`stop`."""
        scope = trio.CancelScope(deadline=self.deadline)
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def stop(self, reason: str) -> None:
        self.stopped_by = reason
        self.deadline = min(self.deadline, trio.current_time())
        for scope in list(self._scopes):
            scope.cancel()

    def totals(self) -> Totals:
        return Totals.of(self.records)


def describe(exc: BaseException) -> str:
    """A short reason for a connection's end, e.g. ``Connection reset by peer``."""
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            return describe(cause)
        return "connection broken" if isinstance(exc, trio.BrokenResourceError) else "closed"
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.errno:
        # Not exc.strerror: trio puts the whole "Error connecting to ...: ..." text in it.
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def sockname(sock: trio.socket.SocketType, peer: bool = False) -> str | None:
    """The socket's local (or peer) address as text; None once the socket is gone."""
    try:
        return format_sockaddr(sock.getpeername() if peer else sock.getsockname())
    except OSError:
        return None


async def open_socket(address: HostPort, kind: socket.SocketKind) -> trio.socket.SocketType:
    infos = await trio.socket.getaddrinfo(address.host, address.port, type=kind)
    if not infos:
        raise OSError(f"cannot resolve {address}")
    family, _type, proto, _canon, sockaddr = infos[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_retransmits(sock: trio.socket.SocketType) -> int:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0
    if len(info) < TCP_INFO_TOTAL_RETRANS + 4:
        return 0
    value: int = struct.unpack_from("=I", info, TCP_INFO_TOTAL_RETRANS)[0]
    return value


class _Connection:
    """What TCP and UDP connections share: pacing, stall watch, failure and drain."""

    min_unanswered = 1

    def __init__(self, run: Run, record: ConnectionRecord, index: int) -> None:
        settings = run.settings
        self.run = run
        self.record = record
        self.index = index
        self.size = settings.packet_size
        self.payload = bytes(range(256)) * (self.size // 256) + bytes(range(self.size % 256))
        self.interval = connection_interval(settings.rate, settings.connections)
        self.watch = ReplyWatch(settings.timeout, self.min_unanswered)
        self.error: str | None = None
        self.scope: trio.CancelScope | None = None
        self.sending_done = False
        self.drained = trio.Event()

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        if self.scope is not None:
            self.scope.cancel()

    def check(self, now: float) -> None:
        if self.record.state is State.ESTABLISHED and self.watch.stalled(now):
            self.fail(f"no reply for more than {self.run.settings.timeout:g}s")

    def pacer(self) -> Pacer:
        settings = self.run.settings
        offset = start_offset(self.index, settings.connections, self.interval)
        return Pacer(self.interval, due=trio.current_time() + offset)

    def conclude(self) -> None:
        if self.error is not None:
            self.record.fail(self.run.now(), self.error)
        else:
            self.record.finish(self.run.now())

    async def drain(self) -> None:
        self.sending_done = True
        self.check_drained()
        if self.error is None:
            with trio.move_on_after(DRAIN):
                await self.drained.wait()

    def check_drained(self) -> None:
        raise NotImplementedError


class _TcpConnection(_Connection):
    def __init__(self, run: Run, record: ConnectionRecord, index: int, stream: trio.SocketStream):
        super().__init__(run, record, index)
        self.stream = stream
        self.expected = 0  # bytes sent or being sent
        self.rx = 0

    async def run_connection(self) -> None:
        sock = self.stream.socket
        self.record.remote = sockname(sock, peer=True) or self.record.remote
        self.record.mark_connected(self.run.now(), sockname(sock))
        self.run.live.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self.scope = nursery.cancel_scope
                nursery.start_soon(self._receive)
                with self.run.active():
                    try:
                        await self._send()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        self.fail(describe(exc))
                await self.drain()
                nursery.cancel_scope.cancel()
        finally:
            self.run.live.discard(self)
            self.record.retransmits = tcp_retransmits(sock)
            await trio.aclose_forcefully(self.stream)
        self.conclude()

    async def _send(self) -> None:
        # One packet at once, to learn the server's name however slow the schedule is.
        pacer = self.pacer()
        await self._send_one(trio.current_time())
        while True:
            await trio.sleep_until(pacer.due)
            now = trio.current_time()
            self.record.dropped += pacer.take(now)
            await self._send_one(now)

    async def _send_one(self, now: float) -> None:
        self.expected += self.size
        self.watch.on_send(now)
        await self.stream.send_all(self.payload)
        self.record.sent += 1

    async def _receive(self) -> None:
        need = min(HEADER_SIZE, self.size)
        head = b""
        try:
            while True:
                data = await self.stream.receive_some(BUFFER)
                if not data:
                    self.fail("connection closed by the server")
                    return
                if len(head) < need:
                    head += data[: need - len(head)]
                    if len(head) >= need:
                        self.record.see_host(parse_name(head))
                self.rx += len(data)
                self.record.received = self.rx // self.size
                self.watch.on_reply(trio.current_time(), still_waiting=self.rx < self.expected)
                self.check_drained()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(describe(exc))

    def check_drained(self) -> None:
        if self.sending_done and self.rx >= self.expected:
            self.drained.set()


class _UdpConnection(_Connection):
    min_unanswered = UDP_MIN_UNANSWERED

    def __init__(
        self, run: Run, record: ConnectionRecord, index: int, sock: trio.socket.SocketType
    ):
        super().__init__(run, record, index)
        self.sock = sock
        self.answered = trio.Event()

    async def run_connection(self) -> None:
        self.run.live.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self.scope = nursery.cancel_scope
                nursery.start_soon(self._receive)
                with self.run.active():
                    try:
                        if await self._probe():
                            await self._send()
                        else:
                            timeout = self.run.settings.connect_timeout
                            self.fail(f"no reply within {timeout:g}s")
                    except OSError as exc:
                        self.fail(describe(exc))
                await self.drain()
                nursery.cancel_scope.cancel()
        finally:
            self.run.live.discard(self)
            self.sock.close()
        self.conclude()

    async def _send_one(self) -> None:
        self.watch.on_send(trio.current_time())
        try:
            await self.sock.send(self.payload)
        except OSError as exc:
            if exc.errno in (errno.ENOBUFS, errno.EAGAIN):
                self.record.dropped += 1
                return
            raise
        self.record.sent += 1

    async def _probe(self) -> bool:
        timeout = self.run.settings.connect_timeout
        interval = min(UDP_PROBE_INTERVAL, timeout / 4)
        with trio.move_on_after(timeout):
            while True:
                await self._send_one()
                with trio.move_on_after(interval):
                    await self.answered.wait()
                    return True
        return self.answered.is_set()

    async def _send(self) -> None:
        pacer = self.pacer()
        while True:
            await trio.sleep_until(pacer.due)
            self.record.dropped += pacer.take(trio.current_time())
            await self._send_one()

    async def _receive(self) -> None:
        while True:
            try:
                data = await self.sock.recv(BUFFER)
            except ConnectionRefusedError:
                self.fail("connection refused (port unreachable)")
                return
            except OSError as exc:
                self.fail(describe(exc))
                return
            self.record.see_host(parse_name(data))
            if self.record.state is State.CONNECTING:
                self.record.mark_connected(self.run.now())
                self.answered.set()
            self.record.received += 1
            self.watch.on_reply(trio.current_time())
            self.check_drained()

    def check_drained(self) -> None:
        if self.sending_done and self.record.received >= self.record.sent:
            self.drained.set()


async def _attempt(run: Run, record: ConnectionRecord, address: HostPort, index: int) -> None:
    settings = run.settings
    kind = socket.SOCK_DGRAM if settings.udp else socket.SOCK_STREAM
    sock: trio.socket.SocketType | None = None
    with run.active():
        try:
            with trio.fail_after(settings.connect_timeout):
                sock = await open_socket(address, kind)
        except trio.TooSlowError:
            record.fail(run.now(), f"connect timed out after {settings.connect_timeout:g}s")
            return
        except OSError as exc:
            record.fail(run.now(), f"connect: {describe(exc)}")
            return
    if sock is None:
        record.finish(run.now())  # the run ended while connecting
        return
    if settings.udp:
        record.local = sockname(sock)
        record.remote = sockname(sock, peer=True) or record.remote
        await _UdpConnection(run, record, index, sock).run_connection()
    else:
        stream = trio.SocketStream(sock)
        await _TcpConnection(run, record, index, stream).run_connection()


async def _slot(run: Run, index: int) -> None:
    settings = run.settings
    attempt = 0
    while not run.over:
        # Each reconnect goes to the next address, so a slot can move off a dead server.
        address = settings.addresses[(index + attempt) % len(settings.addresses)]
        record = ConnectionRecord(
            id=index,
            attempt=attempt,
            protocol=settings.protocol,
            remote=str(address),
            started=run.now(),
        )
        run.records.append(record)
        await _attempt(run, record, address, index)
        if record.state in (State.LASTED, State.ABORTED):
            return
        if not settings.reconnect or attempt >= settings.retries:
            return
        attempt += 1
        with run.active():
            await trio.sleep(backoff(attempt, settings.retry_delay, RETRY_CAP))


async def _watchdog(run: Run) -> None:
    while True:
        await trio.sleep(WATCH_INTERVAL)
        now = trio.current_time()
        for conn in list(run.live):
            conn.check(now)


async def _monitor(
    run: Run, sampler: Sampler, progress: ProgressCallback | None, progress_interval: float
) -> None:
    tick = min(progress_interval, 1.0) if progress is not None else 1.0
    next_sample = 1.0
    k = 1
    while True:
        await trio.sleep_until(run.t0 + k * tick)
        elapsed = k * tick
        totals = run.totals()
        if elapsed >= next_sample - 1e-9:
            sampler.sample(next_sample, totals)
            next_sample += 1.0
        if progress is not None:
            progress(run.now(), totals)
        k += 1


async def _stop_on_signal(run: Run, signals: Any) -> None:
    async for signum in signals:
        run.stop(signal.Signals(signum).name)


async def run_client(
    settings: ClientSettings,
    progress: ProgressCallback | None = None,
    progress_interval: float = 1.0,
    *,
    handle_signals: bool = True,
) -> dict[str, Any]:
    """Run the client to the end and return its report (see ``core.build_report``)."""
    raise_fd_limit()
    started = datetime.now(UTC).isoformat(timespec="milliseconds")
    run = Run(settings)
    sampler = Sampler()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    with trio.open_signal_receiver(*signals) if signals else _no_signals() as receiver:
        async with trio.open_nursery() as outer:
            outer.start_soon(_monitor, run, sampler, progress, progress_interval)
            outer.start_soon(_watchdog, run)
            if receiver is not None:
                outer.start_soon(_stop_on_signal, run, receiver)
            async with trio.open_nursery() as slots:
                for index in range(settings.connections):
                    slots.start_soon(_slot, run, index)
            outer.cancel_scope.cancel()
    elapsed = run.now()
    for record in run.records:
        if record.state not in TERMINAL:
            record.finish(elapsed)
    totals = run.totals()
    last_time = sampler.samples[-1]["time"] if sampler.samples else 0.0
    if elapsed - last_time > 1e-3:
        sampler.sample(elapsed, totals)
    report = build_report(
        settings.to_json(), run.records, sampler.samples, started=started, elapsed=elapsed
    )
    report["stopped_by"] = run.stopped_by
    return report


@contextmanager
def _no_signals() -> Iterator[None]:
    yield None
