"""The error table: every client mistake gets an OpenAI-style error with the right status."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.conftest import openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.servers import RouterProcess


@pytest.fixture
def router(fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]) -> RouterProcess:
    config = {
        "deployments": [openai_deployment(fake_openai, name="only")],
        "settings": {"maxRequestBodyBytes": 4096, "numRetries": 0},
    }
    return start_router(config)


def _post(
    router: RouterProcess,
    body: bytes,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, dict[str, Any], dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    doc = orjson.loads(raw) if raw else {}
    return resp.status, doc, {k.lower(): v for k, v in resp.getheaders()}


def _assert_openai_error(doc: dict[str, Any]) -> dict[str, Any]:
    assert set(doc) == {"error"}
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    return err


CHAT_OK = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"\xff\xfe\x00garbage", 400, None),
        (b"[1, 2]", 400, None),
        (b"[" * 2000 + b"]" * 2000, 400, None),
        (orjson.dumps({"messages": CHAT_OK["messages"]}), 400, "model"),
        (orjson.dumps({"model": 5, "messages": CHAT_OK["messages"]}), 400, "model"),
        (orjson.dumps({"model": "gpt-test"}), 400, "messages"),
        (orjson.dumps({"model": "gpt-test", "messages": []}), 400, "messages"),
        (orjson.dumps({"model": "gpt-test", "messages": ["hi"]}), 400, "messages[0]"),
        (
            orjson.dumps({"model": "gpt-test", "messages": [{"role": "bot", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (orjson.dumps({"model": "gpt-test", "messages": [{"role": "user"}]}), 400, "messages[0].content"),
        (orjson.dumps({**CHAT_OK, "temperature": 7}), 400, "temperature"),
        (orjson.dumps({**CHAT_OK, "temperature": "hot"}), 400, "temperature"),
        (orjson.dumps({**CHAT_OK, "max_tokens": 0}), 400, "max_tokens"),
        (orjson.dumps({**CHAT_OK, "stream": "yes"}), 400, "stream"),
        (orjson.dumps({**CHAT_OK, "stream_options": {"include_usage": True}}), 400, "stream_options"),
        (orjson.dumps({**CHAT_OK, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
        (orjson.dumps({**CHAT_OK, "tools": [{"type": "function"}]}), 400, "tools[0]"),
        (orjson.dumps({**CHAT_OK, "model": "no-such-model"}), 404, "model"),
        (orjson.dumps({**CHAT_OK, "pad": "x" * 5000}), 413, None),
    ],
)
def test_error_table(router: RouterProcess, body: bytes, status: int, param: str | None) -> None:
    got, doc, _ = _post(router, body)
    assert got == status, doc
    err = _assert_openai_error(doc)
    if param is not None:
        assert err["param"] == param
        assert param.split("[")[0].split(".")[0] in err["message"]


def test_embeddings_and_completions_name_their_fields(router: RouterProcess) -> None:
    got, doc, _ = _post(router, orjson.dumps({"model": "gpt-test"}), "/v1/embeddings")
    assert (got, _assert_openai_error(doc)["param"]) == (400, "input")
    got, doc, _ = _post(router, orjson.dumps({"model": "gpt-test"}), "/v1/completions")
    assert (got, _assert_openai_error(doc)["param"]) == (400, "prompt")


def test_unknown_route_and_method(router: RouterProcess) -> None:
    got, doc, _ = _post(router, b"{}", "/v1/nothing-here")
    assert got == 404 and _assert_openai_error(doc)["type"] == "not_found_error"
    got, doc, _ = _post(router, b"", "/v1/chat/completions", method="GET")
    assert got == 405 and _assert_openai_error(doc)


def test_chunked_body_over_limit(router: RouterProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    for _ in range(5):
        conn.send(b"400\r\n" + b" " * 1024 + b"\r\n")
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 413
    _assert_openai_error(orjson.loads(resp.read()))


@pytest.mark.parametrize(
    ("fault", "status", "type_"),
    [
        (Fault(status=500), 500, "upstream_error"),
        (Fault(status=503), 503, "upstream_error"),
        (Fault(status=429, headers={"Retry-After": "7"}), 429, "rate_limit_error"),
        (
            Fault(
                status=400,
                body={
                    "error": {
                        "message": "This model's maximum context length is 8 tokens",
                        "type": "invalid_request_error",
                        "param": "messages",
                        "code": "context_length_exceeded",
                    }
                },
            ),
            400,
            "invalid_request_error",
        ),
        (Fault(reset=True), 502, "upstream_error"),
    ],
)
def test_upstream_failures_are_mapped(
    router: RouterProcess, fake_openai: FakeOpenAI, fault: Fault, status: int, type_: str
) -> None:
    fake_openai.queue(fault)
    got, doc, headers = _post(router, orjson.dumps(CHAT_OK))
    assert got == status, doc
    err = _assert_openai_error(doc)
    assert err["type"] == type_
    if status == 429:
        assert headers["retry-after"] == "7"
    if fault.body:
        assert err["code"] == "context_length_exceeded"
        assert "maximum context length" in err["message"]
    assert headers["x-kubellm-deployment"] == "only"


def test_upstream_unreachable(start_router: Callable[..., RouterProcess]) -> None:
    config = {
        "deployments": [{"model": "m", "provider": "openai-compatible", "baseUrl": "http://127.0.0.1:9/v1"}]
    }
    router = start_router(config)
    got, doc, _ = _post(router, orjson.dumps({**CHAT_OK, "model": "m"}))
    assert got == 502
    assert _assert_openai_error(doc)["code"] == "upstream_connect_error"


def test_midstream_failure_is_an_error_event_not_a_silent_end(
    router: RouterProcess, fake_openai: FakeOpenAI
) -> None:
    fake_openai.queue(Fault(drop_after=3))
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=orjson.dumps({**CHAT_OK, "stream": True}),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    body = resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert b"[DONE]" not in body
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert _assert_openai_error(last)["type"] == "upstream_error"
