"""The process-wide Prometheus registry and its optional HTTP endpoint (off by default)."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry

REGISTRY = CollectorRegistry(auto_describe=True)


def split_hostport(listen: str, default_host: str = "::") -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port`` or ``:port``; raise ValueError with the bad value."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not host:port")
    host = host.strip("[]") or default_host
    return host, int(port)


def start_metrics_server(listen: str) -> None:
    """Serve ``/metrics`` on ``listen`` from a daemon thread (prometheus-client's own server)."""
    host, port = split_hostport(listen)
    prometheus_client.start_http_server(port, addr=host, registry=REGISTRY)
