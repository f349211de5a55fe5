"""What a role plugin is: a class registered under the ``meridio.roles`` entry point group."""

from __future__ import annotations

import abc
import importlib
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar

import trio

from meridio.settings import CommonSettings

if TYPE_CHECKING:
    from meridio.runtime import Runtime

S = TypeVar("S", bound=CommonSettings)

ENTRY_POINT_GROUP = "meridio.roles"
BUILTIN_ROLES: Final = {
    "ipam": "meridio.roles.ipam:IpamRole",
    "nsp": "meridio.roles.nsp:NspRole",
    "lb": "meridio.roles.lb:LbRole",
    "proxy": "meridio.roles.proxy:ProxyRole",
    "target": "meridio.roles.target:TargetRole",
}
"""The roles this package registers in the entry point group (pyproject.toml; a test keeps the
two equal). They load without reading the installed distributions' metadata, which costs a
daemon about 6 MB (``importlib.metadata``); other names are looked up among the entry points."""
EXTRAS: Final = {"netfilterqueue": ("NetfilterQueue", "lb")}
"""Modules a role may import that come with an extra of the package (pyproject.toml), not
with every install: module -> (distribution, extra). The LB binds an NFQUEUE queue in every
mode (all of them in nfqueue and first-packet modes, one for what the kernel hands up in
kernel mode), so it needs NetfilterQueue; no other role does."""


class Role(abc.ABC, Generic[S]):
    """A role runs on the shared runtime until cancelled.

    ``run`` calls ``task_status.started()`` once it serves; ``drain`` is called after SIGTERM
    (readiness is already NOT_SERVING) and is bounded by the ``drain-timeout`` setting;
    ``reload`` is called on SIGHUP.

    ``S`` is the role's settings type and ``Settings`` the same class (what the daemon parses
    the configuration into, so ``__init__`` and ``check_settings`` get an ``S``; a class
    variable cannot name ``S`` itself).
    """

    name: ClassVar[str]
    Settings: ClassVar[type[CommonSettings]] = CommonSettings

    def __init__(self, settings: S, runtime: Runtime) -> None:
        self.settings: S = settings
        self.runtime = runtime

    @classmethod
    def check_settings(cls, settings: S) -> None:
        """Refuse settings that parse but cannot work (ValueError naming the setting)."""

    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""

    async def drain(self) -> None:
        """Finish in-flight work before exit (unregister, withdraw, let clients move)."""

    async def reload(self) -> None:
        """Re-read configuration files (SIGHUP)."""


def available_roles() -> dict[str, object]:
    """Role name -> entry point, for every installed plugin."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_role(name: str) -> type[Role[Any]]:
    if name in BUILTIN_ROLES:
        module, _, attr = BUILTIN_ROLES[name].partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            missing = EXTRAS.get((exc.name or "").partition(".")[0])
            if missing is None:
                raise
            distribution, extra = missing
            raise LookupError(
                f"role {name!r} needs {distribution}, which is not installed: "
                f"pip install 'meridio[{extra}]'"
            ) from exc
    else:
        roles = available_roles()
        if name not in roles:
            known = sorted({*roles, *BUILTIN_ROLES})
            raise LookupError(f"unknown role {name!r}; available roles: {', '.join(known)}")
        cls = roles[name].load()  # type: ignore[attr-defined]
    if not (isinstance(cls, type) and issubclass(cls, Role)):
        raise LookupError(f"entry point for role {name!r} is not a meridio Role class")
    return cls
