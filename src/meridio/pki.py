"""``meridioctl pki``: a throwaway certificate authority and X.509 SVIDs for the roles.

For the lab, tests and trials; production identities come from SPIRE or cert-manager, whose
files the daemons read the same way. A role certificate carries the SPIFFE ID
``spiffe://<trust-domain>/meridio/<role>/<name>`` as its only URI SAN, is valid for both TLS
client and server authentication, and has an ECDSA P-256 key.

    meridioctl pki init  [--dir DIR] [--trust-domain DOMAIN]     # DIR/ca.crt, DIR/ca.key
    meridioctl pki issue ROLE NAME [--dir DIR] [--out OUT]       # OUT/tls.crt, tls.key, ca.crt

The ``cryptography`` package is loaded only here: a daemon reads its files with ``ssl``.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from meridio.core.authz import IDENTITIES, InvalidSpiffeId, check_trust_domain, role_id

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

DEFAULT_DIR = "meridio-pki"
DEFAULT_TRUST_DOMAIN = "meridio.local"
CA_DAYS = 3650
CERT_DAYS = 365
LAYOUTS = {
    "tls": ("tls.crt", "tls.key", "ca.crt"),
    "spiffe": ("svid.pem", "svid_key.pem", "bundle.pem"),
}


class PkiError(Exception):
    """A file is missing, exists already, or a name is invalid; one line for the user."""


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: EllipticCurvePrivateKey
    trust_domain: str

    @property
    def pem(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        return self.cert.public_bytes(Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key() -> EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)


def make_ca(
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    days: float = CA_DAYS,
    not_before: datetime.datetime | None = None,
    name: str = "meridio throwaway CA",
) -> Ca:
    """A self-signed CA certificate for ``trust_domain`` (its SPIFFE ID is the domain's)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    check_trust_domain(trust_domain)
    key = new_key()
    start = not_before or _now() - datetime.timedelta(minutes=5)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meridio"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Ca(cert, key, trust_domain)


def make_svid(
    ca: Ca,
    spiffe_id: str,
    *,
    days: float = CERT_DAYS,
    not_before: datetime.datetime | None = None,
    key: EllipticCurvePrivateKey | None = None,
    dns_names: Sequence[str] = (),
) -> tuple[x509.Certificate, EllipticCurvePrivateKey]:
    """A leaf certificate (an X509-SVID) for ``spiffe_id``, signed by ``ca``; ``dns_names``
    are extra SANs for clients that check a host name (grpcio)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = key or new_key()
    start = not_before or _now() - datetime.timedelta(minutes=5)
    name = spiffe_id.rsplit("/", 1)[-1] or spiffe_id
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meridio"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name[:64]),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(spiffe_id),
                    *(x509.DNSName(name) for name in dns_names),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def self_signed(spiffe_id: str, *, days: float = CERT_DAYS) -> tuple[bytes, bytes]:
    """A certificate for ``spiffe_id`` signed by its own key (cert PEM, key PEM): a client no
    trust bundle knows."""
    name = spiffe_id.rsplit("/", 1)[-1]
    ca = make_ca(spiffe_id.split("/")[2], days=days, name=name[:64])  # subject == issuer
    cert, key = make_svid(ca, spiffe_id, days=days, key=ca.key)
    return cert_pem(cert), key_pem(key)


# --- files -----------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (a rename), so a daemon never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_credentials(
    out: Path,
    cert: bytes | Sequence[bytes],
    key: bytes,
    bundle: bytes,
    layout: str = "tls",
) -> None:
    """Write a certificate (chain), its key (mode 0600) and a trust bundle in ``layout``.

    The key is written first and the certificate last, so a daemon that polls the files sees
    a key that does not match its certificate only briefly (and retries), never the reverse
    for long.
    """
    if layout not in LAYOUTS:
        raise PkiError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    cert_name, key_name, bundle_name = LAYOUTS[layout]
    out.mkdir(parents=True, exist_ok=True)
    chain = cert if isinstance(cert, bytes) else b"".join(cert)
    _write(out / bundle_name, bundle, 0o644)
    _write(out / key_name, key, 0o600)
    _write(out / cert_name, chain, 0o644)


def init_ca(
    directory: Path,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    days: float = CA_DAYS,
    force: bool = False,
) -> Ca:
    """Create ``directory``/ca.crt and ca.key (refused if they exist, unless ``force``)."""
    crt, key = directory / "ca.crt", directory / "ca.key"
    if not force and (crt.exists() or key.exists()):
        raise PkiError(f"{crt} exists already (--force replaces the CA)")
    try:
        ca = make_ca(trust_domain, days=days)
    except InvalidSpiffeId as exc:
        raise PkiError(str(exc)) from exc
    directory.mkdir(parents=True, exist_ok=True)
    _write(key, key_pem(ca.key), 0o600)
    _write(crt, cert_pem(ca.cert), 0o644)
    return ca


def load_ca(directory: Path) -> Ca:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    crt, key_file = directory / "ca.crt", directory / "ca.key"
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        key = load_pem_private_key(key_file.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(
            f"no CA in {directory} ({exc.filename} missing): run meridioctl pki init"
        ) from exc
    except ValueError as exc:
        raise PkiError(f"cannot read the CA in {directory}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_file} is not an ECDSA key")
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ids = uris.get_values_for_type(x509.UniformResourceIdentifier)
    domain = ids[0].removeprefix("spiffe://").split("/")[0] if ids else DEFAULT_TRUST_DOMAIN
    return Ca(cert, key, domain)


def issue(
    directory: Path,
    role: str,
    name: str,
    out: Path | None = None,
    *,
    days: float = CERT_DAYS,
    layout: str = "tls",
    ca: Ca | None = None,
    bundle: bytes | None = None,
) -> tuple[Path, str]:
    """Issue a certificate for ``role`` ``name`` from the CA in ``directory`` (or ``ca``);
    (out, SPIFFE ID). The trust bundle written beside it is ``bundle``, by default the CA's
    certificate."""
    if role not in IDENTITIES:
        raise PkiError(f"unknown role {role!r}; roles: {', '.join(IDENTITIES)}")
    ca = ca or load_ca(directory)
    try:
        sid = str(role_id(ca.trust_domain, role, name))
    except (InvalidSpiffeId, ValueError) as exc:
        raise PkiError(str(exc)) from exc
    cert, key = make_svid(ca, sid, days=days)
    target = out or directory / f"{role}-{name}"
    write_credentials(target, cert_pem(cert), key_pem(key), bundle or ca.pem, layout)
    return target, sid


def write_bundle(out: Path, bundle: bytes, layout: str = "tls") -> None:
    """Replace only the trust bundle of the credentials in ``out`` (atomically)."""
    if layout not in LAYOUTS:
        raise PkiError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    _write(out / LAYOUTS[layout][2], bundle, 0o644)


def fingerprint(pem: bytes) -> str:
    """The SHA-256 of the (first) certificate in ``pem``, in hex: what a TLS peer sees."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


# --- rotating the CA (the lab's, `meridioctl lab rotate --ca`) ---------------------------------

NEXT_CA = "ca-next"
"""The subdirectory of a CA's directory that holds the CA a rotation is moving to, from when it
is made until every certificate is issued by it; then it replaces ``ca.crt`` and ``ca.key``."""


def next_ca(directory: Path) -> Ca:
    """The CA that ``directory``'s is being rotated to: the one a rotation that did not finish
    made, or a new one of the same trust domain (written to ``directory``/ca-next)."""
    staged = directory / NEXT_CA
    if (staged / "ca.crt").exists() and (staged / "ca.key").exists():
        return load_ca(staged)
    current = load_ca(directory)
    return init_ca(staged, current.trust_domain, force=True)


def rotation_pending(directory: Path) -> bool:
    """Whether a CA rotation began in ``directory`` and did not finish."""
    return (directory / NEXT_CA / "ca.crt").exists()


def promote_ca(directory: Path) -> Ca:
    """End a rotation: the next CA becomes ``directory``'s (``ca.crt``, ``ca.key``); the old
    one is gone (the bundles still naming it are the caller's to rewrite)."""
    staged = directory / NEXT_CA
    ca = load_ca(staged)
    _write(directory / "ca.key", key_pem(ca.key), 0o600)
    _write(directory / "ca.crt", ca.pem, 0o644)
    shutil.rmtree(staged)
    return ca


def ensure_credentials(
    directory: Path,
    role: str,
    name: str,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    renew_days: float = 7,
) -> Path:
    """``directory``/``name``: the credentials of ``role`` instance ``name`` (for ``tls-dir``).

    The CA in ``directory`` is made on first use; a certificate is issued when missing, for
    another role, expiring within ``renew_days`` (a running role reloads it), or beside a
    trust bundle that is not the CA's (left from before a CA rotation). For the lab and tests,
    which start instances as they go.
    """
    if not (directory / "ca.crt").exists():
        init_ca(directory, trust_domain)
    out = directory / name
    crt = out / "tls.crt"
    bundle = out / "ca.crt"
    if (
        crt.exists()
        and bundle.exists()
        and bundle.read_bytes() == (directory / "ca.crt").read_bytes()
    ):
        import ssl

        decoded = ssl._ssl._test_decode_cert(str(crt))  # type: ignore[attr-defined]
        uris = [v for k, v in decoded.get("subjectAltName", ()) if k == "URI"]
        left = ssl.cert_time_to_seconds(decoded["notAfter"]) - _now().timestamp()
        if uris and uris[0].split("/")[3:5] == ["meridio", role] and left > renew_days * 86400:
            return out
    issue(directory, role, name, out)
    return out


# --- the CLI ---------------------------------------------------------------------------------

DIR_OPTION = click.option(
    "--dir",
    "directory",
    default=DEFAULT_DIR,
    show_default=True,
    envvar="MERIDIO_PKI_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the CA's ca.crt and ca.key are (MERIDIO_PKI_DIR).",
)


@click.group()
def pki() -> None:
    """A throwaway CA and role certificates (SPIFFE X.509 SVIDs) for the lab and trials."""


@pki.command("init")
@DIR_OPTION
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
@click.option("--days", type=float, default=CA_DAYS, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA.")
def pki_init(directory: Path, trust_domain: str, days: float, force: bool) -> None:
    """Create a CA: DIR/ca.crt (the trust bundle to give every role) and DIR/ca.key."""
    try:
        ca = init_ca(directory, trust_domain, days=days, force=force)
    except PkiError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"CA for spiffe://{ca.trust_domain} in {directory}/ca.crt (key: ca.key, 0600)")


@pki.command("issue")
@click.argument("role", type=click.Choice(IDENTITIES))
@click.argument("name")
@DIR_OPTION
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the files (default DIR/ROLE-NAME); give it to a role as --tls-dir.",
)
@click.option("--days", type=float, default=CERT_DAYS, show_default=True)
@click.option(
    "--layout",
    type=click.Choice(sorted(LAYOUTS)),
    default="tls",
    show_default=True,
    help="tls: tls.crt, tls.key, ca.crt (cert-manager); spiffe: svid.pem, svid_key.pem, "
    "bundle.pem (spiffe-helper).",
)
def pki_issue(
    role: str, name: str, directory: Path, out: Path | None, days: float, layout: str
) -> None:
    """Issue the certificate of ROLE instance NAME (ROLE admin: for meridioctl)."""
    try:
        target, sid = issue(directory, role, name, out, days=days, layout=layout)
    except PkiError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{sid} in {target}")
