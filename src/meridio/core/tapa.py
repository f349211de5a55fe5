"""TAPA, pure: the streams a target has open, and what each of them shows.

The target role serves Meridio's ``ambassador.v1.Tap`` (``Open``, ``Close``, ``Watch``): the
application next to it says which streams it serves. This module is the state behind that API,
with no I/O and no clock (times are passed in):

* **Requests.** A stream is named by its trench, conduit and name, none of them empty
  (:func:`stream_ref` refuses anything else with :class:`InvalidStream`, so a bad request changes
  nothing). A name is 1 to 253 printable characters without whitespace, ``/``, ``\\`` or
  ``,`` (the NSP's and the IPAM's rules, and ``,`` separates streams in the settings); a stream
  name at most 53 (it travels in the connect context key ``identifier/<stream>``).
* **One trench.** The first stream opened connects the target to its trench; a stream of another
  trench is refused (:class:`OtherTrench`, naming the connected one) until every conduit of the
  first one is closed.
* **Conduits.** A conduit is open while one of its streams is. Each gets a *slot* (the smallest
  free one, kept while the conduit exists): its interface, routing table and rule priority are
  numbered by it. When its last stream closes the conduit *leaves*: its identifiers are dropped
  from the connection at once (the proxy unregisters them) and the connection itself closes
  ``linger`` seconds later (:meth:`TapState.expire`), so flows in flight drain first; opening one
  of its streams meanwhile keeps it. The trench is left when no conduit remains.
* **Identifiers.** Each open stream gets an identifier (its Maglev slot on every LB) in
  ``1..max-targets`` that no other target of the stream holds (:meth:`TapState.settle`): the
  one it had before when that is free (:attr:`TapState.remembered`, kept across restarts), else
  one at random among the free ones. Once registered it is confirmed; when another target holds
  the same one with a lower address list, it picks again (the LBs' rule). A registration the
  registry lists ``DISABLED``, or stops listing, for :data:`REREGISTER_AFTER` seconds while the
  conduit is up was dropped by the registry: the stream picks a free identifier again, so it is
  registered anew (Meridio's TAPA does the same).
* **Status** (:meth:`TapState.status`), Meridio's meanings: ``OPEN`` registered and routed;
  ``PENDING`` on its way; ``UNAVAILABLE`` the NSP or the conduit cannot be reached (or the
  stream is full); ``UNDEFINED`` the trench's configuration has no such stream in that conduit
  (it turns ``OPEN`` once the configuration defines it).
* **Persistence.** :meth:`TapState.to_dict` and :meth:`TapState.from_dict` (JSON-ready), so a
  restarted target reopens what was open and asks for the identifiers it had.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from meridio.core import identifiers, names
from meridio.core.identifiers import Holder, StreamFull

MAX_NAME: Final = names.MAX_NAME_LENGTH
MAX_STREAM_NAME: Final = 64 - len(identifiers.CONTEXT_PREFIX)
"""A stream's name is part of a connect context key (at most 64 characters)."""
MAX_SLOTS: Final = 16
"""Conduits a target can be in at once (Meridio's default IPAM gives a trench 16)."""
REREGISTER_AFTER: Final = 5.0
"""Seconds a registration may be listed DISABLED, or missing, while its conduit is up before
the stream picks an identifier again."""
STATE_VERSION: Final = 1

StreamKey = tuple[str, str]  # (conduit, stream)


class Status(enum.IntEnum):
    """``ambassador.v1.StreamStatus.Status``: same names and numbers."""

    OPEN = 0
    PENDING = 1
    UNAVAILABLE = 2
    UNDEFINED = 3


class Reach(enum.Enum):
    """How a peer (the NSP, a conduit's proxy) is doing."""

    CONNECTING = "connecting"  # not reached yet
    UP = "up"
    DOWN = "down"  # an attempt failed, or it was lost


class InvalidStream(ValueError):
    """A request that names no valid stream (INVALID_ARGUMENT); the message says why."""


class OtherTrench(Exception):
    """The target is connected to another trench."""

    def __init__(self, connected: str, asked: str) -> None:
        super().__init__(
            f"this target is connected to trench {connected}: close its streams before "
            f"opening one of trench {asked}"
        )
        self.connected = connected
        self.asked = asked


class TooManyConduits(Exception):
    def __init__(self, conduit: str) -> None:
        super().__init__(f"cannot open conduit {conduit}: already in {MAX_SLOTS} conduits")


@dataclass(frozen=True, order=True)
class StreamRef:
    trench: str
    conduit: str
    name: str

    @property
    def key(self) -> StreamKey:
        return self.conduit, self.name

    def __str__(self) -> str:
        return f"{self.trench}/{self.conduit}/{self.name}"


class _StreamLike(Protocol):
    name: str
    conduit: Any


def name_problem(text: str, limit: int = MAX_NAME) -> str | None:
    """Why ``text`` cannot name a trench, conduit or stream, or None when it can: a name as
    :mod:`meridio.core.names` has it, without ``,`` (settings list streams with commas)."""
    problem = names.name_problem(text, limit)
    if problem is None and "," in text:
        return "must not contain ','"
    return problem


def check_name(what: str, text: str, limit: int = MAX_NAME) -> str:
    """``text`` if it can name a ``what``; :class:`InvalidStream` saying why if not."""
    problem = name_problem(text, limit)
    if problem is not None:
        raise InvalidStream(names.describe(what, text, problem))
    return text


def stream_ref(message: _StreamLike) -> StreamRef:
    """The stream an ``ambassador.v1.Stream`` names; :class:`InvalidStream` if it names none."""
    conduit = message.conduit
    trench = conduit.trench if conduit is not None else None
    return StreamRef(
        check_name("trench", trench.name if trench is not None else ""),
        check_name("conduit", conduit.name if conduit is not None else ""),
        check_name("stream", message.name, MAX_STREAM_NAME),
    )


def parse_streams(text: str, trench: str, conduit: str) -> list[StreamRef]:
    """The ``streams`` setting: comma-separated ``stream`` (of ``conduit``) or
    ``conduit/stream``; ValueError names a bad entry."""
    out: list[StreamRef] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        where, _, name = item.rpartition("/")
        where = where or conduit
        try:
            if not where:
                raise InvalidStream("no conduit: give 'conduit/stream' or the conduit setting")
            ref = StreamRef(
                check_name("trench", trench),
                check_name("conduit", where),
                check_name("stream", name, MAX_STREAM_NAME),
            )
        except InvalidStream as exc:
            raise ValueError(f"stream {item!r}: {exc}") from None
        if ref not in out:
            out.append(ref)
    return out


@dataclass(frozen=True)
class StreamFilter:
    """A Watch request: empty names match any."""

    trench: str = ""
    conduit: str = ""
    name: str = ""

    @classmethod
    def of(cls, message: _StreamLike) -> StreamFilter:
        """The filter a Watch request asks for; :class:`InvalidStream` when a name given could
        not name a stream."""
        conduit = message.conduit
        trench = conduit.trench if conduit is not None else None
        names = (
            ("trench", trench.name if trench is not None else "", MAX_NAME),
            ("conduit", conduit.name if conduit is not None else "", MAX_NAME),
            ("stream", message.name, MAX_STREAM_NAME),
        )
        for what, text, limit in names:
            if text:
                check_name(what, text, limit)
        return cls(*(text for _, text, _ in names))

    def matches(self, ref: StreamRef) -> bool:
        return (
            (not self.trench or self.trench == ref.trench)
            and (not self.conduit or self.conduit == ref.conduit)
            and (not self.name or self.name == ref.name)
        )


@dataclass(frozen=True, order=True)
class Registered:
    """A target of a stream as the registry lists it."""

    ips: tuple[str, ...]
    identifier: int
    enabled: bool = True


@dataclass
class StreamEntry:
    identifier: int | None = None
    confirmed: bool = False
    problem: str = ""
    unlisted_since: float | None = None  # listed DISABLED or not listed, while the conduit is up


@dataclass
class ConduitEntry:
    slot: int
    leaving_since: float | None = None
    addresses: tuple[str, ...] = ()  # the target's end, as last connected (CIDRs)


@dataclass(frozen=True)
class Event:
    """Something :meth:`TapState.settle` did, for the log."""

    kind: str  # chosen, confirmed, taken, dropped, problem
    stream: StreamRef
    identifier: int | None = None
    problem: str = ""


@dataclass
class TapState:
    trench: str | None = None
    streams: dict[StreamRef, StreamEntry] = field(default_factory=dict)
    conduits: dict[str, ConduitEntry] = field(default_factory=dict)
    remembered: dict[StreamKey, int] = field(default_factory=dict)
    vips: tuple[str, ...] = ()
    """VIPs the role put on ``lo`` (kept so that a restarted role removes them)."""

    # --- requests -----------------------------------------------------------------------------

    def open(self, ref: StreamRef) -> bool:
        """Open ``ref`` (idempotent); True when something changed."""
        if self.trench is not None and self.trench != ref.trench:
            raise OtherTrench(self.trench, ref.trench)
        if ref in self.streams:
            return False
        entry = self.conduits.get(ref.conduit)
        if entry is None:
            used = {c.slot for c in self.conduits.values()}
            free = [s for s in range(MAX_SLOTS) if s not in used]
            if not free:
                raise TooManyConduits(ref.conduit)
            self.conduits[ref.conduit] = ConduitEntry(free[0])
        else:
            entry.leaving_since = None
        self.trench = ref.trench
        self.streams[ref] = StreamEntry()
        return True

    def close(self, ref: StreamRef, now: float) -> bool:
        """Close ``ref`` (idempotent); its conduit starts leaving when it was its last stream."""
        if self.streams.pop(ref, None) is None:
            return False
        if not self.streams_of(ref.conduit):
            self.conduits[ref.conduit].leaving_since = now
        return True

    def expire(self, now: float, linger: float) -> list[str]:
        """Drop the conduits that left ``linger`` seconds ago (and the trench with the last)."""
        gone = [
            name
            for name, c in sorted(self.conduits.items())
            if c.leaving_since is not None and now >= c.leaving_since + linger
        ]
        for name in gone:
            del self.conduits[name]
        if not self.conduits:
            self.streams.clear()
            self.trench = None
        return gone

    def wake_at(self, linger: float) -> float | None:
        """When :meth:`expire` or :meth:`settle` next has something to do on their own."""
        times = [
            c.leaving_since + linger for c in self.conduits.values() if c.leaving_since is not None
        ]
        times += [
            e.unlisted_since + REREGISTER_AFTER
            for e in self.streams.values()
            if e.unlisted_since is not None
        ]
        return min(times, default=None)

    # --- views --------------------------------------------------------------------------------

    def streams_of(self, conduit: str) -> list[StreamRef]:
        return sorted(r for r in self.streams if r.conduit == conduit)

    def open_conduits(self) -> list[str]:
        """Conduits with an open stream (not leaving)."""
        return sorted(n for n, c in self.conduits.items() if c.leaving_since is None)

    def context(self, conduit: str) -> dict[str, int]:
        """Stream -> identifier of the conduit's streams that have one."""
        return {
            r.name: e.identifier
            for r, e in sorted(self.streams.items())
            if r.conduit == conduit and e.identifier is not None
        }

    # --- identifiers --------------------------------------------------------------------------

    def settle(
        self,
        config: Mapping[StreamKey, int] | None,
        registered: Mapping[StreamKey, Sequence[Registered]] | None,
        mine: Mapping[str, tuple[str, ...]],
        connected: Iterable[str],
        now: float,
        rng: random.Random,
    ) -> list[Event]:
        """Choose, confirm or re-choose the identifier of every open stream.

        ``config``: max-targets of every stream of the trench (None: not known yet);
        ``registered``: what the registry lists per stream (None: not known yet); ``mine``:
        this target's address list per conduit (canonical; current or last known);
        ``connected``: conduits whose connection is up.
        """
        events: list[Event] = []
        if config is None:
            return events
        up = set(connected)
        for ref, entry in sorted(self.streams.items()):
            max_targets = config.get(ref.key)
            if max_targets is None:
                text = f"stream {ref.name} is not configured in conduit {ref.conduit}"
                self._problem(ref, entry, text, events)
                entry.identifier, entry.confirmed, entry.unlisted_since = None, False, None
                continue
            if registered is None:
                continue
            listed = registered.get(ref.key, ())
            holders = [Holder(r.ips, r.identifier) for r in listed]
            ips = mine.get(ref.conduit)
            current = entry.identifier
            avoid = None
            if current is not None and current > max_targets:
                current = None
            if current is not None and ips is not None:
                if not identifiers.keeps(ips, current, holders):
                    events.append(Event("taken", ref, current))
                    current = None
                elif Registered(ips, current, True) in listed:
                    if not entry.confirmed:
                        events.append(Event("confirmed", ref, current))
                    entry.confirmed, entry.unlisted_since = True, None
                    self.remembered[ref.key] = current
                elif ref.conduit not in up:
                    entry.confirmed, entry.unlisted_since = False, None
                elif entry.unlisted_since is None:
                    entry.confirmed, entry.unlisted_since = False, now
                elif now - entry.unlisted_since >= REREGISTER_AFTER:
                    events.append(Event("dropped", ref, current))
                    avoid, current = current, None
            if current is None:
                try:
                    chosen = self._choose(ref, max_targets, ips, holders, rng, avoid)
                except StreamFull as exc:
                    self._problem(ref, entry, str(exc), events)
                    entry.identifier, entry.confirmed, entry.unlisted_since = None, False, None
                    continue
                entry.identifier, entry.confirmed, entry.unlisted_since = chosen, False, None
                events.append(Event("chosen", ref, chosen))
            entry.problem = ""
        return events

    def _choose(
        self,
        ref: StreamRef,
        max_targets: int,
        ips: tuple[str, ...] | None,
        holders: Sequence[Holder],
        rng: random.Random,
        avoid: int | None,
    ) -> int:
        """A free identifier: the remembered one if it is free, else one at random; ``avoid``
        only when it is the only free one. :class:`StreamFull` when there is none."""
        taken = identifiers.taken_by_others(ips or (), holders)
        free = identifiers.free_identifiers(max_targets, taken)
        if not free:
            raise StreamFull(ref.name, max_targets)
        remembered = self.remembered.get(ref.key)
        if avoid is None and remembered is not None and remembered in free:
            return remembered
        others = [i for i in free if i != avoid]
        return rng.choice(others) if others else free[0]

    @staticmethod
    def _problem(ref: StreamRef, entry: StreamEntry, text: str, events: list[Event]) -> None:
        if entry.problem != text:
            events.append(Event("problem", ref, problem=text))
        entry.problem = text

    # --- status -------------------------------------------------------------------------------

    def status(
        self,
        ref: StreamRef,
        *,
        nsp: Reach,
        config: Mapping[StreamKey, int] | None,
        conduits: Mapping[str, Reach],
        routed: Iterable[str],
    ) -> Status | None:
        """What Watch shows for ``ref`` (None: not open)."""
        entry = self.streams.get(ref)
        if entry is None:
            return None
        if nsp is Reach.DOWN:
            return Status.UNAVAILABLE
        if nsp is Reach.CONNECTING or config is None:
            return Status.PENDING
        if ref.key not in config:
            return Status.UNDEFINED
        if entry.problem:
            return Status.UNAVAILABLE
        reach = conduits.get(ref.conduit, Reach.CONNECTING)
        if reach is Reach.DOWN:
            return Status.UNAVAILABLE
        if reach is Reach.CONNECTING:
            return Status.PENDING
        return Status.OPEN if entry.confirmed and ref.conduit in set(routed) else Status.PENDING

    # --- persistence --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "trench": self.trench,
            "streams": [[r.conduit, r.name] for r in sorted(self.streams)],
            "conduits": {
                name: {"slot": c.slot, "addresses": list(c.addresses)}
                for name, c in sorted(self.conduits.items())
            },
            "identifiers": {
                f"{conduit}/{stream}": n for (conduit, stream), n in sorted(self.remembered.items())
            },
            "vips": sorted(self.vips),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], now: float) -> TapState:
        """What a target that wrote ``data`` had open; identifiers are asked for again, and
        conduits without a stream leave. ValueError when ``data`` is not such a state."""
        try:
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            state = cls()
            state.vips = tuple(sorted(str(v) for v in data.get("vips", ())))
            for key, n in data.get("identifiers", {}).items():
                conduit, _, stream = str(key).rpartition("/")
                if conduit and stream and isinstance(n, int) and n > 0:
                    state.remembered[(conduit, stream)] = n
            trench = data.get("trench")
            if trench is None:
                return state
            state.trench = check_name("trench", str(trench))
            slots: set[int] = set()
            for name, c in data.get("conduits", {}).items():
                slot = int(c["slot"])
                if not 0 <= slot < MAX_SLOTS or slot in slots:
                    raise ValueError(f"conduit {name}: bad slot {slot}")
                slots.add(slot)
                state.conduits[check_name("conduit", str(name))] = ConduitEntry(
                    slot, now, tuple(str(a) for a in c.get("addresses", ()))
                )
            for conduit, stream in data.get("streams", ()):
                ref = StreamRef(state.trench, str(conduit), check_name("stream", str(stream)))
                if ref.conduit not in state.conduits:
                    raise ValueError(f"stream {ref} has no conduit")
                state.conduits[ref.conduit].leaving_since = None
                # asked for again at once: it was ours a moment ago
                state.streams[ref] = StreamEntry(identifier=state.remembered.get(ref.key))
            if not state.conduits:
                state.trench = None
            return state
        except (KeyError, TypeError, AttributeError, InvalidStream) as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from None


def registered_by_stream(
    targets: Iterable[tuple[str, str, Sequence[str], str, bool]],
) -> dict[StreamKey, list[Registered]]:
    """Group registry entries ``(conduit, stream, ips, identifier text, enabled)`` by stream;
    entries whose identifier is not a positive integer are left out."""
    out: dict[StreamKey, list[Registered]] = {}
    for conduit, stream, ips, text, enabled in targets:
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            continue
        out.setdefault((conduit, stream), []).append(Registered(tuple(ips), int(text), enabled))
    return out
