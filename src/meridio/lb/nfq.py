"""NFQUEUE readers of the nfqueue mode: one thread per queue, verdicts batched under load.

A reader binds one queue (NetfilterQueue parses the kernel's messages) and runs in a thread of
its own, in NetfilterQueue's C loop, which waits in ``recv`` with the GIL released and calls the
decision for each packet. The decision is a plain callable supplied by the role: it returns the
packet's mark, or :data:`DROP`. The reader packs the verdict into an ``NFQNL_MSG_VERDICT``
netlink message (verdict, packet id, mark) and sends it:

* **one at a time** while packets come one at a time: a packet costs what it costs a C reader
  (its ``recv``, its verdict's ``send``), and its verdict does not wait for the next packet;
* **in batches** while they queue up: a packet whose ``recv`` returned at once (less than
  :data:`BURST_GAP` after the previous verdict) starts a burst; the socket is switched to
  non-blocking, the verdicts are kept and sent together (one ``send`` per :attr:`batch`
  packets, and when ``recv`` finds the queue empty), then the reader waits again. So under
  load a packet costs one system call instead of two. The kernel's handling is unchanged: one
  message per packet, each with its own mark (``NFQNL_MSG_VERDICT_BATCH`` would give every
  packet up to an id the same mark).

Measured with ``bench/bench_datapath.py`` against the minimal C reader ``bench/nfq_reader.c``
(libnetfilter_queue, a verdict per packet): see bench/README.md.

The thread is stopped (and the queue unbound) when the reader's task is cancelled: a receive
timeout lets it look at its stop flag every :data:`STOP_CHECK` seconds. The trio loop never
waits for packets; a flood costs it only GIL handovers.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import trio
from netfilterqueue import COPY_PACKET, NetfilterQueue

from meridio.runtime.logs import get_logger

__all__ = [
    "BURST_GAP",
    "COPY_RANGE",
    "DROP",
    "QUEUE_LENGTH",
    "STOP_CHECK",
    "QueueReader",
    "verdict_message",
]

log = get_logger("meridio.nfq")

COPY_RANGE: Final = 256
"""Bytes of each packet copied to user space: the IP and L4 headers (byte matches read the
latter), and the quoted headers of an ICMP error (IPv6 with extension headers included); the
verdict never rewrites the payload, so the rest of a large packet need not cross at all."""
QUEUE_LENGTH: Final = 4096
"""Packets the kernel keeps queued for a reader before it drops (or, fail-open, accepts)."""

DROP: Final = -1
"""What the decision returns for a packet to drop; any other value is the mark to accept with."""

NF_DROP: Final = 0
NF_ACCEPT: Final = 1
_NFQNL_MSG_VERDICT: Final = (3 << 8) | 1  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT
_NFQA_VERDICT_HDR: Final = 2
_NFQA_MARK: Final = 3
_NLM_F_REQUEST: Final = 1
_MESSAGE_LENGTH: Final = 16 + 4 + 4 + 8 + 4 + 4
_SOL_NETLINK: Final = 270
_SO_RCVBUFFORCE: Final = 33


def _prefix(queue: int) -> bytes:
    """What every verdict message of a queue starts with (all in host order but the
    queue number): netlink header, nfgenmsg, the verdict attribute's header."""
    header = struct.pack("=IHHII", _MESSAGE_LENGTH, _NFQNL_MSG_VERDICT, _NLM_F_REQUEST, 0, 0)
    nfgen = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue)
    return header + nfgen + struct.pack("=HH", 4 + 8, _NFQA_VERDICT_HDR)


_MARK_ATTR: Final = struct.pack("=HH", 4 + 4, _NFQA_MARK)
_VERDICT = struct.Struct("!24sII4sI")  # prefix, verdict, packet id, mark attribute, mark


def verdict_message(queue: int, packet_id: int, mark: int) -> bytes:
    """The ``NFQNL_MSG_VERDICT`` message for one packet: accept with ``mark``, or drop
    (``mark`` :data:`DROP`)."""
    if mark == DROP:
        return _VERDICT.pack(_prefix(queue), NF_DROP, packet_id, _MARK_ATTR, 0)
    return _VERDICT.pack(_prefix(queue), NF_ACCEPT, packet_id, _MARK_ATTR, mark)


BURST_GAP: Final = 20_000
"""Nanoseconds: a packet received sooner than this after the previous verdict was queued
already (a blocking ``recv`` that had to wait takes longer to wake up): batch."""
STOP_CHECK: Final = 0.1


class QueueReader:
    """One queue and its reader thread; ``decide(packet)`` gets each NetfilterQueue packet
    (``get_payload()``, ``id``) and returns its mark or :data:`DROP`."""

    def __init__(
        self,
        queue_num: int,
        decide: Callable[[Any], int],
        *,
        batch: int = 64,
        max_len: int = QUEUE_LENGTH,
        copy_range: int = COPY_RANGE,
    ) -> None:
        self.queue_num = queue_num
        self.decide = decide
        self.batch = max(1, batch)
        self.max_len = max_len
        self.copy_range = copy_range
        self.batches = 0
        """Verdict sends so far."""
        self.packets = 0
        self.bursts = 0
        self.send_errors = 0
        self._pending: list[bytes] = []
        self._batching = False
        self._last = 0
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._prefix = _prefix(queue_num)

    def _on_packet(self, pkt: Any) -> None:
        try:
            mark = self.decide(pkt)
        except Exception:  # a bug must not leave the packet queued forever
            log.exception("verdict failed, dropping the packet", queue=self.queue_num)
            mark = DROP
        if mark == DROP:
            message = _VERDICT.pack(self._prefix, NF_DROP, pkt.id, _MARK_ATTR, 0)
        else:
            message = _VERDICT.pack(self._prefix, NF_ACCEPT, pkt.id, _MARK_ATTR, mark)
        pending = self._pending
        pending.append(message)
        if self._batching:
            if len(pending) >= self.batch:
                self._flush()
            return
        now = time.monotonic_ns()
        if now - self._last < BURST_GAP and self._sock is not None:
            # queued behind another: keep the verdicts until recv finds the queue empty
            self._batching = True
            self.bursts += 1
            self._sock.setblocking(False)
            return
        self._flush()
        self._last = time.monotonic_ns()

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self.packets += len(pending)
        data = b"".join(pending) if len(pending) > 1 else pending[0]
        pending.clear()
        assert self._sock is not None
        try:
            self._sock.send(data)
            self.batches += 1
        except OSError as exc:  # the kernel refused the batch: its packets stay queued
            self.send_errors += 1
            log.error("sending verdicts failed", queue=self.queue_num, error=str(exc))

    def _loop(self, nfq: NetfilterQueue) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            # blocking recv (the receive timeout ends it now and then), or non-blocking in a
            # burst: run() returns when recv says EAGAIN
            nfq.run(block=True)
            self._flush()
            if self._batching:
                self._batching = False
                sock.setblocking(True)
            self._last = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nfq = NetfilterQueue()
        nfq.bind(
            self.queue_num,
            self._on_packet,
            max_len=self.max_len,
            mode=COPY_PACKET,
            range=self.copy_range,
        )
        self._sock = sock = socket.socket(fileno=nfq.get_fd())
        thread = threading.Thread(
            target=self._loop, args=(nfq,), name=f"nfqueue-{self.queue_num}", daemon=True
        )
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 8 * 1024 * 1024)
            except OSError as exc:  # not privileged: the limit of net.core.rmem_max
                if exc.errno != errno.EPERM:
                    raise
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            # a blocking recv that returns EAGAIN every STOP_CHECK seconds (SO_RCVTIMEO: the
            # C loop's own recv; a Python timeout would make the descriptor non-blocking)
            sock.setblocking(True)
            timeout = struct.pack("@ll", 0, int(STOP_CHECK * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            thread.start()
            log.info("queue reader bound", queue=self.queue_num)
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._stop.set()
            if thread.is_alive():
                thread.join()  # at most a poll timeout
            sock.detach()  # the descriptor belongs to NetfilterQueue
            nfq.unbind()
            log.info("queue reader unbound", queue=self.queue_num)
