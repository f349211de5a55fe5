"""structlog set-up: JSON lines when not on a terminal, console output when on one.

stdlib loggers (grpclib, pyroute2, asyncio) go through the same processors, so every line of
the process looks the same. The level can be raised or lowered at run time.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ["debug", "info", "warning", "error", "critical"]


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]


def configure(level: str = "info", fmt: str = "auto", **bound: str) -> None:
    """Configure structlog and stdlib logging; ``bound`` values go on every line."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_out
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**bound)


def current_level() -> str:
    return logging.getLevelName(logging.getLogger().level).lower()


def shift_level(steps: int) -> str:
    """Move the root level ``steps`` towards debug (negative) or critical; returns the new one."""
    index = LEVELS.index(current_level()) if current_level() in LEVELS else 1
    new = LEVELS[max(0, min(len(LEVELS) - 1, index + steps))]
    logging.getLogger().setLevel(new.upper())
    return new


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)
