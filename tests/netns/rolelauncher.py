"""``python -m tests.netns.rolelauncher``: ``meridiod`` for tests, with every role available.

The daemon finds roles through the ``meridio.roles`` entry point group of the installed
package. Until the ``proxy`` and ``target`` roles are registered there (pyproject.toml), this
launcher falls back to importing them directly; once they are, it is plain ``meridiod``.
"""

from __future__ import annotations

import importlib

import meridio.daemon
from meridio.roles import base

FALLBACK = {
    "proxy": ("meridio.roles.proxy", "ProxyRole"),
    "target": ("meridio.roles.target", "TargetRole"),
}


def load_role(name: str) -> type[base.Role]:
    try:
        return base.load_role(name)
    except LookupError:
        if name not in FALLBACK:
            raise
        module, attr = FALLBACK[name]
        cls: type[base.Role] = getattr(importlib.import_module(module), attr)
        return cls


meridio.daemon.load_role = load_role

if __name__ == "__main__":
    meridio.daemon.main()
