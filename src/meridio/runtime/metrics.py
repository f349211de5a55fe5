"""The process-wide Prometheus registry and its optional HTTP endpoint (off by default).

prometheus-client is loaded on first use of :data:`REGISTRY` (a role that defines metrics, or
the endpoint), so a role without metrics of its own (the target) does not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    REGISTRY: CollectorRegistry

_registry: CollectorRegistry | None = None


def registry() -> CollectorRegistry:
    """The process-wide registry (also importable as ``REGISTRY``)."""
    global _registry
    if _registry is None:
        from prometheus_client import CollectorRegistry

        _registry = CollectorRegistry(auto_describe=True)
    return _registry


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":
        return registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def split_hostport(listen: str, default_host: str = "::") -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port`` or ``:port``; raise ValueError with the bad value."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not host:port")
    host = host.strip("[]") or default_host
    return host, int(port)


def start_metrics_server(listen: str) -> None:
    """Serve ``/metrics`` on ``listen`` from a daemon thread (prometheus-client's own server)."""
    import prometheus_client

    host, port = split_hostport(listen)
    prometheus_client.start_http_server(port, addr=host, registry=registry())
