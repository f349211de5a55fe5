"""Run every benchmark: ``python -m bench`` (what ``make bench`` does).

Each ``bench/bench_*.py`` module has a ``main()`` that prints its own table, with ratios
against a baseline measured in the same run.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main() -> None:
    wanted = set(sys.argv[1:])
    here = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if not info.name.startswith("bench_"):
            continue
        if wanted and info.name not in wanted and info.name[len("bench_") :] not in wanted:
            continue
        print(f"\n=== {info.name} ===", flush=True)
        started = time.monotonic()
        importlib.import_module(f"bench.{info.name}").main()
        print(f"({info.name} took {time.monotonic() - started:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
