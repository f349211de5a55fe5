"""Pieces the control-plane benchmarks share: report lines and the health-check baseline."""

from __future__ import annotations

import time
from typing import Any

from grpclib.client import Channel

from meridio.api.grpc.health.v1 import HealthCheckRequest, HealthStub

_T0 = time.monotonic()


def progress(what: str) -> None:
    print(f"  [{time.monotonic() - _T0:5.1f} s] {what}", flush=True)


def row(name: str, value: str, ratio: str = "") -> None:
    print(f"  {name:<52} {value:>16} {ratio:>14}", flush=True)


def health_call(ch: Channel, timeout: float = 10) -> Any:
    """The baseline call: a unary health Check on the daemon under test."""
    stub = HealthStub(ch, timeout=timeout)
    request = HealthCheckRequest(service="Readiness")

    async def call(_: Any) -> None:
        await stub.check(request)

    return call


async def health_warmup(ch: Channel) -> None:
    await HealthStub(ch, timeout=30).check(HealthCheckRequest(service="Readiness"))
