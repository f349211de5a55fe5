"""Load and watchers made with grpcio (gRPC's C core), each in a spawned process of its own.

A grpclib client spends about as much CPU on a call as the daemon spends serving it; on a
2-vCPU machine the load generator then takes the CPU the daemon is being measured for. grpcio
clients cost a fraction of that, so rates measured with them say more about the daemon. Requests
and replies are bytes, encoded beforehand: nothing here depends on the messages.

grpcio is imported only in the spawned processes (never in the benchmark's own process, which
forks other load generators, and grpcio does not survive a fork).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

from tests.netns.daemons import run_in_processes

_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel


def _unary_worker(
    target: str, path: str, parts: list[list[bytes]], barrier: Any, results: Any
) -> None:
    import grpc

    async def main() -> tuple[float, float, list[float]]:
        channels = [grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) for _ in parts]
        calls = [ch.unary_unary(path) for ch in channels]  # no serializers: bytes in and out
        latencies: list[float] = []
        try:
            for call, part in zip(calls, parts, strict=True):
                await call(part[0], timeout=60)  # connects; off the clock
            barrier.wait(120)
            started = time.monotonic()

            async def run(call: Any, part: list[bytes]) -> None:
                for request in part[1:]:
                    t0 = time.perf_counter()
                    await call(request, timeout=60)
                    latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(run(c, p) for c, p in zip(calls, parts, strict=True)))
            return started, time.monotonic(), latencies
        finally:
            for ch in channels:
                await ch.close()

    try:
        started, ended, latencies = asyncio.run(main())
        results.put((started, ended, latencies, None))
    except BaseException as exc:
        results.put((0.0, 0.0, [], f"{type(exc).__name__}: {exc}"))
        barrier.abort()


def run_unary(
    target: str, path: str, plan: list[list[bytes]], processes: int
) -> tuple[int, float, list[float]]:
    """Each process runs its share of the plan's tasks (a list of requests each, sent in order
    on a connection of its own; the first one off the clock); (calls on the clock, seconds from
    the moment every process is connected until the last reply, latency of each call)."""
    got = run_in_processes(
        multiprocessing.get_context("spawn"),
        _unary_worker,
        [(target, path, plan[i::processes]) for i in range(processes)],
        ready_timeout=120,
        result_timeout=600,
    )
    latencies = [x for g in got for x in g[2]]
    return len(latencies), max(g[1] for g in got) - min(g[0] for g in got), latencies


def _watch_worker(target: str, path: str, request: bytes, n: int, conn: Connection) -> None:
    import grpc

    async def main() -> None:
        channels = [grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) for _ in range(n)]
        last: list[bytes | None] = [None] * n
        counts = [0] * n

        async def watch(k: int, ch: Any) -> None:
            async for message in ch.unary_stream(path)(request):
                last[k] = message
                counts[k] += 1

        tasks = [asyncio.create_task(watch(k, ch)) for k, ch in enumerate(channels)]
        loop = asyncio.get_running_loop()
        try:
            while True:
                command = await loop.run_in_executor(None, conn.recv)
                if command == "stop":
                    return
                failed = [t for t in tasks if t.done()]
                if failed:
                    conn.send(("error", repr(failed[0].exception())))
                elif command == "counts":
                    conn.send(("ok", list(counts)))
                else:  # ("has", expected bytes)
                    conn.send(("ok", all(message == command[1] for message in last)))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ch in channels:
                await ch.close()

    asyncio.run(main())


class Watchers:
    """``n`` server streams of ``path`` with ``request``, in a spawned process."""

    def __init__(self, target: str, path: str, request: bytes, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_watch_worker, args=(target, path, request, n, child))

    def _ask(self, command: Any) -> Any:
        self._conn.send(command)
        if not self._conn.poll(60):
            raise RuntimeError("watchers do not answer")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"a watch stream failed: {value}")
        return value

    def __enter__(self) -> Watchers:
        self._proc.start()
        deadline = time.monotonic() + 60
        while not all(self.counts()):
            if time.monotonic() > deadline:
                raise RuntimeError("watchers did not all get their first message")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
        finally:
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()

    def counts(self) -> list[int]:
        """Messages received so far on each stream."""
        return list(self._ask("counts"))

    def all_have(self, expected: bytes) -> bool:
        """Whether the last message of every stream is ``expected``."""
        return bool(self._ask(("has", expected)))
