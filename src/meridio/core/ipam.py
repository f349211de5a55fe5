"""Pure IPAM allocator with Meridio's ``ipam.v1`` semantics.

No I/O, no clock: every timestamp is passed in as float seconds by the caller.

Hierarchy, kept separately per trench and per IP family::

    trench prefix (configuration)
      -> conduit prefix, one per (trench, conduit), first-fit inside the trench prefix
        -> node prefix, one per (trench, conduit, node), first-fit inside the conduit prefix
          -> child address, one per child name, first-fit inside the node prefix

Every trench uses the configured trench prefix of its family as its own address space, like a
separate Meridio IPAM instance per trench: the no-overlap guarantees hold inside one
(trench, family); two trenches are independent networks and may use the same addresses.

Child names are scoped per node prefix, i.e. per (trench, conduit, node, family), as in Meridio,
whose proxy asks for ``<connId>-src``, ``<connId>-dst`` and ``bridge`` on every node.

Changes are described, not performed behind the caller's back. Every mutation is split into a
``plan_*`` method, which validates the request and returns the list of :data:`Change` records it
would cause without touching the state, and :meth:`IpamAllocator.apply`, which performs such a
list. The convenience methods (:meth:`IpamAllocator.allocate`, ...) do both. A persistence layer
calls ``plan_*``, writes the records in one transaction and only then calls ``apply``, so memory
never runs ahead of the disk. A plan is only valid for the state it was made on: apply it before
any other mutation. ``apply`` also validates every record, which is how a stored state
is loaded back (:meth:`IpamAllocator.from_records`).

Lease and garbage collection (:meth:`IpamAllocator.collect`), only when ``lease_time`` is set:

- a child whose last Allocate is more than ``lease_time`` seconds before ``now`` is removed;
- a node prefix is removed when it has no child left (after the step above) and its last
  Allocate (or its creation) is more than ``lease_time`` seconds before ``now``;
- conduit prefixes are never collected: they are few (bounded by the number of conduits), and
  keeping them keeps a conduit's subnet stable. :meth:`IpamAllocator.remove_conduit` removes one
  explicitly, e.g. when the conduit is deleted from the configuration;
- ``since`` (given by a restarted IPAM: the time it started) is the earliest time a lease counts
  from, so every restored child gets a whole ``lease_time`` for its owner to refresh it.

Names in requests (trench, conduit, node, child) must be names as :mod:`meridio.core.names`
defines them (printable, no whitespace or path separator, at most 253 characters); stored
records only need to be non-empty and without NUL, so a database written before keeps loading.
"""

from __future__ import annotations

import enum
import math
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, TypeAlias

from meridio.core import names
from meridio.core.names import describe, name_problem

__all__ = [
    "DEFAULT_IPV4_TRENCH_PREFIX",
    "DEFAULT_IPV6_TRENCH_PREFIX",
    "MAX_NAME_LENGTH",
    "Allocation",
    "Change",
    "ChildAdded",
    "ChildInfo",
    "ChildKey",
    "ChildRefreshed",
    "ChildRemoved",
    "ConduitKey",
    "ConduitPrefixAdded",
    "ConduitPrefixRemoved",
    "IPAddress",
    "IPNetwork",
    "IpFamily",
    "IpamAllocator",
    "IpamConfig",
    "IpamError",
    "IpamExhausted",
    "IpamInvalid",
    "IpamStateError",
    "NodeKey",
    "NodePrefixAdded",
    "NodePrefixRefreshed",
    "NodePrefixRemoved",
    "OffsetPool",
    "changes_summary",
    "parse_family",
]

IPNetwork: TypeAlias = IPv4Network | IPv6Network
IPAddress: TypeAlias = IPv4Address | IPv6Address

#: Longest accepted trench, conduit, node or child name.
MAX_NAME_LENGTH = names.MAX_NAME_LENGTH


# --------------------------------------------------------------------------------------------
# Exceptions


class IpamError(Exception):
    """Base class of every IPAM error."""


class IpamInvalid(IpamError, ValueError):
    """A malformed request: empty name, unknown or disabled family, ... State is unchanged."""


class IpamExhausted(IpamError):
    """No free prefix or address is left. State is unchanged.

    ``prefix`` is the prefix that is full and ``level`` what was asked for in it:
    ``"conduit"`` (a conduit prefix in a trench prefix), ``"node"`` (a node prefix in a conduit
    prefix) or ``"address"`` (a child address in a node prefix).
    """

    def __init__(self, message: str, prefix: IPNetwork, level: str) -> None:
        super().__init__(message)
        self.prefix = prefix
        self.level = level


class IpamStateError(IpamError):
    """A change record does not fit the current state or configuration.

    Raised by :meth:`IpamAllocator.apply`, e.g. when a stored state is loaded with a
    configuration it was not made with.
    """


# --------------------------------------------------------------------------------------------
# Families and configuration


class IpFamily(enum.StrEnum):
    """An IP family; its value (``"ipv4"``/``"ipv6"``) is what the store and listings use."""

    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @property
    def bits(self) -> int:
        return 32 if self is IpFamily.IPV4 else 128


_FAMILY_NAMES = {"ipv4": IpFamily.IPV4, "ipv6": IpFamily.IPV6}


def parse_family(value: IpFamily | str) -> IpFamily:
    """Return the family for an :class:`IpFamily` or ``"ipv4"``/``"ipv6"`` (any case).

    Raises :class:`IpamInvalid` for anything else.
    """
    if isinstance(value, IpFamily):
        return value
    if isinstance(value, str):
        family = _FAMILY_NAMES.get(value.strip().lower())
        if family is not None:
            return family
    raise IpamInvalid(f"unknown IP family {value!r} (expected 'ipv4' or 'ipv6')")


def _network(family: IpFamily, value: int, prefix_length: int) -> IPNetwork:
    if family is IpFamily.IPV4:
        return IPv4Network((value, prefix_length))
    return IPv6Network((value, prefix_length))


def _address(family: IpFamily, value: int) -> IPAddress:
    if family is IpFamily.IPV4:
        return IPv4Address(value)
    return IPv6Address(value)


def _inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    return (
        inner.version == outer.version
        and int(outer.network_address) <= int(inner.network_address)
        and int(inner.broadcast_address) <= int(outer.broadcast_address)
    )


def _family_of(obj: IPNetwork | IPAddress) -> IpFamily:
    return IpFamily.IPV4 if obj.version == 4 else IpFamily.IPV6


#: Meridio's default trench prefixes.
DEFAULT_IPV4_TRENCH_PREFIX = IPv4Network("169.255.0.0/16")
DEFAULT_IPV6_TRENCH_PREFIX = IPv6Network("fd00::/48")


@dataclass(frozen=True)
class IpamConfig:
    """Prefixes and prefix lengths, per family, plus the lease time.

    Defaults are Meridio's: IPv4 169.255.0.0/16 -> /20 -> /24, IPv6 fd00::/48 -> /56 -> /64,
    dual-stack, no lease (nothing is ever collected). Set a family's trench prefix to ``None`` to
    disable that family.
    """

    ipv4_trench_prefix: IPv4Network | None = DEFAULT_IPV4_TRENCH_PREFIX
    ipv4_conduit_prefix_length: int = 20
    ipv4_node_prefix_length: int = 24
    ipv6_trench_prefix: IPv6Network | None = DEFAULT_IPV6_TRENCH_PREFIX
    ipv6_conduit_prefix_length: int = 56
    ipv6_node_prefix_length: int = 64
    lease_time: float | None = None

    def __post_init__(self) -> None:
        for family in IpFamily:
            self._validate_family(family)
        lease = self.lease_time
        if lease is not None and (
            isinstance(lease, bool) or not isinstance(lease, int | float) or not lease > 0
        ):
            raise ValueError(f"lease_time must be a positive number of seconds or None: {lease!r}")

    def _validate_family(self, family: IpFamily) -> None:
        v = family.value
        trench = self.trench_prefix(family)
        conduit_len = self.conduit_prefix_length(family)
        node_len = self.node_prefix_length(family)
        expected_type = IPv4Network if family is IpFamily.IPV4 else IPv6Network
        for setting, length in (
            (f"{v}_conduit_prefix_length", conduit_len),
            (f"{v}_node_prefix_length", node_len),
        ):
            if isinstance(length, bool) or not isinstance(length, int):
                raise ValueError(f"{setting} must be an integer: {length!r}")
        if trench is not None and not isinstance(trench, expected_type):
            raise ValueError(
                f"{v}_trench_prefix must be an {expected_type.__name__} or None: {trench!r}"
            )
        # The first and last address of a node prefix are never handed out: a /31 (/127) would
        # hold no child at all, a /30 (/126) holds two.
        max_node_len = family.bits - 2
        if not 0 <= node_len <= max_node_len:
            raise ValueError(
                f"{v}_node_prefix_length must be between 0 and {max_node_len} (a node prefix "
                f"needs a usable address besides its first and last): {node_len}"
            )
        if not 0 <= conduit_len <= node_len:
            raise ValueError(
                f"{v}_conduit_prefix_length must be between 0 and {v}_node_prefix_length "
                f"({node_len}): {conduit_len}"
            )
        if trench is not None and trench.prefixlen > conduit_len:
            raise ValueError(
                f"{v}_trench_prefix {trench} is longer than {v}_conduit_prefix_length "
                f"({conduit_len}): a conduit prefix must fit inside the trench prefix"
            )

    def trench_prefix(self, family: IpFamily) -> IPNetwork | None:
        if family is IpFamily.IPV4:
            return self.ipv4_trench_prefix
        return self.ipv6_trench_prefix

    def conduit_prefix_length(self, family: IpFamily) -> int:
        if family is IpFamily.IPV4:
            return self.ipv4_conduit_prefix_length
        return self.ipv6_conduit_prefix_length

    def node_prefix_length(self, family: IpFamily) -> int:
        if family is IpFamily.IPV4:
            return self.ipv4_node_prefix_length
        return self.ipv6_node_prefix_length

    @property
    def families(self) -> tuple[IpFamily, ...]:
        """The enabled families."""
        return tuple(f for f in IpFamily if self.trench_prefix(f) is not None)


# --------------------------------------------------------------------------------------------
# Keys and change records


@dataclass(frozen=True, order=True)
class ConduitKey:
    family: IpFamily
    trench: str
    conduit: str


@dataclass(frozen=True, order=True)
class NodeKey:
    family: IpFamily
    trench: str
    conduit: str
    node: str

    @property
    def conduit_key(self) -> ConduitKey:
        return ConduitKey(self.family, self.trench, self.conduit)


@dataclass(frozen=True, order=True)
class ChildKey:
    """Children are named per node prefix: unique within (family, trench, conduit, node)."""

    family: IpFamily
    trench: str
    conduit: str
    node: str
    name: str

    @property
    def node_key(self) -> NodeKey:
        return NodeKey(self.family, self.trench, self.conduit, self.node)


@dataclass(frozen=True)
class ConduitPrefixAdded:
    key: ConduitKey
    prefix: IPNetwork
    updated: float


@dataclass(frozen=True)
class ConduitPrefixRemoved:
    key: ConduitKey
    prefix: IPNetwork


@dataclass(frozen=True)
class NodePrefixAdded:
    key: NodeKey
    prefix: IPNetwork
    updated: float


@dataclass(frozen=True)
class NodePrefixRefreshed:
    key: NodeKey
    updated: float


@dataclass(frozen=True)
class NodePrefixRemoved:
    key: NodeKey
    prefix: IPNetwork


@dataclass(frozen=True)
class ChildAdded:
    key: ChildKey
    address: IPAddress
    updated: float


@dataclass(frozen=True)
class ChildRefreshed:
    key: ChildKey
    updated: float


@dataclass(frozen=True)
class ChildRemoved:
    key: ChildKey
    address: IPAddress


Change: TypeAlias = (
    ConduitPrefixAdded
    | ConduitPrefixRemoved
    | NodePrefixAdded
    | NodePrefixRefreshed
    | NodePrefixRemoved
    | ChildAdded
    | ChildRefreshed
    | ChildRemoved
)


@dataclass(frozen=True)
class ChildInfo:
    """One live child, as listed by ``meridioctl ipam list``."""

    trench: str
    conduit: str
    node: str
    family: IpFamily
    prefix: IPNetwork  # the node prefix
    name: str
    address: IPAddress
    updated: float

    @property
    def prefix_length(self) -> int:
        return self.prefix.prefixlen

    def as_dict(self) -> dict[str, Any]:
        """JSON/YAML friendly form."""
        return {
            "trench": self.trench,
            "conduit": self.conduit,
            "node": self.node,
            "family": self.family.value,
            "prefix": str(self.prefix),
            "name": self.name,
            "address": str(self.address),
            "updated": self.updated,
        }


@dataclass(frozen=True)
class Allocation:
    """Result of :meth:`IpamAllocator.plan_allocate` / :meth:`IpamAllocator.allocate`."""

    address: IPAddress
    prefix_length: int
    changes: tuple[Change, ...]


# --------------------------------------------------------------------------------------------
# First-fit offset pool


class OffsetPool:
    """Integers ``lo..hi`` (inclusive), some used; hands out the smallest free one.

    The used offsets are kept in a sorted list. The smallest free offset is found by binary
    search for the first index ``i`` where ``used[i] != lo + i`` (the used offsets are distinct
    and sorted, so that predicate is monotone): O(log n), whatever the size of the range, so an
    IPv6 /64 is never enumerated. Insertion and removal are a bisect plus a list memmove.
    """

    __slots__ = ("_used", "hi", "lo")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi
        self._used: list[int] = []

    def __len__(self) -> int:
        return len(self._used)

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        i = bisect_left(self._used, offset)
        return i < len(self._used) and self._used[i] == offset

    def __iter__(self) -> Iterator[int]:
        return iter(self._used)

    @property
    def capacity(self) -> int:
        return max(0, self.hi - self.lo + 1)

    def first_free(self) -> int | None:
        used = self._used
        lo, hi = 0, len(used)
        while lo < hi:
            mid = (lo + hi) // 2
            if used[mid] == self.lo + mid:
                lo = mid + 1
            else:
                hi = mid
        candidate = self.lo + lo
        return candidate if candidate <= self.hi else None

    def add(self, offset: int) -> None:
        if not self.lo <= offset <= self.hi:
            raise ValueError(f"offset {offset} outside {self.lo}..{self.hi}")
        if offset in self:
            raise ValueError(f"offset {offset} already used")
        insort(self._used, offset)

    def remove(self, offset: int) -> None:
        i = bisect_left(self._used, offset)
        if i == len(self._used) or self._used[i] != offset:
            raise ValueError(f"offset {offset} not used")
        del self._used[i]


# --------------------------------------------------------------------------------------------
# Internal state


class _Node:
    __slots__ = ("children", "pool", "prefix", "slot", "updated")

    def __init__(self, prefix: IPNetwork, slot: int, updated: float) -> None:
        self.prefix = prefix
        self.slot = slot
        self.updated = updated
        # Offsets inside the node prefix; the first (0) and the last are never handed out.
        self.pool = OffsetPool(1, prefix.num_addresses - 2)
        self.children: dict[str, tuple[int, float]] = {}  # name -> (offset, updated)


class _Conduit:
    __slots__ = ("nodes", "pool", "prefix", "slot", "updated")

    def __init__(self, prefix: IPNetwork, slot: int, updated: float, node_len: int) -> None:
        self.prefix = prefix
        self.slot = slot
        self.updated = updated
        self.pool = OffsetPool(0, (1 << (node_len - prefix.prefixlen)) - 1)
        self.nodes: dict[str, _Node] = {}


class _Trench:
    __slots__ = ("conduits", "pool", "prefix")

    def __init__(self, prefix: IPNetwork, conduit_len: int) -> None:
        self.prefix = prefix
        self.pool = OffsetPool(0, (1 << (conduit_len - prefix.prefixlen)) - 1)
        self.conduits: dict[str, _Conduit] = {}


def _check_name(what: str, value: object) -> str:
    """A name in a request: see :mod:`meridio.core.names` (printable, no whitespace, ...)."""
    if not isinstance(value, str):
        raise IpamInvalid(f"{what} name must be a string, got {type(value).__name__}")
    problem = name_problem(value, MAX_NAME_LENGTH)
    if problem is not None:
        raise IpamInvalid(describe(what, value, problem))
    return value


def _check_stored_name(what: str, value: object) -> str:
    """A name in a stored record: only what the store needs (names accepted by an older
    version, which checked less, must still load)."""
    if not isinstance(value, str):
        raise IpamInvalid(f"{what} name must be a string, got {type(value).__name__}")
    if not value:
        raise IpamInvalid(f"{what} name must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise IpamInvalid(f"{what} name is longer than {MAX_NAME_LENGTH} characters")
    if "\x00" in value:
        raise IpamInvalid(f"{what} name must not contain NUL characters")
    return value


def _where_node(key: NodeKey) -> str:
    return f"node {key.node} of conduit {key.conduit} of trench {key.trench}"


def _where_conduit(key: ConduitKey) -> str:
    return f"conduit {key.conduit} of trench {key.trench}"


# --------------------------------------------------------------------------------------------
# The allocator


class IpamAllocator:
    """In-memory IPAM state with Meridio's ``ipam.v1`` semantics. See the module docstring."""

    def __init__(self, config: IpamConfig | None = None) -> None:
        self.config = config if config is not None else IpamConfig()
        self._trenches: dict[tuple[IpFamily, str], _Trench] = {}

    @classmethod
    def from_records(cls, config: IpamConfig, records: Iterable[Change]) -> IpamAllocator:
        """A fresh allocator with ``records`` applied (e.g. a stored state).

        Raises :class:`IpamStateError` when a record does not fit ``config``.
        """
        allocator = cls(config)
        allocator.apply(records)
        return allocator

    # ---------------------------------------------------------------- validation helpers

    def _family(self, family: IpFamily | str) -> IpFamily:
        fam = parse_family(family)
        if self.config.trench_prefix(fam) is None:
            raise IpamInvalid(f"IP family {fam.value} is disabled (no trench prefix configured)")
        return fam

    def _node_key(self, trench: str, conduit: str, node: str, family: IpFamily | str) -> NodeKey:
        _check_name("trench", trench)
        _check_name("conduit", conduit)
        _check_name("node", node)
        return NodeKey(self._family(family), trench, conduit, node)

    def _child_key(
        self, trench: str, conduit: str, node: str, family: IpFamily | str, name: str
    ) -> ChildKey:
        nk = self._node_key(trench, conduit, node, family)
        _check_name("child", name)
        return ChildKey(nk.family, nk.trench, nk.conduit, nk.node, name)

    @staticmethod
    def _check_now(now: float) -> float:
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise IpamInvalid(f"time must be a finite number of seconds: {now!r}")
        return float(now)

    # ---------------------------------------------------------------- lookups

    def _get_conduit(self, key: ConduitKey) -> _Conduit | None:
        trench = self._trenches.get((key.family, key.trench))
        return None if trench is None else trench.conduits.get(key.conduit)

    def _get_node(self, key: NodeKey) -> _Node | None:
        conduit = self._get_conduit(key.conduit_key)
        return None if conduit is None else conduit.nodes.get(key.node)

    def _trench_prefix(self, family: IpFamily) -> IPNetwork:
        prefix = self.config.trench_prefix(family)
        if prefix is None:
            raise IpamStateError(f"IP family {family.value} is disabled in the configuration")
        return prefix

    # ---------------------------------------------------------------- planning

    def plan_allocate(
        self,
        trench: str,
        conduit: str,
        node: str,
        family: IpFamily | str,
        name: str,
        now: float,
    ) -> Allocation:
        """What :meth:`allocate` would do, without changing anything."""
        key = self._child_key(trench, conduit, node, family, name)
        now = self._check_now(now)
        fam = key.family
        nk = key.node_key
        ck = nk.conduit_key
        node_len = self.config.node_prefix_length(fam)
        changes: list[Change] = []

        c = self._get_conduit(ck)
        n = None if c is None else c.nodes.get(key.node)
        if n is not None:
            node_prefix = n.prefix
            changes.append(NodePrefixRefreshed(nk, now))
            existing = n.children.get(key.name)
            if existing is not None:
                address = _address(fam, int(node_prefix.network_address) + existing[0])
                changes.append(ChildRefreshed(key, now))
                return Allocation(address, node_len, tuple(changes))
            offset = n.pool.first_free()
            if offset is None:
                raise IpamExhausted(
                    f"no free address left in {node_prefix} ({_where_node(nk)})",
                    node_prefix,
                    "address",
                )
        else:
            if c is None:
                conduit_prefix = self._next_conduit_prefix(ck)
                changes.append(ConduitPrefixAdded(ck, conduit_prefix, now))
                node_slot = 0
            else:
                conduit_prefix = c.prefix
                free = c.pool.first_free()
                if free is None:
                    raise IpamExhausted(
                        f"no free /{node_len} left in {conduit_prefix} ({_where_conduit(ck)})",
                        conduit_prefix,
                        "node",
                    )
                node_slot = free
            size = 1 << (fam.bits - node_len)
            node_prefix = _network(
                fam, int(conduit_prefix.network_address) + node_slot * size, node_len
            )
            changes.append(NodePrefixAdded(nk, node_prefix, now))
            offset = 1  # a new node prefix holds at least 4 addresses (see IpamConfig)
        address = _address(fam, int(node_prefix.network_address) + offset)
        changes.append(ChildAdded(key, address, now))
        return Allocation(address, node_len, tuple(changes))

    def _next_conduit_prefix(self, key: ConduitKey) -> IPNetwork:
        fam = key.family
        trench_prefix = self._trench_prefix(fam)
        conduit_len = self.config.conduit_prefix_length(fam)
        t = self._trenches.get((fam, key.trench))
        slot = 0 if t is None else t.pool.first_free()
        if slot is None:
            raise IpamExhausted(
                f"no free /{conduit_len} left in {trench_prefix} (trench {key.trench})",
                trench_prefix,
                "conduit",
            )
        size = 1 << (fam.bits - conduit_len)
        return _network(fam, int(trench_prefix.network_address) + slot * size, conduit_len)

    def plan_release(
        self, trench: str, conduit: str, node: str, family: IpFamily | str, name: str
    ) -> tuple[Change, ...]:
        """What :meth:`release` would do: one :class:`ChildRemoved`, or nothing if unknown."""
        key = self._child_key(trench, conduit, node, family, name)
        n = self._get_node(key.node_key)
        if n is None or key.name not in n.children:
            return ()
        offset = n.children[key.name][0]
        address = _address(key.family, int(n.prefix.network_address) + offset)
        return (ChildRemoved(key, address),)

    def _plan_remove_node(self, key: NodeKey, n: _Node) -> list[Change]:
        base = int(n.prefix.network_address)
        changes: list[Change] = [
            ChildRemoved(
                ChildKey(key.family, key.trench, key.conduit, key.node, name),
                _address(key.family, base + offset),
            )
            for name, (offset, _updated) in sorted(n.children.items())
        ]
        changes.append(NodePrefixRemoved(key, n.prefix))
        return changes

    def plan_remove_node(
        self, trench: str, conduit: str, node: str, family: IpFamily | str
    ) -> tuple[Change, ...]:
        """Remove a node prefix and all its children (e.g. the node left the cluster)."""
        key = self._node_key(trench, conduit, node, family)
        n = self._get_node(key)
        return () if n is None else tuple(self._plan_remove_node(key, n))

    def plan_remove_conduit(
        self, trench: str, conduit: str, family: IpFamily | str
    ) -> tuple[Change, ...]:
        """Remove a conduit prefix with all its node prefixes and children."""
        _check_name("trench", trench)
        _check_name("conduit", conduit)
        key = ConduitKey(self._family(family), trench, conduit)
        c = self._get_conduit(key)
        if c is None:
            return ()
        changes: list[Change] = []
        for node_name, n in sorted(c.nodes.items()):
            changes.extend(
                self._plan_remove_node(NodeKey(key.family, trench, conduit, node_name), n)
            )
        changes.append(ConduitPrefixRemoved(key, c.prefix))
        return tuple(changes)

    def plan_collect(self, now: float, *, since: float | None = None) -> tuple[Change, ...]:
        """What :meth:`collect` would do. Nothing when ``lease_time`` is None.

        ``since``: no lease counts from earlier than this time. A restarted IPAM passes the
        time it started, so every restored child and node prefix gets a whole ``lease_time``
        for its owner to refresh it, however long the IPAM was down.
        """
        lease = self.config.lease_time
        now = self._check_now(now)
        if lease is None:
            return ()
        floor = -math.inf if since is None else self._check_now(since)
        changes: list[Change] = []
        for (family, trench_name), t in sorted(self._trenches.items()):
            for conduit_name, c in sorted(t.conduits.items()):
                for node_name, n in sorted(c.nodes.items()):
                    base = int(n.prefix.network_address)
                    left = len(n.children)
                    for name, (offset, updated) in sorted(n.children.items()):
                        if now - max(updated, floor) > lease:
                            key = ChildKey(family, trench_name, conduit_name, node_name, name)
                            changes.append(ChildRemoved(key, _address(family, base + offset)))
                            left -= 1
                    if left == 0 and now - max(n.updated, floor) > lease:
                        nk = NodeKey(family, trench_name, conduit_name, node_name)
                        changes.append(NodePrefixRemoved(nk, n.prefix))
        return tuple(changes)

    # ---------------------------------------------------------------- mutations

    def allocate(
        self,
        trench: str,
        conduit: str,
        node: str,
        family: IpFamily | str,
        name: str,
        now: float,
    ) -> Allocation:
        """Allocate (or refresh) child ``name`` in the node prefix of (trench, conduit, node).

        Creates the conduit and node prefixes on first use. Idempotent by name: a known name
        gets its address back and its timestamp refreshed. Raises :class:`IpamInvalid` or
        :class:`IpamExhausted`, leaving the state unchanged.
        """
        allocation = self.plan_allocate(trench, conduit, node, family, name, now)
        self.apply(allocation.changes)
        return allocation

    def release(
        self, trench: str, conduit: str, node: str, family: IpFamily | str, name: str
    ) -> tuple[Change, ...]:
        """Remove child ``name``; silent (no change) if it does not exist."""
        changes = self.plan_release(trench, conduit, node, family, name)
        self.apply(changes)
        return changes

    def remove_node(
        self, trench: str, conduit: str, node: str, family: IpFamily | str
    ) -> tuple[Change, ...]:
        changes = self.plan_remove_node(trench, conduit, node, family)
        self.apply(changes)
        return changes

    def remove_conduit(
        self, trench: str, conduit: str, family: IpFamily | str
    ) -> tuple[Change, ...]:
        changes = self.plan_remove_conduit(trench, conduit, family)
        self.apply(changes)
        return changes

    def collect(self, now: float, *, since: float | None = None) -> tuple[Change, ...]:
        """Remove expired children and empty expired node prefixes; return what was removed."""
        changes = self.plan_collect(now, since=since)
        self.apply(changes)
        return changes

    # ---------------------------------------------------------------- apply

    def apply(self, changes: Iterable[Change]) -> None:
        """Perform change records in order, validating each against state and configuration.

        Raises :class:`IpamStateError` on the first record that does not fit; the records
        before it stay applied (planned changes always fit; this is for loading stored state).
        """
        for change in changes:
            self._apply_one(change)

    def _apply_one(self, change: Change) -> None:
        if isinstance(change, ConduitPrefixAdded):
            self._add_conduit(change)
        elif isinstance(change, NodePrefixAdded):
            self._add_node(change)
        elif isinstance(change, ChildAdded):
            self._add_child(change)
        elif isinstance(change, NodePrefixRefreshed):
            n = self._get_node(change.key)
            if n is None:
                raise IpamStateError(f"cannot refresh unknown node prefix {change.key}")
            n.updated = change.updated
        elif isinstance(change, ChildRefreshed):
            n = self._get_node(change.key.node_key)
            if n is None or change.key.name not in n.children:
                raise IpamStateError(f"cannot refresh unknown child {change.key}")
            n.children[change.key.name] = (n.children[change.key.name][0], change.updated)
        elif isinstance(change, ChildRemoved):
            n = self._get_node(change.key.node_key)
            if n is None or change.key.name not in n.children:
                raise IpamStateError(f"cannot remove unknown child {change.key}")
            offset = n.children[change.key.name][0]
            if int(n.prefix.network_address) + offset != int(change.address):
                raise IpamStateError(f"child {change.key} does not have address {change.address}")
            del n.children[change.key.name]
            n.pool.remove(offset)
        elif isinstance(change, NodePrefixRemoved):
            c = self._get_conduit(change.key.conduit_key)
            n = None if c is None else c.nodes.get(change.key.node)
            if c is None or n is None or n.prefix != change.prefix:
                raise IpamStateError(f"cannot remove unknown node prefix {change.prefix}")
            if n.children:
                raise IpamStateError(f"cannot remove node prefix {n.prefix}: it has children")
            del c.nodes[change.key.node]
            c.pool.remove(n.slot)
        elif isinstance(change, ConduitPrefixRemoved):
            key = change.key
            t = self._trenches.get((key.family, key.trench))
            c = None if t is None else t.conduits.get(key.conduit)
            if t is None or c is None or c.prefix != change.prefix:
                raise IpamStateError(f"cannot remove unknown conduit prefix {change.prefix}")
            if c.nodes:
                raise IpamStateError(f"cannot remove conduit prefix {c.prefix}: it has nodes")
            del t.conduits[key.conduit]
            t.pool.remove(c.slot)
            if not t.conduits:
                del self._trenches[(key.family, key.trench)]
        else:  # pragma: no cover - exhaustive
            raise IpamStateError(f"unknown change record {change!r}")

    def _add_conduit(self, change: ConduitPrefixAdded) -> None:
        key, prefix = change.key, change.prefix
        fam = key.family
        try:
            _check_stored_name("trench", key.trench)
            _check_stored_name("conduit", key.conduit)
        except IpamInvalid as exc:
            raise IpamStateError(f"conduit prefix {prefix}: {exc}") from None
        trench_prefix = self._trench_prefix(fam)
        conduit_len = self.config.conduit_prefix_length(fam)
        where = _where_conduit(key)
        if _family_of(prefix) is not fam or prefix.prefixlen != conduit_len:
            raise IpamStateError(
                f"conduit prefix {prefix} ({where}) does not match the configured "
                f"{fam.value} conduit prefix length /{conduit_len}"
            )
        if not _inside(prefix, trench_prefix):
            raise IpamStateError(
                f"conduit prefix {prefix} ({where}) is outside the trench prefix {trench_prefix}"
            )
        t = self._trenches.get((fam, key.trench))
        if t is not None and key.conduit in t.conduits:
            raise IpamStateError(f"{where} already has a {fam.value} conduit prefix")
        slot = (int(prefix.network_address) - int(trench_prefix.network_address)) >> (
            fam.bits - conduit_len
        )
        if t is not None and slot in t.pool:
            raise IpamStateError(f"conduit prefix {prefix} ({where}) is already in use")
        if t is None:
            t = _Trench(trench_prefix, conduit_len)
            self._trenches[(fam, key.trench)] = t
        t.pool.add(slot)
        t.conduits[key.conduit] = _Conduit(
            prefix, slot, change.updated, self.config.node_prefix_length(fam)
        )

    def _add_node(self, change: NodePrefixAdded) -> None:
        key, prefix = change.key, change.prefix
        fam = key.family
        where = _where_node(key)
        try:
            _check_stored_name("node", key.node)
        except IpamInvalid as exc:
            raise IpamStateError(f"node prefix {prefix}: {exc}") from None
        c = self._get_conduit(key.conduit_key)
        if c is None:
            raise IpamStateError(f"node prefix {prefix} ({where}): the conduit has no prefix")
        node_len = self.config.node_prefix_length(fam)
        if _family_of(prefix) is not fam or prefix.prefixlen != node_len:
            raise IpamStateError(
                f"node prefix {prefix} ({where}) does not match the configured "
                f"{fam.value} node prefix length /{node_len}"
            )
        if not _inside(prefix, c.prefix):
            raise IpamStateError(
                f"node prefix {prefix} ({where}) is outside the conduit prefix {c.prefix}"
            )
        if key.node in c.nodes:
            raise IpamStateError(f"{where} already has a {fam.value} node prefix")
        slot = (int(prefix.network_address) - int(c.prefix.network_address)) >> (
            fam.bits - node_len
        )
        if slot in c.pool:
            raise IpamStateError(f"node prefix {prefix} ({where}) is already in use")
        c.pool.add(slot)
        c.nodes[key.node] = _Node(prefix, slot, change.updated)

    def _add_child(self, change: ChildAdded) -> None:
        key, address = change.key, change.address
        try:
            _check_stored_name("child", key.name)
        except IpamInvalid as exc:
            raise IpamStateError(f"child address {address}: {exc}") from None
        n = self._get_node(key.node_key)
        where = f"child {key.name} of {_where_node(key.node_key)}"
        if n is None:
            raise IpamStateError(f"{where}: the node has no prefix")
        if _family_of(address) is not key.family or address not in n.prefix:
            raise IpamStateError(f"{where}: address {address} is outside {n.prefix}")
        offset = int(address) - int(n.prefix.network_address)
        if not n.pool.lo <= offset <= n.pool.hi:
            raise IpamStateError(
                f"{where}: address {address} is the first or last address of {n.prefix}"
            )
        if key.name in n.children:
            raise IpamStateError(f"{where} already has an address")
        if offset in n.pool:
            raise IpamStateError(f"{where}: address {address} is already in use")
        n.pool.add(offset)
        n.children[key.name] = (offset, change.updated)

    # ---------------------------------------------------------------- queries

    def records(self) -> list[Change]:
        """The whole state as ``*Added`` records, parents first, in a stable order.

        ``IpamAllocator.from_records(config, a.records())`` rebuilds an equal allocator, and two
        allocators hold the same state exactly when their ``records()`` are equal.
        """
        conduits: list[Change] = []
        nodes: list[Change] = []
        children: list[Change] = []
        for (family, trench_name), t in sorted(self._trenches.items()):
            for conduit_name, c in sorted(t.conduits.items()):
                ck = ConduitKey(family, trench_name, conduit_name)
                conduits.append(ConduitPrefixAdded(ck, c.prefix, c.updated))
                for node_name, n in sorted(c.nodes.items()):
                    nk = NodeKey(family, trench_name, conduit_name, node_name)
                    nodes.append(NodePrefixAdded(nk, n.prefix, n.updated))
                    base = int(n.prefix.network_address)
                    for name, (offset, updated) in sorted(n.children.items()):
                        children.append(
                            ChildAdded(
                                ChildKey(family, trench_name, conduit_name, node_name, name),
                                _address(family, base + offset),
                                updated,
                            )
                        )
        return conduits + nodes + children

    def children(self) -> list[ChildInfo]:
        """Every live child, sorted by trench, conduit, node, family and address."""
        rows: list[ChildInfo] = []
        for (family, trench_name), t in self._trenches.items():
            for conduit_name, c in t.conduits.items():
                for node_name, n in c.nodes.items():
                    base = int(n.prefix.network_address)
                    for name, (offset, updated) in n.children.items():
                        rows.append(
                            ChildInfo(
                                trench=trench_name,
                                conduit=conduit_name,
                                node=node_name,
                                family=family,
                                prefix=n.prefix,
                                name=name,
                                address=_address(family, base + offset),
                                updated=updated,
                            )
                        )
        rows.sort(
            key=lambda r: (r.trench, r.conduit, r.node, r.family.value, int(r.address), r.name)
        )
        return rows

    def lookup(
        self, trench: str, conduit: str, node: str, family: IpFamily | str, name: str
    ) -> IPAddress | None:
        """The address of a live child, or None. Does not refresh anything."""
        key = self._child_key(trench, conduit, node, family, name)
        n = self._get_node(key.node_key)
        if n is None or name not in n.children:
            return None
        return _address(key.family, int(n.prefix.network_address) + n.children[name][0])

    def conduit_prefix(self, trench: str, conduit: str, family: IpFamily | str) -> IPNetwork | None:
        key = ConduitKey(parse_family(family), trench, conduit)
        c = self._get_conduit(key)
        return None if c is None else c.prefix

    def node_prefix(
        self, trench: str, conduit: str, node: str, family: IpFamily | str
    ) -> IPNetwork | None:
        n = self._get_node(NodeKey(parse_family(family), trench, conduit, node))
        return None if n is None else n.prefix

    def conduit_prefixes(self) -> list[tuple[ConduitKey, IPNetwork]]:
        """Every conduit prefix, sorted by key."""
        return sorted(
            (ConduitKey(family, trench_name, conduit_name), c.prefix)
            for (family, trench_name), t in self._trenches.items()
            for conduit_name, c in t.conduits.items()
        )

    def node_prefixes(self) -> list[tuple[NodeKey, IPNetwork]]:
        """Every node prefix, sorted by key."""
        return sorted(
            (NodeKey(family, trench_name, conduit_name, node_name), n.prefix)
            for (family, trench_name), t in self._trenches.items()
            for conduit_name, c in t.conduits.items()
            for node_name, n in c.nodes.items()
        )


def changes_summary(changes: Sequence[Change]) -> dict[str, int]:
    """Count of records per type name, e.g. for a log line."""
    summary: dict[str, int] = {}
    for change in changes:
        name = type(change).__name__
        summary[name] = summary.get(name, 0) + 1
    return summary
