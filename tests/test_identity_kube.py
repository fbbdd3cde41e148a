"""ServiceAccount tokens as credentials, end to end on a real kube-apiserver.

Tokens are minted by the TokenRequest API (``kubectl create token --audience kubellm``); the
router is a real process whose TokenReview calls run as the ``kubellm-router`` ServiceAccount
with exactly the RBAC of deploy/rbac.yaml; clients are the real openai and anthropic SDKs. An
expired token cannot come from TokenRequest (10 minutes at least), so one is signed with the API
server's own service-account key, with the claims a bound token has.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.kube import KubeControlPlane
from tests.support.oidc import OidcIssuer
from tests.support.servers import RouterProcess, http_get

ROOT = Path(__file__).resolve().parents[1]
TEAM = "team-a"


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeControlPlane]:
    with KubeControlPlane(controller_manager=False) as cp:
        cp.kubectl("create", "namespace", "kubellm-system")
        cp.kubectl("create", "namespace", TEAM)
        # The router's own RBAC, as shipped: without the tokenreviews grant every call is a 403.
        cp.kubectl("apply", "-f", str(ROOT / "deploy" / "rbac.yaml"))
        yield cp


@pytest.fixture(scope="module")
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer() as running:
        yield running


@pytest.fixture(scope="module")
def router(kube: KubeControlPlane, issuer: OidcIssuer) -> Iterator[RouterProcess]:
    from tests.conftest import UPSTREAM_KEY

    router_kc = kube.service_account_kubeconfig("kubellm-router", "kubellm-system", duration="2h")
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        config: dict[str, Any] = {
            "deployments": [openai_deployment(fake, name="dep")],
            "identityBindings": [
                {"name": f"{TEAM}/workers", "serviceAccounts": [{"namespace": TEAM}], "team": "a"},
                {
                    "name": f"{TEAM}/batch",
                    "serviceAccounts": [{"namespace": TEAM, "name": "batch"}],
                    "limits": {"rpm": 1000},
                    "team": "a-batch",
                },
                {"name": "corp/ml", "oidc": [{"issuer": "corp", "claims": {"groups": "ml"}}]},
            ],
            "settings": {
                "accessLog": False,
                "identity": {
                    "kubernetes": {
                        "enabled": True,
                        "audiences": ["kubellm"],
                        "issuer": kube.server_url,
                        "kubeconfig": str(router_kc),
                        "cacheTtlSeconds": 1,
                    },
                    "negativeCacheTtlSeconds": 1,
                    "oidc": [
                        {
                            "name": "corp",
                            "issuer": issuer.issuer,
                            "jwksUrl": issuer.jwks_url,
                            "audiences": ["kubellm"],
                            "teamClaim": "team",
                        }
                    ],
                },
            },
        }
        with RouterProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as proc:
            yield proc


def token(kube: KubeControlPlane, name: str, audience: str = "kubellm") -> str:
    return kube.create_service_account_token(name, TEAM, duration="15m", audiences=[audience])


def chat(router: RouterProcess, credential: str) -> str:
    client = openai.OpenAI(base_url=router.v1, api_key=credential, max_retries=0)
    reply = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    return str(reply.choices[0].message.content)


def refused(router: RouterProcess, credential: str) -> openai.AuthenticationError:
    with pytest.raises(openai.AuthenticationError) as caught:
        chat(router, credential)
    assert credential not in str(caught.value.body) and credential not in caught.value.response.text
    return caught.value


def key_info(router: RouterProcess, credential: str) -> dict[str, Any]:
    status, raw = http_get(f"{router.v1}/key/info", {"authorization": f"Bearer {credential}"})
    assert status == 200, raw
    doc: dict[str, Any] = json.loads(raw)
    return doc


def test_a_service_account_token_works_with_the_openai_and_anthropic_sdks(
    kube: KubeControlPlane, router: RouterProcess
) -> None:
    worker = token(kube, "worker")
    assert chat(router, worker)
    client = anthropic.Anthropic(base_url=router.base_url, api_key=worker, max_retries=0)
    message = client.messages.create(
        model="gpt-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    info = key_info(router, worker)
    # Metered as a key of its own: its name, its binding's team, its own usage.
    assert info["key"] == f"sa:{TEAM}/worker" and info["team"] == "a"
    assert info["usage"]["requests"] >= 2
    # A binding naming the ServiceAccount beats the one covering its namespace.
    batch = token(kube, "batch")
    assert chat(router, batch)
    info = key_info(router, batch)
    assert info["key"] == f"sa:{TEAM}/batch" and info["team"] == "a-batch"
    assert info["limits"] == {"rpm": 1000}


def test_a_token_for_another_audience_is_refused(kube: KubeControlPlane, router: RouterProcess) -> None:
    err = refused(router, token(kube, "worker", audience="vault"))
    assert err.code == "invalid_audience"


def test_the_tokens_of_a_deleted_service_account_are_refused(
    kube: KubeControlPlane, router: RouterProcess
) -> None:
    used, unused = token(kube, "doomed"), token(kube, "doomed")
    assert chat(router, used)
    kube.kubectl("delete", "serviceaccount", "doomed", "-n", TEAM)
    # Never seen: TokenReview refuses it at once. Seen: refused once the cached answer lapses.
    assert refused(router, unused).code == "invalid_token"
    # The router trusts its answer for cacheTtlSeconds (1 s here); kube-apiserver caches a
    # successful token authentication for 10 s of its own. Past both, the token is refused.
    started = time.monotonic()
    deadline = started + 25
    while True:
        try:
            chat(router, used)
        except openai.AuthenticationError as err:
            assert err.code == "invalid_token"
            print(f"deleted ServiceAccount's seen token refused after {time.monotonic() - started:.1f}s")
            break
        assert time.monotonic() < deadline, "a deleted ServiceAccount's token is still accepted"
        time.sleep(0.3)


def _key_id(kube: KubeControlPlane) -> tuple[Any, str]:
    key = serialization.load_pem_private_key(kube.service_account_signing_key.read_bytes(), None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # kube-apiserver's kid: base64url (no padding) of the SHA-256 of the public key's DER.
    return key, base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def signed_by_the_cluster(kube: KubeControlPlane, name: str, *, exp_in: float) -> str:
    status, sa = kube.request("GET", f"/api/v1/namespaces/{TEAM}/serviceaccounts/{name}")
    assert status == 200, sa
    key, kid = _key_id(kube)
    now = int(time.time())
    claims = {
        "iss": kube.server_url,
        "aud": ["kubellm"],
        "sub": f"system:serviceaccount:{TEAM}:{name}",
        "iat": now - 1200,
        "nbf": now - 1200,
        "exp": int(now + exp_in),
        "kubernetes.io": {"namespace": TEAM, "serviceaccount": {"name": name, "uid": sa["metadata"]["uid"]}},
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})  # type: ignore[arg-type]


def test_an_expired_token_is_refused(kube: KubeControlPlane, router: RouterProcess) -> None:
    token(kube, "worker")  # the ServiceAccount exists
    # The signing is right: the same claims, not yet expired, are accepted...
    assert chat(router, signed_by_the_cluster(kube, "worker", exp_in=600))
    expired = signed_by_the_cluster(kube, "worker", exp_in=-60)
    assert refused(router, expired).code == "token_expired"
    # ...and the API server agrees that the expired one is no good.
    review = {"spec": {"token": expired, "audiences": ["kubellm"]}, "kind": "TokenReview"}
    review["apiVersion"] = "authentication.k8s.io/v1"
    status, doc = kube.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)
    assert status == 201 and not doc["status"].get("authenticated"), doc


def test_an_oidc_token_maps_its_claims_to_a_team(
    kube: KubeControlPlane, router: RouterProcess, issuer: OidcIssuer
) -> None:
    alice = issuer.mint(sub="alice", groups=["ml", "staff"], team="ml-research")
    assert chat(router, alice)
    info = key_info(router, alice)
    assert info["key"] == "oidc:corp/alice" and info["team"] == "ml-research"
    assert refused(router, issuer.mint(sub="alice", iss="https://other.example")).code == "invalid_token"
    issuer.add_key("rsa-unpublished", "RS256", publish=False)
    assert refused(router, issuer.mint(sub="alice", kid="rsa-unpublished")).code == "invalid_token"
    # No binding covers a caller outside the ml group: authenticated, yet forbidden.
    with pytest.raises(openai.PermissionDeniedError):
        chat(router, issuer.mint(sub="bob", groups=["sales"]))


def test_a_router_without_the_tokenreview_grant_says_so(kube: KubeControlPlane) -> None:
    from tests.conftest import UPSTREAM_KEY

    bare = kube.service_account_kubeconfig("no-grants", "kubellm-system", duration="1h")
    config = {
        "deployments": [{"name": "m", "model": "gpt-test", "provider": "mock"}],
        "identityBindings": [{"name": "all", "serviceAccounts": [{"namespace": TEAM}]}],
        "settings": {
            "accessLog": False,
            "identity": {"kubernetes": {"enabled": True, "kubeconfig": str(bare)}},
        },
    }
    with RouterProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as proc:
        client = openai.OpenAI(base_url=proc.v1, api_key=token(kube, "worker"), max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    assert "may not create TokenReviews" in caught.value.message
