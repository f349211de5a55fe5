"""The NSP role: Meridio's ``nsp.v1`` target registry and configuration manager.

Registrations persist in sqlite and expire when not refreshed within ``entry-timeout``. The
configuration comes from a file in Meridio's format, reloaded when it changes and on SIGHUP;
a bad file is refused (logged with the key and item) and the running configuration stays.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import betterproto
import grpclib
import trio
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status
from prometheus_client import Gauge

from meridio.api.nsp.v1 import (
    Attractor,
    AttractorResponse,
    Conduit,
    ConduitResponse,
    ConfigurationManagerBase,
    Flow,
    FlowResponse,
    Gateway,
    GatewayResponse,
    Stream,
    StreamResponse,
    Target,
    TargetRegistryBase,
    TargetResponse,
    Trench,
    TrenchResponse,
    Vip,
    VipResponse,
)
from meridio.core import nspconfig
from meridio.core.nspconfig import ConfigError, NspConfig
from meridio.core.registry import InvalidTarget, validate
from meridio.roles.base import Role
from meridio.runtime.metrics import REGISTRY
from meridio.runtime.notify import Changes, watch_changes
from meridio.settings import CommonSettings
from meridio.store.registry import PersistentRegistry

TARGETS = Gauge("meridio_nsp_registered_targets", "Targets in the NSP registry", registry=REGISTRY)
CONFIG_REFUSED = Gauge(
    "meridio_nsp_configuration_refused",
    "1 while the configuration file on disk is refused and an older one is in use",
    registry=REGISTRY,
)


class NspSettings(CommonSettings, kw_only=True):
    listen: str = "[::]:7778"
    database: str = "/var/lib/meridio/nsp.db"
    configuration_file: str = ""
    """Meridio configuration (ConfigMap manifest, its data mapping, or the mapping inline)."""
    trench: str = ""
    """Trench name used when the configuration has no ``trench`` key."""
    entry_timeout: float = 60.0
    """Seconds a registration lives without a refresh (Register)."""
    config_poll_interval: float = 1.0


def load_configuration(settings: NspSettings) -> NspConfig:
    if not settings.configuration_file:
        trench = Trench(name=settings.trench) if settings.trench else None
        return NspConfig(trench=trench)
    return nspconfig.load_file(settings.configuration_file, default_trench=settings.trench or None)


def _file_state(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows the symlinks a mounted ConfigMap swaps
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _field_one(payload: bytes) -> bytes:
    """``payload`` as protobuf field 1 (length-delimited): tag, varint length, bytes."""
    n = len(payload)
    head = bytearray(b"\x0a")
    while n >= 0x80:
        head.append((n & 0x7F) | 0x80)
        n >>= 7
    head.append(n)
    return bytes(head) + payload


class NspState:
    """Registry, configuration and their change counters, shared by the two services."""

    def __init__(self, registry: PersistentRegistry, config: NspConfig) -> None:
        self.registry = registry
        self.config = config
        self.config_digest = nspconfig.config_digest(config)
        self.targets_changed = Changes()
        self.config_changed = Changes()
        self._cache: dict[bytes, bytes] = {}
        self._wire: dict[int, tuple[Target, bytes]] = {}
        self._cache_generation = -1

    def lookup_stream(self, trench: str, conduit: str, stream: str) -> int | None:
        found = self.config.stream_by_key(trench, conduit, stream)
        return None if found is None else int(found.max_targets)

    def set_config(self, config: NspConfig) -> bool:
        digest = nspconfig.config_digest(config)
        if digest == self.config_digest:
            return False
        self.config, self.config_digest = config, digest
        self.config_changed.bump()
        return True

    def targets_bytes(self, target_filter: Target) -> bytes:
        """The serialized Watch reply for a filter, shared by every watcher with that filter.

        Stored targets never change in place, so each one is serialized once and a reply is the
        concatenation of its targets as field 1 of ``TargetResponse``.
        """
        generation = self.registry.generation
        if generation != self._cache_generation:
            self._cache.clear()
            self._cache_generation = generation
            if len(self._wire) > 2 * len(self.registry) + 64:
                live = {id(t) for t in self.registry.all()}
                self._wire = {k: v for k, v in self._wire.items() if k in live}
        key = bytes(target_filter)
        data = self._cache.get(key)
        if data is None:
            data = b"".join(
                _field_one(self._target_wire(t)) for t in self.registry.snapshot(target_filter)
            )
            self._cache[key] = data
        return data

    def _target_wire(self, target: Target) -> bytes:
        hit = self._wire.get(id(target))
        if hit is not None and hit[0] is target:
            return hit[1]
        data = bytes(target)
        self._wire[id(target)] = (target, data)
        return data

    def targets_updated(self) -> None:
        TARGETS.set(len(self.registry))
        self.targets_changed.bump()


class TargetRegistryService(TargetRegistryBase):
    def __init__(self, state: NspState) -> None:
        self.state = state

    def _check(self, target: Target) -> None:
        try:
            validate(target, self.state.lookup_stream)
        except InvalidTarget as exc:
            raise grpclib.GRPCError(Status.INVALID_ARGUMENT, str(exc)) from exc

    async def register(self, target: Target) -> Empty:
        self._check(target)
        if self.state.registry.register(target, time.time()):
            self.state.targets_updated()
        return Empty()

    async def unregister(self, target: Target) -> Empty:
        if not target.ips:
            raise grpclib.GRPCError(Status.INVALID_ARGUMENT, "target has no IPs")
        if self.state.registry.unregister(target, time.time()):
            self.state.targets_updated()
        return Empty()

    def watch(self, target: Target) -> AsyncIterator[TargetResponse]:
        state = self.state
        return watch_changes(state.targets_changed, lambda: state.targets_bytes(target))


class ConfigurationManagerService(ConfigurationManagerBase):
    def __init__(self, state: NspState) -> None:
        self.state = state

    def _watch(
        self, select: Callable[[NspConfig, Any], betterproto.Message], request: Any
    ) -> AsyncIterator[Any]:
        return watch_changes(self.state.config_changed, lambda: select(self.state.config, request))

    def watch_trench(self, trench: Trench) -> AsyncIterator[TrenchResponse]:
        return self._watch(nspconfig.filter_trench, trench)

    def watch_conduit(self, conduit: Conduit) -> AsyncIterator[ConduitResponse]:
        return self._watch(nspconfig.filter_conduits, conduit)

    def watch_stream(self, stream: Stream) -> AsyncIterator[StreamResponse]:
        return self._watch(nspconfig.filter_streams, stream)

    def watch_flow(self, flow: Flow) -> AsyncIterator[FlowResponse]:
        return self._watch(nspconfig.filter_flows, flow)

    def watch_vip(self, vip: Vip) -> AsyncIterator[VipResponse]:
        return self._watch(nspconfig.filter_vips, vip)

    def watch_attractor(self, attractor: Attractor) -> AsyncIterator[AttractorResponse]:
        return self._watch(nspconfig.filter_attractors, attractor)

    def watch_gateway(self, gateway: Gateway) -> AsyncIterator[GatewayResponse]:
        return self._watch(nspconfig.filter_gateways, gateway)


class NspRole(Role):
    name = "nsp"
    Settings = NspSettings

    @classmethod
    def check_settings(cls, settings: CommonSettings) -> None:
        assert isinstance(settings, NspSettings)
        if settings.entry_timeout <= 0:
            raise ValueError("setting 'entry-timeout' must be a positive number of seconds")
        try:
            load_configuration(settings)
        except ConfigError as exc:
            raise ValueError(f"configuration refused: {exc}") from exc

    def __init__(self, settings: CommonSettings, runtime: Any) -> None:
        super().__init__(settings, runtime)
        assert isinstance(settings, NspSettings)
        self.nsp_settings = settings
        self.state: NspState | None = None
        self._file_state: tuple[int, int, int] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.nsp_settings
        check = self.runtime.health.register("NSP")
        Path(settings.database).parent.mkdir(parents=True, exist_ok=True)
        self._file_state = _file_state(settings.configuration_file)
        config = await trio.to_thread.run_sync(load_configuration, settings)
        registry = await trio.to_thread.run_sync(
            lambda: PersistentRegistry(
                settings.database, time.time(), entry_timeout=settings.entry_timeout
            )
        )
        self.state = state = NspState(registry, config)
        TARGETS.set(len(registry))
        try:
            await self.runtime.grpc.serve(
                [TargetRegistryService(state), ConfigurationManagerService(state)],
                [settings.listen],
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire, state)
                if settings.configuration_file:
                    nursery.start_soon(self._poll_configuration)
                check.set(True)
                task_status.started()
        finally:
            check.set(False)
            registry.close()

    async def _expire(self, state: NspState) -> None:
        """Remove registrations that stopped refreshing, waking up when the next one is due."""
        while True:
            now = time.time()
            removed = state.registry.expire(now)
            if removed:
                self.runtime.log.info("registrations expired", count=len(removed))
                state.targets_updated()
            due = state.registry.next_expiry()
            # New registrations expire after existing ones, so sleeping until `due` is enough;
            # the cap keeps a wall-clock step from delaying expiry for long.
            await trio.sleep(1.0 if due is None else min(1.0, max(0.01, due - now)))

    async def _poll_configuration(self) -> None:
        path = self.nsp_settings.configuration_file
        while True:
            await trio.sleep(self.nsp_settings.config_poll_interval)
            current = _file_state(path)
            if current != self._file_state:
                self._file_state = current
                await self.reload()

    async def reload(self) -> None:
        if self.state is None:
            return
        log = self.runtime.log
        try:
            config = await trio.to_thread.run_sync(load_configuration, self.nsp_settings)
        except ConfigError as exc:
            CONFIG_REFUSED.set(1)
            log.error("configuration refused, keeping the running one", error=str(exc))
            return
        CONFIG_REFUSED.set(0)
        if self.state.set_config(config):
            log.info("configuration updated", digest=self.state.config_digest[:12])
