"""Hot reload under traffic, client disconnects, and the CLI's start-up checks."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from kubellm.router.config._schema import ConfigError, parse_config
from tests.conftest import openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.support.servers import RouterProcess, free_port, h11_router, http_get

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def _readiness(router: RouterProcess) -> dict[str, Any]:
    status, body = http_get(router.base_url + "/health/readiness")
    assert status == 200
    doc: dict[str, Any] = orjson.loads(body)
    return doc


def test_hot_reload_under_traffic_loses_no_request(start_router: Callable[..., RouterProcess]) -> None:
    with (
        FakeOpenAI(api_key="sk-test-key-7Hq2Vw9Lx4", name="one") as one,
        FakeOpenAI(api_key="sk-test-key-7Hq2Vw9Lx4", name="two") as two,
    ):
        router = start_router(
            {
                "deployments": [openai_deployment(one, name="dep-one")],
                "settings": {"reloadIntervalSeconds": 0.1},
            }
        )
        version_before = _readiness(router)["configVersion"]
        served: list[str] = []
        failures: list[BaseException] = []

        async def traffic(stop: asyncio.Event) -> None:
            client = openai.AsyncOpenAI(base_url=router.v1, api_key="x", max_retries=0)

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        raw = await client.chat.completions.with_raw_response.create(
                            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=False
                        )
                        served.append(raw.headers["x-kubellm-deployment"])
                    except Exception as exc:
                        failures.append(exc)

            workers = [asyncio.create_task(worker()) for _ in range(8)]
            await stop.wait()
            await asyncio.gather(*workers)
            await client.close()

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(traffic(stop))
            await asyncio.sleep(0.7)
            router.write_config(
                {
                    "deployments": [openai_deployment(two, name="dep-two")],
                    "settings": {"reloadIntervalSeconds": 0.1},
                }
            )
            await asyncio.sleep(0.7)
            # An invalid file is rejected and the last good config keeps serving.
            assert router.config_path is not None
            router.config_path.write_text("deployments: [{model: x, provider: nope}]\n")
            await asyncio.sleep(0.7)
            stop.set()
            await task

        asyncio.run(scenario())
        assert failures == []
        assert "dep-one" in served and "dep-two" in served
        first_two = served.index("dep-two")
        assert "dep-one" not in served[first_two + 20 :]  # after the swap settles, only the new config serves
        ready = _readiness(router)
        assert ready["configVersion"] != version_before
        assert "provider" in router.logs() and "config reload rejected" in router.logs()
        metrics = http_get(router.base_url + "/metrics")[1].decode()
        assert f'kubellm_config_info{{version="{ready["configVersion"]}"}} 1.0' in metrics
        assert 'kubellm_config_reloads_total{result="invalid"}' in metrics


def test_client_disconnect_cancels_upstream_request(
    fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    router = start_router({"deployments": [openai_deployment(fake_openai)]})
    fake_openai.queue(Fault(hang=5))
    client = openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    deadline = time.monotonic() + 3
    while fake_openai.abandoned < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_openai.abandoned == 1


def test_client_disconnect_mid_stream_cancels_upstream(
    fake_openai: FakeOpenAI, start_router: Callable[..., RouterProcess]
) -> None:
    router = start_router({"deployments": [openai_deployment(fake_openai)]})
    fake_openai.queue(Fault(chunk_delay=0.3))
    with socket.create_connection(("127.0.0.1", router.port)) as sock:
        body = orjson.dumps({**CHAT, "stream": True})
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        assert b"200 OK" in sock.recv(65536)
    deadline = time.monotonic() + 5
    while fake_openai.abandoned < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_openai.abandoned == 1


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubellm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _cli("router", "--port", str(port))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [f"kubellm router: port {port} on 127.0.0.1 is already in use"]


def test_non_loopback_without_keys_refuses() -> None:
    result = _cli("router", "--host", "0.0.0.0", "--port", str(free_port()))
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr and "--insecure-no-auth" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_config_names_field_and_reason(tmp_path: Any) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("deployments:\n  - model: m\n    provider: openai\n    weight: -1\n")
    result = _cli("router", "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    assert "deployments[0].weight" in result.stderr and "greater than or equal to 0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"deployments": [{"model": "a\nb", "provider": "mock"}]}, "deployments[0].model"),
        ({"deployments": [{"model": "m", "name": "x\ry", "provider": "mock"}]}, "deployments[0].name"),
        ({"modelGroups": [{"name": "m", "aliases": ["ok", "t\tab"]}]}, "modelGroups[0].aliases[1]"),
        ({"keys": [{"name": "k\x00", "keyHash": "0" * 64}]}, "keys[0].name"),
    ],
)
def test_names_with_control_characters_are_refused(config: dict[str, Any], field: str) -> None:
    """Names travel in response headers, metric labels and log lines."""
    with pytest.raises(ConfigError) as caught:
        parse_config(config)
    assert field in caught.value.message and "control characters" in caught.value.message


def test_missing_credential_env_is_named(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("deployments:\n  - model: m\n    provider: openai\n    apiKeyEnv: KUBELLM_TEST_UNSET\n")
    result = _cli("router", "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    assert "deployments[0].apiKeyEnv: environment variable KUBELLM_TEST_UNSET is not set" in result.stderr


def test_single_model_quick_start(fake_openai: FakeOpenAI) -> None:
    router = RouterProcess(
        env={"OPENAI_API_KEY": "sk-test-key-7Hq2Vw9Lx4"},
        args=["--model", "openai/gpt-4o-mini", "--base-url", fake_openai.base_url],
    )
    with router:
        client = openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "fake says hi to gpt-4o-mini"
        alias = client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert alias.choices[0].message.content


def test_embedded_default_balances_two_mock_deployments() -> None:
    with RouterProcess() as router:
        client = openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)
        seen = set()
        for _ in range(40):
            raw = client.chat.completions.with_raw_response.create(
                model="mock-gpt", messages=[{"role": "user", "content": "hello"}]
            )
            seen.add(raw.headers["x-kubellm-deployment"])
        assert seen == {"mock-a", "mock-b"}
        stream = client.chat.completions.create(
            model="mock-gpt",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "This is a mock response from kubellm. You said: hello"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_several_workers_share_metrics() -> None:
    with RouterProcess(workers=2) as router:
        client = openai.OpenAI(base_url=router.v1, api_key="unused", max_retries=0)
        for _ in range(30):
            client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "hi"}])

        def total() -> float:
            text = http_get(router.base_url + "/metrics")[1].decode()
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("kubellm_requests_total{")
            )

        # Each worker folds its counts at least once a second (see _metrics.Recorder).
        deadline = time.monotonic() + 5
        while total() != 30:
            assert time.monotonic() < deadline, total()
            time.sleep(0.2)


def test_the_asgi_app_serves_model_endpoints_under_any_server(tmp_path: Any) -> None:
    """Under another server (here uvicorn's h11 protocol) the model endpoints take the ASGI path."""
    with h11_router(tmp_path / "state") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        messages: Any = [{"role": "user", "content": "hello"}]
        reply = client.chat.completions.create(model="mock-gpt", messages=messages)
        assert reply.choices[0].message.content == "This is a mock response from kubellm. You said: hello"
        stream = client.chat.completions.create(model="mock-gpt", messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
            "This is a mock response from kubellm. You said: hello"
        )
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=messages)


def test_model_routes_are_named_by_operation_with_and_without_v1() -> None:
    from kubellm.router.config._quickstart import embedded_default
    from kubellm.router.server._app import ConfigSource, create_app

    app = create_app(ConfigSource(config=embedded_default()))
    names = {getattr(r, "path", ""): getattr(r, "name", "") for r in app.routes}
    for path, name in [
        ("/chat/completions", "chat"),
        ("/completions", "completion"),
        ("/embeddings", "embedding"),
        ("/messages", "messages"),
    ]:
        assert names["/v1" + path] == f"{name}_v1"
        assert names[path] == name
