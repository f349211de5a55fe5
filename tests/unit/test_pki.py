"""``meridioctl pki``: a throwaway CA and role certificates the daemons accept."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from meridio import pki
from meridio.ctl import main
from meridio.runtime.tls import Tls, TlsError, load_credentials, resolve_paths


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_init_and_issue(tmp_path: Path) -> None:
    ca_dir = tmp_path / "pki"
    out = run("pki", "init", "--dir", str(ca_dir), "--trust-domain", "example.org")
    assert out.exit_code == 0, out.output
    assert "spiffe://example.org" in out.output
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    out = run("pki", "init", "--dir", str(ca_dir))
    assert out.exit_code == 1 and "exists already" in out.output

    out = run("pki", "issue", "proxy", "node-1", "--dir", str(ca_dir))
    assert out.exit_code == 0, out.output
    assert "spiffe://example.org/meridio/proxy/node-1" in out.output
    creds = ca_dir / "proxy-node-1"
    assert stat.S_IMODE((creds / "tls.key").stat().st_mode) == 0o600
    assert (creds / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    loaded = load_credentials(resolve_paths(str(creds)))  # type: ignore[arg-type]
    assert str(loaded.identity) == "spiffe://example.org/meridio/proxy/node-1"
    assert loaded.identity.role == "proxy" and loaded.trust_domain == "example.org"
    # the role must match what the daemon runs as
    with pytest.raises(TlsError, match="is for role proxy, not nsp"):
        Tls(resolve_paths(str(creds)), "nsp")  # type: ignore[arg-type]

    spiffe = tmp_path / "spiffe"
    out = run(
        "pki", "issue", "admin", "me", "--dir", str(ca_dir), "--out", str(spiffe), "--layout",
        "spiffe",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in spiffe.iterdir()) == ["bundle.pem", "svid.pem", "svid_key.pem"]
    paths = resolve_paths(str(spiffe))
    assert paths is not None and paths.cert.name == "svid.pem"
    decoded = ssl._ssl._test_decode_cert(str(paths.cert))  # type: ignore[attr-defined]
    assert decoded["subjectAltName"] == (("URI", "spiffe://example.org/meridio/admin/me"),)


def test_issue_errors(tmp_path: Path) -> None:
    out = run("pki", "issue", "proxy", "x", "--dir", str(tmp_path / "none"))
    assert out.exit_code == 1 and "run meridioctl pki init" in out.output
    run("pki", "init", "--dir", str(tmp_path))
    out = run("pki", "issue", "root", "x", "--dir", str(tmp_path))
    assert out.exit_code == 2 and "'root' is not one of" in out.output
    out = run("pki", "issue", "proxy", "a/b", "--dir", str(tmp_path))
    assert out.exit_code == 1 and "must be letters" in out.output
    out = run("pki", "init", "--dir", str(tmp_path / "x"), "--trust-domain", "Bad:1")
    assert out.exit_code == 1 and "trust domain" in out.output


def test_tls_files_resolution(tmp_path: Path) -> None:
    ca = pki.make_ca()
    cert, key = pki.make_svid(ca, "spiffe://meridio.local/meridio/nsp/a")
    pki.write_credentials(tmp_path, pki.cert_pem(cert), pki.key_pem(key), ca.pem)
    assert resolve_paths() is None
    paths = resolve_paths(str(tmp_path), ca=str(tmp_path / "other.crt"))
    assert paths is not None and paths.ca.name == "other.crt" and paths.cert.name == "tls.crt"
    with pytest.raises(TlsError, match="'tls-ca' is required"):
        resolve_paths(cert=str(tmp_path / "tls.crt"), key=str(tmp_path / "tls.key"))
    (tmp_path / "ca.crt").write_text("not a certificate")
    with pytest.raises(TlsError, match="cannot use trust bundle"):
        load_credentials(resolve_paths(str(tmp_path)))  # type: ignore[arg-type]


def test_reload_keeps_working_credentials(tmp_path: Path) -> None:
    ca = pki.make_ca()

    def issue(name: str) -> None:
        cert, key = pki.make_svid(ca, f"spiffe://meridio.local/meridio/lb/{name}")
        pki.write_credentials(tmp_path, pki.cert_pem(cert), pki.key_pem(key), ca.pem)

    issue("a")
    tls = Tls(resolve_paths(str(tmp_path)), "lb")  # type: ignore[arg-type]
    assert not tls.poll()
    first = tls.current
    issue("b")
    assert tls.poll() and str(tls.current.identity).endswith("/lb/b")
    (tmp_path / "tls.key").write_text("garbage")  # half-written: kept, and not tried again
    assert not tls.poll() and not tls.poll()
    assert str(tls.current.identity).endswith("/lb/b") and tls.current is not first
    issue("c")
    assert tls.poll() and tls.reloads == 2


def test_ensure_credentials_issues_once(tmp_path: Path) -> None:
    first = pki.ensure_credentials(tmp_path, "lb", "lb-1")
    assert first == tmp_path / "lb-1" and (tmp_path / "ca.crt").exists()
    content = (first / "tls.crt").read_bytes()
    assert pki.ensure_credentials(tmp_path, "lb", "lb-1") == first
    assert (first / "tls.crt").read_bytes() == content  # still valid: kept
    pki.ensure_credentials(tmp_path, "proxy", "lb-1")  # another role: issued again
    creds = load_credentials(resolve_paths(str(first)))  # type: ignore[arg-type]
    assert creds.identity.role == "proxy"
    assert pki.ensure_credentials(tmp_path, "proxy", "p", renew_days=400) == tmp_path / "p"


def test_ca_rotation_files(tmp_path: Path) -> None:
    """The steps ``lab rotate --ca`` takes, on files: a next CA (the same one until the
    rotation ends), certificates of it beside a bundle of both, the next CA promoted; after
    it, ``ensure_credentials`` keeps those certificates and re-issues one left from before."""
    ours = pki.ensure_credentials(tmp_path, "nsp", "nsp")
    stale = pki.ensure_credentials(tmp_path, "lb", "lb-9")  # not rotated (gone, say)
    old = pki.load_ca(tmp_path)
    assert not pki.rotation_pending(tmp_path)
    new = pki.next_ca(tmp_path)
    assert pki.rotation_pending(tmp_path) and new.trust_domain == old.trust_domain
    assert pki.fingerprint(pki.next_ca(tmp_path).pem) == pki.fingerprint(new.pem)  # resumed
    both = old.pem + new.pem
    pki.write_bundle(ours, both)
    first = load_credentials(resolve_paths(str(ours)))  # type: ignore[arg-type]
    pki.issue(tmp_path, "nsp", "nsp", ours, ca=new, bundle=both)
    assert (ours / "ca.crt").read_bytes() == both
    assert load_credentials(resolve_paths(str(ours))).digest != first.digest  # type: ignore[arg-type]
    assert pki.fingerprint(pki.promote_ca(tmp_path).pem) == pki.fingerprint(new.pem)
    assert not pki.rotation_pending(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == new.pem
    pki.write_bundle(ours, new.pem)
    kept = (ours / "tls.crt").read_bytes()
    assert (pki.ensure_credentials(tmp_path, "nsp", "nsp") / "tls.crt").read_bytes() == kept
    old_cert = (stale / "tls.crt").read_bytes()
    pki.ensure_credentials(tmp_path, "lb", "lb-9")
    assert (stale / "tls.crt").read_bytes() != old_cert
    assert (stale / "ca.crt").read_bytes() == new.pem
