"""A deployment's ``mode``: config, inference, routing, the operator's mapping; unit prices; the
multipart round trip of image edits. In process (the end-to-end side is tests/test_surface.py)."""

from __future__ import annotations

import asyncio
import base64
from decimal import Decimal

import pytest

from kubellm.operator._build import build_config
from kubellm.router.config._modes import infer_mode, operation_mode
from kubellm.router.config._schema import ConfigError, DeploymentConfig, Pricing, parse_config
from kubellm.router.core._state import Deployment, build_state
from kubellm.router.inbound._multipart import encode_form, parse_form
from kubellm.router.metering._pricing import price_for, usage_cost
from kubellm.router.metering._units import requested_units
from kubellm.router.providers import Operation, Usage
from tests.fakes.surface_wire import PNG
from tests.test_operator_build import md


@pytest.mark.parametrize(
    ("model", "mode"),
    [
        ("dall-e-3", "image"),
        ("gpt-image-1", "image"),
        ("publishers/google/models/imagen-4.0-generate-001", "image"),
        ("cohere.rerank-v3-5:0", "rerank"),
        ("BAAI/bge-reranker-v2-m3", "rerank"),
        ("omni-moderation-latest", "moderation"),
        ("whisper-1", "audio"),
        ("text-embedding-3-small", "embedding"),
        ("gpt-4o-mini", "chat"),
        ("claude-sonnet-4", "chat"),
    ],
)
def test_the_mode_is_inferred_from_the_model_name(model: str, mode: str) -> None:
    assert infer_mode(model) == mode


def _group(**dep: object) -> Deployment:
    state = build_state(parse_config({"deployments": [{"model": "g", "provider": "mock", **dep}]}))
    return state.groups["g"].deployments[0]


def test_an_unset_mode_keeps_chat_and_embeddings_and_adds_only_its_own() -> None:
    dep = _group(upstreamModel="dall-e-3")
    assert all(dep.serves_mode(op) for op in (Operation.CHAT, Operation.EMBEDDING, Operation.IMAGE))
    assert not dep.serves_mode(Operation.RERANK)
    chat = _group()
    assert chat.serves_mode(Operation.MESSAGES) and not chat.serves_mode(Operation.IMAGE)


def test_an_explicit_mode_is_exactly_what_it_serves() -> None:
    dep = _group(mode=["rerank", "embedding"])
    # Operations no mode names (files, batches) are not dispatched by mode: every deployment has them.
    served = {op for op in Operation if operation_mode(op) is not None and dep.serves_mode(op)}
    assert served == {Operation.RERANK, Operation.EMBEDDING}
    state = build_state(parse_config({"deployments": [
        {"model": "g", "provider": "mock", "mode": "image"},
        {"model": "g", "provider": "mock", "mode": ["rerank", "chat"]},
    ]}))  # fmt: skip
    assert state.groups["g"].modes == ["chat", "image", "rerank"]


@pytest.mark.parametrize(("mode", "message"), [("img", "unknown mode 'img'"), ([], "at least one"),
                                               (["chat", "chat"], "each once")])  # fmt: skip
def test_a_bad_mode_is_refused_naming_the_field(mode: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"deployments": [{"model": "g", "provider": "mock", "mode": mode}]})
    assert "deployments[0].mode" in err.value.message and message in err.value.message


def test_the_operator_copies_mode_and_unit_prices() -> None:
    result = build_config([md("r", mode=["rerank"], pricing={"perSearchUnit": "0.002", "perImage": "0.04"})])
    dep = result.config.deployments[0]
    assert dep.mode == ["rerank"]
    assert (dep.pricing.per_search_unit, dep.pricing.per_image) == (Decimal("0.002"), Decimal("0.04"))


def test_unit_prices_add_to_token_prices() -> None:
    price = price_for("dall-e-3")
    assert price is not None and usage_cost(Usage(images=3), price) == Decimal("0.12")
    override = price_for("my-reranker", Pricing(per_search_unit=Decimal("0.5"), input_per_million=Decimal(1)))
    assert override is not None
    assert usage_cost(Usage(prompt_tokens=1_000_000, search_units=2), override) == Decimal("2.0")
    assert price_for("my-model", Pricing(per_image=Decimal("0.1"))) is not None  # priced by the image alone
    assert price_for("my-model", Pricing()) is None
    assert Usage(images=-4, search_units=-1).images == 0


def test_requested_units_bound_budget_reservations() -> None:
    assert requested_units(Operation.IMAGE, {"n": 3}) == (3, 0)
    assert requested_units(Operation.IMAGE_EDIT, {}) == (1, 0)
    assert requested_units(Operation.RERANK, {"documents": ["d"] * 250}) == (0, 3)
    assert requested_units(Operation.CHAT, {"n": 3}) == (0, 0)


def test_multipart_round_trips_through_json() -> None:
    upload = {"filename": "a.png", "content_type": "image/png", "b64": base64.b64encode(PNG).decode()}
    body, content_type = encode_form({"model": "gpt-image-1", "prompt": "a hat", "n": 2, "image[]": [upload]})
    doc = asyncio.run(parse_form(content_type, body))
    assert doc["prompt"] == "a hat" and doc["n"] == "2"
    assert base64.b64decode(doc["image[]"][0]["b64"]) == PNG and doc["image[]"][0]["filename"] == "a.png"


def test_a_config_without_mode_validates_as_before() -> None:
    assert DeploymentConfig(model="m", provider="mock").mode is None
