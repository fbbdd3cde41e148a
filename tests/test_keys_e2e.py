"""`kubellm keys` end to end on a real kube-apiserver (RBAC authorization): the CLI as a
subprocess creates, lists, rotates and revokes ApiKeys; the operator renders them and a
`kubellm router --kube-secret` serves them; a team's ServiceAccount bound to the shipped
team key-admin Role manages keys in its namespace only."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kube import KubeControlPlane
from tests.support.servers import RouterProcess

ROOT = Path(__file__).resolve().parents[1]
SYSTEM, TEAM_A, TEAM_B = "kubellm-system", "team-a", "team-b"
API = "kubellm.io/v1alpha1"
MASTER_KEY = "sk-master-keys-e2e-0123456789"
MODEL = "keys-mock"


@dataclass
class Env:
    kube: KubeControlPlane
    router: RouterProcess
    admin_kc: Path
    team_a_kc: Path  # ServiceAccount team-a/key-admin, bound to kubellm-key-admin in team-a only

    def keys(
        self, *args: str, kubeconfig: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`kubellm keys ARGS --kubeconfig KC`; with ``env``, no flag: found as the operator finds it."""
        flag = [] if env is not None else ["--kubeconfig", str(kubeconfig or self.admin_kc)]
        return subprocess.run(
            [sys.executable, "-m", "kubellm", "keys", *args, *flag],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

    def status(self, key: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.router.port, timeout=5)
        try:
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            conn.request("POST", "/v1/chat/completions", body, headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def secret_value(self, namespace: str, name: str) -> str | None:
        status, doc = self.kube.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if status != 200 or "key" not in (doc.get("data") or {}):
            return None
        return base64.b64decode(doc["data"]["key"]).decode()

    def api_key(self, namespace: str, name: str) -> tuple[int, Any]:
        return self.kube.request("GET", f"/apis/{API}/namespaces/{namespace}/apikeys/{name}")


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def issued_key(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout  # stdout is the key and nothing else: KEY=$(kubellm keys create ...)
    key = lines[0]
    assert key.startswith("sk-") and len(key) == 51
    assert f"{key[:8]}…" in out.stderr and key not in out.stderr  # the prefix names it; shown once
    return key


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    workdir = Path(tempfile.mkdtemp(prefix="kubellm-keys-e2e-"))
    with KubeControlPlane() as kube:
        kube.kubectl("apply", "-f", str(ROOT / "crds"))
        kube.kubectl("wait", "--for=condition=Established", "crd/apikeys.kubellm.io", "--timeout=60s")
        for ns in (SYSTEM, TEAM_A, TEAM_B):
            kube.kubectl("create", "namespace", ns)
        kube.kubectl("apply", "-f", str(ROOT / "deploy" / "rbac.yaml"))
        for ns in (TEAM_A, TEAM_B):
            kube.kubectl("apply", "-n", ns, "-f", str(ROOT / "deploy" / "team-key-admin.yaml"))
        kube.kubectl(
            "create", "rolebinding", "key-admins", "-n", TEAM_A,
            "--role=kubellm-key-admin", f"--serviceaccount={TEAM_A}:key-admin",
        )  # fmt: skip
        team_a_kc = kube.service_account_kubeconfig("key-admin", TEAM_A)
        op_kc = kube.service_account_kubeconfig("kubellm-operator", SYSTEM)
        router_kc = kube.service_account_kubeconfig("kubellm-router", SYSTEM)
        settings = workdir / "settings.yaml"
        settings.write_text(
            yaml.safe_dump({"masterKeyHash": hashlib.sha256(MASTER_KEY.encode()).hexdigest()})
        )
        md = {
            "apiVersion": API,
            "kind": "ModelDeployment",
            "metadata": {"name": "mock", "namespace": TEAM_A},
            "spec": {"model": MODEL, "provider": "mock"},
        }
        kube.apply(md)
        log = (workdir / "operator.log").open("ab")
        operator = subprocess.Popen(
            [
                sys.executable, "-m", "kubellm", "operator", "--kubeconfig", str(op_kc),
                "--namespace", SYSTEM, "--router-settings", str(settings), "--poll-interval", "1",
                "--no-leader-election",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        router = RouterProcess(
            args=["--kube-secret", f"{SYSTEM}/kubellm-router-config", "--kubeconfig", str(router_kc)]
        )
        try:
            router.start(wait=False)
            router.wait_ready(60)
            e = Env(kube, router, kube.kubeconfig_path, team_a_kc)
            wait(lambda: e.status(MASTER_KEY) == 200, 30, "the mock model served")
            yield e
        finally:
            router.stop()
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(15)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait()
            log.close()
            print("---- operator log (tail) ----\n" + (workdir / "operator.log").read_text()[-4000:])


# ---------------------------------------------------------------------------------------------


def test_create_list_rotate_revoke(env: Env) -> None:
    out = env.keys(
        "create", "app", "-n", TEAM_A, "--owner", "app@example.com", "--team", "a",
        "--model", MODEL, "--rpm", "100", "--wait", "20",
    )  # fmt: skip
    key = issued_key(out)
    assert "live on the routers" in out.stderr
    assert env.secret_value(TEAM_A, "app-apikey") == key
    assert env.status(key) == 200  # --wait returned once the operator rendered it; the router follows
    _, doc = env.api_key(TEAM_A, "app")
    spec = {"owner": "app@example.com", "team": "a", "models": [MODEL], "limits": {"rpm": 100}}
    assert doc["spec"] == {**spec, "cache": False, "disabled": False}  # with the CRD's defaults
    _, secret = env.kube.request("GET", f"/api/v1/namespaces/{TEAM_A}/secrets/app-apikey")
    assert [r["uid"] for r in secret["metadata"]["ownerReferences"]] == [doc["metadata"]["uid"]]

    # Creating it again fails and leaves the key alone.
    again = env.keys("create", "app", "-n", TEAM_A)
    assert again.returncode == 5 and "already exists" in again.stderr and not again.stdout
    assert env.secret_value(TEAM_A, "app-apikey") == key

    listed = env.keys("list", "-n", TEAM_A)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "OWNER", "TEAM", "MODELS", "KEY"]
    assert row.split()[:7] == ["app", "app@example.com", "a", MODEL, f"{key[:8]}…", "Active", "True"]
    as_json = env.keys("list", "-n", TEAM_A, "-o", "json")
    [item] = json.loads(as_json.stdout)
    assert item["keyPrefix"] == key[:8] and item["secretName"] == "app-apikey"
    assert key not in listed.stdout + listed.stderr + as_json.stdout + as_json.stderr
    assert key[8:16] not in listed.stdout + as_json.stdout

    rotated = env.keys("rotate", "app", "-n", TEAM_A, "--wait", "20")
    new_key = issued_key(rotated)
    assert new_key != key
    wait(lambda: env.status(new_key) == 200 and env.status(key) == 401, 10, "the old key refused")
    _, secret = env.kube.request("GET", f"/api/v1/namespaces/{TEAM_A}/secrets/app-apikey")
    assert secret["metadata"]["annotations"]["kubellm.io/rotated-for"] == ""  # the ApiKey asks for none
    time.sleep(2)  # the operator sees its rotation request already done: it does not rotate again
    assert env.secret_value(TEAM_A, "app-apikey") == new_key
    assert env.status(new_key) == 200

    revoked = env.keys("revoke", "app", "-n", TEAM_A)
    assert revoked.returncode == 0, revoked.stderr
    assert not revoked.stdout
    wait(lambda: env.status(new_key) == 401, 10, "the revoked key refused")
    assert env.api_key(TEAM_A, "app")[0] == 404
    status, _ = env.kube.request("GET", f"/api/v1/namespaces/{TEAM_A}/secrets/app-apikey")
    assert status == 404
    assert "No ApiKeys" in env.keys("list", "-n", TEAM_A).stderr


def test_errors_are_clear_with_nonzero_exit(env: Env) -> None:
    missing = env.keys("rotate", "nope", "-n", TEAM_A)
    assert missing.returncode == 3 and "ApiKey 'nope' not found in namespace 'team-a'" in missing.stderr
    assert not missing.stdout
    assert env.keys("revoke", "nope", "-n", TEAM_A).returncode == 3
    for args in (("list",), ("create", "k"), ("rotate", "k")):
        out = env.keys(*args, "-n", "no-such-ns")
        assert out.returncode == 3, (args, out.stderr)
        assert "namespace 'no-such-ns' not found" in out.stderr, out.stderr
        assert not out.stdout
    bad = env.keys("create", "bad", "-n", TEAM_A, "--budget", "lots")
    assert bad.returncode == 2 and "amountUsd" in bad.stderr and not bad.stdout
    # A failed create leaves nothing behind: no ApiKey, no orphaned Secret holding a key.
    assert env.api_key(TEAM_A, "bad")[0] == 404
    assert env.secret_value(TEAM_A, "bad-apikey") is None
    expired = env.keys("create", "x", "-n", TEAM_A, "--expires", "soon")
    assert expired.returncode == 2 and "--expires" in expired.stderr


def test_rotate_and_revoke_leave_another_keys_secret_alone(env: Env) -> None:
    first = issued_key(env.keys("create", "first", "-n", TEAM_A, "--wait", "20"))
    # A second ApiKey pointing at the first one's Secret (a typo in spec.secretName, say).
    body = {
        "apiVersion": API,
        "kind": "ApiKey",
        "metadata": {"name": "pointer", "namespace": TEAM_A},
        "spec": {"secretName": "first-apikey"},
    }
    assert env.kube.request("POST", f"/apis/{API}/namespaces/{TEAM_A}/apikeys", body)[0] == 201
    out = env.keys("rotate", "pointer", "-n", TEAM_A)
    assert out.returncode == 1 and "refusing to overwrite" in out.stderr and not out.stdout
    assert env.secret_value(TEAM_A, "first-apikey") == first
    revoked = env.keys("revoke", "pointer", "-n", TEAM_A)
    assert revoked.returncode == 0 and "left it in place" in revoked.stderr
    assert env.secret_value(TEAM_A, "first-apikey") == first
    wait(lambda: env.status(first) == 200, 10, "the first key still served")
    assert env.keys("revoke", "first", "-n", TEAM_A).returncode == 0


def test_team_admin_role_manages_its_own_namespace_only(env: Env) -> None:
    kc = env.team_a_kc
    can = env.kube.kubectl("auth", "can-i", "get", "secrets", "-n", TEAM_A, kubeconfig=kc, check=False)
    assert can.stdout.strip() == "no"  # the CLI needs no read access to Secrets

    key = issued_key(env.keys("create", "ci", "-n", TEAM_A, "--model", MODEL, "--wait", "20", kubeconfig=kc))
    assert env.status(key) == 200
    listed = env.keys("list", "-n", TEAM_A, kubeconfig=kc)
    assert listed.returncode == 0 and listed.stdout.splitlines()[1].startswith("ci ")
    new_key = issued_key(env.keys("rotate", "ci", "-n", TEAM_A, "--wait", "20", kubeconfig=kc))
    wait(lambda: env.status(new_key) == 200 and env.status(key) == 401, 10, "rotation by the team admin")

    # Another team's namespace: refused by RBAC, with a message that says so and what to do.
    for args in (("create", "intruder"), ("list",), ("rotate", "ci"), ("revoke", "ci")):
        out = env.keys(*args, "-n", TEAM_B, kubeconfig=kc)
        assert out.returncode == 4, (args, out.stderr)
        assert "permission denied" in out.stderr and "system:serviceaccount:team-a:key-admin" in out.stderr
        assert "'team-b'" in out.stderr and "kubellm-key-admin" not in out.stdout
        assert not out.stdout
    assert env.kube.request("GET", f"/api/v1/namespaces/{TEAM_B}/secrets/intruder-apikey")[0] == 404
    assert env.api_key(TEAM_B, "intruder")[0] == 404

    assert env.keys("revoke", "ci", "-n", TEAM_A, kubeconfig=kc).returncode == 0
    wait(lambda: env.status(new_key) == 401, 10, "revocation by the team admin")
    assert env.kube.request("GET", f"/api/v1/namespaces/{TEAM_A}/secrets/ci-apikey")[0] == 404


def test_rotate_a_key_the_operator_generated(env: Env) -> None:
    body = {
        "apiVersion": API,
        "kind": "ApiKey",
        "metadata": {"name": "by-kubectl", "namespace": TEAM_A},
        "spec": {"models": [MODEL]},
    }
    assert env.kube.request("POST", f"/apis/{API}/namespaces/{TEAM_A}/apikeys", body)[0] == 201
    wait(lambda: env.secret_value(TEAM_A, "by-kubectl-apikey") is not None, 15, "the operator's key")
    old = env.secret_value(TEAM_A, "by-kubectl-apikey")
    assert old is not None
    wait(lambda: env.status(old) == 200, 15, "the operator's key served")
    # A rotation asked for with kubectl (the operator makes it), then one with the CLI: the operator
    # must take the CLI's as already done, not rotate once more over the key just printed.
    env.kube.kubectl("annotate", "apikey", "by-kubectl", "-n", TEAM_A, "kubellm.io/rotate=1", "--overwrite")
    wait(lambda: env.secret_value(TEAM_A, "by-kubectl-apikey") != old, 15, "the operator's rotation")
    by_operator = env.secret_value(TEAM_A, "by-kubectl-apikey")
    assert by_operator is not None
    wait(lambda: env.status(by_operator) == 200 and env.status(old) == 401, 10, "the operator's new key")
    new = issued_key(env.keys("rotate", "by-kubectl", "-n", TEAM_A, "--wait", "20", kubeconfig=env.team_a_kc))
    wait(lambda: env.status(new) == 200 and env.status(by_operator) == 401, 10, "the rotated key served")
    env.kube.kubectl(
        "annotate", "apikey", "by-kubectl", "-n", TEAM_A, "unrelated=change"
    )  # wakes the operator
    time.sleep(2)
    assert env.secret_value(TEAM_A, "by-kubectl-apikey") == new
    assert env.status(new) == 200
    assert env.keys("revoke", "by-kubectl", "-n", TEAM_A).returncode == 0


def test_credentials_and_namespace_come_from_the_kubeconfig_like_the_operators(env: Env) -> None:
    doc = json.loads(env.team_a_kc.read_text())
    doc["contexts"][0]["context"]["namespace"] = TEAM_A
    kc = env.team_a_kc.with_name("team-a-in-context.kubeconfig")
    kc.write_text(json.dumps(doc))
    plain = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    key = issued_key(env.keys("create", "from-context", env={**plain, "KUBECONFIG": str(kc)}))
    assert env.secret_value(TEAM_A, "from-context-apikey") == key  # -n defaulted to the context's
    listed = env.keys("list", env={**plain, "KUBECONFIG": str(kc)})
    assert listed.returncode == 0 and "from-context" in listed.stdout
    nothing = env.keys(
        "list", env={**plain, "KUBECONFIG": str(kc.with_name("missing")), "HOME": "/nonexistent"}
    )
    assert nothing.returncode == 1 and "no Kubernetes credentials" in nothing.stderr
    assert env.keys("revoke", "from-context", "-n", TEAM_A).returncode == 0
