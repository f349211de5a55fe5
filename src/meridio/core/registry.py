"""The NSP target registry: Meridio's ``nsp.v1.TargetRegistry`` semantics, as a pure object.

No I/O and no clock: every time is a float of seconds passed in by the caller. The NSP server passes
wall-clock time (``time.time()``) so that timestamps persisted by :mod:`meridio.store.registry`
still mean something after a restart.

Semantics
---------
* **Key.** A target is identified by its IPs, its type and its stream (see :func:`target_key`)::

      "<canonical IPs, sorted, comma separated>-<type number>-<stream>.<conduit>.<trench>"

  for example ``"172.16.1.3/24,fd00::3/64-0-stream-a.conduit-a.trench-a"`` or, for a frontend
  registered with its trench only, ``"192.0.2.7/24-1-..trench-a"``. Each IP is canonicalised with
  :mod:`ipaddress`: a CIDR keeps its host bits and prefix (``"172.16.1.3/24"`` stays as given,
  ``"FD00::0003/64"`` becomes ``"fd00::3/64"``, a dotted netmask becomes a prefix length); a bare
  address stays bare. The list is sorted numerically: IPv4 before IPv6, then by address, then by
  prefix length; a string that does not parse keeps its text and sorts last. Duplicates collapse.
  The key is an identity, not a format to parse back: names containing ``-`` or ``.`` make it
  ambiguous in theory, but two different configured streams would have to spell the same dotted
  path for two live targets to collide.
* **What is stored.** A copy of the registered target with canonical, sorted IPs; the context as
  sent (a later registration replaces it wholesale); the managed status; the type; and the stream
  reduced to what identifies it (stream name, ``max_targets``, conduit name, trench name; a
  conduit's port NATs are configuration, not part of a registration). A target registered with no
  stream names and no ``max_targets`` is stored with its stream unset. Stored targets are never
  mutated in place (a change stores a new object), so :meth:`TargetRegistry.snapshot` hands them
  out without copying: callers must treat them as read-only.
* **Status.** A new key is always stored ``DISABLED``, whatever status it asks for. A later
  registration with ``ENABLED`` enables it and one with ``DISABLED`` disables it (TAPA disables
  before it unregisters); any other status value leaves the status as it is (:func:`validate`
  rejects those values before they get here).
* **Keepalive.** Every registration refreshes the entry's ``last_seen``. A registration that changes
  nothing else returns ``False`` and leaves :attr:`TargetRegistry.generation` alone, so watchers
  are not woken by keepalives. An entry whose ``last_seen + entry_timeout <= now`` is expired by
  :meth:`TargetRegistry.expire`; :meth:`TargetRegistry.next_expiry` gives the earliest such time so
  the server can sleep until then.
* **Generation.** An integer that grows by one for every stored change (a key added, changed,
  removed, expired or restored to a different value). Watch handlers compare it with the value they
  last sent and re-send a full filtered snapshot when it moved: level-triggered, latest value wins.
* **Watch filter.** See :func:`matches`.
* **Validation** happens before the registry is touched, in :func:`validate`.
"""

from __future__ import annotations

import heapq
import ipaddress
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, cast

from meridio.api.nsp.v1 import Conduit, Stream, Target, TargetStatus, TargetType, Trench
from meridio.core import names, wire
from meridio.core.names import describe, name_problem
from meridio.core.wire import encode_varint

__all__ = [
    "DEFAULT_ENTRY_TIMEOUT",
    "DEFAULT_MAX_TARGETS",
    "IDENTIFIER",
    "MAX_CONTEXT_ENTRIES",
    "MAX_CONTEXT_KEY_LENGTH",
    "MAX_CONTEXT_VALUE_LENGTH",
    "MAX_IPS",
    "MAX_IP_LENGTH",
    "MAX_NAME_LENGTH",
    "Entry",
    "InvalidTarget",
    "RegistryView",
    "StreamLookup",
    "TargetRegistry",
    "canonical_ip",
    "canonical_ips",
    "canonical_target",
    "encode_stored",
    "matches",
    "stream_path",
    "target_key",
    "validate",
]

DEFAULT_ENTRY_TIMEOUT: Final = 60.0
"""Meridio's ``NSM_ENTRY_TIMEOUT`` default, in seconds."""
DEFAULT_MAX_TARGETS: Final = 100
"""Meridio's default ``max-targets``; used when the configuration reports 0 (unset)."""
IDENTIFIER: Final = "identifier"
"""The context key that carries a DEFAULT target's identifier, ``"1"`` .. ``"<max_targets>"``."""
MAX_IPS: Final = 16
MAX_IP_LENGTH: Final = 64
MAX_CONTEXT_ENTRIES: Final = 32
MAX_CONTEXT_KEY_LENGTH: Final = 64
MAX_CONTEXT_VALUE_LENGTH: Final = 1024
MAX_NAME_LENGTH: Final = names.MAX_NAME_LENGTH

_ENABLED: Final = int(TargetStatus.ENABLED)
_DISABLED: Final = int(TargetStatus.DISABLED)
_ANY: Final = int(TargetStatus.ANY)
_DEFAULT: Final = int(TargetType.DEFAULT)
_FRONTEND: Final = int(TargetType.FRONTEND)

StreamLookup = Callable[[str, str, str], int | None]
"""``lookup_stream(trench, conduit, stream)``: its ``max_targets``, None if it is unknown."""


class InvalidTarget(ValueError):
    """A registration that must be refused; the message says exactly why."""


# --- canonical forms -------------------------------------------------------------------------

_IpSortKey = tuple[int, int, int, str]


@lru_cache(maxsize=8192)
def _canonical(ip: str) -> tuple[_IpSortKey, str]:
    """(sort key, canonical text) of one IP string; text that does not parse is kept as is."""
    if "%" not in ip:  # scoped IPv6 addresses are not target addresses; keep them verbatim
        try:
            if "/" in ip:
                iface = ipaddress.ip_interface(ip)
                return (iface.version, int(iface.ip), iface.network.prefixlen, ""), str(iface)
            addr = ipaddress.ip_address(ip)
            return (addr.version, int(addr), -1, ""), str(addr)
        except ValueError:
            pass
    return (99, 0, 0, ip), ip


def canonical_ip(ip: str) -> str:
    """The canonical text of one IP or CIDR (unchanged if it does not parse)."""
    return _canonical(ip)[1]


def canonical_ips(ips: Iterable[str]) -> list[str]:
    """The canonical IPs, deduplicated and in the canonical order used by keys."""
    pairs = {_canonical(ip) for ip in ips}
    return [text for _, text in sorted(pairs)]


_f = wire.field


def _ips(target: Target) -> list[str]:
    return cast(list[str], _f(target, "ips", ()))


def _context(target: Target) -> dict[str, str]:
    return cast(dict[str, str], _f(target, "context", _NO_CONTEXT))


def _stream(target: Target) -> Stream | None:
    return cast(Stream | None, _f(target, "stream", None))


_NO_CONTEXT: Final[dict[str, str]] = {}


def stream_path(stream: Stream | None) -> tuple[str, str, str]:
    """``(stream name, conduit name, trench name)``; an unset level gives empty names."""
    if stream is None:
        return "", "", ""
    conduit = _f(stream, "conduit", None)
    trench = _f(conduit, "trench", None) if conduit is not None else None
    return (
        cast(str, _f(stream, "name", "") or ""),
        cast(str, _f(conduit, "name", "") or "") if conduit is not None else "",
        cast(str, _f(trench, "name", "") or "") if trench is not None else "",
    )


def _key(ips: list[str], type_: int, path: tuple[str, str, str]) -> str:
    return f"{','.join(ips)}-{type_}-{path[0]}.{path[1]}.{path[2]}"


def target_key(target: Target) -> str:
    """The registry key of *target* (see the module documentation for the format)."""
    return _key(
        canonical_ips(_ips(target)), int(_f(target, "type", 0)), stream_path(_stream(target))
    )


def _stored_stream(path: tuple[str, str, str], max_targets: int) -> Stream | None:
    if not any(path) and not max_targets:
        return None
    # wire.build is Stream(name=..., ...) without betterproto's slow constructor: the registry
    # builds a stored target on every change.
    return cast(
        Stream,
        wire.build(
            Stream,
            name=path[0],
            conduit=wire.build(Conduit, name=path[1], trench=wire.build(Trench, name=path[2])),
            max_targets=max_targets,
        ),
    )


def _max_targets(stream: Stream | None) -> int:
    return int(_f(stream, "max_targets", 0) or 0) if stream is not None else 0


_STATUSES: Final = {int(m.value): m for m in TargetStatus}
_TYPES: Final = {int(m.value): m for m in TargetType}


def _make_target(
    ips: list[str],
    context: dict[str, str],
    status: int,
    type_: int,
    path: tuple[str, str, str],
    max_targets: int,
) -> Target:
    fields: dict[str, object] = {
        "ips": ips,
        "context": context,
        "status": _STATUSES[status],
        "type": _TYPES.get(type_, type_),
    }
    stream = _stored_stream(path, max_targets)
    if stream is not None:
        fields["stream"] = stream
    return cast(Target, wire.build(Target, **fields))


def canonical_target(target: Target) -> Target:
    """A new target in the stored form (canonical IPs, reduced stream), keeping its status."""
    status = int(_f(target, "status", 0))
    return _make_target(
        canonical_ips(_ips(target)),
        dict(_context(target)),
        status if status in (_ENABLED, _DISABLED) else _DISABLED,
        int(_f(target, "type", 0)),
        stream_path(_stream(target)),
        _max_targets(_stream(target)),
    )


def _len_field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field whose one-byte tag is ``tag``."""
    n = len(payload)
    return bytes((tag, n)) + payload if n < 0x80 else bytes((tag,)) + encode_varint(n) + payload


def encode_stored(target: Target) -> bytes:
    """``bytes(target)`` for a target in the stored form, without betterproto's slow encoder.

    Only for targets built by this module (:func:`canonical_target`, :class:`TargetRegistry`):
    their stream, when set, is a Stream with a Conduit with a Trench, each set explicitly (so
    betterproto writes them even when empty), and no port NATs. Tested against ``bytes()``.
    """
    out = bytearray()
    for ip in _ips(target):
        out += _len_field(0x0A, ip.encode())
    for key, value in _context(target).items():
        entry = (_len_field(0x0A, key.encode()) if key else b"") + (
            _len_field(0x12, value.encode()) if value else b""
        )
        if entry:
            out += _len_field(0x12, entry)
    status = int(_f(target, "status", 0))
    if status:
        out += b"\x18" + encode_varint(status)
    type_ = int(_f(target, "type", 0))
    if type_:
        out += b"\x20" + encode_varint(type_)
    stream = _stream(target)
    if stream is not None and object.__getattribute__(stream, "_serialized_on_wire"):
        name, conduit, trench = stream_path(stream)
        trench_payload = _len_field(0x0A, trench.encode()) if trench else b""
        conduit_payload = (_len_field(0x0A, conduit.encode()) if conduit else b"") + _len_field(
            0x12, trench_payload
        )
        max_targets = _max_targets(stream)
        stream_payload = (
            (_len_field(0x0A, name.encode()) if name else b"")
            + _len_field(0x12, conduit_payload)
            + (b"\x18" + encode_varint(max_targets) if max_targets else b"")
        )
        out += _len_field(0x2A, stream_payload)
    return bytes(out)


_Facet = tuple[int, int, tuple[str, str, str], Target, bytes]
"""(status, type, stream path, stored target, its wire bytes) of one entry."""


class RegistryView:
    """The registry's targets as they were at one generation: read-only, shared by readers.

    The NSP publishes a view once its changes are committed, and Watch replies are built from
    it, so watchers never see a change the disk does not have yet.
    """

    __slots__ = ("_facets", "generation")

    def __init__(self, generation: int, facets: list[_Facet]) -> None:
        self.generation = generation
        self._facets = facets

    def __len__(self) -> int:
        return len(self._facets)

    def targets(self) -> list[Target]:
        """Every target, ordered by key."""
        return [f[3] for f in self._facets]

    def snapshot(self, filter: Target) -> list[Target]:
        """The targets that *filter* selects (see :func:`matches`), ordered by key."""
        return [f[3] for f in self._select(filter)]

    def wire(self, filter: Target) -> list[bytes]:
        """The serialized targets that *filter* selects, ordered by key."""
        return [f[4] for f in self._select(filter)]

    def _select(self, filter: Target) -> list[_Facet]:
        wanted = int(_f(filter, "status", 0))
        kind = int(_f(filter, "type", 0))
        f_stream, f_conduit, f_trench = stream_path(_stream(filter))
        return [
            facet
            for facet in self._facets
            if wanted in (_ANY, facet[0])
            and kind == facet[1]
            and (not f_stream or f_stream == facet[2][0])
            and (not f_conduit or f_conduit == facet[2][1])
            and (not f_trench or f_trench == facet[2][2])
        ]


# --- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One registered target: its key, the stored target (read-only) and its last refresh time."""

    key: str
    target: Target
    last_seen: float


class TargetRegistry:
    """In-memory target registry. Not thread-safe; every time is passed in (seconds)."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._view = RegistryView(0, [])
        # The view's contents kept up to date by key as entries change: keys in order, and the
        # facet of each (same positions); keys changed since the last view are in _stale.
        self._order: list[str] = []
        self._facets: list[_Facet] = []
        self._stale: set[str] = set()
        # Min-heap of (last_seen, tie-breaker, entry); an item is stale once its entry is no longer
        # the one stored under its key. Stale items are dropped lazily and compacted in bulk.
        self._heap: list[tuple[float, int, Entry]] = []
        self._tick = 0
        self._generation = 0

    # -- reading

    @property
    def generation(self) -> int:
        """Grows by one on every stored change; unchanged by pure keepalives."""
        return self._generation

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Every entry, ordered by key."""
        return [self._entries[k] for k in sorted(self._entries)]

    def all(self) -> list[Target]:
        """Every stored target, ordered by key (whatever its status or type)."""
        return [self._entries[k].target for k in sorted(self._entries)]

    def snapshot(self, filter: Target) -> list[Target]:
        """The targets that *filter* selects (see :func:`matches`), ordered by key."""
        return self.view().snapshot(filter)

    def view(self) -> RegistryView:
        """The current targets as a :class:`RegistryView` (one per generation, shared).

        Equivalent to testing :func:`matches` on every entry, but each target's status, type,
        stream path and wire bytes are computed once per stored target instead of once per
        call: many watchers ask after every change, and reading betterproto fields is what costs.
        """
        if self._view.generation != self._generation:
            order, facets = self._order, self._facets
            for key in self._stale:
                entry = self._entries.get(key)
                i = bisect_left(order, key)
                present = i < len(order) and order[i] == key
                if entry is None:
                    if present:
                        del order[i], facets[i]
                    continue
                if present and facets[i][3] is entry.target:
                    continue
                target = entry.target
                facet = (
                    int(_f(target, "status", 0)),
                    int(_f(target, "type", 0)),
                    stream_path(_stream(target)),
                    target,
                    encode_stored(target),
                )
                if present:
                    facets[i] = facet
                else:
                    order.insert(i, key)
                    facets.insert(i, facet)
            self._stale.clear()
            self._view = RegistryView(self._generation, facets.copy())
        return self._view

    def wire(self, entry: Entry) -> bytes:
        """``bytes(entry.target)``, from the view's facets when they have it."""
        i = bisect_left(self._order, entry.key)
        if i < len(self._order) and self._order[i] == entry.key:
            facet = self._facets[i]
            if facet[3] is entry.target:
                return facet[4]
        return encode_stored(entry.target)

    # -- changing

    def register(self, target: Target, now: float) -> bool:
        """Add or refresh *target*; True if the stored state changed (False for a keepalive)."""
        return self.register_entry(target, now)[0]

    def register_entry(self, target: Target, now: float) -> tuple[bool, str, Entry | None]:
        """:meth:`register`, with the key of *target* and the entry it had before (None)."""
        ips = canonical_ips(_ips(target))
        type_ = int(_f(target, "type", 0))
        path = stream_path(_stream(target))
        key = _key(ips, type_, path)
        max_targets = _max_targets(_stream(target))
        context = _context(target)
        old = self._entries.get(key)
        if old is None:
            stored = _make_target(ips, dict(context), _DISABLED, type_, path, max_targets)
            self._put(Entry(key, stored, now))
            self._generation += 1
            return True, key, None
        current = old.target
        asked = int(_f(target, "status", 0))
        status = asked if asked in (_ENABLED, _DISABLED) else int(_f(current, "status", 0))
        if (
            status == int(_f(current, "status", 0))
            and context == _context(current)
            and max_targets == _max_targets(_stream(current))
        ):
            # Same key means same IPs, type and stream path: only the keepalive moves.
            self._put(Entry(key, current, now))
            return False, key, old
        stored = _make_target(ips, dict(context), status, type_, path, max_targets)
        self._put(Entry(key, stored, now))
        self._generation += 1
        return True, key, old

    def unregister(self, target: Target, now: float) -> bool:
        """Remove *target* (silently nothing if unknown); True if it was there.

        *now* is accepted for symmetry with :meth:`register` and is not used.
        """
        del now
        return self.remove(target_key(target)) is not None

    def remove(self, key: str) -> Entry | None:
        """Remove the entry under *key*; return it, or None if there was none."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._generation += 1
            self._stale.add(key)
        return entry

    def expire(self, now: float, entry_timeout: float) -> list[str]:
        """Remove entries with ``last_seen + entry_timeout <= now``; return their keys, sorted."""
        return [e.key for e in self.pop_expired(now, entry_timeout)]

    def pop_expired(self, now: float, entry_timeout: float) -> list[Entry]:
        """Like :meth:`expire` but return the removed entries (ordered by key)."""
        heap = self._heap
        removed: list[Entry] = []
        while heap and heap[0][0] + entry_timeout <= now:
            entry = heapq.heappop(heap)[2]
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
                self._stale.add(entry.key)
                removed.append(entry)
        self._generation += len(removed)
        removed.sort(key=lambda e: e.key)
        return removed

    def next_expiry(self, entry_timeout: float) -> float | None:
        """The earliest time at which :meth:`expire` would remove something, or None if empty."""
        heap = self._heap
        while heap and self._entries.get(heap[0][2].key) is not heap[0][2]:
            heapq.heappop(heap)
        return heap[0][0] + entry_timeout if heap else None

    def restore(self, key: str, entry: Entry | None) -> None:
        """Set the slot *key* to *entry* (None: absent), as it was before a change.

        Used to roll back a change whose persistence failed, and to load persisted entries. The
        generation moves only if the stored target changes.
        """
        current = self._entries.get(key)
        before = current.target if current is not None else None
        if entry is None:
            if current is not None:
                del self._entries[key]
                self._stale.add(key)
        else:
            if entry.key != key:
                raise ValueError(f"entry key {entry.key!r} does not match {key!r}")
            self._put(entry)
        if before is not (entry.target if entry is not None else None):
            self._generation += 1

    def _put(self, entry: Entry) -> None:
        self._entries[entry.key] = entry
        self._stale.add(entry.key)
        self._tick += 1
        heapq.heappush(self._heap, (entry.last_seen, self._tick, entry))
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [
                (e.last_seen, i, e) for i, e in enumerate(self._entries.values(), self._tick)
            ]
            self._tick += len(self._entries)
            heapq.heapify(self._heap)


# --- Watch filter ----------------------------------------------------------------------------


def matches(filter: Target, target: Target) -> bool:
    """Whether the Watch *filter* selects *target*.

    * status: equal to the filter's, unless the filter says ``ANY``; the default value 0 means
      ``ENABLED`` only;
    * type: equal (the default value 0 means ``DEFAULT``);
    * stream: each of the filter's stream, conduit and trench names, when non-empty, must equal
      the target's; an empty name (or an unset stream) is a wildcard at that level.
    """
    wanted = int(_f(filter, "status", 0))
    if wanted != _ANY and wanted != int(_f(target, "status", 0)):
        return False
    if int(_f(filter, "type", 0)) != int(_f(target, "type", 0)):
        return False
    f_path = stream_path(_stream(filter))
    if not any(f_path):
        return True
    t_path = stream_path(_stream(target))
    return all(not f or f == t for f, t in zip(f_path, t_path, strict=True))


# --- validation ------------------------------------------------------------------------------


def _show(text: str, limit: int = 64) -> str:
    """Quote *text* for an error message, shortened if long."""
    return f'"{text}"' if len(text) <= limit else f'"{text[:limit]}..."'


@lru_cache(maxsize=8192)
def _address_of(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """The address of one IP or CIDR, or why it is refused (cached: targets keep their IPs)."""
    if len(ip) > MAX_IP_LENGTH:
        return f"IP {_show(ip)} too long: {len(ip)} characters"
    if "%" in ip:
        return f"IP {_show(ip)}: scoped addresses are not supported"
    try:
        return ipaddress.ip_interface(ip).ip if "/" in ip else ipaddress.ip_address(ip)
    except ValueError:
        return f"IP {_show(ip)} is not an IP address or CIDR"


def _validate_ips(ips: list[str]) -> None:
    if not ips:
        raise InvalidTarget("at least one IP is required")
    if len(ips) > MAX_IPS:
        raise InvalidTarget(f"too many IPs: {len(ips)} (at most {MAX_IPS})")
    seen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for ip in ips:
        address = _address_of(ip)
        if isinstance(address, str):
            raise InvalidTarget(address)
        if address in seen:
            raise InvalidTarget(
                f"duplicate IP {_show(ip)} (same address as {_show(seen[address])})"
            )
        seen[address] = ip


def _validate_context(context: dict[str, str]) -> None:
    if len(context) > MAX_CONTEXT_ENTRIES:
        raise InvalidTarget(
            f"too many context entries: {len(context)} (at most {MAX_CONTEXT_ENTRIES})"
        )
    for key, value in context.items():
        if not key:
            raise InvalidTarget("context key must not be empty")
        if len(key) > MAX_CONTEXT_KEY_LENGTH:
            raise InvalidTarget(
                f"context key {_show(key)} too long: {len(key)} characters "
                f"(at most {MAX_CONTEXT_KEY_LENGTH})"
            )
        if len(value) > MAX_CONTEXT_VALUE_LENGTH:
            raise InvalidTarget(
                f"context value for key {_show(key)} too long: {len(value)} characters "
                f"(at most {MAX_CONTEXT_VALUE_LENGTH})"
            )


def _validate_identifier(value: str, max_targets: int | None, stream: str) -> None:
    if not (value.isascii() and value.isdigit()):
        raise InvalidTarget(f"identifier {_show(value)} is not a decimal integer")
    number = int(value)
    if max_targets is None:
        if number < 1:
            raise InvalidTarget(f"identifier {_show(value)} must be at least 1")
    elif not 1 <= number <= max_targets:
        raise InvalidTarget(
            f"identifier {_show(value)} out of range 1..{max_targets} for stream {stream}"
        )


def validate(target: Target, lookup_stream: StreamLookup, *, removal: bool = False) -> None:
    """Refuse a registration that must not be stored, raising :class:`InvalidTarget`.

    Checks, in order:

    * status is ``ENABLED`` or ``DISABLED`` (``ANY`` is only meaningful in a Watch filter);
    * type is ``DEFAULT`` or ``FRONTEND``;
    * 1..:data:`MAX_IPS` IPs, each an address or CIDR (``"172.16.1.3/24"``, ``"fd00::3/64"``,
      ``"192.0.2.1"``), no scoped IPv6 addresses, no two IPs with the same address (whatever the
      prefix length); they are stored in canonical form (``"198.18.0.1/032"`` as
      ``"198.18.0.1/32"``, a dotted netmask as its prefix length);
    * context: at most :data:`MAX_CONTEXT_ENTRIES` entries, keys non-empty and at most
      :data:`MAX_CONTEXT_KEY_LENGTH` characters, values at most :data:`MAX_CONTEXT_VALUE_LENGTH`;
    * stream, conduit and trench names, when given, are names (:mod:`meridio.core.names`:
      printable, no whitespace or path separator, at most :data:`MAX_NAME_LENGTH` characters);
    * ``DEFAULT`` targets: stream, conduit and trench names all non-empty;
      ``lookup_stream(trench, conduit, stream)`` must give the stream's ``max_targets`` (None
      means the stream does not exist; 0 means unset and counts as :data:`DEFAULT_MAX_TARGETS`);
      ``context["identifier"]`` is required and must be a decimal integer in 1..max_targets;
    * ``FRONTEND`` targets (decision): the stream is optional and may be partial, as Meridio's
      frontend registers with its trench only. The names given must be a top-down prefix of the
      hierarchy (a conduit needs a trench, a stream needs a conduit); when a stream name is given
      the stream must exist. The identifier is optional; when present it must be a decimal
      integer of at least 1, and within 1..max_targets when a stream was named.

    With ``removal`` (an Unregister) the same checks apply except those about what is stored
    rather than which target it is: the status, whether the stream still exists in the
    configuration (it may have been removed since the target registered), and the identifier.
    """
    status = int(_f(target, "status", 0))
    if not removal and status not in (_ENABLED, _DISABLED):
        if status == _ANY:
            raise InvalidTarget("status ANY is only valid in a Watch filter, not in a registration")
        raise InvalidTarget(f"unknown target status {status}")
    type_ = int(_f(target, "type", 0))
    if type_ not in (_DEFAULT, _FRONTEND):
        raise InvalidTarget(f"unknown target type {type_}")
    _validate_ips(_ips(target))
    context = _context(target)
    _validate_context(context)

    stream, conduit, trench = stream_path(_stream(target))
    for level, name in (("stream", stream), ("conduit", conduit), ("trench", trench)):
        if name:
            problem = name_problem(name, MAX_NAME_LENGTH)
            if problem is not None:
                raise InvalidTarget(describe(level, name, problem))
    if type_ == _DEFAULT:
        for level, name in (("stream", stream), ("conduit", conduit), ("trench", trench)):
            if not name:
                raise InvalidTarget(f"{level} name is required for DEFAULT targets")
    else:
        if conduit and not trench:
            raise InvalidTarget(f"conduit {conduit} given without a trench name")
        if stream and not conduit:
            raise InvalidTarget(f"stream {stream} given without a conduit name")
    if removal:
        return

    max_targets: int | None = None
    if stream:
        found = lookup_stream(trench, conduit, stream)
        if found is None:
            raise InvalidTarget(
                f"stream {stream} of conduit {conduit} in trench {trench} does not exist"
            )
        max_targets = found if found > 0 else DEFAULT_MAX_TARGETS

    identifier = context.get(IDENTIFIER)
    if identifier is None:
        if type_ == _DEFAULT:
            raise InvalidTarget(f'context "{IDENTIFIER}" is required for DEFAULT targets')
        return
    _validate_identifier(identifier, max_targets, stream)
