"""Before ``meridiod`` imports its libraries: load only what a role uses.

A target runs beside every application, so what the daemon holds counts. Three libraries load
much more than meridio uses when imported the ordinary way; :func:`install` (the first thing
``meridiod`` does, before a role is loaded) changes how, and nothing else:

* **pyroute2**: the package's ``__init__`` imports every part of pyroute2 (IPDB, NDB with
  sqlite3, wireless, WireGuard, ...: about 5 MB). The package is made importable without running
  it: its modules import as usual, ``pyroute2.AsyncIPRoute`` (what meridio uses) comes straight
  from its module, and the first use of any other name the ``__init__`` defines runs it then.
* **rich**: structlog uses it, when installed, for pretty tracebacks on a terminal; daemon logs
  do not need it (about 2 MB). It stays importable in other programs (``meridioctl``).
* **unittest**: pyroute2's socket module makes one ``unittest.mock.Mock()`` at import (a
  placeholder for a remote-namespace proxy meridio never uses), which loads unittest with
  difflib, pprint and argparse (about 1 MB). While ``AsyncIPRoute`` is imported, a stand-in
  module gives it a placeholder that loads the real ``Mock`` on first use; the stand-in is gone
  afterwards, so a later ``import unittest.mock`` gets the real module.
* **betterproto** reads its own version from the installed distributions' metadata, which loads
  ``importlib.metadata`` (email, csv, zipfile: about 6 MB); the version is read from the name
  of its ``dist-info`` directory instead.

``meridio.roles.base`` does its part: the built-in roles load without reading entry points.

Imports make many objects and little garbage, and the cyclic garbage collector's passes over
them while they are made take about a sixth of a role's start: :func:`install` turns it off,
:func:`loaded` (the modules are in) turns it on again for what is made from then on, and once
the role has started :func:`trim` collects everything once, hands the memory freed while
starting back to the system, and leaves what survived (modules, classes, the role's own
state: some fifty thousand objects that live as long as the process) out of later passes.
Without that, every full pass walks all of them again: a proxy with a thousand targets spends
about a third less in full passes (0.16 s each before, every twenty seconds or so).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _pyroute2() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    ran = False

    def __getattr__(name: str) -> Any:
        nonlocal ran
        if name == "AsyncIPRoute":
            with _mock_stand_in():
                from pyroute2.iproute.linux import AsyncIPRoute

            return AsyncIPRoute
        if name.startswith("__"):
            raise AttributeError(name)
        try:  # a module of the package (``from pyroute2 import config``)
            return importlib.import_module(f"pyroute2.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pyroute2.{name}":
                raise
        if not ran:  # a name of the package's own: run its __init__ now, as usual
            ran = True
            loader.exec_module(package)
            return getattr(package, name)
        raise AttributeError(f"module 'pyroute2' has no attribute {name!r}")

    package.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules["pyroute2"] = package
    importlib.import_module("pyroute2.config.log")  # the logger set-up the __init__ does


class _LazyMock:
    """Stands for a ``unittest.mock.Mock()``: the real one is made on first use."""

    def __getattr__(self, name: str) -> Any:
        real = self.__dict__.get("_real")
        if real is None:
            from unittest import mock

            real = self.__dict__["_real"] = mock.Mock()
        return getattr(real, name)


@contextlib.contextmanager
def _mock_stand_in() -> Iterator[None]:
    """``from unittest import mock`` gets a module with only :class:`_LazyMock` as ``Mock``
    meanwhile (unless unittest is already loaded)."""
    if "unittest" in sys.modules or "unittest.mock" in sys.modules:
        yield
        return
    package = types.ModuleType("unittest")
    package.__path__ = []
    mock = types.ModuleType("unittest.mock")
    mock.Mock = _LazyMock  # type: ignore[attr-defined]
    package.mock = mock  # type: ignore[attr-defined]
    sys.modules["unittest"], sys.modules["unittest.mock"] = package, mock
    try:
        yield
    finally:
        for name, stand_in in (("unittest.mock", mock), ("unittest", package)):
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


def _no_rich() -> None:
    if "rich" not in sys.modules and "structlog" not in sys.modules:
        sys.modules["rich"] = None  # type: ignore[assignment]  # import rich: ImportError


def _betterproto_version() -> None:
    name = "betterproto._version"
    if name in sys.modules or "betterproto" in sys.modules:
        return
    spec = importlib.util.find_spec("betterproto")
    version = "unknown"
    if spec is not None and spec.origin:
        site = Path(spec.origin).parent.parent
        found = sorted(site.glob("betterproto-*.dist-info"))
        if found:
            version = found[-1].name[len("betterproto-") : -len(".dist-info")]
    module = types.ModuleType(name)
    module.__version__ = version  # type: ignore[attr-defined]
    sys.modules[name] = module


def loaded() -> None:
    """The role's modules are imported: the collector runs again, leaving what was made so far
    (``gc.freeze``) to :func:`trim`."""
    gc.freeze()
    gc.enable()


def trim() -> None:
    """Collect garbage, return free heap pages to the system (glibc's ``malloc_trim``) and
    freeze what is left (``gc.freeze``: later passes of the collector skip it; it is freed
    as usual when nothing refers to it any more, only a reference cycle among it would stay)."""
    import ctypes

    gc.unfreeze()
    gc.enable()
    gc.collect()
    # the running program's symbols, libc's among them (find_library would run ldconfig)
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)
    gc.freeze()


def install() -> None:
    """For the daemon's process only (other programs keep their imports as they are); the
    daemon calls :func:`loaded`, then :func:`trim`, later."""
    gc.disable()
    _pyroute2()
    _no_rich()
    _betterproto_version()
