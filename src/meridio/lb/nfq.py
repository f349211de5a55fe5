"""NFQUEUE readers on the trio loop.

A reader binds one queue, sleeps until its netlink socket is readable, then lets
NetfilterQueue process at most ``batch`` datagrams before yielding to the loop again, so a flood
never starves the rest of the daemon (gRPC, netlink events, health). The verdict logic is a
plain callable supplied by the role.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

import trio
from netfilterqueue import COPY_PACKET, NetfilterQueue

from meridio.runtime.logs import get_logger

log = get_logger("meridio.nfq")

# Bytes of each packet copied to user space: enough for the IP and L4 headers and the quoted
# headers of an ICMP error (IPv6 with extension headers included); the verdict never rewrites
# the payload, so the rest of a large packet need not cross into user space at all.
COPY_RANGE = 512


class _BoundedSocket:
    """What ``run_socket`` reads from: the queue's socket, cut off after ``limit`` datagrams."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self.left = limit
        self.overruns = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        try:
            return self.sock.recv(size, socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                # the kernel dropped packets because we were slow; run_socket carries on
                self.overruns += 1
            raise


class QueueReader:
    def __init__(
        self,
        queue_num: int,
        verdict: Callable[[Any], None],
        *,
        batch: int = 64,
        max_len: int = 4096,
    ) -> None:
        self.queue_num = queue_num
        self.verdict = verdict
        self.batch = batch
        self.max_len = max_len
        self.batches = 0

    @property
    def overruns(self) -> int:
        return self._bounded.overruns if hasattr(self, "_bounded") else 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nfq = NetfilterQueue()
        nfq.bind(
            self.queue_num, self.verdict, max_len=self.max_len, mode=COPY_PACKET, range=COPY_RANGE
        )
        sock = socket.socket(fileno=nfq.get_fd())
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            self._bounded = _BoundedSocket(sock, self.batch)
            log.info("queue reader bound", queue=self.queue_num)
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(sock)
                self._bounded.left = self.batch
                nfq.run_socket(self._bounded)  # type: ignore[arg-type]  # duck-typed socket
                self.batches += 1
                await trio.lowlevel.checkpoint()
        finally:
            sock.detach()  # the descriptor belongs to NetfilterQueue
            nfq.unbind()
            log.info("queue reader unbound", queue=self.queue_num)
