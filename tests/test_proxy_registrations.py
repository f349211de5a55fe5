"""The proxy's NSP registrations: many in one TargetRegistryBatch call, one call each without."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio_asyncio
from betterproto.lib.google.protobuf import Empty

from meridio.api.meridio.nsp.v1 import (
    TargetRegistryBatchBase,
    UpdateRequest,
    UpdateResponse,
    UpdateResult,
)
from meridio.api.nsp.v1 import (
    Conduit,
    Target,
    TargetRegistryBase,
    TargetRegistryStub,
    TargetStatus,
    Trench,
)
from meridio.core.proxystate import Registration
from meridio.roles.proxy import ProxyRole
from meridio.runtime.grpc import Endpoint, GrpcStack


class Registry(TargetRegistryBase):
    """Calls as NSP sees them: (register or unregister, first IP, status)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    async def register(self, target: Target) -> Empty:
        self.calls.append(("register", target.ips[0], int(target.status)))
        return Empty()

    async def unregister(self, target: Target) -> Empty:
        self.calls.append(("unregister", target.ips[0], int(target.status)))
        return Empty()


class Batches(TargetRegistryBatchBase):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.sizes: list[int] = []

    async def update(self, update_request: UpdateRequest) -> UpdateResponse:
        self.sizes.append(len(update_request.updates))
        results = []
        for update in update_request.updates:
            if update.target.ips[0].startswith("198.18.9."):
                results.append(UpdateResult(status=3, message="refused"))
                continue
            if update.unregister:
                await self.registry.unregister(update.target)
            else:
                await self.registry.register(update.target)
            results.append(UpdateResult())
        return UpdateResponse(results=results)


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, event: str, **_: Any) -> None:
        self.lines.append(event)

    warning = info


class Role:
    """What the registrations' calls use of the proxy role (its own methods)."""

    def __init__(self, stack: GrpcStack, channel: Any) -> None:
        self.registry = TargetRegistryStub(channel)
        self.nsp_channel = channel
        self.conduit_msg = Conduit(name="conduit-a", trench=Trench(name="trench-a"))
        self.log = Log()
        self._messages: dict[Registration, Any] = {}
        self._streams: dict[str, bytes] = {}
        self._nsp_batched = True

    _nsp_batch = ProxyRole._nsp_batch
    _nsp_updates = ProxyRole._nsp_updates
    _nsp_update_call = ProxyRole._nsp_update_call
    _log_update = ProxyRole._log_update
    _register_aio = ProxyRole._register_aio
    _unregister_aio = ProxyRole._unregister_aio
    _encoded = ProxyRole._encoded
    _target_bytes = ProxyRole._target_bytes


def reg(n: int, enabled: bool = True) -> Registration:
    return Registration("stream-a", (f"198.18.{n // 256}.{n % 256}/24",), n + 1, enabled)


JOBS = [
    (reg(1), "new"),  # enabled and new: registered twice (NSP stores it disabled first)
    (reg(2, enabled=False), "new"),
    (reg(3), "change"),
    (reg(4), "keepalive"),
    (reg(5), "unregister"),
    (reg(9 * 256 + 1), "change"),  # refused by the batch NSP
]


async def _run(tmp_path: Path, *, batches: bool, jobs: list[Any]) -> tuple[Any, ...]:
    registry = Registry()
    batch = Batches(registry)
    served: list[Any] = [registry, batch] if batches else [registry]
    stack = GrpcStack()
    try:
        sock = tmp_path / "nsp.sock"
        await stack.serve(served, [Endpoint(path=str(sock))])
        role = Role(stack, await stack.channel(f"unix://{sock}"))
        results = await trio_asyncio.aio_as_trio(role._nsp_batch)(jobs)  # type: ignore[arg-type]
        return results, registry.calls, batch.sizes, role
    finally:
        await stack.close()


async def test_registrations_go_in_batches_in_order(aio_loop: object, tmp_path: Path) -> None:
    results, calls, sizes, role = await _run(tmp_path, batches=True, jobs=JOBS)
    assert sizes == [7]
    enabled, disabled = int(TargetStatus.ENABLED), int(TargetStatus.DISABLED)
    assert calls == [
        ("register", "198.18.0.1/24", enabled),
        ("register", "198.18.0.1/24", enabled),
        ("register", "198.18.0.2/24", disabled),
        ("register", "198.18.0.3/24", enabled),
        ("register", "198.18.0.4/24", enabled),
        ("unregister", "198.18.0.5/24", enabled),
    ]
    assert [ok for _reg, _what, ok in results] == [True] * 5 + [False]
    assert role._nsp_batched
    assert role.log.lines.count("target registered") == 3  # not the keepalive
    assert "target unregistered" in role.log.lines
    assert "registering a target failed" in role.log.lines
    # many go in several calls, NSP_BATCH updates at most each
    many = [(reg(n), "keepalive") for n in range(1200)]
    results, _calls, sizes, _role = await _run(tmp_path, batches=True, jobs=many)
    assert sorted(sizes) == [176, 512, 512] and all(ok for *_, ok in results)


async def test_an_nsp_without_batches_gets_a_call_each(aio_loop: object, tmp_path: Path) -> None:
    results, calls, sizes, role = await _run(tmp_path, batches=False, jobs=JOBS[:-1])
    assert sizes == [] and not role._nsp_batched
    assert role.log.lines[0] == "the NSP has no batch registration: one call per registration"
    assert len(calls) == 6  # in parallel; new and enabled: twice
    assert sum(1 for c in calls if c[1] == "198.18.0.1/24") == 2
    assert all(ok for *_, ok in results)
