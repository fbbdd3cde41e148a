"""The OpenAI-compatible presets: right base URL and key variable, right auth and path, vendor quirks.

Each preset is pointed at a real fake OpenAI server (``baseUrl``) through a real router process
and driven with the openai SDK. The vendor rules below are written from each vendor's own
compatibility notes, independently of ``router/providers/presets.py``, and the property test
checks every translated request against them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.inbound._openai_validate import validate
from kubellm.router.providers import Operation, RequestContext, get_provider
from kubellm.router.providers.presets import PRESETS
from tests.conftest import UPSTREAM_KEY
from tests.fakes.azure_upstream import WireError, validate_chat
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.servers import RouterProcess
from tests.test_provider_azure import openai_chat_requests

#: name: (documented base URL, documented key variable) — checked against each vendor's docs.
DOCUMENTED = {
    "groq": ("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    "mistral": ("https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    "together": ("https://api.together.xyz/v1", "TOGETHER_API_KEY"),
    "fireworks": ("https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY"),
    "deepseek": ("https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
    "openrouter": ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "perplexity": ("https://api.perplexity.ai", "PERPLEXITY_API_KEY"),
    "xai": ("https://api.x.ai/v1", "XAI_API_KEY"),
    "ollama": ("http://localhost:11434/v1", None),
    "vllm": ("http://localhost:8000/v1", "VLLM_API_KEY"),
    "lmstudio": ("http://localhost:1234/v1", None),
}
KEYLESS = {"ollama", "lmstudio"}
#: Fields each vendor documents as rejected (Groq: 400; Mistral: extra inputs are not permitted).
FORBIDDEN = {
    "groq": {"logprobs", "logit_bias", "top_logprobs"},
    "mistral": {"seed", "logit_bias", "logprobs", "top_logprobs", "user", "stream_options"},
    "perplexity": {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "stream_options",
    },
    "lmstudio": {"stream_options"},
}
EMBEDDINGS = {"mistral", "together", "fireworks", "ollama", "vllm", "lmstudio"}
STREAM_USAGE = {"groq", "together", "fireworks", "deepseek", "openrouter", "xai", "ollama", "vllm"}
TOOLS = set(DOCUMENTED) - {"perplexity"}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def _params(names: set[str] | dict[str, Any], *features: str) -> list[Any]:
    """One parameter per preset, each marked with the features its test proves."""
    extra = {"stream": lambda n: ["stream_usage"] if n in STREAM_USAGE else []}
    return [
        pytest.param(
            n,
            id=n,
            marks=pytest.mark.covers(
                n, *features, *(x for f in features for x in extra.get(f, lambda _: [])(n))
            ),
        )
        for n in sorted(names)
    ]


def vendor_check(name: str, body: dict[str, Any]) -> None:
    """Raise AssertionError if ``body`` breaks a documented rule of vendor ``name``."""
    assert not FORBIDDEN.get(name, set()) & set(body), f"{name} rejects {FORBIDDEN[name] & set(body)}"
    if name == "groq":
        assert body.get("n") in (None, 1), "groq: n must be 1"
        assert not any("name" in m for m in body["messages"]), "groq: messages[].name is not supported"


class VendorFake(FakeOpenAI):
    """FakeOpenAI plus the vendor's documented rules; keyless when ``api_key`` is None."""

    def __init__(self, vendor: str | None = None, api_key: str | None = UPSTREAM_KEY) -> None:
        super().__init__(api_key=api_key or "keyless", name=vendor or "fake")
        self.keyless = api_key is None
        self.vendor: str | None = vendor

    async def _common(self, request: web.Request) -> tuple[dict[str, Any] | None, web.StreamResponse | None]:
        if self.keyless:
            if "Authorization" in request.headers:
                return None, web.json_response({"error": {"message": "no key expected"}}, status=400)
            request = request.clone(headers={**request.headers, "Authorization": "Bearer keyless"})
        body, failure = await super()._common(request)
        if body is not None and self.vendor is not None and "messages" in body:
            try:
                vendor_check(self.vendor, body)
            except AssertionError as err:
                return None, web.json_response(
                    {"error": {"message": str(err), "type": "invalid_request_error"}}, status=400
                )
        return body, failure


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, VendorFake]]:
    servers = {name: VendorFake(name, None if name in KEYLESS else UPSTREAM_KEY) for name in DOCUMENTED}
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def router(fakes: dict[str, VendorFake]) -> Iterator[RouterProcess]:
    def dep(name: str, **extra: Any) -> dict[str, Any]:
        key = {} if name in KEYLESS else {"apiKeyEnv": "TEST_UPSTREAM_KEY"}
        return {
            "model": name,
            "provider": name,
            "upstreamModel": f"{name}-model",
            "baseUrl": fakes[name].base_url,
            **key,
            **extra,
        }

    config = {
        "deployments": [
            *(dep(n) for n in DOCUMENTED),
            dep("groq", model="groq-drop", dropUnsupportedParams=True),
        ],
        "settings": {"numRetries": 0},
    }
    with RouterProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as proc:
        yield proc


@pytest.fixture
def client(router: RouterProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)


def _user(text: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _ctx(name: str, stream: bool = False, include_usage: bool = False, drop: bool = True) -> RequestContext:
    dep = DeploymentConfig(
        model=name, provider=name, upstream_model=f"{name}-model", drop_unsupported_params=drop
    )
    return RequestContext(
        "req1",
        Operation.CHAT,
        name,
        dep,
        stream,
        include_usage,
        api_key=None if name in KEYLESS else UPSTREAM_KEY,
    )


def test_the_table_matches_the_vendors_documentation() -> None:
    assert {p.name for p in PRESETS} == set(DOCUMENTED)
    for name, (url, env) in DOCUMENTED.items():
        provider = get_provider(name)
        assert (provider.default_base_url, provider.default_api_key_env) == (url, env)
        assert (Operation.EMBEDDING in provider.operations) == (name in EMBEDDINGS)


@pytest.mark.parametrize("name", _params(DOCUMENTED, "chat"))
def test_chat_arrives_with_auth_path_and_model(
    name: str, client: openai.OpenAI, fakes: dict[str, VendorFake]
) -> None:
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "system", "content": "s"}, *_user()]
    )
    assert reply.choices[0].message.content == f"{name} says hi to {name}-model"
    seen = fakes[name].seen[-1]
    assert seen.path == "/v1/chat/completions" and seen.body["model"] == f"{name}-model"
    if name in KEYLESS:  # the fake refuses any credential, then records its own placeholder
        assert seen.headers["Authorization"] == "Bearer keyless"
    else:
        assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("name", _params(DOCUMENTED, "stream"))
def test_stream(name: str, include_usage: bool, client: openai.OpenAI, fakes: dict[str, VendorFake]) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model=name, messages=_user(), stream=True, **extra))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == f"{name} says hi to {name}-model"
    )
    sent = fakes[name].seen[-1].body
    if name in STREAM_USAGE:
        assert sent["stream_options"] == {"include_usage": True}  # always asked, for metering
        assert len([c for c in chunks if c.usage is not None]) == (1 if include_usage else 0)
    else:
        assert "stream_options" not in sent  # the vendor rejects it


@pytest.mark.parametrize("name", _params(TOOLS, "tools", "vision", "json_mode"))
def test_tools_vision_and_json_mode_pass_through(
    name: str, client: openai.OpenAI, fakes: dict[str, VendorFake]
) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    history: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look, in JSON"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    client.chat.completions.create(
        model=name,
        messages=history,
        tools=[tool],
        tool_choice="auto",  # type: ignore[list-item]
        response_format={"type": "json_object"},
    )
    sent = fakes[name].seen[-1].body
    assert (sent["messages"], sent["tools"], sent["tool_choice"]) == (history, [tool], "auto")
    assert sent["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("name", _params(EMBEDDINGS, "embeddings"))
def test_embeddings(name: str, client: openai.OpenAI, fakes: dict[str, VendorFake]) -> None:
    result = client.embeddings.create(model=name, input=["a", "b"])
    assert [d.index for d in result.data] == [0, 1]
    assert fakes[name].seen[-1].path == "/v1/embeddings"


def test_operations_a_vendor_lacks_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="deepseek", input="a")
    assert "embedding" in info.value.message


# --- quirks ---------------------------------------------------------------------------------------


def test_groq_rejects_what_it_does_not_support(client: openai.OpenAI, fakes: dict[str, VendorFake]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="groq", messages=_user(), logprobs=True)
    assert info.value.body["param"] == "logprobs" and "groq" in info.value.message  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="groq", messages=[{"role": "user", "content": "x", "name": "ann"}]
        )
    assert info.value.body["param"] == "messages[0].name"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="groq", messages=_user(), n=2)
    assert info.value.body["param"] == "n"  # type: ignore[index]
    client.chat.completions.create(
        model="groq-drop",
        messages=[{"role": "user", "content": "x", "name": "ann"}],
        logprobs=True,
        top_logprobs=2,
    )
    sent = fakes["groq"].seen[-1].body
    assert "logprobs" not in sent and "name" not in sent["messages"][0]


def test_mistral_spells_seed_random_seed(client: openai.OpenAI, fakes: dict[str, VendorFake]) -> None:
    client.chat.completions.create(model="mistral", messages=_user(), seed=42)
    sent = fakes["mistral"].seen[-1].body
    assert sent["random_seed"] == 42 and "seed" not in sent


def test_perplexity_has_no_tool_calling(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="perplexity", messages=_user(), tools=[tool])  # type: ignore[list-item]
    assert info.value.body["param"] == "tools"  # type: ignore[index]


# --- property: any valid OpenAI request becomes one each vendor accepts ---------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=openai_chat_requests(),
    name=st.sampled_from(sorted(DOCUMENTED)),
    stream=st.booleans(),
    include_usage=st.booleans(),
    names=st.booleans(),
    logprobs=st.booleans(),
)
def test_any_valid_openai_request_is_one_the_vendor_accepts(
    body: dict[str, Any], name: str, stream: bool, include_usage: bool, names: bool, logprobs: bool
) -> None:
    if stream:
        body = {
            **body,
            "stream": True,
            **({"stream_options": {"include_usage": True}} if include_usage else {}),
        }
    if names:
        body["messages"] = [{**m, "name": "ann"} if m["role"] == "user" else m for m in body["messages"]]
    if logprobs:
        body.update(logprobs=True, top_logprobs=2)
    validate(Operation.CHAT, body)
    request = get_provider(name).build_request(body, _ctx(name, stream, stream and include_usage))
    assert request.url == DOCUMENTED[name][0] + "/chat/completions"
    assert ("Authorization" in request.headers) == (name not in KEYLESS)
    sent = orjson.loads(request.body or b"")
    vendor_check(name, sent)
    generic = {k: v for k, v in sent.items() if k != "random_seed"}
    try:
        validate_chat(generic, "2025-04-01-preview")  # OpenAI's own request rules
    except WireError as err:  # pragma: no cover - shows the failing request
        raise AssertionError(f"{err.message}\n{sent}") from None
    assert sent["model"] == f"{name}-model"
