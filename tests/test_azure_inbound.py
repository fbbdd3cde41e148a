"""Azure OpenAI's paths in front of the router: the real ``AzureOpenAI`` SDK clients, unchanged.

``AzureOpenAI(azure_endpoint=<router>)`` posts to ``/openai/deployments/{name}/<operation>?api-version=…``
with the key in an ``api-key`` header; the deployment name in the path is the router's model group.
"""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import MASTER_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.servers import RouterProcess, h11_router, http_get

API_VERSION = "2024-10-21"
AZURE_KEY = "sk-azure-client-0123456789"
PLAIN_KEY = "sk-plain-client-0123456789"
MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture
def router(fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]) -> RouterProcess:
    pricing = {"inputPerMillion": "1", "outputPerMillion": "2"}
    config = {
        "deployments": [
            openai_deployment(fake_openai, name="dep-a", pricing=pricing),
            {"name": "slashed", "model": "team/mock", "provider": "mock"},
        ],
        "keys": [{"name": "azure", "keyEnv": "AZURE_KEY"}, {"name": "plain", "keyEnv": "PLAIN_KEY"}],
        "settings": {"numRetries": 0},
    }
    env = {"KUBELLM_MASTER_KEY": MASTER_KEY, "AZURE_KEY": AZURE_KEY, "PLAIN_KEY": PLAIN_KEY}
    return start_router(config, env=env)


def _azure(router: RouterProcess, key: str = AZURE_KEY, **kwargs: Any) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=router.base_url, api_key=key, api_version=API_VERSION, max_retries=0, **kwargs
    )


def test_chat_completion(router: RouterProcess, fake_openai: FakeOpenAI) -> None:
    raw = _azure(router).chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
    assert raw.http_request.url.path == "/openai/deployments/gpt-test/chat/completions"
    assert raw.http_request.url.params["api-version"] == API_VERSION
    assert "api-key" in raw.http_request.headers and "authorization" not in raw.http_request.headers
    completion = raw.parse()
    assert completion.choices[0].message.content == "fake says hi to upstream-model"
    assert raw.headers["x-kubellm-model-group"] == "gpt-test"
    assert fake_openai.seen[-1].body["model"] == "upstream-model"


def test_a_model_group_with_a_slash(router: RouterProcess) -> None:
    """The SDK percent-encodes the name into the path; the router reads it back whole."""
    raw = _azure(router).chat.completions.with_raw_response.create(model="team/mock", messages=MESSAGES)
    assert raw.http_request.url.raw_path.startswith(b"/openai/deployments/team%2Fmock/chat/completions")
    assert raw.headers["x-kubellm-model-group"] == "team/mock"
    assert raw.parse().choices[0].message.content


def test_the_deployment_in_the_path_wins_over_the_body(router: RouterProcess) -> None:
    """``azure_deployment=`` puts the name in the base URL; the body's model is then whatever the
    caller passed, here a name the router does not serve."""
    client = _azure(router, azure_deployment="gpt-test")
    raw = client.chat.completions.with_raw_response.create(model="not-a-group", messages=MESSAGES)
    assert raw.http_request.url.path == "/openai/deployments/gpt-test/chat/completions"
    assert raw.headers["x-kubellm-model-group"] == "gpt-test"
    # No `model` in the body at all: the path names it.
    status, body = _post(router, "/openai/deployments/gpt-test/chat/completions", {"messages": MESSAGES})
    assert status == 200, body
    assert orjson.loads(body)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream(router: RouterProcess, include_usage: bool) -> None:
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = _azure(router).chat.completions.create(
        model="gpt-test", messages=MESSAGES, stream=True, **kwargs
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "fake says hi to upstream-model"
    usage = [c.usage for c in chunks if c.usage is not None]
    assert [u.completion_tokens for u in usage] == ([5] if include_usage else [])


def test_completions_and_embeddings(router: RouterProcess, fake_openai: FakeOpenAI) -> None:
    client = _azure(router)
    raw = client.completions.with_raw_response.create(model="gpt-test", prompt="hello", max_tokens=5)
    assert raw.http_request.url.path == "/openai/deployments/gpt-test/completions"
    assert raw.parse().choices[0].text
    assert fake_openai.seen[-1].path == "/v1/completions"
    emb = client.embeddings.with_raw_response.create(model="gpt-test", input=["a", "b"])
    assert emb.http_request.url.path == "/openai/deployments/gpt-test/embeddings"
    assert len(emb.parse().data) == 2
    assert fake_openai.seen[-1].path == "/v1/embeddings"


def test_async_client_chat_stream_and_embeddings(router: RouterProcess) -> None:
    async def run() -> tuple[str, str, int]:
        client = openai.AsyncAzureOpenAI(
            azure_endpoint=router.base_url, api_key=AZURE_KEY, api_version=API_VERSION, max_retries=0
        )
        try:
            done = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
            stream = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            emb = await client.embeddings.create(model="gpt-test", input="a")
            return done.choices[0].message.content or "", streamed, len(emb.data)
        finally:
            await client.close()

    done, streamed, vectors = asyncio.run(run())
    assert done == streamed == "fake says hi to upstream-model"
    assert vectors == 1


def test_bad_key_is_a_401_in_openai_shape(router: RouterProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _azure(router, key="sk-nobody-0123456789").chat.completions.create(
            model="gpt-test", messages=MESSAGES
        )
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert "sk-nobody" not in str(info.value.body)
    status, body = _post(
        router, "/openai/deployments/gpt-test/chat/completions", {"messages": MESSAGES}, key=None
    )
    error = orjson.loads(body)["error"]
    assert status == 401 and error["code"] == "missing_api_key" and "api-key" in error["message"]


def test_unknown_deployment_is_a_404_naming_it(router: RouterProcess) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        _azure(router).chat.completions.create(model="no-such-deployment", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    body: Any = info.value.body
    assert "no-such-deployment" in body["message"] and body["param"] == "model"
    # An operation the router does not serve under the prefix, and an empty name: no route.
    for path in ("/openai/deployments/gpt-test/no/such/operation", "/openai/deployments//chat/completions"):
        status, raw = _post(router, path, {"messages": MESSAGES})
        assert status == 404 and orjson.loads(raw)["error"]["code"] == "not_found", path


def test_missing_api_version_is_accepted(router: RouterProcess) -> None:
    """The router speaks one version of each API, so it needs no api-version; requiring one would only
    break clients built without it."""
    status, body = _post(router, "/openai/deployments/gpt-test/embeddings", {"input": "a"}, query="")
    assert status == 200 and orjson.loads(body)["data"], body


def test_metering_matches_the_v1_paths(router: RouterProcess) -> None:
    """The same calls through Azure's paths and through /v1 are metered and priced alike."""
    plain = openai.OpenAI(base_url=router.v1, api_key=PLAIN_KEY, max_retries=0)
    azure = _azure(router)
    for client in (plain, azure):
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        client.completions.create(model="gpt-test", prompt="hello")
        client.embeddings.create(model="gpt-test", input="a")
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="missing", messages=MESSAGES)
    status, body = http_get(
        router.base_url + "/admin/spend?by=key", {"Authorization": f"Bearer {MASTER_KEY}"}
    )
    assert status == 200, body
    groups = orjson.loads(body)["groups"]
    assert groups["azure"] == groups["plain"], groups
    assert groups["azure"]["requests"] == 4
    assert Decimal(groups["azure"]["spendUsd"]) > 0
    metrics = http_get(router.base_url + "/metrics")[1].decode()
    spend = [line for line in metrics.splitlines() if line.startswith("kubellm_spend_usd_total{")]
    by_key = {line.split('key="')[1].split('"')[0]: line.rsplit(" ", 1)[1] for line in spend}
    assert by_key["azure"] == by_key["plain"], spend


def test_the_asgi_path_serves_azure_paths_under_any_server(tmp_path: Any) -> None:
    """Under another server (uvicorn's h11 protocol) the Azure paths are dispatched by the ASGI app."""
    with h11_router(tmp_path / "state") as port:
        client = openai.AzureOpenAI(
            azure_endpoint=f"http://127.0.0.1:{port}",
            api_key="unused",
            api_version=API_VERSION,
            max_retries=0,
        )
        reply = client.chat.completions.create(model="mock-gpt", messages=MESSAGES)
        assert reply.choices[0].message.content == "This is a mock response from kubellm. You said: hi"
        stream = client.chat.completions.create(model="mock-gpt", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
            reply.choices[0].message.content
        )
        with pytest.raises(openai.NotFoundError) as info:
            client.embeddings.create(model="no-such-model", input="a")
        assert info.value.code == "model_not_found"


def _post(
    router: RouterProcess,
    path: str,
    body: dict[str, Any],
    *,
    key: str | None = AZURE_KEY,
    query: str = f"?api-version={API_VERSION}",
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["api-key"] = key
    try:
        conn.request("POST", path + query, body=orjson.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
