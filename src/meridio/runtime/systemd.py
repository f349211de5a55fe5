"""systemd's notify protocol (``sd_notify``) for ``Type=notify`` units, without libsystemd.

systemd names a unix datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` for a socket
in the abstract namespace) and, when the unit has ``WatchdogSec=``, the interval in
``WATCHDOG_USEC`` (and, optionally, the process it is meant for in ``WATCHDOG_PID``). The
daemon sends datagrams of newline-separated assignments:

* ``READY=1`` once, when the ``Readiness`` probe service first becomes SERVING (systemd then
  considers the unit started and starts the units ordered after it);
* ``STATUS=...`` whenever the one-line summary of the health state changes (``systemctl
  status`` shows it);
* ``WATCHDOG=1`` every half interval while the process is alive: the trio loop is running,
  and, once the role has started, its ``Liveness`` probe service is SERVING (so a role that
  Kubernetes would restart on its liveness probe is restarted by systemd too, by the
  watchdog);
* ``STOPPING=1`` when the graceful shutdown begins (or, at the latest, when the runtime ends).

Every send is a non-blocking ``sendto`` on the trio thread: a datagram either fits the socket
buffer at once or is dropped (and a warning is logged once), so systemd being slow can never
stall the process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from types import TracebackType

import trio

from meridio.runtime.health import LIVENESS, PROBES, READINESS, SERVING, STARTUP, Health
from meridio.runtime.logs import get_logger

__all__ = ["ENVIRONMENT", "Notifier", "describe", "parse_address", "report", "watchdog_interval"]

ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""The variables systemd sets for the main process; removed so that child processes
(``nft``, ``iptables``, ...) do not inherit them."""

log = get_logger("meridio.systemd")


def parse_address(value: str) -> str | bytes:
    """The ``sendto`` address of a ``NOTIFY_SOCKET`` value.

    ``@name`` is a socket in the abstract namespace (a leading NUL byte on the wire); any other
    value must be an absolute path. ValueError for anything else (``vsock:`` addresses, which
    systemd only uses towards a virtual machine's host, are not supported).
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET={value!r} is neither a socket path nor an @abstract name")


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """The watchdog interval in seconds that systemd asks ``pid`` for, or None.

    None when ``WATCHDOG_USEC`` is unset, not a positive integer, or ``WATCHDOG_PID`` names
    another process (the variables were inherited from a parent that is the watched one).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    watched = environ.get("WATCHDOG_PID", "")
    if watched and (not watched.isdigit() or int(watched) != pid):
        return None
    return int(usec) / 1_000_000


class Notifier:
    """A datagram socket towards systemd's notify socket.

    ``watchdog`` is the full interval systemd asked for (seconds), None without a watchdog.
    """

    def __init__(self, address: str | bytes, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog
        self._socket: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        )
        self._socket.setblocking(False)
        self._warned = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Notifier | None:
        """The notifier systemd asks for, or None when not run by systemd as ``Type=notify``.

        The variables are removed from ``environ`` (pass ``os.environ``) either way.
        """
        value = environ.get("NOTIFY_SOCKET", "")
        watchdog = watchdog_interval(environ, os.getpid())
        for name in ENVIRONMENT:
            environ.pop(name, None)
        if not value:
            return None
        try:
            address = parse_address(value)
        except ValueError as exc:
            log.warning("systemd notification disabled", error=str(exc))
            return None
        log.info("notifying systemd", socket=value, watchdog_seconds=watchdog)
        return cls(address, watchdog)

    def send(self, *assignments: str) -> bool:
        """Send ``NAME=value`` assignments in one datagram; False if it could not be sent."""
        if self._socket is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            self._socket.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                text = message.decode(errors="replace")
                log.warning("cannot notify systemd", error=str(exc), message=text)
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def describe(health: Health) -> str:
    """The one-line ``STATUS=`` summary of a process's health."""
    if health.shutting_down:
        return "stopping: draining"
    summary = health.summary()
    failing = sorted(
        name
        for name, status in summary.items()
        if name not in ("process", *PROBES) and status != SERVING.name
    )
    if health.status(READINESS) == SERVING:
        head = "ready" if health.status(LIVENESS) == SERVING else "ready, not live"
    elif health.status(STARTUP) == SERVING:
        head = "not ready"
    else:
        head = "starting"
    return f"{head}; not serving: {', '.join(failing)}" if failing else head


async def report(health: Health, notifier: Notifier, started: trio.Event) -> None:
    """Tell systemd about ``health`` until cancelled, then close ``notifier``.

    ``started`` is set once the role's ``run`` has started (and ``health.start()`` called).
    Sends STATUS= on every change of
    :func:`describe`, READY=1 the first time Readiness is SERVING after ``started``, STOPPING=1
    when the shutdown begins, and runs the watchdog pings from the start.
    """
    stopping = False
    try:
        async with trio.open_nursery() as nursery:
            if notifier.watchdog:
                nursery.start_soon(_ping, health, notifier, started, notifier.watchdog / 2)
            notifier.send("STATUS=starting")
            await started.wait()
            ready = False
            status = "starting"
            while True:
                seen = health.version
                assignments = []
                if not ready and not health.shutting_down and health.status(READINESS) == SERVING:
                    ready = True
                    assignments.append("READY=1")
                if health.shutting_down and not stopping:
                    stopping = True
                    assignments.append("STOPPING=1")
                current = describe(health)
                if current != status:
                    status = current
                    assignments.append(f"STATUS={status}")
                if assignments:
                    notifier.send(*assignments)
                await health.wait_changed(seen)
    finally:
        if not stopping:
            notifier.send("STOPPING=1", "STATUS=stopping")
        notifier.close()


async def _ping(health: Health, notifier: Notifier, started: trio.Event, period: float) -> None:
    was_alive = True
    while True:
        alive = not started.is_set() or health.shutting_down or health.status(LIVENESS) == SERVING
        if alive:
            notifier.send("WATCHDOG=1")
        elif was_alive:
            log.warning("Liveness is not serving: watchdog pings withheld", status=describe(health))
        was_alive = alive
        await trio.sleep(period)
