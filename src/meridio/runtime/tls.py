"""Mutual TLS for the gRPC stack: credentials from files, reloaded when they change, and the
server's checks of who calls (the table in :mod:`meridio.core.authz`).

Credentials are a certificate (an X509-SVID: its SPIFFE ID in the URI SAN), its key and a
trust bundle, given as files or as a directory in one of the layouts the usual issuers write:
``tls.crt``/``tls.key``/``ca.crt`` (cert-manager, its csi-driver-spiffe, Kubernetes TLS
secrets) or ``svid.pem``/``svid_key.pem``/``bundle.pem`` (SPIRE's spiffe-helper; also
``svid_bundle.pem``). They are polled; when their content changes, new contexts are built and
new handshakes use them, while established connections (and their streams) go on. A change that
does not load (a key that does not match its certificate yet, half a file) keeps the previous
credentials and is tried again when the content changes again.

Server side, every TCP connection goes through the TLS handshake before gRPC sees it: a peer
without a certificate, or with one the bundle does not vouch for (self-signed, expired, another
CA), is refused there. Every call is then checked against the authorization table with the
peer's role; a refusal is PERMISSION_DENIED. Refusals are counted
(``meridio_grpc_refused_total``) and logged once per peer and reason per minute.

Client side, the server's certificate must be vouched for by the bundle and name a role of the
trust domain that serves the method called (a target cannot pose as the NSP).

Unix sockets are local and never use TLS: file permissions protect them.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import socket
import ssl
import struct
import time
from asyncio import sslproto
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpclib
import grpclib.client
import grpclib.events
import grpclib.server
from grpclib.const import Status

from meridio.core import authz
from meridio.core.authz import Identity, InvalidSpiffeId, RefusalLog, RolePattern
from meridio.runtime.logs import get_logger
from meridio.settings import CommonSettings, SettingsError

log = get_logger("meridio.tls")

# (certificate, key, bundle) file names, in the order a directory is searched.
LAYOUTS: tuple[tuple[str, str, str], ...] = (
    ("tls.crt", "tls.key", "ca.crt"),
    ("svid.pem", "svid_key.pem", "bundle.pem"),
    ("svid.pem", "svid_key.pem", "svid_bundle.pem"),
)
HANDSHAKE_TIMEOUT = 10
DIGEST_CHARS = 16
"""How much of the files' digest (:func:`read_digest`) the logs show (``files``)."""
# Settings that name gRPC endpoints, per role (checked before the role starts; the gRPC stack
# refuses plain TCP without "insecure" whatever a role asks, so this list only makes the error
# come early, as a settings error).
LISTEN_SETTINGS = ("listen", "connect-listen", "inspect-listen", "health-listen")
DIAL_SETTINGS = ("nsp", "ipam", "proxy", "proxies")


class TlsError(SettingsError):
    """TLS is required or its files are unusable; one line naming the setting or file."""


@dataclass(frozen=True)
class TlsPaths:
    cert: Path
    key: Path
    ca: Path

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.cert, self.key, self.ca


def resolve_paths(
    tls_dir: str = "", cert: str = "", key: str = "", ca: str = ""
) -> TlsPaths | None:
    """The files named by the settings, or None when none is set.

    ``tls-dir`` is searched for one of :data:`LAYOUTS`; ``tls-cert``, ``tls-key`` and
    ``tls-ca`` name files themselves (and override the directory's).
    """
    if not (tls_dir or cert or key or ca):
        return None
    found: tuple[str, str, str] | None = None
    if tls_dir:
        directory = Path(tls_dir)
        if not directory.is_dir():
            raise TlsError(f"setting 'tls-dir': {tls_dir} is not a directory")
        for layout in LAYOUTS:
            if all((directory / name).exists() for name in layout):
                found = tuple(str(directory / name) for name in layout)  # type: ignore[assignment]
                break
        if found is None and not (cert and key and ca):
            names = " or ".join("/".join(layout) for layout in LAYOUTS)
            raise TlsError(f"setting 'tls-dir': {tls_dir} holds neither {names}")
    chosen = [explicit or (found[i] if found else "") for i, explicit in enumerate((cert, key, ca))]
    for name, value in zip(("tls-cert", "tls-key", "tls-ca"), chosen, strict=True):
        if not value:
            raise TlsError(f"setting {name!r} is required with the other TLS settings")
    return TlsPaths(Path(chosen[0]), Path(chosen[1]), Path(chosen[2]))


# --- credentials -----------------------------------------------------------------------------


def _uris(cert: Mapping[str, Any]) -> list[str]:
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def _decode_pem_file(path: Path) -> dict[str, Any]:
    """The first certificate of a PEM file, as ``ssl`` decodes a peer's (no extra package)."""
    decoded: dict[str, Any] = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
    return decoded


@dataclass(frozen=True)
class Credentials:
    """One loaded set of files: the contexts new handshakes use, and who we are."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    identity: Identity
    trust_domain: str
    not_after: float
    """Expiry of our certificate, seconds since the epoch."""
    digest: str


def _context(server: bool, paths: TlsPaths, bundle: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # SPIFFE: identities are URIs checked after the handshake, never host names.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2; 1.3 has its own
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_cert_chain(str(paths.cert), str(paths.key))
    except ssl.SSLError as exc:
        raise TlsError(
            f"cannot use certificate {paths.cert} with key {paths.key}: {exc.reason or exc}"
        ) from exc
    try:
        ctx.load_verify_locations(cadata=bundle)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc).split(" (_ssl")[0]
        raise TlsError(f"cannot use trust bundle {paths.ca}: {reason}") from exc
    return ctx


def read_digest(paths: TlsPaths) -> tuple[str, bytes]:
    """A digest of the three files' content, and the bundle's bytes."""
    h = hashlib.sha256()
    bundle = b""
    for path in paths.files:
        data = path.read_bytes()
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
        bundle = data
    return h.hexdigest(), bundle


def files_digest(paths: TlsPaths) -> str:
    """The shortened digest of the files a daemon logs as ``files`` once it uses them (at
    start, ``mutual tls``; after a change, ``tls credentials reloaded``)."""
    return read_digest(paths)[0][:DIGEST_CHARS]


def load_credentials(
    paths: TlsPaths, trust_domain: str = "", patterns: tuple[RolePattern, ...] = ()
) -> Credentials:
    """Load the files; TlsError naming the file and the problem."""
    try:
        digest, bundle = read_digest(paths)
    except OSError as exc:
        raise TlsError(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc
    try:
        text = bundle.decode("ascii")
    except UnicodeDecodeError as exc:
        raise TlsError(f"trust bundle {paths.ca} is not PEM") from exc
    server = _context(True, paths, text)
    client = _context(False, paths, text)
    try:
        mine = _decode_pem_file(paths.cert)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot read certificate {paths.cert}: {exc}") from exc
    uris = [u for u in _uris(mine) if u.startswith("spiffe:")]
    if len(uris) != 1:
        raise TlsError(f"certificate {paths.cert} must have exactly one spiffe:// URI SAN")
    try:
        sid = authz.parse_spiffe_id(uris[0])
    except InvalidSpiffeId as exc:
        raise TlsError(f"certificate {paths.cert}: {exc}") from exc
    domain = trust_domain or sid.trust_domain
    identity = authz.identify(uris, domain, patterns)
    not_after = ssl.cert_time_to_seconds(mine["notAfter"])
    return Credentials(server, client, identity, domain, not_after, digest)


def peer_identity(cert: Mapping[str, Any] | None, creds: Credentials, tls: Tls) -> Identity:
    if not cert:
        return Identity(None, None, "no certificate")
    return authz.identify(_uris(cert), creds.trust_domain, tls.patterns)


# --- refusals --------------------------------------------------------------------------------

_refused: Any = None


def refused_counter() -> Any:
    """``meridio_grpc_refused_total{reason, role, method}``, made on the first refusal."""
    global _refused
    if _refused is None:
        from prometheus_client import Counter

        from meridio.runtime import metrics

        _refused = Counter(
            "meridio_grpc_refused",
            "gRPC connections and calls refused: reason handshake (no or an untrusted "
            "certificate), permission (the table), message (a field the role may not send), netns "
            "(a connect request naming a namespace not the caller's), "
            "server (a server of the wrong role)",
            ["reason", "role", "method"],
            registry=metrics.registry(),
        )
    return _refused


# --- the process's TLS -----------------------------------------------------------------------


class Tls:
    """The credentials of one process, reloaded when their files change."""

    def __init__(
        self,
        paths: TlsPaths,
        role: str | None,
        *,
        trust_domain: str = "",
        patterns: tuple[RolePattern, ...] = (),
        reload_interval: float = 5.0,
        check_own: bool = True,
    ) -> None:
        """``role``: the role our certificate must name (None: any); ``check_own`` off lets a
        test client present a certificate of no role or an expired one."""
        self.paths = paths
        self.role = role
        self.trust_domain_setting = trust_domain
        self.patterns = patterns
        self.reload_interval = reload_interval
        self.check_own = check_own
        self.current = load_credentials(paths, trust_domain, patterns)
        self._check_own(self.current)
        self._failed_digest = ""
        self.refusals = RefusalLog()
        self.reloads = 0

    @classmethod
    def from_settings(cls, settings: CommonSettings, role: str) -> Tls | None:
        """The process's TLS, None when no TLS file is configured (certificates win over
        ``insecure``, which only permits plain text without them)."""
        paths = resolve_paths(
            settings.tls_dir, settings.tls_cert, settings.tls_key, settings.tls_ca
        )
        if paths is None:
            return None
        try:
            patterns = authz.parse_role_patterns(settings.tls_roles)
            if settings.trust_domain:
                authz.check_trust_domain(settings.trust_domain)
        except ValueError as exc:
            raise TlsError(str(exc)) from exc
        return cls(
            paths,
            role,
            trust_domain=settings.trust_domain,
            patterns=patterns,
            reload_interval=settings.tls_reload_interval,
        )

    def _check_own(self, creds: Credentials) -> None:
        identity = creds.identity
        if not self.check_own:
            return
        if identity.role is None:
            raise TlsError(
                f"certificate {self.paths.cert} ({identity}) names no meridio role: "
                f"{identity.problem or 'use /meridio/<role>/<name> or the tls-roles setting'}"
            )
        if self.role is not None and identity.role != self.role:
            raise TlsError(
                f"certificate {self.paths.cert} ({identity}) is for role {identity.role}, "
                f"not {self.role}"
            )
        left = creds.not_after - time.time()
        if left <= 0:
            raise TlsError(f"certificate {self.paths.cert} ({identity}) has expired")

    def describe(self) -> dict[str, Any]:
        c = self.current
        return {
            "spiffe_id": str(c.identity),
            "trust_domain": c.trust_domain,
            "cert": str(self.paths.cert),
            "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.not_after)),
            # which files are in use (read_digest's, shortened): what `lab rotate` waits for
            "files": c.digest[:DIGEST_CHARS],
        }

    def poll(self) -> bool:
        """Reload when the files' content changed; True when new credentials are in use."""
        try:
            digest, _ = read_digest(self.paths)
        except OSError as exc:
            if self._failed_digest != "unreadable":
                self._failed_digest = "unreadable"
                log.warning("tls files unreadable, keeping the loaded ones", error=str(exc))
            return False
        if digest in (self.current.digest, self._failed_digest):
            return False
        try:
            creds = load_credentials(self.paths, self.trust_domain_setting, self.patterns)
            self._check_own(creds)
        except TlsError as exc:
            self._failed_digest = digest
            log.warning(
                "tls files changed but do not load, keeping the loaded ones",
                error=str(exc),
                files=digest[:DIGEST_CHARS],
            )
            return False
        self.current = creds
        self._failed_digest = ""
        self.reloads += 1
        log.info("tls credentials reloaded", **self.describe())
        return True

    async def watch(self) -> None:
        """Poll the files every ``reload_interval`` seconds (a trio task)."""
        import trio

        while True:
            await trio.sleep(self.reload_interval)
            self.poll()

    # -- refusals

    def refuse(self, kind: str, key: Any, role: str, method: str, **fields: Any) -> None:
        """Count a refusal of ``kind`` (handshake, permission, message, server); log it unless
        the same peer (``key``) was refused the same way within the minute."""
        refused_counter().labels(reason=kind, role=role or "none", method=method).inc()
        repeats = self.refusals.note((kind, key, method), time.monotonic())
        if repeats is None:
            return
        if repeats:
            fields["repeats_not_logged"] = repeats
        log.warning(f"grpc {kind} refused", role=role or None, method=method or None, **fields)

    # -- server side

    def accept(self, app_factory: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """A protocol for one accepted TCP connection: the TLS handshake with the current
        server context, then ``app_factory()``'s protocol over it."""
        return _Handshake(self, app_factory())

    def install_authorization(self, server: grpclib.server.Server, server_role: str) -> None:
        """Check every call that arrives over TLS against the table (RecvRequest event)."""

        async def on_request(event: grpclib.events.RecvRequest) -> None:
            cert = event.peer.cert()
            if cert is None:  # a unix socket: local, file permissions decide
                return
            identity = peer_identity(cert, self.current, self)
            method = event.method_name
            decision = authz.decide(server_role, method, identity)
            if not decision.allowed:
                self.refuse(
                    "permission",
                    str(identity),
                    identity.role or "",
                    method,
                    peer=str(identity),
                    address=_address(event.peer.addr()),
                    reason=decision.reason,
                )
                raise grpclib.GRPCError(Status.PERMISSION_DENIED, decision.reason)
            if authz.has_message_rule(method):
                event.method_func = self._check_messages(  # type: ignore[assignment]
                    event.method_func, method, identity, event.peer.addr()
                )

        grpclib.events.listen(server, grpclib.events.RecvRequest, on_request)

    def _check_messages(
        self, func: Callable[[Any], Any], method: str, identity: Identity, addr: Any
    ) -> Callable[[Any], Any]:
        role = identity.role or ""

        async def checked(stream: Any) -> None:
            receive = stream.recv_message

            async def recv_message() -> Any:
                message = await receive()
                if message is not None:
                    reason = authz.check_message(method, role, message)
                    if reason is not None:
                        self.refuse(
                            "message",
                            str(identity),
                            role,
                            method,
                            peer=str(identity),
                            address=_address(addr),
                            reason=reason,
                        )
                        raise grpclib.GRPCError(Status.PERMISSION_DENIED, reason)
                return message

            stream.recv_message = recv_message
            await func(stream)

        return checked

    # -- client side

    def channel(self, host: str, port: int, **kwargs: Any) -> TlsChannel:
        return TlsChannel(host, port, tls=self, **kwargs)


def _address(addr: Any) -> str | None:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return None if addr is None else str(addr)


class _Handshake(asyncio.Protocol):
    """The protocol asyncio gives an accepted connection: it hands the transport to a
    server-side TLS protocol (the process's current context) that runs the application's
    protocol once the handshake succeeds, and records a handshake that fails."""

    def __init__(self, tls: Tls, app: asyncio.Protocol) -> None:
        self.tls = tls
        self.app = app

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        protocol = sslproto.SSLProtocol(
            loop,
            self.app,
            self.tls.current.server,
            waiter,
            server_side=True,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        peer = transport.get_extra_info("peername")
        waiter.add_done_callback(lambda f: self._done(f, peer))

    def _done(self, future: asyncio.Future[None], peer: Any) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            return
        if isinstance(exc, ssl.SSLError):
            reason = exc.reason or str(exc)
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = exc.verify_message or reason
        elif isinstance(exc, TimeoutError | asyncio.TimeoutError):
            reason = "handshake timed out"
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        address = _address(peer)
        host = address.rsplit(":", 1)[0] if address else None
        self.tls.refuse("handshake", (host, reason), "", "", address=address, reason=reason)

    # never called: the TLS protocol replaces this one at once
    def data_received(self, data: bytes) -> None:  # pragma: no cover
        raise AssertionError("data before the TLS handshake")


class PeerRefused(ConnectionError):
    """The server's certificate does not name a role of our trust domain."""


class TlsChannel(grpclib.client.Channel):
    """A grpclib channel over mutual TLS with the process's current credentials.

    Each new connection takes the credentials current then; the server must name a role of
    the trust domain, and every call checks that role serves the method called (before the
    request message is sent).
    """

    def __init__(self, host: str, port: int, *, tls: Tls, **kwargs: Any) -> None:
        super().__init__(host, port, ssl=tls.current.client, **kwargs)
        self._tls = tls
        self.server_identity: Identity | None = None
        grpclib.events.listen(self, grpclib.events.SendRequest, self._on_send_request)

    async def _open(self) -> Any:
        return await super()._create_connection()

    async def _create_connection(self) -> Any:
        creds = self._tls.current
        self._ssl = creds.client
        protocol = await self._open()
        transport = protocol.connection._transport
        ssl_object = transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        identity = peer_identity(cert, creds, self._tls)
        if identity.role is None:
            transport.close()
            self._tls.refuse(
                "server",
                str(identity),
                "",
                "",
                peer=str(identity),
                address=f"{self._host}:{self._port}",
                reason=identity.problem,
            )
            raise PeerRefused(
                f"server {self._host}:{self._port} ({identity}) names no meridio role: "
                f"{identity.problem}"
            )
        self.server_identity = identity
        return protocol

    async def _on_send_request(self, event: grpclib.events.SendRequest) -> None:
        identity = self.server_identity
        if identity is None or identity.role is None:
            return
        servers = authz.servers_of(event.method_name)
        if identity.role not in servers:
            reason = (
                f"server {identity} is role {identity.role}, which does not serve "
                f"{event.method_name} (served by {', '.join(sorted(servers)) or 'none'})"
            )
            self._tls.refuse(
                "server",
                str(identity),
                identity.role,
                event.method_name,
                peer=str(identity),
                reason=reason,
            )
            raise grpclib.GRPCError(Status.PERMISSION_DENIED, reason)


# --- who is calling (for handlers that check more than the table) ------------------------------


@dataclass(frozen=True)
class CallPeer:
    """The peer of the call being handled: its certificate's identity (TLS), its process and
    user (a unix socket: SO_PEERCRED), or its address (plain TCP)."""

    identity: Identity | None = None
    pid: int | None = None
    uid: int | None = None
    address: str | None = None
    """The peer's ``host:port`` (TCP)."""
    peername: tuple[Any, ...] | None = None
    sockname: tuple[Any, ...] | None = None
    """Both ends of a TCP connection, as the socket gives them: with them a handler can find
    the connection's other end (in the namespace a client names, say)."""


_current_peer: contextvars.ContextVar[CallPeer | None] = contextvars.ContextVar(
    "meridio_call_peer", default=None
)


def current_peer() -> CallPeer | None:
    """The peer of the gRPC call this asyncio handler serves (None outside a call)."""
    return _current_peer.get()


def _call_peer(peer: Any, tls: Tls | None) -> CallPeer:
    transport = peer._transport
    ssl_object = transport.get_extra_info("ssl_object")
    ends = {
        "peername": transport.get_extra_info("peername"),
        "sockname": transport.get_extra_info("sockname"),
    }
    if ssl_object is not None and tls is not None:
        identity = peer_identity(ssl_object.getpeercert(), tls.current, tls)
        return CallPeer(identity=identity, address=_address(peer.addr()), **ends)
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", raw)
            return CallPeer(pid=pid, uid=uid)
        except OSError:
            return CallPeer()
    return CallPeer(address=_address(peer.addr()), **ends)


def install_call_peer(server: grpclib.server.Server, tls: Tls | None) -> None:
    """Make :func:`current_peer` answer in every handler of ``server``."""

    async def on_request(event: grpclib.events.RecvRequest) -> None:
        call_peer = _call_peer(event.peer, tls)
        func = event.method_func

        async def with_peer(stream: Any) -> None:
            token = _current_peer.set(call_peer)
            try:
                await func(stream)
            finally:
                _current_peer.reset(token)

        event.method_func = with_peer

    grpclib.events.listen(server, grpclib.events.RecvRequest, on_request)


# --- settings --------------------------------------------------------------------------------


def _endpoint_values(settings: CommonSettings) -> list[tuple[str, str]]:
    values: list[tuple[str, str]] = []
    fields = {f.encode_name: f.name for f in _fields(settings)}
    for name in (*LISTEN_SETTINGS, *DIAL_SETTINGS):
        attr = fields.get(name)
        if attr is None:
            continue
        value = getattr(settings, attr)
        if not isinstance(value, str) or not value:
            continue
        if name == "health-listen" and settings.health_plaintext:
            continue
        for item in value.split(","):
            # proxies: conduit=host:port
            text = item.partition("=")[2] if name == "proxies" else item
            if text.strip():
                values.append((name, text.strip()))
    return values


def _fields(settings: CommonSettings) -> tuple[Any, ...]:
    import msgspec

    return msgspec.structs.fields(type(settings))


def is_unix(text: str) -> bool:
    return text.startswith(("unix:", "/"))


def check_settings(settings: CommonSettings, role: str) -> Tls | None:
    """Refuse settings that would serve or dial gRPC over TCP without TLS, or TLS files that
    do not load (TlsError, one line); the process's Tls when configured."""
    if settings.tls_reload_interval <= 0:
        raise TlsError("setting 'tls-reload-interval' must be positive")
    tls = Tls.from_settings(settings, role)
    if tls is not None or settings.insecure:
        return tls
    for name, value in _endpoint_values(settings):
        if not is_unix(value):
            raise TlsError(
                f"setting {name!r} ({value}) is TCP and no certificate is configured: set "
                "'tls-dir' (or 'tls-cert', 'tls-key' and 'tls-ca'), or 'insecure' for plain "
                "text without authentication"
            )
    return None
