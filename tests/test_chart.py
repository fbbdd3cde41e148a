"""The Helm chart (charts/kubellm), offline: `helm lint` and `helm template` over the CI values
matrix, assertions on the rendered objects, the values schema and documentation, and the parts of
the chart that can be run for real without a cluster (probe paths, the Grafana dashboard's metric
names and the `helm test` script against a router process, the Redis command line against
redis-server). tests/test_chart_cluster.py installs the chart on a real API server.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubellm.router.config._schema import RouterSettings
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.kube import KubeBinaries, ensure_binaries
from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess, free_port, http_get

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubellm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "kubellm", "kubellm"
UPSTREAM_KEY = "sk-upstream-chart"
MASTER_KEY = "sk-master-chart-0123456789"

Doc = dict[str, Any]
Grant = tuple[str, str, str, str, str]  # (scope, apiGroup, resource, verb, resourceName or *)

CLUSTER_SCOPED = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
WORKLOADS = {"Deployment", "StatefulSet"}


# --------------------------------------------------------------------------- helm


@functools.cache
def binaries() -> KubeBinaries:
    return ensure_binaries()


@functools.cache
def kube_version() -> str:
    """The control plane's version (helm built from source defaults to v1.20 without it)."""
    found = re.search(r"v(\d+\.\d+\.\d+)", binaries().k8s_dir.name)
    return found.group(1) if found else "1.37.2"


def helm(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "kubellm-chart-helm"
    full_env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        **(env or {}),
    }
    out = subprocess.run(
        [str(binaries().helm), *args], capture_output=True, text=True, env=full_env, timeout=120, check=False
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} exited {out.returncode}:\n{out.stderr}\n{out.stdout[-2000:]}"
        )
    return out


def template_args(
    values: Sequence[Path] = (),
    sets: Sequence[str] = (),
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", kube_version()]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return args


def render(
    values: Sequence[Path] = (),
    sets: Sequence[str] = (),
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    extra: Sequence[str] = (),
) -> list[Doc]:
    out = helm(*template_args(values, sets, release=release, namespace=namespace), *extra)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@functools.cache
def _render_cached(values: tuple[Path, ...], sets: tuple[str, ...]) -> str:
    return json.dumps(render(values, sets))


def rendered(values: Sequence[Path] = (), sets: Sequence[str] = ()) -> list[Doc]:
    """``render``, memoized per (values, sets): a fresh copy each call."""
    docs: list[Doc] = json.loads(_render_cached(tuple(values), tuple(sets)))
    return docs


def find(docs: Iterable[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} rendered"
    return found[0]


def kinds(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def component(docs: Iterable[Doc], kind: str, part: str) -> Doc:
    found = [
        d
        for d in docs
        if d["kind"] == kind and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == part
    ]
    assert len(found) == 1, f"{len(found)} {kind} of component {part}"
    return found[0]


def container(workload: Doc, name: str | None = None) -> Doc:
    spec = workload["spec"]["template"]["spec"] if "template" in workload["spec"] else workload["spec"]
    containers: list[Doc] = spec["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"] if "template" in workload["spec"] else workload["spec"]
    return spec


def arg(c: Doc, flag: str) -> str:
    for a in c["args"]:
        if a.startswith(flag + "="):
            return str(a.split("=", 1)[1])
    raise AssertionError(f"{flag} not in {c['args']}")


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env") or []}


# --------------------------------------------------------------------------- lint, template, matrix


def test_ci_matrix() -> None:
    names = {p.name.removesuffix("-values.yaml") for p in CI_VALUES}
    assert names == {
        "default",
        "external-redis",
        "minimal-no-redis",
        "ingress-tls-monitoring",
        "hpa-custom-metric",
    }


def test_offline_helm_assumes_the_control_planes_kubernetes(tmp_path: Path) -> None:
    """Issue 15 defect 2: helm built without its Makefile's `k8sVersion` stamps assumes v1.20.0
    offline, and `helm template charts/kubellm` then fails the chart's kubeVersion (>=1.25)."""
    probe = tmp_path / "probe"
    (probe / "templates").mkdir(parents=True)
    (probe / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (probe / "templates" / "v.yaml").write_text("kubeVersion: {{ .Capabilities.KubeVersion.Version }}\n")
    assumed = yaml.safe_load(helm("template", "probe", str(probe)).stdout)["kubeVersion"]
    major_minor = ".".join(kube_version().split(".")[:2])
    assert assumed == f"v{major_minor}.0"
    for command in ("template", "lint"):
        args = [command, *(["kubellm"] if command == "template" else []), str(CHART)]
        out = helm(*args, check=False)  # no --kube-version: what a contributor types
        assert out.returncode == 0 and "kubeVersion" not in out.stderr, out.stderr + out.stdout[-500:]


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_helm_lint(values: Path) -> None:
    out = helm("lint", str(CHART), "--strict", "--kube-version", kube_version(), "-f", str(values))
    assert "[ERROR]" not in out.stdout and "[WARNING]" not in out.stdout, out.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_helm_template_objects_are_complete_and_secure(values: Path) -> None:
    docs = rendered([values])
    names: set[tuple[str, str, str]] = set()
    for d in docs:
        meta = d["metadata"]
        ident = (d["kind"], meta.get("namespace", ""), meta["name"])
        assert ident not in names, f"duplicate {ident}"
        names.add(ident)
        assert len(meta["name"]) <= 63 and not meta["name"].endswith("-")
        if d["kind"] not in CLUSTER_SCOPED:
            assert meta.get("namespace"), f"{d['kind']} {meta['name']} names no namespace"
        labels = meta.get("labels") or {}
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", f"{d['kind']} {meta['name']}"
        assert labels.get("app.kubernetes.io/instance") == RELEASE
    pods = [d for d in docs if d["kind"] in WORKLOADS or d["kind"] == "Pod"]
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in pods} >= {
        "operator",
        "router",
        "test",
    }
    for workload in pods:
        spec = pod_spec(workload)
        what = f"{workload['kind']} {workload['metadata']['name']}"
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, what
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", what
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc["readOnlyRootFilesystem"] is True, what
            assert sc["capabilities"]["drop"] == ["ALL"], what
            assert sc.get("privileged") is not True, what
            res = c["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"], what
            assert res["limits"]["cpu"] and res["limits"]["memory"], what
            assert c.get("image") and ":" in c["image"].rsplit("/", 1)[-1], what
    # The operator validates its settings file against the router schema at start: so do we.
    from kubellm.router.config._schema import RouterSettings

    settings = yaml.safe_load(find(docs, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    assert RouterSettings.model_validate(settings).master_key_env == "KUBELLM_MASTER_KEY"


def test_read_only_root_filesystem_has_writable_state_and_tmp() -> None:
    docs = rendered()
    router = component(docs, "Deployment", "router")
    c = container(router)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    state_dir = env_of(c)["KUBELLM_STATE_DIR"]["value"]
    assert state_dir in mounts and "/tmp" in mounts
    volumes = {v["name"]: v for v in pod_spec(router)["volumes"]}
    assert "emptyDir" in volumes[mounts[state_dir]] and "emptyDir" in volumes[mounts["/tmp"]]
    operator = container(component(docs, "Deployment", "operator"))
    assert "/tmp" in {m["mountPath"] for m in operator["volumeMounts"]}
    redis = container(component(docs, "StatefulSet", "redis"))
    assert {m["mountPath"] for m in redis["volumeMounts"]} == {"/data"}


# --------------------------------------------------------------------------- CRDs


def _without_chart_metadata(doc: Doc) -> Doc:
    out = json.loads(json.dumps(doc))
    meta = out["metadata"]
    meta.pop("annotations", None)
    meta["labels"] = {
        k: v
        for k, v in meta.get("labels", {}).items()
        if not k.startswith("helm.sh/")
        and k
        not in (
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/version",
            "app.kubernetes.io/part-of",
        )
    }
    return dict(out)


def test_chart_crds_are_identical_to_crds_folder() -> None:
    source = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    shipped = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert sorted(shipped) == sorted(source), "charts/kubellm/files/crds/ must hold exactly crds/*.yaml"
    stale = [name for name in source if shipped[name] != source[name]]
    assert not stale, f"{stale} differ: run `cp crds/*.yaml charts/kubellm/files/crds/`"
    docs = rendered()
    crds = {d["metadata"]["name"]: d for d in kinds(docs, "CustomResourceDefinition")}
    for text in source.values():
        want = yaml.safe_load(text)
        got = crds.pop(want["metadata"]["name"])
        assert got["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert got["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert _without_chart_metadata(got) == _without_chart_metadata(want)
    assert not crds


def test_crds_keep_and_enabled_switches() -> None:
    unkept = kinds(rendered(sets=["crds.keep=false"]), "CustomResourceDefinition")
    assert len(unkept) == 4 and all("annotations" not in d["metadata"] for d in unkept)
    assert kinds(rendered(sets=["crds.enabled=false"]), "CustomResourceDefinition") == []


# --------------------------------------------------------------------------- router workload


def test_hpa_targets_the_router_deployment() -> None:
    docs = rendered()
    router = component(docs, "Deployment", "router")
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert ref == {"apiVersion": "apps/v1", "kind": "Deployment", "name": router["metadata"]["name"]}
    assert "replicas" not in router["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]
    fixed = component(rendered(sets=["router.autoscaling.enabled=false"]), "Deployment", "router")
    assert fixed["spec"]["replicas"] == 2


def test_hpa_custom_metric_is_the_routers_in_flight_gauge() -> None:
    from kubellm.router.observability import _metrics

    docs = rendered([CHART / "ci" / "hpa-custom-metric-values.yaml"])
    metrics = find(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    pods = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert pods == [
        {
            "metric": {"name": "kubellm_in_flight_requests"},
            "target": {"type": "AverageValue", "averageValue": "16"},
        }
    ]
    assert _metrics.IN_FLIGHT._name == "kubellm_in_flight_requests"
    assert {m["resource"]["name"] for m in metrics if m["type"] == "Resource"} == {"cpu", "memory"}
    assert (
        find(docs, "HorizontalPodAutoscaler")["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
        == 300
    )


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_router_shutdown_outlasts_drain_and_grace(values: Path) -> None:
    docs = rendered([values])
    router = component(docs, "Deployment", "router")
    c = container(router)
    settings = yaml.safe_load(find(docs, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    grace = float(arg(c, "--grace-period"))
    drain = float(settings["drainDelaySeconds"])
    sleep = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep" and sleep > 0
    assert drain > 0  # keep-alive clients are told `Connection: close` before the router stops
    assert pod_spec(router)["terminationGracePeriodSeconds"] > sleep + drain + grace
    assert router["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_router_command_probes_and_service() -> None:
    docs = rendered()
    router = component(docs, "Deployment", "router")
    c = container(router)
    assert c["args"][0] == "router"
    assert arg(c, "--kube-secret") == f"{NAMESPACE}/{RELEASE}-router-config"
    assert arg(c, "--host") == "0.0.0.0" and arg(c, "--port") == "8000"
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/liveness", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/readiness", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000}
    master = env_of(c)["KUBELLM_MASTER_KEY"]["valueFrom"]["secretKeyRef"]
    assert master == {"name": f"{RELEASE}-master-key", "key": "masterKey"}
    svc = find(docs, "Service", RELEASE)
    assert svc["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    spread = pod_spec(router)["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(s["labelSelector"]["matchLabels"] == router["spec"]["selector"]["matchLabels"] for s in spread)
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": router["spec"]["selector"]}
    # The operator renders into the Secret the routers follow.
    op = container(component(docs, "Deployment", "operator"))
    assert op["args"][0] == "operator"
    assert arg(op, "--config-secret") == f"{RELEASE}-router-config" and arg(op, "--namespace") == NAMESPACE
    assert arg(op, "--router-settings") == "/etc/kubellm/settings.yaml"
    assert arg(op, "--lease-name") == f"{RELEASE}-operator"
    assert op["livenessProbe"]["httpGet"]["path"] == "/healthz" == arg(op, "--liveness").rsplit(":8080", 1)[1]


def test_probe_paths_answer_200_on_a_real_router(tmp_path: Path) -> None:
    c = container(component(rendered(), "Deployment", "router"))
    with RouterProcess() as router:  # the embedded default config, on loopback
        for probe in ("livenessProbe", "readinessProbe"):
            status, body = http_get(router.base_url + c[probe]["httpGet"]["path"])
            assert status == 200, (probe, body)


def test_shared_state_wiring() -> None:
    """Routers and the operator get the Redis URL and password in the variables the rendered
    settings name, so neither ever appears in the config Secret."""
    docs = rendered()
    settings = yaml.safe_load(find(docs, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    assert settings["redis"] == {
        "urlEnv": "KUBELLM_REDIS_URL",
        "passwordEnv": "KUBELLM_REDIS_PASSWORD",
        "keyPrefix": "kubellm:",
        "failOpen": True,
    }
    for part in ("router", "operator"):
        env = env_of(container(component(docs, "Deployment", part)))
        assert env["KUBELLM_REDIS_URL"]["value"] == f"redis://{RELEASE}-redis.{NAMESPACE}.svc:6379/0"
        assert env["KUBELLM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{RELEASE}-redis",
            "key": "password",
        }
    redis = component(docs, "StatefulSet", "redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert find(docs, "Service", f"{RELEASE}-redis")["spec"]["ports"][0]["port"] == 6379

    external = rendered([CHART / "ci" / "external-redis-values.yaml"])
    assert kinds(external, "StatefulSet") == [] and kinds(external, "Secret") == []  # no generated Secrets
    settings = yaml.safe_load(find(external, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    assert settings["redis"]["keyPrefix"] == "prod:kubellm:" and settings["redis"]["failOpen"] is False
    env = env_of(container(component(external, "Deployment", "router")))
    assert env["KUBELLM_REDIS_URL"]["value"] == "rediss://redis.example.internal:6380/2"
    assert env["KUBELLM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kubellm-redis-credentials",
        "key": "redis-password",
    }
    assert env["KUBELLM_MASTER_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "kubellm-master-key",
        "key": "key",
    }

    minimal = rendered([CHART / "ci" / "minimal-no-redis-values.yaml"])
    settings = yaml.safe_load(find(minimal, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    assert "redis" not in settings
    for part in ("router", "operator"):
        assert not {"KUBELLM_REDIS_URL", "KUBELLM_REDIS_PASSWORD"} & set(
            env_of(container(component(minimal, "Deployment", part)))
        )
    assert {d["kind"] for d in minimal}.isdisjoint(
        {"StatefulSet", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    )
    assert component(minimal, "Deployment", "router")["spec"]["replicas"] == 1


def test_sinks_and_their_credentials_reach_the_router_settings_and_env(tmp_path: Path) -> None:
    """router.sinks become settings.sinks; their credentials are env vars from Secrets, never values."""
    values = tmp_path / "sinks-values.yaml"
    sinks = [
        {"type": "sentry", "dsnEnv": "SENTRY_DSN", "environment": "prod"},
        {"type": "supabase", "url": "https://x.supabase.co", "apiKeyEnv": "SUPABASE_KEY"},
        {"type": "traceloop", "apiKeyEnv": "TRACELOOP_KEY"},
    ]
    credentials = [
        {"name": "SENTRY_DSN", "secretName": "sentry", "secretKey": "dsn"},
        {"name": "SUPABASE_KEY", "secretName": "supabase", "secretKey": "service-key"},
        {"name": "TRACELOOP_KEY", "secretName": "traceloop", "secretKey": "api-key"},
    ]
    values.write_text(yaml.safe_dump({"router": {"sinks": sinks, "sinkCredentials": credentials}}))
    docs = render([values])
    settings = yaml.safe_load(find(docs, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    assert settings["sinks"] == sinks
    from kubellm.router import parse_config

    assert [s.type for s in parse_config({"settings": settings}).settings.sinks] == [
        "sentry",
        "supabase",
        "traceloop",
    ]
    env = env_of(container(component(docs, "Deployment", "router")))
    for cred in credentials:
        assert env[cred["name"]]["valueFrom"]["secretKeyRef"] == {
            "name": cred["secretName"],
            "key": cred["secretKey"],
        }
    assert "sinks" not in yaml.safe_load(
        find(rendered(), "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"]
    )


def test_redis_auth_variants() -> None:
    no_auth = rendered(sets=["redis.auth.enabled=false"])
    assert [d["metadata"]["name"] for d in kinds(no_auth, "Secret")] == [f"{RELEASE}-master-key"]
    settings = yaml.safe_load(find(no_auth, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    assert "passwordEnv" not in settings["redis"] and settings["redis"]["urlEnv"] == "KUBELLM_REDIS_URL"
    redis = container(component(no_auth, "StatefulSet", "redis"))
    assert "--requirepass" not in redis["args"] and "--protected-mode" in redis["args"] and "env" not in redis
    assert "KUBELLM_REDIS_PASSWORD" not in env_of(container(component(no_auth, "Deployment", "router")))

    own = rendered(sets=["redis.auth.existingSecret=my-redis", "redis.auth.existingSecretPasswordKey=pw"])
    assert [d["metadata"]["name"] for d in kinds(own, "Secret")] == [f"{RELEASE}-master-key"]
    for c in (
        container(component(own, "StatefulSet", "redis")),
        container(component(own, "Deployment", "router")),
    ):
        refs = [
            e["valueFrom"]["secretKeyRef"]
            for e in c["env"]
            if "valueFrom" in e and "redis" in e["name"].lower()
        ]
        assert refs and all(r == {"name": "my-redis", "key": "pw"} for r in refs)


def test_generated_secrets_look_right() -> None:
    docs = rendered()
    master = base64.b64decode(find(docs, "Secret", f"{RELEASE}-master-key")["data"]["masterKey"]).decode()
    assert re.fullmatch(r"sk-[A-Za-z0-9]{48}", master)
    password = base64.b64decode(find(docs, "Secret", f"{RELEASE}-redis")["data"]["password"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", password)


# --------------------------------------------------------------------------- RBAC


#: What the brief allows (everything the chart grants must be in here). ``NS`` is the release
#: namespace, ``CONFIG`` the rendered config Secret.
ALLOWED: dict[str, set[Grant]] = {
    "operator": {
        *{
            ("cluster", "kubellm.io", r, v, "*")
            for r in ("modeldeployments", "modelgroups", "apikeys", "identitybindings")
            for v in ("get", "list", "watch", "patch")
        },
        *{
            ("cluster", "kubellm.io", f"{r}/status", "patch", "*")
            for r in ("modeldeployments", "modelgroups", "apikeys", "identitybindings")
        },
        *{("cluster", "", "secrets", v, "*") for v in ("get", "list", "watch", "create", "update", "patch")},
        ("cluster", "", "events", "create", "*"),
        # kopf lists CRDs to notice the ones installed after it started.
        *{
            ("cluster", "apiextensions.k8s.io", "customresourcedefinitions", v, "*")
            for v in ("get", "list", "watch")
        },
        *{("NS", "coordination.k8s.io", "leases", v, "*") for v in ("get", "create", "update")},
    },
    "router": {
        *{("NS", "", "secrets", v, "CONFIG") for v in ("get", "list", "watch")},
        # ServiceAccount tokens as credentials (docs/kubernetes.md, Identities).
        ("cluster", "authentication.k8s.io", "tokenreviews", "create", "*"),
    },
}


def grants(docs: Iterable[Doc], sa: str, sa_namespace: str, *, namespace: str, config: str) -> set[Grant]:
    """Every (scope, group, resource, verb, name) the ServiceAccount gets from these objects."""
    docs = list(docs)
    roles = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
    }
    out: set[Grant] = set()
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == sa_namespace
            for s in binding["subjects"]
        ):
            continue
        ref = binding["roleRef"]
        role_ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_ns, ref["name"])]
        if binding["kind"] == "ClusterRoleBinding":
            scope = "cluster"
        else:
            bound_ns = binding["metadata"]["namespace"]
            scope = "NS" if bound_ns == namespace else bound_ns
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or ["*"]:
                            assert "*" not in (group, resource, verb), (
                                f"wildcard in {role['metadata']['name']}"
                            )
                            out.add((scope, group, resource, verb, "CONFIG" if name == config else name))
    return out


@functools.cache
def deploy_grants() -> dict[str, frozenset[Grant]]:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text()) if d]
    return {
        part: frozenset(
            grants(
                docs,
                f"kubellm-{part}",
                "kubellm-system",
                namespace="kubellm-system",
                config="kubellm-router-config",
            )
        )
        for part in ("operator", "router")
    }


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_rbac_is_least_privilege_and_matches_deploy(values: Path) -> None:
    docs = rendered([values])
    config = f"{RELEASE}-router-config"
    watched = yaml.safe_load(values.read_text()) or {}
    watched = set((watched.get("operator") or {}).get("watchNamespaces") or [])
    for part in ("operator", "router"):
        got = grants(docs, f"{RELEASE}-{part}", NAMESPACE, namespace=NAMESPACE, config=config)
        want = set(deploy_grants()[part])
        if watched and part == "operator":
            # Rendering some namespaces: the ClusterRole's rules are bound in each of them and at
            # home (the config Secret); only the CRD rule stays cluster-wide.
            namespaced = {g for g in want if g[0] == "cluster" and g[2] != "customresourcedefinitions"}
            want = (want - namespaced) | {(ns, *g[1:]) for g in namespaced for ns in ("NS", *watched)}
        assert got == want, f"{part}: chart and deploy/rbac.yaml differ: {sorted(got ^ want)}"
        widened = {("cluster", *g[1:]) if g[0] in watched else g for g in got}
        widened = {
            ("cluster", *g[1:]) if g[0] == "NS" and g[2] != "leases" and part == "operator" else g
            for g in widened
        }
        assert widened <= ALLOWED[part], f"{part} gets more than allowed: {sorted(widened - ALLOWED[part])}"
    router_role = find(docs, "Role", f"{RELEASE}-router")
    assert router_role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [config],
            "verbs": ["get", "list", "watch"],
        }
    ]


def test_service_accounts_and_rbac_can_be_external() -> None:
    docs = rendered(
        sets=["rbac.create=false", "router.serviceAccount.create=false", "router.serviceAccount.name=mine"]
    )
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & {d["kind"] for d in docs}
    assert pod_spec(component(docs, "Deployment", "router"))["serviceAccountName"] == "mine"
    assert [d["metadata"]["name"] for d in kinds(docs, "ServiceAccount")] == [f"{RELEASE}-operator"]


# --------------------------------------------------------------------------- options


def test_ingress_tls_servicemonitor_networkpolicy() -> None:
    docs = rendered([CHART / "ci" / "ingress-tls-monitoring-values.yaml"])
    ing = find(docs, "Ingress")
    assert ing["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt-prod"
    assert ing["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "kubellm-tls"}]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": RELEASE, "port": {"name": "http"}}
    sm = find(docs, "ServiceMonitor")
    assert (
        sm["apiVersion"] == "monitoring.coreos.com/v1"
        and sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    )
    assert sm["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert sm["spec"]["selector"]["matchLabels"] == find(docs, "Service", RELEASE)["spec"]["selector"]
    policies = {p["metadata"]["name"]: p["spec"] for p in kinds(docs, "NetworkPolicy")}
    assert set(policies) == {f"{RELEASE}-router", f"{RELEASE}-operator", f"{RELEASE}-redis"}
    router_from = policies[f"{RELEASE}-router"]["ingress"][0]["from"]
    assert len(router_from) == 4  # three namespaces, and the helm test pod
    test_pod = find(docs, "Pod")
    assert router_from[-1]["podSelector"]["matchLabels"].items() <= test_pod["metadata"]["labels"].items()
    redis_from = policies[f"{RELEASE}-redis"]["ingress"][0]["from"]
    for part, peer in zip(("router", "operator"), redis_from, strict=True):
        labels = component(docs, "Deployment", part)["spec"]["template"]["metadata"]["labels"]
        assert peer["podSelector"]["matchLabels"].items() <= labels.items()
    op = container(component(docs, "Deployment", "operator"))
    assert "livenessProbe" not in op, "standbys (replicaCount 2) serve no liveness endpoint"
    assert [a for a in op["args"] if a.startswith("--watch-namespace")] == [
        "--watch-namespace=team-a",
        "--watch-namespace=team-b",
    ]
    for default_off in ("Ingress", "ServiceMonitor", "NetworkPolicy"):
        assert kinds(rendered(), default_off) == []


def test_dashboard_configmap() -> None:
    cm = find(rendered(), "ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["kubellm.json"])
    assert dashboard["uid"] == "kubellm-overview" and dashboard["panels"]
    off = rendered(sets=["dashboard.enabled=false"])
    assert [d["metadata"]["name"] for d in kinds(off, "ConfigMap")] == [f"{RELEASE}-settings"]


def test_extra_env_volumes_scheduling_and_image() -> None:
    sets = [
        "image.repository=registry.example/kubellm",
        "image.digest=sha256:" + "a" * 64,
        "router.extraEnv[0].name=OPENAI_API_KEY",
        "router.extraEnv[0].valueFrom.secretKeyRef.name=openai",
        "router.extraEnv[0].valueFrom.secretKeyRef.key=apiKey",
        "router.extraVolumes[0].name=creds",
        "router.extraVolumes[0].secret.secretName=vertex",
        "router.extraVolumeMounts[0].name=creds",
        "router.extraVolumeMounts[0].mountPath=/var/run/creds",
        "router.nodeSelector.pool=llm",
        "router.tolerations[0].key=dedicated",
        "router.tolerations[0].operator=Exists",
        "operator.extraEnv[0].name=EXTRA",
        "imagePullSecrets[0].name=regcred",
        "commonLabels.team=platform",
    ]
    docs = render(sets=sets, extra=["--set-string", "operator.extraEnv[0].value=1"])
    router = component(docs, "Deployment", "router")
    c = container(router)
    assert c["image"] == "registry.example/kubellm@sha256:" + "a" * 64
    assert env_of(c)["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "openai"
    assert {"name": "creds", "mountPath": "/var/run/creds"} in c["volumeMounts"]
    spec = pod_spec(router)
    assert {"name": "creds", "secret": {"secretName": "vertex"}} in spec["volumes"]
    assert spec["nodeSelector"] == {"pool": "llm"} and spec["tolerations"][0]["key"] == "dedicated"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert env_of(container(component(docs, "Deployment", "operator")))["EXTRA"]["value"] == "1"
    assert all(d["metadata"]["labels"]["team"] == "platform" for d in docs)


def test_names_are_truncated_to_63_characters() -> None:
    long = "x" * 70
    for sets in ([f"fullnameOverride={long[:63]}"], [f"nameOverride={long[:63]}"]):
        docs = render(sets=[*sets, "ingress.enabled=true", "networkPolicy.enabled=true"], release="r" * 53)
        seen: set[tuple[str, str, str]] = set()
        for d in docs:
            name = d["metadata"]["name"]
            assert len(name) <= 63 and not name.endswith("-"), name
            ident = (d["kind"], d["metadata"].get("namespace", ""), name)
            assert ident not in seen, f"{ident} collides"
            seen.add(ident)
            for value in (d["metadata"].get("labels") or {}).values():
                assert len(value) <= 63
        assert len(component(docs, "StatefulSet", "redis")["metadata"]["name"]) <= 52
        for part in ("operator", "router"):
            assert len(pod_spec(component(docs, "Deployment", part))["serviceAccountName"]) <= 63


# --------------------------------------------------------------------------- values: schema and docs


SCHEMA_REJECTS = [
    (["--set", "router.replicaCount=two"], "replicaCount"),
    (["--set", "replicaCount=2"], "replicaCount"),  # unknown top-level key
    (["--set", "router.replicas=2"], "replicas"),  # unknown nested key
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "router.gracePeriodSeconds=-1"], "gracePeriodSeconds"),
    (["--set", "router.service.type=Internal"], "type"),
    (["--set", "router.logLevel=verbose"], "logLevel"),
    (["--set", "router.settings.redis.url=redis://x"], "redis"),
    (["--set", "router.settings.masterKeyHash=" + "0" * 64], "masterKeyHash"),
    (["--set", "operator.watchNamespaces[0]=Not_A_Namespace"], "watchNamespaces"),
    (["--set", "externalRedis.url=http://redis"], "url"),
    (["--set", "externalRedis.mode=replicated"], "mode"),
    (["--set", "externalRedis.sentinels[0]=no-port"], "sentinels"),
    (["--set", "image.digest=latest"], "digest"),
    (["--set", "redis.persistence.accessModes[0]=Sometimes"], "accessModes"),
    (["--set-string", "router.port=8000"], "port"),
    (["--set", "router.sinks[0].type=sentry", "--set", "router.sinks[0].dsn=https://k@h/1"], "dsn"),
    (["--set", "router.sinks[0].type=splunk"], "type"),
    (["--set", "router.settings.sinks[0].type=webhook"], "sinks"),
    # A test image repository without a tag or digest would render `repo:` (issue 15 defect 6).
    (["--set", "tests.image.repository=mirror/python"], "tests/image"),
    (["--set", "tests.image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "tests.image.registry=x"], "registry"),
]
#: Combinations the schema cannot express fail in the templates, with a message (`helm lint`
#: reports a template's `fail` as [INFO] only, so these are checked with `helm template`).
TEMPLATE_REJECTS = [
    (["--set", "externalRedis.url=redis://x:6379/0"], "both set"),
    (["--set", "router.sinks[0].type=sentry", "--set", "router.sinks[0].dsnEnv=SENTRY_DSN"], "SENTRY_DSN"),
    (
        ["--set", "redis.enabled=false", "--set", "externalRedis.url=redis://u:p@x:6379/0"],
        "must not contain credentials",
    ),
    (
        ["--set", "router.autoscaling.minReplicas=5", "--set", "router.autoscaling.maxReplicas=2"],
        "minReplicas",
    ),
    (["--set", "externalRedis.mode=cluster"], "needs redis.enabled=false"),
    (["--set", "redis.enabled=false", "--set", "externalRedis.mode=sentinel"], "masterName"),
    (
        [
            "--set",
            "redis.enabled=false",
            "--set",
            "externalRedis.mode=cluster",
            "--set",
            "externalRedis.url=redis://r:6379/0",
            "--set-json",
            'redis.keyPrefix="{k}:"',
        ],
        "hash tag",
    ),
]


def _ids(cases: list[tuple[list[str], str]]) -> list[str]:
    return [" ".join(a[1::2]) for a, _ in cases]


@pytest.mark.parametrize(("args", "mentions"), SCHEMA_REJECTS, ids=_ids(SCHEMA_REJECTS))
def test_schema_rejects_bad_values(args: list[str], mentions: str) -> None:
    out = helm(*template_args(), *args, check=False)
    assert out.returncode != 0, f"accepted: {args}"
    assert "schema" in out.stderr and mentions in out.stderr, out.stderr
    lint = helm("lint", str(CHART), "--kube-version", kube_version(), *args, check=False)
    assert lint.returncode != 0 and mentions in lint.stdout, lint.stdout


@pytest.mark.parametrize(("args", "mentions"), TEMPLATE_REJECTS, ids=_ids(TEMPLATE_REJECTS))
def test_templates_reject_contradictory_values(args: list[str], mentions: str) -> None:
    out = helm(*template_args(), *args, check=False)
    assert out.returncode != 0, f"accepted: {args}"
    assert mentions in out.stderr, out.stderr


def test_schema_accepts_every_ci_values_file_and_the_defaults() -> None:
    import jsonschema  # type: ignore[import-untyped]

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)


def _value_keys(node: yaml.Node | None, path: str = "") -> Iterator[tuple[str, str, int]]:
    """(dotted path, key, line) of every mapping key, not descending into lists."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            dotted = f"{path}.{key.value}" if path else str(key.value)
            yield dotted, str(key.value), key.start_mark.line
            yield from _value_keys(value, dotted)


def test_every_value_is_documented_by_a_comment_naming_it() -> None:
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    undocumented = []
    for dotted, key, line in _value_keys(yaml.compose(text)):
        comments = []
        i = line - 1
        while i >= 0 and lines[i].strip().startswith("#"):
            comments.append(lines[i].strip())
            i -= 1
        if not any(re.match(rf"#\s*{re.escape(key)}\b", c) for c in comments):
            undocumented.append(dotted)
    assert not undocumented, f"values without a '# key -- ...' comment: {undocumented}"


def test_schema_covers_every_value() -> None:
    """additionalProperties: false is only useful if every key of values.yaml is in the schema."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def resolve(node: Doc) -> Doc:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        return node

    missing = []
    for dotted, _, _ in _value_keys(yaml.compose((CHART / "values.yaml").read_text())):
        node = schema
        for part in dotted.split("."):
            node = resolve(node)
            props = node.get("properties") or {}
            if part in props:
                node = props[part]
            elif node.get("additionalProperties") not in (None, False) or (
                node.get("type") == "object" and "properties" not in node
            ):
                node = {}
            else:
                missing.append(dotted)
                break
    assert not missing


# --------------------------------------------------------------------------- run the chart's commands


def test_dashboard_queries_only_metrics_a_router_exposes(tmp_path: Path) -> None:
    dashboard = json.loads((CHART / "dashboards" / "kubellm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [
        v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)
    ]
    queried = {m for e in exprs for m in re.findall(r"\bkubellm_[a-z0-9_]+", e)}
    assert len(queried) >= 15

    with RedisServer() as redis, FakeOpenAI(api_key=UPSTREAM_KEY) as broken:
        broken.always = Fault(status=500)
        config: Doc = {
            "deployments": [
                {"name": "mock", "model": "chat", "provider": "mock", "cache": True,
                 "pricing": {"inputPerMillion": "3", "outputPerMillion": "15"}},
                *({"name": f"broken-{i}", "model": "flaky", "provider": "openai-compatible",
                   "baseUrl": broken.base_url, "apiKeyEnv": "UPSTREAM_KEY"} for i in (1, 2)),
            ],
            "modelGroups": [{"name": "flaky", "fallbacks": ["chat"]}],
            "keys": [
                {"name": "team/app", "keyEnv": "APP_KEY"},
                {"name": "team/tight", "keyEnv": "TIGHT_KEY", "limits": {"rpm": 1}},
            ],
            "settings": {"numRetries": 1, "initialBackoffSeconds": 0, "cooldown": {"failureThreshold": 1},
                         "redis": {"url": redis.url}},
        }  # fmt: skip
        env = {
            "UPSTREAM_KEY": UPSTREAM_KEY,
            "APP_KEY": "sk-app-0123456789abcdef",
            "TIGHT_KEY": "sk-tight-0123456789abc",
        }
        with RouterProcess(config, env=env) as router:
            import openai

            app = openai.OpenAI(base_url=router.v1, api_key=env["APP_KEY"], max_retries=0)
            messages: Any = [{"role": "user", "content": "Hello there"}]
            app.chat.completions.create(model="chat", messages=messages)
            app.chat.completions.create(model="chat", messages=messages)  # a cache hit
            list(app.chat.completions.create(model="chat", messages=messages, stream=True))  # TTFT
            app.chat.completions.create(model="flaky", messages=messages)  # retry, breakers, fallback
            with pytest.raises(openai.NotFoundError):
                app.chat.completions.create(model="no-such-model", messages=messages)
            tight = openai.OpenAI(base_url=router.v1, api_key=env["TIGHT_KEY"], max_retries=0)
            tight.chat.completions.create(model="chat", messages=messages)
            with pytest.raises(openai.RateLimitError):
                tight.chat.completions.create(model="chat", messages=messages)
            config["settings"]["numRetries"] = 2  # a config reload
            router.write_config(config)
            deadline = time.monotonic() + 10
            while "kubellm_config_reloads_total{" not in http_get(router.base_url + "/metrics")[1].decode():
                assert time.monotonic() < deadline, router.logs()
                time.sleep(0.1)
            redis.stop()  # shared state goes away: the router fails open and counts the errors
            # Fails open; the limiter's failed Redis call is counted.
            tight.chat.completions.create(model="chat", messages=[{"role": "user", "content": "again"}])
            status, body = http_get(router.base_url + "/metrics")
    assert status == 200
    exposed = {
        line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if line.startswith("kubellm_")
    }
    assert queried <= exposed, f"the dashboard queries metrics no router exposes: {sorted(queried - exposed)}"


def _expand_kubelet_vars(text: str, env: dict[str, str]) -> str:
    """The kubelet expands $(VAR) in command and args from the container's env."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def redis_argv(c: Doc, password: str, port: int, data_dir: Path) -> list[str]:
    """The Redis container's command line as the kubelet runs it, on a local port and directory."""
    env = {"REDIS_PASSWORD": password, "REDISCLI_AUTH": password}
    argv = [_expand_kubelet_vars(a, env) for a in [*c["command"], *c["args"]]]
    argv = [str(port) if a == "6379" else str(data_dir) if a == "/data" else a for a in argv]
    assert argv[0] == "redis-server"
    return [shutil.which("redis-server") or "redis-server", *argv[1:], "--bind", "127.0.0.1"]


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")
def test_redis_command_line_runs_with_the_generated_password(tmp_path: Path) -> None:
    """The StatefulSet's command line, run by a local redis-server: it requires the password, and
    the URL + password the routers get (through RouterSettings.redis) authenticate."""
    import redis as redis_lib

    from kubellm.router.config._schema import RedisSettings
    from kubellm.router.redis_connect import redis_url

    docs = rendered()
    c = container(component(docs, "StatefulSet", "redis"))
    password = base64.b64decode(find(docs, "Secret", f"{RELEASE}-redis")["data"]["password"]).decode()
    port = free_port()
    env = {"REDIS_PASSWORD": password, "REDISCLI_AUTH": password}
    argv = redis_argv(c, password, port, tmp_path)
    assert password in argv and "--requirepass" in argv
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        probe = [
            _expand_kubelet_vars(a, env).replace("6379", str(port))
            for a in c["readinessProbe"]["exec"]["command"]
        ]
        deadline = time.monotonic() + 10
        while (
            subprocess.run(probe, env={**os.environ, **env}, check=False, capture_output=True).returncode != 0
        ):
            assert time.monotonic() < deadline and proc.poll() is None, (
                "redis never answered the readiness probe"
            )
            time.sleep(0.1)
        without = subprocess.run(probe, env={k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"},
                                 check=False, capture_output=True)  # fmt: skip
        assert without.returncode != 0, "redis answers without the password"
        settings = yaml.safe_load(find(docs, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
        os.environ["KUBELLM_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        os.environ["KUBELLM_REDIS_PASSWORD"] = password
        try:
            url = redis_url(RedisSettings.model_validate(settings["redis"]))
        finally:
            del os.environ["KUBELLM_REDIS_URL"], os.environ["KUBELLM_REDIS_PASSWORD"]
        assert url is not None and password in url
        client = redis_lib.Redis.from_url(url)
        assert client.ping() is True and client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_helm_test_pod_script_passes_against_a_real_router() -> None:
    pod = find(rendered(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = container(pod)
    # Air-gapped clusters pull nothing else: the test pod runs the kubellm image itself.
    router_image = container(component(rendered(), "Deployment", "router"))["image"]
    assert c["image"] == router_image and c["command"][0] == "python"
    custom = container(find(rendered(sets=["tests.image.repository=my/python", "tests.image.tag=3"]), "Pod"))
    assert custom["image"] == "my/python:3" and custom["imagePullPolicy"] == "IfNotPresent"
    # Air-gapped overrides: a mirrored kubellm image (by digest) and images imported into the nodes.
    digest = "sha256:" + "c" * 64
    mirrored = rendered(
        sets=[
            "image.repository=registry.internal/kubellm", f"image.digest={digest}", "image.pullPolicy=Never",
            "redis.image.repository=registry.internal/redis", "redis.image.pullPolicy=Never",
        ]
    )  # fmt: skip
    pod = container(find(mirrored, "Pod"))
    assert (pod["image"], pod["imagePullPolicy"]) == (f"registry.internal/kubellm@{digest}", "Never")
    specs = [d["spec"]["template"]["spec"] for d in mirrored if d["kind"] in WORKLOADS]
    images = {c["image"] for spec in specs for c in spec["containers"] + spec.get("initContainers", [])}
    assert images and all(i.startswith("registry.internal/") for i in images), images
    env = env_of(c)
    assert env["KUBELLM_URL"]["value"] == f"http://{RELEASE}.{NAMESPACE}.svc:80"
    assert env["KUBELLM_MASTER_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{RELEASE}-master-key",
        "key": "masterKey",
    }
    config = {"deployments": [{"model": "mock-gpt", "provider": "mock"}]}
    with RouterProcess(config, env={"KUBELLM_MASTER_KEY": MASTER_KEY}) as router:

        def run(key: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*c["command"], *c["args"]],
                env={"PATH": os.environ["PATH"], "KUBELLM_URL": router.base_url, "KUBELLM_MASTER_KEY": key},
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        ok = run(MASTER_KEY)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert '"id":"mock-gpt"' in ok.stdout
        assert run("sk-wrong-key-0123456789").returncode != 0


def test_documented_in_cluster_client_works() -> None:
    """Issue 15 defect 3: port-forward dies on a rollout, so docs/deploy.md documents a client pod
    in the cluster, run from the chart's own router image. Its image lookup names the rendered
    Deployment and container, and its script, pointed at a real router, gets an answer."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    block = re.search(r"kubectl -n kubellm run llm-client .*?\n```", doc, re.S)
    assert block is not None
    image_of = r"get deploy (\S+) -o jsonpath='\{\.spec\.template\.spec\.containers\[0\]\.image\}'"
    found = re.search(image_of, block[0])
    assert found is not None
    deployments = {d["metadata"]["name"]: d for d in rendered() if d["kind"] == "Deployment"}
    first = deployments[found[1]]["spec"]["template"]["spec"]["containers"][0]
    assert first["name"] == "router" and first["image"].startswith("ghcr.io/kubellm/kubellm:")
    script = re.search(r"python -c '(.*?)'\n```", block[0], re.S)
    assert script is not None and "http://kubellm.kubellm.svc/v1/" in script[1]
    config = {"deployments": [{"model": "mock-gpt", "provider": "mock"}]}
    with RouterProcess(config, env={"KUBELLM_MASTER_KEY": MASTER_KEY}) as router:
        out = subprocess.run(
            [sys.executable, "-c", script[1].replace("http://kubellm.kubellm.svc", router.base_url)],
            env={"PATH": os.environ["PATH"], "KEY": MASTER_KEY},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["object"] == "chat.completion"


def test_docs_reference_real_paths_and_values() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "helm install kubellm charts/kubellm -n kubellm --create-namespace" in doc
    for path in re.findall(r"(?<![\w-])(?:examples|charts|crds|deploy)/[\w./-]*[\w]", doc):
        assert (ROOT / path).exists(), path
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in re.findall(r"--set ([\w.]+)=", doc):
        node: Any = values
        for part in key.split("."):
            if node == {}:
                break  # a free-form map (router.settings, labels, ...)
            assert isinstance(node, dict) and part in node, f"docs/deploy.md sets unknown value {key}"
            node = node[part]
    for named in re.findall(
        r"`((?:router|operator|redis|ingress|networkPolicy|masterKey|crds|serviceMonitor)\.[\w.]+)`", doc
    ):
        node = values
        for part in named.split("."):
            assert isinstance(node, dict) and part in node, f"docs/deploy.md names unknown value {named}"
            node = node[part]


def test_external_redis_cluster_and_sentinel() -> None:
    """The chart points the routers and the operator at an external Redis Cluster or Sentinel set."""
    base = ["redis.enabled=false", "externalRedis.existingSecret=redis-creds"]
    cluster = rendered(
        sets=[*base, "externalRedis.mode=cluster", "externalRedis.nodes={r-0.redis:6379,r-1.redis:6379}"]
    )
    assert kinds(cluster, "StatefulSet") == []
    settings = yaml.safe_load(find(cluster, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    assert settings["redis"] == {
        "urlEnv": "KUBELLM_REDIS_URL",
        "passwordEnv": "KUBELLM_REDIS_PASSWORD",
        "keyPrefix": "kubellm:",
        "failOpen": True,
        "mode": "cluster",
        "nodes": ["r-0.redis:6379", "r-1.redis:6379"],
    }
    RouterSettings.model_validate(settings)  # the router accepts what the chart renders
    for part in ("router", "operator"):
        env = env_of(container(component(cluster, "Deployment", part)))
        assert env["KUBELLM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "redis-creds"

    sentinel = rendered(
        sets=[
            *base,
            "externalRedis.mode=sentinel",
            "externalRedis.sentinels={s-0:26379,s-1:26379,s-2:26379}",
            "externalRedis.masterName=kubellm",
            "externalRedis.sentinelPasswordKey=sentinel-password",
            "externalRedis.ledgerWaitReplicas=1",
        ]
    )
    settings = yaml.safe_load(find(sentinel, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    red = settings["redis"]
    assert red["mode"] == "sentinel" and red["masterName"] == "kubellm" and red["ledgerWaitReplicas"] == 1
    assert red["sentinels"] == ["s-0:26379", "s-1:26379", "s-2:26379"]
    assert red["sentinelPasswordEnv"] == "KUBELLM_REDIS_SENTINEL_PASSWORD"
    assert RouterSettings.model_validate(settings).redis.mode == "sentinel"
    for part in ("router", "operator"):
        env = env_of(container(component(sentinel, "Deployment", part)))
        assert env["KUBELLM_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "redis-creds",
            "key": "sentinel-password",
        }
