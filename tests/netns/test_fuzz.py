"""Fuzzing every gRPC method of every role, against real daemons.

For each method of each role (NSP, IPAM, LB, proxy, target, and every role's health service),
hypothesis sends random well-typed requests (any field, any value of its type, with names and
addresses the system knows mixed in) and random bytes (noise, and valid encodings truncated,
flipped or extended). Every answer must be a status documented for that service; a refused call
must leave the daemon's state as it was; every daemon still serves afterwards. The number of
cases is printed (``-s``) and written to ``fuzz-cases.json`` in the test's directory; the
``MERIDIO_FUZZ_EXAMPLES`` variable sets the examples per method (20).

The NSP and the IPAM fuzzed are daemons of their own (no other client changes their state);
the LB, proxy and target belong to a conduit topology (one of each) with its own NSP and IPAM.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import typing
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import betterproto
import grpclib
import grpclib.client
import grpclib.const
import pytest
from grpclib.const import Cardinality, Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meridio.api.ambassador.v1 import Stream as TapStream
from meridio.api.ambassador.v1 import TapBase, TapStub
from meridio.api.grpc.health.v1 import HealthBase
from meridio.api.ipam.v1 import IpamBase
from meridio.api.meridio.admin.v1 import (
    IpamInspectBase,
    IpamInspectStub,
    LbInspectBase,
    LbInspectStub,
    ListAllocationsRequest,
    ShowRequest,
)
from meridio.api.meridio.connect.v1 import ConnectBase
from meridio.api.meridio.ipam.v1 import IpamBatchBase
from meridio.api.meridio.nsp.v1 import TargetRegistryBatchBase
from meridio.api.nsp.v1 import (
    ConfigurationManagerBase,
    Target,
    TargetRegistryBase,
    TargetRegistryStub,
    TargetStatus,
)
from meridio.runtime.grpc import LimitedCodec
from tests.netns.conduittopo import LB_PORT, PROXY_PORT, ConduitTopology
from tests.netns.daemons import IPAM_PREFIXES, SERVING, Daemon, RawCodec, health_status, run_async
from tests.netns.tlsclient import NsChannel

pytestmark = [pytest.mark.netns, pytest.mark.slow]

T = TypeVar("T")
# per method, for each of typed messages and bytes; MERIDIO_FUZZ_EXAMPLES=200 for a longer run
EXAMPLES = int(os.environ.get("MERIDIO_FUZZ_EXAMPLES", "20"))
ALWAYS = {Status.OK, Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED}
DOCUMENTED: dict[str, set[Status]] = {
    "grpc.health.v1.Health": ALWAYS | {Status.NOT_FOUND},
    "nsp.v1.TargetRegistry": ALWAYS | {Status.UNAVAILABLE},
    "nsp.v1.ConfigurationManager": ALWAYS,
    # an update refused is in the answer (status OK); the call as a whole as Register's
    "meridio.nsp.v1.TargetRegistryBatch": ALWAYS | {Status.UNAVAILABLE},
    "ipam.v1.Ipam": ALWAYS | {Status.UNAVAILABLE},
    "meridio.admin.v1.IpamInspect": ALWAYS,
    # a child refused is in the answer (status OK); the call as a whole as ipam.v1.Ipam's
    "meridio.ipam.v1.IpamBatch": ALWAYS | {Status.UNAVAILABLE},
    "meridio.admin.v1.LbInspect": ALWAYS | {Status.UNAVAILABLE},
    # PERMISSION_DENIED: a veth namespace that is not the caller's (docs/security.md)
    "meridio.connect.v1.Connect": ALWAYS
    | {
        Status.ALREADY_EXISTS,
        Status.FAILED_PRECONDITION,
        Status.UNAVAILABLE,
        Status.PERMISSION_DENIED,
    },
    "ambassador.v1.Tap": ALWAYS | {Status.FAILED_PRECONDITION, Status.UNAVAILABLE},
}
# Values the system knows, mixed into random text so that calls get past the first checks.
KNOWN_TEXT = [
    "trench-a",
    "conduit-a",
    "stream-a",
    "stream-b",
    "vip-1",
    "flow-a",
    "",
    "198.18.0.5/32",
    "198.18.7.1/24",
    "fd00:10::5/128",
    "203.0.113.10/32",
    "2001:db8::10",
    "198.51.100.11:7779",
    "identifier",
    "1",
    "65535",
    "veth",
    "vxlan",
    "node1",
    "Readiness",
    "Liveness",
]


# --- strategies ------------------------------------------------------------------------------

INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "sint32": (-(2**31), 2**31 - 1),
    "sfixed32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "sint64": (-(2**63), 2**63 - 1),
    "sfixed64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "fixed32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "fixed64": (0, 2**64 - 1),
}
TEXT = st.one_of(st.sampled_from(KNOWN_TEXT), st.text(max_size=24))


def _scalar(proto_type: str, cls: Any) -> st.SearchStrategy[Any]:
    if proto_type == "string":
        return TEXT
    if proto_type == "bytes":
        return st.binary(max_size=24)
    if proto_type == "bool":
        return st.booleans()
    if proto_type in ("float", "double"):
        return st.floats(allow_nan=False, width=32 if proto_type == "float" else 64)
    if proto_type == "enum":
        # members, and numbers no member has (strict decoding refuses those)
        return st.one_of(st.sampled_from(list(cls)), st.integers(-3, 40))
    if proto_type in INT_RANGES:
        low, high = INT_RANGES[proto_type]
        return st.one_of(st.integers(low, high), st.integers(-2, 300).filter(lambda v: low <= v))
    raise AssertionError(f"no strategy for {proto_type}")


def messages(cls: type[betterproto.Message], depth: int = 0) -> st.SearchStrategy[Any]:
    """Any message of type ``cls`` (nested messages to a depth of 3)."""
    meta = cls()._betterproto
    hints = typing.get_type_hints(cls)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, fm in meta.meta_by_field_name.items():
        repeated = typing.get_origin(hints[name]) in (list, typing.List)  # noqa: UP006
        if fm.proto_type == "map":
            key_type, value_type = fm.map_types
            value_cls = meta.cls_by_field.get(f"{name}.value")
            if value_type == "message":
                if depth >= 3:
                    continue
                value: st.SearchStrategy[Any] = messages(value_cls, depth + 1)
            else:
                value = _scalar(value_type, value_cls)
            fields[name] = st.dictionaries(_scalar(key_type, None), value, max_size=3)
            continue
        if fm.proto_type == "message":
            if depth >= 3:
                continue
            one = messages(meta.cls_by_field[name], depth + 1)
        else:
            one = _scalar(fm.proto_type, meta.cls_by_field.get(name))
        fields[name] = st.lists(one, max_size=3) if repeated else one
    groups = meta.oneof_field_by_group

    def build(values: dict[str, Any]) -> Any:
        for members in groups.values():  # at most one member of a oneof
            for extra in [f.name for f in members if f.name in values][1:]:
                del values[extra]
        return cls(**values)

    return st.fixed_dictionaries({}, optional=fields).map(build)


def _mutate(data: bytes, how: int, at: int, junk: bytes) -> bytes:
    if not data:
        return junk
    i = at % (len(data) + 1)
    if how == 0:  # truncated
        return data[:i]
    if how == 1:  # a byte flipped
        j = at % len(data)
        return data[:j] + bytes([data[j] ^ 0xFF]) + data[j + 1 :]
    if how == 2:  # junk inserted
        return data[:i] + junk + data[i:]
    return data + junk  # junk appended


def raw_bytes(cls: type[betterproto.Message]) -> st.SearchStrategy[bytes]:
    mutated = st.builds(
        _mutate,
        messages(cls).map(bytes),
        st.integers(0, 3),
        st.integers(0, 200),
        st.binary(min_size=1, max_size=8),
    )
    return st.one_of(st.binary(max_size=64), mutated)


# --- the methods -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    path: str
    cardinality: Cardinality
    request: type[betterproto.Message]
    reply: type[betterproto.Message]

    @property
    def service(self) -> str:
        return self.path.split("/")[1]


def methods(base: type[Any]) -> list[Method]:
    mapping = base.__mapping__(object.__new__(base))
    return [
        Method(path, h.cardinality, h.request_type, h.reply_type) for path, h in mapping.items()
    ]


class LoopThread:
    """One asyncio loop in a thread: channels live across hypothesis examples."""

    def __init__(self) -> None:
        self.loop = asyncio.SelectorEventLoop()  # not trio-asyncio's (the suite's policy)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def call(ch: grpclib.client.Channel, method: Method, request: Any, raw: bool) -> Status:
    """One call; its status (a server stream: after its first message)."""
    request_type = bytes if raw else method.request
    reply_type = bytes if raw else method.reply
    try:
        async with ch.request(
            method.path, method.cardinality, request_type, reply_type, timeout=5
        ) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_message()
            if method.cardinality.server_streaming:
                await stream.cancel()
            else:
                await stream.recv_trailing_metadata()
        return Status.OK
    except grpclib.GRPCError as exc:
        return exc.status


@dataclass
class Target_:
    """Where one role's methods are fuzzed, and how its state is read."""

    name: str
    channel: Callable[[Any], grpclib.client.Channel]  # codec -> channel
    methods: list[Method]
    state: Callable[[], Awaitable[Any]] | None


@dataclass
class Tally:
    cases: int = 0
    refused: int = 0
    by_status: dict[str, int] | None = None

    def add(self, status: Status) -> None:
        self.cases += 1
        self.refused += status != Status.OK
        self.by_status = self.by_status or {}
        self.by_status[status.name] = self.by_status.get(status.name, 0) + 1


def fuzz(loop: LoopThread, role: Target_, tally: Tally) -> None:
    typed = loop.run(_open(role.channel, LimitedCodec()))
    raw = loop.run(_open(role.channel, RawCodec()))
    options = settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    try:
        for method in role.methods:
            typed_case = _case(loop, role, method, typed, tally, is_raw=False)
            raw_case = _case(loop, role, method, raw, tally, is_raw=True)
            options(given(messages(method.request))(typed_case))()
            options(given(raw_bytes(method.request))(raw_case))()
    finally:
        loop.run(_close(typed, raw))


def _case(
    loop: LoopThread,
    role: Target_,
    method: Method,
    ch: grpclib.client.Channel,
    tally: Tally,
    *,
    is_raw: bool,
) -> Callable[[Any], None]:
    """One hypothesis case: call, check the status is documented and, when refused, that the
    state did not change."""
    allowed = DOCUMENTED[method.service]

    def check(request: Any) -> None:
        async def one() -> tuple[Status, Any, Any]:
            before = await role.state() if role.state else None
            status = await call(ch, method, request, is_raw)
            after = await role.state() if role.state and status != Status.OK else None
            return status, before, after

        status, before, after = loop.run(one())
        tally.add(status)
        assert status in allowed, (role.name, method.path, status, request)
        if status != Status.OK and role.state is not None:
            assert after == before, (role.name, method.path, status, request)

    return check


async def _open(make: Callable[[Any], grpclib.client.Channel], codec: Any) -> Any:
    return make(codec)


async def _close(*channels: grpclib.client.Channel) -> None:
    for ch in channels:
        ch.close()


def unix(path: Path) -> Callable[[Any], grpclib.client.Channel]:
    return lambda codec: grpclib.client.Channel(path=str(path), codec=codec)


def tcp(netns: str, hostport: tuple[str, int]) -> Callable[[Any], grpclib.client.Channel]:
    def make(codec: Any) -> grpclib.client.Channel:
        ch = NsChannel(netns, *hostport)
        ch._codec = codec
        return ch

    return make


# --- state readers ---------------------------------------------------------------------------


_STATE_CHANNELS: dict[Path, grpclib.client.Channel] = {}


def _state_channel(socket: Path) -> grpclib.client.Channel:
    """A channel for reading state, made once per socket (in the loop's thread)."""
    if socket not in _STATE_CHANNELS:
        _STATE_CHANNELS[socket] = grpclib.client.Channel(path=str(socket))
    return _STATE_CHANNELS[socket]


async def nsp_state(socket: Path) -> Any:
    stub = TargetRegistryStub(_state_channel(socket), timeout=5)
    async for reply in stub.watch(Target(status=TargetStatus.ANY)):
        return sorted(bytes(t) for t in reply.targets)
    return None


async def ipam_state(socket: Path) -> Any:
    reply = await IpamInspectStub(_state_channel(socket), timeout=5).list(ListAllocationsRequest())
    return sorted(bytes(a) for a in reply.allocations)


async def lb_state(socket: Path) -> Any:
    reply = await LbInspectStub(_state_channel(socket), timeout=5).show(ShowRequest())
    return [(s.name, s.digest, len(s.targets)) for s in reply.streams]


async def tap_state(socket: Path) -> Any:
    async for reply in TapStub(_state_channel(socket), timeout=5).watch(TapStream()):
        return sorted(
            (s.stream.conduit.trench.name, s.stream.conduit.name, s.stream.name)
            for s in reply.stream_status
        )
    return None


async def _close_state_channels() -> None:
    for ch in _STATE_CHANNELS.values():
        ch.close()
    _STATE_CHANNELS.clear()


def test_fuzz_every_method_of_every_role(netns_factory: Any, tmp_path: Path) -> None:
    loop = LoopThread()
    tally = Tally()
    ctl = netns_factory("fz")
    nsp = Daemon(ctl, "nsp", tmp_path / "nsp", "--entry-timeout=3600")
    ipam = Daemon(ctl, "ipam", tmp_path / "ipam", *IPAM_PREFIXES)
    try:
        for d in (nsp, ipam):
            d.spawn()
        for d in (nsp, ipam):
            run_async(d.ready(20))
        health = methods(HealthBase)
        roles = [
            Target_(
                "nsp",
                unix(nsp.socket),
                methods(TargetRegistryBase)
                + methods(TargetRegistryBatchBase)
                + methods(ConfigurationManagerBase),
                lambda: nsp_state(nsp.socket),
            ),
            Target_("nsp health", unix(nsp.health_socket), health, None),
            Target_(
                "ipam",
                unix(ipam.socket),
                methods(IpamBase) + methods(IpamBatchBase) + methods(IpamInspectBase),
                lambda: ipam_state(ipam.socket),
            ),
            Target_("ipam health", unix(ipam.health_socket), health, None),
        ]
        for role in roles:
            fuzz(loop, role, tally)
        (tmp_path / "topo").mkdir()
        with ConduitTopology(tmp_path / "topo", lbs=1, nodes=1, targets=1) as topo:
            lb = next(iter(topo.lbs.values()))
            node = next(iter(topo.nodes.values()))
            target = next(iter(topo.targets.values()))
            assert topo.nsp is not None and topo.ipam is not None
            lb_socket = lb.daemon.run_dir / "lb.sock"
            tap_socket = target.daemon.run_dir / "ambassador.sock"
            topo_nsp, topo_ipam = topo.nsp.socket, topo.ipam.socket

            async def proxy_state() -> Any:
                return await nsp_state(topo_nsp), await ipam_state(topo_ipam)

            roles = [
                Target_("lb", unix(lb_socket), methods(LbInspectBase), lambda: lb_state(lb_socket)),
                Target_(
                    "lb connect",
                    tcp(lb.ns.name, (lb.address, LB_PORT)),
                    methods(ConnectBase),
                    lambda: lb_state(lb_socket),
                ),
                Target_("lb health", unix(lb.daemon.health_socket), health, None),
                Target_(
                    "proxy connect",
                    tcp(node.ns.name, (node.address, PROXY_PORT)),
                    methods(ConnectBase),
                    proxy_state,
                ),
                Target_("proxy health", unix(node.daemon.health_socket), health, None),
                Target_("target health", unix(target.daemon.health_socket), health, None),
                Target_(
                    "target", unix(tap_socket), methods(TapBase), lambda: tap_state(tap_socket)
                ),
            ]
            for role in roles:
                fuzz(loop, role, tally)
            for d in (lb.daemon, node.daemon, target.daemon, topo.nsp, topo.ipam):
                assert d.alive(), d.log_text()
                assert run_async(health_status(d.health_socket, "Liveness")) == SERVING
        for d in (nsp, ipam):
            assert d.alive(), d.log_text()
            assert run_async(health_status(d.health_socket, "Readiness")) == SERVING
        report = {"cases": tally.cases, "refused": tally.refused, "by_status": tally.by_status}
        (tmp_path / "fuzz-cases.json").write_text(json.dumps(report, indent=2))
        print(f"\nfuzz: {json.dumps(report)}")
        assert tally.cases >= 2 * EXAMPLES * 30 * 0.9  # hypothesis may stop early on small spaces
    finally:
        loop.run(_close_state_channels())
        loop.close()
        for d in (nsp, ipam):
            if d.alive():
                run_async(d.stop())
