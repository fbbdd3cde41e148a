"""Bearer JWTs as credentials, in process: the OIDC validator against a loopback issuer, the
token cache, the binding of identities to keys, and what clients see when a token is refused.

The issuer (tests/support/oidc.py) is a real HTTP server on 127.0.0.1 serving a discovery
document and a JWKS; the router is the in-process ``Router`` over a fake upstream. ServiceAccount
tokens against a real API server are in tests/test_identity_kube.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.responses import Response

from kubellm.router.config._schema import RouterConfig
from kubellm.router.core._router import Router
from kubellm.router.core._services import build_services
from kubellm.router.core._state import build_state
from kubellm.router.identity._kubernetes import identity_of
from kubellm.router.identity._token import looks_like_jwt
from kubellm.router.inbound._anthropic import MessagesApi
from kubellm.router.providers import Operation
from tests.support.oidc import OidcIssuer
from tests.test_core import KEY, BodyInbound, FakeUpstream, completion

VIRTUAL_KEY = "sk-virtual-key-for-identity-tests"


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer() as running:
        yield running


def make_router(tmp_path: Path, issuer: OidcIssuer, **oidc: Any) -> Router:
    import hashlib

    config = RouterConfig.model_validate(
        {
            "deployments": [
                {
                    "name": "dep",
                    "model": "gpt-id",
                    "provider": "openai-compatible",
                    "baseUrl": "http://upstream.invalid/v1",
                    "apiKey": KEY,
                },
                {
                    "name": "dep-2",
                    "model": "gpt-other",
                    "provider": "openai-compatible",
                    "baseUrl": "http://upstream.invalid/v1",
                    "apiKey": KEY,
                },
            ],
            "keys": [{"name": "plain", "keyHash": hashlib.sha256(VIRTUAL_KEY.encode()).hexdigest()}],
            "identityBindings": [
                {"name": "ml/admins", "oidc": [{"issuer": "corp", "subjects": ["alice"]}], "team": "ml"},
                {
                    "name": "ml/readers",
                    "oidc": [{"issuer": "corp", "claims": {"groups": "readers"}}],
                    "models": ["gpt-other"],
                    "limits": {"rpm": 2},
                },
            ],
            "settings": {
                "stateDir": str(tmp_path),
                "accessLog": False,
                "identity": {
                    "oidc": [
                        {
                            "name": "corp",
                            "issuer": issuer.issuer,
                            "discoveryUrl": issuer.discovery_url,
                            "audiences": ["kubellm"],
                            "teamClaim": "team",
                            "clockSkewSeconds": 0,
                            **oidc,
                        }
                    ]
                },
            },
        }
    )
    state = build_state(config)
    upstream = FakeUpstream(lambda req, body: completion(body))
    return Router(state, build_services(state.config.settings, upstream_client=upstream))


def chat(model: str = "gpt-id") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def ask(router: Router, token: str, model: str = "gpt-id") -> tuple[Response, dict[str, Any]]:
    async def main() -> Response:
        inbound = BodyInbound(chat(model), {"authorization": f"Bearer {token}"})
        return await router.handle(Operation.CHAT, inbound)

    response = asyncio.run(main())
    return response, orjson.loads(response.body)


def refused(router: Router, token: str, code: str, status: int = 401) -> str:
    response, doc = ask(router, token)
    assert response.status_code == status, doc
    assert doc["error"]["code"] == code, doc
    assert token not in response.body.decode()
    return str(doc["error"]["message"])


def records(router: Router) -> list[Any]:
    async def main() -> list[Any]:
        await router.meter.ledger.flush()
        totals = await router.meter.ledger.store.aggregate(0, time.time() + 10, "key")
        return sorted(totals)

    return asyncio.run(main())


def test_a_token_of_the_issuer_is_a_caller_metered_under_its_identity(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    router = make_router(tmp_path, issuer)
    response, doc = ask(router, issuer.mint(sub="alice"))
    assert response.status_code == 200, doc
    assert records(router) == ["oidc:corp/alice"]
    # The ES256 key works as well, and the binding by claim applies to another subject.
    response, doc = ask(router, issuer.mint(kid="ec-1", sub="bob", groups=["readers"]), model="gpt-other")
    assert response.status_code == 200, doc
    assert records(router) == ["oidc:corp/alice", "oidc:corp/bob"]


def test_the_binding_decides_team_models_and_limits(tmp_path: Path, issuer: OidcIssuer) -> None:
    router = make_router(tmp_path, issuer)
    state = router.state
    alice = router.identities
    token = issuer.mint(sub="alice", team="ignored")
    assert ask(router, token)[0].status_code == 200
    key = alice.lookup(state, token)
    assert key is not None and key.config.team == "ml"  # the binding's team beats the claim
    # No team in the binding: the issuer's teamClaim names it.
    bob = issuer.mint(sub="bob", groups=["readers", "x"], team="search")
    assert ask(router, bob, model="gpt-other")[0].status_code == 200
    key = alice.lookup(state, bob)
    assert key is not None and key.config.team == "search" and key.config.name == "oidc:corp/bob"
    # The readers' binding allows one model only, with its own rpm limit per identity.
    response, doc = ask(router, bob)
    assert response.status_code == 403 and doc["error"]["param"] == "model"
    assert ask(router, bob, model="gpt-other")[0].status_code == 200
    response, doc = ask(router, bob, model="gpt-other")
    assert response.status_code == 429, doc
    # Someone the issuer vouches for but no binding covers is authenticated, not authorized.
    refused(router, issuer.mint(sub="mallory"), "identity_not_bound", 403)


def validations(result: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"source": "oidc:corp", "result": result}
    return REGISTRY.get_sample_value("kubellm_identity_validations_total", labels) or 0.0


def test_tokens_are_validated_once_and_cached(tmp_path: Path, issuer: OidcIssuer) -> None:
    accepted, refused_before = validations("accepted"), validations("refused")
    router = make_router(tmp_path, issuer)
    token = issuer.mint(sub="alice")
    for _ in range(5):
        assert ask(router, token)[0].status_code == 200
    assert router.identities.validations == 1
    assert issuer.jwks_fetches() == 1 and issuer.requests["/.well-known/openid-configuration"] == 1
    bad = issuer.mint(sub="alice", aud="someone-else")
    for _ in range(3):
        refused(router, bad, "invalid_audience")
    assert router.identities.validations == 2  # the refusal is cached too
    assert validations("accepted") == accepted + 1 and validations("refused") == refused_before + 1


def test_a_cached_token_is_dropped_when_it_expires(tmp_path: Path, issuer: OidcIssuer) -> None:
    router = make_router(tmp_path, issuer)
    token = issuer.mint(sub="alice", ttl=1.5)
    assert ask(router, token)[0].status_code == 200
    time.sleep(1.6)
    refused(router, token, "token_expired")
    assert router.identities.validations == 2


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"ttl": -5}, "token_expired"),
        ({"aud": "other"}, "invalid_audience"),
        ({"nbf": int(time.time()) + 3600}, "invalid_token"),
        ({"sub": None}, "invalid_token"),
        ({"iss": "https://evil.example"}, "invalid_token"),
    ],
)
def test_bad_tokens_are_401s_that_never_echo_the_token(
    tmp_path: Path, issuer: OidcIssuer, claims: dict[str, Any], code: str
) -> None:
    router = make_router(tmp_path, issuer)
    refused(router, issuer.mint(**claims), code)


def test_a_token_signed_by_another_key_with_a_known_kid_is_refused(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    router = make_router(tmp_path, issuer)
    with OidcIssuer() as forger:  # its own "rsa-1": the same kid, another key
        forged = forger.mint(kid="rsa-1", iss=issuer.issuer)
    assert "Signature" in refused(router, forged, "invalid_token")


def test_algorithms_are_limited_to_the_configured_ones(tmp_path: Path, issuer: OidcIssuer) -> None:
    import jwt

    router = make_router(tmp_path, issuer, algorithms=["RS256"])
    refused(router, issuer.mint(kid="ec-1"), "invalid_token")
    # alg=none and HMAC (signed with the public key as the secret) never get near a key.
    now = int(time.time())
    claims = {"iss": issuer.issuer, "aud": "kubellm", "sub": "alice", "exp": now + 60}
    none = jwt.encode(claims, None, algorithm="none", headers={"kid": "rsa-1"})
    refused(router, none, "invalid_token")
    hs = jwt.encode(claims, "x" * 32, algorithm="HS256", headers={"kid": "rsa-1"})
    refused(router, hs, "invalid_token")


def test_an_unknown_kid_refetches_the_jwks_at_most_once_per_interval(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    router = make_router(tmp_path, issuer, jwksMinRefreshSeconds=0.5)
    assert ask(router, issuer.mint())[0].status_code == 200
    assert issuer.jwks_fetches() == 1
    issuer.add_key("rsa-2", "RS256", publish=False)
    for _ in range(5):  # a kid the issuer does not publish: one refetch for the lot
        refused(
            router, issuer.mint(kid="rsa-2", jti=None, sub="alice", aud="kubellm", nbf=None), "invalid_token"
        )
    assert issuer.jwks_fetches() <= 2
    # The issuer rotates: once the interval passed, a token with the new kid is accepted.
    issuer.published.add("rsa-2")
    time.sleep(0.6)
    assert ask(router, issuer.mint(kid="rsa-2"))[0].status_code == 200


def test_a_dead_issuer_is_a_503_not_a_401(tmp_path: Path) -> None:
    with OidcIssuer() as gone:
        pass  # stopped: its port refuses connections
    router = make_router(tmp_path, gone)
    response, doc = ask(router, gone.mint())
    assert response.status_code == 503, doc


def test_virtual_keys_and_garbage_keep_their_paths(tmp_path: Path, issuer: OidcIssuer) -> None:
    router = make_router(tmp_path, issuer)
    assert ask(router, VIRTUAL_KEY)[0].status_code == 200
    refused(router, "sk-not-a-key-at-all", "invalid_api_key")
    refused(router, "eyJ.not.base64", "invalid_token")
    assert router.identities.validations == 1  # only the JWT-shaped one was looked at
    assert looks_like_jwt(issuer.mint()) and not looks_like_jwt(VIRTUAL_KEY)


def test_anthropic_callers_get_anthropic_errors(tmp_path: Path, issuer: OidcIssuer) -> None:
    router = make_router(tmp_path, issuer)
    token = issuer.mint(aud="nope")
    body = {"model": "gpt-id", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}

    async def main() -> Response:
        return await router.serve(MessagesApi(), BodyInbound(body, {"x-api-key": token}))

    response = asyncio.run(main())
    doc = orjson.loads(response.body)
    assert response.status_code == 401
    assert doc["type"] == "error" and doc["error"]["type"] == "authentication_error"
    assert token not in response.body.decode()


def test_token_review_answers_name_the_service_account() -> None:
    ok = identity_of({"authenticated": True, "user": {"username": "system:serviceaccount:team-a:worker"}})
    assert ok.name == "sa:team-a/worker"
    with pytest.raises(Exception, match="invalid ServiceAccount token"):
        identity_of({"authenticated": False, "error": "service account deleted"})
    with pytest.raises(Exception, match="not a ServiceAccount token"):
        identity_of({"authenticated": True, "user": {"username": "alice"}})


def test_concurrent_requests_with_a_new_token_share_one_validation(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    router = make_router(tmp_path, issuer)
    token = issuer.mint(sub="alice")

    async def main() -> list[int]:
        async def one() -> int:
            inbound = BodyInbound(chat(), {"authorization": f"Bearer {token}"})
            return (await router.handle(Operation.CHAT, inbound)).status_code

        # The first caller gives up at once: the others still get the shared validation's answer.
        first = asyncio.ensure_future(router.identities.resolve(router.state, token))
        await asyncio.sleep(0)
        first.cancel()
        return list(await asyncio.gather(*(one() for _ in range(20))))

    assert asyncio.run(main()) == [200] * 20
    assert router.identities.validations == 1
    assert router.identities.lookup(router.state, token) is not None
