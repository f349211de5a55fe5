"""The container image, built and run for real with podman.

The image is built from containers/Containerfile on a Debian base: ``$MERIDIO_BASE_IMAGE`` if
set, else ``localhost/debian:bookworm-slim`` (made once by containers/make-base-image.sh with
debootstrap, and kept), else the public ``debian:bookworm-slim`` if a registry answers. Then an
``ipam`` and an ``nsp`` container run as the Kubernetes manifests run them (read-only root file
system, every capability dropped, a non-root user, no network but loopback) and answer their
health checks and gRPC calls, and an ``lb`` beside the NSP installs its data path with
CAP_NET_ADMIN alone.

Skipped, with the reason, where podman is missing or cannot run a container on this machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meridio import __version__
from meridio.api.ipam.v1 import Child, IpamStub, IpFamily, Subnet
from meridio.api.nsp.v1 import Conduit, Trench
from tests.netns.daemons import SERVING, channel, health_status, run_async

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "containers" / "Containerfile"
MAKE_BASE = REPO / "containers" / "make-base-image.sh"
LOCAL_BASE = "localhost/debian:bookworm-slim"
PUBLIC_BASE = "docker.io/library/debian:bookworm-slim"
CONFIGURATION = REPO / "config" / "examples" / "meridio-configuration.yaml"
UID = 10002  # the image's meridio user, as the Kubernetes manifests run IPAM and NSP
# This machine's pip may trust a TLS-intercepting proxy; the build gets the same CA bundle.
CA_BUNDLES = (os.environ.get("PIP_CERT", ""), "/etc/ssl/certs/ca-certificates.crt")


@dataclass
class Podman:
    """podman with the options this machine needs, for one test session."""

    env: dict[str, str]
    runtime: list[str]
    base: str = ""

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc)")
    if os.geteuid() != 0:
        pytest.skip("the container test runs rootful podman: it needs root")
    # Containers inherit podman's default file limit, which may exceed this machine's hard
    # limit (setrlimit: EPERM); crun cannot run here at all (cgroups in hybrid mode), runc can.
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    runtime = ["--runtime", "runc"] if shutil.which("runc") else []
    pm = Podman(env, runtime)
    info = pm("info", check=False, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: podman info: {_first_line(info.stderr)}")
    pm.base = _base_image(pm)
    probe = pm("run", "--rm", *runtime, "--network", "none", pm.base, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {_first_line(probe.stderr)}")
    return pm


def _base_image(pm: Podman) -> str:
    wanted = os.environ.get("MERIDIO_BASE_IMAGE")
    if wanted:
        if pm("image", "exists", wanted, check=False).returncode != 0:
            pm("pull", wanted, timeout=300)
        return wanted
    if pm("image", "exists", LOCAL_BASE, check=False).returncode == 0:
        return LOCAL_BASE
    if shutil.which("debootstrap"):
        made = subprocess.run(
            ["sh", str(MAKE_BASE), LOCAL_BASE],
            env=pm.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if made.returncode != 0:
            raise AssertionError(f"{MAKE_BASE} failed:\n{made.stdout[-2000:]}{made.stderr[-2000:]}")
        return LOCAL_BASE
    pulled = pm("pull", PUBLIC_BASE, check=False, timeout=300)
    if pulled.returncode != 0:
        pytest.skip(
            f"no Debian base image: {PUBLIC_BASE} cannot be pulled "
            f"({_first_line(pulled.stderr)}) and debootstrap is not installed to make one"
        )
    return PUBLIC_BASE


@pytest.fixture(scope="module")
def image(podman: Podman) -> Iterator[str]:
    """Build the image (no layer cache: every run builds what a user would)."""
    tag = f"localhost/meridio:test-{os.getpid()}"
    args = ["build", "--layers=false", "--network", "host", *podman.runtime]
    bundle = next((b for b in CA_BUNDLES if b and Path(b).is_file()), None)
    if bundle:
        args += ["--secret", f"id=pip-cert,src={bundle}"]
    args += ["--build-arg", f"BASE={podman.base}", "-f", str(CONTAINERFILE), "-t", tag, str(REPO)]
    podman(*args, timeout=1500)
    try:
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


def test_version(podman: Podman, image: str) -> None:
    out = podman("run", "--rm", *podman.runtime, "--network", "none", image, "--version")
    assert out.stdout.strip() == f"meridiod, version {__version__}"


def test_final_stage_has_no_compilers_and_has_the_tools(podman: Podman, image: str) -> None:
    script = (
        "for t in gcc cc pip; do command -v $t && exit 1; done; "
        "for t in ip nft iptables ip6tables conntrack bird birdc meridiod meridioctl; do "
        "command -v $t >/dev/null || { echo missing $t; exit 2; }; done; "
        "python3 -c 'import netfilterqueue, meridio.roles.lb' && "
        # the daemons' extras only: rich is the cli extra's
        "{ ! python3 -c 'import rich' 2>/dev/null || { echo rich in the image; exit 3; }; } && "
        # BIRD 2, the LB's frontend, runs (its libraries are there).
        "bird --version 2>&1 | grep -q 'BIRD version 2\\.' && test -d /run/bird"
    )
    out = podman(
        "run", "--rm", *podman.runtime, "--network", "none", "--entrypoint", "sh", image,
        "-c", script, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


@dataclass
class Container:
    name: str
    run: Path  # mounted at /run/meridio

    def health_socket(self, role: str) -> Path:
        return self.run / role / "health.sock"


def start(
    podman: Podman,
    image: str,
    role: str,
    run: Path,
    *args: str,
    env: dict[str, str],
    user: int = UID,
    capabilities: tuple[str, ...] = (),
    network: str = "none",
) -> Container:
    """Run a role as the manifests do: read-only, every capability dropped but ``capabilities``,
    no network but its own loopback (or another container's namespace)."""
    run.mkdir(exist_ok=True)
    os.chown(run, user, user)
    name = f"meridio-test-{os.getpid()}-{role}-{secrets.token_hex(3)}"
    added = [f"--cap-add={c}" for c in capabilities]
    # plain text between the containers: mutual TLS is tested in tests/netns/test_tls.py
    defaults = {"MERIDIOD_ROLE": role, "MERIDIOD_INSECURE": "true", "MERIDIOCTL_INSECURE": "true"}
    environment = [f"--env={k}={v}" for k, v in {**defaults, **env}.items()]
    podman(
        "run", "--detach", "--name", name, *podman.runtime,
        f"--network={network}", "--read-only", "--cap-drop=ALL", *added,
        "--security-opt=no-new-privileges", f"--user={user}:{user}",
        f"--volume={run}:/run/meridio", *args, *environment, image,
    )  # fmt: skip
    return Container(name, run)


def data_volume(path: Path) -> str:
    """A host directory for /var/lib/meridio, writable by the image's meridio user."""
    path.mkdir(exist_ok=True)
    os.chown(path, UID, UID)
    return f"--volume={path}:/var/lib/meridio"


def wait_ready(podman: Podman, container: Container, role: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while run_async(health_status(container.health_socket(role), "Readiness")) != SERVING:
        state = podman("inspect", "--format", "{{.State.Status}}", container.name).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            logs = podman("logs", container.name, check=False)
            raise AssertionError(
                f"{role} container not ready ({state}):\n{logs.stdout}\n{logs.stderr}"
            )
        time.sleep(0.2)


def exec_probe(podman: Podman, container: Container, role: str) -> None:
    """The exec probe a manifest could use instead of the gRPC one."""
    socket = f"/run/meridio/{role}/health.sock"
    out = podman("exec", container.name, "meridioctl", "health", "--socket", socket)
    assert out.stdout.count("SERVING") == 3, out.stdout


def stop(podman: Podman, container: Container) -> int:
    """SIGTERM (podman stop), then the exit status of meridiod (PID 1 in the container)."""
    podman("stop", "--time", "30", container.name, timeout=60)
    return int(podman("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout)


@pytest.fixture
def containers(podman: Podman) -> Iterator[list[Container]]:
    made: list[Container] = []
    try:
        yield made
    finally:
        for container in made:
            podman("rm", "--force", "--time", "0", container.name, check=False)


IPAM_ENV = {
    "MERIDIOD_LISTEN": "unix:///run/meridio/ipam.sock",
    "MERIDIOD_PREFIX_IPV4": "198.18.0.0/16",
    "MERIDIOD_PREFIX_IPV6": "fd00:10::/48",
}


def test_ipam_container(
    podman: Podman, image: str, tmp_path: Path, containers: list[Container]
) -> None:
    run, data = tmp_path / "ipam-run", data_volume(tmp_path / "ipam-data")
    ipam = start(podman, image, "ipam", run, data, env=IPAM_ENV)
    containers.append(ipam)
    wait_ready(podman, ipam, "ipam")
    exec_probe(podman, ipam, "ipam")

    child = Child(
        name="target-1",
        subnet=Subnet(
            conduit=Conduit(name="conduit-a", trench=Trench(name="trench-a")),
            node="node-1",
            ip_family=IpFamily.IPV4,
        ),
    )

    async def allocate() -> str:
        async with channel(run / "ipam.sock") as ch:
            prefix = await IpamStub(ch, timeout=10).allocate(child)
            return f"{prefix.address}/{prefix.prefix_length}"

    first = run_async(allocate())
    assert first.startswith("198.18.")
    listing = podman(
        "exec", ipam.name, "meridioctl", "ipam", "list",
        "--ipam", "unix:///run/meridio/ipam.sock", "-o", "json",
    )  # fmt: skip
    assert "target-1" in listing.stdout
    assert stop(podman, ipam) == 0
    assert (tmp_path / "ipam-data" / "ipam.db").exists()

    # A new container on the same volume gives the same name the same address.
    again = start(podman, image, "ipam", run, data, env=IPAM_ENV)
    containers.append(again)
    wait_ready(podman, again, "ipam")
    assert run_async(allocate()) == first


def test_nsp_and_lb_containers(
    podman: Podman, image: str, tmp_path: Path, containers: list[Container]
) -> None:
    """An NSP, and an LB in its network namespace (a pod of two) reaching it over TCP.

    The LB runs as the manifests run it: root with CAP_NET_ADMIN alone, read-only. Becoming
    ready means it installed its nftables table (kernel mode: no iptables, no queue) with the
    image's own tools.
    """
    nsp = start(
        podman,
        image,
        "nsp",
        tmp_path / "nsp-run",
        data_volume(tmp_path / "nsp-data"),
        f"--volume={CONFIGURATION}:/etc/meridio/nsp/configuration.yaml:ro",
        env={
            "MERIDIOD_LISTEN": "[::1]:7778",
            "MERIDIOD_CONFIGURATION_FILE": "/etc/meridio/nsp/configuration.yaml",
        },
    )
    containers.append(nsp)
    wait_ready(podman, nsp, "nsp")
    exec_probe(podman, nsp, "nsp")
    # gRPC over TCP (plain text, as the containers run): the first message of each
    # ConfigurationManager Watch stream.
    served = podman(
        "exec", nsp.name, "meridioctl", "--insecure", "nsp", "config", "--nsp", "[::1]:7778",
        "-o", "json",
    )  # fmt: skip
    config = json.loads(served.stdout)[0]
    assert sorted(v["address"] for v in config["vips"]["vips"]) == [
        "2001:db8::1/128",
        "2001:db8::2/128",
        "203.0.113.1/32",
        "203.0.113.2/32",
    ]

    lb = start(
        podman,
        image,
        "lb",
        tmp_path / "lb-run",
        env={
            "MERIDIOD_NSP": "[::1]:7778",
            "MERIDIOD_TRENCH": "trench-a",
            "MERIDIOD_CONDUIT": "load-balancer",
            "MERIDIOD_MODE": "kernel",
        },
        user=0,
        capabilities=("NET_ADMIN",),
        network=f"container:{nsp.name}",
    )
    containers.append(lb)
    wait_ready(podman, lb, "lb")
    exec_probe(podman, lb, "lb")
    tables = podman("exec", lb.name, "nft", "list", "tables").stdout
    assert "table inet meridio-lb" in tables, tables
    chains = podman("exec", lb.name, "iptables", "-t", "mangle", "-S").stdout
    assert "MERIDIO" not in chains and "NFQUEUE" not in chains, chains

    assert stop(podman, lb) == 0
    # The LB removed what it installed on its way out.
    left = podman(
        "run", "--rm", *podman.runtime, f"--network=container:{nsp.name}",
        "--cap-drop=ALL", "--cap-add=NET_ADMIN", "--entrypoint=nft", image, "list", "tables",
    )  # fmt: skip
    assert "meridio-lb" not in left.stdout
    assert stop(podman, nsp) == 0
    assert (tmp_path / "nsp-data" / "nsp.db").exists()
