"""What a name may be: trench, conduit, stream, node and IPAM child names, configuration items.

Names come from Kubernetes objects and from the wire; they end up in logs, listings, database
keys, and in the names of kernel objects and files other roles derive from them. So a name is:

* 1 to :data:`MAX_NAME_LENGTH` characters;
* printable (``str.isprintable``: no control, format or separator characters) and without
  whitespace, so ``"   "``, ``"a\\nb"`` and ``"a\\u200bb"`` are refused;
* without a path separator (``/`` or ``\\``), and not ``.`` or ``..``.

Anything else Kubernetes allows in a name (upper case, dots, underscores, any printable
Unicode letter) is accepted: the checks keep names safe, not pretty.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_NAME_LENGTH", "InvalidName", "check_name", "describe", "name_problem", "show"]

MAX_NAME_LENGTH: Final = 253
"""Longest name accepted (a Kubernetes object name's limit)."""


class InvalidName(ValueError):
    """A name that is refused; the message names what it is and why."""


def show(text: str, limit: int = 64) -> str:
    """``text`` quoted for a message, with control characters escaped and shortened if long."""
    shown = repr(text[:limit])
    return shown if len(text) <= limit else f"{shown}..."


_SPACE_OR_SEPARATOR: Final = re.compile(r"[\s/\\]")


def name_problem(value: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """Why ``value`` is not an acceptable name, or None when it is."""
    if (
        0 < len(value) <= max_length
        and value.isprintable()
        and _SPACE_OR_SEPARATOR.search(value) is None
        and value not in (".", "..")
    ):
        return None
    if not value:
        return "must not be empty"
    if len(value) > max_length:
        return f"is longer than {max_length} characters ({len(value)})"
    if value in (".", ".."):
        return "must not be . or .."
    for char in value:
        if char in "/\\":
            return f"must not contain a path separator ({char!r})"
        if char.isspace():
            return f"must not contain whitespace ({char!r})"
        if not char.isprintable():
            return f"must not contain control or invisible characters ({char!r})"
    return None


def check_name(what: str, value: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """``value`` if it is an acceptable name; :class:`InvalidName` ("<what> name ... ") if not."""
    problem = name_problem(value, max_length)
    if problem is not None:
        raise InvalidName(describe(what, value, problem))
    return value


def describe(what: str, value: str, problem: str) -> str:
    """The message for a refused name: ``child name 'a b' must not contain whitespace (' ')``."""
    return f"{what} name {show(value)} {problem}" if value else f"{what} name {problem}"
