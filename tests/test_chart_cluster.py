"""The Helm chart on a real kube-apiserver (tests/support/kube.py): every CI values file installs
(server-side validation of every object), `helm upgrade` keeps the generated secrets, and the
operator and a router, run as processes from the installed Deployments' own command lines with
kubeconfigs of the chart's ServiceAccounts, work with exactly the chart's permissions while
anything beyond them is denied. There is no kubelet: Pods are stored, never run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kube import KubeControlPlane
from tests.support.servers import free_port, http_get
from tests.test_chart import CHART, CI_VALUES, container, env_of, redis_argv

RELEASE, NS = "kubellm", "kubellm"
CONFIG_SECRET = f"{RELEASE}-router-config"
Doc = dict[str, Any]

#: Enough of the Prometheus Operator's CRD for a ServiceMonitor to be stored.
SERVICEMONITOR_CRD: Doc = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "plural": "servicemonitors",
            "singular": "servicemonitor",
            "kind": "ServiceMonitor",
            "listKind": "ServiceMonitorList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


def wait(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def get_json(kube: KubeControlPlane, *args: str) -> Doc:
    out: Doc = json.loads(kube.kubectl("get", *args, "-o", "json").stdout)
    return out


def secret_value(kube: KubeControlPlane, namespace: str, name: str, key: str) -> str | None:
    status, body = kube.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
    if status != 200 or key not in (body.get("data") or {}):
        return None
    return base64.b64decode(body["data"][key]).decode()


def token_of(kubeconfig: Path) -> str:
    token: str = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    return token


def can_i(kube: KubeControlPlane, kubeconfig: Path, *args: str) -> bool:
    out = kube.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
    return out.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeControlPlane]:
    with KubeControlPlane() as cp:
        cp.apply(SERVICEMONITOR_CRD)
        cp.kubectl("wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com")
        yield cp


@pytest.fixture(scope="module")
def install_output(kube: KubeControlPlane) -> str:
    """`helm install kubellm charts/kubellm -n kubellm --create-namespace`, as docs/deploy.md says."""
    return kube.helm("install", RELEASE, str(CHART), "-n", NS, "--create-namespace").stdout


# --------------------------------------------------------------------------- install


def test_install_creates_every_object(kube: KubeControlPlane, install_output: str) -> None:
    manifest = kube.helm("get", "manifest", RELEASE, "-n", NS).stdout
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    assert len(docs) >= 20
    for d in docs:
        meta = d["metadata"]
        args = [d["kind"].lower(), meta["name"]] + (
            ["-n", meta["namespace"]] if meta.get("namespace") else []
        )
        assert kube.kubectl("get", *args, check=False).returncode == 0, f"{d['kind']} {meta['name']} missing"
    crds = get_json(kube, "crd", "-l", "app.kubernetes.io/instance=" + RELEASE)["items"]
    assert {c["metadata"]["name"] for c in crds} == {
        "apikeys.kubellm.io",
        "identitybindings.kubellm.io",
        "modeldeployments.kubellm.io",
        "modelgroups.kubellm.io",
    }
    for crd in crds:
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The `helm test` Pod is a hook: stored on `helm test` only, so validate it server-side now.
    hooks = kube.helm("get", "hooks", RELEASE, "-n", NS).stdout
    out = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=hooks, check=False)
    assert out.returncode == 0 and "created (server dry run)" in out.stdout, out.stderr
    notes = install_output.split("NOTES:", 1)[1]
    assert f"port-forward svc/{RELEASE} 8000:80" in notes and "kubectl get apikeys -A" in notes


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_every_ci_values_file_installs_on_the_api_server(
    kube: KubeControlPlane, install_output: str, values: Path
) -> None:
    name = "ci-" + values.stem.removesuffix("-values")
    doc = yaml.safe_load(values.read_text()) or {}
    for ns in (doc.get("operator") or {}).get("watchNamespaces") or []:
        kube.kubectl("create", "namespace", ns, check=False)
    # The CRDs belong to the first release; a second one in the same cluster leaves them out.
    out = kube.helm(
        "install", name, str(CHART), "-n", name, "--create-namespace", "-f", str(values),
        "--set", "crds.enabled=false", check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert ("no Redis" in notes) == (name == "ci-minimal-no-redis")
    assert ("https://llm.example.com/v1" in notes) == (name == "ci-ingress-tls-monitoring")
    manifest = [d for d in yaml.safe_load_all(kube.helm("get", "manifest", name, "-n", name).stdout) if d]
    for d in manifest:
        meta = d["metadata"]
        args = [d["kind"].lower(), meta["name"]] + (
            ["-n", meta["namespace"]] if meta.get("namespace") else []
        )
        assert kube.kubectl("get", *args, check=False).returncode == 0, f"{d['kind']} {meta['name']} missing"
    hooks = kube.helm("get", "hooks", name, "-n", name).stdout
    dry = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=hooks, check=False)
    assert dry.returncode == 0, dry.stderr
    kube.helm("uninstall", name, "-n", name, "--wait")
    assert kube.helm("list", "-n", name, "-q").stdout.strip() == ""


def test_upgrade_keeps_the_generated_master_key_and_redis_password(
    kube: KubeControlPlane, install_output: str
) -> None:
    master = secret_value(kube, NS, f"{RELEASE}-master-key", "masterKey")
    password = secret_value(kube, NS, f"{RELEASE}-redis", "password")
    assert master and master.startswith("sk-") and password
    kube.helm("upgrade", RELEASE, str(CHART), "-n", NS, "--set", "router.logLevel=debug")
    kube.helm("upgrade", RELEASE, str(CHART), "-n", NS, "--reuse-values", "--set", "router.workers=2")
    assert secret_value(kube, NS, f"{RELEASE}-master-key", "masterKey") == master
    assert secret_value(kube, NS, f"{RELEASE}-redis", "password") == password
    router = get_json(kube, "deployment", f"{RELEASE}-router", "-n", NS)
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--log-level=debug" in args and "--workers=2" in args
    assert kube.helm("history", RELEASE, "-n", NS, "-o", "json").stdout.count('"status"') == 3
    kube.helm("upgrade", RELEASE, str(CHART), "-n", NS)  # back to the defaults for what follows


# --------------------------------------------------------------------------- the processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class Running:
    kube: KubeControlPlane
    operator: Proc
    router: Proc
    router_url: str
    liveness_url: str
    operator_kc: Path
    router_kc: Path
    master_key: str


def _resolve_env(kube: KubeControlPlane, namespace: str, c: Doc) -> dict[str, str]:
    """A container's env as the kubelet would fill it in (values and secretKeyRefs)."""
    out: dict[str, str] = {}
    for name, var in env_of(c).items():
        if "value" in var:
            out[name] = str(var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            value = secret_value(kube, namespace, ref["name"], ref["key"])
            assert value is not None, f"{name}: Secret {ref['name']} has no {ref['key']}"
            out[name] = value
    return out


def _spawn(name: str, argv: list[str], env: dict[str, str], workdir: Path) -> Proc:
    log = workdir / f"{name}.log"
    with log.open("ab") as handle:
        popen = subprocess.Popen(
            [sys.executable, "-m", "kubellm", *argv],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=workdir,
        )
    return Proc(name, popen, log)


def _replace_arg(args: list[str], flag: str, value: str) -> list[str]:
    assert any(a.startswith(flag + "=") for a in args), f"{flag} not in {args}"
    return [f"{flag}={value}" if a.startswith(flag + "=") else a for a in args]


@pytest.fixture(scope="module")
def running(kube: KubeControlPlane, install_output: str) -> Iterator[Running]:
    workdir = Path(tempfile.mkdtemp(prefix="kubellm-chart-"))
    operator_kc = kube.service_account_kubeconfig(f"{RELEASE}-operator", NS)
    router_kc = kube.service_account_kubeconfig(f"{RELEASE}-router", NS)
    procs: list[Proc] = []
    redis: subprocess.Popen[bytes] | None = None
    try:
        # Redis: the StatefulSet's own command line, with the password from the chart's Secret.
        sts = get_json(kube, "statefulset", f"{RELEASE}-redis", "-n", NS)
        password = secret_value(kube, NS, f"{RELEASE}-redis", "password")
        assert password
        redis_port = free_port()
        (workdir / "redis").mkdir()
        redis = subprocess.Popen(
            redis_argv(container(sts), password, redis_port, workdir / "redis"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        local_redis = {"KUBELLM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}

        # The operator: its Deployment's args, the settings file from its ConfigMap, its ServiceAccount.
        op_deploy = get_json(kube, "deployment", f"{RELEASE}-operator", "-n", NS)
        op = container(op_deploy)
        volumes = {v["name"]: v for v in op_deploy["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in op["volumeMounts"]}
        cm_name = volumes[mounts["/etc/kubellm"]]["configMap"]["name"]
        settings = workdir / "settings.yaml"
        settings.write_text(get_json(kube, "configmap", cm_name, "-n", NS)["data"]["settings.yaml"])
        liveness_port = free_port()
        op_args = _replace_arg(op["args"], "--router-settings", str(settings))
        op_args = _replace_arg(op_args, "--liveness", f"http://127.0.0.1:{liveness_port}/healthz")
        op_env = {**_resolve_env(kube, NS, op), **local_redis}
        procs.append(_spawn("operator", [*op_args, f"--kubeconfig={operator_kc}"], op_env, workdir))

        # A router: its Deployment's args and env, its ServiceAccount.
        r = container(get_json(kube, "deployment", f"{RELEASE}-router", "-n", NS))
        port = free_port()
        r_args = _replace_arg(r["args"], "--port", str(port))
        r_env = {**_resolve_env(kube, NS, r), **local_redis, "KUBELLM_STATE_DIR": str(workdir / "state")}
        procs.append(_spawn("router", [*r_args, f"--kubeconfig={router_kc}"], r_env, workdir))
        router_url = f"http://127.0.0.1:{port}"
        yield Running(
            kube, procs[0], procs[1], router_url, f"http://127.0.0.1:{liveness_port}/healthz",
            operator_kc, router_kc, r_env["KUBELLM_MASTER_KEY"],
        )  # fmt: skip
    finally:
        for p in procs:
            p.stop()
            print(f"\n---- {p.name} log (tail) ----\n{p.logs()[-3000:]}")
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _status(url: str) -> int:
    """The HTTP status of a GET, 0 while nothing listens."""
    with contextlib.suppress(OSError):
        return http_get(url, timeout=2)[0]
    return 0


def _ready(env: Running) -> bool:
    return _status(env.router_url + "/health/readiness") == 200


def _chat(env: Running, key: str, model: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]}).encode()
    req = urllib.request.Request(
        env.router_url + "/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_operator_and_router_work_with_the_chart_permissions(running: Running) -> None:
    kube = running.kube
    # The router is not ready before the operator published a config; then it is.
    wait(lambda: _ready(running), 60, "the router loads the operator's config", interval=0.2)
    assert running.operator.popen.poll() is None, running.operator.logs()
    assert "now holds Lease" in running.operator.logs()
    lease = get_json(kube, "lease", f"{RELEASE}-operator", "-n", NS)
    assert lease["spec"]["holderIdentity"]
    wait(lambda: _status(running.liveness_url) == 200, 30, "kopf's liveness endpoint (the chart's probe)")

    # What NOTES.txt tells users to apply: a mock ModelDeployment and an ApiKey.
    notes = kube.helm("get", "notes", RELEASE, "-n", NS).stdout
    heredoc = notes.split("<<'EOF'\n", 1)[1].split("\n   EOF", 1)[0]
    kube.kubectl("apply", "-f", "-", input=textwrap.dedent(heredoc))
    key_holder: list[str] = []

    def key_ready() -> bool:
        value = secret_value(kube, "default", "my-app-apikey", "key")
        if value:
            key_holder.append(value)
        return value is not None and _chat(running, value, "mock-gpt")[0] == 200

    wait(key_ready, 30, "the ApiKey's key is served")
    status, body = _chat(running, key_holder[-1], "mock-gpt")
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
    assert _chat(running, "sk-not-a-key-0123456789", "mock-gpt")[0] == 401
    # Status written by the operator (the */status patch permission).
    wait(
        lambda: "True" in kube.kubectl("get", "apikey", "my-app", "-n", "default").stdout.splitlines()[1],
        30,
        "ApiKey Ready in `kubectl get apikeys`",
    )

    # Spend comes back through Redis: the routers' ledger, read by the operator into the status
    # (both found Redis through the variables the rendered settings name, with the chart's password).
    def requests_counted() -> bool:
        usage = get_json(kube, "apikey", "my-app", "-n", "default").get("status", {}).get("usage") or {}
        return int(usage.get("requests") or 0) >= 2

    wait(requests_counted, 60, "usage in the ApiKey status", interval=0.5)
    table = kube.kubectl("get", "apikeys", "-A").stdout
    assert "SPEND/BUDGET" in table and "/$10.00 monthly" in table, table
    # The master key from the chart's Secret lists the models (what `helm test` checks).
    status, body = http_get(
        running.router_url + "/v1/models", {"Authorization": f"Bearer {running.master_key}"}
    )
    assert status == 200 and "mock-gpt" in {m["id"] for m in json.loads(body)["data"]}
    # A change reaches the router through its watch of the one Secret it may read.
    kube.apply(
        {
            "apiVersion": "kubellm.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "second", "namespace": "default"},
            "spec": {"model": "second-model", "provider": "mock"},
        }
    )
    wait(lambda: _chat(running, running.master_key, "second-model")[0] == 200, 15, "a new model served")

    # The `helm test` Pod's script, against this router.
    if shutil.which("curl"):
        hook = next(d for d in yaml.safe_load_all(kube.helm("get", "hooks", RELEASE, "-n", NS).stdout) if d)
        c = container(hook)
        out = subprocess.run(
            [*c["command"], *c["args"]],
            env={
                "PATH": os.environ["PATH"],
                "KUBELLM_URL": running.router_url,
                "KUBELLM_MASTER_KEY": running.master_key,
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_router_service_account_reads_only_its_config_secret(running: Running) -> None:
    kube, kc = running.kube, running.router_kc
    token = token_of(kc)
    base = f"/api/v1/namespaces/{NS}/secrets"
    selector = urllib.parse.quote(f"metadata.name={CONFIG_SECRET}")
    # What the router does: list and watch with a field selector, which RBAC matches to resourceNames.
    status, body = kube.request("GET", f"{base}?fieldSelector={selector}", token=token)
    assert status == 200 and [i["metadata"]["name"] for i in body["items"]] == [CONFIG_SECRET]
    status, _ = kube.request("GET", f"{base}?fieldSelector={selector}&watch=1&timeoutSeconds=1", token=token)
    assert status == 200
    assert kube.request("GET", f"{base}/{CONFIG_SECRET}", token=token)[0] == 200
    # Everything else is forbidden.
    assert kube.request("GET", base, token=token)[0] == 403  # list without the selector
    assert kube.request("GET", f"{base}/{RELEASE}-master-key", token=token)[0] == 403
    assert kube.request("GET", f"{base}/{RELEASE}-redis", token=token)[0] == 403
    assert kube.request("GET", "/api/v1/namespaces/default/secrets/my-app-apikey", token=token)[0] == 403
    assert kube.request("GET", f"/api/v1/namespaces/{NS}/configmaps", token=token)[0] == 403
    assert kube.request("GET", "/apis/kubellm.io/v1alpha1/apikeys", token=token)[0] == 403
    for verb in ("update", "patch", "delete"):
        assert not can_i(kube, kc, verb, f"secrets/{CONFIG_SECRET}", "-n", NS), verb
    assert not can_i(kube, kc, "create", "secrets", "-n", NS)
    assert can_i(kube, kc, "watch", f"secrets/{CONFIG_SECRET}", "-n", NS)


def test_operator_service_account_has_nothing_beyond_its_role(running: Running) -> None:
    kube, kc = running.kube, running.operator_kc
    allowed = [
        ("list", "modeldeployments.kubellm.io", "-A"),
        ("patch", "apikeys.kubellm.io", "-A"),
        ("patch", "modeldeployments.kubellm.io", "--subresource=status", "-A"),
        ("create", "secrets", "-n", "default"),
        ("patch", "secrets", "-n", "default"),
        ("watch", "secrets", "-A"),
        ("create", "events", "-n", "default"),
        ("list", "customresourcedefinitions.apiextensions.k8s.io"),
        ("update", "leases.coordination.k8s.io", "-n", NS),
    ]
    for args in allowed:
        assert can_i(kube, kc, *args), args
    denied = [
        ("update", "secrets", "-n", "default"),  # the operator patches; it never replaces a Secret
        ("delete", "secrets", "-n", "default"),
        ("patch", "modeldeployments.kubellm.io", "-n", "default"),  # status only
        ("create", "modeldeployments.kubellm.io", "-n", "default"),
        ("delete", "apikeys.kubellm.io", "-n", "default"),
        ("list", "pods", "-A"),
        ("create", "configmaps", "-n", NS),
        ("get", "leases.coordination.k8s.io", "-n", "kube-system"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("impersonate", "serviceaccounts", "-A"),
    ]
    for args in denied:
        assert not can_i(kube, kc, *args), args
    # And for real: the operator's token cannot delete the config Secret it writes.
    status, _ = kube.request("DELETE", f"/api/v1/namespaces/{NS}/secrets/{CONFIG_SECRET}", token=token_of(kc))
    assert status == 403


def test_uninstall_keeps_the_crds_and_custom_resources(kube: KubeControlPlane, running: Running) -> None:
    running.operator.stop()
    running.router.stop()
    kube.helm("uninstall", RELEASE, "-n", NS, "--wait")
    assert kube.kubectl("get", "deployment", f"{RELEASE}-router", "-n", NS, check=False).returncode != 0
    assert secret_value(kube, NS, f"{RELEASE}-master-key", "masterKey") is None
    for crd in (
        "apikeys.kubellm.io",
        "identitybindings.kubellm.io",
        "modeldeployments.kubellm.io",
        "modelgroups.kubellm.io",
    ):
        assert kube.kubectl("get", "crd", crd, check=False).returncode == 0, crd
    assert kube.kubectl("get", "apikey", "my-app", "-n", "default", check=False).returncode == 0
    # A reinstall adopts the kept CRDs (they still carry the release's ownership annotations).
    kube.helm("install", RELEASE, str(CHART), "-n", NS)
    assert kube.helm("status", RELEASE, "-n", NS).returncode == 0
