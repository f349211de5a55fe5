"""The parts of grpclib that are not its public API and that meridio relies on.

grpclib's version is pinned to a range (pyproject.toml); these tests are what a new release
must pass before the range is widened. They check each private name exists *and* does what
meridio uses it for:

* ``Configuration(_keepalive_*, _http2_*)`` (meridio.runtime.grpc.KEEPALIVE): a channel to a
  peer that went silent is closed by its pings instead of waiting for the call's deadline.
* ``Server._protocol_factory`` (meridio.runtime.grpc._Server): grpclib makes every accepted
  connection's protocol with it, and ``protocol.connection._transport`` is the connection's
  transport (closed when the server closes).
* ``Channel._create_connection``, ``_host``, ``_port``, ``_ssl`` (meridio.runtime.tls.TlsChannel):
  the channel connects through that method, reading ``_ssl`` at that moment.
* ``peer._transport`` of a request event (meridio.runtime.tls._call_peer).
* ``Channel._protocol.handler`` and its ``close`` / ``connection_lost``
  (meridio.runtime.grpc.on_connection_lost): the protocol calls ``close`` when the connection
  goes, whoever ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import tomllib
from pathlib import Path
from typing import Any

import grpclib.client
import grpclib.config
import grpclib.events
from grpclib.exceptions import StreamTerminatedError
from packaging.requirements import Requirement

from meridio.api.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponseServingStatus,
    HealthStub,
)
from meridio.runtime.grpc import KEEPALIVE, LimitedCodec, _Server, on_connection_lost
from meridio.runtime.health import Health, HealthService

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_grpclib_is_pinned_to_a_range_that_holds_the_installed_version() -> None:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "grpclib"]
    assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
        "grpclib needs an upper bound: meridio uses its private attributes"
    )
    assert req.specifier.contains(importlib.metadata.version("grpclib"))


def test_keepalive_fields_are_configuration_fields() -> None:
    fields = {f.name for f in dataclasses.fields(grpclib.config.Configuration)}
    used = {
        "_keepalive_time",
        "_keepalive_timeout",
        "_keepalive_permit_without_calls",
        "_http2_max_pings_without_data",
        "_http2_min_sent_ping_interval_without_data",
    }
    assert used <= fields
    assert KEEPALIVE._keepalive_time == 5.0 and KEEPALIVE._keepalive_permit_without_calls


async def _call_silent_peer(config: grpclib.config.Configuration, wait: float) -> BaseException:
    """Call a TCP peer that accepts and then never answers (a host gone without a reset)."""
    tasks: list[asyncio.Task[Any]] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = grpclib.client.Channel("127.0.0.1", port, codec=LimitedCodec(), config=config)
    try:
        await asyncio.wait_for(HealthStub(channel).check(HealthCheckRequest()), wait)
    except (TimeoutError, StreamTerminatedError, ConnectionError) as exc:
        return exc
    finally:
        channel.close()
        server.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)  # they see the channel's close
    raise AssertionError("a silent peer answered")


def test_keepalive_pings_close_a_connection_to_a_silent_peer() -> None:
    fast = dataclasses.replace(
        KEEPALIVE,
        _keepalive_time=0.1,
        _keepalive_timeout=0.1,
        _http2_min_sent_ping_interval_without_data=0.05,
    )
    # with the pings, the connection is dropped long before the outer deadline ...
    dropped = asyncio.run(_call_silent_peer(fast, wait=20))
    assert not isinstance(dropped, TimeoutError), dropped
    # ... without them, only the deadline ends the call (the pings are what closed it above)
    waited = asyncio.run(_call_silent_peer(grpclib.config.Configuration(), wait=1))
    assert isinstance(waited, TimeoutError), waited


class CountingChannel(grpclib.client.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: list[Any] = []
        self.ssl_seen: list[Any] = []

    async def _create_connection(self) -> Any:
        self.ssl_seen.append(self._ssl)
        protocol = await super()._create_connection()
        self.connections.append(protocol)
        return protocol


def test_server_protocol_factory_channel_create_connection_and_peer_transport() -> None:
    async def main() -> None:
        health = Health()
        server = _Server([HealthService(health)], codec=LimitedCodec())
        peers: list[Any] = []

        async def on_request(event: grpclib.events.RecvRequest) -> None:
            peers.append(event.peer._transport.get_extra_info("sockname"))

        grpclib.events.listen(server, grpclib.events.RecvRequest, on_request)
        await server.start("127.0.0.1", 0)
        port = next(iter(server._server.sockets)).getsockname()[1]
        channel = CountingChannel("127.0.0.1", port, codec=LimitedCodec(), config=KEEPALIVE)
        assert (channel._host, channel._port) == ("127.0.0.1", port)
        try:
            reply = await HealthStub(channel).check(HealthCheckRequest(service="Liveness"))
            assert reply.status == HealthCheckResponseServingStatus.SERVING
            # the channel connected through _create_connection, reading _ssl then
            assert len(channel.connections) == 1 and channel.ssl_seen == [None]
            client_transport = channel.connections[0].connection._transport
            assert isinstance(client_transport, asyncio.Transport)
            # the server made the accepted connection's protocol with _protocol_factory
            (accepted,) = list(server._protocols)
            transport = accepted.connection._transport
            assert isinstance(transport, asyncio.Transport)
            assert transport.get_extra_info("peername") == client_transport.get_extra_info(
                "sockname"
            )
            # the request event's peer carries the same transport
            assert peers == [transport.get_extra_info("sockname")]
            # closing the server closes the open connection (meridio's _Server.close)
            server.close()
            assert transport.is_closing()
            await server.wait_closed()
        finally:
            channel.close()

    asyncio.run(main())


def test_a_lost_connection_calls_back_once_per_key_with_the_latest_callback() -> None:
    async def main() -> None:
        calls: list[str] = []
        server = _Server([HealthService(Health())], codec=LimitedCodec())
        await server.start("127.0.0.1", 0)
        port = next(iter(server._server.sockets)).getsockname()[1]
        channel = grpclib.client.Channel("127.0.0.1", port, codec=LimitedCodec())
        try:
            on_connection_lost(channel, "a", lambda: calls.append("never"))  # no connection yet
            await HealthStub(channel).check(HealthCheckRequest(service="Liveness"))
            assert channel._protocol is not None
            assert channel._protocol.handler.connection_lost is False
            on_connection_lost(channel, "a", lambda: calls.append("a-old"))
            on_connection_lost(channel, "a", lambda: calls.append("a"))  # replaces a-old
            on_connection_lost(channel, "b", lambda: calls.append("b"))
            await asyncio.sleep(0.05)
            assert calls == []  # the connection is there
            server.close()  # the peer goes: the protocol calls the handler's close
            await server.wait_closed()
            for _ in range(100):
                if calls:
                    break
                await asyncio.sleep(0.01)
            assert sorted(calls) == ["a", "b"]
            assert channel._protocol.handler.connection_lost is True
            channel.close()  # closed again: nothing more
            assert sorted(calls) == ["a", "b"]
        finally:
            channel.close()

    asyncio.run(main())
