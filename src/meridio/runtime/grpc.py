"""grpclib served and consumed from trio through one trio-asyncio loop.

grpclib is asyncio code: servers and channels are built inside the trio-asyncio loop (grpclib
captures the running loop when constructed). Server streams are consumed by one asyncio
coroutine that pushes each message into a trio memory channel; trio code never iterates an
asyncio async generator directly, because cancelling that corrupts trio's cancel scopes.

Over TCP, servers and channels speak mutual TLS with the process's credentials and servers
check every call against the authorization table (:mod:`meridio.runtime.tls`); plain text on
TCP only with ``insecure``. Unix sockets are local and plain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import stat
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpclib
import grpclib.client
import grpclib.config
import grpclib.server
import trio
import trio_asyncio
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import StreamTerminatedError

from meridio.core import wire
from meridio.runtime.logs import get_logger
from meridio.runtime.metrics import split_hostport
from meridio.runtime.tls import install_call_peer
from meridio.settings import SettingsError

if TYPE_CHECKING:
    from meridio.runtime.tls import Tls

T = TypeVar("T")
log = get_logger("meridio.grpc")

# gRPC's customary 4 MiB: a target list of 10,000 entries fits many times over.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class Encoded:
    """A message already serialized: streams that computed the bytes anyway send them as is."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


# HTTP/2 pings on TCP channels: a peer whose host vanished without a reset (a crashed node, a
# deleted namespace) leaves a half-open connection on which every call would wait for its
# deadline; with pings it is closed within seconds and the next call connects afresh.
KEEPALIVE = grpclib.config.Configuration(
    _keepalive_time=5.0,
    _keepalive_timeout=3.0,
    _keepalive_permit_without_calls=True,
    _http2_max_pings_without_data=0,
    _http2_min_sent_ping_interval_without_data=5.0,
)


_WATCHERS = "_meridio_on_lost"


def on_connection_lost(
    channel: grpclib.client.Channel, key: object, callback: Callable[[], None]
) -> None:
    """Call ``callback`` (in the event loop) when the transport connection ``channel`` holds
    now is lost: the peer closed it (its process exited), pings found it dead, or the channel
    was closed. Once; a later callback for the same ``key`` replaces this one. Nothing happens
    when the channel holds no connection (its next call connects afresh).

    grpclib has no public hook for this: its client handler's ``close`` is what the protocol
    calls when the connection goes (tests/unit/test_grpclib_private.py)."""
    handler = getattr(getattr(channel, "_protocol", None), "handler", None)
    if handler is None or getattr(handler, "connection_lost", True):
        return
    watchers: dict[object, Callable[[], None]] | None = handler.__dict__.get(_WATCHERS)
    if watchers is None:
        watchers = handler.__dict__[_WATCHERS] = {}
        close = handler.close

        def closed() -> None:
            close()
            called: list[Callable[[], None]] = list(watchers.values())
            watchers.clear()
            for fn in called:
                fn()

        handler.close = closed
    watchers[key] = callback


async def unary_raw(
    channel: grpclib.client.Channel, path: str, request: Encoded, *, timeout: float
) -> bytes:
    """(asyncio) A unary call of ``path`` with its request serialized already and its reply
    as it came, for a decoder of the caller's own (as strict as :class:`LimitedCodec`)."""
    async with channel.request(
        path, Cardinality.UNARY_UNARY, Encoded, bytes, timeout=timeout
    ) as stream:
        await stream.send_message(request, end=True)
        reply: bytes | None = await stream.recv_message()
    if reply is None:
        raise grpclib.GRPCError(Status.UNKNOWN, f"{path} answered no message")
    return reply


class LimitedCodec(ProtoCodec):
    """Protobuf codec that refuses messages over a size limit and decodes strictly.

    grpclib has no message size setting of its own, so the limit lives in the codec. Every
    message, request or reply, is decoded by :func:`meridio.core.wire.decode`: data that is
    not a well-formed encoding of the expected message (truncated, a length past the end, a
    wrong wire type, invalid UTF-8, a value that does not fit its type) is INVALID_ARGUMENT
    with a message naming the field, and is never decoded into something else. A call that
    asks for ``bytes`` gets the reply as it came, for a decoder of its own, as strict.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes

    def encode(self, message: Any, message_type: Any) -> bytes:
        data = message.data if isinstance(message, Encoded) else bytes(message)
        if len(data) > self.max_message_bytes:
            raise grpclib.GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"message of {len(data)} bytes exceeds the limit of {self.max_message_bytes}",
            )
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self.max_message_bytes:
            raise grpclib.GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"message of {len(data)} bytes exceeds the limit of {self.max_message_bytes}",
            )
        if message_type is bytes:  # asked for as is: the caller decodes it (strictly)
            return data
        try:
            return wire.decode(message_type, data)
        except Exception as exc:  # WireError; anything else would be a decoder bug
            raise grpclib.GRPCError(
                Status.INVALID_ARGUMENT, f"malformed {message_type.__name__} message: {exc}"
            ) from exc


@dataclass(frozen=True)
class Endpoint:
    """Where to listen or connect: TCP ``host:port`` or a unix socket ``unix:///path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str, default_host: str = "::") -> Endpoint:
        if text.startswith("unix://"):
            return cls(path=text[len("unix://") :])
        if text.startswith("unix:"):
            return cls(path=text[len("unix:") :])
        if text.startswith("/"):
            return cls(path=text)
        host, port = split_hostport(text, default_host)
        return cls(host=host, port=port)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0

    def next_delay(self, current: float) -> float:
        return min(self.maximum, max(self.initial, current * self.factor))


RETRYABLE = (
    grpclib.GRPCError,
    StreamTerminatedError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class PlainTextRefused(SettingsError):
    """gRPC over TCP without TLS, and the ``insecure`` setting is off."""


class _Server(grpclib.server.Server):
    """grpclib's server, which also drops open connections when closed.

    grpclib cancels the running handlers on close but leaves their HTTP/2 connections open
    (Python 3.11's asyncio cannot close a server's clients), so clients would keep talking to
    a server that is gone instead of reconnecting to its successor.

    With ``tls`` every accepted connection first completes a TLS handshake with the process's
    current credentials (see :mod:`meridio.runtime.tls`).
    """

    def __init__(self, *args: Any, tls: Tls | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._protocols: weakref.WeakSet[Any] = weakref.WeakSet()
        self._tls = tls

    def _protocol_factory(self) -> Any:
        if self._tls is not None:
            return self._tls.accept(self._h2_protocol)
        return self._h2_protocol()

    def _h2_protocol(self) -> Any:
        protocol = super()._protocol_factory()
        self._protocols.add(protocol)
        return protocol

    def close(self) -> None:
        super().close()
        for protocol in list(self._protocols):
            connection = getattr(protocol, "connection", None)
            transport = getattr(connection, "_transport", None)
            if transport is not None:
                transport.close()


class GrpcServer:
    """One grpclib server per endpoint, sharing a handler list.

    TCP endpoints use ``tls`` (mutual TLS, and every call checked against the authorization
    table for ``role``) unless ``plaintext``; unix sockets never do.
    """

    def __init__(
        self,
        handlers: Sequence[Any],
        endpoints: Sequence[Endpoint],
        codec: Any,
        *,
        tls: Tls | None = None,
        role: str = "",
        plaintext: bool = False,
    ) -> None:
        self.handlers = list(handlers)
        self.endpoints = list(endpoints)
        self.codec = codec
        self.tls = tls
        self.role = role
        self.plaintext = plaintext
        self._servers: list[_Server] = []
        self.bound: list[Endpoint] = []

    async def _start_aio(self) -> None:
        for endpoint in self.endpoints:
            tls = None if endpoint.path is not None or self.plaintext else self.tls
            server = _Server(self.handlers, codec=self.codec, tls=tls)
            if tls is not None:
                tls.install_authorization(server, self.role)
            install_call_peer(server, tls)
            if endpoint.path is not None:
                _prepare_unix_path(endpoint.path)
                await server.start(path=endpoint.path)
                self.bound.append(endpoint)
            else:
                # "::" means every address of both families: asyncio's None does that, while
                # binding "::" itself gives an IPv6-only socket (asyncio sets IPV6_V6ONLY).
                host = None if endpoint.host in ("::", "") else endpoint.host
                await server.start(host, endpoint.port, reuse_address=True)
                sockets = getattr(server._server, "sockets", None) or []
                port = sockets[0].getsockname()[1] if sockets else endpoint.port
                self.bound.append(Endpoint(host=endpoint.host, port=port))
            self._servers.append(server)

    async def _close_aio(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        for endpoint in self.endpoints:
            if endpoint.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint.path)
        self._servers.clear()

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(self._close_aio)()


def _prepare_unix_path(path: str) -> None:
    """Create the socket's directory; remove a stale socket left by a killed process."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        p.unlink()


class GrpcStack:
    """Servers and client channels of one process.

    Over TCP every server and channel speaks mutual TLS with ``tls`` (the process's
    credentials, its role from the certificate); without ``tls`` only ``insecure`` allows plain
    text, anything else is :class:`PlainTextRefused`. Unix sockets are always plain: they are
    local, protected by file permissions.
    """

    def __init__(
        self,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        tls: Tls | None = None,
        insecure: bool = False,
        role: str = "",
    ) -> None:
        self.codec = LimitedCodec(max_message_bytes)
        self.tls = tls
        self.insecure = insecure
        self.role = role or (tls.role or "" if tls is not None else "")
        self._servers: list[GrpcServer] = []
        self._channels: list[grpclib.client.Channel] = []

    def _check_plaintext(self, endpoint: Endpoint, what: str) -> None:
        if endpoint.path is None and self.tls is None and not self.insecure:
            raise PlainTextRefused(
                f"{what} {endpoint} is TCP and no certificate is configured: set 'tls-dir' "
                "(or 'tls-cert', 'tls-key' and 'tls-ca'), or 'insecure' for plain text"
            )

    async def serve(
        self,
        handlers: Sequence[Any],
        listen: Sequence[str | Endpoint],
        *,
        plaintext: bool = False,
    ) -> GrpcServer:
        """Serve ``handlers`` on every endpoint of ``listen``; ``plaintext`` keeps its TCP
        endpoints out of TLS (only for the health service, which the kubelet probes)."""
        endpoints = [e if isinstance(e, Endpoint) else Endpoint.parse(e) for e in listen]
        if not plaintext:
            for endpoint in endpoints:
                self._check_plaintext(endpoint, "listening on")
        server = GrpcServer(
            handlers, endpoints, self.codec, tls=self.tls, role=self.role, plaintext=plaintext
        )
        try:
            await trio_asyncio.aio_as_trio(server._start_aio)()
        except BaseException:
            await server.close()
            raise
        self._servers.append(server)
        for endpoint in server.bound:
            log.info("grpc serving", endpoint=str(endpoint))
        return server

    async def channel(self, target: str | Endpoint) -> grpclib.client.Channel:
        endpoint = target if isinstance(target, Endpoint) else Endpoint.parse(target, "localhost")
        self._check_plaintext(endpoint, "dialing")
        tls = self.tls

        async def build() -> grpclib.client.Channel:
            if endpoint.path is not None:
                return grpclib.client.Channel(path=endpoint.path, codec=self.codec)
            assert endpoint.host is not None and endpoint.port is not None
            if tls is not None:
                return tls.channel(endpoint.host, endpoint.port, codec=self.codec, config=KEEPALIVE)
            return grpclib.client.Channel(
                endpoint.host, endpoint.port, codec=self.codec, config=KEEPALIVE
            )

        channel: grpclib.client.Channel = await trio_asyncio.aio_as_trio(build)()
        self._channels.append(channel)
        return channel

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one asyncio call (a unary stub method) from trio."""
        return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)

    async def pump(
        self,
        open_stream: Callable[[], AsyncIterator[T]],
        send: trio.MemorySendChannel[T],
        *,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        on_state: Callable[[bool], None] | None = None,
        name: str = "stream",
    ) -> None:
        """Consume a server stream in asyncio and deliver each message to ``send`` (trio).

        With ``reconnect`` the stream is reopened after a failure, waiting with exponential
        backoff and jitter; ``on_state`` hears True after the first message of each attempt
        and False when an attempt fails. Returns when the stream ends without reconnect;
        cancel the calling trio scope to stop it.
        """
        policy = backoff or Backoff()

        async def deliver(item: T) -> None:
            # Hand over without awaiting trio from asyncio: a cancel that lands while such an
            # await is completing is lost by trio-asyncio and the pump would never stop.
            # When the channel is full, poll for room (backpressure, not a busy loop).
            while True:
                try:
                    send.send_nowait(item)
                    return
                except trio.WouldBlock:
                    await asyncio.sleep(0.01)

        async def aio_pump() -> None:
            delay = policy.initial
            while True:
                connected = False
                try:
                    async for item in open_stream():
                        if not connected:
                            connected = True
                            delay = policy.initial
                            if on_state:
                                on_state(True)
                        await deliver(item)
                    if not reconnect:
                        return
                    log.info("stream ended, reopening", stream=name)
                except RETRYABLE as exc:
                    if not reconnect:
                        raise
                    log.info("stream failed, retrying", stream=name, error=str(exc), delay=delay)
                if on_state:
                    on_state(False)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = policy.next_delay(delay)

        await trio_asyncio.aio_as_trio(aio_pump)()

    async def close(self) -> None:
        for server in self._servers:
            await server.close()
        self._servers.clear()
        channels, self._channels = self._channels, []
        for ch in channels:
            ch.close()
