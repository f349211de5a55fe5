"""The traffic server: TCP and UDP echo whose replies name the server (see ``core``).

One trio task accepts per TCP listener and one task serves each accepted connection; one task
serves each UDP socket. A connection's error (reset, garbage, a peer that vanished) ends only
that connection; the server stops on SIGTERM or SIGINT, closing every socket.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from meridio.traffic.core import (
    IP_PKTINFO,
    HostPort,
    format_sockaddr,
    is_unspecified,
    reply_ancillary,
    server_header,
    stamp,
)

ACCEPT_RETRY = 0.1
BUFFER = 65536
LISTEN_BACKLOG = 4096
UDP_RCVBUF = 4 * 1024 * 1024
ANCILLARY_SPACE = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(12)


class BindError(Exception):
    """An address could not be bound; the message names it."""


@dataclass
class ServerStats:
    tcp_connections: int = 0
    tcp_active: int = 0
    tcp_bytes: int = 0
    udp_datagrams: int = 0
    errors: int = 0

    def summary(self) -> str:
        return (
            f"{self.tcp_connections} tcp connections ({self.tcp_active} open), "
            f"{self.tcp_bytes} tcp bytes, {self.udp_datagrams} udp datagrams, "
            f"{self.errors} connection errors"
        )


@dataclass
class Server:
    """Echo server state; :meth:`serve` runs it until cancelled."""

    name: str
    addresses: Sequence[HostPort]
    tcp: bool = True
    udp: bool = True
    stats: ServerStats = field(default_factory=ServerStats)

    def __post_init__(self) -> None:
        self.header = server_header(self.name)
        self._bound: list[tuple[socket.SocketKind, trio.socket.SocketType]] | None = None

    async def bind(self) -> list[str]:
        """Bind every address (an error raises :class:`BindError`, nothing stays bound).

        Returns the bound endpoints as ``tcp://host:port`` and ``udp://host:port`` (useful with
        port 0). :meth:`serve` binds first if this was not called.
        """
        raise_fd_limit()
        socks: list[tuple[socket.SocketKind, trio.socket.SocketType]] = []
        kinds = [
            k for k, on in ((socket.SOCK_STREAM, self.tcp), (socket.SOCK_DGRAM, self.udp)) if on
        ]
        try:
            for address in self.addresses:
                for kind in kinds:
                    try:
                        socks.append((kind, await bind_socket(address, kind)))
                    except OSError as exc:
                        why = exc.strerror or str(exc)
                        raise BindError(f"cannot listen on {address}: {why}") from exc
        except BaseException:
            for _kind, sock in socks:
                sock.close()
            raise
        self._bound = socks
        return self.endpoints()

    async def serve(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``task_status.started`` gets what :meth:`bind` returns."""
        if self._bound is None:
            await self.bind()
        bound = self.endpoints()
        # The serving tasks own (and close) the sockets from here on.
        socks, self._bound = self._bound or [], []
        async with trio.open_nursery() as nursery:
            for kind, sock in socks:
                if kind == socket.SOCK_STREAM:
                    nursery.start_soon(self._accept_loop, sock, nursery)
                else:
                    nursery.start_soon(self._udp_loop, sock)
            task_status.started(bound)

    def endpoints(self) -> list[str]:
        return [
            f"{'tcp' if kind == socket.SOCK_STREAM else 'udp'}://"
            f"{format_sockaddr(sock.getsockname())}"
            for kind, sock in self._bound or []
        ]

    async def _accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        with sock:
            while True:
                try:
                    conn, _ = await sock.accept()
                except OSError as exc:
                    # Out of descriptors or memory, or a connection aborted before accept: wait
                    # (a little longer for the capacity errors) and go on.
                    self.stats.errors += 1
                    capacity = exc.errno in (
                        errno.EMFILE,
                        errno.ENFILE,
                        errno.ENOBUFS,
                        errno.ENOMEM,
                    )
                    await trio.sleep(ACCEPT_RETRY if capacity else 0.001)
                    continue
                nursery.start_soon(self._serve_tcp, conn)

    async def _serve_tcp(self, conn: trio.socket.SocketType) -> None:
        self.stats.tcp_connections += 1
        self.stats.tcp_active += 1
        stream = trio.SocketStream(conn)
        offset = 0
        try:
            while True:
                data = await stream.receive_some(BUFFER)
                if not data:
                    break
                reply = stamp(data, offset, self.header)
                offset += len(data)
                self.stats.tcp_bytes += len(data)
                await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.stats.errors += 1
        finally:
            self.stats.tcp_active -= 1
            await trio.aclose_forcefully(stream)

    async def _udp_loop(self, sock: trio.socket.SocketType) -> None:
        enable_pktinfo(sock)
        with contextlib.suppress(OSError):
            # Room for bursts from many flows (the kernel caps it at net.core.rmem_max).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        failures = 0
        with sock:
            while True:
                try:
                    data, ancdata, _flags, peer = await sock.recvmsg(BUFFER, ANCILLARY_SPACE)
                    self.stats.udp_datagrams += 1
                    await sock.sendmsg(
                        [stamp(data, 0, self.header)], reply_ancillary(ancdata), 0, peer
                    )
                    failures = 0
                except OSError:
                    # An ICMP error queued for an earlier reply, a full buffer: drop, go on, and
                    # do not spin if the error repeats.
                    self.stats.errors += 1
                    failures += 1
                    if failures > 100:
                        await trio.sleep(0.01)


async def bind_socket(address: HostPort, kind: socket.SocketKind) -> trio.socket.SocketType:
    """A bound (and, for TCP, listening) socket; ``[::]`` accepts IPv4 too (dual-stack)."""
    infos = await trio.socket.getaddrinfo(
        address.host, address.port, type=kind, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(f"cannot resolve {address}")
    family, _type, proto, _canon, sockaddr = infos[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        if kind == socket.SOCK_STREAM:
            # Restarts need not wait for TIME_WAIT. Not for UDP, where it would let a second
            # server share the port and take part of the traffic.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            dual = is_unspecified(address.host)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        await sock.bind(sockaddr)
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def enable_pktinfo(sock: trio.socket.SocketType) -> None:
    """Ask for each datagram's destination address, to answer from it (see ``reply_ancillary``)."""
    with contextlib.suppress(OSError):
        # IPv4 datagrams, also on a dual-stack IPv6 socket.
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    if sock.family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)


def raise_fd_limit() -> None:
    """Many connections need many descriptors: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_server(server: Server, announce: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT, then close everything and return."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        await server.bind()  # BindError here, not wrapped in the nursery's exception group
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(server.serve)
            announce(f"traffic server {server.name!r} serving on {' '.join(bound)}")
            async for signum in signals:
                announce(
                    f"traffic server {server.name!r} stopping on {signal.Signals(signum).name}"
                )
                break
            nursery.cancel_scope.cancel()
    announce(f"traffic server {server.name!r} stopped: {server.stats.summary()}")
