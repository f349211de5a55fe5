"""Start ``meridiod`` inside a test's network namespace and talk to it over unix sockets.

Every daemon runs under ``ip netns exec`` (``Netns.popen``) and listens on unix sockets under
the test's ``tmp_path``, so the test process reaches it without any route into the namespace.
Readiness is the daemon's own ``grpc.health.v1`` ``Readiness`` probe on ``<run-dir>/health.sock``.

Waits are bounded by ``tests.waiting.HANG`` unless a caller gives its own bound: a bound that
turns a hang into a failure, never a performance goal.

Clients are plain asyncio + grpclib; :func:`aio_test` turns an ``async def`` test into a sync one
run on a plain asyncio loop (the project's pytest-trio mode is for trio tests only).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpclib
from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError

from meridio.api.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponseServingStatus,
    HealthStub,
)
from tests.waiting import HANG

MERIDIOD = str(Path(sys.executable).parent / "meridiod")
SERVING = HealthCheckResponseServingStatus.SERVING
NOT_SERVING = HealthCheckResponseServingStatus.NOT_SERVING
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107
# Addresses for IPAM tests and benchmarks: benchmarking range and ULA only.
IPAM_PREFIXES = ("--prefix-ipv4=198.18.0.0/16", "--prefix-ipv6=fd00:10::/48")
# Roles with a ``database`` setting (given a file in the daemon's workdir).
ROLES_WITH_DATABASE = frozenset({"ipam", "nsp"})

T = TypeVar("T")


def run_async(coro: Awaitable[T]) -> T:
    """``asyncio.run`` on a plain selector loop.

    Importing trio_asyncio (the test suite's conftest does) installs its event loop policy, so a
    bare ``asyncio.run`` would run on trio-asyncio's synchronous loop; the clients here do not
    need trio and should not pay for it.
    """
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def aio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an ``async def`` test (its fixtures are passed through) with :func:`run_async`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        run_async(fn(*args, **kwargs))

    return wrapper


class DaemonExited(AssertionError):
    """The daemon exited while it was expected to run."""


class Daemon:
    """One ``meridiod --role=ROLE`` process in a namespace, restartable on the same state.

    ``workdir`` holds ``run/`` (the run-dir, with health.sock), ``<role>.sock`` (the service
    socket), ``<role>.db`` (the database) and ``<role>.log`` (stderr of every start, appended).
    """

    def __init__(
        self,
        netns: Any,
        role: str,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.netns = netns
        self.role = role
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(args)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        for path in (self.health_socket, self.socket):
            if len(str(path)) > MAX_UNIX_PATH:
                raise ValueError(f"unix socket path too long for the kernel: {path}")

    # -- paths

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def health_socket(self) -> Path:
        return self.run_dir / "health.sock"

    @property
    def socket(self) -> Path:
        return self.workdir / f"{self.role}.sock"

    @property
    def database(self) -> Path:
        return self.workdir / f"{self.role}.db"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.role}.log"

    @property
    def argv(self) -> list[str]:
        """The command line; later ``--name=value`` flags in ``args`` override earlier ones."""
        argv = [
            MERIDIOD,
            f"--role={self.role}",
            f"--run-dir={self.run_dir}",
            f"--listen=unix://{self.socket}",
        ]
        if self.role in ROLES_WITH_DATABASE:
            argv.append(f"--database={self.database}")
        return [*argv, "--log-format=json", *self.extra_args]

    # -- life cycle

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process (does not wait for readiness)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("daemon already running")
        # Plain text unless the test asks for TLS (--tls-dir, or MERIDIOD_INSECURE in env):
        # the suite's daemons talk over TCP inside their namespaces without certificates.
        env = {**os.environ, "MERIDIOD_INSECURE": "true", **(self.env or {})}
        with self.log_path.open("ab") as log:
            self.proc = self.netns.popen(
                *self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def ready(self, timeout: float = HANG) -> None:
        """Wait until Readiness is SERVING on the health socket; fail if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise DaemonExited(
                    f"meridiod --role={self.role} exited with {self.returncode()} "
                    f"before it was ready:\n{self.log_text()}"
                )
            if await health_status(self.health_socket, "Readiness", timeout=0.5) == SERVING:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"meridiod --role={self.role} not ready within {timeout}s:\n{self.log_text()}"
                )
            await asyncio.sleep(0.02)

    async def start(self, timeout: float = HANG) -> Daemon:
        self.spawn()
        await self.ready(timeout)
        return self

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    async def wait_exit(self, timeout: float) -> int:
        """Wait (without blocking the event loop) for the process to exit; its exit status."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"meridiod --role={self.role} still running after {timeout}s")
            await asyncio.sleep(0.01)
        return self.proc.returncode

    async def stop(self, timeout: float = HANG) -> int:
        """SIGTERM and wait for the exit status."""
        self.signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL (no clean-up at all) and reap."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    async def restart(self, timeout: float = HANG) -> None:
        """Start again on the same database, run-dir and sockets."""
        await self.start(timeout)

    # -- logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other lines are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    async def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = HANG
    ) -> dict[str, Any]:
        """The first JSON log record matching ``predicate``, waiting for it if needed."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.log_records():
                if predicate(record):
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching log line within {timeout}s:\n{self.log_text()}")
            await asyncio.sleep(0.02)


# -- gRPC helpers -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def channel(path: Path | str) -> AsyncIterator[Channel]:
    """A grpclib channel to a unix socket, closed afterwards."""
    ch = Channel(path=str(path))
    try:
        yield ch
    finally:
        ch.close()


async def health_status(
    socket: Path | str, service: str = "Readiness", timeout: float = 1.0
) -> HealthCheckResponseServingStatus | None:
    """The status of ``service`` via grpc.health.v1 Check, or None if there is no answer."""
    if not Path(socket).exists():
        return None
    try:
        async with channel(socket) as ch:
            reply = await HealthStub(ch).check(HealthCheckRequest(service=service), timeout=timeout)
            return reply.status
    except (TimeoutError, OSError, grpclib.GRPCError, StreamTerminatedError):
        return None


class StreamEnded(Exception):
    """The server closed a watched stream normally."""


class Watcher:
    """Consume one server stream in a task and hand its messages out one at a time.

    A stream failure is delivered in order, as the exception :meth:`next` raises.
    """

    def __init__(self, open_stream: Callable[[], AsyncIterator[Any]]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(open_stream))

    async def _pump(self, open_stream: Callable[[], AsyncIterator[Any]]) -> None:
        try:
            async for message in open_stream():
                self._queue.put_nowait(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._queue.put_nowait(exc)
        else:
            self._queue.put_nowait(StreamEnded())

    async def next(self, timeout: float = HANG) -> Any:
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no stream message within {timeout}s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def until(self, predicate: Callable[[Any], bool], timeout: float = HANG) -> Any:
        """Skip messages until one satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching stream message within {timeout}s")
            message = await self.next(left)
            if predicate(message):
                return message

    async def assert_quiet(self, period: float = 0.5) -> None:
        """Nothing (message, error or end) arrives for ``period`` seconds."""
        try:
            item = await asyncio.wait_for(self._queue.get(), period)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected stream item: {item!r}")

    async def end(self, timeout: float = HANG) -> BaseException:
        """Wait for the stream to fail or end; the exception that ended it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"stream still open after {timeout}s")
            try:
                await self.next(left)
            except AssertionError:
                raise
            except Exception as exc:
                return exc

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


@contextlib.asynccontextmanager
async def watching(open_stream: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Watcher]:
    watcher = Watcher(open_stream)
    try:
        yield watcher
    finally:
        await watcher.close()


async def grpc_error(call: Awaitable[Any]) -> grpclib.GRPCError:
    """Await a call that must fail with a gRPC status; return the error."""
    try:
        result = await call
    except grpclib.GRPCError as exc:
        return exc
    raise AssertionError(f"call succeeded with {result!r}, expected a gRPC error")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def chunks(items: list[T], n: int) -> Iterator[list[T]]:
    """Split ``items`` into ``n`` interleaved parts."""
    for i in range(n):
        yield items[i::n]


# -- load generation (benchmarks) ---------------------------------------------------------------


@contextlib.contextmanager
def bench_netns(prefix: str = "mbench-") -> Iterator[Any]:
    """A namespace (loopback up) for a benchmark run outside pytest, removed afterwards.

    Not ``mtest-``: a pytest session started meanwhile (the suite's conftest) reaps every
    ``mtest-`` namespace and its processes as stale.
    """
    from tests.conftest import Netns

    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    ns = Netns(name)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        ns.close()


CallFactory = Callable[[Channel], Callable[[Any], Awaitable[Any]]]


def _load_worker(
    socket: str,
    make_call: CallFactory,
    warmup: Callable[[Channel], Awaitable[Any]],
    parts: list[list[Any]],
    barrier: Any,
    results: Any,
) -> None:
    async def main() -> tuple[float, float]:
        channels = [Channel(path=socket) for _ in parts]
        try:
            for ch in channels:
                await warmup(ch)  # connect before the clock starts
            barrier.wait(60)
            started = time.monotonic()

            async def run(ch: Channel, part: list[Any]) -> None:
                call = make_call(ch)
                for item in part:
                    await call(item)

            await asyncio.gather(*(run(ch, part) for ch, part in zip(channels, parts, strict=True)))
            return started, time.monotonic()
        finally:
            for ch in channels:
                ch.close()

    try:
        started, ended = run_async(main())
        results.put((started, ended, sum(len(p) for p in parts), None))
    except BaseException as exc:
        results.put((0.0, 0.0, 0, f"{type(exc).__name__}: {exc}"))
        barrier.abort()


def run_in_processes(
    ctx: Any,
    target: Callable[..., None],
    per_process: Sequence[tuple[Any, ...]],
    *,
    ready_timeout: float,
    result_timeout: float,
) -> list[tuple[Any, ...]]:
    """One process of ``ctx`` per argument tuple, each running ``target(*args, barrier,
    results)``: it gets ready (connects), waits at the barrier so that all start together, and
    puts one tuple on ``results`` whose last item is an error text or None. The tuples, in the
    order they came; RuntimeError with the first error."""
    barrier = ctx.Barrier(len(per_process) + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in per_process]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(ready_timeout)
        got = [results.get(timeout=result_timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    errors = [error for *_, error in got if error]
    if errors:
        raise RuntimeError(f"load process failed: {errors[0]}")
    return got


def measure_rate(
    socket: Path | str,
    make_call: CallFactory,
    items: list[Any],
    *,
    processes: int,
    tasks: int,
    warmup: Callable[[Channel], Awaitable[Any]],
) -> tuple[int, float]:
    """Run one call per item over ``processes`` x ``tasks`` connections; (calls, seconds).

    Each client process (forked) opens ``tasks`` channels and runs one task per channel, each
    calling sequentially; the clock runs from the moment every process is connected until the
    last call of the last process has returned.
    """
    import multiprocessing

    parts = list(chunks(items, processes * tasks))
    got = run_in_processes(
        multiprocessing.get_context("fork"),
        _load_worker,
        [(str(socket), make_call, warmup, parts[i::processes]) for i in range(processes)],
        ready_timeout=60,
        result_timeout=300,
    )
    started = min(g[0] for g in got)
    ended = max(g[1] for g in got)
    return sum(g[2] for g in got), ended - started


class RawCodec:
    """A grpclib codec that leaves received messages as bytes (clients that only count)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


async def raw_watch(
    ch: Channel, path: str, request: Any, on_message: Callable[[bytes], None]
) -> None:
    """Open the server stream ``path`` with ``request`` and call ``on_message`` with each raw
    message until cancelled (``ch`` should use :class:`RawCodec`)."""
    from grpclib.const import Cardinality

    async with ch.request(path, Cardinality.UNARY_STREAM, type(request), bytes) as stream:
        await stream.send_message(request, end=True)
        while True:
            message = await stream.recv_message()
            if message is None:
                return
            on_message(message)
