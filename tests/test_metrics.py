"""The batched per-request metrics fold to exactly what one update per request would give."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from kubellm.router.core._finished import Finished
from kubellm.router.observability import _metrics as metrics
from kubellm.router.providers import Usage


def _samples(histogram: Histogram) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in histogram.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=200))
def test_observe_many_matches_observe_one_by_one(values: list[float]) -> None:
    registry = CollectorRegistry()
    buckets = (0.005, 0.01, 0.1, 1, 10, 100)
    one = Histogram("one", "h", ["g"], buckets=buckets, registry=registry)
    many = Histogram("many", "h", ["g"], buckets=buckets, registry=registry)
    child = one.labels("x")
    for value in values:
        child.observe(value)
    metrics.observe_many(many.labels("x"), values)
    expected = {(name.replace("one", "many", 1), labels): v for (name, labels), v in _samples(one).items()}
    assert _samples(many).keys() == expected.keys()
    for key, value in expected.items():
        assert abs(_samples(many)[key] - value) <= 1e-9 * max(1.0, abs(value))


def _value(metric: object, *labels: str) -> float:
    return metrics.child(metric, *labels)._value.get()  # type: ignore[no-any-return]


def _finished(
    group: str,
    dep: str | None,
    status: int,
    latency: float,
    ttft: float | None = None,
    tokens: tuple[int, int] | None = None,
    spend: float = 0.0,
) -> Finished:
    """A finished-request record with just what the recorder reads."""
    call = SimpleNamespace(group=SimpleNamespace(name=group), caller_label="key")
    return Finished(
        call=cast(Any, call),
        dep=cast(Any, SimpleNamespace(name=dep)) if dep is not None else None,
        status=status,
        usage=Usage(prompt_tokens=tokens[0], completion_tokens=tokens[1]) if tokens else None,
        ttft=ttft,
        payloads=None,
        latency=latency,
        cached=False,
        spend=spend,
        end_ns=0,
    )


def test_recorder_folds_counts_tokens_spend_latency_and_in_flight() -> None:
    recorder = metrics.Recorder()
    group = f"fold-{random.getrandbits(32):x}"  # labels of our own in the process-wide registry

    async def main() -> None:
        recorder.started(group)
        recorder.started(group)
        for i in range(5):
            recorder.finished(_finished(group, "dep", 200, 0.02 * (i + 1), tokens=(10, 3), spend=0.5))
        recorder.finished(_finished(group, None, 429, 0.001))
        recorder.ended(group)
        recorder.fold()

    asyncio.run(main())
    assert _value(metrics.REQUESTS, group, "dep", "key", "200") == 5
    assert _value(metrics.REQUESTS, group, "", "key", "429") == 1
    assert _value(metrics.TOKENS, group, "dep", "key", "prompt") == 50
    assert _value(metrics.TOKENS, group, "dep", "key", "completion") == 15
    assert _value(metrics.SPEND, group, "key") == 2.5
    assert _value(metrics.IN_FLIGHT, group) == 1
    latency = metrics.child(metrics.LATENCY, group, "dep")
    assert abs(latency._sum.get() - 0.3) < 1e-9
    assert sum(b.get() for b in latency._buckets) == 5


def test_recorder_folds_by_itself_within_the_interval() -> None:
    recorder = metrics.Recorder()
    group = f"timer-{random.getrandbits(32):x}"

    async def main() -> None:
        recorder.finished(_finished(group, "dep", 200, 0.01, ttft=0.005, tokens=(1, 1)))
        await asyncio.sleep(metrics.FOLD_SECONDS + 0.2)

    asyncio.run(main())
    assert _value(metrics.REQUESTS, group, "dep", "key", "200") == 1
    assert metrics.child(metrics.TTFT, group, "dep")._sum.get() == 0.005
