"""An upstream that rejects a deployment's credentials (401/403), end to end.

A rejected credential is not transient: the router calls that deployment once per request at
most, fails over to another one, and keeps answering with the credential error (not a 503
cooldown) while the deployment's last answer was a rejection. Readiness names the reason; a
successful probe or a config reload with a new key clears it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess, http_get

MESSAGES = [{"role": "user", "content": "hi"}]
BAD_KEY = "sk-revoked-credential-0123456789abcdef"
FAST = {"initialBackoffSeconds": 0.01, "maxBackoffSeconds": 0.05, "reloadIntervalSeconds": 0.1}


@pytest.fixture
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI(UPSTREAM_KEY, "a") as a, FakeOpenAI(UPSTREAM_KEY, "b") as b:
        yield a, b


def _chat(router: RouterProcess, **kwargs: Any) -> Any:
    client = openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0)
    return client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES, **kwargs)


def _health(router: RouterProcess, name: str) -> dict[str, Any]:
    status, body = http_get(router.base_url + "/health/readiness")
    assert status == 200  # a rejected credential does not take the replica out of its Service
    deployments: dict[str, dict[str, Any]] = orjson.loads(body)["deployments"]
    return deployments[name]


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _bad_key_router(start_router: Callable[..., RouterProcess], fake: FakeOpenAI, **settings: Any) -> Any:
    config = {
        "deployments": [openai_deployment(fake, name="a", apiKeyEnv="BAD_UPSTREAM_KEY")],
        "settings": {**FAST, "numRetries": 3, **settings},
    }
    return start_router(config, env={"BAD_UPSTREAM_KEY": BAD_KEY}), config


def test_rejected_key_is_tried_once_and_stays_a_401(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, _ = fakes
    router, config = _bad_key_router(start_router, a)
    for _ in range(3):  # before the fix: 4 attempts, then 503 "cooling down" from the second on
        with pytest.raises(openai.AuthenticationError) as info:
            _chat(router)
        assert info.value.status_code == 401
        error = info.value.body
        assert isinstance(error, dict)
        assert error["code"] == "upstream_authentication_error"
        assert "'a'" in error["message"]
        assert BAD_KEY not in info.value.response.text
    assert a.refused == 1  # the first request's only attempt; later ones know the answer
    assert _health(router, "a") == {
        "healthy": False,
        "reason": "the upstream rejected the credentials (401)",
    }

    # The credential is fixed and the config reloaded: the rejection is forgotten at once.
    config["deployments"][0]["apiKeyEnv"] = "TEST_UPSTREAM_KEY"
    router.write_config(config)
    _wait(lambda: _health(router, "a")["healthy"], "reload clears the rejection")
    assert _chat(router).headers["x-kubellm-deployment"] == "a"
    assert a.calls == 1


def test_permission_denied_is_a_403_not_a_cooldown(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, _ = fakes
    a.always = Fault(status=403, body={"error": {"message": "This key may not use this model."}})
    router = start_router(
        {"deployments": [openai_deployment(a, name="a")], "settings": {**FAST, "numRetries": 3}}
    )
    for _ in range(2):
        with pytest.raises(openai.PermissionDeniedError) as info:
            _chat(router)
        assert info.value.status_code == 403
        assert isinstance(info.value.body, dict)
        assert info.value.body["code"] == "upstream_permission_denied"
        assert "'a'" in info.value.body["message"]
    assert a.calls == 1
    assert _health(router, "a")["reason"] == "the upstream rejected the credentials' permissions (403)"


def test_fails_over_from_a_rejected_deployment_and_then_avoids_it(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, b = fakes
    router = start_router(
        {
            "deployments": [
                # "a" comes first (tier 0), so the first request must meet its rejection.
                openai_deployment(a, name="a", priority=0, apiKeyEnv="BAD_UPSTREAM_KEY"),
                openai_deployment(b, name="b", priority=1),
            ],
            "settings": {**FAST, "numRetries": 3},
        },
        env={"BAD_UPSTREAM_KEY": BAD_KEY},
    )
    first = _chat(router)
    assert (first.headers["x-kubellm-deployment"], first.headers["x-kubellm-attempts"]) == ("b", "2")
    for _ in range(5):
        raw = _chat(router, stream=True)
        assert (raw.headers["x-kubellm-deployment"], raw.headers["x-kubellm-attempts"]) == ("b", "1")
        list(raw.parse())
    assert (a.refused, b.calls) == (1, 6)
    assert _health(router, "a")["healthy"] is False
    assert _health(router, "b") == {"healthy": True}


def test_a_successful_probe_clears_the_rejection(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, _ = fakes
    a.api_key = BAD_KEY  # the upstream rejects the deployment's key until it is fixed upstream
    router = start_router(
        {
            "deployments": [openai_deployment(a, name="a")],
            "settings": {**FAST, "cooldown": {"cooldownSeconds": 0.3}},
        }
    )
    with pytest.raises(openai.AuthenticationError):
        _chat(router)
    assert _health(router, "a")["healthy"] is False
    a.api_key = UPSTREAM_KEY
    time.sleep(0.4)  # past the cooldown: the next request probes the deployment
    assert _chat(router).headers["x-kubellm-deployment"] == "a"
    assert _health(router, "a") == {"healthy": True}


def test_rejection_is_shared_across_replicas_through_redis(fakes: Any) -> None:
    a, _ = fakes
    with RedisServer() as redis:
        config = {
            "deployments": [openai_deployment(a, name="a", apiKeyEnv="BAD_UPSTREAM_KEY")],
            "settings": {**FAST, "numRetries": 3, "redis": {"url": redis.url}},
        }
        env = {"BAD_UPSTREAM_KEY": BAD_KEY}
        with RouterProcess(config, env=env) as one, RouterProcess(config, env=env) as two:
            with pytest.raises(openai.AuthenticationError):
                _chat(one)
            _wait(lambda: not _health(two, "a")["healthy"], "replica two sees the rejection")
            with pytest.raises(openai.AuthenticationError) as info:
                _chat(two)
            assert isinstance(info.value.body, dict)
            assert info.value.body["code"] == "upstream_authentication_error"
            assert a.refused == 1
