"""The CRDs on a real kube-apiserver: CEL rejects what users get wrong, with our messages;
defaults are filled in; printer columns and the status subresource work."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kube import KubeControlPlane

ROOT = Path(__file__).resolve().parents[1]
NS = "crd-test"
API = "kubellm.io/v1alpha1"


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeControlPlane]:
    with KubeControlPlane(controller_manager=False) as cp:
        cp.kubectl("apply", "-f", str(ROOT / "crds"))
        for plural in ("modeldeployments", "apikeys", "modelgroups", "identitybindings"):
            cp.kubectl("wait", "--for=condition=Established", f"crd/{plural}.kubellm.io", "--timeout=60s")
        cp.kubectl("create", "namespace", NS)
        # Discovery of just-established CRDs can lag a moment behind the condition.
        cp.wait_until(
            lambda: cp.kubectl("get", "md,ak,mg", "-n", NS, check=False).returncode == 0, timeout=30
        )
        yield cp


def doc(kind: str, name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {"apiVersion": API, "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}
    )


def apply(kube: KubeControlPlane, kind: str, name: str, spec: dict[str, Any]) -> tuple[int, str]:
    out = kube.kubectl("apply", "-f", "-", input=doc(kind, name, spec), check=False)
    return out.returncode, out.stderr


def get(kube: KubeControlPlane, resource: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(kube.kubectl("get", resource, name, "-n", NS, "-o", "json").stdout)
    return out


INVALID = [
    (
        "ModelDeployment",
        {"model": "m", "provider": "azure", "baseUrl": "https://x.openai.azure.com"},
        "provider azure needs apiVersion and baseUrl",
    ),
    ("ModelDeployment", {"model": "m", "provider": "bedrock"}, "provider bedrock needs region"),
    (
        "ModelDeployment",
        {"model": "m", "provider": "vertex", "project": "p"},
        "provider vertex needs project and location",
    ),
    ("ModelDeployment", {"model": "m", "provider": "openai-compatible"}, "provider openai-compatible"),
    ("ModelDeployment", {"model": "m", "provider": "mock", "weight": -0.5}, "weight must be 0 or more"),
    (
        "ModelDeployment",
        {"model": "m", "provider": "openai", "credentials": {"env": "A", "file": "/f"}},
        "credentials: set exactly one of secretKeyRef, env, file",
    ),
    (
        "ModelDeployment",
        {"model": "m", "provider": "openai", "credentials": {}},
        "credentials: set exactly one of secretKeyRef, env, file",
    ),
    (
        "ModelDeployment",
        {"model": "m", "provider": "mock", "pricing": {"outputPerMillion": "1,5"}},
        'prices are decimal strings of USD, like "2.50"',
    ),
    (
        "ModelDeployment",
        {"model": "m", "provider": "mock", "baseUrl": "ftp://x"},
        "baseUrl must start with http",
    ),
    ("ModelDeployment", {"model": "m", "provider": "nope"}, 'Unsupported value: "nope"'),
    ("ModelDeployment", {"provider": "mock"}, "spec.model: Required value"),
    (
        "ApiKey",
        {"budget": {"amountUsd": "10", "period": "fortnightly"}},
        "budget.period must be daily, weekly",
    ),
    ("ApiKey", {"budget": {"amountUsd": "10", "period": "0d"}}, "budget.period must be daily, weekly"),
    ("ApiKey", {"budget": {"amountUsd": "ten"}}, "budget.amountUsd must be a decimal string"),
    ("ApiKey", {"expiresAt": "next tuesday"}, "spec.expiresAt"),
    ("ApiKey", {"secretName": "Not_A_Name"}, "secretName must be a valid Secret name"),
    ("ModelGroup", {"fallbacks": ["other", "bad-group"]}, "a model group cannot fall back to itself"),
    ("ModelGroup", {"strategy": "round-robin"}, 'Unsupported value: "round-robin"'),
    ("IdentityBinding", {"team": "a"}, "name at least one ServiceAccount (serviceAccounts) or OIDC caller"),
    ("IdentityBinding", {"serviceAccounts": ["Not_A_Name"]}, "serviceAccounts: a ServiceAccount name"),
    ("IdentityBinding", {"oidc": [{"subjects": ["x"]}]}, "spec.oidc[0].issuer: Required value"),
    (
        "IdentityBinding",
        {"serviceAccounts": ["*"], "budget": {"amountUsd": "1", "period": "fortnightly"}},
        "budget.period must be daily, weekly",
    ),
]


@pytest.mark.parametrize(("kind", "spec", "message"), INVALID, ids=[m for _, _, m in INVALID])
def test_cel_rejects_with_a_clear_message(
    kube: KubeControlPlane, kind: str, spec: dict[str, Any], message: str
) -> None:
    code, stderr = apply(kube, kind, "bad-group" if kind == "ModelGroup" else "bad", spec)
    assert code != 0, f"accepted: {spec}"
    assert message in stderr, stderr


def test_every_example_is_accepted(kube: KubeControlPlane) -> None:
    out = kube.kubectl("apply", "-n", NS, "-f", str(ROOT / "examples" / "kubernetes"), check=False)
    assert out.returncode == 0, out.stderr
    docs = [
        d
        for p in sorted((ROOT / "examples" / "kubernetes").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
    ]
    for kind, short in (("ModelDeployment", "md"), ("ModelGroup", "mg"), ("ApiKey", "ak")):
        names = set(
            kube.kubectl("get", short, "-n", NS, "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
        )
        wanted = {d["metadata"]["name"] for d in docs if d and d["kind"] == kind}
        assert wanted and wanted <= names, (kind, wanted - names)


def test_defaults(kube: KubeControlPlane) -> None:
    assert apply(kube, "ModelDeployment", "defaults", {"model": "m", "provider": "mock"})[0] == 0
    spec = get(kube, "modeldeployment", "defaults")["spec"]
    assert spec["weight"] == 1 and spec["priority"] == 0
    assert spec["timeouts"] == {"connect": 5, "total": 600}
    assert spec["cache"] is False and spec["logPayloads"] is False and spec["dropUnsupportedParams"] is False
    assert apply(kube, "ApiKey", "defaults", {"budget": {"amountUsd": "5"}})[0] == 0
    key = get(kube, "apikey", "defaults")["spec"]
    assert key["budget"] == {"amountUsd": "5", "period": "monthly"} and key["disabled"] is False
    assert apply(kube, "ModelGroup", "defaults", {})[0] == 0
    group = get(kube, "modelgroup", "defaults")["spec"]
    assert group == {"strategy": "weighted-random", "latencyTolerance": 0.1}
    # Integers are valid numbers, and a weight of 0 is allowed.
    assert apply(kube, "ModelDeployment", "zero", {"model": "m", "provider": "mock", "weight": 0})[0] == 0


def _status_patch(kube: KubeControlPlane, resource: str, name: str, status: dict[str, Any]) -> None:
    kube.kubectl(
        "patch",
        resource,
        name,
        "-n",
        NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def test_printer_columns_and_status_subresource(kube: KubeControlPlane) -> None:
    apply(kube, "ModelDeployment", "cols", {"model": "gpt-x", "provider": "openai", "weight": 2.5})
    conditions = [
        {"type": "Ready", "status": "True", "reason": "Rendered", "message": "ok", "observedGeneration": 1,
         "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "Healthy", "status": "False", "reason": "CircuitOpen", "message": "cooling",
         "lastTransitionTime": "2026-01-01T00:00:00Z"},
    ]  # fmt: skip
    _status_patch(kube, "md", "cols", {"observedGeneration": 1, "conditions": conditions})
    table = kube.kubectl("get", "md", "cols", "-n", NS).stdout.split("\n")
    assert table[0].split() == ["NAME", "MODEL", "PROVIDER", "WEIGHT", "READY", "HEALTHY", "AGE"]
    assert table[1].split()[:6] == ["cols", "gpt-x", "openai", "2.5", "True", "False"]
    wide = kube.kubectl("get", "md", "cols", "-n", NS, "-o", "wide").stdout
    assert "REASON" in wide and "Rendered" in wide
    # Spec writes do not touch status, and status writes do not bump the generation.
    apply(kube, "ModelDeployment", "cols", {"model": "gpt-x", "provider": "openai", "weight": 3})
    body = get(kube, "md", "cols")
    assert body["status"]["conditions"][0]["reason"] == "Rendered" and body["metadata"]["generation"] == 2

    apply(
        kube, "ApiKey", "cols", {"owner": "alice", "models": ["a", "b"], "expiresAt": "2030-01-01T00:00:00Z"}
    )
    _status_patch(
        kube,
        "ak",
        "cols",
        {
            "state": "Active",
            "spendSummary": "$1.25/$10.00 monthly",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        },
    )
    table = kube.kubectl("get", "ak", "cols", "-n", NS).stdout.split("\n")
    assert table[0].split() == ["NAME", "OWNER", "MODELS", "SPEND/BUDGET", "EXPIRES", "STATE", "READY", "AGE"]
    row = table[1].split()
    assert row[:7] == [
        "cols",
        "alice",
        '["a","b"]',
        "$1.25/$10.00",
        "monthly",
        "2030-01-01T00:00:00Z",
        "Active",
    ]
    # The usage counts by outcome (issue 15 defect 5): the schema keeps them, -o wide shows two.
    usage = {"requests": 642, "rejected": 981, "failed": 3, "promptTokens": 9, "completionTokens": 4}
    _status_patch(kube, "ak", "cols", {"usage": usage})
    assert get(kube, "ak", "cols")["status"]["usage"] == usage
    wide = kube.kubectl("get", "ak", "cols", "-n", NS, "-o", "wide").stdout.split("\n")
    columns = wide[0].split()
    at = columns.index("SPEND/BUDGET")
    assert columns[at + 1 : at + 3] == ["REQUESTS", "REJECTED"]
    assert "642" in wide[1].split() and "981" in wide[1].split()

    apply(kube, "ModelGroup", "cols", {"fallbacks": ["a"]})
    table = kube.kubectl("get", "mg", "cols", "-n", NS).stdout.split("\n")
    assert table[0].split() == ["NAME", "STRATEGY", "FALLBACKS", "DEPLOYMENTS", "READY", "AGE"]


def test_status_rejects_malformed_conditions(kube: KubeControlPlane) -> None:
    apply(kube, "ModelDeployment", "conds", {"model": "m", "provider": "mock"})
    bad = {"conditions": [{"type": "Ready", "status": "Maybe"}]}
    patch = json.dumps({"status": bad})
    args = ("patch", "md", "conds", "-n", NS, "--subresource=status", "--type=merge", "-p", patch)
    out = kube.kubectl(*args, check=False)
    assert out.returncode != 0 and 'Unsupported value: "Maybe"' in out.stderr


def test_short_names_and_category(kube: KubeControlPlane) -> None:
    deadline = time.monotonic() + 10
    while True:
        out = kube.kubectl("get", "kubellm", "-n", NS, "-o", "name", check=False)
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    names = out.stdout.split()
    assert any(n.startswith("modeldeployment.kubellm.io/") for n in names)
    assert any(n.startswith("apikey.kubellm.io/") for n in names)
    assert any(n.startswith("modelgroup.kubellm.io/") for n in names)
