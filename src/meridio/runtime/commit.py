"""Group commit: one writer task commits batches of changes off the event loop.

A store that wants group commit (the NSP registry, the IPAM allocator) applies each change in
memory at once and puts it in its open batch, numbered by a sequence number; the caller then
waits for that number. The writer seals the open batch, writes it in a worker thread
(``trio.to_thread``: the fsync never blocks the event loop) and, once it is on disk, releases
every caller waiting for it. Changes made while a batch is being written go into the next one,
so a single fsync serves all of them: the more callers, the bigger the batches, and the reply
still comes only after the change is committed.

Callers wait from the asyncio side (gRPC handlers, :meth:`GroupCommit.wait`) or from trio
(:meth:`GroupCommit.wait_trio`); both run on the trio thread.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio

from meridio.runtime.logs import get_logger

__all__ = ["GroupCommit", "Journal"]

log = get_logger("meridio.commit")


class _Sealed(Protocol):
    @property
    def seq(self) -> int: ...


B = TypeVar("B", bound=_Sealed)


class Journal(Protocol[B]):
    """What :class:`GroupCommit` drives (see :class:`meridio.store.registry.PersistentRegistry`)."""

    def seal(self) -> B | None:
        """Close the open batch and return it; None when there is nothing to write."""

    def write(self, batch: B) -> None:
        """Write the batch (called in a worker thread; must not touch the in-memory state)."""

    def finish(self, batch: B, error: BaseException | None) -> tuple[int, ...]:
        """Record the outcome; the sequence numbers that failed (empty on success)."""


_KEEP_FAILED = 64
SWITCH_INTERVAL = 0.0005
GATHER_PASSES = 3
"""Scheduler passes the writer lets run before it seals a batch (see :meth:`GroupCommit.run`)."""


class GroupCommit(Generic[B]):
    """The writer task (:meth:`run`) and the waiters of one :class:`Journal`."""

    def __init__(
        self,
        journal: Journal[B],
        *,
        name: str,
        on_commit: Callable[[B], None] | None = None,
    ) -> None:
        self.journal = journal
        self.name = name
        self.on_commit = on_commit
        self.done_upto = 0
        """Every sequence number up to this one is committed or failed."""
        self.commits = 0
        self._wake = trio.Event()
        self._failed: dict[int, BaseException] = {}
        self._aio: dict[int, list[asyncio.Future[None]]] = {}
        self._trio: dict[int, trio.Event] = {}

    def request(self) -> None:
        """Make the writer commit what is pending (callable from trio or asyncio code)."""
        self._wake.set()

    def _outcome(self, seq: int) -> BaseException | None:
        return self._failed.get(seq)

    async def wait(self, seq: int) -> None:
        """asyncio side: return once batch ``seq`` is committed; raise its write error if not."""
        if seq > self.done_upto:
            future = asyncio.get_running_loop().create_future()
            self._aio.setdefault(seq, []).append(future)
            self.request()
            await future
            return
        error = self._outcome(seq)
        if error is not None:
            raise error

    async def wait_trio(self, seq: int) -> None:
        """trio side: as :meth:`wait`."""
        if seq > self.done_upto:
            event = self._trio.get(seq)
            if event is None:
                event = self._trio[seq] = trio.Event()
            self.request()
            await event.wait()
        error = self._outcome(seq)
        if error is not None:
            raise error

    def _resolve(self, upto: int) -> None:
        self.done_upto = max(self.done_upto, upto)
        for seq in [s for s in self._aio if s <= upto]:
            error = self._failed.get(seq)
            for future in self._aio.pop(seq):
                if future.done():  # the waiting call was cancelled
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
        for seq in [s for s in self._trio if s <= upto]:
            self._trio.pop(seq).set()
        while len(self._failed) > _KEEP_FAILED:
            del self._failed[min(self._failed)]

    async def run(self) -> None:
        """The writer: commit batches, one at a time, whenever something is pending."""
        # The worker thread needs the GIL back after each fsync while the event loop keeps it
        # busy; CPython hands it over only every switch interval (5 ms by default), which would
        # add that much to every commit under load.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        journal = self.journal
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # Requests whose bytes have already arrived get a few scheduler passes to reach
            # the batch too (each pass polls the sockets and runs what became ready): under
            # load batches grow, and there are fewer commits and watcher wake-ups per change.
            for _ in range(GATHER_PASSES):
                await trio.sleep(0)
            while (batch := journal.seal()) is not None:
                error: BaseException | None = None
                # A batch being written is finished even when the writer is cancelled, so its
                # waiters and the in-memory state learn how it went.
                with trio.CancelScope(shield=True):
                    try:
                        await trio.to_thread.run_sync(journal.write, batch)
                    except Exception as exc:
                        error = exc
                    failed = journal.finish(batch, error)
                if error is None:
                    self.commits += 1
                    if self.on_commit is not None:
                        self.on_commit(batch)
                    self._resolve(batch.seq)
                else:
                    log.error(
                        "commit failed; its changes are undone",
                        store=self.name,
                        error=str(error),
                        batches=list(failed),
                    )
                    for seq in failed:
                        self._failed[seq] = error
                    self._resolve(max(failed, default=batch.seq))
