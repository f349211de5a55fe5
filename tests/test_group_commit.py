"""Group commit (meridio.runtime.commit): batching, waiting from asyncio and trio, failures."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest
import trio
import trio.testing
import trio_asyncio

from meridio.runtime.commit import GroupCommit


@dataclass(frozen=True)
class FakeBatch:
    seq: int
    items: tuple[int, ...]


class FakeJournal:
    """Items staged in an open batch; ``write`` can be held at a gate and made to fail."""

    def __init__(self) -> None:
        self.open: list[int] = []
        self.seq = 1
        self.inflight: FakeBatch | None = None
        self.written: list[tuple[int, ...]] = []
        self.committed: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.sealed = trio.Event()
        self.fail_next = False

    def stage(self, item: int) -> int:
        self.open.append(item)
        return self.seq

    def seal(self) -> FakeBatch | None:
        assert self.inflight is None
        if not self.open:
            return None
        batch = FakeBatch(self.seq, tuple(self.open))
        self.open, self.seq, self.inflight = [], self.seq + 1, batch
        self.sealed.set()
        return batch

    def write(self, batch: FakeBatch) -> None:
        assert threading.current_thread() is not threading.main_thread()  # off the loop
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk on fire")
        self.written.append(batch.items)

    def finish(self, batch: FakeBatch, error: BaseException | None) -> tuple[int, ...]:
        self.inflight = None
        if error is None:
            self.committed.update(batch.items)
            return ()
        failed = (batch.seq, self.seq)
        self.open, self.seq = [], self.seq + 1
        return failed


async def test_changes_made_during_a_commit_share_the_next_one(aio_loop: object) -> None:
    journal = FakeJournal()
    commits = GroupCommit(journal, name="fake")
    seen_committed: list[bool] = []

    async def request(item: int) -> None:  # asyncio side, like a gRPC handler
        await commits.wait(journal.stage(item))
        seen_committed.append(item in journal.committed)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commits.run)
        journal.gate.clear()
        nursery.start_soon(trio_asyncio.aio_as_trio(request), 0)
        await journal.sealed.wait()  # batch 1 (item 0) is being written, held at the gate

        async def many() -> None:
            await asyncio.gather(*(request(i) for i in range(1, 50)))

        async with trio.open_nursery() as clients:
            clients.start_soon(trio_asyncio.aio_as_trio(many))
            await trio.testing.wait_all_tasks_blocked()
            assert len(journal.open) == 49  # all staged, waiting
            assert journal.written == [] and seen_committed == []
            journal.gate.set()
        nursery.cancel_scope.cancel()
    assert journal.written == [(0,), tuple(range(1, 50))]
    assert commits.commits == 2
    assert seen_committed == [True] * 50  # nobody was answered before its commit


async def test_a_failed_commit_fails_its_waiters_and_the_next_batch_works(
    aio_loop: object,
) -> None:
    journal = FakeJournal()
    commits = GroupCommit(journal, name="fake")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commits.run)
        journal.fail_next = True
        with pytest.raises(OSError, match="disk on fire"):
            await commits.wait_trio(journal.stage(1))

        async def aio_waiter() -> None:
            await commits.wait(1)  # already failed: raises at once

        with pytest.raises(OSError):
            await trio_asyncio.aio_as_trio(aio_waiter)()
        seq = journal.stage(2)
        assert seq == 3  # the open batch (2) failed with batch 1
        await commits.wait_trio(seq)
        await commits.wait_trio(seq)  # already done: returns at once
        assert journal.written == [(2,)]
        nursery.cancel_scope.cancel()


async def test_cancelled_waiter_does_not_break_the_writer(aio_loop: object) -> None:
    journal = FakeJournal()
    commits = GroupCommit(journal, name="fake")

    async def impatient() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(commits.wait(journal.stage(1)), 0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commits.run)
        journal.gate.clear()
        await trio_asyncio.aio_as_trio(impatient)()
        journal.gate.set()
        await commits.wait_trio(journal.stage(2))
        nursery.cancel_scope.cancel()
    assert journal.committed == {1, 2}  # the change of the cancelled call was still written
