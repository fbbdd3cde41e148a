"""IdentityBindings end to end on a real kube-apiserver: the operator (`kubellm operator`, as its
least-privilege ServiceAccount) renders them into the config Secret, a `kubellm router
--kube-secret` (as its own ServiceAccount) serves callers presenting ServiceAccount tokens minted
by the TokenRequest API, and the binding's status shows its identities' usage from the ledger."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.support.kube import KubeControlPlane
from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess
from tests.test_operator_e2e import OperatorProcess

ROOT = Path(__file__).resolve().parents[1]
SYSTEM, NS, OTHER = "kubellm-system", "team-a", "team-b"
API = "kubellm.io/v1alpha1"


@dataclass
class Env:
    kube: KubeControlPlane
    router: RouterProcess

    def create(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": API, "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}
        status, answer = self.kube.request("POST", f"/apis/{API}/namespaces/{NS}/{kind.lower()}s", body)
        assert status == 201, answer

    def status(self, kind: str, name: str) -> dict[str, Any]:
        status, answer = self.kube.request("GET", f"/apis/{API}/namespaces/{NS}/{kind.lower()}s/{name}")
        assert status == 200, answer
        return dict(answer.get("status") or {})

    def ready(self, kind: str, name: str) -> dict[str, Any]:
        conditions = self.status(kind, name).get("conditions") or []
        return next((c for c in conditions if c["type"] == "Ready"), {})

    def chat(self, token: str) -> str:
        client = openai.OpenAI(base_url=self.router.v1, api_key=token, max_retries=0, timeout=10)
        reply = client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hi"}])
        return str(reply.choices[0].message.content)


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    workdir = Path(tempfile.mkdtemp(prefix="kubellm-identity-"))
    with RedisServer() as redis, KubeControlPlane(controller_manager=False) as kube:
        kube.kubectl("apply", "-f", str(ROOT / "crds"))
        kube.kubectl(
            "wait", "--for=condition=Established", "crd/identitybindings.kubellm.io", "--timeout=60s"
        )
        for ns in (SYSTEM, NS, OTHER):
            kube.kubectl("create", "namespace", ns)
        kube.kubectl("apply", "-f", str(ROOT / "deploy" / "rbac.yaml"))
        op_kc = kube.service_account_kubeconfig("kubellm-operator", SYSTEM, duration="2h")
        router_kc = kube.service_account_kubeconfig("kubellm-router", SYSTEM, duration="2h")
        settings = workdir / "settings.yaml"
        identity = {
            "kubernetes": {"enabled": True, "audiences": ["kubellm"], "issuer": kube.server_url},
            "oidc": [
                {
                    "name": "corp",
                    "issuer": "https://idp.invalid",
                    "jwksUrl": "http://127.0.0.1:9/jwks",
                    "audiences": ["kubellm"],
                }
            ],
        }
        settings.write_text(yaml.safe_dump({"redis": {"url": redis.url}, "identity": identity}))
        operator = OperatorProcess(op_kc, settings, workdir, "operator").start()
        # TokenReview finds its credentials as in a pod would (here: $KUBECONFIG).
        router = RouterProcess(
            args=["--kube-secret", f"{SYSTEM}/kubellm-router-config", "--kubeconfig", str(router_kc)],
            env={"KUBECONFIG": str(router_kc)},
        )
        try:
            router.start(wait=False)
            router.wait_ready(60)
            yield Env(kube, router)
        finally:
            router.stop()
            operator.stop()
            print("\n---- operator log (tail) ----\n" + operator.logs()[-4000:])
            print(f"---- router log (tail) ----\n{router.logs()[-3000:]}")


def test_a_binding_lets_a_namespaces_service_accounts_in_and_shows_their_usage(env: Env) -> None:
    env.create("ModelDeployment", "mock", {"model": "mock-gpt", "provider": "mock"})
    env.create(
        "IdentityBinding",
        "workers",
        {"serviceAccounts": ["*"], "team": "a", "limits": {"rpm": 100}, "budget": {"amountUsd": "5"}},
    )
    # A bad binding is left out with a readable reason; the good one keeps serving.
    env.create("IdentityBinding", "stranger", {"oidc": [{"issuer": "nope"}]})
    wait(lambda: env.ready("IdentityBinding", "workers").get("status") == "True", 30, "workers Ready")
    wait(lambda: env.ready("IdentityBinding", "stranger").get("status") == "False", 30, "stranger refused")
    bad = env.ready("IdentityBinding", "stranger")
    assert bad["reason"] == "IssuerNotConfigured" and "'nope'" in bad["message"]

    token = env.kube.create_service_account_token("worker", NS, duration="15m", audiences=["kubellm"])
    deadline = time.monotonic() + 30
    while True:  # until the routers have the config with the binding
        try:
            assert env.chat(token)
            break
        except openai.PermissionDeniedError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    for _ in range(2):
        env.chat(token)

    def shows_usage() -> bool:
        usage = env.status("IdentityBinding", "workers").get("usage") or []
        return any(u["identity"] == f"sa:{NS}/worker" and u["requests"] >= 3 for u in usage)

    wait(shows_usage, 30, "the binding's status shows sa:team-a/worker")
    status = env.status("IdentityBinding", "workers")
    assert status["identities"] == 1 and status["spendSummary"].endswith("monthly")
    printed = env.kube.kubectl("get", "identitybindings", "-n", NS, "-o", "wide").stdout
    assert "workers" in printed and "IssuerNotConfigured" in printed

    # Another namespace's ServiceAccount is authenticated, but nothing binds it.
    outsider = env.kube.create_service_account_token("worker", OTHER, duration="15m", audiences=["kubellm"])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        env.chat(outsider)
    assert caught.value.code == "identity_not_bound"
    assert json.dumps(caught.value.body).find(outsider) == -1
