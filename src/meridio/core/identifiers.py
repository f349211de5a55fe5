"""Target identifiers, pure: choosing one per stream and settling collisions.

Every target of a stream needs an identifier in ``1..max-targets`` that no other target of the
stream holds: it is the target's Maglev slot and, on every LB, its fwmark and routing table.
A target picks a free one at random among those NSP does not list (random, so targets that
start together rarely pick the same), registers, and then confirms: when two targets of a stream
hold the same identifier, the one with the lowest address list keeps it (the same rule the LBs
apply when they see a duplicate, see :func:`meridio.core.lbstate.desired_state`) and the other
picks again. A stream whose identifiers are all taken is full.

The identifiers travel in the connect request's extra context, one entry per stream:
``identifier/<stream>`` -> ``"<n>"``; the proxy registers the target in NSP for each such stream
with ``context["identifier"] = "<n>"``, as Meridio's targets are registered.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

CONTEXT_PREFIX: Final = "identifier/"
IDENTIFIER_KEY: Final = "identifier"
"""The key of a registered target's identifier in its NSP context."""


class StreamFull(Exception):
    """Every identifier of the stream is taken."""

    def __init__(self, stream: str, max_targets: int) -> None:
        super().__init__(
            f"stream {stream} is full: all {max_targets} identifiers (max-targets) are taken"
        )
        self.stream = stream
        self.max_targets = max_targets


@dataclass(frozen=True, order=True)
class Holder:
    """A target of a stream as NSP lists it: its address list and its identifier."""

    ips: tuple[str, ...]
    identifier: int


def free_identifiers(max_targets: int, taken: Iterable[int]) -> list[int]:
    used = set(taken)
    return [i for i in range(1, max_targets + 1) if i not in used]


def choose(stream: str, max_targets: int, taken: Iterable[int], rng: random.Random) -> int:
    """A free identifier of the stream, at random; :class:`StreamFull` when there is none."""
    free = free_identifiers(max_targets, taken)
    if not free:
        raise StreamFull(stream, max_targets)
    return rng.choice(free)


def keeps(mine: tuple[str, ...], identifier: int, holders: Iterable[Holder]) -> bool:
    """Whether a target with address list ``mine`` keeps ``identifier`` among ``holders``
    (which may include itself): it does unless another holder has a lower address list."""
    return all(h.ips >= mine for h in holders if h.identifier == identifier and h.ips != mine)


def taken_by_others(mine: tuple[str, ...], holders: Iterable[Holder]) -> set[int]:
    return {h.identifier for h in holders if h.ips != mine}


def encode(identifiers: Mapping[str, int]) -> dict[str, str]:
    """Extra-context entries for the identifiers of each stream."""
    return {f"{CONTEXT_PREFIX}{stream}": str(n) for stream, n in sorted(identifiers.items())}


def decode(context: Mapping[str, str]) -> dict[str, int]:
    """The identifier of each stream named in ``context``; ValueError names a bad entry."""
    out: dict[str, int] = {}
    for key, value in context.items():
        if not key.startswith(CONTEXT_PREFIX):
            continue
        stream = key[len(CONTEXT_PREFIX) :]
        if not stream:
            raise ValueError(f"extra context key {key!r} names no stream")
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise ValueError(f"identifier {value!r} of stream {stream} is not a positive integer")
        out[stream] = int(value)
    return out
