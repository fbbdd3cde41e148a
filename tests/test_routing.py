"""Routing and reliability end to end: retries, breakers, timeouts, fallbacks, cache, drain."""

from __future__ import annotations

import http.client
import signal
import threading
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


@pytest.fixture
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI, FakeOpenAI]]:
    with (
        FakeOpenAI(UPSTREAM_KEY, "a") as a,
        FakeOpenAI(UPSTREAM_KEY, "b") as b,
        FakeOpenAI(UPSTREAM_KEY, "c") as c,
    ):
        yield a, b, c


def _client(router: RouterProcess, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0, **kwargs)


def _chat(router: RouterProcess, model: str = "gpt-test", **kwargs: Any) -> Any:
    return _client(router).chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kwargs)


FAST = {"initialBackoffSeconds": 0.01, "maxBackoffSeconds": 2.0, "reloadIntervalSeconds": 0.2}


def test_failover_to_next_tier_counts_attempts(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, b, _ = fakes
    a.always = Fault(status=500)
    router = start_router(
        {
            "deployments": [
                openai_deployment(a, name="a", priority=0),
                openai_deployment(b, name="b", priority=1),
            ],
            "settings": FAST,
        }
    )
    raw = _chat(router)
    assert raw.headers["x-kubellm-deployment"] == "b"
    assert raw.headers["x-kubellm-attempts"] == "2"
    assert (a.calls, b.calls) == (1, 1)


def test_priority_tier_gets_no_traffic_while_the_higher_tier_is_healthy(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, b, _ = fakes
    router = start_router(
        {
            "deployments": [
                openai_deployment(a, name="a", priority=0),
                openai_deployment(b, name="b", priority=1),
            ]
        }
    )
    for _ in range(20):
        _chat(router)
    assert (a.calls, b.calls) == (20, 0)


def test_retries_same_deployment_with_backoff(start_router: Callable[..., RouterProcess], fakes: Any) -> None:
    a, _, _ = fakes
    a.queue(Fault(status=502), Fault(status=503))
    router = start_router(
        {
            "deployments": [openai_deployment(a, name="a")],
            "settings": {**FAST, "numRetries": 2, "cooldown": {"failureThreshold": 5}},
        }
    )
    raw = _chat(router)
    assert raw.headers["x-kubellm-attempts"] == "3"
    assert a.calls == 3
    gaps = [a.seen[i + 1].at - a.seen[i].at for i in range(2)]
    assert all(g >= 0.004 for g in gaps)  # backed off (jittered 50-100% of 10 ms, then 20 ms)


def test_retry_budget_is_exact(start_router: Callable[..., RouterProcess], fakes: Any) -> None:
    a, _, _ = fakes
    a.always = Fault(status=500)
    router = start_router(
        {
            "deployments": [openai_deployment(a, name="a")],
            "settings": {**FAST, "numRetries": 3, "cooldown": {"failureThreshold": 10}},
        }
    )
    with pytest.raises(openai.InternalServerError) as info:
        _chat(router)
    assert info.value.response.headers["x-kubellm-attempts"] == "4"
    assert a.calls == 4
    # Per-request override of the retry budget.
    with pytest.raises(openai.InternalServerError):
        _chat(router, extra_headers={"x-kubellm-num-retries": "0"})
    assert a.calls == 5


def test_429_retry_after_cools_down_and_is_honoured(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, _, _ = fakes
    a.queue(Fault(status=429, headers={"Retry-After": "1"}))
    router = start_router({"deployments": [openai_deployment(a, name="a")], "settings": FAST})
    started = time.monotonic()
    raw = _chat(router)
    assert raw.headers["x-kubellm-attempts"] == "2"
    assert a.calls == 2
    assert a.seen[1].at - a.seen[0].at >= 0.95
    assert time.monotonic() - started < 3


def test_breaker_opens_after_threshold_and_probe_closes_it(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, b, _ = fakes
    a.always = Fault(status=500)
    settings = {**FAST, "numRetries": 1, "cooldown": {"failureThreshold": 2, "cooldownSeconds": 1.0}}
    router = start_router(
        {
            "deployments": [
                openai_deployment(a, name="a", priority=0),
                openai_deployment(b, name="b", priority=1),
            ],
            "settings": settings,
        }
    )
    for _ in range(2):
        assert _chat(router).headers["x-kubellm-deployment"] == "b"
    assert a.calls == 2
    metrics = http_get(router.base_url + "/metrics")[1].decode()
    assert 'kubellm_deployment_cooldown{deployment="a"} 1.0' in metrics
    assert 'kubellm_cooldowns_total{deployment="a"} 1.0' in metrics
    for _ in range(5):  # open: "a" is skipped entirely
        assert _chat(router).headers["x-kubellm-attempts"] == "1"
    assert a.calls == 2
    a.always = None
    time.sleep(1.1)
    assert _chat(router).headers["x-kubellm-deployment"] == "a"  # the half-open probe succeeds
    assert a.calls == 3
    metrics = http_get(router.base_url + "/metrics")[1].decode()
    assert 'kubellm_deployment_cooldown{deployment="a"} 0.0' in metrics


def test_first_token_timeout_then_failover(start_router: Callable[..., RouterProcess], fakes: Any) -> None:
    a, b, _ = fakes
    a.always = Fault(hang=3)
    router = start_router(
        {
            "deployments": [
                openai_deployment(a, name="a", priority=0, timeouts={"firstToken": 0.3}),
                openai_deployment(b, name="b", priority=1),
            ],
            "settings": FAST,
        }
    )
    started = time.monotonic()
    raw = _chat(router)
    assert raw.headers["x-kubellm-deployment"] == "b"
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("header", "fault", "code"),
    [
        ("x-kubellm-first-token-timeout", Fault(hang=3), "first_token_timeout"),
        ("x-kubellm-timeout", Fault(hang=3), "total_timeout"),
        ("x-kubellm-idle-timeout", Fault(chunk_delay=1.0), "idle_timeout"),
    ],
)
def test_each_timeout_has_its_error(
    start_router: Callable[..., RouterProcess], fakes: Any, header: str, fault: Fault, code: str
) -> None:
    a, _, _ = fakes
    a.always = fault
    router = start_router(
        {"deployments": [openai_deployment(a, name="a")], "settings": {**FAST, "numRetries": 0}}
    )
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    stream = code == "idle_timeout"
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=orjson.dumps({"model": "gpt-test", "messages": MESSAGES, "stream": stream}),
        headers={"Content-Type": "application/json", header: "0.3"},
    )
    resp = conn.getresponse()
    body = resp.read()
    if stream:  # the idle gap happens before the first chunk: still a clean 504
        pass
    assert resp.status == 504, body
    err = orjson.loads(body)["error"]
    assert (err["type"], err["code"]) == ("timeout_error", code)


def test_connection_reset_fails_over(start_router: Callable[..., RouterProcess], fakes: Any) -> None:
    a, b, _ = fakes
    a.always = Fault(reset=True)
    router = start_router(
        {
            "deployments": [
                openai_deployment(a, name="a", priority=0),
                openai_deployment(b, name="b", priority=1),
            ],
            "settings": FAST,
        }
    )
    assert _chat(router).headers["x-kubellm-deployment"] == "b"


def test_no_retry_after_first_streamed_byte(start_router: Callable[..., RouterProcess], fakes: Any) -> None:
    a, b, _ = fakes
    a.queue(Fault(drop_after=2))
    router = start_router(
        {
            "deployments": [
                openai_deployment(a, name="a", priority=0),
                openai_deployment(b, name="b", priority=1),
            ],
            "settings": FAST,
        }
    )
    stream = _client(router).chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)
    assert (a.calls, b.calls) == (1, 0)


def _groups_config(a: FakeOpenAI, b: FakeOpenAI, c: FakeOpenAI, **group: Any) -> dict[str, Any]:
    return {
        "deployments": [
            openai_deployment(a, name="primary-a", model="primary"),
            openai_deployment(b, name="backup-b", model="backup"),
            openai_deployment(c, name="big-c", model="big"),
        ],
        "modelGroups": [{"name": "primary", **group}],
        "settings": {**FAST, "numRetries": 1},
    }


def test_generic_fallback_and_request_overrides(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, b, c = fakes
    a.always = Fault(status=503)
    router = start_router(_groups_config(a, b, c, fallbacks=["backup"]))
    raw = _chat(router, model="primary")
    assert raw.headers["x-kubellm-model-group"] == "backup"
    assert raw.headers["x-kubellm-deployment"] == "backup-b"
    assert raw.headers["x-kubellm-attempts"] == "3"
    assert raw.parse().choices[0].message.content == "b says hi to upstream-model"
    raw = _chat(router, model="primary", extra_headers={"x-kubellm-fallbacks": "big"})
    assert raw.headers["x-kubellm-model-group"] == "big"
    with pytest.raises(openai.APIStatusError) as info:
        _chat(router, model="primary", extra_headers={"x-kubellm-fallbacks": "none"})
    assert info.value.status_code == 503
    metrics = http_get(router.base_url + "/metrics")[1].decode()
    assert 'kubellm_fallbacks_total{model_group="primary",to="backup"} 1.0' in metrics


def test_client_errors_do_not_fall_back(start_router: Callable[..., RouterProcess], fakes: Any) -> None:
    a, b, c = fakes
    a.always = Fault(
        status=400,
        body={"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}},
    )
    router = start_router(_groups_config(a, b, c, fallbacks=["backup"]))
    with pytest.raises(openai.BadRequestError):
        _chat(router, model="primary")
    assert (a.calls, b.calls) == (1, 0)


def test_context_window_fallback_before_the_call(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, b, c = fakes
    config = _groups_config(a, b, c, contextWindowFallbacks=["big"])
    config["deployments"][0]["contextWindow"] = 50
    router = start_router(config)
    assert _chat(router, model="primary").headers["x-kubellm-model-group"] == "primary"
    long = [{"role": "user", "content": "word " * 200}]
    raw = _client(router).chat.completions.with_raw_response.create(model="primary", messages=long)
    assert raw.headers["x-kubellm-model-group"] == "big"
    assert a.calls == 1  # the too-long prompt never reached the small deployment


def test_context_window_fallback_on_upstream_error(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, b, c = fakes
    a.always = Fault(
        status=400,
        body={
            "error": {
                "message": "This model's maximum context length is 10 tokens",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    )
    router = start_router(_groups_config(a, b, c, contextWindowFallbacks=["big"], fallbacks=["backup"]))
    raw = _chat(router, model="primary")
    assert raw.headers["x-kubellm-model-group"] == "big"
    assert (a.calls, b.calls) == (1, 0)


def test_content_policy_fallback(start_router: Callable[..., RouterProcess], fakes: Any) -> None:
    a, b, c = fakes
    a.always = Fault(
        status=400,
        body={
            "error": {
                "message": "flagged by the content management policy",
                "type": "invalid_request_error",
                "param": None,
                "code": "content_filter",
            }
        },
    )
    router = start_router(_groups_config(a, b, c, contentPolicyFallbacks=["backup"]))
    raw = _chat(router, model="primary")
    assert raw.headers["x-kubellm-model-group"] == "backup"


def test_weighted_distribution_chi_square(start_router: Callable[..., RouterProcess]) -> None:
    router = start_router(
        {
            "deployments": [
                {"name": "w1", "model": "m", "provider": "mock", "weight": 1},
                {"name": "w3", "model": "m", "provider": "mock", "weight": 3},
                {"name": "w6", "model": "m", "provider": "mock", "weight": 6},
            ]
        }
    )
    client = _client(router)
    counts = {"w1": 0, "w3": 0, "w6": 0}
    n = 600
    for _ in range(n):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        counts[raw.headers["x-kubellm-deployment"]] += 1
    expected = {"w1": n * 0.1, "w3": n * 0.3, "w6": n * 0.6}
    chi2 = sum((counts[k] - expected[k]) ** 2 / expected[k] for k in counts)
    # 2 degrees of freedom: P(chi2 > 13.8) = 0.001.
    assert chi2 < 13.8, counts


def test_response_cache(start_router: Callable[..., RouterProcess], fakes: Any) -> None:
    a, _, _ = fakes
    router = start_router({"deployments": [openai_deployment(a, name="a", cache=True)]})
    first = _chat(router, temperature=0)
    assert first.headers["x-kubellm-cache"] == "miss"
    second = _chat(router, temperature=0)
    assert second.headers["x-kubellm-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert a.calls == 1
    assert (
        _chat(router, temperature=0, extra_headers={"Cache-Control": "no-cache"}).headers["x-kubellm-cache"]
        == "miss"
    )
    assert a.calls == 2
    assert _chat(router, temperature=1).headers["x-kubellm-cache"] == "miss"
    # A streamed request is cached as its stream, and replayed as one.
    streams = []
    for _ in range(2):
        with _client(router).chat.completions.with_streaming_response.create(
            model="gpt-test", messages=MESSAGES, stream=True
        ) as resp:
            streams.append(
                (
                    resp.headers["x-kubellm-cache"],
                    "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices),
                )
            )
    assert streams == [("miss", "a says hi to upstream-model"), ("hit", "a says hi to upstream-model")]
    assert a.calls == 4


def test_graceful_drain_finishes_stream(start_router: Callable[..., RouterProcess]) -> None:
    router = start_router(
        {
            "deployments": [
                {"name": "slow", "model": "m", "provider": "mock", "mock": {"chunkDelayMs": 150}}
            ],
            "settings": {"drainDelaySeconds": 0.5},
        }
    )
    stream = _client(router).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "one two three four five six"}], stream=True
    )
    pieces: list[str] = []
    reader = threading.Thread(
        target=lambda: pieces.extend(c.choices[0].delta.content or "" for c in stream if c.choices)
    )
    reader.start()
    time.sleep(0.4)
    router.signal(signal.SIGTERM)
    time.sleep(0.1)
    status, body = http_get(router.base_url + "/health/readiness")
    assert status == 503 and orjson.loads(body)["status"] == "draining"
    reader.join(10)
    assert "".join(pieces) == "This is a mock response from kubellm. You said: one two three four five six"
    assert router.proc is not None
    router.proc.wait(10)
    with pytest.raises(OSError):
        http_get(router.base_url + "/health/liveness", timeout=1)


def test_breaker_is_shared_across_replicas_through_redis(fakes: Any) -> None:
    a, b, _ = fakes
    a.always = Fault(status=500)
    with RedisServer() as redis:
        config = {
            "deployments": [
                openai_deployment(a, name="a", priority=0),
                openai_deployment(b, name="b", priority=1),
            ],
            "settings": {
                **FAST,
                "numRetries": 1,
                "redis": {"url": redis.url},
                "cooldown": {"failureThreshold": 2, "cooldownSeconds": 30},
            },
        }
        env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
        with RouterProcess(config, env=env) as one, RouterProcess(config, env=env) as two:
            _chat(one)
            _chat(one)  # two failures on replica one open the shared breaker
            assert a.calls == 2
            time.sleep(0.6)  # replica two refreshes its snapshot
            for _ in range(5):
                assert _chat(two).headers["x-kubellm-attempts"] == "1"
            assert a.calls == 2
            metrics = http_get(two.base_url + "/metrics")[1].decode()
            assert 'kubellm_deployment_cooldown{deployment="a"} 1.0' in metrics


def test_saturated_deployment_is_skipped(start_router: Callable[..., RouterProcess], fakes: Any) -> None:
    a, b, _ = fakes
    router = start_router(
        {
            "deployments": [
                openai_deployment(a, name="a", priority=0, limits={"rpm": 2}),
                openai_deployment(b, name="b", priority=1),
            ]
        }
    )
    served = [_chat(router).headers["x-kubellm-deployment"] for _ in range(4)]
    assert served == ["a", "a", "b", "b"]
    assert (a.calls, b.calls) == (2, 2)


def _concurrent(router: RouterProcess, n: int) -> list[int]:
    results: list[int] = []

    def one() -> None:
        try:
            _chat(router)
            results.append(200)
        except openai.APIStatusError as exc:
            results.append(exc.status_code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_whole_group_saturated_is_429_or_queued(
    start_router: Callable[..., RouterProcess], fakes: Any
) -> None:
    a, _, _ = fakes
    a.always = Fault(hang=0.4)
    limits = {"maxParallelRequests": 1}
    router = start_router({"deployments": [openai_deployment(a, name="a", limits=limits)]})
    statuses = _concurrent(router, 3)
    assert sorted(statuses) == [200, 429, 429]
    queued = start_router(
        {"deployments": [openai_deployment(a, name="a", limits=limits)], "settings": {"queueWaitSeconds": 5}}
    )
    assert _concurrent(queued, 3) == [200, 200, 200]


def _keep_alive_client(
    router: RouterProcess, stream: bool, deadline: float, out: dict[str, list[str]], name: str
) -> None:
    """One client on one kept-alive connection, without retries: requests back to back until a
    response says ``Connection: close`` (a real client then reconnects, to another pod)."""
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    headers = {"Content-Type": "application/json", "Authorization": "Bearer x"}
    served = 0
    try:
        while time.monotonic() < deadline:
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
            if resp.status != 200 or (b"[DONE]" not in text if stream else b"choices" not in text):
                out["failed"].append(f"{name}: {resp.status} {text[:200]!r}")
                return
            served += 1
            if (resp.getheader("connection") or "").lower() == "close":
                out["closed"].append(f"{name} after {served}")
                return
        out["failed"].append(f"{name}: never told to close its connection")
    except (OSError, http.client.HTTPException) as exc:
        out["failed"].append(f"{name}: {type(exc).__name__}: {exc} after {served} requests")
    finally:
        conn.close()


def test_drain_hands_keep_alive_clients_off_without_a_failure(
    start_router: Callable[..., RouterProcess],
) -> None:
    """Defect 1 of issue 15 (a rollout dropped keep-alive requests): after SIGTERM every response
    carries `Connection: close`, and kept-alive connections are served, not closed under a client
    about to reuse them, until the drain delay ends. Clients without retries, streamed and not,
    each reuse one connection back to back across the SIGTERM: none may fail, and each must be
    told to close (before the fix nothing said so, and uvicorn closed the pooled connections)."""
    router = start_router(
        {
            "deployments": [{"name": "mock", "model": "m", "provider": "mock", "mock": {"chunkDelayMs": 5}}],
            "settings": {"drainDelaySeconds": 2},
        }
    )
    out: dict[str, list[str]] = {"failed": [], "closed": []}
    deadline = time.monotonic() + 15
    threads = [
        threading.Thread(target=_keep_alive_client, args=(router, i % 2 == 0, deadline, out, f"client{i}"))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    router.signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert out["failed"] == []
    assert len(out["closed"]) == len(threads)
    assert router.proc is not None
    assert router.proc.wait(15) in (0, -signal.SIGTERM)
