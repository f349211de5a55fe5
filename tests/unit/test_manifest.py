"""The Kubernetes manifests: schema-valid, in sync with values.yaml, and true to the daemon.

"True to the daemon": every MERIDIOD_* variable is a setting of the container's role and
passes that role's own checks; the ports the settings listen on are the container ports the
Services and probes use; the sockets, databases and configuration file the daemon will use lie
on writable (or mounted) volumes, since the root file system is read-only.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click.testing
import pytest
import yaml

from meridio import manifest as mf
from meridio.core import nspconfig
from meridio.roles.base import load_role
from meridio.runtime import Runtime
from meridio.runtime.grpc import Endpoint
from meridio.runtime.health import PROBES
from meridio.settings import RESERVED_ENV, load_settings, setting_names

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (the dev extra has it)"
)

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "config" / "kubernetes" / "values.yaml"
RENDERED = REPO / "config" / "kubernetes" / "trench-a"
# The oldest Kubernetes with GA gRPC probes, and the newest whose schemas are bundled.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
# Custom resources: no bundled schema; checked by hand below.
CUSTOM_KINDS = {"NetworkAttachmentDefinition"}
POD_IPS = ("10.244.1.7", "fd00:10:244:1::7")


def default_values() -> mf.Values:
    return mf.load_values(VALUES)


def variant_values() -> mf.Values:
    """Everything a user is told to change, changed."""
    doc = yaml.safe_load(VALUES.read_text())
    doc.update(
        namespace="meridio-b",
        trench="trench-b",
        image="registry.example.org/meridio/meridio:9.9.9",
        metrics=True,
        **{"drain-timeout": 25.5, "log-level": "debug"},
    )
    doc["lb"].update(replicas=3, mode="nfqueue", **{"bgp-auth-secret": "bgp-keys"})
    gateways = doc["configuration"]["gateways"]["items"]
    gateways[0]["bgp-auth"] = {"key": "gateway-v4", "source": mf.BGP_AUTH_DIR}
    gateways[1].update(bfd=True, **{"local-port": 179})
    doc["lb"]["external"].update(type="vlan", **{"vlan-id": 100})
    doc["app"].update(replicas=5, image="registry.example.org/app:1")
    doc["storage"]["class-name"] = "fast"
    vips = doc["configuration"]["vips"]["items"]
    vips[0]["address"] = "198.51.100.7/32"
    vips[1]["address"] = "2001:db8:7::7/128"
    path = VALUES.parent / "never-written.yaml"
    return msgspec_convert(doc, path)


def msgspec_convert(doc: dict[str, Any], path: Path) -> mf.Values:
    import msgspec

    try:
        return msgspec.convert(doc, mf.Values)
    except msgspec.ValidationError as exc:  # pragma: no cover - a broken test
        raise AssertionError(f"{path}: {exc}") from exc


VARIANTS = {"default": default_values, "variant": variant_values}


@pytest.fixture(params=sorted(VARIANTS))
def rendered(request: pytest.FixtureRequest) -> tuple[mf.Values, list[dict[str, Any]]]:
    values = VARIANTS[request.param]()
    return values, mf.render(values)


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield doc


def meridiod_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict]]:
    """(workload, container) for every container that runs meridiod."""
    for workload in workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if any(e["name"] == "MERIDIOD_ROLE" for e in container.get("env", [])):
                yield workload, container


def role_of(container: dict[str, Any]) -> str:
    return next(e["value"] for e in container["env"] if e["name"] == "MERIDIOD_ROLE")


def settings_env(container: dict[str, Any], pod_ip: str) -> dict[str, str]:
    """The MERIDIOD_* environment as the kubelet gives it (fieldRefs resolved, $(VAR) expanded)."""
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            value = item["value"]
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            value = {"status.podIP": pod_ip, "metadata.name": "pod-0", "spec.nodeName": "node-1"}[
                path
            ]
        for name, known in env.items():
            value = value.replace(f"$({name})", known)
        env[item["name"]] = value
    return env


# --- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates(
    rendered: tuple[mf.Values, list[dict[str, Any]]], version: str
) -> None:
    _, docs = rendered
    checked = 0
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        # strict: unknown fields (a typo, a field newer than `version`) are errors too
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked == len(docs) - 1


def test_network_attachment_definition(rendered: tuple[mf.Values, list[dict[str, Any]]]) -> None:
    values, docs = rendered
    (nad,) = [d for d in docs if d["kind"] == "NetworkAttachmentDefinition"]
    assert nad["apiVersion"] == "k8s.cni.cncf.io/v1"
    assert set(nad) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(nad["spec"]) == {"config"}
    cni = json.loads(nad["spec"]["config"])
    assert cni["name"] == nad["metadata"]["name"]
    assert cni["type"] == values.lb.external.type
    assert cni["master"] == values.lb.external.master
    assert "ipam" in cni
    if cni["type"] == "vlan":
        assert cni["vlanId"] == values.lb.external.vlan_id
    (lb,) = [w for w in workloads(docs) if w["metadata"]["name"] == f"lb-{values.trench}"]
    wanted = json.loads(lb["spec"]["template"]["metadata"]["annotations"][NETWORKS])
    assert wanted == [{"name": nad["metadata"]["name"], "interface": "ext"}]


NETWORKS = "k8s.v1.cni.cncf.io/networks"


def test_committed_manifests_are_rendered_from_values_yaml() -> None:
    files = mf.render_files(default_values())
    on_disk = {p.stem for p in RENDERED.glob("*.yaml")}
    assert on_disk == set(files), "run: meridioctl manifest config/kubernetes/values.yaml -d ..."
    for stem, docs in files.items():
        committed = [d for d in yaml.safe_load_all((RENDERED / f"{stem}.yaml").read_text()) if d]
        assert committed == docs, f"{stem}.yaml is stale: render config/kubernetes/values.yaml"


# --- one place to change a trench -------------------------------------------------------------


def test_the_values_file_changes_everything_it_should() -> None:
    values = variant_values()
    docs = mf.render(values)
    text = mf.dump(docs)
    assert "trench-a" not in text
    assert "203.0.113.1" not in text
    assert "localhost/meridio" not in text
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "meridio-b"
    assert docs[0]["kind"] == "Namespace"
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert by_name["Deployment", "lb-trench-b"]["spec"]["replicas"] == 3
    assert by_name["Deployment", "example-app"]["spec"]["replicas"] == 5
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"]:
            if container["name"] == "example-app":
                assert container["image"] == "registry.example.org/app:1"
            else:
                assert container["image"] == values.image
    config_map = by_name["ConfigMap", "meridio-configuration-trench-b"]
    cfg = nspconfig.parse_config(config_map["data"])
    assert cfg.trench is not None and cfg.trench.name == "trench-b"
    assert sorted(v.address for v in cfg.vips) == ["198.51.100.7/32", "2001:db8:7::7/128"]


# --- true to the daemon -----------------------------------------------------------------------


def installed_role(name: str) -> Any:
    try:
        return load_role(name)
    except LookupError:
        pytest.skip(
            f"role {name!r} is not installed yet: its MERIDIOD_* settings in the manifests "
            "are provisional and checked once it lands"
        )


@pytest.mark.parametrize("role", ["ipam", "nsp", "lb", "proxy", "target"])
@pytest.mark.parametrize("pod_ip", POD_IPS)
def test_settings_are_the_roles_own(
    rendered: tuple[mf.Values, list[dict[str, Any]]], role: str, pod_ip: str, tmp_path: Path
) -> None:
    _, docs = rendered
    containers = [c for _, c in meridiod_containers(docs) if role_of(c) == role]
    assert len(containers) == 1, f"one {role} container expected"
    role_cls = installed_role(role)
    env = settings_env(containers[0], pod_ip)
    known = setting_names(role_cls.Settings)
    for name in env:
        if name.startswith("MERIDIOD_") and name not in RESERVED_ENV:
            key = name.removeprefix("MERIDIOD_").lower().replace("_", "-")
            assert key in known, f"{name} is not a setting of the {role} role"
    if role == "nsp":
        # The configuration is the ConfigMap mounted as a directory, a file per key, as the
        # kubelet mounts it.
        (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
        local = tmp_path / "configuration"
        local.mkdir()
        for key, value in config_map["data"].items():
            (local / key).write_text(value)
        env["MERIDIOD_CONFIGURATION_FILE"] = str(local)
    settings = load_settings(role_cls.Settings, environ=env)
    role_cls.check_settings(settings)
    for listen in ("listen", "health-listen", "metrics-listen"):
        value = getattr(settings, listen.replace("-", "_"), "")
        if value:
            host = Endpoint.parse(value).host
            assert host is not None and ipaddress.ip_address(host) == ipaddress.ip_address(pod_ip)


def listen_port(env: dict[str, str], name: str) -> int | None:
    value = env.get(name)
    if not value:
        return None
    port = Endpoint.parse(value).port
    assert port is not None
    return port


def test_ports_probes_and_services_match_the_settings(
    rendered: tuple[mf.Values, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    services = [d for d in docs if d["kind"] == "Service"]
    for workload, container in meridiod_containers(docs):
        env = settings_env(container, POD_IPS[0])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        health = listen_port(env, "MERIDIOD_HEALTH_LISTEN")
        assert health == ports["health"] == mf.HEALTH_PORT
        for kind, service in (
            ("startupProbe", "Startup"),
            ("readinessProbe", "Readiness"),
            ("livenessProbe", "Liveness"),
        ):
            probe = container[kind]
            assert probe["grpc"] == {"port": health, "service": service}
            assert service in PROBES
        if "MERIDIOD_METRICS_LISTEN" in env:
            assert listen_port(env, "MERIDIOD_METRICS_LISTEN") == ports["metrics"]
        listen = listen_port(env, "MERIDIOD_LISTEN")
        if listen is not None:
            assert ports["grpc"] == listen
        # Every Service that selects this pod reaches a port the container has.
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for service in services:
            selector = service["spec"]["selector"]
            if all(labels.get(k) == v for k, v in selector.items()):
                for port in service["spec"]["ports"]:
                    assert port["targetPort"] in ports, (service["metadata"]["name"], port)
    by_name = {d["metadata"]["name"]: d for d in services}
    trench = next(d for d in docs if d["kind"] == "ConfigMap")["metadata"]["name"].split("-", 2)[2]
    assert by_name[f"ipam-service-{trench}"]["spec"]["ports"][0]["port"] == 7777
    assert by_name[f"nsp-service-{trench}"]["spec"]["ports"][0]["port"] == 7778
    for name in (f"ipam-service-{trench}", f"nsp-service-{trench}"):
        assert by_name[name]["spec"]["type"] == "ClusterIP"


def test_the_daemon_writes_only_to_volumes(
    rendered: tuple[mf.Values, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The root file system is read-only: run-dir (health.sock) and databases need volumes."""
    _, docs = rendered
    for workload, container in meridiod_containers(docs):
        role = role_of(container)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}

        env = settings_env(container, POD_IPS[0])
        settings = {
            k.removeprefix("MERIDIOD_").lower().replace("_", "-"): v
            for k, v in env.items()
            if k.startswith("MERIDIOD_") and k not in RESERVED_ENV
        }
        # The health socket where the runtime puts it (run-dir default /run/meridio/<role>).
        runtime = Runtime(role, _common_settings(settings), nursery=None)  # type: ignore[arg-type]
        _, mount = volume_of(role, mounts, str(runtime.health_socket))
        assert "emptyDir" in volumes[mount["name"]]
        assert not mount.get("readOnly")
        if "database" in settings:
            _, mount = volume_of(role, mounts, str(Path(settings["database"]).parent))
            assert mount["name"] in claims, f"{role}: the database is not on its volume claim"
            assert not mount.get("readOnly")
        if "configuration-file" in settings:
            path = Path(settings["configuration-file"])
            mount_path, mount = volume_of(role, mounts, str(path))
            source = volumes[mount["name"]]["configMap"]["name"]
            (config_map,) = [
                d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == source
            ]
            # the whole ConfigMap is the directory the NSP reads, a file per key
            assert path == Path(mount_path)
            assert set(config_map["data"]) <= set(nspconfig.KEYS)
            assert "subPath" not in mount, "a subPath mount is never updated: no live reload"


def volume_of(
    role: str, mounts: dict[str, dict[str, Any]], path: str
) -> tuple[str, dict[str, Any]]:
    """The mount ``path`` lies on; fails when it is on the root file system."""
    for mount_path, mount in mounts.items():
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            return mount_path, mount
    raise AssertionError(f"{role}: {path} is on the read-only root file system")


def _common_settings(settings: dict[str, str]) -> Any:
    from meridio.settings import CommonSettings

    names = setting_names(CommonSettings)
    return load_settings(CommonSettings, flags={k: v for k, v in settings.items() if k in names})


# --- least privilege and life cycle -----------------------------------------------------------


def test_least_privilege(rendered: tuple[mf.Values, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not pod.get("hostNetwork")
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert not security.get("privileged")
            added = set(security["capabilities"].get("add", []))
            assert added <= set(mf.FRONTEND_CAPABILITIES)
            if not added:
                assert security["runAsNonRoot"] is True
            resources = container["resources"]
            assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    for _, container in meridiod_containers(docs):
        added = set(container["securityContext"]["capabilities"].get("add", []))
        if role_of(container) in ("ipam", "nsp"):
            assert not added
        elif role_of(container) == "lb" and settings_env(container, POD_IPS[0]).get(
            "MERIDIOD_ATTRACTOR"
        ):
            # BIRD, the LB's child: also binding a BGP port below 1024. Never NET_RAW.
            assert added == {"NET_ADMIN", "NET_BIND_SERVICE"}
        else:
            assert added == {"NET_ADMIN"}


def test_grace_periods_exceed_the_drain(rendered: tuple[mf.Values, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for workload, container in meridiod_containers(docs):
        drain = float(settings_env(container, POD_IPS[0])["MERIDIOD_DRAIN_TIMEOUT"])
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= drain + 10, (workload["metadata"]["name"], grace, drain)


def test_shape_of_a_trench(rendered: tuple[mf.Values, list[dict[str, Any]]]) -> None:
    values, docs = rendered
    t = values.trench
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for component in ("ipam", "nsp"):
        sts = by_name["StatefulSet", f"{component}-{t}"]
        assert sts["spec"]["replicas"] == 1
        assert sts["spec"]["serviceName"] == f"{component}-service-{t}"
        assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    lb = by_name["Deployment", f"lb-{t}"]
    anti = lb["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == lb["spec"]["selector"]["matchLabels"]
    pdb = by_name["PodDisruptionBudget", f"lb-{t}"]
    assert pdb["spec"]["selector"] == lb["spec"]["selector"]
    assert by_name["DaemonSet", f"proxy-{t}"]["kind"] == "DaemonSet"
    proxy_service = by_name["Service", f"proxy-{t}"]
    assert proxy_service["spec"]["internalTrafficPolicy"] == "Local"
    app = by_name["Deployment", values.app.name]
    names = [c["name"] for c in app["spec"]["template"]["spec"]["containers"]]
    assert names == [values.app.name, "target"]
    for workload in (lb, by_name["DaemonSet", f"proxy-{t}"], app):
        env = {
            e["name"]: e.get("value")
            for c in workload["spec"]["template"]["spec"]["containers"]
            for e in c.get("env", [])
        }
        if "MERIDIOD_ROLE" in env and env["MERIDIOD_ROLE"] != "lb":
            assert env["MERIDIOD_MECHANISM"] == "vxlan"


# --- the LB's BGP frontend ---------------------------------------------------------------------


def lb_pod(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, lb container) of the LB Deployment."""
    (lb,) = [w for w in workloads(docs) if w["metadata"]["name"].startswith("lb-")]
    pod = lb["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_lb_frontend_defaults() -> None:
    """The default values: the first attractor, Meridio's BGP port, no BFD, no key Secret."""
    pod, container = lb_pod(mf.render(default_values()))
    env = settings_env(container, POD_IPS[0])
    assert env["MERIDIOD_ATTRACTOR"] == "attractor-a"
    # BIRD speaks on the Multus interface only
    assert env["MERIDIOD_EXTERNAL_INTERFACE"] == "ext"
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert ports["bgp"] == (10179, "TCP")
    assert "bfd" not in ports  # no gateway of attractor-a has BFD
    assert not any(p["containerPort"] == 3785 for p in container["ports"])  # BIRD: no echo
    assert "NET_RAW" not in container["securityContext"]["capabilities"]["add"]
    assert [v["name"] for v in pod["volumes"]] == ["run", "tls"]


def test_mutual_tls_from_csi_driver_spiffe(
    rendered: tuple[mf.Values, list[dict[str, Any]]],
) -> None:
    """Every meridiod gets its pod's SVID (a service account per role, whose SPIFFE ID the
    tls-roles setting maps to the role) and serves health in plain text for the kubelet."""
    from meridio.core.authz import identify, parse_role_patterns

    values, docs = rendered
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for workload, container in meridiod_containers(docs):
        role = role_of(container)
        pod = workload["spec"]["template"]["spec"]
        account = pod["serviceAccountName"]
        assert account in accounts
        env = settings_env(container, POD_IPS[0])
        assert env["MERIDIOD_HEALTH_PLAINTEXT"] == "true" and "MERIDIOD_INSECURE" not in env
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        mount = mounts[env["MERIDIOD_TLS_DIR"]]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["csi"] == {"driver": "spiffe.csi.cert-manager.io", "readOnly": True}
        patterns = parse_role_patterns(env["MERIDIOD_TLS_ROLES"])
        svid = f"spiffe://cluster.local/ns/{values.namespace}/sa/{account}"
        assert identify([svid], "cluster.local", patterns).role == role
    import msgspec

    insecure = msgspec.structs.replace(default_values(), tls=mf.TlsValues(mode="insecure"))
    for _, container in meridiod_containers(mf.render(insecure)):
        env = settings_env(container, POD_IPS[0])
        assert env["MERIDIOD_INSECURE"] == "true" and "MERIDIOD_TLS_DIR" not in env


def test_lb_frontend_ports_and_key_secret() -> None:
    values = variant_values()
    pod, container = lb_pod(mf.render(values))
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    # gateway-v4 on 10179, gateway-v6 on 179 with BFD (single hop: UDP 3784)
    assert ports["bgp"] == (179, "TCP")
    assert ports["bgp-10179"] == (10179, "TCP")
    assert ports["bfd"] == (3784, "UDP")
    assert len({p["name"] for p in container["ports"]}) == len(container["ports"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["bgp-auth"]["secret"]["secretName"] == "bgp-keys"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "bgp-auth"]
    # read-only, and whole (a subPath mount would never see a changed key)
    assert mount == {"name": "bgp-auth", "mountPath": mf.BGP_AUTH_DIR, "readOnly": True}
    # The configuration the NSP serves names the mounted directory as the key's source.
    cfg = nspconfig.parse_config(mf.configuration(values))
    gateway = next(g for g in cfg.gateways if g.name == "gateway-v4")
    assert gateway.bgp_auth.key_source == mf.BGP_AUTH_DIR


def test_lb_without_attractor_has_no_frontend() -> None:
    doc = yaml.safe_load(VALUES.read_text())
    del doc["configuration"]["attractors"]
    _, container = lb_pod(mf.render(msgspec_convert(doc, VALUES)))
    env = settings_env(container, POD_IPS[0])
    assert "MERIDIOD_ATTRACTOR" not in env
    assert "MERIDIOD_EXTERNAL_INTERFACE" not in env
    assert container["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert {p["name"] for p in container["ports"]} == {"health", "connect", "vxlan"}


def test_lb_attractor_can_be_chosen() -> None:
    doc = yaml.safe_load(VALUES.read_text())
    attractors = doc["configuration"]["attractors"]["items"]
    attractors.append({"name": "attractor-b", "vips": ["vip-a-v4"], "gateways": ["gateway-v6"]})
    doc["lb"]["attractor"] = "attractor-b"
    _, container = lb_pod(mf.render(msgspec_convert(doc, VALUES)))
    assert settings_env(container, POD_IPS[0])["MERIDIOD_ATTRACTOR"] == "attractor-b"


# --- values errors and the command ------------------------------------------------------------


def values_with(tmp_path: Path, change: Any) -> Path:
    doc = yaml.safe_load(VALUES.read_text())
    change(doc)
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.update(replicas=3), ["unknown field", "replicas"]),
        (lambda d: d["lb"].update(mode=7), ["lb.mode"]),
        (
            lambda d: d["configuration"]["vips"]["items"][0].update(trench="other"),
            ["vip-a-v4", "other"],
        ),
        (
            lambda d: d["configuration"]["vips"]["items"][0].update(address="not-an-ip"),
            ["refused by the NSP", "vips", "vip-a-v4"],
        ),
        (lambda d: d["app"].update(streams=["nope"]), ["app.streams", "nope"]),
        (lambda d: d["lb"].update(conduit="nope"), ["lb.conduit", "nope"]),
        (lambda d: d["lb"].update(attractor="nope"), ["lb.attractor", "nope"]),
        (
            lambda d: d["configuration"]["gateways"]["items"][0].update(
                {"bgp-auth": {"key": "k", "source": "/etc/meridio/bgp-auth"}}
            ),
            ["lb.bgp-auth-secret", "gateway-v4", "/etc/meridio/bgp-auth"],
        ),
        (
            lambda d: d["configuration"]["gateways"]["items"][0].update(
                {"bgp-auth": {"key": "k", "source": "bgp-secret"}}
            ),
            ["refused by the NSP", "gateway-v4", "source must be an absolute path"],
        ),
        (
            lambda d: (
                d["configuration"].pop("attractors"),
                d["lb"].update({"bgp-auth-secret": "keys"}),
            ),
            ["lb.bgp-auth-secret", "no attractor"],
        ),
        (lambda d: d["lb"]["external"].update(type="vlan"), ["vlan-id"]),
        (lambda d: d["configuration"].update(trench={"name": "x"}), ["trench"]),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, change: Any, words: list[str]) -> None:
    path = values_with(tmp_path, change)
    result = click.testing.CliRunner().invoke(mf.manifest, [str(path)])
    assert result.exit_code == 1
    for word in words:
        assert word in result.output, result.output


def test_command_prints_or_writes(tmp_path: Path) -> None:
    runner = click.testing.CliRunner()
    result = runner.invoke(mf.manifest, [str(VALUES)])
    assert result.exit_code == 0, result.output
    printed = [d for d in yaml.safe_load_all(result.output) if d]
    assert printed == mf.render(default_values())
    out = tmp_path / "out"
    result = runner.invoke(mf.manifest, [str(VALUES), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}.yaml" for s in mf.render_files(default_values())
    )
    result = runner.invoke(mf.manifest, [str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert "cannot read" in result.output


def test_values_defaults_match_the_annotated_file() -> None:
    """values.yaml shows every default: rendering without its optional keys changes nothing."""
    doc = yaml.safe_load(VALUES.read_text())
    minimal = {
        "configuration": copy.deepcopy(doc["configuration"]),
        "app": {"streams": ["stream-a"]},
    }
    assert msgspec_convert(minimal, VALUES) == default_values()


# --- network policies -------------------------------------------------------------------------


def _component(workload: dict[str, Any]) -> str:
    return str(workload["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"])


def _policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for doc in docs:
        if doc["kind"] == "NetworkPolicy":
            component = doc["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            assert component not in out
            out[component] = doc
    return out


def _admitted(policy: dict[str, Any], port: int, protocol: str) -> list[dict[str, Any]]:
    """The ``from`` peers of every rule of ``policy`` that names ``port``/``protocol`` (a rule
    with no ``from`` admits anyone: returned as [{}])."""
    peers: list[dict[str, Any]] = []
    for rule in policy["spec"]["ingress"]:
        if {"port": port, "protocol": protocol} in rule["ports"]:
            peers += rule.get("from") or [{}]
    return peers


def test_network_policies_admit_only_the_roles_that_call_each_port(
    rendered: tuple[mf.Values, list[dict[str, Any]]],
) -> None:
    """Each port of each component admits exactly the components that are configured to call
    it (and that the authorization table lets call it); every port is covered by a policy; the
    LB's BGP and BFD only from its attractor's gateways."""
    from meridio.core import authz

    values, docs = rendered
    policies = _policies(docs)
    assert set(policies) == {"nsp", "ipam", "lb", "proxy", "app"}
    component_of_role = {"target": "app"}
    # who dials what, from the rendered settings
    dials: dict[str, set[str]] = {"nsp": set(), "ipam": set(), "proxy": set()}
    for workload, container in meridiod_containers(docs):
        env = settings_env(container, POD_IPS[0])
        for server, key in (("nsp", "NSP"), ("ipam", "IPAM"), ("proxy", "PROXY")):
            if f"MERIDIOD_{key}" in env:
                dials[server].add(_component(workload))
    dials["lb"] = {"proxy"}  # proxies find the LBs' connect endpoints through the NSP

    def callers(policy: dict[str, Any], port: int, protocol: str) -> set[str]:
        peers = _admitted(policy, port, protocol)
        assert all(set(p) == {"podSelector"} for p in peers), peers  # no open rule
        labels = [p["podSelector"]["matchLabels"] for p in peers]
        assert all(m["app.kubernetes.io/instance"] == values.trench for m in labels)
        return {m["app.kubernetes.io/component"] for m in labels}

    served = {"nsp": "/nsp.v1.TargetRegistry/Register", "ipam": "/ipam.v1.Ipam/Allocate"}
    served |= {c: "/meridio.connect.v1.Connect/Request" for c in ("lb", "proxy")}
    ports = {"nsp": mf.NSP_PORT, "ipam": mf.IPAM_PORT, "lb": mf.CONNECT_PORT}
    ports["proxy"] = mf.CONNECT_PORT
    for server, port in ports.items():
        admitted = callers(policies[server], port, "TCP")
        assert admitted == dials[server], server
        for component in admitted:
            role = next((r for r, c in component_of_role.items() if c == component), component)
            identity = authz.Identity(None, role)
            assert authz.decide(server, served[server], identity).allowed, (server, role)
    assert callers(policies["ipam"], mf.IPAM_PORT, "TCP") == {"proxy"}
    assert callers(policies["lb"], mf.CONNECT_PORT, "TCP") == {"proxy"}
    # vxlan between the ends of the conduits: LB <-> proxy <-> application pods
    assert callers(policies["lb"], mf.VXLAN_PORT, "UDP") == {"proxy"}
    assert callers(policies["proxy"], mf.VXLAN_PORT, "UDP") == {"lb", "app"}
    assert callers(policies["app"], mf.VXLAN_PORT, "UDP") == {"proxy"}
    # every port a meridiod container lists is in its pod's policy (health: the kubelet's,
    # from the node, which NetworkPolicy always admits)
    for workload, container in meridiod_containers(docs):
        policy = policies[_component(workload)]
        for p in container["ports"]:
            if p["name"] == "health":
                assert not _admitted(policy, p["containerPort"], p["protocol"])
                continue
            assert _admitted(policy, p["containerPort"], p["protocol"]), (workload, p)
    # the LB's BGP and BFD: from the attractor's gateways only
    config = mf.configuration(values)
    gateways = {
        f"{g['address']}/{128 if ':' in g['address'] else 32}" for g in config["gateways"]["items"]
    }
    _, lb_container = lb_pod(docs)
    frontend = [p for p in lb_container["ports"] if p["name"].startswith(("bgp", "bfd"))]
    assert frontend
    for p in frontend:
        peers = _admitted(policies["lb"], p["containerPort"], p["protocol"])
        assert {peer["ipBlock"]["cidr"] for peer in peers} == gateways
    # metrics, when on, from anywhere (Prometheus lives elsewhere); otherwise not open at all
    open_rules = [
        r for pol in policies.values() for r in pol["spec"]["ingress"] if not r.get("from")
    ]
    if values.metrics:
        assert open_rules and all(
            r["ports"] == [{"port": mf.METRICS_PORT, "protocol": "TCP"}] for r in open_rules
        )
    else:
        assert not open_rules


def test_network_policies_can_be_left_out() -> None:
    import msgspec

    values = msgspec.structs.replace(default_values(), network_policies=False)
    assert not _policies(mf.render(values))
