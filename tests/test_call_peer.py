"""The runtime tells a handler who calls: a unix socket's peer process and user."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from meridio.api.grpc.health.v1 import (
    HealthBase,
    HealthCheckRequest,
    HealthCheckResponse,
    HealthCheckResponseServingStatus,
    HealthStub,
)
from meridio.runtime.grpc import Endpoint, GrpcStack
from meridio.runtime.tls import CallPeer, current_peer


class Recorder(HealthBase):  # type: ignore[misc]
    def __init__(self) -> None:
        self.seen: list[CallPeer | None] = []

    async def check(self, health_check_request: HealthCheckRequest) -> HealthCheckResponse:
        self.seen.append(current_peer())
        return HealthCheckResponse(status=HealthCheckResponseServingStatus.SERVING)

    async def watch(self, health_check_request: HealthCheckRequest) -> Any:  # pragma: no cover
        yield HealthCheckResponse()


async def test_unix_peer_credentials(aio_loop: object, tmp_path: Path) -> None:
    stack = GrpcStack()
    recorder = Recorder()
    sock = tmp_path / "s.sock"
    try:
        await stack.serve([recorder], [Endpoint(path=str(sock))])
        channel = await stack.channel(Endpoint(path=str(sock)))
        await stack.call(HealthStub(channel, timeout=5).check, HealthCheckRequest())
        with trio.fail_after(5):
            while not recorder.seen:
                await trio.sleep(0.01)
    finally:
        await stack.close()
    assert recorder.seen == [CallPeer(pid=os.getpid(), uid=os.getuid())]
    assert current_peer() is None
