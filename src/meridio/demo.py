"""``meridioctl demo``: the control plane on this host, until the full lab exists.

It makes a network namespace, runs ``meridiod --role=nsp`` and ``--role=ipam`` in it with the
example configuration, waits until both are ready, lets a pretend proxy take addresses from the
IPAM and register a target in the NSP, shows what the services report, and removes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
import grpclib.client

from meridio.api.grpc.health.v1 import HealthCheckRequest, HealthStub
from meridio.api.ipam.v1 import Child, IpamStub, IpFamily, Subnet
from meridio.api.nsp.v1 import Conduit, Stream, Target, TargetRegistryStub, TargetStatus, Trench

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config/examples/meridio-configuration.yaml"
NETNS = "meridio-demo"


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@contextlib.contextmanager
def demo_namespace() -> Iterator[str]:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    _sh("ip", "netns", "add", NETNS)
    try:
        _sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
        yield NETNS
    finally:
        pids = subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True, text=True)
        for pid in pids.stdout.split():
            subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


async def _ready(socket_path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket_path.exists():
            channel = grpclib.client.Channel(path=str(socket_path))
            try:
                reply = await HealthStub(channel).check(HealthCheckRequest(service="Readiness"))
                if reply.status.name == "SERVING":
                    return
            except (OSError, grpclib.GRPCError):
                pass
            finally:
                channel.close()
        await asyncio.sleep(0.1)
    raise click.ClickException(f"{socket_path} did not become ready within {timeout}s")


async def _play(work: Path) -> None:
    for role in ("nsp", "ipam"):
        await _ready(work / role / "health.sock")
        click.echo(f"  {role}: Readiness SERVING ({work / role / 'health.sock'})")
    ipam = grpclib.client.Channel(path=str(work / "ipam.sock"))
    nsp = grpclib.client.Channel(path=str(work / "nsp.sock"))
    try:
        conduit = Conduit(name="load-balancer", trench=Trench(name="trench-a"))
        ips = []
        for family in (IpFamily.IPV4, IpFamily.IPV6):
            prefix = await IpamStub(ipam).allocate(
                Child(
                    name="demo-target-src",
                    subnet=Subnet(conduit=conduit, node="node-1", ip_family=family),
                )
            )
            ips.append(f"{prefix.address}/{prefix.prefix_length}")
        click.echo(f"  ipam gave the demo target {', '.join(ips)}")
        target = Target(
            ips=ips,
            context={"identifier": "1"},
            stream=Stream(name="stream-a", conduit=conduit),
        )
        registry = TargetRegistryStub(nsp)
        await registry.register(target)  # stored DISABLED first, as in Meridio
        target.status = TargetStatus.ENABLED
        await registry.register(target)
        click.echo("  nsp registered it (identifier 1 in stream-a) and enabled it")
    finally:
        ipam.close()
        nsp.close()


def run_demo() -> None:
    if shutil.which("ip") is None:
        raise click.ClickException("iproute2 is needed (apt-get install iproute2)")
    meridiod = str(Path(sys.executable).parent / "meridiod")
    meridioctl = str(Path(sys.executable).parent / "meridioctl")
    work = Path(tempfile.mkdtemp(prefix="meridio-demo-"))
    with demo_namespace() as ns:
        click.echo(f"network namespace {ns}; state and sockets in {work}")
        procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        common = ["--log-format=json"]
        for role, extra in (
            ("nsp", [f"--configuration-file={EXAMPLE_CONFIG}"]),
            (
                "ipam",
                ["--trench=trench-a", "--prefix-ipv4=198.18.0.0/16", "--prefix-ipv6=fd00:10::/48"],
            ),
        ):
            log = open(work / f"{role}.log", "wb")  # noqa: SIM115 - lives as long as the process
            command = [
                *("ip", "netns", "exec", ns, meridiod, f"--role={role}", *common),
                f"--run-dir={work / role}",
                f"--database={work / role}.db",
                f"--listen=unix://{work / role}.sock",
                *extra,
            ]
            procs.append((role, subprocess.Popen(command, stdout=log, stderr=log)))
        try:
            asyncio.run(_play(work))
            for cmd in (
                ["nsp", "config", f"--nsp=unix://{work}/nsp.sock"],
                ["nsp", "targets", f"--nsp=unix://{work}/nsp.sock"],
                ["ipam", "list", f"--ipam=unix://{work}/ipam.sock"],
            ):
                click.echo(f"\n$ meridioctl {' '.join(cmd)}")
                subprocess.run([meridioctl, *cmd], check=True)
        finally:
            for _, proc in procs:
                proc.send_signal(signal.SIGTERM)
            for role, proc in procs:
                click.echo(f"stopped {role} (exit {proc.wait(10)})")
    shutil.rmtree(work, ignore_errors=True)
    click.echo("demo done; namespace and files removed")
