"""The connect endpoint's proof that a namespace reference belongs to its caller.

The rule is :mod:`meridio.core.netnsref`'s; this module reads what it needs from the kernel:
the namespace files' device and inode, the calling process's namespace (a unix socket's
SO_PEERCRED pid), and the TCP table of the namespace a TCP caller names (read from a thread
of its own that enters that namespace and leaves it, then ends: no thread that other work
uses ever changes namespace).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from meridio.core import netnsref
from meridio.core.netnsref import Address, Refused
from meridio.runtime.tls import CallPeer

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
#: Seconds a TCP connection's proof is reused (its refreshes cost nothing in between).
PROOF_TTL = 60.0
PROOF_CACHE = 8192
#: Namespaces entered at once (a thousand targets asking at the same moment).
CONCURRENCY = 16

Inode = tuple[int, int]  # (st_dev, st_ino) of a namespace file


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _read_tables(directory: str) -> str:
    texts = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{directory}/{name}") as f:
                texts.append(f.read())
        except FileNotFoundError:  # IPv6 disabled
            continue
    return "\n".join(texts)


def tcp_tables_of_process(pid: int, expect: Inode) -> str | None:
    """The TCP tables (IPv4 and IPv6) of process ``pid``'s namespace, from its /proc (no
    namespace entered). None when the process is no longer in the namespace ``expect``
    identifies (it exited and its pid was reused)."""
    text = _read_tables(f"/proc/{pid}/net")
    st = os.stat(f"/proc/{pid}/ns/net")
    return text if (st.st_dev, st.st_ino) == expect else None


def tcp_tables_in(path: str, expect: Inode) -> str | None:
    """The TCP tables (IPv4 and IPv6) of the namespace at ``path``, read from inside it by the
    calling thread, which must be a thread of its own (see :func:`in_own_thread`); needs
    CAP_SYS_ADMIN. None when ``path`` no longer names the namespace ``expect`` identifies."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != expect:
                return None
            _setns(fd)
        finally:
            os.close(fd)
        try:
            return _read_tables("/proc/thread-self/net")
        finally:
            _setns(home)  # if this fails the thread ends in the wrong namespace, harmlessly
    finally:
        os.close(home)


async def in_own_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread that ends with it (for work that changes the thread's
    namespace) and wait for it without blocking the event loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="meridio-netns-proof", daemon=True).start()
    return await future


class NetnsGuard:
    """Decides, for each veth request, whether its namespace reference is the caller's."""

    def __init__(self, allow: frozenset[str] = frozenset(), *, ttl: float = PROOF_TTL) -> None:
        self.allow = allow
        self.ttl = ttl
        self._nsfs = os.stat("/proc/self/ns/net").st_dev
        self._proofs: dict[tuple[object, ...], float] = {}
        self._limit = asyncio.Semaphore(CONCURRENCY)
        self.checks = 0
        """Proofs read from the kernel (not from the cache): for tests and metrics."""

    def _stat(self, path: str) -> Inode:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise Refused(f"cannot open the client's netns {path}: {exc.strerror}") from None
        if st.st_dev != self._nsfs:
            raise Refused(f"{path} is not a network namespace")
        return st.st_dev, st.st_ino

    async def check(self, path: str, peer: CallPeer | None) -> int:
        """The inode of the namespace at ``path`` when the rule accepts it from ``peer``;
        Refused (with the reason) otherwise."""
        ref = netnsref.parse_reference(path)
        inode = self._stat(path)
        if ref.name is not None and ref.name in self.allow:
            return inode[1]
        if peer is None:
            raise Refused(f"netns {path}: the caller is unknown, so it cannot be its own")
        if peer.pid is not None:
            return self._check_process(path, inode, peer.pid)
        client = netnsref.socket_end(peer.peername)
        server = netnsref.socket_end(peer.sockname)
        if client is None or server is None:
            raise Refused(
                f"netns {path}: the caller's process or connection cannot be read, so the "
                "namespace cannot be proved to be its own"
            )
        await self._check_connection(ref, inode, client, server)
        return inode[1]

    def _check_process(self, path: str, inode: Inode, pid: int) -> int:
        if pid <= 0:
            raise Refused(
                f"netns {path}: the calling process is not visible here (another PID "
                "namespace), so the namespace cannot be proved to be its own"
            )
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError as exc:
            raise Refused(
                f"netns {path}: cannot read the calling process {pid}'s namespace: {exc.strerror}"
            ) from None
        if (st.st_dev, st.st_ino) != inode:
            raise Refused(
                f"netns {path} is not the caller's: the calling process {pid} is in another "
                "namespace"
            )
        return inode[1]

    async def _check_connection(
        self,
        ref: netnsref.NetnsRef,
        inode: Inode,
        client: tuple[Address, int],
        server: tuple[Address, int],
    ) -> None:
        key = (client, server, inode)
        now = time.monotonic()
        if self._proofs.get(key, 0.0) > now:
            return
        async with self._limit:
            self.checks += 1
            path, pid = ref.path, ref.pid
            try:
                if pid is not None:  # its /proc has the tables: no namespace to enter
                    text = await in_own_thread(lambda: tcp_tables_of_process(pid, inode))
                else:
                    text = await in_own_thread(lambda: tcp_tables_in(path, inode))
            except OSError as exc:
                raise Refused(
                    f"cannot open the client's netns {path}: {exc.strerror or exc}"
                ) from None
        if text is None:
            raise Refused(f"netns {path} changed while it was checked")
        if not netnsref.holds_connection(netnsref.parse_tcp_table(text), client, server):
            raise Refused(
                f"netns {path} is not the caller's: it holds no end of this connection "
                f"({_end(client)} -> {_end(server)}); over TCP only the caller's own namespace "
                "(or a /run/netns name on the endpoint's connect-netns-allow list) is accepted"
            )
        if len(self._proofs) >= PROOF_CACHE:
            self._proofs = {k: t for k, t in self._proofs.items() if t > now}
            if len(self._proofs) >= PROOF_CACHE:
                self._proofs.clear()
        self._proofs[key] = now + self.ttl


def _end(end: tuple[Address, int]) -> str:
    host = f"[{end[0]}]" if end[0].version == 6 else str(end[0])
    return f"{host}:{end[1]}"


__all__ = ["NetnsGuard", "Refused", "in_own_thread", "tcp_tables_in", "tcp_tables_of_process"]
