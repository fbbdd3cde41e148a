"""Images, moderations and rerank end to end: the real openai SDK (httpx for rerank) -> a router
process -> fakes that enforce each provider's wire protocol (see tests/fakes/surface_wire.py).

One router serves every backend; the ledger test stops it last and reads what it recorded.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.fakes.azure_upstream import FakeAzure
from tests.fakes.bedrock_upstream import FakeBedrock
from tests.fakes.cohere_upstream import FakeCohere
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.huggingface_upstream import FakeHuggingFace
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.surface_wire import PNG, VIOLENT
from tests.support.servers import RouterProcess

MASTER = "sk-master-surface-0123456789"
KEYS = {"ALICE_KEY": "sk-alice-surface-0123456789", "BOB_KEY": "sk-bob-surface-0123456789"}
AZURE_KEY, COHERE_KEY, GEMINI_KEY = "azure-key-surface", "co-key-surface-0123", "gemini-key-surface"
HF_TOKEN = "hf_surface_token_0123"
AKID, SECRET = "AKIDSURFACE0123456", "surface-secret-0123456789"
DOCS = ["the cat sat on the mat", "paris is the capital of france", "what is the capital of spain"]
QUERY = "what is the capital of france"


class Fakes:
    def __init__(self) -> None:
        self.openai = FakeOpenAI(api_key=UPSTREAM_KEY)
        self.azure = FakeAzure(api_key=AZURE_KEY, deployments=("dalle-prod",))
        self.cohere = FakeCohere(api_key=COHERE_KEY)
        self.bedrock = FakeBedrock({AKID: (SECRET, None)})
        self.gemini = FakeGemini(api_key=GEMINI_KEY)
        self.tei = FakeHuggingFace("tgi", token=HF_TOKEN)
        self.all = (self.openai, self.azure, self.cohere, self.bedrock, self.gemini, self.tei)


def dep(name: str, model: str, provider: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "provider": provider, **extra}


def config(f: Fakes) -> dict[str, Any]:
    openai_ = {"baseUrl": f.openai.base_url, "apiKeyEnv": "UPSTREAM_KEY"}
    azure = {"baseUrl": f.azure.base_url, "apiKey": AZURE_KEY}
    bedrock = {"region": "us-east-1", "baseUrl": f.bedrock.base_url, "apiKey": f"{AKID}:{SECRET}"}
    return {
        "deployments": [
            dep("openai-dalle", "dall-e-3", "openai", **openai_),
            dep("openai-gpt-image", "gpt-image-1", "openai", **openai_),
            dep("openai-moderation", "omni-moderation-latest", "openai", **openai_),
            dep("azure-dalle", "azure-dalle", "azure", upstreamModel="dalle-prod", apiVersion="2024-10-21",
                mode="image", pricing={"perImage": "0.05"}, **azure),
            dep("azure-safety", "azure-moderation", "azure", apiVersion="2024-09-01", mode="moderation",
                **azure),
            dep("imagen", "imagen", "gemini", upstreamModel="imagen-4.0-generate-001",
                baseUrl=f.gemini.studio_url, apiKey=GEMINI_KEY),
            dep("vertex-imagen", "vertex-imagen", "vertex", upstreamModel="imagen-3.0-generate-002",
                baseUrl=f.gemini.vertex_url, apiKey=json.dumps(f.gemini.service_account()),
                location=f.gemini.location),
            dep("cohere-rerank", "rerank-v3.5", "cohere", baseUrl=f.cohere.base_url, apiKey=COHERE_KEY),
            dep("bedrock-cohere-rerank", "bedrock-rerank", "bedrock", upstreamModel="cohere.rerank-v3-5:0",
                **bedrock),
            dep("bedrock-amazon-rerank", "amazon-rerank", "bedrock", upstreamModel="amazon.rerank-v1:0",
                **bedrock),
            dep("vllm-rerank", "bge-reranker", "openai-compatible", upstreamModel="BAAI/bge-reranker-v2-m3",
                mode="rerank", pricing={"inputPerMillion": "0.10"}, **openai_),
            dep("tei-rerank", "tei-reranker", "huggingface-endpoint", upstreamModel="BAAI/bge-reranker-base",
                mode="rerank", baseUrl=f.tei.base_url, apiKey=HF_TOKEN, pricing={"inputPerMillion": "0.10"}),
            dep("chat", "chat", "mock"),
            dep("mock-surface", "mock-surface", "mock", mode=["image", "moderation", "rerank"]),
        ],
        "modelGroups": [{"name": "dall-e-3", "fallbacks": ["imagen"]}],
        "keys": [
            {"name": "alice", "keyEnv": "ALICE_KEY", "models": ["dall-e-3"]},
            {"name": "bob", "keyEnv": "BOB_KEY", "budget": {"amountUsd": "0.05", "period": "daily"}},
        ],
        "settings": {"numRetries": 0},
    }  # fmt: skip


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    f = Fakes()
    for fake in f.all:
        fake.start()
    yield f
    for fake in f.all:
        fake.stop()


@pytest.fixture(scope="module")
def router(fakes: Fakes) -> Iterator[RouterProcess]:
    doc = config(fakes)
    env = {"UPSTREAM_KEY": UPSTREAM_KEY, "KUBELLM_MASTER_KEY": MASTER, **KEYS}
    with RouterProcess(doc, env=env) as proc:
        yield proc


@pytest.fixture
def client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=MASTER, max_retries=0)


def rerank(router: RouterProcess, body: dict[str, Any], key: str = MASTER) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(router.v1 + "/rerank", json=body, headers=headers, timeout=10)


# --- images -----------------------------------------------------------------------------------------


@pytest.mark.covers("openai", "images")
def test_openai_images_generate_through_the_sdk(client: openai.OpenAI, fakes: Fakes) -> None:
    create = client.images.with_raw_response.generate
    raw = create(model="dall-e-3", prompt="a red fox", n=2, size="1024x1024")
    images = raw.parse()
    assert len(images.data) == 2 and base64.b64decode(images.data[0].b64_json or "") == PNG
    assert raw.headers["x-kubellm-deployment"] == "openai-dalle"
    assert fakes.openai.seen[-1].body["model"] == "dall-e-3"


@pytest.mark.covers("openai", "image_edits")
def test_openai_image_edit_is_forwarded_as_multipart(client: openai.OpenAI, fakes: Fakes) -> None:
    edited = client.images.edit(
        model="gpt-image-1", image=[("a.png", PNG, "image/png"), ("b.png", PNG, "image/png")],
        prompt="put a hat on it", mask=("mask.png", PNG, "image/png"), n=1,
    )  # fmt: skip
    assert len(edited.data) == 1 and edited.usage is not None and edited.usage.output_tokens == 1056
    seen = fakes.openai.seen[-1].body
    assert seen["model"] == "gpt-image-1" and seen["prompt"] == "put a hat on it"
    assert seen["_files"]["image[]"] == [("a.png", "image/png", len(PNG)), ("b.png", "image/png", len(PNG))]
    assert seen["_files"]["mask"] == [("mask.png", "image/png", len(PNG))]


def test_an_image_edit_without_an_image_is_a_400_naming_it(router: RouterProcess) -> None:
    resp = httpx.post(
        router.v1 + "/images/edits", headers={"Authorization": f"Bearer {MASTER}"},
        data={"model": "gpt-image-1", "prompt": "hat"}, files={"other": ("x.png", PNG, "image/png")},
    )  # fmt: skip
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "image"
    streamed = httpx.post(
        router.v1 + "/images/generations", headers={"Authorization": f"Bearer {MASTER}"},
        json={"model": "gpt-image-1", "prompt": "hat", "stream": True},
    )  # fmt: skip
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"


@pytest.mark.covers("azure", "images", "image_edits")
def test_azure_images_on_both_paths(router: RouterProcess, client: openai.OpenAI, fakes: Fakes) -> None:
    images = client.images.generate(model="azure-dalle", prompt="a lighthouse")
    assert len(images.data) == 1
    assert fakes.azure.seen[-1].path == "/openai/deployments/dalle-prod/images/generations"
    assert fakes.azure.seen[-1].headers["api-key"] == AZURE_KEY
    azure = openai.AzureOpenAI(azure_endpoint=router.base_url, api_key=MASTER, api_version="2024-10-21")
    edited = azure.images.edit(model="azure-dalle", image=("a.png", PNG, "image/png"), prompt="at night")
    assert len(edited.data) == 1 and fakes.azure.seen[-1].body["prompt"] == "at night"
    assert fakes.azure.seen[-1].path == "/openai/deployments/dalle-prod/images/edits"


@pytest.mark.covers("gemini", "images")
def test_imagen_through_the_gemini_api(client: openai.OpenAI, fakes: Fakes) -> None:
    images = client.images.generate(
        model="imagen", prompt="a bowl of fruit", n=2, size="1792x1024", response_format="url"
    )
    assert [d.url[:22] for d in images.data if d.url] == ["data:image/png;base64,"] * 2
    sent = fakes.gemini.seen[-1]
    assert sent.path.endswith("/models/imagen-4.0-generate-001:predict")
    assert sent.body["parameters"] == {"sampleCount": 2, "aspectRatio": "16:9"}
    with pytest.raises(openai.BadRequestError) as blocked:
        client.images.generate(model="imagen", prompt=VIOLENT)
    assert "safety filter" in str(blocked.value)
    with pytest.raises(openai.BadRequestError) as too_many:
        client.images.generate(model="imagen", prompt="fruit", n=5)
    assert too_many.value.body["param"] == "n"  # type: ignore[index]


@pytest.mark.covers("vertex", "images")
def test_imagen_on_vertex_ai(client: openai.OpenAI, fakes: Fakes) -> None:
    images = client.images.generate(model="vertex-imagen", prompt="a lake", output_format="jpeg")
    assert len(images.data) == 1 and base64.b64decode(images.data[0].b64_json or "") == PNG
    sent = fakes.gemini.seen[-1]
    assert sent.path.endswith("/publishers/google/models/imagen-3.0-generate-002:predict")
    assert sent.headers["Authorization"].startswith("Bearer ")
    assert sent.body["parameters"]["outputOptions"] == {"mimeType": "image/jpeg"}


def test_a_failed_image_deployment_falls_back_to_another_group(client: openai.OpenAI, fakes: Fakes) -> None:
    fakes.openai.queue(Fault(status=500))
    raw = client.images.with_raw_response.generate(model="dall-e-3", prompt="a boat")
    assert raw.headers["x-kubellm-deployment"] == "imagen" and len(raw.parse().data) == 1


# --- moderations ------------------------------------------------------------------------------------


@pytest.mark.covers("openai", "moderations")
def test_openai_moderations(client: openai.OpenAI) -> None:
    result = client.moderations.create(model="omni-moderation-latest", input=["hello there", VIOLENT])
    assert [r.flagged for r in result.results] == [False, True]
    assert result.results[1].categories.violence
    # No model: the first group that serves moderation requests.
    assert client.moderations.create(input="hello").results[0].flagged is False


@pytest.mark.covers("azure", "moderations")
def test_azure_moderations_through_content_safety(client: openai.OpenAI, fakes: Fakes) -> None:
    result = client.moderations.create(model="azure-moderation", input=["a calm day", VIOLENT])
    assert [r.flagged for r in result.results] == [False, True]
    assert result.results[1].category_scores.violence == 1.0 and not result.results[1].categories.hate
    seen = fakes.azure.seen[-1]
    assert seen.path == "/contentsafety/text:analyze" and seen.query["api-version"] == "2024-09-01"


# --- rerank -----------------------------------------------------------------------------------------


@pytest.mark.covers("cohere", "rerank")
def test_cohere_rerank(router: RouterProcess, fakes: Fakes) -> None:
    resp = rerank(router, {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS, "top_n": 2,
                           "return_documents": True})  # fmt: skip
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert [r["index"] for r in doc["results"]] == [1, 2]
    assert doc["results"][0]["document"] == {"text": DOCS[1]} and doc["model"] == "rerank-v3.5"
    assert doc["meta"]["billed_units"]["search_units"] == 1
    assert fakes.cohere.last.body == {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS, "top_n": 2}


@pytest.mark.covers("bedrock", "rerank")
@pytest.mark.parametrize("model", ["bedrock-rerank", "amazon-rerank"])
def test_bedrock_rerank(router: RouterProcess, fakes: Fakes, model: str) -> None:
    docs = [{"text": d} for d in DOCS]  # Jina's object form is accepted too
    resp = rerank(router, {"model": model, "query": QUERY, "documents": docs})
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["index"] == 1
    assert "document" not in resp.json()["results"][0]
    assert fakes.bedrock.seen[-1].path.endswith("/invoke")


@pytest.mark.covers("openai-compatible", "rerank")
def test_openai_compatible_rerank(router: RouterProcess) -> None:
    resp = rerank(router, {"model": "bge-reranker", "query": QUERY, "documents": DOCS, "top_n": 1})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert [r["index"] for r in doc["results"]] == [1] and doc["usage"]["total_tokens"] > 0


@pytest.mark.covers("huggingface-endpoint", "rerank")
def test_tei_rerank(router: RouterProcess, fakes: Fakes) -> None:
    resp = rerank(router, {"model": "tei-reranker", "query": QUERY, "documents": DOCS, "top_n": 2,
                           "return_documents": True})  # fmt: skip
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert [r["index"] for r in doc["results"]] == [1, 2]
    assert doc["results"][1]["document"] == {"text": DOCS[2]}
    assert doc["usage"]["total_tokens"] > 0  # estimated: TEI counts none
    assert fakes.tei.last.path == "/rerank" and fakes.tei.last.body["texts"] == DOCS


def test_rerank_errors_name_the_field(router: RouterProcess) -> None:
    assert rerank(router, {"model": "rerank-v3.5", "query": QUERY}).json()["error"]["param"] == "documents"
    assert rerank(router, {"model": "rerank-v3.5", "documents": DOCS}).json()["error"]["param"] == "query"
    denied = rerank(router, {"model": "rerank-v3.5", "query": QUERY, "documents": DOCS}, KEYS["ALICE_KEY"])
    assert denied.status_code == 403 and denied.json()["error"]["param"] == "model"


@pytest.mark.covers("mock", "images", "moderations", "rerank")
def test_the_mock_provider_serves_the_modes_it_is_given(router: RouterProcess, client: openai.OpenAI) -> None:
    image = client.images.generate(model="mock-surface", prompt="x").data[0]
    assert base64.b64decode(image.b64_json or "") == PNG
    moderated = client.moderations.create(model="mock-surface", input=["fine", "mock-flag this"])
    assert [r.flagged for r in moderated.results] == [False, True]
    ranked = rerank(router, {"model": "mock-surface", "query": QUERY, "documents": DOCS, "top_n": 1}).json()
    assert ranked["results"][0]["index"] in (1, 2) and len(ranked["results"]) == 1


# --- modes, keys, budgets ---------------------------------------------------------------------------


def test_models_show_modes_and_routing_honours_them(router: RouterProcess, client: openai.OpenAI) -> None:
    cards = httpx.get(router.v1 + "/models", headers={"Authorization": f"Bearer {MASTER}"}).json()["data"]
    modes = {c["id"]: (c["mode"], c["modes"]) for c in cards}
    assert modes["dall-e-3"] == ("image", ["image"]) and modes["chat"] == ("chat", ["chat"])
    assert modes["bge-reranker"] == ("rerank", ["rerank"]) and modes["imagen"] == ("image", ["image"])
    with pytest.raises(openai.BadRequestError) as wrong:
        client.images.generate(model="chat", prompt="a cat")
    assert "supports image" in str(wrong.value)
    with pytest.raises(openai.BadRequestError):  # an explicit mode takes chat away
        client.chat.completions.create(model="azure-dalle", messages=[{"role": "user", "content": "hi"}])


def test_a_budget_counts_the_price_of_every_image(router: RouterProcess) -> None:
    """A budget admits while its spend is under the limit: two images at 0.04 cross 0.05."""
    bob = openai.OpenAI(base_url=router.v1, api_key=KEYS["BOB_KEY"], max_retries=0)
    assert len(bob.images.generate(model="dall-e-3", prompt="two foxes", n=2).data) == 2
    with pytest.raises(openai.RateLimitError) as refused:
        bob.images.generate(model="dall-e-3", prompt="one fox", n=1)
    assert "budget" in str(refused.value)


def test_the_ledger_prices_images_and_search_units(router: RouterProcess, client: openai.OpenAI) -> None:
    ids = {
        "dalle": client.images.with_raw_response.generate(model="dall-e-3", prompt="x", n=2),
        "azure": client.images.with_raw_response.generate(model="azure-dalle", prompt="x", n=3),
        "gpt-image": client.images.with_raw_response.generate(model="gpt-image-1", prompt="x", n=2),
    }
    request_ids = {name: raw.headers["x-request-id"] for name, raw in ids.items()}
    for name, model in (("cohere", "rerank-v3.5"), ("amazon", "amazon-rerank"), ("vllm", "bge-reranker")):
        resp = rerank(router, {"model": model, "query": QUERY, "documents": DOCS})
        request_ids[name] = resp.headers["x-request-id"]
        if name == "vllm":
            vllm_tokens = resp.json()["usage"]["total_tokens"]
    router.stop()
    db = sqlite3.connect(router.dir / "state" / "ledger.sqlite")
    query = "SELECT request_id, cost, prompt_tokens, completion_tokens FROM usage"
    rows = {r[0]: r[1:] for r in db.execute(query)}
    db.close()
    cost = {name: Decimal(str(rows[rid][0])) for name, rid in request_ids.items()}
    assert cost["dalle"] == Decimal("0.08")  # shipped price: 0.04 per image
    assert cost["azure"] == Decimal("0.15")  # the deployment's perImage
    assert rows[request_ids["gpt-image"]][1:] == (50, 2112)  # gpt-image bills tokens
    assert cost["gpt-image"] == (50 * Decimal("5") + 2112 * Decimal("40")) / 1_000_000
    assert cost["cohere"] == Decimal("0.002") and cost["amazon"] == Decimal("0.001")
    assert cost["vllm"] == vllm_tokens * Decimal("0.10") / 1_000_000
