"""The NSP role: Meridio's ``nsp.v1`` target registry and configuration manager.

Beside them, ``meridio.nsp.v1.TargetRegistryBatch`` (our own) registers and unregisters many
targets in one call, each as ``Register`` or ``Unregister`` would: a proxy keeps the
registrations of every target of its node in a few calls instead of one or two a target
(Meridio's clients keep using ``nsp.v1.TargetRegistry``).

Registrations persist in sqlite and expire when not refreshed within ``entry-timeout``.
Changes are committed in groups (:mod:`meridio.runtime.commit`): every change made while a
commit runs goes into the next one, off the event loop, and a Register or Unregister is
answered, and watchers see its change, only once it is on disk. A restarted NSP restores every
registration with a full ``entry-timeout`` from its own start, so the owners of live targets
have time to refresh them; it logs how many it restored and, later, how many of those expired.

The configuration comes from a file (or a mounted ConfigMap directory) in Meridio's format,
polled and reloaded on SIGHUP. A polled change is applied only once the content has been read
unchanged for one poll interval (a file being rewritten in place is not applied half-written);
an empty file, one that does not parse or one that fails the checks is refused (logged, with
the key and item) and the running configuration stays. A configuration that removes every VIP
or every stream is applied, with a warning.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import betterproto
import grpclib
import trio
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status
from prometheus_client import Gauge

from meridio.api.meridio.nsp.v1 import (
    TargetRegistryBatchBase,
    UpdateRequest,
    UpdateResponse,
    UpdateResult,
)
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
from meridio.core.nspconfig import ConfigError, NspConfig, Source
from meridio.core.registry import InvalidTarget, validate
from meridio.core.settle import Settle
from meridio.roles.base import Role
from meridio.runtime.commit import GroupCommit
from meridio.runtime.metrics import REGISTRY
from meridio.runtime.notify import Changes, watch_changes
from meridio.settings import CommonSettings

if TYPE_CHECKING:
    from meridio.runtime import Runtime
from meridio.store.registry import Batch, PersistentRegistry, StoreError

MAX_BATCH = 4096
"""Updates one ``meridio.nsp.v1.TargetRegistryBatch/Update`` call may carry."""
PUBLISH_INTERVAL = 0.05
"""Least seconds between two wake-ups of the Watch streams (see :meth:`NspState.publish`)."""

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
    """Seconds between reads of the configuration; a change is applied after one more."""


def load_configuration(settings: NspSettings) -> NspConfig:
    if not settings.configuration_file:
        return _no_configuration(settings)
    return nspconfig.load_file(settings.configuration_file, default_trench=settings.trench or None)


def _no_configuration(settings: NspSettings) -> NspConfig:
    return NspConfig(trench=Trench(name=settings.trench) if settings.trench else None)


Observed = tuple[str, Source]
"""One read of the configuration: ("ok", what was read) or ("error", why it could not be)."""


def _observe(path: str) -> Observed:
    try:
        return "ok", nspconfig.read_source(path)
    except ConfigError as exc:
        return "error", str(exc)


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
        self.commits: GroupCommit[Batch] = GroupCommit(
            registry, name="nsp", on_commit=lambda _: self.targets_updated()
        )
        self._cache: dict[bytes, bytes] = {}
        self._cache_view = registry.view
        self._published = registry.view.generation
        self._dirty = trio.Event()
        self.publish_interval = PUBLISH_INTERVAL

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

    def targets_bytes(self, target_filter: Target, filter_key: bytes) -> bytes:
        """The serialized Watch reply for a filter (``filter_key`` is its bytes), shared by
        every watcher with that filter, from the committed view of the registry.

        Stored targets never change in place, so each one is serialized once and a reply is the
        concatenation of its targets as field 1 of ``TargetResponse``.
        """
        view = self.registry.view
        if view is not self._cache_view:
            self._cache.clear()
            self._cache_view = view
        data = self._cache.get(filter_key)
        if data is None:
            data = b"".join(_field_one(w) for w in view.wire(target_filter))
            self._cache[filter_key] = data
        return data

    def targets_updated(self) -> None:
        """A batch is committed: have :meth:`publish` wake the watchers if it changed anything."""
        view = self.registry.view
        TARGETS.set(len(view))
        if view.generation != self._published:
            self._dirty.set()

    async def publish(self) -> None:
        """Wake the Watch streams after committed changes: at once after a quiet spell, and at
        most every ``publish_interval`` seconds while changes keep coming.

        Each woken stream sends the latest committed state (a stream opened meanwhile starts
        from it too), so a burst of changes costs each watcher one reply per interval instead
        of one per commit: with 50 watchers of 100 targets, that fan-out is what costs most.
        """
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            generation = self.registry.view.generation
            if generation == self._published:
                continue
            self._published = generation
            self.targets_changed.bump()
            await trio.sleep(self.publish_interval)

    async def committed(self, seq: int) -> None:
        """asyncio side: wait until batch ``seq`` is on disk; UNAVAILABLE if it failed."""
        if not seq:
            return
        try:
            await self.commits.wait(seq)
        except StoreError as exc:
            raise grpclib.GRPCError(Status.UNAVAILABLE, f"registry not saved: {exc}") from exc


class TargetRegistryService(TargetRegistryBase):
    def __init__(self, state: NspState) -> None:
        self.state = state

    def _check(self, target: Target, *, removal: bool = False) -> None:
        try:
            validate(target, self.state.lookup_stream, removal=removal)
        except InvalidTarget as exc:
            raise grpclib.GRPCError(Status.INVALID_ARGUMENT, str(exc)) from exc

    async def register(self, target: Target) -> Empty:
        self._check(target)
        _, seq = self.state.registry.stage_register(target, time.time())
        await self.state.committed(seq)
        return Empty()

    async def unregister(self, target: Target) -> Empty:
        self._check(target, removal=True)
        _, seq = self.state.registry.stage_unregister(target, time.time())
        await self.state.committed(seq)
        return Empty()

    def watch(self, target: Target) -> AsyncIterator[TargetResponse]:
        state = self.state
        key = bytes(target)
        return watch_changes(state.targets_changed, lambda: state.targets_bytes(target, key))


class TargetRegistryBatchService(TargetRegistryBatchBase):
    """``meridio.nsp.v1.TargetRegistryBatch``: many ``Register`` and ``Unregister`` calls in
    one, applied in order and saved together. Over TLS, the authorization table's rule on
    target types holds for every update (meridio.core.authz)."""

    def __init__(self, state: NspState) -> None:
        self.state = state

    async def update(self, update_request: UpdateRequest) -> UpdateResponse:
        updates = update_request.updates
        if len(updates) > MAX_BATCH:
            raise grpclib.GRPCError(
                Status.INVALID_ARGUMENT, f"{len(updates)} updates in one call; at most {MAX_BATCH}"
            )
        registry, now = self.state.registry, time.time()
        results: list[UpdateResult] = []
        last = 0
        for update in updates:
            try:
                validate(update.target, self.state.lookup_stream, removal=update.unregister)
            except InvalidTarget as exc:
                results.append(UpdateResult(status=Status.INVALID_ARGUMENT.value, message=str(exc)))
                continue
            stage = registry.stage_unregister if update.unregister else registry.stage_register
            _, seq = stage(update.target, now)
            last = max(last, seq)
            results.append(UpdateResult())
        await self.state.committed(last)
        return UpdateResponse(results=results)


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


class NspRole(Role[NspSettings]):
    name = "nsp"
    Settings = NspSettings

    @classmethod
    def check_settings(cls, settings: NspSettings) -> None:
        if settings.entry_timeout <= 0:
            raise ValueError("setting 'entry-timeout' must be a positive number of seconds")
        if settings.config_poll_interval <= 0:
            raise ValueError("setting 'config-poll-interval' must be a positive number of seconds")
        try:
            load_configuration(settings)
        except ConfigError as exc:
            raise ValueError(f"configuration refused: {exc}") from exc

    def __init__(self, settings: NspSettings, runtime: Runtime) -> None:
        super().__init__(settings, runtime)
        self.nsp_settings = settings
        self.state: NspState | None = None
        self._settle: Settle[Observed] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.nsp_settings
        log = self.runtime.log
        check = self.runtime.health.register("NSP")
        Path(settings.database).parent.mkdir(parents=True, exist_ok=True)
        config = _no_configuration(settings)
        if settings.configuration_file:
            observed = await trio.to_thread.run_sync(_observe, settings.configuration_file)
            self._settle = Settle(observed)
            kind, source = observed
            if kind == "error":
                raise ConfigError(str(source))
            if nspconfig.source_is_empty(source):
                log.warning(
                    "configuration file is empty: starting with no configuration until it has some",
                    path=settings.configuration_file,
                )
            else:
                config = self._parse(source)
        started = time.time()
        registry = await trio.to_thread.run_sync(
            lambda: PersistentRegistry(
                settings.database, started, entry_timeout=settings.entry_timeout
            )
        )
        log.info(
            "registrations restored",
            count=registry.restored,
            grace_seconds=settings.entry_timeout if registry.restored else 0,
        )
        self.state = state = NspState(registry, config)
        TARGETS.set(len(registry))
        try:
            await self.runtime.grpc.serve(
                [
                    TargetRegistryService(state),
                    TargetRegistryBatchService(state),
                    ConfigurationManagerService(state),
                ],
                [settings.listen],
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(state.commits.run)
                nursery.start_soon(state.publish)
                nursery.start_soon(self._expire, state)
                if settings.configuration_file:
                    nursery.start_soon(self._poll_configuration)
                check.set(True)
                task_status.started()
        finally:
            check.set(False)
            registry.close()

    def _parse(self, source: Source) -> NspConfig:
        settings = self.nsp_settings
        return nspconfig.parse_source(
            source, default_trench=settings.trench or None, where=settings.configuration_file
        )

    async def _expire(self, state: NspState) -> None:
        """Remove registrations that stopped refreshing, waking up when the next one is due."""
        registry = state.registry
        while True:
            now = time.time()
            restored_before = registry.restored_pending
            removed = registry.stage_expire(now)
            if removed:
                self.runtime.log.info(
                    "registrations expired",
                    count=len(removed),
                    restored=restored_before - registry.restored_pending,
                )
                state.commits.request()
            due = registry.next_expiry()
            # New registrations expire after existing ones, so sleeping until `due` is enough;
            # the cap keeps a wall-clock step from delaying expiry for long.
            await trio.sleep(1.0 if due is None else min(1.0, max(0.01, due - now)))

    async def _poll_configuration(self) -> None:
        path = self.nsp_settings.configuration_file
        settle = self._settle
        assert settle is not None
        while True:
            await trio.sleep(self.nsp_settings.config_poll_interval)
            observed = await trio.to_thread.run_sync(_observe, path)
            verdict = settle.observe(observed)
            if verdict == "changing":
                self.runtime.log.info(
                    "configuration file changed: applied if unchanged at the next read",
                    path=path,
                )
            elif verdict == "apply":
                await self._apply(observed)

    async def reload(self) -> None:
        """SIGHUP: read the configuration now and apply it (no waiting for it to settle)."""
        if self.state is None or not self.nsp_settings.configuration_file:
            return
        observed = await trio.to_thread.run_sync(_observe, self.nsp_settings.configuration_file)
        if self._settle is not None:
            self._settle.accept(observed)
        await self._apply(observed)

    async def _apply(self, observed: Observed) -> None:
        state = self.state
        if state is None:
            return
        log = self.runtime.log
        path = self.nsp_settings.configuration_file
        kind, source = observed
        if kind == "error":
            CONFIG_REFUSED.set(1)
            log.error("configuration refused, keeping the running one", error=str(source))
            return
        if nspconfig.source_is_empty(source):
            CONFIG_REFUSED.set(1)
            log.warning("configuration file is empty: refused, keeping the running one", path=path)
            return
        try:
            config = await trio.to_thread.run_sync(self._parse, source)
        except ConfigError as exc:
            CONFIG_REFUSED.set(1)
            log.error("configuration refused, keeping the running one", error=str(exc))
            return
        CONFIG_REFUSED.set(0)
        old = state.config
        for what, before, after in (
            ("VIP", old.vips, config.vips),
            ("stream", old.streams, config.streams),
        ):
            if before and not after:
                log.warning(f"configuration removes every {what}", before=len(before), path=path)
        if state.set_config(config):
            log.info("configuration updated", digest=state.config_digest[:12])
