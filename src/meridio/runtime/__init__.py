"""The shared runtime: one per process, handed to the role.

It owns the trio-asyncio loop, the event bus, the gRPC stack, the health service, netlink
managers (one per namespace) and the metrics endpoint. Roles use these and never open their
own netlink sockets or gRPC servers behind the runtime's back.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio_asyncio

from meridio.runtime.bus import EventBus
from meridio.runtime.grpc import Endpoint, GrpcServer, GrpcStack
from meridio.runtime.health import Health, HealthService
from meridio.runtime.logs import get_logger
from meridio.runtime.metrics import registry, start_metrics_server
from meridio.runtime.netlink import NetlinkManager
from meridio.runtime.tls import Tls
from meridio.settings import CommonSettings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["Runtime", "open_runtime"]


class Runtime:
    def __init__(
        self,
        role: str,
        settings: CommonSettings,
        nursery: trio.Nursery,
        tls: Tls | None = None,
    ) -> None:
        self.role = role
        self.settings = settings
        self.instance = settings.instance or socket.gethostname()
        self.run_dir = Path(settings.run_dir or f"/run/meridio/{role}")
        self.bus = EventBus()
        self.health = Health()
        self.tls = tls
        self.grpc = GrpcStack(
            settings.max_message_bytes, tls=tls, insecure=settings.insecure, role=role
        )
        self.log = get_logger(f"meridio.{role}")
        self._nursery = nursery
        self._netlink: dict[str | None, NetlinkManager] = {}
        self.health_server: GrpcServer | None = None

    @property
    def metrics(self) -> CollectorRegistry:
        """The process-wide Prometheus registry (prometheus-client is loaded on first use)."""
        return registry()

    @property
    def health_socket(self) -> Path:
        return self.run_dir / "health.sock"

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a background task for the life of the runtime."""
        self._nursery.start_soon(fn, *args)

    async def start(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await self._nursery.start(fn, *args)

    async def netlink(self, netns: str | None = None, *, events: bool = False) -> NetlinkManager:
        """The netlink manager of ``netns`` (None: this process's namespace).

        With ``events`` the namespace's kernel events are published on the bus from then on.
        """
        manager = self._netlink.get(netns)
        if manager is None:
            manager = NetlinkManager(self.bus, netns)
            await manager.open()
            self._netlink[netns] = manager
        if events and not manager.events_running:
            manager.events_running = True  # claimed now: concurrent callers start it once
            await self._nursery.start(manager.run_events)
        return manager

    async def _serve_health(self) -> None:
        service = HealthService(self.health)
        self.health_server = await self.grpc.serve(
            [service], [Endpoint(path=str(self.health_socket))]
        )
        if self.settings.health_listen:
            # the kubelet's gRPC probes cannot present a certificate: health-plaintext
            await self.grpc.serve(
                [service], [self.settings.health_listen], plaintext=self.settings.health_plaintext
            )

    async def aclose(self) -> None:
        await self.grpc.close()
        for manager in self._netlink.values():
            manager.close()
        self._netlink.clear()


@asynccontextmanager
async def open_runtime(
    role: str, settings: CommonSettings, tls: Tls | None = None
) -> AsyncIterator[Runtime]:
    """Open the trio-asyncio loop and the runtime services around a role's life.

    ``tls`` (see :func:`meridio.runtime.tls.check_settings`) is loaded from the settings when
    not given; its files are then watched for changes.
    """
    if tls is None:
        tls = Tls.from_settings(settings, role)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        runtime = Runtime(role, settings, nursery, tls)
        try:
            if tls is not None:
                if settings.insecure:
                    runtime.log.warning("insecure ignored: certificates are configured")
                runtime.log.info("mutual tls", **tls.describe())
                nursery.start_soon(tls.watch)
            elif settings.insecure:
                runtime.log.warning("insecure: gRPC over TCP is plain text, unauthenticated")
            runtime.run_dir.mkdir(parents=True, exist_ok=True)
            await runtime._serve_health()
            if settings.metrics_listen:
                start_metrics_server(settings.metrics_listen)
            yield runtime
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await runtime.aclose()
