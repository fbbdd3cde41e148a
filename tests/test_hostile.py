"""Hostile and malformed input: every case gets a 4xx OpenAI-style error or a clean close.

Never a 500, a hang, or a dead process: after each case the router must still answer. The cases:
schemathesis against the router's own OpenAPI spec; malformed, invalid UTF-8, deeply nested and
oversized bodies; oversized and never-ending request heads; slow clients (slowloris); clients
that vanish mid-body; upstreams that answer garbage; and hypothesis on the translators with
request shapes the existing provider tests (valid requests only) never send.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from kubellm.router._errors import KubellmError
from kubellm.router.config._schema import DeploymentConfig
from kubellm.router.inbound._anthropic import anthropic_request_to_openai
from kubellm.router.inbound._openai_validate import MAX_DEPTH, validate
from kubellm.router.providers import Operation, RequestContext, Usage, get_provider, provider_names
from kubellm.router.providers._base import MAX_TOKENS
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.servers import RouterProcess, ThreadedApp, http_get

KEY = "sk-hostile-0123456789abcdef"
LIMIT = 1024 * 1024  # settings.maxRequestBodyBytes of the router under test
HEADER_TIMEOUT = 2.0
MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def router(upstream: FakeOpenAI) -> Iterator[RouterProcess]:
    config = {
        "deployments": [openai_deployment(upstream, name="only"), {"model": "mock", "provider": "mock"}],
        "keys": [{"name": "hostile", "keyEnv": "HOSTILE_KEY"}],
        "settings": {"maxRequestBodyBytes": LIMIT, "numRetries": 0},
    }
    env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY, "HOSTILE_KEY": KEY, "KUBELLM_MASTER_KEY": MASTER_KEY}
    proc = RouterProcess(config, env=env, args=["--header-timeout", str(HEADER_TIMEOUT)])
    proc.start()
    yield proc
    proc.stop()
    assert "unhandled error" not in proc.logs(), proc.logs()[-3000:]


def assert_alive(router: RouterProcess) -> None:
    """The process is up and serves a real request, quickly."""
    assert router.proc is not None and router.proc.poll() is None, router.logs()[-2000:]
    started = time.monotonic()
    client = openai.OpenAI(base_url=router.v1, api_key=KEY, max_retries=0, timeout=5)
    assert client.chat.completions.create(model="gpt-test", messages=MESSAGES).choices
    assert time.monotonic() - started < 2


def assert_error_body(raw: bytes, path: str = "/v1/chat/completions") -> dict[str, Any]:
    doc = orjson.loads(raw)
    if path.endswith(("/messages", "/messages/count_tokens")):  # Anthropic-format endpoints: their errors
        assert doc["type"] == "error" and isinstance(doc["error"]["message"], str), doc
        return dict(doc["error"])
    error = doc["error"]
    assert set(error) == {"message", "type", "param", "code"}, doc
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    return dict(error)


def post(
    router: RouterProcess,
    body: bytes,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=20)
    try:
        conn.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- the OpenAPI spec


def test_the_openapi_spec_declares_every_parameter(router: RouterProcess) -> None:
    """/v1/models/{model} did not declare its path parameter (an invalid spec: schemathesis's CLI
    refuses it), and /admin/spend hid its query parameters from fuzzers and clients."""
    spec = orjson.loads(http_get(router.base_url + "/openapi.json")[1])
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            declared = {(p["in"], p["name"]) for p in operation.get("parameters", [])}
            for name in re.findall(r"{(\w+)}", path):
                assert ("path", name) in declared, (method, path)
    spend = {p["name"] for p in spec["paths"]["/admin/spend"]["get"]["parameters"]}
    assert spend == {"since", "until", "by"}


def test_schemathesis_finds_no_server_error(router: RouterProcess) -> None:
    """Every operation of GET /openapi.json, fuzzed with valid and invalid data: never a 5xx."""
    schema = schemathesis.openapi.from_url(router.base_url + "/openapi.json")
    results = list(schema.get_all_operations())
    invalid = [str(r.err()) for r in results if not isinstance(r, Ok)]
    assert not invalid, invalid  # the spec is valid: every operation loads, path parameters included
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) >= 10
    session = requests.Session()
    failures: list[str] = []
    for operation in operations:
        for mode, examples in ((GenerationMode.POSITIVE, 50), (GenerationMode.NEGATIVE, 25)):

            @settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,  # the same cases on every run: no flaky CI
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Any) -> None:
                headers = {"Authorization": f"Bearer {MASTER_KEY}"}
                response = case.call(base_url=router.base_url, session=session, headers=headers, timeout=10)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path}: {response.status_code} {case.body!r}"
                    )
                elif response.status_code >= 400:
                    assert_error_body(response.content, case.path)

            try:
                fuzz()
            except Unsatisfiable:  # an operation with nothing to send wrong (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, operation
    assert not failures, failures[:5]
    assert_alive(router)


# --------------------------------------------------------------------------- bodies

_DEEP_OK = (
    b'{"model":"gpt-test","messages":[{"role":"user","content":"hi","x":' + b"[" * 100 + b"]" * 100 + b"}]}"
)


@pytest.mark.parametrize(
    ("name", "body", "status", "param"),
    [
        ("empty", b"", 400, None),
        ("not json", b"{model: gpt-test}", 400, None),
        ("truncated", b'{"model":"gpt-test","messages":[', 400, None),
        ("a json array", b"[]", 400, None),
        (
            "invalid utf-8",
            b'{"model":"gpt-test","messages":[{"role":"user","content":"\xff\xfe"}]}',
            400,
            None,
        ),
        (
            "lone surrogate",
            b'{"model":"gpt-test","messages":[{"role":"user","content":"\\ud800"}]}',
            400,
            None,
        ),
        ("nan", b'{"model":"gpt-test","messages":[],"temperature":NaN}', 400, None),
        ("infinite number", b'{"model":"gpt-test","messages":[],"max_tokens":1e400}', 400, None),
        ("nested past orjson's reader", b"[" * 5000 + b"]" * 5000, 400, None),
        (
            "nested past what the router can write again",
            b'{"model":"gpt-test","messages":[{"role":"user","content":"hi","x":'
            + b"[" * 600
            + b"]" * 600
            + b"}]}",
            400,
            None,
        ),
        (
            "nested objects",
            b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"metadata":'
            + b'{"a":' * 300
            + b"1"
            + b"}" * 300
            + b"}",
            400,
            None,
        ),
        ("nested within the limit", _DEEP_OK, 200, None),
        (
            "null bytes",
            b'{"model":"gpt\\u0000test","messages":[{"role":"user","content":"hi"}]}',
            404,
            "model",
        ),
        (
            "tool_calls not a list",
            orjson.dumps(
                {
                    "model": "gpt-test",
                    "messages": [{"role": "assistant", "content": None, "tool_calls": {"a": 1}}],
                }
            ),
            400,
            "messages[0].tool_calls",
        ),
        (
            "tool call not an object",
            orjson.dumps(
                {
                    "model": "gpt-test",
                    "messages": [{"role": "assistant", "content": None, "tool_calls": [[]]}],
                }
            ),
            400,
            "messages[0].tool_calls[0]",
        ),
        (
            "text part not a string",
            orjson.dumps(
                {
                    "model": "gpt-test",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}],
                }
            ),
            400,
            "messages[0].content[0].text",
        ),
    ],
)
def test_malformed_bodies(
    router: RouterProcess, name: str, body: bytes, status: int, param: str | None
) -> None:
    got, raw = post(router, body)
    assert got == status, (name, raw[:300])
    if status >= 400:
        assert assert_error_body(raw)["param"] == param
    assert_alive(router)


def test_nesting_limit_is_exact(router: RouterProcess) -> None:
    def nested(depth: int) -> bytes:  # the body object is level 1, each array one more
        inner = b"[" * (depth - 1) + b"]" * (depth - 1)
        return b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}],"x":' + inner + b"}"

    assert post(router, nested(MAX_DEPTH))[0] == 200
    status, raw = post(router, nested(MAX_DEPTH + 1))
    assert status == 400 and "nested" in assert_error_body(raw)["message"]


def _oversized_exchange(router: RouterProcess, head: bytes, body: Iterator[bytes]) -> bytes:
    """Send a head, then body pieces until the server stops reading; return what it answered.

    A server may answer 413 and close as soon as it knows a body is too large. If the client is
    still sending, the kernel answers the unread bytes with a reset, which may also discard the
    413 before the client reads it (RFC 9112 §9.6): so a reset with nothing read is allowed, and
    ``b""`` is returned for it.
    """
    with socket.create_connection(("127.0.0.1", router.port), timeout=20) as sock:
        try:
            sock.sendall(head)
            for piece in body:
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def _assert_413(answer: bytes, *, allow_reset: bool) -> None:
    if not answer and allow_reset:
        return
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:200]
    assert_error_body(rest.partition(b"\r\n\r\n")[2])


def test_bodies_over_the_limit(router: RouterProcess) -> None:
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    # Declared too large and not sent: the router must answer from the head alone, so the 413 is
    # always readable.
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
    declared = head + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1)
    _assert_413(_oversized_exchange(router, declared, iter(())), allow_reset=False)
    # Declared too large and sent whole: the 413, or a reset that overtook it.
    huge = b'{"model":"gpt-test","messages":[{"role":"user","content":"' + b"a" * (LIMIT + 1) + b'"}]}'
    sent = head + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(huge)
    _assert_413(_oversized_exchange(router, sent, iter((huge,))), allow_reset=True)
    # Declared small, sent chunked and large: the streamed count catches it.
    chunk = b"a" * 65536
    pieces = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 2))
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n"
    _assert_413(_oversized_exchange(router, chunked, pieces), allow_reset=True)
    # A declared length that is not a number.
    status, raw = post(router, b"{}", headers={"Content-Length": "12abc"})
    assert status == 400 and assert_error_body(raw)["code"] == "invalid_http_request"
    assert_alive(router)


def test_huge_messages_array_within_the_limit(router: RouterProcess, upstream: FakeOpenAI) -> None:
    messages = [{"role": "user", "content": "x"}] * 34_000  # ~1 MB of JSON, just within the limit
    body = orjson.dumps({"model": "gpt-test", "messages": messages})
    assert len(body) < LIMIT
    started = time.monotonic()
    status, raw = post(router, body)
    assert status == 200, raw[:300]
    assert time.monotonic() - started < 10
    assert_alive(router)


def test_refused_content_type_is_still_json_error(router: RouterProcess) -> None:
    status, raw = post(
        router, b"model=gpt-test", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 400 and assert_error_body(raw)["code"] == "invalid_json"


# --------------------------------------------------------------------------- request heads


def _raw_exchange(router: RouterProcess, payload: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes (or times out); b"" means a clean close."""
    with socket.create_connection(("127.0.0.1", router.port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close while we still send
            sock.sendall(payload)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass  # closed with unread input: a reset, still a clean close
        return data


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4_000_000 + b"\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(20_000))
        + b"\r\n",
        b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["one 100 kB header", "one 4 MB header", "20,000 headers", "a 200 kB URL"],
)
def test_oversized_heads_get_431_or_a_clean_close(router: RouterProcess, head: bytes) -> None:
    answer = _raw_exchange(router, head + b"Connection: close\r\n\r\n")
    if answer:  # a clean close (no answer) is acceptable too, when the server stopped reading first
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert_error_body(answer.partition(b"\r\n\r\n")[2])
    assert_alive(router)


def test_garbage_instead_of_http_is_a_clean_400(router: RouterProcess) -> None:
    answer = _raw_exchange(router, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    if answer:
        assert assert_error_body(answer.partition(b"\r\n\r\n")[2])["code"] == "invalid_http_request"
    assert_alive(router)


def test_slow_clients_are_cut_off_and_others_keep_being_served(router: RouterProcess) -> None:
    """Slowloris, bounded: 6 sockets trickle a head, 2 trickle a body; normal traffic goes on."""
    trickle_head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    trickle_body = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"
    )
    results: dict[int, tuple[bytes, float]] = {}

    def slow(index: int, payload: bytes) -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", router.port), timeout=15) as sock:
            data = b""
            try:
                sock.sendall(payload[:40])
                for i in range(40, len(payload) + 20):  # one byte every 0.2 s, for longer than allowed
                    sock.sendall(payload[i : i + 1] or b"a")
                    time.sleep(0.2)
            except OSError:
                pass  # the router closed the connection: what we want
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except OSError:
                pass
        results[index] = (data, time.monotonic() - started)

    threads = [threading.Thread(target=slow, args=(i, trickle_head)) for i in range(6)]
    threads += [threading.Thread(target=slow, args=(6 + i, trickle_body)) for i in range(2)]
    for t in threads:
        t.start()
    served = 0
    deadline = time.monotonic() + HEADER_TIMEOUT + 1
    while time.monotonic() < deadline:  # everyone else is served, promptly, all along
        assert_alive(router)
        served += 1
    for t in threads:
        t.join(30)
    assert served >= 5
    assert len(results) == 8
    for index, (data, elapsed) in results.items():
        assert data == b"" or data.startswith(b"HTTP/1.1 408 "), (index, data[:200])
        assert elapsed < HEADER_TIMEOUT + 4, (index, elapsed)  # cut off, not served for ever
    assert_alive(router)


def test_an_idle_connection_is_closed(router: RouterProcess) -> None:
    started = time.monotonic()
    answer = _raw_exchange(router, b"", timeout=HEADER_TIMEOUT + 5)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < HEADER_TIMEOUT + 2


def test_a_kept_alive_connection_is_closed_after_the_keep_alive_timeout(router: RouterProcess) -> None:
    body = b'{"model":"mock","messages":[{"role":"user","content":"hi"}]}'
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body)
    )
    started = time.monotonic()
    answer = _raw_exchange(router, request, timeout=15)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1
    # uvicorn's default --timeout-keep-alive is 5 s; the sweep may act up to a quarter second late.
    assert 4.5 < time.monotonic() - started < 8


def test_pipelined_requests_are_answered_in_order_on_the_fast_path(router: RouterProcess) -> None:
    requests = b""
    for word in (b"one", b"two", b"three"):
        body = b'{"model":"mock","messages":[{"role":"user","content":"%s"}]}' % word
        requests += (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body)
        )
    requests += (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n"
        % (KEY.encode())
    )
    answer = _raw_exchange(router, requests, timeout=15)
    assert answer.count(b"HTTP/1.1 200 ") == 4, answer[:2000]
    said = [answer.index(b"You said: " + word) for word in (b"one", b"two", b"three")]
    assert said == sorted(said)
    assert answer.rindex(b'"object":"list"') > said[-1]


def test_expect_100_continue_on_the_fast_path(router: RouterProcess) -> None:
    body = b'{"model":"mock","messages":[{"role":"user","content":"hi"}]}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (KEY.encode(), len(body))
    )
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    # Too large a body is refused before the client sends it, and the connection is closed.
    big = head.replace(b"Content-Length: %d" % len(body), b"Content-Length: %d" % (LIMIT + 1))
    answer = _raw_exchange(router, big)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower(), answer[:300]


def test_a_client_vanishing_mid_body_is_not_an_error(router: RouterProcess) -> None:
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b'\r\nContent-Length: 1000\r\n\r\n{"model":'
        )
        time.sleep(0.2)
    time.sleep(0.3)
    assert_alive(router)
    assert "unhandled error" not in router.logs()
    assert "ClientDisconnect" not in router.logs()


@pytest.mark.parametrize(
    "query",
    ["since=nan", "since=inf", "since=1e308", "until=-1e20", "since=0&until=1e12", "since=0001-01-01"],
)
def test_admin_spend_times_out_of_range_are_a_400(router: RouterProcess, query: str) -> None:
    """Times no date can show were a 500 (datetime overflow)."""
    status, raw = http_get(
        router.base_url + "/admin/spend?" + query, {"Authorization": f"Bearer {MASTER_KEY}"}
    )
    assert status == 400, raw
    assert assert_error_body(raw)["param"] in ("since", "until")


def test_trailing_slash_is_404_and_echoes_no_host(router: RouterProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
    conn.request("POST", "/v1/chat/completions/", body=b"{}", headers={"Host": "attacker.example"})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    assert resp.status == 404 and resp.getheader("location") is None
    assert_error_body(raw)


# --------------------------------------------------------------------------- upstream garbage


def _sse_upstream(events: list[bytes]) -> ThreadedApp:
    """An OpenAI-compatible upstream that streams exactly ``events`` (and answers JSON unstreamed)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(b"data: " + event + b"\n\n")
            await asyncio.sleep(0.05)  # one event per read: the bad one comes after the first byte
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return ThreadedApp(app)


def _chunk(delta: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            **extra,
        }
    )


def test_an_unreadable_upstream_answer_fails_over(router: RouterProcess) -> None:
    """A 200 whose usage is garbage was a 500 ("internal router error"); it is a bad upstream answer."""
    with FakeOpenAI(UPSTREAM_KEY, "bad") as bad, FakeOpenAI(UPSTREAM_KEY, "good") as good:
        bad.always = Fault(
            status=200,
            body={
                "id": "x",
                "object": "chat.completion",
                "choices": [],
                "usage": {"prompt_tokens": "many", "completion_tokens": 1},
            },
        )
        config = {
            "deployments": [
                openai_deployment(bad, name="bad", priority=0),
                openai_deployment(good, name="good", priority=1),
            ],
            "settings": {"numRetries": 1},
        }
        with RouterProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as proc:
            raw = openai.OpenAI(
                base_url=proc.v1, api_key="x", max_retries=0
            ).chat.completions.with_raw_response
            answer = raw.create(model="gpt-test", messages=MESSAGES)
            assert answer.headers["x-kubellm-deployment"] == "good"
            assert answer.headers["x-kubellm-attempts"] == "2"
            logs = proc.logs()
    assert "unhandled error" not in logs and "cannot read" in logs


def test_an_unreadable_stream_chunk_is_an_error_event(start_router: Any) -> None:
    events = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "hi"}),
        orjson.dumps(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [],
                "usage": {"prompt_tokens": [1], "completion_tokens": 1},
            }
        ),
    ]
    with _sse_upstream(events) as upstream:
        config = {
            "deployments": [
                {"model": "m", "provider": "openai-compatible", "baseUrl": upstream.base_url + "/v1"}
            ]
        }
        router = start_router(config)
        client = openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0)
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        got: list[str] = []
        with pytest.raises(openai.APIError) as info:  # an error event, not a connection torn down
            for chunk in stream:
                got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        assert "".join(got) == "hi"
        assert "cannot read" in str(info.value.message)
        assert "Exception in ASGI application" not in router.logs()


@pytest.mark.parametrize(
    ("usage", "recorded"),
    [
        ({"prompt_tokens": -50, "completion_tokens": -1}, (0, 0)),
        ({"prompt_tokens": 10**19, "completion_tokens": 2**63}, (MAX_TOKENS, MAX_TOKENS)),
    ],
    ids=["negative", "past 64 bits"],
)
def test_absurd_upstream_usage_is_clamped_and_the_ledger_keeps_flowing(
    start_router: Any, usage: dict[str, int], recorded: tuple[int, int]
) -> None:
    """Negative usage was a 500 (cost() refuses negatives); counts past 64 bits jammed the ledger."""
    with FakeOpenAI(UPSTREAM_KEY) as fake:
        body = {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "usage": usage,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
        }
        fake.queue(Fault(status=200, body=body))
        router = start_router(
            {
                "deployments": [
                    openai_deployment(fake, pricing={"inputPerMillion": "1", "outputPerMillion": "1"})
                ]
            },
            env={"KUBELLM_MASTER_KEY": MASTER_KEY},
        )
        client = openai.OpenAI(base_url=router.v1, api_key=MASTER_KEY, max_retries=0)
        first = client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        assert first.usage is not None  # the upstream's body is passed through as it is
        client.chat.completions.create(model="gpt-test", messages=MESSAGES)  # an ordinary one after it
        _status, spend = http_get(router.base_url + "/admin/spend", {"Authorization": f"Bearer {MASTER_KEY}"})
    total = orjson.loads(spend)["total"]
    assert total["requests"] == 2  # both records reached the ledger: nothing jammed it
    assert total["promptTokens"] == recorded[0] + 5 and total["completionTokens"] == recorded[1] + 5


# --------------------------------------------------------------------------- hypothesis on translators


def _ctx(name: str, stream: bool) -> RequestContext:
    model = {"replicate": "owner/model", "bedrock": "anthropic.claude-3-haiku"}.get(name, "m")
    deployment = DeploymentConfig(
        name="d",
        model="m",
        provider=name,
        upstream_model=model,
        base_url="http://127.0.0.1:9/v1",
        api_version="2024-06-01",
        region="us-east-1",
        project="p",
        location="us-central1",
    )
    return RequestContext("0" * 32, Operation.CHAT, "m", deployment, stream, stream, api_key="k")


_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=4)
)
_NAMES = st.sampled_from(
    [
        "type",
        "text",
        "url",
        "image_url",
        "name",
        "arguments",
        "function",
        "id",
        "content",
        "role",
        "detail",
        "input_audio",
        "file",
        "file_data",
        "data",
        "format",
        "schema",
        "json_schema",
        "parameters",
        "properties",
    ]
)
_ANY = st.recursive(
    _LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_NAMES, inner, max_size=4)),
    max_leaves=8,
)
_PART = st.one_of(
    _ANY,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "input_audio", "file", "refusal", "other"])},
        optional={"text": _ANY, "image_url": _ANY, "input_audio": _ANY, "file": _ANY},
    ),
)
_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]),
        "content": st.one_of(st.text(max_size=5), st.lists(_PART, min_size=1, max_size=3), st.none()),
    },
    optional={"name": _ANY, "tool_calls": _ANY, "tool_call_id": _ANY, "function_call": _ANY, "refusal": _ANY},
)
_TOP = [
    "tools",
    "tool_choice",
    "response_format",
    "parallel_tool_calls",
    "stop",
    "user",
    "logprobs",
    "top_logprobs",
    "reasoning_effort",
    "modalities",
    "metadata",
    "seed",
    "n",
    "logit_bias",
    "prediction",
    "audio",
    "store",
    "functions",
    "function_call",
]
_BODY = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(_MESSAGE, min_size=1, max_size=4)},
    optional={name: _ANY for name in _TOP},
)
_CHAT_PROVIDERS = sorted(n for n in provider_names() if Operation.CHAT in get_provider(n).operations)


@settings(
    max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(body=_BODY, name=st.sampled_from(_CHAT_PROVIDERS), stream=st.booleans())
def test_any_request_the_validator_accepts_translates_or_is_a_400(
    body: dict[str, Any], name: str, stream: bool
) -> None:
    """Hostile shapes in the fields the validator lets through: a provider answers 400, never crashes."""
    try:
        validate(Operation.CHAT, body)
    except KubellmError:
        return
    try:
        get_provider(name).build_request(body, _ctx(name, stream))
    except KubellmError:
        pass
    except Exception:  # pragma: no cover - shows what crashed
        pytest.fail(f"{name} crashed on {body!r}:\n{traceback.format_exc()}")


_BLOCK = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "document", "thinking"])},
    optional={"text": _ANY, "source": _ANY, "id": _ANY, "name": _ANY, "input": _ANY, "content": _ANY},
)
_ANTHROPIC = st.fixed_dictionaries(
    {"model": st.just("m"), "max_tokens": st.just(5)},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "assistant"]),
                    "content": st.one_of(
                        st.text(max_size=3), _ANY, st.lists(st.one_of(_ANY, _BLOCK), max_size=3)
                    ),
                }
            ),
            max_size=3,
        ),
        "system": _ANY,
        "tools": _ANY,
        "tool_choice": _ANY,
        "stop_sequences": _ANY,
        "output_config": _ANY,
        "metadata": _ANY,
    },
)


@settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(body=_ANTHROPIC)
def test_any_anthropic_request_translates_or_is_a_400(body: dict[str, Any]) -> None:
    try:
        anthropic_request_to_openai(body)
    except KubellmError:
        pass
    except Exception:  # pragma: no cover - shows what crashed
        pytest.fail(f"crashed on {body!r}:\n{traceback.format_exc()}")


@given(st.integers(), st.integers(), st.integers())
def test_usage_counts_are_clamped(prompt: int, completion: int, cached: int) -> None:
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
    assert 0 <= usage.prompt_tokens <= MAX_TOKENS and 0 <= usage.completion_tokens <= MAX_TOKENS
    assert 0 <= usage.cached_tokens <= usage.prompt_tokens
    if 0 <= prompt <= MAX_TOKENS:
        assert usage.prompt_tokens == prompt


# --------------------------------------------------------------------------- bookkeeping


def test_attempts_do_not_rewrite_the_clients_body(start_router: Any) -> None:
    """The OpenAI-shaped adapter wrote the upstream model name and its own stream_options into the
    client's body, which later attempts reuse and the payload log and sinks report as sent."""
    with FakeOpenAI(UPSTREAM_KEY, "a") as a, FakeOpenAI(UPSTREAM_KEY, "b") as b:
        a.always = Fault(status=500)
        router = start_router(
            {
                "deployments": [
                    openai_deployment(a, name="a", upstreamModel="model-a", priority=0),
                    openai_deployment(b, name="b", upstreamModel="model-b", priority=1, logPayloads=True),
                ],
                "settings": {"numRetries": 1},
            }
        )
        client = openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0)
        stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert [s.body["model"] for s in a.seen] == ["model-a"]
        assert [s.body["model"] for s in b.seen] == ["model-b"]
    time.sleep(0.3)
    lines = [orjson.loads(line) for line in router.logs().splitlines() if '"request":' in line]
    assert len(lines) == 1
    assert lines[0]["request"] == {"model": "gpt-test", "messages": MESSAGES, "stream": True}
