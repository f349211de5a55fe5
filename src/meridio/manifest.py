"""``meridioctl manifest``: the Kubernetes manifests of one trench, rendered from a values file.

Everything a user changes lives in one YAML file (``config/kubernetes/values.yaml`` is the
annotated default): the namespace, the trench, the image, replica counts, the LB's external
network, resources and the trench's Meridio configuration (conduits, streams, flows, VIPs,
attractors, gateways). :func:`render` turns it into plain manifests, built as data (never as
text templates), so what comes out is always well-formed; the configuration is checked by the
NSP's own parser, so a render never produces a ConfigMap the NSP would refuse.

What is rendered, per trench (names end in ``-<trench>``):

* ``ipam`` and ``nsp``: single-replica StatefulSets, each with a PersistentVolumeClaim for its
  sqlite database and a ClusterIP Service (``ipam-service-<trench>`` on 7777,
  ``nsp-service-<trench>`` on 7778, as Meridio's operator names them); no capability at all,
  a non-root user;
* ``configuration``: the NSP's configuration in Meridio's format (a ConfigMap);
* ``lb``: a Deployment with required anti-affinity (one LB per node, so the gateways' ECMP
  spreads over nodes), a PodDisruptionBudget and the Multus NetworkAttachmentDefinition of its
  external interface (macvlan or VLAN); with an attractor in the configuration, the LB's BGP
  frontend (BIRD, a child of meridiod in the same container) is on: its ``attractor``
  setting, the BGP and BFD ports, and optionally a Secret of BGP keys;
* ``proxy``: a DaemonSet, and a Service with ``internalTrafficPolicy: Local`` through which a
  target reaches the proxy of its own node;
* ``app``: an example application Deployment with the ``target`` sidecar.
* a NetworkPolicy per component (``network-policies``): each port admits only the roles that
  call it (NSP from lb, proxy and the application pods' target; IPAM from proxy; the LB's
  connect port and vxlan from proxy; the proxy's from the application pods; BGP and BFD of the
  LB from its attractor's gateways); certificates from csi-driver-spiffe, mounted read-only
  in every meridiod container.

Every meridiod container runs with a read-only root file system, all capabilities dropped
but the few its role needs, requests and limits, gRPC startup/readiness/liveness probes on the
health port, and a termination grace period longer than its drain.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import msgspec
import yaml

from meridio import __version__
from meridio.core import conduit, nspconfig
from meridio.core.authz import ROLES

__all__ = [
    "CONNECT_PORT",
    "HEALTH_PORT",
    "IPAM_PORT",
    "METRICS_PORT",
    "NSP_PORT",
    "Values",
    "ValuesError",
    "load_values",
    "manifest",
    "render",
    "render_files",
]

IPAM_PORT = 7777
NSP_PORT = 7778
HEALTH_PORT = 7780
"""grpc.health.v1 over TCP (the ``health-listen`` setting), for the kubelet's gRPC probes."""
CONNECT_PORT = 7781
"""``meridio.connect.v1`` of the LBs' and proxies' conduit endpoints."""
VXLAN_PORT = conduit.VXLAN_PORT
METRICS_PORT = 2223
"""Prometheus metrics, when enabled (Meridio's port)."""

RUN_DIR = "/run/meridio"
BGP_AUTH_DIR = "/etc/meridio/bgp-auth"
"""Where the LB pod mounts ``lb.bgp-auth-secret``: gateways' ``bgp-auth`` ``source``."""
STATE_DIR = "/var/lib/meridio"
CONFIG_DIR = "/etc/meridio/nsp"
NON_ROOT_UID = 10002
"""IPAM and NSP run as this user (Meridio's); the image has it as ``meridio``."""

# Sysctls the data-path pods need. They are namespaced but not on the kubelet's "safe" list:
# the nodes must allow them (kubelet --allowed-unsafe-sysctls, see docs/running.md).
LB_SYSCTLS = {
    "net.ipv4.conf.all.forwarding": "1",
    "net.ipv6.conf.all.forwarding": "1",
    # replies of targets come back through any LB: no reverse-path filtering
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
PROXY_SYSCTLS = {
    "net.ipv4.conf.all.forwarding": "1",
    "net.ipv6.conf.all.forwarding": "1",
    # the "from VIP" multipath route over the LBs is hashed per flow (layer 4), not per host
    "net.ipv4.fib_multipath_hash_policy": "1",
    "net.ipv6.fib_multipath_hash_policy": "1",
}


class ValuesError(ValueError):
    """The values file is unusable; the message names the key."""


class _Struct(msgspec.Struct, rename="kebab", forbid_unknown_fields=True, kw_only=True):
    pass


class Resources(_Struct):
    cpu: str = "50m"
    """CPU request."""
    memory: str = "96Mi"
    """Memory request."""
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"


class AllResources(_Struct):
    ipam: Resources = msgspec.field(default_factory=Resources)
    nsp: Resources = msgspec.field(default_factory=Resources)
    lb: Resources = msgspec.field(
        default_factory=lambda: Resources(
            cpu="250m", memory="128Mi", cpu_limit="2", memory_limit="512Mi"
        )
    )
    proxy: Resources = msgspec.field(
        default_factory=lambda: Resources(cpu="100m", memory="128Mi", memory_limit="384Mi")
    )
    target: Resources = msgspec.field(default_factory=Resources)
    app: Resources = msgspec.field(
        default_factory=lambda: Resources(cpu="50m", memory="64Mi", memory_limit="128Mi")
    )


class Storage(_Struct):
    size: str = "1Gi"
    class_name: str = ""
    """StorageClass of the IPAM and NSP volumes; empty: the cluster's default."""


class IpamValues(_Struct):
    prefix_ipv4: str = "169.255.0.0/16"
    prefix_ipv6: str = "fd00::/48"


class ExternalNetwork(_Struct):
    """The LB's external interface: a Multus NetworkAttachmentDefinition."""

    type: str = "macvlan"
    """``macvlan`` or ``vlan`` (the CNI plugin)."""
    master: str = "eth1"
    """Host interface the LB's external interface is made on."""
    mode: str = "bridge"
    """macvlan mode."""
    vlan_id: int = 0
    """VLAN id, for ``type: vlan``."""
    interface: str = "ext"
    """Interface name inside the LB pod."""
    ipam: dict[str, Any] = msgspec.field(
        default_factory=lambda: {
            "type": "whereabouts",
            "ipRanges": [
                {"range": "192.0.2.0/24", "range_start": "192.0.2.16", "range_end": "192.0.2.31"},
                {"range": "2001:db8:100::/64"},
            ],
        }
    )
    """The CNI ``ipam`` section, as the plugin takes it."""


class LbValues(_Struct):
    replicas: int = 2
    mode: str = "kernel"
    conduit: str = ""
    """Conduit whose streams the LBs serve; empty: the first conduit of the configuration."""
    attractor: str = ""
    """Attractor whose VIPs the LBs announce to its gateways (BGP/BFD); empty: the first
    attractor of the configuration; with none, the frontend is off."""
    bgp_auth_secret: str = ""
    """A Secret of BGP TCP-MD5 keys, mounted read-only at ``BGP_AUTH_DIR``; empty: none."""
    external: ExternalNetwork = msgspec.field(default_factory=ExternalNetwork)


class AppValues(_Struct):
    name: str = "example-app"
    replicas: int = 2
    image: str = ""
    """Empty: the meridio image, running a small HTTP server on port 5000."""
    command: list[str] = msgspec.field(
        default_factory=lambda: [
            *("python3", "-m", "http.server", "5000", "--bind", "::", "--directory", "/tmp")
        ]
    )
    port: int = 5000
    streams: list[str] = msgspec.field(default_factory=list)
    """Streams the target opens; empty: every stream of the configuration."""


class TlsValues(_Struct):
    mode: str = "csi-driver-spiffe"
    """``csi-driver-spiffe``: each pod gets an X509-SVID from cert-manager's csi-driver-spiffe
    (``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``, one service account per
    role) and every gRPC service is mutual TLS; ``insecure``: plain text, no authentication."""


TLS_MODES = ("csi-driver-spiffe", "insecure")
TLS_DIR = "/var/run/meridio/tls"
CSI_SPIFFE_DRIVER = "spiffe.csi.cert-manager.io"


class Values(_Struct):
    namespace: str = "default"
    trench: str = "trench-a"
    image: str = f"localhost/meridio:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    log_level: str = "info"
    drain_timeout: float = 10.0
    """Seconds each role may drain after SIGTERM; grace periods are set above it."""
    metrics: bool = False
    """Serve Prometheus metrics on port 2223 of every meridiod container."""
    storage: Storage = msgspec.field(default_factory=Storage)
    ipam: IpamValues = msgspec.field(default_factory=IpamValues)
    lb: LbValues = msgspec.field(default_factory=LbValues)
    app: AppValues = msgspec.field(default_factory=AppValues)
    resources: AllResources = msgspec.field(default_factory=AllResources)
    tls: TlsValues = msgspec.field(default_factory=TlsValues)
    network_policies: bool = True
    """A NetworkPolicy per component that admits, on each port, only the roles that call it."""
    configuration: dict[str, Any] = msgspec.field(default_factory=dict)
    """The trench's Meridio configuration, inline (``conduits``, ``streams``, ``flows``,
    ``vips``, ``attractors``, ``gateways``, each with ``items``); ``trench`` fields may be left
    out, they are filled in."""


def load_values(path: str | Path) -> Values:
    """Read a values file (a key left out keeps its default); ValuesError names the problem."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValuesError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ValuesError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return msgspec.convert(doc or {}, Values)
    except msgspec.ValidationError as exc:
        raise ValuesError(f"{path}: {exc}") from exc


# --- the Meridio configuration ----------------------------------------------------------------

_TRENCH_KEYS = ("conduits", "vips", "attractors", "gateways")


def configuration(values: Values) -> dict[str, Any]:
    """The trench's configuration (inline form) with every ``trench`` field filled in."""
    out: dict[str, Any] = {"trench": {"name": values.trench}}
    for key, section in values.configuration.items():
        if key == "trench":
            raise ValuesError("configuration: leave 'trench' out; the top-level 'trench' names it")
        if key not in nspconfig.KEYS:
            raise ValuesError(f"configuration: unknown key {key!r}")
        if not isinstance(section, Mapping) or not isinstance(section.get("items", []), list):
            raise ValuesError(f"configuration.{key}: expected a mapping with a list 'items'")
        items = []
        for item in section.get("items", []):
            item = dict(item)
            if key in _TRENCH_KEYS and item.setdefault("trench", values.trench) != values.trench:
                raise ValuesError(
                    f"configuration.{key}: item {item.get('name')!r} is in trench "
                    f"{item['trench']!r}, not {values.trench!r}"
                )
            items.append(item)
        out[key] = {"items": items}
    try:
        nspconfig.parse_config(out)
    except nspconfig.ConfigError as exc:
        raise ValuesError(f"configuration refused by the NSP: {exc}") from exc
    return out


def _names(config: Mapping[str, Any], key: str) -> list[str]:
    return [str(item["name"]) for item in config.get(key, {}).get("items", [])]


# --- building blocks --------------------------------------------------------------------------


class _Trench:
    """Names, labels and shared pieces of one rendering."""

    def __init__(self, values: Values) -> None:
        self.v = values
        self.trench = values.trench

    def name(self, component: str) -> str:
        return f"{component}-{self.trench}"

    def selector(self, component: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "meridio",
            "app.kubernetes.io/instance": self.trench,
            "app.kubernetes.io/component": component,
        }

    def labels(self, component: str) -> dict[str, str]:
        return {
            **self.selector(component),
            "app.kubernetes.io/part-of": "meridio",
            "app.kubernetes.io/version": __version__,
        }

    def metadata(self, name: str, component: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.v.namespace,
            "labels": self.labels(component),
            **extra,
        }

    def service_account(self, role: str) -> str:
        """The service account of ``role``'s pods: its SPIFFE ID names the role."""
        return f"meridio-{role}-{self.trench}"

    def tls_roles(self) -> str:
        """The ``tls-roles`` setting: each role's service account path names the role."""
        return ",".join(
            f"/ns/{self.v.namespace}/sa/{self.service_account(role)}={role}" for role in ROLES
        )

    def tls_settings(self) -> dict[str, str]:
        if self.v.tls.mode == "insecure":
            return {"insecure": "true"}
        return {
            "tls-dir": TLS_DIR,
            "tls-roles": self.tls_roles(),
            # the kubelet's gRPC probes cannot present a certificate
            "health-plaintext": "true",
        }

    def service_account_doc(self, role: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": self.metadata(self.service_account(role), role),
            "automountServiceAccountToken": False,
        }

    def service_address(self, component: str, port: int) -> str:
        return f"{component}-service-{self.trench}.{self.v.namespace}.svc:{port}"

    def grace_period(self, extra: float) -> int:
        """Seconds: the drain plus ``extra`` for what comes after it (clean-up, exit)."""
        return math.ceil(self.v.drain_timeout + extra)

    def resources(self, r: Resources) -> dict[str, Any]:
        return {
            "requests": {"cpu": r.cpu, "memory": r.memory},
            "limits": {"cpu": r.cpu_limit, "memory": r.memory_limit},
        }

    def meridiod(
        self,
        role: str,
        settings: Mapping[str, str],
        *,
        resources: Resources,
        capabilities: Sequence[str] = (),
        ports: Sequence[tuple[str, int, str]] = (),
        mounts: Sequence[tuple[str, str, bool]] = (),
        extra_env: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """A meridiod container: settings as MERIDIOD_* variables, probes on the health port.

        ``mounts`` are (volume, path, read-only). The run-dir volume is always mounted.
        """
        env: list[dict[str, Any]] = [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MERIDIOD_ROLE", "value": role},
            {
                "name": "MERIDIOD_INSTANCE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
            },
            *extra_env,
        ]
        common = {
            "log-level": self.v.log_level,
            "drain-timeout": _number(self.v.drain_timeout),
            # The kubelet's gRPC probes dial the pod IP; [..] also fits an IPv6 pod IP.
            "health-listen": f"[$(POD_IP)]:{HEALTH_PORT}",
        }
        if self.v.metrics:
            common["metrics-listen"] = f"[$(POD_IP)]:{METRICS_PORT}"
        common.update(self.tls_settings())
        for key, value in {**common, **settings}.items():
            env.append({"name": _env_name(key), "value": value})
        container_ports = [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}]
        if self.v.metrics:
            container_ports.append(
                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
            )
        container_ports += [
            {"name": name, "containerPort": port, "protocol": protocol}
            for name, port, protocol in ports
        ]
        security: dict[str, Any] = {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {
                "drop": ["ALL"],
                **({"add": list(capabilities)} if capabilities else {}),
            },
        }
        if capabilities:
            # Capabilities given to a non-root user only reach its bounding set (the Python
            # interpreter has no file capabilities), so a role that needs them runs as root,
            # with nothing else than these.
            security.update(runAsUser=0, runAsNonRoot=False)
        else:
            security.update(runAsUser=NON_ROOT_UID, runAsGroup=NON_ROOT_UID, runAsNonRoot=True)
        volume_mounts: list[dict[str, Any]] = [{"name": "run", "mountPath": RUN_DIR}]
        if self.v.tls.mode != "insecure":
            mounts = [*mounts, ("tls", TLS_DIR, True)]
        volume_mounts += [
            {"name": volume, "mountPath": path, **({"readOnly": True} if read_only else {})}
            for volume, path, read_only in mounts
        ]
        return {
            "name": role,
            "image": self.v.image,
            "imagePullPolicy": self.v.image_pull_policy,
            "env": env,
            "ports": container_ports,
            "startupProbe": _probe("Startup", period=2, failures=60),
            "readinessProbe": _probe("Readiness", period=5, failures=2),
            "livenessProbe": _probe("Liveness", period=10, failures=3),
            "resources": self.resources(resources),
            "securityContext": security,
            "volumeMounts": volume_mounts,
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }

    def pod_spec(
        self,
        containers: list[dict[str, Any]],
        *,
        grace: int,
        sysctls: Mapping[str, str] | None = None,
        fs_group: bool = False,
        volumes: Sequence[dict[str, Any]] = (),
        affinity: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        security: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
        if fs_group:
            security.update(fsGroup=NON_ROOT_UID, fsGroupChangePolicy="OnRootMismatch")
        if sysctls:
            security["sysctls"] = [{"name": k, "value": v} for k, v in sysctls.items()]
        roles = [
            e["value"] for c in containers for e in c.get("env", []) if e["name"] == "MERIDIOD_ROLE"
        ]
        tls_volumes: list[dict[str, Any]] = []
        if self.v.tls.mode != "insecure":
            # the X509-SVID of the pod's service account, renewed in place
            tls_volumes.append(
                {"name": "tls", "csi": {"driver": CSI_SPIFFE_DRIVER, "readOnly": True}}
            )
        spec: dict[str, Any] = {
            **({"serviceAccountName": self.service_account(roles[0])} if roles else {}),
            # meridiod talks to no Kubernetes API: no token in the pod.
            "automountServiceAccountToken": False,
            # Service links put *_SERVICE_HOST variables in the environment; a Service whose
            # name began with "meridiod" would even be taken for a setting.
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": grace,
            "securityContext": security,
            "containers": containers,
            "volumes": [
                {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                *tls_volumes,
                *volumes,
            ],
        }
        if affinity:
            spec["affinity"] = affinity
        return spec


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _env_name(setting: str) -> str:
    return "MERIDIOD_" + setting.upper().replace("-", "_")


def _probe(service: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "grpc": {"port": HEALTH_PORT, "service": service},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


# --- components -------------------------------------------------------------------------------


def _stateful(
    t: _Trench,
    component: str,
    port: int,
    settings: dict[str, str],
    resources: Resources,
    extra_mounts: Sequence[tuple[str, str, bool]] = (),
    extra_volumes: Sequence[dict[str, Any]] = (),
    annotations: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """A single-replica StatefulSet with a volume for its database, and its Service."""
    name = t.name(component)
    container = t.meridiod(
        component,
        {
            "listen": f"[$(POD_IP)]:{port}",
            "database": f"{STATE_DIR}/{component}.db",
            "trench": t.trench,
            **settings,
        },
        resources=resources,
        ports=[("grpc", port, "TCP")],
        mounts=[("data", STATE_DIR, False), *extra_mounts],
    )
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": t.v.storage.size}},
    }
    if t.v.storage.class_name:
        claim["storageClassName"] = t.v.storage.class_name
    template_meta: dict[str, Any] = {"labels": t.labels(component)}
    if annotations:
        template_meta["annotations"] = dict(annotations)
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": t.metadata(name, component),
        "spec": {
            # One writer per database: sqlite on a ReadWriteOnce volume.
            "replicas": 1,
            "serviceName": f"{component}-service-{t.trench}",
            "selector": {"matchLabels": t.selector(component)},
            "template": {
                "metadata": template_meta,
                "spec": t.pod_spec(
                    [container],
                    grace=t.grace_period(10),
                    fs_group=True,
                    volumes=extra_volumes,
                ),
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": t.metadata(f"{component}-service-{t.trench}", component),
        "spec": {
            "type": "ClusterIP",
            "selector": t.selector(component),
            "ports": [{"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP"}],
        },
    }
    return [statefulset, service]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the configuration) as literal blocks, lists indented under keys."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _configmap(t: _Trench, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": t.metadata(f"meridio-configuration-{t.trench}", "nsp"),
        # Meridio's own shape: one key per kind, each a YAML document; mounted, each key is a
        # file and the NSP reads the directory.
        "data": {
            key: yaml.dump(value, Dumper=_Dumper, sort_keys=False) for key, value in config.items()
        },
    }


def _nsp(t: _Trench) -> list[dict[str, Any]]:
    return _stateful(
        t,
        "nsp",
        NSP_PORT,
        {"configuration-file": CONFIG_DIR},
        t.v.resources.nsp,
        # A mounted ConfigMap is updated in place (the NSP reloads it); no subPath, which
        # would freeze it.
        extra_mounts=[("configuration", CONFIG_DIR, True)],
        extra_volumes=[
            {
                "name": "configuration",
                "configMap": {"name": f"meridio-configuration-{t.trench}"},
            }
        ],
    )


def _ipam(t: _Trench) -> list[dict[str, Any]]:
    return _stateful(
        t,
        "ipam",
        IPAM_PORT,
        {"prefix-ipv4": t.v.ipam.prefix_ipv4, "prefix-ipv6": t.v.ipam.prefix_ipv6},
        t.v.resources.ipam,
    )


def _network_attachment(t: _Trench) -> dict[str, Any]:
    ext = t.v.lb.external
    if ext.type not in ("macvlan", "vlan"):
        raise ValuesError(f"lb.external.type: {ext.type!r} is not macvlan or vlan")
    cni: dict[str, Any] = {
        "cniVersion": "0.4.0",
        "name": t.name("external"),
        "type": ext.type,
        "master": ext.master,
    }
    if ext.type == "macvlan":
        cni["mode"] = ext.mode
    else:
        if not 1 <= ext.vlan_id <= 4094:
            raise ValuesError("lb.external.vlan-id: must be 1..4094 for type vlan")
        cni["vlanId"] = ext.vlan_id
    cni["ipam"] = ext.ipam
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": t.metadata(t.name("external"), "lb"),
        "spec": {"config": json.dumps(cni, indent=2) + "\n"},
    }


def _conduit(t: _Trench, config: dict[str, Any]) -> str:
    conduits = _names(config, "conduits")
    conduit = t.v.lb.conduit or (conduits[0] if conduits else "")
    if conduit and conduit not in conduits:
        raise ValuesError(f"lb.conduit: {conduit!r} is not a conduit of the configuration")
    return conduit


# What the data-path roles (lb, proxy, target) get; every other capability is dropped. Not
# NET_RAW: only iptables-legacy needs it (a raw socket to reach xtables), and the image's
# iptables is iptables-nft; tests/container runs the LB with NET_ADMIN alone. (The systemd
# unit keeps NET_RAW, since a host may have chosen iptables-legacy.)
DATA_PATH_CAPABILITIES = ["NET_ADMIN"]
# The LB with its frontend: BIRD runs as meridiod's child, as root, with the container's
# capabilities. NET_ADMIN: BIRD's routes in the kernel, SO_PRIORITY 7 on its BGP and BFD
# sockets. NET_BIND_SERVICE: a gateway whose local-port is below 1024 (BGP's usual 179, the
# default of Meridio's Gateway resource); Meridio's 10179 and BFD's 3784 need nothing. Still
# not NET_RAW: BIRD 2.0.12 keeps BGP and single-hop BFD sessions (TTL 255) up without it.
FRONTEND_CAPABILITIES = ["NET_ADMIN", "NET_BIND_SERVICE"]
BGP_PORT = 10179
"""The frontend's default BGP port, both sides (Meridio's)."""
BFD_PORT = 3784
"""Single-hop BFD control (RFC 5881). No 3785: BIRD does not implement BFD's echo function."""

# The conduits' vxlan mechanism: each end makes a VXLAN link towards the other's pod IP, so UDP
# 4789 must pass between LB, proxy and application pods (the port is listed for that reason).
VXLAN = ("vxlan", VXLAN_PORT, "UDP")
CONNECT = ("connect", CONNECT_PORT, "TCP")
NODE_NAME = {"name": "MERIDIOD_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}


def _attractor(t: _Trench, config: dict[str, Any]) -> str:
    attractors = _names(config, "attractors")
    attractor = t.v.lb.attractor or (attractors[0] if attractors else "")
    if attractor and attractor not in attractors:
        raise ValuesError(f"lb.attractor: {attractor!r} is not an attractor of the configuration")
    return attractor


def _attractor_gateways(config: dict[str, Any], attractor: str) -> list[dict[str, Any]]:
    (item,) = [a for a in config["attractors"]["items"] if a["name"] == attractor]
    names = set(item.get("gateways", []))
    return [g for g in config.get("gateways", {}).get("items", []) if g["name"] in names]


def _frontend_ports(config: dict[str, Any], attractor: str) -> list[tuple[str, int, str]]:
    """The BGP ports (each BGP gateway's local-port) and BFD's, for the container's ports.

    Documentation only (nothing is published): the gateways connect to the pod's external
    address, and BIRD listens there whatever is listed.
    """
    used = _attractor_gateways(config, attractor)
    bgp = sorted(
        {
            int(g.get("local-port") or BGP_PORT)
            for g in used
            if str(g.get("protocol") or "bgp").lower() == "bgp"
        }
    )
    ports = [("bgp" if i == 0 else f"bgp-{port}", port, "TCP") for i, port in enumerate(bgp)]
    if any(g.get("bfd") for g in used):
        ports.append(("bfd", BFD_PORT, "UDP"))
    return ports


def _bgp_auth(
    t: _Trench, config: dict[str, Any], attractor: str
) -> tuple[list[dict[str, Any]], list[tuple[str, str, bool]]]:
    """The volume and mount of ``lb.bgp-auth-secret`` (none when it is empty).

    A gateway of the attractor whose ``bgp-auth`` source lies in ``BGP_AUTH_DIR`` needs it.
    """
    secret = t.v.lb.bgp_auth_secret
    if not secret:
        for gateway in _attractor_gateways(config, attractor):
            source = str((gateway.get("bgp-auth") or {}).get("source", ""))
            if source == BGP_AUTH_DIR or source.startswith(BGP_AUTH_DIR + "/"):
                raise ValuesError(
                    f"lb.bgp-auth-secret: gateway {gateway['name']!r} reads its BGP key from "
                    f"{source}: name the Secret to mount at {BGP_AUTH_DIR}"
                )
        return [], []
    # Mounted whole (no subPath), so a changed key reaches the LB, which reads it at run time.
    volume = {"name": "bgp-auth", "secret": {"secretName": secret, "defaultMode": 0o400}}
    return [volume], [("bgp-auth", BGP_AUTH_DIR, True)]


def _lb(t: _Trench, config: dict[str, Any]) -> list[dict[str, Any]]:
    lb = t.v.lb
    if lb.replicas < 1:
        raise ValuesError("lb.replicas: at least 1")
    settings = {
        "nsp": t.service_address("nsp", NSP_PORT),
        "trench": t.trench,
        "conduit": _conduit(t, config),
        "mode": lb.mode,
    }
    # NET_ADMIN: policy rules and routes per target, nftables (the Maglev maps), iptables
    #   NFQUEUE rules, binding the queues, deleting conntrack entries, conduit links.
    capabilities = DATA_PATH_CAPABILITIES
    ports = [CONNECT, VXLAN]
    volumes: list[dict[str, Any]] = []
    mounts: list[tuple[str, str, bool]] = []
    attractor = _attractor(t, config)
    if attractor:
        # The frontend: BIRD speaks to the attractor's gateways on the external interface
        # (the Multus one, named by the pod's network annotation below).
        settings["attractor"] = attractor
        settings["external-interface"] = lb.external.interface
        capabilities = FRONTEND_CAPABILITIES
        ports += _frontend_ports(config, attractor)
        volumes, mounts = _bgp_auth(t, config, attractor)
    elif lb.bgp_auth_secret:
        raise ValuesError("lb.bgp-auth-secret: the configuration has no attractor")
    container = t.meridiod(
        "lb",
        settings,
        resources=t.v.resources.lb,
        capabilities=capabilities,
        ports=ports,
        mounts=mounts,
    )
    network = json.dumps([{"name": t.name("external"), "interface": lb.external.interface}])
    anti_affinity = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": t.selector("lb")},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": t.metadata(t.name("lb"), "lb"),
        "spec": {
            "replicas": lb.replicas,
            "selector": {"matchLabels": t.selector("lb")},
            # One LB per node: a new one can only start where an old one has gone.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "template": {
                "metadata": {
                    "labels": t.labels("lb"),
                    "annotations": {"k8s.v1.cni.cncf.io/networks": network},
                },
                "spec": t.pod_spec(
                    [container],
                    grace=t.grace_period(20),
                    sysctls=LB_SYSCTLS,
                    volumes=volumes,
                    affinity=anti_affinity,
                ),
            },
        },
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": t.metadata(t.name("lb"), "lb"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": t.selector("lb")}},
    }
    return [_network_attachment(t), deployment, budget]


# The proxy and target roles are younger than these manifests: their settings below follow
# Meridio's proxy and TAPA (trench, conduit, NSP, IPAM, node name, mechanism) and the connect
# API, and are checked against the role once it is installed (tests/unit/test_manifest.py).


def _proxy(t: _Trench, config: dict[str, Any]) -> list[dict[str, Any]]:
    container = t.meridiod(
        "proxy",
        {
            "nsp": t.service_address("nsp", NSP_PORT),
            "ipam": t.service_address("ipam", IPAM_PORT),
            "trench": t.trench,
            "conduit": _conduit(t, config),
            "mechanism": "vxlan",
            "connect-listen": f"[$(POD_IP)]:{CONNECT_PORT}",
        },
        resources=t.v.resources.proxy,
        # NET_ADMIN: the bridge, the conduits' vxlan links, addresses, routes and rules.
        capabilities=DATA_PATH_CAPABILITIES,
        ports=[CONNECT, VXLAN],
        extra_env=[NODE_NAME],
    )
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": t.metadata(t.name("proxy"), "proxy"),
        "spec": {
            "selector": {"matchLabels": t.selector("proxy")},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": t.labels("proxy")},
                "spec": t.pod_spec([container], grace=t.grace_period(20), sysctls=PROXY_SYSCTLS),
            },
        },
    }
    local = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": t.metadata(t.name("proxy"), "proxy"),
        "spec": {
            "type": "ClusterIP",
            "selector": t.selector("proxy"),
            # A target only ever talks to the proxy of its own node.
            "internalTrafficPolicy": "Local",
            "ports": [
                {
                    "name": "connect",
                    "port": CONNECT_PORT,
                    "targetPort": "connect",
                    "protocol": "TCP",
                }
            ],
        },
    }
    return [daemonset, local]


def _app(t: _Trench, config: dict[str, Any]) -> list[dict[str, Any]]:
    app = t.v.app
    streams = app.streams or _names(config, "streams")
    unknown = sorted(set(streams) - set(_names(config, "streams")))
    if unknown:
        raise ValuesError(f"app.streams: not streams of the configuration: {', '.join(unknown)}")
    target = t.meridiod(
        "target",
        {
            "nsp": t.service_address("nsp", NSP_PORT),
            "trench": t.trench,
            "conduit": _conduit(t, config),
            "streams": ",".join(streams),
            "mechanism": "vxlan",
            "proxy": f"{t.name('proxy')}.{t.v.namespace}.svc:{CONNECT_PORT}",
        },
        resources=t.v.resources.target,
        # NET_ADMIN: the conduit's vxlan link, the VIPs on lo, the "from VIP" rule and route.
        capabilities=DATA_PATH_CAPABILITIES,
        ports=[VXLAN],
        extra_env=[NODE_NAME],
    )
    application = {
        "name": app.name,
        "image": app.image or t.v.image,
        "imagePullPolicy": t.v.image_pull_policy,
        "command": list(app.command),
        "ports": [{"name": "app", "containerPort": app.port, "protocol": "TCP"}],
        "resources": t.resources(t.v.resources.app),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "capabilities": {"drop": ["ALL"]},
        },
        "readinessProbe": {"tcpSocket": {"port": "app"}, "periodSeconds": 5},
    }
    if app.replicas < 0:
        raise ValuesError("app.replicas: must not be negative")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": t.metadata(app.name, "app"),
        "spec": {
            "replicas": app.replicas,
            "selector": {"matchLabels": t.selector("app")},
            "template": {
                "metadata": {"labels": t.labels("app")},
                "spec": t.pod_spec([application, target], grace=t.grace_period(10)),
            },
        },
    }
    return [deployment]


# --- network policies -------------------------------------------------------------------------

# Who may reach each component's ports on the pod network (ingress; the LB's external
# interface is Multus's and outside NetworkPolicy). The components are the pods' labels: "app"
# is the application pod, whose "target" sidecar is the NSP's and the proxy's client. Traffic
# from the node itself (the kubelet's probes) is always allowed by NetworkPolicy. Listed in
# docs/security.md.
CALLERS: dict[str, list[tuple[tuple[str, int, str], tuple[str, ...]]]] = {
    "nsp": [(("grpc", NSP_PORT, "TCP"), ("lb", "proxy", "app"))],
    "ipam": [(("grpc", IPAM_PORT, "TCP"), ("proxy",))],
    "lb": [(CONNECT, ("proxy",)), (VXLAN, ("proxy",))],
    "proxy": [(CONNECT, ("app",)), (VXLAN, ("lb", "app"))],
    "app": [(VXLAN, ("proxy",))],
}


def _gateway_blocks(config: dict[str, Any], attractor: str) -> list[dict[str, Any]]:
    """ipBlocks of the attractor's gateways (a host route each)."""
    out = []
    for gateway in _attractor_gateways(config, attractor):
        address = str(gateway.get("address", ""))
        if address:
            bits = 128 if ":" in address else 32
            out.append({"ipBlock": {"cidr": f"{address}/{bits}"}})
    return out


def _network_policy(
    t: _Trench, component: str, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The NetworkPolicy of ``component``'s pods: each port from the roles of CALLERS; the
    LB's BGP and BFD ports from its attractor's gateways; metrics (when on) from anywhere."""
    rules: list[dict[str, Any]] = []
    for (_name, port, protocol), callers in CALLERS[component]:
        rules.append(
            {
                "from": [{"podSelector": {"matchLabels": t.selector(c)}} for c in callers],
                "ports": [{"port": port, "protocol": protocol}],
            }
        )
    if component == "lb" and config is not None:
        attractor = _attractor(t, config)
        blocks = _gateway_blocks(config, attractor) if attractor else []
        frontend = _frontend_ports(config, attractor) if attractor else []
        if blocks and frontend:
            rules.append(
                {
                    "from": blocks,
                    "ports": [{"port": port, "protocol": proto} for _n, port, proto in frontend],
                }
            )
    if t.v.metrics:
        rules.append({"ports": [{"port": METRICS_PORT, "protocol": "TCP"}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": t.metadata(t.name(component), component),
        "spec": {
            "podSelector": {"matchLabels": t.selector(component)},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }


# --- rendering --------------------------------------------------------------------------------

FILES = ("namespace", "configuration", "ipam", "nsp", "lb", "proxy", "app")


def render_files(values: Values) -> dict[str, list[dict[str, Any]]]:
    """File stem -> the manifests of that file, in apply order."""
    if values.drain_timeout < 0:
        raise ValuesError("drain-timeout: must not be negative")
    if values.tls.mode not in TLS_MODES:
        raise ValuesError(f"tls.mode: one of {', '.join(TLS_MODES)}, not {values.tls.mode!r}")
    t = _Trench(values)
    config = configuration(values)
    files: dict[str, list[dict[str, Any]]] = {}
    if values.namespace != "default":
        files["namespace"] = [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": values.namespace,
                    "labels": {"app.kubernetes.io/part-of": "meridio"},
                },
            }
        ]
    files["configuration"] = [_configmap(t, config)]
    files["ipam"] = [t.service_account_doc("ipam"), *_ipam(t)]
    files["nsp"] = [t.service_account_doc("nsp"), *_nsp(t)]
    files["lb"] = [t.service_account_doc("lb"), *_lb(t, config)]
    files["proxy"] = [t.service_account_doc("proxy"), *_proxy(t, config)]
    files["app"] = [t.service_account_doc("target"), *_app(t, config)]
    if values.network_policies:
        for component in CALLERS:
            files[component].append(_network_policy(t, component, config))
    return files


def render(values: Values) -> list[dict[str, Any]]:
    """Every manifest, in apply order."""
    return [doc for docs in render_files(values).values() for doc in docs]


def dump(docs: Sequence[Mapping[str, Any]]) -> str:
    return "".join(
        "---\n" + yaml.dump(dict(d), Dumper=_Dumper, sort_keys=False, width=100) for d in docs
    )


HEADER = "# Rendered by `meridioctl manifest {source}`: change that file, not this one.\n"


@click.command()
@click.argument("values_file", type=click.Path(dir_okay=False))
@click.option(
    "--output-dir",
    "-d",
    type=click.Path(file_okay=False),
    help="Write one file per component here instead of printing every manifest.",
)
def manifest(values_file: str, output_dir: str | None) -> None:
    """Render the Kubernetes manifests of one trench from VALUES_FILE.

    Start from config/kubernetes/values.yaml (every key, with its default, explained).
    Apply with: meridioctl manifest values.yaml | kubectl apply -f -
    """
    try:
        files = render_files(load_values(values_file))
    except ValuesError as exc:
        raise click.ClickException(str(exc)) from exc
    header = HEADER.format(source=values_file)
    if output_dir is None:
        click.echo(header + dump([d for docs in files.values() for d in docs]), nl=False)
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stem, docs in files.items():
        (out / f"{stem}.yaml").write_text(header + dump(docs), encoding="utf-8")
    click.echo(f"wrote {', '.join(f'{s}.yaml' for s in files)} to {out}", err=True)
