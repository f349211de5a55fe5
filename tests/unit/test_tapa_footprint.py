"""The target runs beside every application: what ``meridiod --role=target`` loads.

Each check runs in a fresh interpreter, the way ``meridiod`` starts (meridio.lean first).
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

from meridio.roles.base import BUILTIN_ROLES, ENTRY_POINT_GROUP


def python(code: str) -> object:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_the_target_role_loads_only_what_it_uses() -> None:
    unused = [
        "rich",  # structlog's pretty tracebacks
        "sqlite3",  # pyroute2's NDB
        "pyroute2.ndb.main",
        "pyroute2.ipdb",
        "importlib.metadata",  # betterproto's version, entry points
        "prometheus_client",  # no metrics of its own
        "yaml",  # no settings file
        "meridio.connect.endpoint",  # the target is a client only
        "numpy",
    ]
    loaded = python(
        "import json, sys\n"
        "from meridio import lean\n"
        "lean.install()\n"
        "import meridio.daemon, meridio.runtime\n"
        "meridio.daemon.load_role('target')\n"
        f"print(json.dumps([m for m in {unused!r} if sys.modules.get(m) is not None]))\n"
    )
    assert loaded == []


def test_pyroute2_without_its_init_still_offers_everything() -> None:
    result = python(
        "import json, sys\n"
        "from meridio import lean\n"
        "lean.install()\n"
        "from pyroute2 import AsyncIPRoute, config\n"
        "from pyroute2.netlink.exceptions import NetlinkError\n"
        "lean_ok = 'pyroute2.ndb.main' not in sys.modules\n"
        "from pyroute2 import IPRoute, NDB\n"
        "import pyroute2\n"
        "print(json.dumps([lean_ok, AsyncIPRoute.__name__, IPRoute.__name__,\n"
        "                  pyroute2.AsyncIPRoute is AsyncIPRoute, bool(pyroute2.__version__)]))\n"
    )
    assert result == [True, "AsyncIPRoute", "IPRoute", True, True]


def test_pyroute2_loads_without_unittest_and_its_mock_still_works() -> None:
    result = python(
        "import json, sys\n"
        "from meridio import lean\n"
        "lean.install()\n"
        "from pyroute2 import AsyncIPRoute\n"
        "without = 'unittest' not in sys.modules and 'difflib' not in sys.modules\n"
        "from pyroute2.netlink.rtnl.iprsocket import NotLocal\n"
        "NotLocal.msg_queue.put(1)\n"  # the placeholder becomes a real Mock on first use
        "from unittest import mock\n"  # and the real module is importable afterwards
        "print(json.dumps([without, NotLocal.msg_queue.put.call_count,\n"
        "                  isinstance(mock.Mock(), mock.NonCallableMock)]))\n"
    )
    assert result == [True, 1, True]


def test_betterproto_still_knows_its_version() -> None:
    version = python(
        "import json\n"
        "from meridio import lean\n"
        "lean.install()\n"
        "import betterproto\n"
        "print(json.dumps(betterproto.__version__))\n"
    )
    real = python(
        "import json\nfrom importlib.metadata import version\n"
        "print(json.dumps(version('betterproto')))\n"
    )
    assert version == real


def test_builtin_roles_are_the_registered_entry_points() -> None:
    registered = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert registered == BUILTIN_ROLES


def test_no_garbage_collection_while_loading_and_all_of_it_after_start() -> None:
    result = python(
        "import gc, json\n"
        "from meridio import lean\n"
        "lean.install()\n"
        "off = not gc.isenabled()\n"
        "import meridio.daemon, meridio.runtime\n"
        "meridio.daemon.load_role('target')\n"
        "lean.loaded()\n"
        "frozen = gc.isenabled() and gc.get_freeze_count() > 0\n"
        "class Cycle:\n"
        "    pass\n"
        "c = Cycle(); c.me = c; del c\n"  # garbage made while starting, frozen so far
        "lean.trim()\n"
        "kept = gc.isenabled() and gc.get_freeze_count() > 0\n"  # what survived: left out
        "gc.unfreeze()\n"
        "collected = not any(type(o) is Cycle for o in gc.get_objects())\n"
        "print(json.dumps([off, frozen, collected, kept]))\n"
    )
    assert result == [True, True, True, True]
