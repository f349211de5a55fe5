"""Mutual TLS and the authorization table on a real daemon (the NSP, on TCP in a namespace).

Clients without a certificate, with a self-signed, an expired or another CA's certificate are
refused at the handshake; a valid certificate of the wrong role gets PERMISSION_DENIED; the
right role is served; every refusal is counted and logged once. Certificates and the trust
bundle are replaced under the running daemon: established streams go on, new handshakes use
the new files, and a CA removed from the bundle is no longer accepted.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import subprocess
from pathlib import Path
from typing import Any

import grpclib
import pytest
import yaml
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError

from meridio import pki
from meridio.api.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponseServingStatus,
    HealthStub,
)
from meridio.api.ipam.v1 import Child, IpamStub
from meridio.api.nsp.v1 import (
    Conduit,
    ConfigurationManagerStub,
    Stream,
    Target,
    TargetRegistryStub,
    TargetStatus,
    TargetType,
    Trench,
    Vip,
)
from tests.netns.daemons import MERIDIOD, Daemon, aio_test, grpc_error, watching
from tests.netns.tlsclient import (
    Authority,
    NsChannel,
    NsTlsChannel,
    client_context,
    fetch_metrics,
    load_tls,
    metric,
    netns_socket,
)
from tests.waiting import wait_until_async

pytestmark = pytest.mark.netns

HOST, PORT, METRICS_PORT, HEALTH_PORT = "127.0.0.1", 7778, 9102, 7780
CONFIG: dict[str, Any] = {
    "trench": {"name": "trench-a"},
    "conduits": {"items": [{"name": "conduit-a", "trench": "trench-a"}]},
    "streams": {"items": [{"name": "stream-a", "conduit": "conduit-a"}]},
    "vips": {"items": [{"name": "vip-1", "address": "203.0.113.1", "trench": "trench-a"}]},
}
HANDSHAKE_FAILURES = (StreamTerminatedError, OSError, asyncio.TimeoutError)


def target(ip: str, type_: TargetType = TargetType.DEFAULT) -> Target:
    conduit = Conduit(name="conduit-a", trench=Trench(name="trench-a"))
    return Target(
        ips=[ip],
        context={"identifier": "1"},
        status=TargetStatus.ENABLED,
        type=type_,
        stream=Stream(name="stream-a" if type_ == TargetType.DEFAULT else "", conduit=conduit),
    )


ANY = Target(status=TargetStatus.ANY, type=TargetType.DEFAULT)
ANY_FRONTEND = Target(status=TargetStatus.ANY, type=TargetType.FRONTEND)


def nsp_daemon(netns: Any, tmp_path: Path, server: Path, *args: str) -> Daemon:
    config = tmp_path / "meridio-configuration.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    return Daemon(
        netns,
        "nsp",
        tmp_path / "nsp",
        f"--configuration-file={config}",
        f"--listen={HOST}:{PORT}",
        f"--tls-dir={server}",
        "--tls-reload-interval=0.1",
        f"--metrics-listen={HOST}:{METRICS_PORT}",
        f"--health-listen={HOST}:{HEALTH_PORT}",
        *args,
    )


def tls_channel(netns: Any, creds: Path, trust_domain: str = "") -> NsTlsChannel:
    return NsTlsChannel(netns.name, HOST, PORT, load_tls(creds, trust_domain=trust_domain))


async def probe(ch: grpclib.client.Channel) -> None:
    """One call any role may make: the first message of a configuration watch."""
    async for _ in ConfigurationManagerStub(ch, timeout=3).watch_trench(Trench(name="trench-a")):
        return


async def refused_at_handshake(ch: grpclib.client.Channel) -> None:
    with pytest.raises(HANDSHAKE_FAILURES):
        await probe(ch)
    ch.close()


async def targets(ch: grpclib.client.Channel, flt: Target = ANY) -> list[str]:
    stub = TargetRegistryStub(ch, timeout=5)
    async with watching(lambda: stub.watch(flt)) as w:
        return sorted(t.ips[0] for t in (await w.next()).targets)


def refusal_logs(daemon: Daemon, kind: str) -> list[dict[str, Any]]:
    return [r for r in daemon.log_records() if r.get("event") == f"grpc {kind} refused"]


@aio_test
async def test_refused_at_handshake_denied_by_role_and_served(netns: Any, tmp_path: Path) -> None:
    ca = Authority.make(tmp_path / "pki")
    domain = ca.ca.trust_domain
    server = ca.role("nsp", "0")
    daemon = await nsp_daemon(netns, tmp_path, server).start()
    bundle = server / "ca.crt"
    try:
        # -- refused at the handshake: no certificate, self-signed, expired, another CA, and
        #    plain text
        self_signed = tmp_path / "self"
        cert, key = pki.self_signed(f"spiffe://{domain}/meridio/proxy/self")
        pki.write_credentials(self_signed, cert, key, ca.ca.pem)
        expired = ca.role(
            "proxy",
            "expired",
            days=1,
            not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3),
        )
        foreign = Authority.make(tmp_path / "other").role("proxy", "foreign", bundle=ca.ca.pem)
        for creds in (None, self_signed, expired, foreign):
            context = client_context(
                creds and creds / "tls.crt", creds and creds / "tls.key", bundle
            )
            await refused_at_handshake(NsChannel(netns.name, HOST, PORT, context))
        await refused_at_handshake(NsChannel(netns.name, HOST, PORT))  # plain text

        # -- valid certificates of roles the table refuses
        admin = tls_channel(netns, ca.role("admin", "ops"))
        noone = tls_channel(netns, ca.issue("noone", f"spiffe://{domain}/workload/x"))
        other_domain = tls_channel(
            netns, ca.issue("elsewhere", "spiffe://elsewhere.test/meridio/proxy/x"), domain
        )
        lb = tls_channel(netns, ca.role("lb", "0"))
        tgt = tls_channel(netns, ca.role("target", "0"))
        proxy = tls_channel(netns, ca.role("proxy", "0"))
        ipam = tls_channel(netns, ca.role("ipam", "0"))
        channels = [admin, noone, other_domain, lb, tgt, proxy, ipam]
        denied = [
            lambda: TargetRegistryStub(admin, timeout=5).register(target("198.18.0.9/32")),
            lambda: TargetRegistryStub(admin, timeout=5).register(target("198.18.0.9/32")),
            lambda: TargetRegistryStub(noone, timeout=5).register(target("198.18.0.9/32")),
            lambda: probe(other_domain),
            # roles that may register, sending a type their role may not
            lambda: TargetRegistryStub(lb, timeout=5).register(target("198.18.0.8/32")),
            lambda: TargetRegistryStub(tgt, timeout=5).register(
                target("198.18.0.7/32", TargetType.FRONTEND)
            ),
        ]
        for call in denied:
            exc = await grpc_error(call())
            assert exc.status == Status.PERMISSION_DENIED, exc
        # -- served
        registry = TargetRegistryStub(proxy, timeout=5)
        for _ in range(2):  # the second registration enables it
            await registry.register(target("198.18.0.1/32"))
        await TargetRegistryStub(lb, timeout=5).register(
            target("198.51.100.1/32", TargetType.FRONTEND)
        )
        assert await targets(admin) == ["198.18.0.1/32"]  # nothing a refused call asked
        assert await targets(admin, ANY_FRONTEND) == ["198.51.100.1/32"]
        async with watching(
            lambda: ConfigurationManagerStub(ipam).watch_vip(Vip(trench=Trench(name="trench-a")))
        ) as w:
            assert [v.address for v in (await w.next()).vips] == ["203.0.113.1/32"]
        await probe(tgt)
        # health-listen is mutual TLS too: any role, no plain text
        health = NsTlsChannel(netns.name, HOST, HEALTH_PORT, load_tls(ca.role("lb", "h")))
        reply = await HealthStub(health).check(HealthCheckRequest(service="Readiness"), timeout=5)
        assert reply.status == HealthCheckResponseServingStatus.SERVING
        health.close()
        with pytest.raises(HANDSHAKE_FAILURES):
            plain = NsChannel(netns.name, HOST, HEALTH_PORT)
            await HealthStub(plain).check(HealthCheckRequest(), timeout=3)
        plain.close()
        # -- the client refuses a server whose role does not serve the method (an NSP asked
        #    for an IPAM allocation), before the request is sent
        exc = await grpc_error(IpamStub(proxy, timeout=5).allocate(Child(name="x")))
        assert exc.status == Status.PERMISSION_DENIED and "does not serve" in exc.message
        for ch in channels:
            ch.close()

        # -- every refusal counted, logged once per peer and what it asked
        text = await fetch_metrics(netns.name, HOST, METRICS_PORT)
        assert metric(text, "meridio_grpc_refused_total", reason="handshake") == 6
        assert metric(text, "meridio_grpc_refused_total", reason="permission") == 4
        assert metric(text, "meridio_grpc_refused_total", reason="message") == 2
        handshakes = refusal_logs(daemon, "handshake")
        assert len(handshakes) == 5  # the two plain-text ones: the same peer and reason
        reasons = " | ".join(r["reason"] for r in handshakes)
        for expected in ("CERTIFICATE", "self-signed", "expired", "issuer", "VERSION"):
            assert expected in reasons, reasons
        permission = refusal_logs(daemon, "permission")
        assert len(permission) == 3  # the admin's second Register is counted, not logged
        assert {r["peer"] for r in permission} == {
            f"spiffe://{domain}/meridio/admin/ops",
            f"spiffe://{domain}/workload/x",
            "spiffe://elsewhere.test/meridio/proxy/x",
        }
        messages = refusal_logs(daemon, "message")
        assert {r["peer"] for r in messages} == {
            f"spiffe://{domain}/meridio/lb/0",
            f"spiffe://{domain}/meridio/target/0",
        }
        assert daemon.alive()
    finally:
        await daemon.stop()


@aio_test
async def test_certificates_rotated_under_a_running_daemon(netns: Any, tmp_path: Path) -> None:
    old, new = Authority.make(tmp_path / "old"), Authority.make(tmp_path / "new")
    server = tmp_path / "server"
    old.role("nsp", "0", out=server)
    daemon = await nsp_daemon(netns, tmp_path, server).start()
    try:
        # clients with the old CA's certificates, already trusting both CAs (a rotation
        # distributes the new CA first); one has a stream open across the rotation
        both = old.ca.pem + new.ca.pem
        watcher_ch = tls_channel(netns, old.role("proxy", "watcher", bundle=both))
        registrar = tls_channel(netns, old.role("proxy", "registrar", bundle=both))
        registry = TargetRegistryStub(registrar, timeout=5)
        stub = TargetRegistryStub(watcher_ch)
        async with watching(lambda: stub.watch(ANY)) as w:
            assert (await w.next()).targets == []

            # 1. both CAs in the server's bundle, its certificate from the new CA
            new.role("nsp", "0", out=server, bundle=both)
            await daemon.wait_log(lambda r: r.get("event") == "tls credentials reloaded")
            fresh = tls_channel(netns, new.role("proxy", "fresh", bundle=both))
            await probe(fresh)
            assert served_serial(fresh) == serial(server / "tls.crt")  # the new certificate
            # the old CA's clients still handshake; the registrar's connection is new
            for _ in range(2):
                await registry.register(target("198.18.0.1/32"))
            # the stream opened before the rotation goes on
            await w.until(
                lambda m: (
                    [(t.ips[0], t.status) for t in m.targets]
                    == [("198.18.0.1/32", TargetStatus.ENABLED)]
                )
            )

            # 2. the old CA removed from the bundle: its certificates are refused at new
            #    handshakes, the new CA's accepted, established connections go on
            new.role("nsp", "0", out=server)
            await wait_reloads(daemon, 2)
            await refused_at_handshake(tls_channel(netns, old.role("proxy", "late", bundle=both)))
            fresh.close()
            fresh = tls_channel(netns, new.role("proxy", "fresh2"))
            await probe(fresh)
            await registry.register(target("198.18.0.2/32"))  # old connection, still open
            await w.until(lambda m: len(m.targets) == 2)

            # 3. a client's own certificate rotated: its next connection uses the new one
            client_dir = tmp_path / "client"
            old.role("proxy", "rotating", out=client_dir, bundle=both)
            client_tls = load_tls(client_dir)
            rotating = NsTlsChannel(netns.name, HOST, PORT, client_tls)
            await refused_at_handshake(rotating)
            new.role("proxy", "rotating", out=client_dir)
            assert client_tls.poll()
            await probe(rotating)
            rotating.close()
            fresh.close()
        watcher_ch.close()
        registrar.close()
        # half-written files never replace working credentials
        (server / "tls.key").write_text("-----BEGIN PRIVATE KEY-----\ntruncat")
        await daemon.wait_log(lambda r: "do not load" in r.get("event", ""))
        again = tls_channel(netns, new.role("proxy", "again"))
        await probe(again)
        again.close()
        assert daemon.alive()
    finally:
        await daemon.stop()


def serial(path: Path) -> str:
    decoded: dict[str, Any] = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
    return str(decoded["serialNumber"])


def served_serial(ch: Any) -> str:
    """The serial number of the certificate the server presented on ``ch``'s connection."""
    return str(ch._protocol.connection._transport.get_extra_info("peercert")["serialNumber"])


async def wait_reloads(daemon: Daemon, count: int) -> None:
    def reloads() -> int:
        return sum(1 for r in daemon.log_records() if r.get("event") == "tls credentials reloaded")

    await wait_until_async(lambda: reloads() >= count, what=f"{count} reloads")


def meridiod(netns: Any, *args: str) -> subprocess.Popen[str]:
    """``meridiod ARGS`` in ``netns`` without MERIDIOD_INSECURE (started, not waited for)."""
    return subprocess.Popen(
        ["ip", "netns", "exec", netns.name, MERIDIOD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def test_plain_text_only_when_asked(netns: Any, tmp_path: Path) -> None:
    """TCP without certificates stops the daemon before it starts (exit 2, one line naming
    the setting); so do unusable TLS files."""
    base = ["--role=nsp", f"--run-dir={tmp_path / 'run'}", f"--database={tmp_path / 'n.db'}"]
    ca = Authority.make(tmp_path / "pki")
    mismatched = ca.role("nsp", "c")
    (mismatched / "tls.key").write_bytes((ca.role("nsp", "d") / "tls.key").read_bytes())
    tcp = "--listen=127.0.0.1:7778"
    cases = {
        "setting 'listen' (127.0.0.1:7778) is TCP and no certificate": [*base, tcp],
        "setting 'ipam' (198.18.0.1:7777) is TCP": [
            "--role=proxy",
            "--trench=t",
            "--conduit=c",
            "--connect-listen=unix:///x",
            "--nsp=unix:///y",
            "--ipam=198.18.0.1:7777",
        ],
        "is not a directory": [*base, tcp, f"--tls-dir={tmp_path / 'missing'}"],
        "holds neither tls.crt/tls.key/ca.crt": [*base, tcp, f"--tls-dir={tmp_path}"],
        "is for role proxy, not nsp": [*base, tcp, f"--tls-dir={ca.role('proxy', 'x')}"],
        "names no meridio role": [
            *base,
            tcp,
            f"--tls-dir={ca.issue('x', 'spiffe://meridio.local/x')}",
        ],
        "'tls-key' is required": [*base, tcp, f"--tls-cert={ca.role('nsp', 'a') / 'tls.crt'}"],
        "must be PATH=ROLE": [
            *base,
            tcp,
            f"--tls-dir={ca.role('nsp', 'b')}",
            "--tls-roles=/x=boss",
        ],
        "cannot use certificate": [*base, tcp, f"--tls-dir={mismatched}"],
    }
    procs = {message: meridiod(netns, *args) for message, args in cases.items()}
    for message, proc in procs.items():
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 2 and message in stderr, (message, stderr)
        assert len(stderr.strip().splitlines()) == 1, stderr


@aio_test
async def test_meridioctl_over_tls(netns: Any, tmp_path: Path) -> None:
    ca = Authority.make(tmp_path / "pki")
    daemon = await nsp_daemon(netns, tmp_path, ca.role("nsp", "0")).start()
    meridioctl = str(Path(MERIDIOD).parent / "meridioctl")
    try:
        admin = ca.role("admin", "me")
        out = netns.run(
            meridioctl, f"--tls-dir={admin}", "nsp", "targets", f"--nsp={HOST}:{PORT}", "-o", "json"
        )
        assert json.loads(out.stdout) == []
        out = netns.run(meridioctl, "nsp", "targets", f"--nsp={HOST}:{PORT}", check=False)
        assert out.returncode == 2 and "is TCP: give --tls-dir" in out.stderr
        # plain text to a TLS port: refused
        out = netns.run(
            meridioctl, "--insecure", "nsp", "targets", f"--nsp={HOST}:{PORT}", check=False
        )
        assert out.returncode == 1 and "cannot reach" in out.stderr
    finally:
        await daemon.stop()


@aio_test
async def test_noise_at_the_tls_port(netns: Any, tmp_path: Path) -> None:
    """Random bytes where a TLS handshake should be: each connection refused, counted, and the
    daemon serves on."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ca = Authority.make(tmp_path / "pki")
    daemon = await nsp_daemon(netns, tmp_path, ca.role("nsp", "0"), "--health-plaintext").start()
    cases = 0
    try:
        loop = asyncio.get_running_loop()

        async def send(data: bytes) -> None:
            sock = netns_socket(netns.name, HOST, PORT)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(data)
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
            writer.close()

        hello = bytes.fromhex("16030100")  # a TLS record header, then noise
        noise = st.one_of(
            st.binary(min_size=1, max_size=300), st.binary(max_size=300).map(hello.__add__)
        )

        @settings(
            max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(noise)
        def case(data: bytes) -> None:
            nonlocal cases
            cases += 1
            asyncio.run_coroutine_threadsafe(send(data), loop).result(10)

        await loop.run_in_executor(None, case)

        async def all_counted() -> bool:
            text = await fetch_metrics(netns.name, HOST, METRICS_PORT)
            return metric(text, "meridio_grpc_refused_total", reason="handshake") >= cases

        await wait_until_async(all_counted, what="every noisy connection counted")
        await probe(tls_channel(netns, ca.role("proxy", "0")))
        # with health-plaintext, the kubelet's probes (plain text) get health, and only that
        plain = NsChannel(netns.name, HOST, HEALTH_PORT)
        reply = await HealthStub(plain).check(HealthCheckRequest(service="Liveness"), timeout=5)
        assert reply.status == HealthCheckResponseServingStatus.SERVING
        plain.close()
        text = await fetch_metrics(netns.name, HOST, METRICS_PORT)
        assert metric(text, "meridio_grpc_refused_total", reason="handshake") == cases
        assert daemon.alive()
    finally:
        await daemon.stop()
