"""Every method of every service answers corrupt requests with INVALID_ARGUMENT.

The servers run in this process on the runtime's gRPC stack (its strict codec). The NSP and
IPAM (with their batch services) and health services are the real ones, with their state in
``tmp_path``; the services whose implementations need a kernel (LB inspection, connect, TAPA)
are served by their generated bases, which decode the request before anything else, as every
implementation does. A client sends raw bytes: truncated messages, lengths past the end, wrong
wire types, invalid UTF-8. Each must come back INVALID_ARGUMENT with a message naming the
problem (never UNKNOWN, never decoded into something else: the state of the NSP and the IPAM
must not change).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import betterproto
import grpclib
import trio
import trio_asyncio
from betterproto.grpc.grpclib_server import ServiceBase
from grpclib.client import Channel
from grpclib.const import Cardinality, Status

import meridio.api
from meridio.core.nspconfig import parse_config
from meridio.roles.ipam import IpamBatchService, IpamInspectService, IpamService
from meridio.roles.nsp import (
    ConfigurationManagerService,
    NspState,
    TargetRegistryBatchService,
    TargetRegistryService,
)
from meridio.runtime.commit import GroupCommit
from meridio.runtime.grpc import Endpoint, GrpcStack
from meridio.runtime.health import Health, HealthService
from meridio.store.ipam import IpamBatch, PersistentIpam
from meridio.store.registry import PersistentRegistry
from tests.netns.daemons import RawCodec

CONFIG = {
    "trench": {"name": "t"},
    "conduits": {"items": [{"name": "c", "trench": "t"}]},
    "streams": {"items": [{"name": "s", "conduit": "c"}]},
}


def _service_bases() -> list[type[ServiceBase]]:
    found = []
    for info in pkgutil.walk_packages(meridio.api.__path__, "meridio.api."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, ServiceBase)
                and obj is not ServiceBase
                and obj.__module__ == module.__name__
            ):
                found.append(obj)
    return found


def _sample(cls: type[betterproto.Message], depth: int = 0) -> betterproto.Message:
    """A message with every string "é" (two bytes in UTF-8) and every sub-message filled."""
    meta = cls._betterproto
    kwargs: dict[str, Any] = {}
    for name, info in meta.meta_by_field_name.items():
        repeated = meta.default_gen[name] is list
        if info.proto_type == "string":
            kwargs[name] = ["é"] if repeated else "é"
        elif info.proto_type == "message" and depth < 4:
            sub = _sample(meta.cls_by_field[name], depth + 1)
            kwargs[name] = [sub] if repeated else sub
        elif info.proto_type == "map" and info.map_types == ("string", "string"):
            kwargs[name] = {"é": "é"}
    return cls(**kwargs)


def _corruptions(cls: type[betterproto.Message]) -> dict[str, bytes]:
    meta = cls._betterproto
    sample = bytes(_sample(cls))
    numbers = sorted(meta.field_name_by_number)
    first = numbers[0] if numbers else 1
    kind = meta.meta_by_field_name[meta.field_name_by_number[first]].proto_type if numbers else ""
    # A wire type the first field cannot have (a string gets a varint, a number 32 bits).
    wrong = (
        bytes([(first << 3) | 0, 5])
        if kind in ("string", "bytes", "message", "map")
        else bytes([(first << 3) | 5]) + b"\0\0\0\0"
    )
    cases = {
        "length past the end": bytes([(first << 3) | 2, 100]) + b"abc",
        "truncated varint": b"\xff\xff\xff",
        "start group": bytes([(first << 3) | 3]),
    }
    if numbers:  # (any wire type is right for an unknown field)
        cases["wrong wire type"] = wrong
    if sample:
        cases["truncated by one byte"] = sample[:-1]
    if b"\xc3\xa9" in sample:
        cases["invalid UTF-8"] = sample.replace(b"\xc3\xa9", b"\xff\xfe")
    return cases


async def _raw(ch: Channel, path: str, cardinality: Cardinality, data: bytes) -> Any:
    """Send ``data`` as the request; the first reply (bytes) or the GRPCError."""
    try:
        async with ch.request(path, cardinality, bytes, bytes, timeout=5) as stream:
            await stream.send_message(data, end=True)
            reply = await stream.recv_message()
            if cardinality is Cardinality.UNARY_STREAM:
                await stream.cancel()
            else:
                await stream.recv_trailing_metadata()
            return reply
    except grpclib.GRPCError as exc:
        return exc


async def test_every_method_refuses_corrupt_requests(aio_loop: object, tmp_path: Path) -> None:
    stack = GrpcStack()
    registry = PersistentRegistry(tmp_path / "nsp.db", 0.0)
    ipam = PersistentIpam(tmp_path / "ipam.db")
    nsp = NspState(registry, parse_config(CONFIG))
    ipam_commits: GroupCommit[IpamBatch] = GroupCommit(ipam, name="ipam")
    handlers: list[Any] = [
        HealthService(Health()),
        TargetRegistryService(nsp),
        TargetRegistryBatchService(nsp),
        ConfigurationManagerService(nsp),
        IpamService(ipam, ipam_commits, ""),
        IpamInspectService(ipam, ipam_commits),
    ]
    # before Ipam: its Release removes what the valid sample of the batch allocated
    handlers.insert(4, IpamBatchService(handlers[4]))
    bases = _service_bases()
    assert len(bases) >= 7  # health, ipam, nsp (2), admin (2), connect (+ TAPA when present)
    covered = [b for b in bases if any(isinstance(h, b) for h in handlers)]
    handlers += [base() for base in bases if base not in covered]
    sock = tmp_path / "all.sock"
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nsp.commits.run)
            nursery.start_soon(ipam_commits.run)
            await stack.serve(handlers, [Endpoint(path=str(sock))])
            results = await trio_asyncio.aio_as_trio(_drive)(sock, handlers)
            nursery.cancel_scope.cancel()
    finally:
        await stack.close()
    methods = {path for path, _, _ in results}
    assert len(methods) >= 20, sorted(methods)
    bad = [
        (path, what, result)
        for path, what, result in results
        if not (
            isinstance(result, grpclib.GRPCError)
            and result.status == Status.INVALID_ARGUMENT
            and "malformed" in (result.message or "")
        )
    ]
    assert not bad, bad
    # Nothing was stored from any of it.
    assert len(registry) == 0 and registry.registry.keys() == []
    assert ipam.list_children() == []
    registry.close()
    ipam.close()


async def _drive(sock: Path, handlers: list[Any]) -> list[tuple[str, str, Any]]:
    ch = Channel(path=str(sock), codec=RawCodec())
    results: list[tuple[str, str, Any]] = []
    try:
        for handler in handlers:
            for path, method in handler.__mapping__().items():
                request_type = method.request_type
                for what, data in _corruptions(request_type).items():
                    results.append((path, what, await _raw(ch, path, method.cardinality, data)))
                # The sample itself is well formed: it never comes back "malformed".
                valid = await _raw(ch, path, method.cardinality, bytes(_sample(request_type)))
                assert not (
                    isinstance(valid, grpclib.GRPCError)
                    and ("malformed" in (valid.message or "") or valid.status == Status.UNKNOWN)
                ), (path, valid)
    finally:
        ch.close()
    return results
