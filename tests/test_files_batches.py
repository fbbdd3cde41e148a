"""OpenAI's files and batches APIs through the router, with the real openai SDK, on OpenAI and
Azure OpenAI deployments: files scoped to the key that uploaded them, batches run where their
input file lives, and a completed batch's usage in the ledger exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import MASTER_KEY, UPSTREAM_KEY
from tests.fakes.openai_platform import FakePlatform
from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess, http_get

AZURE_UPSTREAM_KEY = "az-upstream-key-0123456789"
KEY_A = "sk-files-a-0123456789"
KEY_B = "sk-files-b-0123456789"
KEY_C = "sk-files-c-0123456789"
API_VERSION = "2024-10-21"
PRICING = {"inputPerMillion": "1", "outputPerMillion": "2"}


def _lines(model: str, n: int = 3) -> bytes:
    rows = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]},
        }
        for i in range(n)
    ]
    return b"\n".join(orjson.dumps(r) for r in rows) + b"\n"


#: Three lines (see FakePlatform.complete): 33 prompt and 63 completion tokens, at $1 and $2 per
#: million, at the batch price (half).
BATCH_COST = (Decimal(33) + Decimal(63) * 2) / 1_000_000 / 2


@pytest.fixture
def fake_oa() -> Iterator[FakePlatform]:
    with FakePlatform(UPSTREAM_KEY, "openai", name="oa") as fake:
        yield fake


@pytest.fixture
def fake_az() -> Iterator[FakePlatform]:
    with FakePlatform(AZURE_UPSTREAM_KEY, "azure", name="az") as fake:
        yield fake


def _config(fake_oa: FakePlatform, fake_az: FakePlatform, **settings: Any) -> dict[str, Any]:
    return {
        "deployments": [
            {
                "name": "oa-gpt",
                "model": "gpt",
                "provider": "openai",
                "upstreamModel": "gpt-4o-mini",
                "baseUrl": fake_oa.base_url,
                "apiKeyEnv": "TEST_UPSTREAM_KEY",
                "pricing": PRICING,
            },
            {
                "name": "az-gpt",
                "model": "az-gpt",
                "provider": "azure",
                "upstreamModel": "gpt-dep",
                "baseUrl": fake_az.base_url,
                "apiVersion": API_VERSION,
                "apiKeyEnv": "AZ_UPSTREAM_KEY",
                "pricing": PRICING,
            },
            {"name": "mock", "model": "mock", "provider": "mock"},
        ],
        "keys": [
            {"name": "a", "keyEnv": "KEY_A", "budget": {"amountUsd": "10", "period": "daily"}},
            {"name": "b", "keyEnv": "KEY_B"},
            {"name": "c", "keyEnv": "KEY_C", "models": ["mock"]},
        ],
        "settings": {"numRetries": 0, **settings},
    }


ENV = {
    "KUBELLM_MASTER_KEY": MASTER_KEY,
    "AZ_UPSTREAM_KEY": AZURE_UPSTREAM_KEY,
    "KEY_A": KEY_A,
    "KEY_B": KEY_B,
    "KEY_C": KEY_C,
}


@pytest.fixture
def router(
    fake_oa: FakePlatform, fake_az: FakePlatform, start_router: Callable[..., RouterProcess]
) -> RouterProcess:
    return start_router(_config(fake_oa, fake_az), env=ENV)


def _client(router: RouterProcess, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0)


def _spend(router: RouterProcess) -> dict[str, Any]:
    status, body = http_get(
        router.base_url + "/admin/spend?by=key", {"Authorization": f"Bearer {MASTER_KEY}"}
    )
    assert status == 200, body
    groups: dict[str, Any] = orjson.loads(body)["groups"]
    return groups


@pytest.mark.covers("openai", "files")
def test_a_file_belongs_to_the_key_that_uploaded_it(router: RouterProcess, fake_oa: FakePlatform) -> None:
    a, b = _client(router), _client(router, KEY_B)
    uploaded = a.files.create(file=("in.jsonl", _lines("gpt")), purpose="batch")
    seen = fake_oa.seen[-1]
    assert seen.path == "/v1/files" and seen.body["purpose"] == "batch"
    # Each line's model is the deployment's upstream model.
    assert {orjson.loads(line)["body"]["model"] for line in seen.files["file"].splitlines()} == {
        "gpt-4o-mini"
    }
    assert [f.id for f in a.files.list()] == [uploaded.id]
    assert list(b.files.list()) == []
    assert a.files.retrieve(uploaded.id).filename == "in.jsonl"
    for attempt in (
        lambda: b.files.retrieve(uploaded.id),
        lambda: b.files.content(uploaded.id),
        lambda: b.files.delete(uploaded.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert a.files.content(uploaded.id).content == seen.files["file"]
    assert a.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(uploaded.id)
    assert not fake_oa.files


def test_which_deployment_a_file_goes_to(router: RouterProcess, fake_oa: FakePlatform) -> None:
    a = _client(router)
    with pytest.raises(openai.BadRequestError) as err:
        a.files.create(file=("notes.txt", b"hello"), purpose="assistants")
    assert err.value.body["param"] == "model"  # type: ignore[index]
    doc = a.files.create(
        file=("notes.txt", b"hello"), purpose="assistants", extra_headers={"x-kubellm-model": "gpt"}
    )
    assert fake_oa.files[doc.id].content == b"hello"
    mixed = _lines("gpt", 1) + _lines("az-gpt", 1)
    with pytest.raises(openai.BadRequestError) as err:
        a.files.create(file=("in.jsonl", mixed), purpose="batch")
    assert err.value.body["param"] == "file" and "exactly one model" in err.value.message  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        a.files.create(file=("in.jsonl", _lines("mock")), purpose="batch")
    assert "files and batches API" in err.value.message
    with pytest.raises(openai.PermissionDeniedError):
        _client(router, KEY_C).files.create(file=("in.jsonl", _lines("gpt")), purpose="batch")


@pytest.mark.covers("openai", "batches")
def test_a_batch_is_billed_once_when_it_completes(router: RouterProcess, fake_oa: FakePlatform) -> None:
    a, b = _client(router), _client(router, KEY_B)
    uploaded = a.files.create(file=("in.jsonl", _lines("gpt")), purpose="batch")
    batch = a.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert [x.id for x in a.batches.list()] == [batch.id] and list(b.batches.list()) == []
    assert "a" not in _spend(router)
    fake_oa.complete(batch.id)
    done = a.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id
    for _ in range(3):
        assert a.batches.retrieve(batch.id).status == "completed"
    assert [x.status for x in a.batches.list()] == ["completed"]
    spend = _spend(router)["a"]
    assert spend["requests"] == 1, spend
    assert (spend["promptTokens"], spend["completionTokens"]) == (33, 63)
    assert Decimal(spend["spendUsd"]) == BATCH_COST
    assert fake_oa.downloads[done.output_file_id] == 1
    # The owner's budget is charged too (in the background, idempotently by the batch's id).
    deadline = time.monotonic() + 10
    while True:
        info = orjson.loads(http_get(router.v1 + "/key/info", {"Authorization": f"Bearer {KEY_A}"})[1])
        if Decimal(info["budget"]["spentUsd"]) == BATCH_COST or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert Decimal(info["budget"]["spentUsd"]) == BATCH_COST, info
    # The output file is the batch owner's.
    output = a.files.content(done.output_file_id).content
    assert len(output.splitlines()) == 3
    with pytest.raises(openai.NotFoundError):
        b.files.content(done.output_file_id)
    with pytest.raises(openai.BadRequestError):
        a.batches.cancel(batch.id)  # the upstream refuses to cancel a completed batch
    metrics = http_get(router.base_url + "/metrics")[1].decode()
    assert 'kubellm_platform_requests_total{operation="retrieve_batch",status="404"} 1.0' in metrics
    assert 'kubellm_platform_requests_total{operation="cancel_batch",status="400"} 1.0' in metrics


def test_cancel_a_batch(router: RouterProcess) -> None:
    a = _client(router)
    uploaded = a.files.create(file=("in.jsonl", _lines("gpt")), purpose="batch")
    batch = a.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        _client(router, KEY_B).batches.cancel(batch.id)
    assert a.batches.cancel(batch.id).status == "cancelling"


@pytest.mark.covers("azure", "files", "batches")
def test_azure_files_and_batches(router: RouterProcess, fake_az: FakePlatform) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=router.base_url, api_key=KEY_A, api_version=API_VERSION, max_retries=0
    )
    uploaded = client.files.create(file=("in.jsonl", _lines("az-gpt")), purpose="batch")
    seen = fake_az.seen[-1]
    assert seen.path == "/openai/files" and seen.query["api-version"] == API_VERSION
    assert seen.headers["api-key"] == AZURE_UPSTREAM_KEY
    assert {orjson.loads(line)["body"]["model"] for line in seen.files["file"].splitlines()} == {"gpt-dep"}
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/chat/completions", completion_window="24h"
    )
    assert fake_az.seen[-1].path == "/openai/batches"
    fake_az.complete(batch.id)
    assert client.batches.retrieve(batch.id).status == "completed"
    assert Decimal(_spend(router)["a"]["spendUsd"]) == BATCH_COST
    assert [f.id for f in client.files.list(purpose="batch")] == [uploaded.id]


def test_replicas_bill_a_batch_once(
    fake_oa: FakePlatform, fake_az: FakePlatform, start_router: Callable[..., RouterProcess]
) -> None:
    """Two routers on one Redis: a file uploaded through one is found through the other, and a
    completed batch retrieved through both at once lands in the shared ledger once."""
    with RedisServer() as redis:
        config = _config(fake_oa, fake_az, redis={"url": redis.url})
        first, second = start_router(config, env=ENV), start_router(config, env=ENV)
        uploaded = _client(first).files.create(file=("in.jsonl", _lines("gpt")), purpose="batch")
        batch = _client(second).batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        fake_oa.complete(batch.id)
        statuses: list[str] = []

        def retrieve(router: RouterProcess) -> None:
            for _ in range(3):
                statuses.append(_client(router).batches.retrieve(batch.id).status)

        threads = [threading.Thread(target=retrieve, args=(r,)) for r in (first, second, first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == ["completed"] * 12
        for router in (first, second):
            spend = _spend(router)["a"]
            assert spend["requests"] == 1 and Decimal(spend["spendUsd"]) == BATCH_COST, spend
        assert fake_oa.downloads[fake_oa.batches[batch.id]["output_file_id"]] == 1
