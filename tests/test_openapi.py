"""A real router held to its own OpenAPI description by schemathesis, every check on.

``schemathesis run --checks all`` against ``GET /openapi.json`` of a router process over loopback,
backed by the mock provider (and, for audio, files and batches, which the mock does not answer, an
OpenAI deployment of the same model group on a fake of OpenAI's platform): every phase (examples,
coverage, fuzzing, stateful through the description's links), valid and invalid data. It fails on
any 5xx, any status, header, content type or body the description does not declare, any valid
request refused, any invalid one accepted, a route that ignores its authentication, a wrong
``Allow``, a deleted response or file still served. Bounded (``--max-examples``, one fixed seed) so
that it runs in about two minutes.

The regression tests below pin what schemathesis found the router doing wrong.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import MASTER_KEY, UPSTREAM_KEY
from tests.fakes.openai_platform import FakePlatform
from tests.support.servers import RouterProcess

ROOT = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = 25
SEED = 7


@pytest.fixture(scope="module")
def platform() -> Iterator[FakePlatform]:
    """OpenAI's audio, files and batches APIs, which the mock provider does not have."""
    with FakePlatform(UPSTREAM_KEY, "openai", name="oa") as fake:
        yield fake


@pytest.fixture(scope="module")
def router(platform: FakePlatform) -> Iterator[RouterProcess]:
    # One model group, ``mock``, reaches every route: the mock provider answers chat, embeddings,
    # images, moderations and rerank; an OpenAI deployment (on the fake) audio, files and batches.
    config = {
        "deployments": [
            {
                "model": "mock",
                "provider": "mock",
                "mode": ["chat", "embedding", "image", "moderation", "rerank"],
            },
            {
                "name": "mock-audio",
                "model": "mock",
                "provider": "openai",
                "mode": "audio",
                "upstreamModel": "gpt-4o-mini-tts",
                "baseUrl": platform.base_url,
                "apiKeyEnv": "TEST_UPSTREAM_KEY",
            },
        ],
        "settings": {"numRetries": 0},
    }
    proc = RouterProcess(config, env={"KUBELLM_MASTER_KEY": MASTER_KEY, "TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    proc.start()
    yield proc
    proc.stop()
    assert "unhandled error" not in proc.logs(), proc.logs()[-3000:]


def call(
    router: RouterProcess, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=20)
    try:
        raw = None if body is None else json.dumps(body).encode()  # orjson refuses ints past 64 bits
        sent = {
            "Authorization": f"Bearer {MASTER_KEY}",
            "Content-Type": "application/json",
            **(headers or {}),
        }
        conn.request(method, path, body=raw, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, orjson.loads(data) if data else None
    finally:
        conn.close()


def test_schemathesis_finds_nothing_with_every_check(router: RouterProcess, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        router.base_url + "/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--header",
        f"Authorization: Bearer {MASTER_KEY}",
        "--no-shrink",
        # One worker: CPython 3.11's AST validator miscounts recursion across threads, which
        # hypothesis's strategy descriptions run into under schemathesis's coverage phase.
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--output-truncate",
        "true",
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    # cwd: schemathesis keeps its run data in ./.schemathesis
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    (tmp_path / "schemathesis.txt").write_text(out)  # the whole report, for a failed run
    assert done.returncode == 0, out[-12000:]
    assert "Tested: 40" in out, out[-4000:]  # every operation, none skipped


# --------------------------------------------------------------------------- what it found


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5.0, "n": 1.0},
        ),
        ("/v1/completions", {"prompt": [1.0, 2, 3.0], "max_tokens": 4.0}),
        ("/v1/embeddings", {"input": [[1.0, 2.0]], "dimensions": 8.0}),
        ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5.0}),
        ("/v1/responses", {"input": "hi", "max_output_tokens": 5.0}),
        ("/v1/images/generations", {"prompt": "a cat", "n": 2.0}),
        ("/v1/rerank", {"query": "a", "documents": ["a", "b"], "top_n": 1.0}),
    ],
)
def test_an_integral_float_is_an_integer(router: RouterProcess, path: str, body: dict[str, Any]) -> None:
    """JSON has one number type, and JSON Schema counts 5.0 as an integer: it was a 400."""
    status, _, doc = call(router, "POST", path, {"model": "mock", **body})
    assert status == 200, doc
    if path == "/v1/embeddings":
        assert len(doc["data"][0]["embedding"]) == 8
    if path == "/v1/images/generations":
        assert len(doc["data"]) == 2
    if path == "/v1/rerank":
        assert len(doc["results"]) == 1


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": [[True, 2]]}, "prompt"),  # booleans are no tokens
        ("/v1/completions", {"prompt": [2**64]}, "prompt"),  # past 64 bits: a float to the parser
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "seed": -(2**63) - 1},
            "seed",
        ),
        ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "x"}], "tools": 5}, "tools"),
        (
            "/v1/messages",
            {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": 5}]},
            "tools.0.name",
        ),
        (
            "/v1/messages",
            {
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"name": "t", "input_schema": [1]}],
            },
            "tools.0.input_schema",
        ),
        (
            "/v1/messages",
            {
                "max_tokens": 5,
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 0}]}
                ],
            },
            "messages.0.content.0.content",
        ),
        ("/v1/responses", {"input": [{"type": {}, "role": "user", "content": "x"}]}, "input[0].type"),
        ("/v1/responses", {"input": "x", "background": 0}, "background"),
        # an unhashable format was a 500; a voice id or instructions of any type passed as valid
        ("/v1/audio/speech", {"input": "x", "voice": "alloy", "response_format": {}}, "response_format"),
        ("/v1/audio/speech", {"input": "x", "voice": {"id": 5}}, "voice"),
        ("/v1/audio/speech", {"input": "x", "voice": "alloy", "instructions": {}}, "instructions"),
        # '²'.isdigit() is true and int('²') raises: a 500
        ("/v1/images/generations", {"prompt": "x", "n": "²"}, "n"),
        ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": "²"}, "top_n"),
        (
            "/v1/responses",
            {
                "input": "x",
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": 5},
            },
            "tool_choice.tools",
        ),
    ],
)
def test_malformed_bodies_are_a_400_naming_the_field(
    router: RouterProcess, path: str, body: dict[str, Any], param: str
) -> None:
    """Some were a 500 (an unhashable item type, a non-list tools), the rest passed as if valid."""
    status, _, doc = call(router, "POST", path, {"model": "mock", **body})
    assert status == 400, doc
    if "/messages" in path:
        assert doc["type"] == "error" and param in doc["error"]["message"], doc
    else:
        assert doc["error"]["param"] == param, doc


def test_non_ascii_digits_are_a_400(router: RouterProcess) -> None:
    """'²'.isdigit() is true and int('²') raises: both were a 500."""
    body = {"model": "mock", "messages": [{"role": "user", "content": "x"}]}
    status, _, doc = call(router, "POST", "/v1/chat/completions", body, {"x-kubellm-num-retries": "²"})
    assert status == 400 and doc["error"]["param"] == "x-kubellm-num-retries", doc
    status, _, created = call(router, "POST", "/v1/responses", {"model": "mock", "input": "hi"})
    assert status == 200, created
    status, _, doc = call(router, "GET", f"/v1/responses/{created['id']}/input_items?limit=%C2%B2")
    assert status == 400 and doc["error"]["param"] == "limit", doc
    for path in ("/v1/files", "/v1/batches"):
        status, _, doc = call(router, "GET", path + "?limit=%C2%B2")
        assert status == 400 and doc["error"]["param"] == "limit", doc


def _upload(router: RouterProcess, path: str, fields: dict[str, str | list[str]]) -> httpx.Response:
    files = {"file": ("a.wav", b"RIFF0000", "audio/wav")}
    auth = {"Authorization": f"Bearer {MASTER_KEY}"}
    return httpx.post(router.base_url + path, data=fields, files=files, headers=auth, timeout=20)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        # a repeated field is a list: unhashable, a 500
        ({"response_format": ["json", "text"]}, "response_format"),
        ({"stream": "{}"}, "stream"),  # anything but 'true' passed as valid
    ],
)
def test_malformed_uploads_are_a_400_naming_the_field(
    router: RouterProcess, fields: dict[str, str | list[str]], param: str
) -> None:
    for path in ("/v1/audio/transcriptions", "/openai/deployments/mock/audio/translations"):
        resp = _upload(router, path, {"model": "mock", **fields})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_an_upload_is_transcribed(router: RouterProcess) -> None:
    resp = _upload(router, "/v1/audio/transcriptions", {"model": "mock", "stream": "false"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"] == "oa heard 8 bytes of a.wav"


def test_a_405_names_every_method_of_the_path(router: RouterProcess) -> None:
    """GET and DELETE are two routes of one path; Starlette's Allow named only the first."""
    status, headers, _ = call(router, "PUT", "/v1/responses/resp_x")
    assert status == 405
    assert headers["allow"] == "DELETE, GET"


def test_the_description_is_served(router: RouterProcess) -> None:
    status, headers, doc = call(router, "GET", "/openapi.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
