"""Token prices and exact request costs.

Money is :class:`decimal.Decimal` everywhere. Stores that need integers
(Redis Lua, SQL sums) use pico-USD, 1e-12 USD: a price with up to six decimal
places per million tokens costs a whole number of pico-USD per token, so
costs computed from the shipped table convert without rounding.

The shipped table holds list prices in USD per one million tokens, standard
(not batch) tier, shortest-context tier where a vendor has two, the cache
*read* price as the cached-input price and, where a vendor charges for writing
its prompt cache (Anthropic: 1.25 times the input price for the 5-minute
cache), that as the cache-write price. Open-weight models are priced as a
typical hosted provider lists them. A deployment's ``pricing`` overrides any
field (see :func:`price_for`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol

#: When the prices in :data:`DEFAULT_PRICES` were taken from the vendors' price pages.
PRICES_AS_OF = "2025-08-15"

PICO = Decimal("1e-12")
_MILLION = Decimal(1_000_000)


def to_pico(amount: Decimal) -> int:
    """USD to integer pico-USD, rounding half-even below one pico-USD."""
    return int(amount.scaleb(12).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_pico(amount: int) -> Decimal:
    """Integer pico-USD to USD, exactly (the result has 12 decimal places)."""
    return Decimal(amount).scaleb(-12).quantize(PICO)


def format_usd(amount: Decimal) -> str:
    """Money as every output shows it: a plain decimal, exact, never an exponent (``str`` of a
    12-place zero is ``0E-12``), no trailing zeros and no negative zero.

    ``normalize`` is avoided on purpose: it rounds to the context's 28 digits.
    """
    if not amount.is_finite():
        raise ValueError(f"not an amount of money: {amount}")
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def quantize(amount: Decimal) -> Decimal:
    """``amount`` rounded to whole pico-USD, as every store keeps it."""
    return from_pico(to_pico(amount))


@dataclass(frozen=True, slots=True)
class Price:
    """USD per one million tokens."""

    input_per_million: Decimal
    output_per_million: Decimal
    #: Cached prompt tokens (cache reads); ``None`` bills them at the input price.
    cached_input_per_million: Decimal | None = None
    #: Prompt tokens written to the cache; ``None`` bills them at the input price.
    cache_write_input_per_million: Decimal | None = None
    #: USD per generated image, and per rerank search unit (``None``: free, or priced by tokens).
    per_image: Decimal | None = None
    per_search_unit: Decimal | None = None
    #: USD per one million characters of text turned into speech (``tts-1``).
    per_million_characters: Decimal | None = None
    #: USD per second of audio transcribed or translated (``whisper-1``).
    per_second: Decimal | None = None

    @property
    def cached_rate(self) -> Decimal:
        cached = self.cached_input_per_million
        return self.input_per_million if cached is None else cached

    @property
    def cache_write_rate(self) -> Decimal:
        written = self.cache_write_input_per_million
        return self.input_per_million if written is None else written


class PricingLike(Protocol):
    """What :func:`price_for` reads from an override (``_config.Pricing`` fits)."""

    @property
    def input_per_million(self) -> Decimal | None: ...

    @property
    def output_per_million(self) -> Decimal | None: ...

    @property
    def cached_input_per_million(self) -> Decimal | None: ...

    @property
    def cache_write_input_per_million(self) -> Decimal | None: ...

    @property
    def per_image(self) -> Decimal | None: ...

    @property
    def per_search_unit(self) -> Decimal | None: ...

    @property
    def per_million_characters(self) -> Decimal | None: ...

    @property
    def per_second(self) -> Decimal | None: ...


def _audio(characters: str | None = None, seconds: str | None = None) -> Price:
    """A model priced by characters of input (speech) or seconds of audio (transcription)."""
    return Price(
        Decimal(0),
        Decimal(0),
        per_million_characters=None if characters is None else Decimal(characters),
        per_second=None if seconds is None else Decimal(seconds),
    )


def _p(input_: str, output: str, cached: str | None = None, written: str | None = None) -> Price:
    return Price(
        Decimal(input_),
        Decimal(output),
        None if cached is None else Decimal(cached),
        None if written is None else Decimal(written),
    )


def _unit(*, image: str | None = None, search_unit: str | None = None) -> Price:
    """A model priced per image or per rerank search unit, not by tokens."""
    return Price(
        Decimal(0),
        Decimal(0),
        per_image=None if image is None else Decimal(image),
        per_search_unit=None if search_unit is None else Decimal(search_unit),
    )


#: Model name prefix -> price. Lookup is by longest prefix on a name boundary.
DEFAULT_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-4o": _p("2.50", "10.00", "1.25"),
    "gpt-4o-mini": _p("0.15", "0.60", "0.075"),
    "gpt-4.1": _p("2.00", "8.00", "0.50"),
    "gpt-4.1-mini": _p("0.40", "1.60", "0.10"),
    "gpt-4.1-nano": _p("0.10", "0.40", "0.025"),
    "o3-mini": _p("1.10", "4.40", "0.55"),
    "text-embedding-3-small": _p("0.02", "0"),
    "text-embedding-3-large": _p("0.13", "0"),
    # OpenAI audio: speech per character, transcription per second ($0.006 a minute)
    "tts-1": _audio(characters="15.00"),
    "tts-1-hd": _audio(characters="30.00"),
    "whisper-1": _audio(seconds="0.0001"),
    # Anthropic (cached = cache read; written = 5-minute cache write, 1.25 x input)
    "claude-3-5-sonnet": _p("3.00", "15.00", "0.30", "3.75"),
    "claude-3-7-sonnet": _p("3.00", "15.00", "0.30", "3.75"),
    "claude-sonnet-4": _p("3.00", "15.00", "0.30", "3.75"),
    "claude-3-haiku": _p("0.25", "1.25", "0.03", "0.30"),
    "claude-3-5-haiku": _p("0.80", "4.00", "0.08", "1.00"),
    "claude-3-opus": _p("15.00", "75.00", "1.50", "18.75"),
    "claude-opus-4": _p("15.00", "75.00", "1.50", "18.75"),
    "claude-opus-4-1": _p("15.00", "75.00", "1.50", "18.75"),
    # Google (prompts up to 128k tokens for 1.5, up to 200k for 2.5 Pro)
    "gemini-1.5-flash": _p("0.075", "0.30", "0.01875"),
    "gemini-1.5-flash-8b": _p("0.0375", "0.15", "0.01"),
    "gemini-1.5-pro": _p("1.25", "5.00", "0.3125"),
    "gemini-2.0-flash": _p("0.10", "0.40", "0.025"),
    "gemini-2.0-flash-lite": _p("0.075", "0.30"),
    "gemini-2.5-flash": _p("0.30", "2.50", "0.075"),
    "gemini-2.5-pro": _p("1.25", "10.00", "0.31"),
    # Mistral, Cohere, DeepSeek
    "mistral-large": _p("2.00", "6.00"),
    "command-r": _p("0.15", "0.60"),
    "command-r-plus": _p("2.50", "10.00"),
    "deepseek-chat": _p("0.27", "1.10", "0.07"),
    # Open weights, as typical hosted endpoints list them
    "llama-3.1-8b": _p("0.18", "0.18"),
    "llama-3.1-70b": _p("0.88", "0.88"),
    # Images: per image at the smallest standard size (gpt-image-1 bills tokens: text in, image out)
    "dall-e-2": _unit(image="0.02"),
    "dall-e-3": _unit(image="0.04"),
    "gpt-image-1": _p("5.00", "40.00", "1.25"),
    "imagen-3.0-generate": _unit(image="0.04"),
    "imagen-3.0-fast-generate": _unit(image="0.02"),
    "imagen-4.0-generate": _unit(image="0.04"),
    "imagen-4.0-fast-generate": _unit(image="0.02"),
    "imagen-4.0-ultra-generate": _unit(image="0.06"),
    # Moderation is free; rerank per search unit (Cohere: 1 query of up to 100 documents)
    "omni-moderation": _p("0", "0"),
    "text-moderation": _p("0", "0"),
    "rerank-v3.5": _unit(search_unit="0.002"),
    "rerank-v3-5": _unit(search_unit="0.002"),
    "rerank-english-v3.0": _unit(search_unit="0.002"),
    "rerank-multilingual-v3.0": _unit(search_unit="0.002"),
    "amazon.rerank-v1": _unit(search_unit="0.001"),
}

_MINOR = re.compile(r"^-[0-9](-|$)")
_ALIASES = {"claude-4-sonnet": "claude-sonnet-4", "claude-4-opus": "claude-opus-4"}


def _normalize(model: str) -> str:
    name = model.strip().lower().rsplit("/", 1)[-1]
    for vendor in ("anthropic.", "meta.", "meta-", "mistral.", "cohere."):
        name = name.removeprefix(vendor)
    name = name.split(":", 1)[0]  # Bedrock "...-v1:0"
    for alias, target in _ALIASES.items():
        if name.startswith(alias):
            name = target + name[len(alias) :]
    return name


@functools.lru_cache(maxsize=1024)  # a scan of the table; called for every finished request
def lookup(model: str) -> Price | None:
    """The shipped price of ``model``: exact name, else the longest table prefix before ``-``/``@``.

    A single-digit segment right after the prefix is a newer minor version
    (``claude-opus-4-5`` is not ``claude-opus-4``) and matches only if listed;
    dates and revisions (``-20250514``, ``-002``, ``-08-2024``) match.
    """
    name = _normalize(model)
    best: str | None = None
    for prefix in DEFAULT_PRICES:
        if name != prefix:
            rest = name[len(prefix) :]
            if not name.startswith(prefix) or rest[0] not in "-@" or _MINOR.match(rest):
                continue
        if best is None or len(prefix) > len(best):
            best = prefix
    return None if best is None else DEFAULT_PRICES[best]


def price_for(upstream_model: str, override: PricingLike | None = None) -> Price | None:
    """The price of a deployment: ``override`` fields win one by one over the table.

    An unknown model is priced only if the override sets at least the input
    price; its output price then defaults to 0 (embeddings). ``None`` means
    the cost is unknown, which callers should log rather than guess.
    """
    base = lookup(upstream_model)
    if override is None:
        return base
    inp, out = override.input_per_million, override.output_per_million
    cached = override.cached_input_per_million
    written = override.cache_write_input_per_million
    image, unit = override.per_image, override.per_search_unit
    chars, seconds = override.per_million_characters, override.per_second
    if base is None:
        if inp is None and image is None and unit is None and chars is None and seconds is None:
            return None
        zero = Decimal(0)
        return Price(
            inp if inp is not None else zero,
            out if out is not None else zero,
            cached,
            written,
            per_image=image,
            per_search_unit=unit,
            per_million_characters=chars,
            per_second=seconds,
        )
    return Price(
        base.input_per_million if inp is None else inp,
        base.output_per_million if out is None else out,
        base.cached_input_per_million if cached is None else cached,
        base.cache_write_input_per_million if written is None else written,
        per_image=base.per_image if image is None else image,
        per_search_unit=base.per_search_unit if unit is None else unit,
        per_million_characters=base.per_million_characters if chars is None else chars,
        per_second=base.per_second if seconds is None else seconds,
    )


def cost(
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    price: Price,
    cache_write_tokens: int = 0,
) -> Decimal:
    """The exact USD cost: cache reads at the cached rate, cache writes at the cache-write rate,
    the rest of the prompt at the input rate.

    ``cached_tokens`` and ``cache_write_tokens`` are part of ``prompt_tokens``
    (OpenAI's convention; Anthropic reports them beside ``input_tokens``, and the
    providers add them up) and are clamped to it, reads first.
    """
    if min(prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens) < 0:
        raise ValueError("token counts must not be negative")
    cached = min(cached_tokens, prompt_tokens)
    written = min(cache_write_tokens, prompt_tokens - cached)
    total = (
        (prompt_tokens - cached - written) * price.input_per_million
        + cached * price.cached_rate
        + written * price.cache_write_rate
        + completion_tokens * price.output_per_million
    )
    return total / _MILLION


class UsageLike(Protocol):
    """What :func:`usage_cost` reads (``providers.Usage`` fits)."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def cached_tokens(self) -> int: ...

    @property
    def cache_write_tokens(self) -> int: ...

    @property
    def images(self) -> int: ...

    @property
    def search_units(self) -> int: ...

    @property
    def characters(self) -> int: ...

    @property
    def audio_seconds(self) -> float: ...


def unit_cost(images: int, search_units: int, price: Price) -> Decimal:
    """What images and rerank search units cost at ``price`` (nothing where it sets no unit price)."""
    total = Decimal(0)
    if images and price.per_image is not None:
        total += images * price.per_image
    if search_units and price.per_search_unit is not None:
        total += search_units * price.per_search_unit
    return total


def usage_cost(usage: UsageLike, price: Price) -> Decimal:
    """:func:`cost` of one request's usage, cache reads and writes at their own prices, plus its
    images, rerank search units, characters spoken and seconds transcribed at theirs."""
    total = cost(
        usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, price, usage.cache_write_tokens
    )
    total += unit_cost(usage.images, usage.search_units, price)
    characters = usage.characters
    if characters and price.per_million_characters is not None:
        total += characters * price.per_million_characters / _MILLION
    seconds = usage.audio_seconds
    if seconds and price.per_second is not None:
        # repr: the float's shortest exact decimal (2.5 s, not 2.5000000000000000001).
        total += Decimal(repr(float(seconds))) * price.per_second
    return total
