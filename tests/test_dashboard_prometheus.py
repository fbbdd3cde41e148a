"""The chart's Grafana dashboard against a real Prometheus (Debian's ``prometheus``) scraping two
real router processes after a short mixed load: every panel's PromQL parses and returns series.

The routers share a real Redis, as the chart's pods do; one runs two workers (the chart's
``router.workers``), so the multiprocess metrics are what Prometheus sees. The load has what the
panels chart: successes, streams (time to first token), tokens and spend per key, cache hits,
a rate-limited key, an upstream that always fails (retries, breaker openings, a fallback, and a
group with no fallback whose error reaches the client), a config reload, and a Redis outage.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from kubellm.router.config._schema import parse_config
from tests.conftest import UPSTREAM_KEY
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.prometheus import (
    DashboardError,
    Prometheus,
    check_dashboard,
    load_dashboard,
    panel_queries,
)
from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess, as_written

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None and not Path("/usr/bin/prometheus").exists(),
    reason="Debian's prometheus is not installed (scripts/test.sh installs it)",
)

KEYS = {"APP_KEY": "sk-app-0123456789abcdef", "TIGHT_KEY": "sk-tight-0123456789abc"}
HELLO: Any = [{"role": "user", "content": "Hello there"}]


def _config(ok: FakeOpenAI, broken: FakeOpenAI, redis_url: str) -> dict[str, Any]:
    def dep(name: str, model: str, fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
        return {"name": name, "model": model, "provider": "openai-compatible", "upstreamModel": "up",
                "baseUrl": fake.base_url, "apiKeyEnv": "UPSTREAM_KEY", **extra}  # fmt: skip

    pricing = {"inputPerMillion": "3", "outputPerMillion": "15"}
    return {
        "deployments": [
            dep("chat-a", "chat", ok, pricing=pricing, cache=True),
            dep("chat-b", "chat", ok, pricing=pricing, cache=True),
            dep("flaky-1", "flaky", broken),
            dep("flaky-2", "flaky", broken),
            dep("down-1", "down", broken),
        ],
        "modelGroups": [{"name": "flaky", "fallbacks": ["chat"]}],
        "keys": [
            {"name": "team/app", "keyEnv": "APP_KEY"},
            {"name": "team/tight", "keyEnv": "TIGHT_KEY", "limits": {"rpm": 2}},
        ],
        "settings": {
            "numRetries": 1,
            "initialBackoffSeconds": 0,
            "cooldown": {"failureThreshold": 1},
            "reloadIntervalSeconds": 0.2,
            "redis": {"url": redis_url},
        },
    }


@pytest.fixture
def upstreams() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as ok, FakeOpenAI(api_key=UPSTREAM_KEY, name="broken") as broken:
        broken.always = Fault(status=500)
        yield ok, broken


def _round(routers: list[RouterProcess], n: int) -> None:
    """One round of mixed traffic, spread over the routers as a Service would spread it."""
    for i, router in enumerate(routers):
        app = openai.OpenAI(base_url=router.v1, api_key=KEYS["APP_KEY"], max_retries=0)
        tight = openai.OpenAI(base_url=router.v1, api_key=KEYS["TIGHT_KEY"], max_retries=0)
        prompt: Any = [{"role": "user", "content": f"round {n} router {i}"}]
        for _ in range(2):  # the second is a cache hit
            assert app.chat.completions.create(model="chat", messages=prompt).choices[0].message.content
        # A prompt of its own: a cached stream is replayed, with no time to first token upstream.
        stream = app.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": f"stream {n} {i}"}], stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        assert chunks and chunks[-1].usage is not None
        assert app.chat.completions.create(model="flaky", messages=HELLO).choices  # answered by fallback
        with pytest.raises(openai.APIStatusError) as down:
            app.chat.completions.create(model="down", messages=HELLO)
        assert down.value.status_code >= 500
        with pytest.raises(openai.RateLimitError):
            for _ in range(5):  # rpm 2, shared through Redis; 5 covers a window boundary in between
                tight.chat.completions.create(model="chat", messages=HELLO)


#: Panels that must fail the check, each for its own reason, in a collapsed row (nested panels).
BROKEN = {
    "No such metric": "sum(rate(kubellm_no_such_thing_total[$__rate_interval]))",
    "No such label": 'sum(kubellm_requests_total{model="chat"})',
    "Bad syntax": "sum(rate(kubellm_requests_total[$__rate_interval])",
    "Undefined variable": 'sum(kubellm_requests_total{pod=~"$pod"})',
    "Nothing finite": "vector(0) / 0",
}


def _broken_dashboard() -> dict[str, Any]:
    board = load_dashboard()
    panels = [
        {"type": "timeseries", "title": t, "targets": [{"refId": "A", "expr": e}]} for t, e in BROKEN.items()
    ]
    board["panels"].append({"type": "row", "title": "Broken", "collapsed": True, "panels": panels})
    return board


def _routers_per_version(prom: Prometheus) -> dict[str, float]:
    """What the "Config versions and reloads" panel shows as "routers on <version>"."""
    board = load_dashboard()
    (expr,) = [pq.expr for pq in panel_queries(board) if pq.expr.startswith("count by (version)")]
    series, error = prom.query(expr)
    assert error is None, error
    return {s["metric"]["version"]: float(s["value"][1]) for s in series}


def test_every_dashboard_panel_returns_series_after_a_short_load(
    upstreams: tuple[FakeOpenAI, FakeOpenAI],
) -> None:
    ok, broken = upstreams
    assert len(panel_queries(load_dashboard())) >= 20
    env = {"UPSTREAM_KEY": UPSTREAM_KEY, **KEYS}
    with RedisServer() as redis, contextlib.ExitStack() as stack:
        config = _config(ok, broken, redis.url)
        one, two = RouterProcess(config, env=env), RouterProcess(config, env=env, workers=2)
        # Prometheus first: it applies a new target set only every 5 s, so it waits for the
        # routers' start-up rather than the other way round.
        prom = stack.enter_context(Prometheus([f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"]))
        for router in (one, two):
            stack.callback(router.stop)
            router.start(wait=False)
        for router in (one, two):
            router.wait_ready()
        prom.wait_targets_up()
        _round([one, two], 1)
        # Every series exists in Prometheus before the second round, so rates over the window see
        # it grow (a counter first seen at 1 never shows the step from 0).
        prom.wait_scraped(after=time.time() + 1.1)  # another worker's counts fold within 1 s
        _round([one, two], 2)
        before = _routers_per_version(prom)
        reloaded = {**config, "settings": {**config["settings"], "numRetries": 2}}
        for router in (one, two):  # a config reload, as the operator's Secret update does
            router.write_config(reloaded)
        version = parse_config(as_written(reloaded)).version
        redis.stop()  # shared state goes away: the routers fail open and count the errors
        app = openai.OpenAI(base_url=one.v1, api_key=KEYS["APP_KEY"], max_retries=0)
        app.chat.completions.create(model="chat", messages=[{"role": "user", "content": "no redis"}])
        deadline = time.monotonic() + 10
        while _routers_per_version(prom) != {version: 2}:  # two routers, whatever their workers
            assert time.monotonic() < deadline, (before, _routers_per_version(prom), version)
            time.sleep(0.2)
        prom.wait_scraped(after=time.time() + 1.1)
        checked = check_dashboard(prom)
        with pytest.raises(DashboardError) as caught:
            check_dashboard(prom, _broken_dashboard())
    failed = {f.where: f.problem for f in caught.value.failures}
    assert set(failed) == {f"Broken / {title} [A]" for title in BROKEN}, caught.value
    assert failed["Broken / No such metric [A]"] == failed["Broken / No such label [A]"] == "no series"
    assert "parse error" in failed["Broken / Bad syntax [A]"]
    assert "$pod" in str(caught.value) and "'pod'" in failed["Broken / Undefined variable [A]"]
    assert "none with a finite value" in failed["Broken / Nothing finite [A]"]
    assert before == {parse_config(as_written(config)).version: 2}
    assert broken.calls > 0 and ok.calls > 0
    assert all("$" not in pq.query for pq in checked)
