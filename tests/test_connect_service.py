"""The connect service reads a request as bytes and parses the same bytes once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpclib
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Cardinality, Status

from meridio.api.meridio.connect.v1 import ConnectRequest, ConnectStub, Mechanism, Veth
from meridio.connect import endpoint as ep
from meridio.core import conduit
from meridio.runtime.grpc import Encoded, Endpoint, GrpcStack
from tests.netns.daemons import RawCodec


class FakeEndpoint:
    """Answers every request as a refresh; counts the proofs (one a call, always)."""

    def __init__(self) -> None:
        self.proofs: list[str] = []

    async def prove(self, spec: conduit.RequestSpec, peer: Any) -> dict[str, int]:
        self.proofs.append(spec.connection_id)
        return {}

    def refresh(self, spec: conduit.RequestSpec) -> Encoded:
        return Encoded(b"")


REQUEST = ConnectRequest(
    network_service="proxy.c.t",
    connection_id="t1@c",
    client_name="t1",
    extra_context={"identifier/s": "1"},
    mechanisms=[Mechanism(type="veth", interface_name="conduit0", veth=Veth(netns_path="/x"))],
)


async def _calls(sock: Path) -> list[Any]:
    out: list[Any] = []
    ch = Channel(path=str(sock))
    raw = Channel(path=str(sock), codec=RawCodec())
    try:
        stub = ConnectStub(ch, timeout=5)
        for _ in range(3):
            out.append(await stub.request(REQUEST))
        for data in (b"\xff\xff\xff", bytes(ConnectRequest(connection_id="x"))):
            try:
                async with raw.request(
                    ep.REQUEST_PATH, Cardinality.UNARY_UNARY, bytes, bytes, timeout=5
                ) as stream:
                    await stream.send_message(data, end=True)
                    out.append(await stream.recv_message())
            except grpclib.GRPCError as exc:
                out.append(exc)
    finally:
        ch.close()
        raw.close()
    return out


async def test_the_same_bytes_are_parsed_once_and_proved_every_time(
    aio_loop: object, tmp_path: Path, monkeypatch: Any
) -> None:
    parsed: list[str] = []
    parse = conduit.parse_request

    def counting(request: ConnectRequest) -> conduit.RequestSpec:
        parsed.append(request.connection_id)
        return parse(request)

    monkeypatch.setattr(conduit, "parse_request", counting)
    fake = FakeEndpoint()
    stack = GrpcStack()
    try:
        sock = tmp_path / "connect.sock"
        await stack.serve([ep.ConnectService(fake)], [Endpoint(path=str(sock))])  # type: ignore[arg-type]
        out = await trio_asyncio.aio_as_trio(_calls)(sock)
    finally:
        await stack.close()
    assert parsed == ["t1@c", "x"]  # the request once for three calls; the invalid one too
    assert fake.proofs == ["t1@c"] * 3
    malformed, invalid = out[3], out[4]
    assert isinstance(malformed, grpclib.GRPCError)
    assert malformed.status == Status.INVALID_ARGUMENT
    assert "malformed ConnectRequest" in (malformed.message or "")
    assert isinstance(invalid, grpclib.GRPCError)
    assert invalid.status == Status.INVALID_ARGUMENT
