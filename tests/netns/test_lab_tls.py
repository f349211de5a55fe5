"""End to end: certificates and the CA rotated under a running lab with traffic
(``meridioctl lab rotate``).

A small lab of its own (IPv4, static routing, 1 LB, 2 proxies, 2 targets) carries long-lived
TCP and UDP connections while the NSP's (a server) and a proxy's (a client of the NSP and the
IPAM, a server of its targets) certificates are re-issued, and then the CA itself is rotated
(the new CA into every bundle, every instance a certificate of it, the old CA out). No
connection is lost and no connect fails; a fresh handshake with the NSP or the proxy is
presented the certificate just issued; a client certificate of the old CA is served before the
rotation and refused once the old CA has left the bundles, while one of the new CA is served;
the lab is whole afterwards.

Namespaces are ``mlab-t<pid>s-...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from grpclib.exceptions import StreamTerminatedError

from meridio import pki
from meridio.api.nsp.v1 import ConfigurationManagerStub, Trench
from meridio.lab import plan, system
from meridio.lab.lab import MERIDIOD_ROLES, Lab
from meridio.lab.plan import LabSpec
from tests.netns.test_lab import answered, connected, diagnose, reap_stale_labs, summary
from tests.netns.tlsclient import NsTlsChannel, client_context, load_tls, netns_socket

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = f"mlab-t{os.getpid()}s-"
SPEC = LabSpec(
    prefix=PREFIX, lbs=1, proxies=2, targets=2, ip_family="ipv4", external="veth", routing="static"
)
TARGETS = {"target-1", "target-2"}
# long-lived clients: 20 connections at 100 packets/s, stopped (SIGTERM) once the rotations
# are done; a broken connection shows within the client's 3 s reply timeout
LONG = ("--duration", "120", "--connections", "20", "--rate", "100")
HANDSHAKE_FAILURES = (StreamTerminatedError, OSError, TimeoutError, ssl.SSLError)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reap_stale_labs()
    the_lab = Lab(tmp_path_factory.mktemp("lab"), PREFIX)
    try:
        the_lab.up(SPEC)
        yield the_lab
    finally:
        # the logs outlive the lab in pytest's base temp (the last three runs are kept)
        the_lab.down(keep_logs=tmp_path_factory.getbasetemp() / "lab-logs" / PREFIX)


def split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


NSP = ("nsp", *split(plan.nsp_address()))
PROXY_1 = ("node-1", *split(plan.proxy_address(1)))


def fingerprint_file(path: Path) -> str:
    return pki.fingerprint(path.read_bytes())


def served(lab: Lab, where: tuple[str, str, int], client: Path) -> str:
    """The SHA-256 fingerprint of the certificate a fresh TLS handshake at ``where`` (host,
    address, port) is presented, as a client with the credentials in ``client``."""
    host, address, port = where
    ctx = client_context(client / "tls.crt", client / "tls.key", client / "ca.crt")
    sock = netns_socket(lab.netns(host), address, port)
    sock.setblocking(True)
    sock.settimeout(5)
    with ctx.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


async def _served_by_nsp(lab: Lab, client: Path) -> bool:
    _, address, port = NSP
    # made in the running loop (grpclib takes the loop it is made in)
    ch = NsTlsChannel(lab.netns("nsp"), address, port, load_tls(client))
    try:
        stub = ConfigurationManagerStub(ch, timeout=5)
        # one call any role may make of the NSP: the first message of a configuration watch
        async for _ in stub.watch_trench(Trench(name=plan.TRENCH)):
            return True
        return True
    except HANDSHAKE_FAILURES:
        return False
    finally:
        ch.close()


def nsp_serves(lab: Lab, client: Path) -> bool:
    """Whether the NSP serves a new connection with the credentials in ``client``; False when
    the handshake is refused."""
    return system.run_async(_served_by_nsp(lab, client))


def client_of(ca: pki.Ca, out: Path, bundle: bytes) -> Path:
    """Credentials of a proxy-role client (``rotation-probe``) issued by ``ca``."""
    sid = f"spiffe://{ca.trust_domain}/meridio/proxy/rotation-probe"
    cert, key = pki.make_svid(ca, sid, days=1)
    pki.write_credentials(out, pki.cert_pem(cert), pki.key_pem(key), bundle)
    return out


def refusals(lab: Lab) -> tuple[list[dict[str, Any]], list[str]]:
    """The refusals the lab's daemons logged: of this test's own clients (which connect from
    inside the NSP's and proxy-1's namespaces, from their addresses), and of anyone else."""
    ours = {"nsp": f"{NSP[1]}:", "proxy-1": f"{PROXY_1[1]}:"}
    mine: list[dict[str, Any]] = []
    found = []
    for name, proc in lab.load().processes.items():
        if proc.role not in MERIDIOD_ROLES:
            continue
        for line in Path(proc.log).read_text(errors="replace").splitlines():
            if not line.startswith("{") or "refused" not in line:
                continue
            record = json.loads(line)
            if "refused" not in str(record.get("event")):
                continue
            if name in ours and str(record.get("address")).startswith(ours[name]):
                mine.append(record)
            else:
                found.append(f"{name}: {line}")
    return mine, found


def stop(runs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    for run in runs.values():
        run.proc.send_signal(signal.SIGTERM)
    return {proto: run.result(timeout=30) for proto, run in runs.items()}


def test_certificates_and_the_ca_rotated_under_traffic(lab: Lab, tmp_path: Path) -> None:
    pki_dir = plan.pki_dir(lab.state_dir)
    nsp_crt = plan.tls_dir(lab.state_dir, "nsp") / "tls.crt"
    proxy_crt = plan.tls_dir(lab.state_dir, "proxy-1") / "tls.crt"
    old_ca = pki.load_ca(pki_dir)
    old_client = client_of(old_ca, tmp_path / "old-client", old_ca.pem)
    before = {"nsp": served(lab, NSP, old_client), "proxy-1": served(lab, PROXY_1, old_client)}
    assert before == {"nsp": fingerprint_file(nsp_crt), "proxy-1": fingerprint_file(proxy_crt)}
    assert nsp_serves(lab, old_client)

    runs = {
        "tcp": lab.start_traffic(LONG, progress=True),
        "udp": lab.start_traffic(["--udp", *LONG], progress=True),
    }
    try:
        connected(runs)

        # 1. the server's and a client's certificates re-issued by the same CA
        report = lab.rotate(["nsp", "proxy-1"])
        assert report.instances == ["nsp", "proxy-1"]
        after = {"nsp": served(lab, NSP, old_client), "proxy-1": served(lab, PROXY_1, old_client)}
        assert after == {"nsp": fingerprint_file(nsp_crt), "proxy-1": fingerprint_file(proxy_crt)}
        assert after["nsp"] != before["nsp"] and after["proxy-1"] != before["proxy-1"]
        assert nsp_serves(lab, old_client)  # same CA: still a valid client

        # 2. the CA rotated
        report = lab.rotate(ca=True)
        assert set(report.instances) == set(lab.certified())
        new_ca = pki.load_ca(pki_dir)
        assert pki.fingerprint(new_ca.pem) != pki.fingerprint(old_ca.pem)
        assert not pki.rotation_pending(pki_dir)
        for name in lab.certified():
            files = plan.tls_dir(lab.state_dir, name)
            assert (files / "ca.crt").read_bytes() == new_ca.pem, name
        # the client of the old CA trusts both, so a refusal is the server's
        pki.write_bundle(old_client, old_ca.pem + new_ca.pem)
        new_client = client_of(new_ca, tmp_path / "new-client", new_ca.pem)
        rotated = {
            "nsp": served(lab, NSP, new_client),
            "proxy-1": served(lab, PROXY_1, new_client),
        }
        assert rotated == {
            "nsp": fingerprint_file(nsp_crt),
            "proxy-1": fingerprint_file(proxy_crt),
        }
        assert not {*rotated.values()} & {*after.values()}
        assert nsp_serves(lab, new_client)
        assert not nsp_serves(lab, old_client), "a certificate of the removed CA was served"
        # traffic after the last step too: 200 more replies (two seconds' worth)
        answered(runs, 200)
    finally:
        reports = stop(runs)

    for proto, result in reports.items():
        assert result["lost_connections"] == 0, f"{proto}: {summary(result)}\n{diagnose(lab)}"
        assert result["failed_connects"] == 0, f"{proto}: {summary(result)}\n{diagnose(lab)}"
        assert set(result["hosts"]) == TARGETS, f"{proto}: {summary(result)}"
    lab.wait_whole()
    # no daemon refused another (a daemon that connected anew in the middle of a step), and
    # none died
    mine, others = refusals(lab)
    assert others == []
    # the old CA's client was refused by the NSP at the handshake, for its certificate
    assert [r["event"] for r in mine] == ["grpc handshake refused"], mine
    assert "certificate" in mine[0]["reason"], mine
    assert {r["name"]: r["restarts"] for r in lab.status()["instances"] if r["restarts"]} == {}
