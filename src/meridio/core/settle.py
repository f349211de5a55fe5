"""When a polled file may be applied: only once it has stopped changing. Pure, no I/O or clock.

A file rewritten in place (``cat > file``, most editors' save) is empty or cut short for a
moment, and a poller that reads it then would apply that. :class:`Settle` holds back a new
content until it has been read unchanged on two polls in a row, i.e. for one poll interval,
and never offers the same content twice. (A ConfigMap mount changes by an atomic link swap and
is never seen half-written; it is applied one poll interval later.)
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

__all__ = ["Settle", "Verdict"]

Verdict = Literal["same", "changing", "apply"]

T = TypeVar("T")


class Settle(Generic[T]):
    """Poll results in, "apply this now" out (see the module documentation)."""

    def __init__(self, current: T) -> None:
        self.current = current
        """The content last applied (or refused): what the file is taken to hold."""
        self._candidate: T | None = None
        self._seen = False

    def observe(self, content: T) -> Verdict:
        """One poll's content: ``"same"`` as :attr:`current` (nothing to do); ``"changing"``,
        new content not read before (wait for the next poll); ``"apply"``, new content that the
        previous poll read too: apply it now (it becomes :attr:`current`)."""
        if content == self.current:
            self._candidate, self._seen = None, False
            return "same"
        if not self._seen or content != self._candidate:
            self._candidate, self._seen = content, True
            return "changing"
        self.current, self._candidate, self._seen = content, None, False
        return "apply"

    def accept(self, content: T) -> None:
        """The caller applied ``content`` on its own (e.g. on SIGHUP)."""
        self.current, self._candidate, self._seen = content, None, False
