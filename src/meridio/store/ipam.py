"""sqlite persistence of the IPAM allocator state, plus the :class:`PersistentIpam` facade.

The database holds exactly the allocator's state: conduit prefixes, node prefixes and children,
each with its timestamp. It is opened with ``journal_mode=WAL`` and ``synchronous=FULL``, so a
committed transaction survives a kill -9 or a power cut; :class:`PersistentIpam` returns an
address only after the transaction that records it has committed.

Writes are the allocator's change records (:data:`meridio.core.ipam.Change`), the records of
many requests in one transaction (group commit, see :class:`PersistentIpam`): a request is
answered only once the transaction holding its records has committed. When a commit fails,
memory is reloaded from the database, so memory and disk never disagree for long and never on
anything answered.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from types import TracebackType
from typing import TypeVar

from meridio.core.ipam import (
    Change,
    ChildAdded,
    ChildInfo,
    ChildKey,
    ChildRefreshed,
    ChildRemoved,
    ConduitKey,
    ConduitPrefixAdded,
    ConduitPrefixRemoved,
    IpamAllocator,
    IpamConfig,
    IpamError,
    IpFamily,
    NodeKey,
    NodePrefixAdded,
    NodePrefixRefreshed,
    NodePrefixRemoved,
    parse_family,
)

__all__ = ["SCHEMA_VERSION", "IpamBatch", "IpamStore", "IpamStoreError", "PersistentIpam"]

#: Version of the database layout written by this module.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE conduit_prefix (
    family  TEXT NOT NULL CHECK (family IN ('ipv4', 'ipv6')),
    trench  TEXT NOT NULL,
    conduit TEXT NOT NULL,
    prefix  TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (family, trench, conduit),
    UNIQUE (family, trench, prefix)
);
CREATE TABLE node_prefix (
    family  TEXT NOT NULL CHECK (family IN ('ipv4', 'ipv6')),
    trench  TEXT NOT NULL,
    conduit TEXT NOT NULL,
    node    TEXT NOT NULL,
    prefix  TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (family, trench, conduit, node),
    UNIQUE (family, trench, prefix)
);
CREATE TABLE child (
    family  TEXT NOT NULL CHECK (family IN ('ipv4', 'ipv6')),
    trench  TEXT NOT NULL,
    conduit TEXT NOT NULL,
    node    TEXT NOT NULL,
    name    TEXT NOT NULL,
    address TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (family, trench, conduit, node, name),
    UNIQUE (family, trench, address)
);
"""

_T = TypeVar("_T")


class IpamStoreError(IpamError):
    """The database cannot be opened, read or written (the request changed nothing)."""


class IpamStore:
    """The sqlite database of one IPAM instance.

    Not thread-safe by itself: callers serialise access (as :class:`PersistentIpam` does). The
    connection may be used from another thread than the one that opened it (e.g. a trio worker
    thread).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise IpamStoreError(f"cannot open IPAM database {self.path}: {exc}") from exc
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- connection

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise IpamStoreError(f"IPAM database {self.path} is closed")
        return self._conn

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the database (a checkpoint of the WAL happens here). Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> IpamStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _setup(self) -> None:
        conn = self.conn
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                raise IpamStoreError(
                    f"IPAM database {self.path}: cannot enable WAL journal mode (got {mode!r})"
                )
            conn.execute("PRAGMA synchronous=FULL")
            with self._transaction():
                exists = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
                ).fetchone()
                if exists is None:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,)
                    )
                else:
                    row = conn.execute("SELECT version FROM schema_version").fetchone()
                    if row is None or row[0] != SCHEMA_VERSION:
                        found = None if row is None else row[0]
                        raise IpamStoreError(
                            f"IPAM database {self.path} has schema version {found}, "
                            f"this program supports version {SCHEMA_VERSION}"
                        )
        except sqlite3.Error as exc:
            raise IpamStoreError(f"cannot open IPAM database {self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # ---------------------------------------------------------------- reading

    @property
    def schema_version(self) -> int:
        row = self.conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0])

    def load(self) -> list[Change]:
        """The stored state as ``*Added`` records, parents first (see ``IpamAllocator.records``)."""
        try:
            return self._load()
        except sqlite3.Error as exc:
            raise IpamStoreError(f"cannot read IPAM database {self.path}: {exc}") from exc

    def _load(self) -> list[Change]:
        conn = self.conn
        records: list[Change] = []
        # One read transaction, so the three tables are read from the same snapshot.
        conn.execute("BEGIN")
        try:
            for row in conn.execute(
                "SELECT family, trench, conduit, prefix, updated FROM conduit_prefix "
                "ORDER BY family, trench, conduit"
            ):
                family, trench, conduit, prefix, updated = row
                records.append(
                    ConduitPrefixAdded(
                        ConduitKey(_family(row, family), trench, conduit),
                        _parse(row, ip_network, prefix),
                        float(updated),
                    )
                )
            for row in conn.execute(
                "SELECT family, trench, conduit, node, prefix, updated FROM node_prefix "
                "ORDER BY family, trench, conduit, node"
            ):
                family, trench, conduit, node, prefix, updated = row
                records.append(
                    NodePrefixAdded(
                        NodeKey(_family(row, family), trench, conduit, node),
                        _parse(row, ip_network, prefix),
                        float(updated),
                    )
                )
            for row in conn.execute(
                "SELECT family, trench, conduit, node, name, address, updated FROM child "
                "ORDER BY family, trench, conduit, node, name"
            ):
                family, trench, conduit, node, name, address, updated = row
                records.append(
                    ChildAdded(
                        ChildKey(_family(row, family), trench, conduit, node, name),
                        _parse(row, ip_address, address),
                        float(updated),
                    )
                )
        finally:
            conn.execute("COMMIT")
        return records

    def load_allocator(self, config: IpamConfig) -> IpamAllocator:
        """A fresh allocator holding the stored state.

        Raises :class:`meridio.core.ipam.IpamStateError` when the stored state does not fit
        ``config`` (e.g. the node prefix length was changed after addresses were handed out).
        """
        return IpamAllocator.from_records(config, self.load())

    # ---------------------------------------------------------------- writing

    def apply(self, changes: Sequence[Change]) -> None:
        """Write ``changes`` in one transaction: all of them or, on error, none."""
        if not changes:
            return
        try:
            with self._transaction() as conn:
                for change in changes:
                    self._write(conn, change)
        except sqlite3.Error as exc:
            raise IpamStoreError(f"cannot write IPAM database {self.path}: {exc}") from exc

    def _write(self, conn: sqlite3.Connection, change: Change) -> None:
        if isinstance(change, ConduitPrefixAdded):
            k = change.key
            conn.execute(
                "INSERT INTO conduit_prefix (family, trench, conduit, prefix, updated) "
                "VALUES (?, ?, ?, ?, ?)",
                (k.family.value, k.trench, k.conduit, str(change.prefix), change.updated),
            )
        elif isinstance(change, ConduitPrefixRemoved):
            k = change.key
            cur = conn.execute(
                "DELETE FROM conduit_prefix "
                "WHERE family = ? AND trench = ? AND conduit = ? AND prefix = ?",
                (k.family.value, k.trench, k.conduit, str(change.prefix)),
            )
            _expect_one(cur, change)
        elif isinstance(change, NodePrefixAdded):
            n = change.key
            conn.execute(
                "INSERT INTO node_prefix (family, trench, conduit, node, prefix, updated) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (n.family.value, n.trench, n.conduit, n.node, str(change.prefix), change.updated),
            )
        elif isinstance(change, NodePrefixRefreshed):
            n = change.key
            cur = conn.execute(
                "UPDATE node_prefix SET updated = ? "
                "WHERE family = ? AND trench = ? AND conduit = ? AND node = ?",
                (change.updated, n.family.value, n.trench, n.conduit, n.node),
            )
            _expect_one(cur, change)
        elif isinstance(change, NodePrefixRemoved):
            n = change.key
            cur = conn.execute(
                "DELETE FROM node_prefix "
                "WHERE family = ? AND trench = ? AND conduit = ? AND node = ? AND prefix = ?",
                (n.family.value, n.trench, n.conduit, n.node, str(change.prefix)),
            )
            _expect_one(cur, change)
        elif isinstance(change, ChildAdded):
            c = change.key
            conn.execute(
                "INSERT INTO child (family, trench, conduit, node, name, address, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    c.family.value,
                    c.trench,
                    c.conduit,
                    c.node,
                    c.name,
                    str(change.address),
                    change.updated,
                ),
            )
        elif isinstance(change, ChildRefreshed):
            c = change.key
            cur = conn.execute(
                "UPDATE child SET updated = ? "
                "WHERE family = ? AND trench = ? AND conduit = ? AND node = ? AND name = ?",
                (change.updated, c.family.value, c.trench, c.conduit, c.node, c.name),
            )
            _expect_one(cur, change)
        elif isinstance(change, ChildRemoved):
            c = change.key
            cur = conn.execute(
                "DELETE FROM child WHERE family = ? AND trench = ? AND conduit = ? "
                "AND node = ? AND name = ? AND address = ?",
                (c.family.value, c.trench, c.conduit, c.node, c.name, str(change.address)),
            )
            _expect_one(cur, change)
        else:  # pragma: no cover - exhaustive
            raise IpamStoreError(f"unknown change record {change!r}")


def _expect_one(cur: sqlite3.Cursor, change: Change) -> None:
    if cur.rowcount != 1:
        raise IpamStoreError(f"IPAM database out of step with memory: no row for {change}")


def _family(row: tuple[object, ...], value: object) -> IpFamily:
    try:
        return IpFamily(str(value))
    except ValueError:
        raise IpamStoreError(f"bad family {value!r} in stored row {row!r}") from None


def _parse(row: tuple[object, ...], parse: Callable[[str], _T], value: object) -> _T:
    try:
        return parse(str(value))
    except ValueError as exc:
        raise IpamStoreError(f"bad stored row {row!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class IpamBatch:
    """The change records one commit writes, in order."""

    seq: int
    changes: tuple[Change, ...]
    keys: frozenset[ChildKey]


class PersistentIpam:
    """An :class:`IpamAllocator` whose changes are committed to sqlite in batches.

    The ``stage_*`` methods plan a request on the allocator, apply it in memory at once (so the
    next request sees it: two allocations never get the same address) and add its records to
    the open batch; they return the sequence number of the batch the caller must see committed
    before it answers. A writer (:class:`meridio.runtime.commit.GroupCommit`) takes the open
    batch with :meth:`seal`, writes it in one transaction with :meth:`write` (in a worker
    thread: it touches only the database) and reports with :meth:`finish`; requests made
    meanwhile go in the next batch, so one fsync serves them all. When a write fails, memory is
    reloaded from the database (the truth) and the failed batch and the open one fail: their
    callers get the error and nothing they asked for exists, in memory or on disk.

    A request on a child whose change is in a batch not yet committed waits for that batch too.
    Readers (:meth:`list_children`, :meth:`lookup`, :meth:`records`) see memory, which may be
    ahead of the disk by the batches being written (:meth:`pending_seq` tells which).

    ``now`` (the time the IPAM opens, seconds) makes lease collection count every restored
    lease from then at the earliest: a restarted IPAM gives each child a whole lease time.

    The plain methods (:meth:`allocate`, :meth:`release`, ...) stage and commit at once, for
    callers without a writer task; do not mix them with a writer task running. Not thread-safe:
    call everything but :meth:`write` from one thread. Errors:
    :class:`meridio.core.ipam.IpamInvalid` and :class:`meridio.core.ipam.IpamExhausted` from
    the allocator (nothing changed), :class:`IpamStoreError` when the database fails.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: IpamConfig | None = None,
        *,
        now: float | None = None,
    ) -> None:
        self.config = config if config is not None else IpamConfig()
        self.opened_at = now
        self._store = IpamStore(path)
        try:
            self._allocator = self._store.load_allocator(self.config)
        except BaseException:
            self._store.close()
            raise
        restored = self._allocator.children()
        self.restored = len(restored)
        self._unrefreshed = {
            ChildKey(c.family, c.trench, c.conduit, c.node, c.name) for c in restored
        }
        self._open: list[Change] = []
        self._open_keys: set[ChildKey] = set()
        self._open_seq = 1
        self._inflight: IpamBatch | None = None
        self.committed_seq = 0

    @property
    def path(self) -> str:
        return self._store.path

    @property
    def closed(self) -> bool:
        return self._store.closed

    def _check_open(self) -> None:
        if self._store.closed:
            raise IpamStoreError(f"IPAM database {self._store.path} is closed")

    # ---------------------------------------------------------------- staging

    def _stage(self, changes: Sequence[Change], keys: Sequence[ChildKey] = ()) -> int:
        """Apply planned ``changes`` in memory and add them to the open batch; the batch to
        wait for (0: nothing to wait for)."""
        if changes:
            self._allocator.apply(changes)
            self._open.extend(changes)
            for change in changes:
                if isinstance(change, ChildAdded | ChildRefreshed | ChildRemoved):
                    self._open_keys.add(change.key)
            return self._open_seq
        for key in keys:
            if key in self._open_keys:
                return self._open_seq
            if self._inflight is not None and key in self._inflight.keys:
                return self._inflight.seq
        return 0

    def stage_allocate(
        self,
        trench: str,
        conduit: str,
        node: str,
        family: IpFamily | str,
        name: str,
        now: float,
    ) -> tuple[str, int, int]:
        """Allocate or refresh a child: (address, node prefix length, batch to wait for)."""
        self._check_open()
        allocation = self._allocator.plan_allocate(trench, conduit, node, family, name, now)
        seq = self._stage(allocation.changes)
        key = allocation.changes[-1].key
        assert isinstance(key, ChildKey)
        self._unrefreshed.discard(key)
        return str(allocation.address), allocation.prefix_length, seq

    def stage_release(
        self, trench: str, conduit: str, node: str, family: IpFamily | str, name: str
    ) -> tuple[tuple[Change, ...], int]:
        """Remove a child (silent if unknown): (what was removed, batch to wait for)."""
        self._check_open()
        changes = self._allocator.plan_release(trench, conduit, node, family, name)
        key = ChildKey(parse_family(family), trench, conduit, node, name)
        self._unrefreshed.discard(key)
        return changes, self._stage(changes, (key,))

    def stage_remove_node(
        self, trench: str, conduit: str, node: str, family: IpFamily | str
    ) -> tuple[tuple[Change, ...], int]:
        self._check_open()
        changes = self._allocator.plan_remove_node(trench, conduit, node, family)
        return changes, self._stage(changes)

    def stage_remove_conduit(
        self, trench: str, conduit: str, family: IpFamily | str
    ) -> tuple[tuple[Change, ...], int]:
        self._check_open()
        changes = self._allocator.plan_remove_conduit(trench, conduit, family)
        return changes, self._stage(changes)

    def stage_collect(self, now: float) -> tuple[tuple[Change, ...], int]:
        """Lease collection (see :mod:`meridio.core.ipam`), restored leases counted from the
        opening time at the earliest: (what was removed, batch to wait for)."""
        self._check_open()
        changes = self._allocator.plan_collect(now, since=self.opened_at)
        for change in changes:
            if isinstance(change, ChildRemoved):
                self._unrefreshed.discard(change.key)
        return changes, self._stage(changes)

    @property
    def restored_pending(self) -> int:
        """Restored children neither allocated, released nor collected since the opening."""
        return len(self._unrefreshed)

    def pending_seq(self) -> int:
        """The last batch holding changes not yet committed (0: everything is committed)."""
        if self._open:
            return self._open_seq
        return self._inflight.seq if self._inflight is not None else 0

    # ---------------------------------------------------------------- the writer's side

    def seal(self) -> IpamBatch | None:
        """Close the open batch and return it for writing; None when it is empty."""
        if self._inflight is not None:
            raise RuntimeError("a batch is already being written")
        if not self._open:
            return None
        batch = IpamBatch(self._open_seq, tuple(self._open), frozenset(self._open_keys))
        self._open, self._open_keys = [], set()
        self._open_seq += 1
        self._inflight = batch
        return batch

    def write(self, batch: IpamBatch) -> None:
        """Write *batch* in one transaction (safe in a worker thread)."""
        self._store.apply(batch.changes)

    def finish(self, batch: IpamBatch, error: BaseException | None) -> tuple[int, ...]:
        """Record how writing *batch* went; the sequence numbers that failed (empty if none)."""
        if batch is not self._inflight:
            raise RuntimeError("finish() of a batch that is not in flight")
        self._inflight = None
        if error is None:
            self.committed_seq = batch.seq
            return ()
        failed = (batch.seq, self._open_seq)
        self._open, self._open_keys = [], set()
        self.committed_seq = self._open_seq
        self._open_seq += 1
        # The disk is the truth: memory goes back to it, without both failed batches.
        self._allocator = self._store.load_allocator(self.config)
        return failed

    def commit(self) -> None:
        """Seal, write and finish the open batch now; re-raises a write error (after memory
        went back to the database)."""
        batch = self.seal()
        if batch is None:
            return
        try:
            self.write(batch)
        except BaseException as exc:
            self.finish(batch, exc)
            raise
        self.finish(batch, None)

    # ---------------------------------------------------------------- committed at once

    def allocate(
        self,
        trench: str,
        conduit: str,
        node: str,
        family: IpFamily | str,
        name: str,
        now: float,
    ) -> tuple[str, int]:
        """Allocate or refresh a child; return (address, node prefix length) once committed."""
        address, length, _ = self.stage_allocate(trench, conduit, node, family, name, now)
        self.commit()
        return address, length

    def release(
        self, trench: str, conduit: str, node: str, family: IpFamily | str, name: str
    ) -> tuple[Change, ...]:
        """Remove a child; silent if unknown. Returns what was removed."""
        changes, _ = self.stage_release(trench, conduit, node, family, name)
        self.commit()
        return changes

    def remove_node(
        self, trench: str, conduit: str, node: str, family: IpFamily | str
    ) -> tuple[Change, ...]:
        """Remove a node prefix and all its children; silent if unknown."""
        changes, _ = self.stage_remove_node(trench, conduit, node, family)
        self.commit()
        return changes

    def remove_conduit(
        self, trench: str, conduit: str, family: IpFamily | str
    ) -> tuple[Change, ...]:
        """Remove a conduit prefix with its node prefixes and children; silent if unknown."""
        changes, _ = self.stage_remove_conduit(trench, conduit, family)
        self.commit()
        return changes

    def collect(self, now: float) -> tuple[Change, ...]:
        """Lease garbage collection (see :meth:`stage_collect`); returns what was removed."""
        changes, _ = self.stage_collect(now)
        self.commit()
        return changes

    # ---------------------------------------------------------------- reading

    def list_children(self) -> list[ChildInfo]:
        """Every live child (trench, conduit, node, family, prefix, name, address, updated)."""
        return self._allocator.children()

    def records(self) -> list[Change]:
        """The whole state as records (equal states give equal lists)."""
        return self._allocator.records()

    def lookup(
        self, trench: str, conduit: str, node: str, family: IpFamily | str, name: str
    ) -> str | None:
        """The address of a live child, or None; refreshes nothing."""
        address = self._allocator.lookup(trench, conduit, node, family, name)
        return None if address is None else str(address)

    def close(self) -> None:
        """Write what is not written yet (best effort) and close the database. Idempotent;
        later changes raise :class:`IpamStoreError`."""
        if self._store.closed:
            return
        try:
            inflight = self._inflight
            if inflight is not None:  # its writer was stopped: write it first
                self._inflight = None
                self._open[:0] = inflight.changes
                self._open_keys |= inflight.keys
            self.commit()
        except IpamStoreError:
            pass  # what is not on disk was never answered
        finally:
            self._store.close()

    def __enter__(self) -> PersistentIpam:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
