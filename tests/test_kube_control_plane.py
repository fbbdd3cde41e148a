"""Smoke test: a real kube-apiserver + etcd + kube-controller-manager, kubectl and helm.

The first run builds the binaries from the Go module proxy (see scripts/README.md);
later runs reuse ~/.cache/kubellm/bin.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.support.kube import KubeControlPlane, StaticTokenUser

VIEWER = StaticTokenUser(name="viewer", groups=("kubellm:viewers",))

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.smoke.kubellm.io"},
    "spec": {
        "group": "smoke.kubellm.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["minReplicas", "maxReplicas"],
                                "properties": {
                                    "minReplicas": {"type": "integer"},
                                    "maxReplicas": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.minReplicas <= self.maxReplicas",
                                        "message": "minReplicas must not exceed maxReplicas",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def _widget(name: str, lo: int, hi: int) -> str:
    return json.dumps(
        {
            "apiVersion": "smoke.kubellm.io/v1",
            "kind": "Widget",
            "metadata": {"name": name, "namespace": "x"},
            "spec": {"minReplicas": lo, "maxReplicas": hi},
        }
    )


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeControlPlane]:
    with KubeControlPlane(users=[VIEWER]) as cp:
        yield cp


def test_namespace_and_readyz(kube: KubeControlPlane) -> None:
    kube.kubectl("create", "namespace", "x")
    out = kube.kubectl("get", "namespace", "x", "-o", "jsonpath={.status.phase}").stdout
    assert out == "Active"
    status, body = kube.request("GET", "/readyz")
    assert status == 200, body
    assert kube.server_url.startswith("https://127.0.0.1:")
    assert kube.kubeconfig_path.is_file() and kube.ca_path.is_file()


def test_server_version_is_stamped(kube: KubeControlPlane) -> None:
    status, body = kube.request("GET", "/version")
    assert status == 200
    assert body["major"] == "1" and body["gitVersion"].startswith("v1."), body


def test_crd_cel_validation(kube: KubeControlPlane) -> None:
    kube.kubectl("create", "namespace", "x", check=False)
    kube.apply(WIDGET_CRD)
    kube.kubectl("wait", "--for=condition=Established", "crd/widgets.smoke.kubellm.io", "--timeout=60s")
    # Discovery of a just-established CRD can lag a moment behind the condition.
    deadline = time.monotonic() + 30
    while True:
        ok = kube.kubectl("apply", "-f", "-", input=_widget("good", 1, 3), check=False)
        if ok.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ok.returncode == 0, ok.stderr

    bad = kube.kubectl("apply", "-f", "-", input=_widget("bad", 5, 2), check=False)
    assert bad.returncode != 0
    assert "minReplicas must not exceed maxReplicas" in bad.stderr, bad.stderr
    assert kube.kubectl("get", "widgets", "-n", "x", "-o", "name").stdout.split() == [
        "widget.smoke.kubellm.io/good"
    ]


def test_rbac_static_user_and_service_account(kube: KubeControlPlane) -> None:
    kube.kubectl("create", "namespace", "rbac", check=False)
    viewer_kc = kube.user_kubeconfig("viewer")
    denied = kube.kubectl("get", "configmaps", "-n", "rbac", kubeconfig=viewer_kc, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
    kube.kubectl(
        "create", "rolebinding", "viewers", "-n", "rbac", "--clusterrole=view", "--group=kubellm:viewers"
    )
    kube.wait_until(
        lambda: (
            kube.kubectl("get", "configmaps", "-n", "rbac", kubeconfig=viewer_kc, check=False).returncode == 0
        ),
        timeout=15,
    )

    sa_kc = kube.service_account_kubeconfig("router", "rbac")
    who = kube.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=sa_kc)
    assert who.stdout == "system:serviceaccount:rbac:router"
    assert kube.kubectl("get", "pods", "-n", "rbac", kubeconfig=sa_kc, check=False).returncode != 0


def test_garbage_collector(kube: KubeControlPlane) -> None:
    kube.kubectl("create", "namespace", "gc", check=False)
    kube.kubectl("create", "configmap", "owner", "-n", "gc")
    uid = kube.kubectl("get", "configmap", "owner", "-n", "gc", "-o", "jsonpath={.metadata.uid}").stdout
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": "gc",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    kube.apply(child)
    kube.kubectl("delete", "configmap", "owner", "-n", "gc")
    kube.wait_until(
        lambda: kube.kubectl("get", "configmap", "child", "-n", "gc", check=False).returncode != 0,
        timeout=60,
    )


def test_helm_version(kube: KubeControlPlane) -> None:
    out = kube.helm("version", "--short").stdout.strip()
    assert out.startswith("v3."), out
    # helm can talk to the cluster too.
    assert kube.helm("list", "-A").returncode == 0
