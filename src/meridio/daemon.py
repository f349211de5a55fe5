"""``meridiod``: load one role plugin onto the shared runtime and run it.

Exit status: 0 after a graceful stop (SIGTERM/SIGINT), 2 for a usage or settings error (nothing
is started), 1 when the role fails.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click
import trio

from meridio import __version__, lean
from meridio.roles.base import Role, load_role
from meridio.settings import CommonSettings, SettingsError, load_settings, parse_flag_args

if TYPE_CHECKING:
    from meridio.runtime import Runtime
    from meridio.runtime.tls import Tls

# The runtime (trio-asyncio, grpclib, pyroute2, structlog) is imported once a role is about to
# run, after meridio.lean has had its say: importing this module stays cheap, and
# `meridiod --version` answers at once.

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def fail(message: str) -> NoReturn:
    click.echo(f"meridiod: error: {message}", err=True)
    sys.exit(2)


async def supervise(
    role: Role[Any], runtime: Runtime, settings: CommonSettings, started: trio.Event | None = None
) -> None:
    """Run the role, react to signals, and shut down gracefully on SIGTERM/SIGINT."""
    from meridio.runtime import logs

    log = runtime.log
    with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
        async with trio.open_nursery() as role_nursery:
            await role_nursery.start(role.run)
            runtime.health.start()
            if started is not None:
                started.set()
            log.info("role started", version=__version__, health=str(runtime.health_socket))
            lean.trim()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("reload requested")
                    if runtime.tls is not None:
                        runtime.tls.poll()  # TLS files now rather than at the next poll
                    role_nursery.start_soon(role.reload)
                elif signum == signal.SIGUSR1:
                    log.warning("log level changed", new_level=logs.shift_level(-1))
                elif signum == signal.SIGUSR2:
                    log.warning("log level changed", new_level=logs.shift_level(+1))
                else:
                    log.info("shutting down", signal=signal.Signals(signum).name)
                    break
            runtime.health.begin_shutdown()
            with trio.move_on_after(settings.drain_timeout) as drain_scope:
                await role.drain()
            if drain_scope.cancelled_caught:
                log.warning("drain timed out", timeout=settings.drain_timeout)
            role_nursery.cancel_scope.cancel()
    log.info("stopped")


async def run_role(
    role_cls: type[Role[Any]], settings: CommonSettings, tls: Tls | None = None
) -> None:
    from meridio.runtime import open_runtime, systemd

    notifier = systemd.Notifier.from_environ(os.environ)  # None unless run as Type=notify
    async with open_runtime(role_cls.name, settings, tls) as runtime:
        started = trio.Event()
        if notifier is not None:
            runtime.start_soon(systemd.report, runtime.health, notifier, started)
        role = role_cls(settings, runtime)
        await supervise(role, runtime, settings, started)


@click.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": ["-h", "--help"],
    },
    epilog="Any other --NAME=VALUE is a setting of the role; see the README for the list.",
)
@click.option("--role", envvar="MERIDIOD_ROLE", help="lb, proxy, target, ipam or nsp.")
@click.option("--config", "config_file", envvar="MERIDIOD_CONFIG", help="YAML file of settings.")
@click.version_option(__version__, prog_name="meridiod")
@click.pass_context
def cli(ctx: click.Context, role: str | None, config_file: str | None) -> None:
    """Run one meridio role on the shared runtime."""
    if not role:
        fail("no role given: use --role=ROLE or MERIDIOD_ROLE")
    try:
        role_cls = load_role(role)
    except LookupError as exc:
        fail(str(exc))
    from meridio.runtime import logs

    try:
        flags = parse_flag_args(list(ctx.args))
        settings = load_settings(
            role_cls.Settings, file=config_file, environ=os.environ, flags=flags
        )
        logs.configure(
            settings.log_level,
            settings.log_format,
            role=role,
            instance=settings.instance or os.uname().nodename,
        )
        role_cls.check_settings(settings)
        from meridio.runtime.tls import check_settings as check_tls

        tls = check_tls(settings, role_cls.name)
    except (SettingsError, ValueError) as exc:
        fail(str(exc))
    lean.loaded()
    try:
        trio.run(run_role, role_cls, settings, tls)
    except* SettingsError as group:  # plain text refused by the gRPC stack, for one
        fail(str(group.exceptions[0]))


def main() -> None:
    lean.install()
    cli(prog_name="meridiod")


if __name__ == "__main__":
    main()
