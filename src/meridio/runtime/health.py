"""The ``grpc.health.v1`` service with Meridio's aggregate probe services.

Roles register named sub-checks (``NSP``, ``IPAM``, ``NSPCli``, ...) and say which probe
services each one feeds: ``Startup``, ``Readiness``, ``Liveness``. An aggregate is SERVING
when every sub-check feeding it is serving (and, for Readiness, the process is not shutting
down). Startup and Readiness are NOT_SERVING until the role has started (:meth:`Health.start`):
before the role registers its sub-checks none feeds them, and "all of none" must not read as
ready to a probe that asks in that moment. A sub-check can also be queried by its own name;
the empty name is the process itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import grpclib
import trio
from grpclib.const import Status

from meridio.api.grpc.health.v1 import (
    HealthBase,
    HealthCheckRequest,
    HealthCheckResponse,
    HealthCheckResponseServingStatus,
)
from meridio.runtime.notify import Changes

STARTUP = "Startup"
READINESS = "Readiness"
LIVENESS = "Liveness"
PROBES = (STARTUP, READINESS, LIVENESS)

SERVING = HealthCheckResponseServingStatus.SERVING
NOT_SERVING = HealthCheckResponseServingStatus.NOT_SERVING
SERVICE_UNKNOWN = HealthCheckResponseServingStatus.SERVICE_UNKNOWN


@dataclass
class SubCheck:
    name: str
    probes: frozenset[str]
    serving: bool = False
    _health: Health | None = field(default=None, repr=False)

    def set(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            if self._health is not None:
                self._health._changed()


class Health:
    """Health state of one process; handlers and roles run on the same thread."""

    def __init__(self) -> None:
        self._checks: dict[str, SubCheck] = {}
        self.started = False
        self.shutting_down = False
        self.changes = Changes()
        self._trio_waiters: set[trio.Event] = set()

    def register(self, name: str, probes: Iterable[str] = PROBES) -> SubCheck:
        probes = frozenset(probes)
        unknown = probes - set(PROBES)
        if unknown:
            raise ValueError(f"unknown probe services {sorted(unknown)}")
        check = SubCheck(name, probes, _health=self)
        self._checks[name] = check
        self._changed()
        return check

    def start(self) -> None:
        """The role has started and registered its sub-checks: Startup and Readiness follow
        them from now on."""
        self.started = True
        self._changed()

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        self._changed()

    def status(self, service: str) -> HealthCheckResponseServingStatus:
        if service == "":
            return NOT_SERVING if self.shutting_down else SERVING
        if service in self._checks:
            return SERVING if self._checks[service].serving else NOT_SERVING
        if service in PROBES:
            if service != LIVENESS and not self.started:
                return NOT_SERVING
            if service == READINESS and self.shutting_down:
                return NOT_SERVING
            feeding = [c for c in self._checks.values() if service in c.probes]
            return SERVING if all(c.serving for c in feeding) else NOT_SERVING
        return SERVICE_UNKNOWN

    def summary(self) -> dict[str, str]:
        names = ["", *PROBES, *self._checks]
        return {n or "process": self.status(n).name for n in names}

    @property
    def version(self) -> int:
        return self.changes.version

    async def wait_changed(self, seen: int) -> None:
        """trio side: return once :attr:`version` has moved past ``seen``."""
        while self.version == seen:
            event = trio.Event()
            self._trio_waiters.add(event)
            try:
                await event.wait()
            finally:
                self._trio_waiters.discard(event)

    def _changed(self) -> None:
        self.changes.bump()
        for event in self._trio_waiters:
            event.set()


class HealthService(HealthBase):
    def __init__(self, health: Health) -> None:
        self.health = health

    async def check(self, health_check_request: HealthCheckRequest) -> HealthCheckResponse:
        status = self.health.status(health_check_request.service)
        if status == SERVICE_UNKNOWN:
            raise grpclib.GRPCError(
                Status.NOT_FOUND, f"unknown service {health_check_request.service!r}"
            )
        return HealthCheckResponse(status=status)

    async def watch(
        self, health_check_request: HealthCheckRequest
    ) -> AsyncIterator[HealthCheckResponse]:
        last = None
        while True:
            seen = self.health.version
            status = self.health.status(health_check_request.service)
            if status != last:
                yield HealthCheckResponse(status=status)
                last = status
            await self.health.changes.wait_past(seen)
