"""Persistence of the NSP target registry in sqlite (stdlib ``sqlite3``, WAL, ``synchronous=FULL``).

Layout (schema version 1)::

    meta(name TEXT PRIMARY KEY, value TEXT)          -- ("schema_version", "1")
    targets(key TEXT PRIMARY KEY,                    -- meridio.core.registry.target_key()
            target BLOB,                             -- bytes(Target) in its stored form
            last_seen REAL)                          -- seconds, wall clock (time.time())

Every write is one transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``); with WAL and
``synchronous=FULL`` a committed change survives a crash or power loss.

Timestamps are wall-clock seconds passed in by the caller. After a restart an entry that was alive
keeps the keepalive time it had left: it is restored with its persisted ``last_seen`` and expires
``entry_timeout`` after it, unless its owner refreshes it first. A persisted ``last_seen`` in the
future (the clock stepped back) is clamped to the load time, so it cannot outlive a full timeout.

Keepalives (registrations that change nothing but ``last_seen``) are batched by
:class:`PersistentRegistry`: see there for the trade-off.

Neither class is thread-safe. The connection is opened with ``check_same_thread=False`` so a caller
may run the calls in a worker thread (``trio.to_thread.run_sync``), one call at a time.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Final, Self, cast

from meridio.api.nsp.v1 import Target
from meridio.core.registry import (
    DEFAULT_ENTRY_TIMEOUT,
    Entry,
    TargetRegistry,
    canonical_target,
    target_key,
)

__all__ = ["SCHEMA_VERSION", "PersistentRegistry", "RegistryStore", "StoreError"]

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
        """Restore every persisted entry into *registry*; return how many were restored.

        Stored targets are decoded and brought to the current stored form. A row whose key no
        longer matches its target (the key format changed) is re-keyed. A row that does not decode
        to exactly its own bytes is deleted: betterproto accepts truncated data silently, so the
        round trip is the integrity check, and registrations are soft state (the owner of a
        dropped row registers again at its next keepalive). ``last_seen`` is clamped to *now*.
        Expired entries are restored too; the caller expires them (``PersistentRegistry`` does so
        when it opens).
        """
        rows = self._conn.execute("SELECT key, target, last_seen FROM targets").fetchall()
        loaded: list[Entry] = []
        rekeyed: list[Entry] = []
        stale: list[str] = []
        for key, blob, seen in cast(list[tuple[str, bytes, float]], rows):
            data = bytes(blob)
            try:
                decoded = Target().parse(data)
                intact = bytes(decoded) == data
            except Exception:  # betterproto raises assorted errors on some garbage
                intact = False
            if not intact:
                stale.append(key)
                continue
            target = canonical_target(decoded)
            last_seen = float(seen)
            if not math.isfinite(last_seen) or last_seen > now:
                last_seen = now
            entry = Entry(target_key(target), target, last_seen)
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


class PersistentRegistry:
    """A :class:`TargetRegistry` whose every change is committed to a :class:`RegistryStore`.

    Opening restores the persisted entries and expires those already past their timeout. Each
    change (new target, status or context change, unregister, expiry) is committed before the call
    returns; if the commit fails the in-memory change is rolled back and the :class:`StoreError`
    propagates, so memory never shows what the disk does not have.

    Keepalive batching (the trade-off): a registration that changes nothing updates ``last_seen``
    in memory only and marks the key dirty. Dirty ``last_seen`` values are written, all in one
    transaction, when the key being refreshed was last persisted ``seen_write_interval`` seconds
    ago or more (default a quarter of ``entry_timeout``), piggy-backed on any other commit, by
    :meth:`flush`, and on :meth:`close`. With N targets refreshing, keepalives therefore cost at
    most about one fsync per target per interval, and in practice far fewer since one commit carries
    every dirty key. The price: after a crash (not a clean close) a restored entry's ``last_seen``
    may be up to ``seen_write_interval`` older than its last refresh, so it may expire that much
    sooner; an owner that refreshes at least every ``entry_timeout - seen_write_interval`` seconds
    (45 s with the defaults; TAPA refreshes far more often) is never dropped because of it. Use
    ``seen_write_interval=0`` to persist every keepalive.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        now: float,
        *,
        entry_timeout: float = DEFAULT_ENTRY_TIMEOUT,
        seen_write_interval: float | None = None,
    ) -> None:
        if not entry_timeout > 0:
            raise ValueError(f"entry_timeout must be positive, not {entry_timeout}")
        interval = entry_timeout / 4 if seen_write_interval is None else seen_write_interval
        if not 0 <= interval < entry_timeout:
            raise ValueError(
                f"seen_write_interval must be in [0, entry_timeout={entry_timeout}), not {interval}"
            )
        self.entry_timeout = entry_timeout
        self.seen_write_interval = interval
        self.registry = TargetRegistry()
        self._store = RegistryStore(path)
        try:
            self._store.load(self.registry, now)
            self._persisted: dict[str, float] = {
                e.key: e.last_seen for e in self.registry.entries()
            }
            self._dirty: dict[str, float] = {}
            self.expire(now)
        except BaseException:
            self._store.close()
            raise

    @property
    def store(self) -> RegistryStore:
        return self._store

    @property
    def generation(self) -> int:
        return self.registry.generation

    def __len__(self) -> int:
        return len(self.registry)

    # -- changes

    def register(self, target: Target, now: float) -> bool:
        """:meth:`TargetRegistry.register`, committed; a pure keepalive is batched (see above)."""
        key = target_key(target)
        previous = self.registry.get(key)
        changed = self.registry.register(target, now)
        entry = self.registry.get(key)
        assert entry is not None
        if changed:
            self._commit(key, previous, upsert=(entry,))
            return True
        persisted = self._persisted.get(key)
        was_dirty = self._dirty.get(key)
        self._dirty[key] = now
        if persisted is None or abs(now - persisted) >= self.seen_write_interval:
            try:
                self._commit_dirty()
            except BaseException:
                self.registry.restore(key, previous)
                if was_dirty is None:
                    del self._dirty[key]
                else:
                    self._dirty[key] = was_dirty
                raise
        return False

    def unregister(self, target: Target, now: float) -> bool:
        """:meth:`TargetRegistry.unregister`, committed; silently False if unknown."""
        del now
        key = target_key(target)
        previous = self.registry.remove(key)
        if previous is None:
            return False
        self._commit(key, previous, delete=(key,))
        return True

    def expire(self, now: float) -> list[str]:
        """Remove and delete entries not refreshed within ``entry_timeout``; return their keys."""
        removed = self.registry.pop_expired(now, self.entry_timeout)
        if not removed:
            return []
        keys = [e.key for e in removed]
        gone = set(keys)
        seen = {k: t for k, t in self._dirty.items() if k not in gone}
        try:
            self._store.apply(delete=keys, seen=seen)
        except BaseException:
            for entry in removed:
                self.registry.restore(entry.key, entry)
            raise
        self._after_commit(seen)
        for key in keys:
            self._persisted.pop(key, None)
            self._dirty.pop(key, None)
        return keys

    def flush(self) -> None:
        """Write every batched keepalive now."""
        if self._dirty:
            self._commit_dirty()

    def _commit(
        self,
        key: str,
        previous: Entry | None,
        *,
        upsert: tuple[Entry, ...] = (),
        delete: tuple[str, ...] = (),
    ) -> None:
        seen = {k: t for k, t in self._dirty.items() if k != key}
        try:
            self._store.apply(upsert=upsert, delete=delete, seen=seen)
        except BaseException:
            self.registry.restore(key, previous)
            raise
        self._after_commit(seen)
        self._dirty.pop(key, None)
        if upsert:
            self._persisted[key] = upsert[0].last_seen
        else:
            self._persisted.pop(key, None)

    def _commit_dirty(self) -> None:
        seen = dict(self._dirty)
        self._store.apply(seen=seen)
        self._after_commit(seen)

    def _after_commit(self, seen: Mapping[str, float]) -> None:
        self._persisted.update(seen)
        for key, value in seen.items():
            if self._dirty.get(key) == value:
                del self._dirty[key]

    # -- reading

    def next_expiry(self) -> float | None:
        return self.registry.next_expiry(self.entry_timeout)

    def snapshot(self, filter: Target) -> list[Target]:
        return self.registry.snapshot(filter)

    def all(self) -> list[Target]:
        return self.registry.all()

    # -- lifetime

    def close(self) -> None:
        """Flush batched keepalives (best effort) and close the store."""
        try:
            self.flush()
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
