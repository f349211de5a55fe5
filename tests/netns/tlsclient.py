"""TLS clients for daemons listening on TCP inside a test's namespace, and credentials for them.

The test process stays in the host's namespace; each connection is made by a short-lived thread
that enters the daemon's namespace (``setns`` changes only the calling thread's), connects, and
hands the socket to asyncio. Credentials come from :mod:`meridio.pki` (a CA per test).
"""

from __future__ import annotations

import ctypes
import datetime
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpclib.client

from meridio import pki
from meridio.runtime.grpc import LimitedCodec
from meridio.runtime.tls import Tls, TlsChannel, resolve_paths

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_socket(netns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP socket connected to ``host:port`` inside namespace ``netns`` (non-blocking)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with open(f"/run/netns/{netns}", "rb") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            sock = socket.create_connection((host, port), timeout)
            sock.setblocking(False)
            out["sock"] = sock
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    sock: socket.socket = out["sock"]
    return sock


class NsChannel(grpclib.client.Channel):
    """A grpclib channel into a namespace, plain or with a given SSL context."""

    def __init__(self, netns: str, host: str, port: int, ssl_context: Any = None) -> None:
        super().__init__(host, port, ssl=ssl_context, codec=LimitedCodec())
        self.netns = netns

    async def _create_connection(self) -> Any:
        sock = netns_socket(self.netns, self._host, self._port)
        _, protocol = await self._loop.create_connection(
            self._protocol_factory,
            sock=sock,
            ssl=self._ssl,
            server_hostname="" if self._ssl else None,
        )
        return protocol


class NsTlsChannel(TlsChannel):
    """The runtime's mutual-TLS channel (current credentials, server role checked), into a
    namespace."""

    def __init__(self, netns: str, host: str, port: int, tls: Tls) -> None:
        super().__init__(host, port, tls=tls, codec=LimitedCodec())
        self.netns = netns

    async def _open(self) -> Any:
        sock = netns_socket(self.netns, self._host, self._port)
        _, protocol = await self._loop.create_connection(
            self._protocol_factory, sock=sock, ssl=self._ssl, server_hostname=""
        )
        return protocol


def client_context(
    cert: Path | None, key: Path | None, bundle: Path, *, alpn: bool = True
) -> ssl.SSLContext:
    """A client context as a foreign client would make it (no checks of our own)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(bundle)
    if alpn:
        ctx.set_alpn_protocols(["h2"])
    return ctx


@dataclass
class Authority:
    """A CA of a test, issuing role certificates into directories (tls.crt layout)."""

    ca: pki.Ca
    root: Path

    @classmethod
    def make(cls, root: Path, trust_domain: str = pki.DEFAULT_TRUST_DOMAIN) -> Authority:
        root.mkdir(parents=True, exist_ok=True)
        return cls(pki.make_ca(trust_domain), root)

    def issue(
        self,
        name: str,
        spiffe_id: str,
        *,
        bundle: bytes | None = None,
        days: float = 30,
        not_before: datetime.datetime | None = None,
        out: Path | None = None,
    ) -> Path:
        cert, key = pki.make_svid(self.ca, spiffe_id, days=days, not_before=not_before)
        target = out or self.root / name
        pki.write_credentials(
            target, pki.cert_pem(cert), pki.key_pem(key), bundle if bundle else self.ca.pem
        )
        return target

    def role(self, role: str, name: str, **kwargs: Any) -> Path:
        return self.issue(
            f"{role}-{name}", f"spiffe://{self.ca.trust_domain}/meridio/{role}/{name}", **kwargs
        )


def load_tls(directory: Path, role: str | None = None, trust_domain: str = "") -> Tls:
    """The runtime's TLS of a client with the credentials in ``directory`` (whatever they
    name: tests present wrong ones on purpose)."""
    paths = resolve_paths(str(directory))
    assert paths is not None
    return Tls(paths, role, trust_domain=trust_domain, reload_interval=0.1, check_own=False)


async def fetch_metrics(netns: str, host: str, port: int) -> str:
    """The text of ``/metrics`` served inside ``netns``."""
    import asyncio

    sock = netns_socket(netns, host, port)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data.decode(errors="replace").split("\r\n\r\n", 1)[-1]


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name`` samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
