"""Settings: flags over ``MERIDIOD_*`` environment variables over a YAML file over defaults.

Every role declares a settings class (a msgspec Struct with kebab-case names) that extends
:class:`CommonSettings`. Values from the environment and flags arrive as strings and are
converted to the declared types; anything unknown or ill-typed is a :class:`SettingsError`
that names the setting and where the value came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

ENV_PREFIX = "MERIDIOD_"
# Variables that choose what runs rather than configure it.
RESERVED_ENV = {"MERIDIOD_ROLE", "MERIDIOD_CONFIG"}

S = TypeVar("S", bound="CommonSettings")


class SettingsError(Exception):
    """A setting is unknown, ill-typed or unreadable; the message is one line for the user."""


class CommonSettings(msgspec.Struct, kw_only=True, rename="kebab", forbid_unknown_fields=True):
    """Settings every role has."""

    run_dir: str = ""
    """Directory for sockets such as health.sock; default /run/meridio/<role>."""
    instance: str = ""
    """Name of this instance in logs and registrations; default the host name."""
    log_level: str = "info"
    log_format: str = "auto"
    health_listen: str = ""
    """Also serve grpc.health.v1 on this TCP host:port (the unix socket is always served)."""
    metrics_listen: str = ""
    """Serve Prometheus metrics on this host:port; empty means off."""
    drain_timeout: float = 5.0
    """Seconds the role may spend draining after SIGTERM before it is cancelled."""
    max_message_bytes: int = 4 * 1024 * 1024
    # -- mutual TLS (docs/security.md); unix sockets never use it
    insecure: bool = False
    """Plain-text gRPC on TCP, without certificates or authorization (quick starts only);
    ignored when certificates are configured."""
    tls_dir: str = ""
    """Directory with tls.crt, tls.key, ca.crt (cert-manager) or svid.pem, svid_key.pem,
    bundle.pem (spiffe-helper)."""
    tls_cert: str = ""
    """This process's certificate (an X509-SVID; overrides tls-dir's)."""
    tls_key: str = ""
    tls_ca: str = ""
    """Trust bundle: the CA certificates peers' certificates must chain to."""
    trust_domain: str = ""
    """SPIFFE trust domain of peers; default: that of this process's certificate."""
    tls_roles: str = ""
    """Extra SPIFFE ID paths that name roles: PATH=ROLE,... (``*`` matches one segment)."""
    tls_reload_interval: float = 5.0
    """Seconds between checks of the TLS files for a change."""
    health_plaintext: bool = False
    """Serve health-listen in plain text even with TLS (the kubelet's gRPC probes cannot
    present a certificate); it serves only grpc.health.v1."""


def setting_names(cls: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(cls)}


def _normalise(key: str) -> str:
    return key.strip().lower().replace("_", "-")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml  # only when there is a file: a role started from flags does not load it

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SettingsError(f"config file {path} is not valid YAML{where}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of settings")
    return {_normalise(str(k)): v for k, v in data.items()}


def from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {
        _normalise(key[len(ENV_PREFIX) :]): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and key not in RESERVED_ENV
    }


def parse_flag_args(args: list[str]) -> dict[str, str]:
    """Parse ``--name=value`` / ``--name value`` / ``--flag`` (true) / ``--no-flag`` (false)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise SettingsError(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            elif name.startswith("no-"):
                name, value = name[3:], "false"
            else:
                value = "true"
        out[_normalise(name)] = value
        i += 1
    return out


def _describe(source: str, key: str) -> str:
    if source == "environment":
        return f"environment variable {ENV_PREFIX}{key.upper().replace('-', '_')}"
    if source == "flags":
        return f"flag --{key}"
    return f"key {key!r} in {source}"


_MSGSPEC_PATH = re.compile(r"`\$\.([^`\[]+)")


def load_settings(
    cls: type[S],
    *,
    file: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> S:
    """Merge the layers (later wins: defaults, file, environment, flags) into ``cls``."""
    layers: list[tuple[str, Mapping[str, Any]]] = [("defaults", dict(defaults or {}))]
    if file:
        layers.append((f"config file {file}", read_yaml(file)))
    layers.append(("environment", from_environment(environ if environ is not None else {})))
    layers.append(("flags", {_normalise(k): v for k, v in (flags or {}).items()}))
    known = setting_names(cls)
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in layers:
        for key, value in values.items():
            if key not in known:
                choices = ", ".join(sorted(known))
                raise SettingsError(
                    f"unknown setting {key!r} ({_describe(source, key)}); known: {choices}"
                )
            merged[key] = value
            origin[key] = source
    try:
        return msgspec.convert(merged, cls, strict=False)
    except msgspec.ValidationError as exc:
        match = _MSGSPEC_PATH.search(str(exc))
        key = match.group(1) if match else "?"
        where = _describe(origin.get(key, "defaults"), key)
        reason = str(exc).split(" - at ")[0]
        raise SettingsError(f"bad value for setting {key!r} ({where}): {reason}") from exc
