"""Prices: table lookup by upstream model name, overrides field by field, exact costs."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubellm.router.config._schema import Pricing
from kubellm.router.metering._pricing import (
    DEFAULT_PRICES,
    PRICES_AS_OF,
    Price,
    _p,
    cost,
    from_pico,
    lookup,
    price_for,
    to_pico,
    usage_cost,
)
from kubellm.router.providers import Usage

D = Decimal


@pytest.mark.parametrize(
    ("model", "entry"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai/gpt-4.1-mini", "gpt-4.1-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet@20240620", "claude-3-5-sonnet"),
        ("anthropic.claude-3-5-haiku-20241022-v1:0", "claude-3-5-haiku"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-4-opus", "claude-opus-4"),
        ("gemini-1.5-flash-002", "gemini-1.5-flash"),
        ("gemini-1.5-flash-8b", "gemini-1.5-flash-8b"),
        ("gemini-2.0-flash-lite-001", "gemini-2.0-flash-lite"),
        ("models/gemini-2.5-pro", "gemini-2.5-pro"),
        ("mistral-large-latest", "mistral-large"),
        ("meta-llama/llama-3.1-70b-instruct", "llama-3.1-70b"),
        ("llama-3.1-8b-instant", "llama-3.1-8b"),
        ("command-r-plus-08-2024", "command-r-plus"),
        ("command-r-08-2024", "command-r"),
        ("text-embedding-3-small", "text-embedding-3-small"),
        ("DeepSeek-Chat", "deepseek-chat"),
    ],
)
def test_lookup_by_upstream_name(model: str, entry: str) -> None:
    assert lookup(model) is DEFAULT_PRICES[entry]


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4",
        "o3",
        "gpt-4omni",
        "claude",
        "my-finetune",
        "",
        "claude-opus-4-5",
        "claude-sonnet-4-5-20250929",
    ],
)
def test_unknown_models_have_no_price(model: str) -> None:
    assert lookup(model) is None


def test_table_is_dated_and_sane() -> None:
    assert PRICES_AS_OF[:4].isdigit()
    for name, p in DEFAULT_PRICES.items():
        # Image and rerank models are priced per unit, audio models per character or second;
        # moderation is free.
        audio = [r for r in (p.per_million_characters, p.per_second) if r is not None]
        assert p.input_per_million > 0 or p.per_image or p.per_search_unit or audio or "moderation" in name, (
            name
        )
        assert all(r > 0 for r in audio), name
        for unit in (p.per_image, p.per_search_unit):
            assert unit is None or (unit > 0 and unit.scaleb(12) == unit.scaleb(12).to_integral_value()), name
        assert p.output_per_million >= 0, name
        assert p.cached_rate <= p.input_per_million, name
        # Whole pico-USD per token, so costs convert to pico-USD without rounding.
        for rate in (p.input_per_million, p.output_per_million, p.cached_rate):
            assert (rate / 1_000_000).scaleb(12) == (rate / 1_000_000).scaleb(12).to_integral_value()


def test_override_wins_field_by_field() -> None:
    base = DEFAULT_PRICES["gpt-4o"]
    assert price_for("gpt-4o", Pricing()) == base
    assert price_for("gpt-4o", Pricing(output_per_million=D("12"))) == Price(
        base.input_per_million, D("12"), base.cached_input_per_million
    )
    assert price_for("gpt-4o", Pricing(input_per_million=D("1"), cached_input_per_million=D("0"))) == Price(
        D("1"), base.output_per_million, D("0")
    )
    assert price_for("in-house-model") is None
    assert price_for("in-house-model", Pricing(output_per_million=D("1"))) is None
    assert price_for("in-house-embed", Pricing(input_per_million=D("0.05"))) == Price(D("0.05"), D(0), None)


def test_cost_bills_cached_prompt_tokens_at_the_cached_rate() -> None:
    p = DEFAULT_PRICES["gpt-4o"]  # 2.50 in, 1.25 cached, 10.00 out
    assert cost(1_000_000, 0, 0, p) == D("2.5")
    assert cost(1_000_000, 1_000_000, 400_000, p) == D("1.5") + D("0.5") + D("10")
    assert cost(1, 1, 1, p) == D("0.00001125")
    assert cost(10, 0, 99, p) == cost(10, 0, 10, p)  # cached is part of prompt, clamped
    assert cost(3, 0, 3, Price(D("1"), D("1"))) == cost(3, 0, 0, Price(D("1"), D("1")))  # no cached rate
    with pytest.raises(ValueError):
        cost(-1, 0, 0, p)


def test_cost_bills_cache_writes_at_the_cache_write_rate() -> None:
    p = DEFAULT_PRICES["claude-sonnet-4"]  # 3.00 in, 0.30 read, 3.75 written, 15.00 out
    assert p.cache_write_rate == D("3.75")
    # 1M prompt tokens: 200k read from the cache, 300k written to it, 500k plain input.
    assert cost(1_000_000, 0, 200_000, p, 300_000) == D("0.06") + D("1.125") + D("1.5")
    assert usage_cost(Usage(1_000_000, 0, 200_000, cache_write_tokens=300_000), p) == D("2.685")
    # Writes are part of the prompt too: clamped to what the reads leave.
    assert cost(10, 0, 4, p, 99) == cost(10, 0, 4, p, 6)
    assert cost(10, 0, 0, Price(D("1"), D("1")), 10) == cost(10, 0, 0, Price(D("1"), D("1")))  # no rate
    assert lookup("anthropic.claude-3-5-haiku-20241022-v1:0") == _p("0.80", "4.00", "0.08", "1.00")
    override = Pricing(cache_write_input_per_million=D("7"))
    assert price_for("claude-sonnet-4-20250514", override) == Price(D("3.00"), D("15.00"), D("0.30"), D("7"))
    assert Pricing.model_validate({"cacheWriteInputPerMillion": "2.5"}).cache_write_input_per_million == D(
        "2.5"
    )
    with pytest.raises(ValueError):
        cost(1, 0, 0, p, -1)


def test_usage_clamps_cache_writes_and_reports_them_the_openai_way() -> None:
    usage = Usage(prompt_tokens=10, completion_tokens=1, cached_tokens=4, cache_write_tokens=50)
    assert usage.cache_write_tokens == 6
    doc = usage.to_openai()
    assert doc["prompt_tokens_details"] == {"cached_tokens": 4, "cache_write_tokens": 6}
    assert Usage.from_openai(doc) == usage
    assert "prompt_tokens_details" not in Usage(3, 1).to_openai()


@given(
    st.sampled_from(sorted(DEFAULT_PRICES)),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
)
def test_cost_is_exact(model: str, prompt: int, completion: int, cached: int) -> None:
    p = DEFAULT_PRICES[model]
    c = cost(prompt, completion, cached, p)
    cached = min(cached, prompt)
    parts = (
        (prompt - cached) * p.input_per_million + cached * p.cached_rate + completion * p.output_per_million
    )
    assert c * 1_000_000 == parts
    assert from_pico(to_pico(c)) == c  # whole pico-USD: stores keep it without rounding
