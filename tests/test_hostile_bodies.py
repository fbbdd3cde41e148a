"""Structurally hostile JSON bodies against a real router: never a 5xx.

Hypothesis builds request bodies that start from a valid chat, completions, embeddings or
Anthropic messages request and put wrong types at every level: arrays, objects, numbers beyond
64 bits, null, NaN-like strings and bare ``NaN``, unicode, lone surrogates, deep nesting. Each goes
to the router over HTTP, with a plain key and with a key that has rpm/tpm limits and a budget (so
token estimation walks the body before validation's verdict is used). Every answer must be below
500: a 2xx, or a 4xx JSON error that names the field at fault. The counts are printed at the end
(``pytest -s``) for docs/RELIABILITY.md.

tests/test_hostile.py fuzzes the translators in-process; this file goes through the wire.
"""

from __future__ import annotations

import copy
import http.client
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.servers import RouterProcess

PLAIN_KEY = "sk-fuzz-plain-0123456789abcdef"
LIMITED_KEY = "sk-fuzz-limited-0123456789abcdef"
PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
)
EXAMPLES = 200  # per path and key: 2,000 requests, about 25 s
COUNTS: Counter[tuple[str, str, str]] = Counter()


@pytest.fixture(scope="module")
def router() -> Iterator[RouterProcess]:
    with FakeOpenAI(UPSTREAM_KEY) as upstream:
        config = {
            "deployments": [
                # A real HTTP upstream (strict fake) and the in-process mock, for every operation.
                openai_deployment(upstream, name="fake"),
                {"name": "mock-a", "model": "mock", "provider": "mock"},
            ],
            "keys": [
                {"name": "plain", "keyEnv": "FUZZ_PLAIN_KEY"},
                {
                    "name": "limited",
                    "keyEnv": "FUZZ_LIMITED_KEY",
                    "limits": {"rpm": 1_000_000, "tpm": 100_000_000, "maxParallelRequests": 50},
                    "budget": {"amountUsd": "1000", "period": "daily"},
                },
            ],
            "settings": {"numRetries": 0},
        }
        env = {
            "TEST_UPSTREAM_KEY": UPSTREAM_KEY,
            "FUZZ_PLAIN_KEY": PLAIN_KEY,
            "FUZZ_LIMITED_KEY": LIMITED_KEY,
        }
        with RouterProcess(config, env=env) as proc:
            yield proc
            logs = proc.logs()
    assert "unhandled error" not in logs, logs[-3000:]
    total = sum(COUNTS.values())
    print(f"\nhostile bodies: {total} requests")
    for (path, key, klass), n in sorted(COUNTS.items()):
        print(f"  {path:24} {key:8} {klass}: {n}")


# --------------------------------------------------------------------------- strategies

_NASTY_STRINGS = st.sampled_from(
    [
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "-0",
        "null",
        "true",
        "",
        " ",
        "\u0000",
        "\ud800",
        "\U0001f600" * 50,
        "\u202e\u0301",
        "user",
        "assistant",
        "system",
        "text",
        "image_url",
        "tool",
    ]
)
_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.integers(min_value=-(2**80), max_value=2**80),  # beyond 64 bits
    st.floats(allow_nan=True, allow_infinity=True),  # NaN and Infinity are not JSON: a 400
    st.text(max_size=8),
    _NASTY_STRINGS,
)
_ANY = st.recursive(
    _LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), _NASTY_STRINGS), inner, max_size=4),
    ),
    max_leaves=10,
)


def _deep(depth: int) -> Any:
    node: Any = "x"
    for i in range(depth):
        node = [node] if i % 2 else {"a": node}
    return node


_DEEP = st.integers(100, 200).map(_deep)  # around the router's nesting limit (128)
_HOSTILE = st.one_of(_ANY, _DEEP)


_TEXT = st.text(max_size=12)
_MODEL = st.sampled_from(["gpt-test", "mock"])
_CHAT_PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _TEXT})}),
)
_CHAT_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": st.one_of(_TEXT, st.lists(_CHAT_PART, min_size=1, max_size=3)),
    },
    optional={"name": _TEXT},
)
_TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.just("f"), "parameters": st.just({})}),
    }
)
_COMMON = {
    "stream": st.booleans(),
    "temperature": st.floats(0, 2),
    "max_tokens": st.integers(1, 64),
    "n": st.integers(1, 3),
    "stop": st.lists(_TEXT, max_size=2),
    "user": _TEXT,
    "seed": st.integers(0, 99),
}
_TOKENS = st.one_of(_TEXT, st.lists(_TEXT, min_size=1, max_size=3), st.lists(st.integers(0, 99), min_size=1))
_ANTHROPIC_BLOCK = st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT})
#: Valid requests; :func:`_hostile_body` then puts hostile values into them.
_VALID: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {"model": _MODEL, "messages": st.lists(_CHAT_MESSAGE, min_size=1, max_size=3)},
        optional={**_COMMON, "tools": st.lists(_TOOL, min_size=1, max_size=2)},
    ),
    "/v1/completions": st.fixed_dictionaries({"model": _MODEL, "prompt": _TOKENS}, optional=_COMMON),
    "/v1/embeddings": st.fixed_dictionaries(
        {"model": _MODEL, "input": _TOKENS},
        optional={"dimensions": st.integers(1, 16), "encoding_format": st.just("float")},
    ),
    "/v1/messages": st.fixed_dictionaries(
        {
            "model": _MODEL,
            "max_tokens": st.integers(1, 64),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.just("user"),
                        "content": st.one_of(_TEXT, st.lists(_ANTHROPIC_BLOCK, min_size=1, max_size=2)),
                    }
                ),
                min_size=1,
                max_size=2,
            ),
        },
        optional={"system": _TEXT, "stream": st.booleans(), "temperature": st.floats(0, 1)},
    ),
    "/v1/messages/count_tokens": st.fixed_dictionaries(
        {
            "model": _MODEL,
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.just("user"),
                        "content": st.one_of(_TEXT, st.lists(_ANTHROPIC_BLOCK, min_size=1, max_size=2)),
                    }
                ),
                min_size=1,
                max_size=2,
            ),
        },
        optional={"system": _TEXT},
    ),
}
#: Keys added with a hostile value: every field the router or a provider reads, and some it does not.
_EXTRA_KEYS = st.sampled_from(
    [
        "messages",
        "prompt",
        "input",
        "role",
        "content",
        "type",
        "text",
        "tool_calls",
        "tool_call_id",
        "function_call",
        "tools",
        "tool_choice",
        "response_format",
        "stream_options",
        "stop",
        "dimensions",
        "encoding_format",
        "max_completion_tokens",
        "logit_bias",
        "system",
        "stop_sequences",
        "source",
        "image_url",
        "metadata",
        "api_base",
        "\u0000",
        "\U0001f600",
    ]
)


def _positions(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every position in a document: each container and each leaf, the root excepted."""
    if path:
        yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _positions(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _positions(value, (*path, i))


def _containers(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        yield path
        for key, value in node.items():
            yield from _containers(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _containers(value, (*path, i))


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def _hostile_body(data: st.DataObject, path: str) -> Any:
    """A valid request with up to three positions replaced or added with hostile values, or
    (now and then) a whole body that is no object at all."""
    if data.draw(st.integers(0, 9), label="whole") == 0:
        return data.draw(_WHOLE, label="whole body")
    # Copies: mutating what a strategy drew (st.just's object, say) would change later examples.
    body = copy.deepcopy(data.draw(_VALID[path], label="valid"))
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        value = copy.deepcopy(data.draw(_HOSTILE, label="hostile"))
        if data.draw(st.booleans(), label="add"):
            where = data.draw(st.sampled_from(list(_containers(body))), label="into")
            _at(body, where)[data.draw(_EXTRA_KEYS, label="key")] = value
        else:
            *parent, last = data.draw(st.sampled_from(list(_positions(body))), label="at")
            _at(body, tuple(parent))[last] = value
    return body


#: The whole body hostile: not an object, or not JSON at all.
_WHOLE = st.one_of(_ANY.filter(lambda v: not isinstance(v, dict)), _DEEP)


def _encode(body: Any) -> bytes:
    # json, not orjson: it writes integers beyond 64 bits, NaN, Infinity and lone surrogates.
    return json.dumps(body, allow_nan=True).encode()


def _post(router: RouterProcess, path: str, key: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=20)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _check(path: str, status: int, raw: bytes) -> None:
    assert status < 500, raw[:2000]
    if status < 400:
        if not raw.startswith((b"data:", b"event:")):  # a stream starts with an event
            orjson.loads(raw)
        return
    doc = orjson.loads(raw)
    if path.startswith("/v1/messages"):  # Anthropic-style errors carry no param: the message names it
        assert doc["type"] == "error" and doc["error"]["message"], doc
        return
    error = doc["error"]
    assert set(error) == {"message", "type", "param", "code"}, doc
    if status == 400 and error["code"] != "invalid_json":  # a body that is an object: a field is at fault
        assert isinstance(error["param"], str) and error["param"], doc


@pytest.mark.parametrize("key", ["plain", "limited"])
@pytest.mark.parametrize("path", PATHS)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_hostile_bodies_never_get_a_5xx(
    router: RouterProcess, path: str, key: str, data: st.DataObject
) -> None:
    body = _hostile_body(data, path)
    status, raw = _post(router, path, PLAIN_KEY if key == "plain" else LIMITED_KEY, _encode(body))
    COUNTS[(path, key, f"{status // 100}xx")] += 1
    _check(path, status, raw)


_CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "key", "body", "param"),
    [
        # What the probe found (86 of 5,037 requests got a 500): an unhashable role...
        (
            "/v1/chat/completions",
            "plain",
            {**_CHAT, "messages": [{"role": ["user"], "content": "hi"}]},
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            "plain",
            {**_CHAT, "messages": [{"role": {"a": 1}, "content": "hi"}]},
            "messages[0].role",
        ),
        # ... and 'messages' where it is no parameter, read as the prompt by the token estimate.
        ("/v1/completions", "plain", {"model": "mock", "prompt": "hi", "messages": 5}, "messages"),
        ("/v1/completions", "plain", {"model": "mock", "prompt": "hi", "messages": [1, "x"]}, "messages"),
        ("/v1/embeddings", "limited", {"model": "mock", "input": "hi", "messages": {"a": 1}}, "messages"),
        ("/v1/embeddings", "limited", {"model": "mock", "input": "hi", "messages": [[]]}, "messages"),
        ("/v1/embeddings", "plain", {"model": "mock", "input": "hi", "dimensions": 2**40}, "dimensions"),
    ],
)
def test_the_bodies_that_got_a_500_are_a_400_naming_the_field(
    router: RouterProcess, path: str, key: str, body: dict[str, Any], param: str
) -> None:
    status, raw = _post(router, path, PLAIN_KEY if key == "plain" else LIMITED_KEY, _encode(body))
    assert status == 400, raw[:500]
    assert orjson.loads(raw)["error"]["param"] == param
