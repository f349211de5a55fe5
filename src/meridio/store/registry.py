"""Persistence of the NSP target registry in sqlite (stdlib ``sqlite3``, WAL, ``synchronous=FULL``).

Layout (schema version 1)::

    meta(name TEXT PRIMARY KEY, value TEXT)          -- ("schema_version", "1")
    targets(key TEXT PRIMARY KEY,                    -- meridio.core.registry.target_key()
            target BLOB,                             -- bytes(Target) in its stored form
            last_seen REAL)                          -- seconds, wall clock, of the last change

Every write is one transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``); with WAL and
``synchronous=FULL`` a committed change survives a crash or power loss.

Restart: every persisted entry is restored with a full ``entry_timeout`` from the moment it is
loaded, however long the NSP was down, as Meridio's keepalive registry does on restore. The
owners of live targets refresh well within that time, so a restarted NSP never drops them;
entries whose owners are gone expire one timeout after the restart. Hence keepalives (a
registration that changes nothing) are never written: a refresh time on disk would not be read.
``last_seen`` records when the entry last changed, for inspection.

Group commit: :class:`PersistentRegistry` applies changes in memory at once and writes them in
batches, many changes per transaction, so that one fsync serves every change made while the
previous one ran; see there.

Neither class is thread-safe. The connection is opened with ``check_same_thread=False`` so a
caller may run the writes in a worker thread (``trio.to_thread.run_sync``), one at a time.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self, cast

from meridio.api.nsp.v1 import Target
from meridio.core import wire
from meridio.core.registry import (
    DEFAULT_ENTRY_TIMEOUT,
    Entry,
    RegistryView,
    TargetRegistry,
    canonical_target,
    target_key,
)

__all__ = ["SCHEMA_VERSION", "Batch", "PersistentRegistry", "RegistryStore", "StoreError"]

SCHEMA_VERSION: Final = 1

_CREATE_META = "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
_CREATE_TARGETS = (
    "CREATE TABLE IF NOT EXISTS targets ("
    " key TEXT PRIMARY KEY,"
    " target BLOB NOT NULL,"
    " last_seen REAL NOT NULL"
    ") WITHOUT ROWID"
)
_UPSERT = (
    "INSERT INTO targets (key, target, last_seen) VALUES (?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET target = excluded.target, last_seen = excluded.last_seen"
)
_TOUCH = "UPDATE targets SET last_seen = ? WHERE key = ?"
_DELETE = "DELETE FROM targets WHERE key = ?"


class StoreError(Exception):
    """The store could not be opened, read or written (the sqlite error is chained)."""


class RegistryStore:
    """The sqlite file behind a :class:`~meridio.core.registry.TargetRegistry`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open registry store {self.path}: {exc}") from exc
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()
            self.journal_mode = str(mode[0]) if mode else ""  # "memory" for ":memory:"
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    # -- transactions and schema

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"registry store {self.path}: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            # The transaction may already be gone; the original error is the one that matters.
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"registry store {self.path}: {exc}") from exc
            raise

    def _migrate(self) -> None:
        with self._transaction() as conn:
            conn.execute(_CREATE_META)
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if row is None:
                conn.execute(_CREATE_TARGETS)
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                return
            version = int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"registry store {self.path} has schema version {version}; "
                    f"this program knows up to {SCHEMA_VERSION}"
                )
            # Versions below SCHEMA_VERSION would be migrated here, step by step.

    @property
    def schema_version(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        return int(row[0])

    # -- reading

    def load(self, registry: TargetRegistry, now: float) -> int:
        """Restore every persisted entry into *registry* with ``last_seen = now``; return how
        many were restored.

        Every entry gets a full timeout from *now* (see the module documentation). Stored
        targets are decoded strictly (:func:`meridio.core.wire.decode`) and brought to the
        current stored form. A row whose key no longer matches its target (the key format
        changed) is re-keyed. A row that does not decode to exactly its own bytes is deleted:
        registrations are soft state (the owner of a dropped row registers again at its next
        keepalive).
        """
        rows = self._conn.execute("SELECT key, target, last_seen FROM targets").fetchall()
        loaded: list[Entry] = []
        rekeyed: list[Entry] = []
        stale: list[str] = []
        for key, blob, _seen in cast(list[tuple[str, bytes, float]], rows):
            data = bytes(blob)
            try:
                decoded = wire.decode(Target, data)
                intact = bytes(decoded) == data
            except Exception:  # WireError, or betterproto's encoder on an odd value
                intact = False
            if not intact:
                stale.append(key)
                continue
            target = canonical_target(decoded)
            entry = Entry(target_key(target), target, now)
            if entry.key != key:
                stale.append(key)
                rekeyed.append(entry)
            loaded.append(entry)
        if stale:
            self.apply(delete=stale, upsert=rekeyed)
        for entry in loaded:
            registry.restore(entry.key, entry)
        return len(loaded)

    def last_seen(self, key: str) -> float | None:
        """The persisted ``last_seen`` of *key*, or None if it is not stored."""
        row = self._conn.execute("SELECT last_seen FROM targets WHERE key = ?", (key,)).fetchone()
        return float(row[0]) if row is not None else None

    def keys(self) -> list[str]:
        rows = self._conn.execute("SELECT key FROM targets ORDER BY key").fetchall()
        return [str(r[0]) for r in rows]

    # -- writing

    def apply(
        self,
        *,
        upsert: Iterable[Entry] = (),
        delete: Iterable[str] = (),
        seen: Mapping[str, float] | None = None,
    ) -> None:
        """Write entries, delete keys and update ``last_seen`` values, all in one transaction.

        Applied in this order: ``seen`` (only rows that exist), ``delete``, ``upsert``.
        """
        with self._transaction() as conn:
            if seen:
                conn.executemany(_TOUCH, ((t, k) for k, t in seen.items()))
            conn.executemany(_DELETE, ((k,) for k in delete))
            conn.executemany(_UPSERT, ((e.key, bytes(e.target), e.last_seen) for e in upsert))

    def write_rows(self, upsert: Iterable[tuple[str, bytes, float]], delete: Iterable[str]) -> None:
        """Delete ``delete`` keys, then write ``(key, target bytes, last_seen)`` rows, in one
        transaction."""
        with self._transaction() as conn:
            conn.executemany(_DELETE, ((k,) for k in delete))
            conn.executemany(_UPSERT, upsert)

    def upsert(self, entry: Entry) -> None:
        self.apply(upsert=(entry,))

    def delete(self, keys: Iterable[str]) -> None:
        self.apply(delete=keys)

    def touch(self, seen: Mapping[str, float]) -> None:
        self.apply(seen=seen)

    # -- lifetime

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Batch:
    """The changes one commit writes: the state of every key changed since the last batch."""

    seq: int
    upsert: list[tuple[str, bytes, float]]
    delete: list[str]
    before: dict[str, Entry | None]  # the committed state of every key in the batch
    view: RegistryView  # what watchers may see once the batch is committed


class PersistentRegistry:
    """A :class:`TargetRegistry` whose changes are committed to a :class:`RegistryStore` in
    batches (group commit).

    Opening restores the persisted entries, each with a full ``entry_timeout`` from ``now``
    (see the module documentation); :attr:`restored` says how many.

    Changes (``stage_register``, ``stage_unregister``, ``stage_expire``) apply in memory at
    once and join the open batch; they return the sequence number of the batch the caller must
    see committed before it answers (0: nothing to wait for). The writer, one at a time, takes
    the open batch with :meth:`seal` (the current state of every key it touched, and the view
    of the registry to publish), writes it with :meth:`write` (in a worker thread: it touches
    only the database) and reports with :meth:`finish`. Changes made meanwhile go in the next
    batch, so one fsync serves every change made while the previous one ran, and a reply still
    comes only after its change is on disk.

    Readers that answer clients (:attr:`view`, :meth:`snapshot`, :meth:`all`, ``len``) see the
    registry as of the last committed batch: never a change the disk does not have. When a
    write fails, the failed batch and the open one are undone in memory and :meth:`finish`
    returns both sequence numbers, whose callers get the error: memory again equals the disk.

    A keepalive (a registration that changes nothing) only moves the entry's ``last_seen`` in
    memory and waits for nothing, unless its key is in a batch not yet committed (a retry of a
    registration still being written waits for it).

    The ``register``/``unregister``/``expire`` methods stage and commit at once (one transaction
    each), for callers without a writer task; do not mix them with a writer task running.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        now: float,
        *,
        entry_timeout: float = DEFAULT_ENTRY_TIMEOUT,
    ) -> None:
        if not entry_timeout > 0:
            raise ValueError(f"entry_timeout must be positive, not {entry_timeout}")
        self.entry_timeout = entry_timeout
        self.registry = TargetRegistry()
        self._store = RegistryStore(path)
        try:
            self.restored = self._store.load(self.registry, now)
        except BaseException:
            self._store.close()
            raise
        self._unrefreshed = set(self.registry.keys())  # restored, not registered since
        self._open: dict[str, Entry | None] = {}
        self._open_seq = 1
        self._inflight: Batch | None = None
        self.committed_seq = 0
        self._view = self.registry.view()

    @property
    def store(self) -> RegistryStore:
        return self._store

    # -- changes (staged: in memory now, on disk with the batch they return)

    def _touch(self, key: str, before: Entry | None) -> None:
        if key not in self._open:
            self._open[key] = before

    def _wait_for(self, key: str) -> int:
        if key in self._open:
            return self._open_seq
        inflight = self._inflight
        if inflight is not None and key in inflight.before:
            return inflight.seq
        return 0

    def stage_register(self, target: Target, now: float) -> tuple[bool, int]:
        """:meth:`TargetRegistry.register`: (changed, batch to wait for or 0)."""
        changed, key, previous = self.registry.register_entry(target, now)
        self._unrefreshed.discard(key)
        if changed:
            self._touch(key, previous)
        return changed, self._wait_for(key)

    def stage_unregister(self, target: Target, now: float) -> tuple[bool, int]:
        """:meth:`TargetRegistry.unregister` (False if unknown): (removed, batch or 0)."""
        del now
        key = target_key(target)
        previous = self.registry.remove(key)
        self._unrefreshed.discard(key)
        if previous is not None:
            self._touch(key, previous)
            return True, self._open_seq
        return False, self._wait_for(key)

    def stage_expire(self, now: float) -> list[str]:
        """Remove the entries not refreshed within ``entry_timeout``; return their keys."""
        removed = self.registry.pop_expired(now, self.entry_timeout)
        for entry in removed:
            self._touch(entry.key, entry)
            self._unrefreshed.discard(entry.key)
        return [e.key for e in removed]

    @property
    def restored_pending(self) -> int:
        """Restored entries neither registered, unregistered nor expired since the restart."""
        return len(self._unrefreshed)

    # -- the writer's side

    @property
    def pending(self) -> bool:
        """Whether the open batch holds changes."""
        return bool(self._open)

    def seal(self) -> Batch | None:
        """Close the open batch and return it for writing; None when it is empty.

        Only one batch may be in flight: call :meth:`finish` before sealing the next.
        """
        if self._inflight is not None:
            raise RuntimeError("a batch is already being written")
        if not self._open:
            return None
        touched, self._open = self._open, {}
        upsert: list[tuple[str, bytes, float]] = []
        delete: list[str] = []
        view = self.registry.view()
        for key in touched:
            entry = self.registry.get(key)
            if entry is None:
                delete.append(key)
            else:
                upsert.append((key, self.registry.wire(entry), entry.last_seen))
        batch = Batch(self._open_seq, upsert, delete, touched, view)
        self._open_seq += 1
        self._inflight = batch
        return batch

    def write(self, batch: Batch) -> None:
        """Write *batch* (safe in a worker thread: it touches only the database)."""
        self._store.write_rows(batch.upsert, batch.delete)

    def finish(self, batch: Batch, error: BaseException | None) -> tuple[int, ...]:
        """Record how writing *batch* went; the sequence numbers that failed (empty if none).

        On success the batch's view becomes :attr:`view`. On failure the open batch and *batch*
        are undone in memory (the disk is the truth) and both fail.
        """
        if batch is not self._inflight:
            raise RuntimeError("finish() of a batch that is not in flight")
        self._inflight = None
        if error is None:
            self.committed_seq = batch.seq
            self._view = batch.view
            return ()
        failed = (batch.seq, self._open_seq)
        open_batch, self._open = self._open, {}
        for key, before in open_batch.items():
            self.registry.restore(key, before)
        for key, before in batch.before.items():
            self.registry.restore(key, before)
        self.committed_seq = self._open_seq  # nothing is left to wait for up to here
        self._open_seq += 1
        return failed

    def commit(self) -> None:
        """Seal, write and finish the open batch now (the caller's thread); re-raises a write
        error after undoing the batch."""
        batch = self.seal()
        if batch is None:
            return
        try:
            self.write(batch)
        except BaseException as exc:
            self.finish(batch, exc)
            raise
        self.finish(batch, None)

    # -- changes committed at once

    def register(self, target: Target, now: float) -> bool:
        changed, seq = self.stage_register(target, now)
        if seq:
            self.commit()
        return changed

    def unregister(self, target: Target, now: float) -> bool:
        removed, seq = self.stage_unregister(target, now)
        if seq:
            self.commit()
        return removed

    def expire(self, now: float) -> list[str]:
        keys = self.stage_expire(now)
        if keys:
            self.commit()
        return keys

    # -- reading (committed state)

    @property
    def view(self) -> RegistryView:
        """The registry as of the last committed batch."""
        return self._view

    @property
    def generation(self) -> int:
        return self._view.generation

    def __len__(self) -> int:
        return len(self._view)

    def snapshot(self, filter: Target) -> list[Target]:
        return self._view.snapshot(filter)

    def all(self) -> list[Target]:
        return self._view.targets()

    def next_expiry(self) -> float | None:
        """When the next entry (in memory) is due to expire."""
        return self.registry.next_expiry(self.entry_timeout)

    # -- lifetime

    def close(self) -> None:
        """Write what is not written yet (best effort) and close the store."""
        try:
            inflight = self._inflight
            if inflight is not None:  # its writer was stopped: write its keys again
                self._inflight = None
                for key, before in inflight.before.items():
                    self._open.setdefault(key, before)
            self.commit()
        finally:
            self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
