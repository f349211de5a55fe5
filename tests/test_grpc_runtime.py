"""The gRPC stack under trio: serving, health, size limits and safe stream cancellation."""

from __future__ import annotations

import gc
from pathlib import Path

import grpclib
import pytest
import trio
from grpclib.const import Status

from meridio.api.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthCheckResponseServingStatus,
    HealthStub,
)
from meridio.runtime.grpc import Endpoint, GrpcStack
from meridio.runtime.health import Health, HealthService

SERVING = HealthCheckResponseServingStatus.SERVING
NOT_SERVING = HealthCheckResponseServingStatus.NOT_SERVING


async def _serve_health(stack: GrpcStack, tmp_path: Path) -> tuple[Health, HealthStub]:
    health = Health()
    sock = tmp_path / "health.sock"
    await stack.serve([HealthService(health)], [Endpoint(path=str(sock))])
    channel = await stack.channel(f"unix://{sock}")
    return health, HealthStub(channel)


async def test_health_check_over_unix_socket(aio_loop: object, tmp_path: Path) -> None:
    stack = GrpcStack()
    try:
        health, stub = await _serve_health(stack, tmp_path)
        check = health.register("NSP")
        reply = await stack.call(stub.check, HealthCheckRequest(service="Readiness"))
        assert reply.status == NOT_SERVING
        check.set(True)
        reply = await stack.call(stub.check, HealthCheckRequest(service="Readiness"))
        assert reply.status == NOT_SERVING  # the role has not said it started
        health.start()
        reply = await stack.call(stub.check, HealthCheckRequest(service="Readiness"))
        assert reply.status == SERVING
        with pytest.raises(grpclib.GRPCError) as err:
            await stack.call(stub.check, HealthCheckRequest(service="nope"))
        assert err.value.status == Status.NOT_FOUND
    finally:
        await stack.close()


async def test_health_watch_streams_changes(aio_loop: object, tmp_path: Path) -> None:
    stack = GrpcStack()
    try:
        health, stub = await _serve_health(stack, tmp_path)
        check = health.register("NSP")
        health.start()
        send, recv = trio.open_memory_channel[HealthCheckResponse](10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                stack.pump,
                lambda: stub.watch(HealthCheckRequest(service="Readiness")),
                send,
            )
            assert (await recv.receive()).status == NOT_SERVING
            check.set(True)
            assert (await recv.receive()).status == SERVING
            health.begin_shutdown()
            assert (await recv.receive()).status == NOT_SERVING
            nursery.cancel_scope.cancel()
    finally:
        await stack.close()


async def test_message_size_limit_is_resource_exhausted(aio_loop: object, tmp_path: Path) -> None:
    server_stack = GrpcStack(max_message_bytes=64)
    client_stack = GrpcStack()
    try:
        sock = tmp_path / "h.sock"
        await server_stack.serve([HealthService(Health())], [Endpoint(path=str(sock))])
        stub = HealthStub(await client_stack.channel(f"unix://{sock}"))
        with pytest.raises(grpclib.GRPCError) as err:
            await client_stack.call(stub.check, HealthCheckRequest(service="x" * 100))
        assert err.value.status == Status.RESOURCE_EXHAUSTED
        assert "exceeds the limit" in (err.value.message or "")
    finally:
        await client_stack.close()
        await server_stack.close()


async def test_cancelled_stream_consumer_leaves_trio_clean(
    aio_loop: object, tmp_path: Path
) -> None:
    """The trap: cancel a stream consumer, then close the channel before the next checkpoint.

    Iterating an asyncio generator from trio corrupts trio's cancel scopes here; the pump does
    not. Repeated 50 times, each time followed by ordinary trio work that must still behave.
    """
    stack = GrpcStack()
    try:
        health, _ = await _serve_health(stack, tmp_path)
        health.register("NSP").set(True)
        sock = tmp_path / "health.sock"
        for _ in range(50):
            client = GrpcStack()
            stub = HealthStub(await client.channel(f"unix://{sock}"))
            send, recv = trio.open_memory_channel[HealthCheckResponse](1)
            with trio.move_on_after(5) as guard:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        client.pump,
                        lambda stub=stub: stub.watch(HealthCheckRequest(service="")),
                        send,
                    )
                    assert (await recv.receive()).status == SERVING
                    nursery.cancel_scope.cancel()
                await client.close()  # close right after the cancel, before any checkpoint
            assert not guard.cancelled_caught
            # trio is still healthy: timeouts, cancellation and sleeping work as usual
            with trio.move_on_after(0.001) as scope:
                await trio.sleep(1)
            assert scope.cancelled_caught
            assert trio.lowlevel.current_task().parent_nursery is not None
        gc.collect()
    finally:
        await stack.close()


async def test_pump_reconnects_after_server_restart(aio_loop: object, tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    client = GrpcStack()
    states: list[bool] = []
    stub = HealthStub(await client.channel(f"unix://{sock}"))
    send, recv = trio.open_memory_channel[HealthCheckResponse](10)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: client.pump(
                    lambda: stub.watch(HealthCheckRequest(service="")),
                    send,
                    on_state=states.append,
                )
            )
            for _ in range(2):  # the server comes up (late), goes away, and comes back
                failures = states.count(False)
                with trio.fail_after(10):  # the pump tried with no server there, and failed
                    while states.count(False) == failures:
                        await trio.sleep(0.01)
                server = GrpcStack()
                await server.serve([HealthService(Health())], [Endpoint(path=str(sock))])
                with trio.fail_after(10):
                    assert (await recv.receive()).status == SERVING
                await server.close()
            nursery.cancel_scope.cancel()
    finally:
        await client.close()
    assert False in states
    assert states.count(True) >= 2
