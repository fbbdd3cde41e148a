"""Security, end to end: authentication, authorisation, path tricks, secrets, SSRF and TLS.

Every case runs against a real router process; the clients are the openai SDK and raw sockets
(which, unlike the SDK, send paths exactly as written: ``//``, ``..``, ``%2e%2e``).
"""

from __future__ import annotations

import http.client
import inspect
import signal
import socket
import ssl
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import redis
from aiohttp import web

from kubellm.router.config._schema import parse_config
from kubellm.router.core import _state
from kubellm.router.core._state import build_state, hash_key
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, openai_deployment
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.otlp_collector import FakeCollector
from tests.fakes.sink_receivers import FakeWebhook
from tests.support.proxy import ForwardProxy
from tests.support.redis_server import RedisServer
from tests.support.servers import RouterProcess, ThreadedApp, http_get
from tests.support.tls import certificates

MESSAGES: Any = [{"role": "user", "content": "hi"}]
KEYS = {
    "TEAM_KEY": "sk-sec-team-0123456789abcdef",
    "NARROW_KEY": "sk-sec-narrow-0123456789abcdef",
    "BUDGET_KEY": "sk-sec-budget-0123456789abcdef",
    "OLD_KEY": "sk-sec-old-0123456789abcdef",
    "OFF_KEY": "sk-sec-off-0123456789abcdef",
}
HASHED_KEY = "sk-sec-hashed-0123456789abcdef"  # configured by its SHA-256 only


def _keys() -> list[dict[str, Any]]:
    return [
        {"name": "team", "keyEnv": "TEAM_KEY", "logPayloads": True},
        {"name": "narrow", "keyEnv": "NARROW_KEY", "models": ["cheap"]},
        {"name": "budget", "keyEnv": "BUDGET_KEY", "budget": {"amountUsd": "0", "period": "daily"}},
        {"name": "old", "keyEnv": "OLD_KEY", "expiresAt": "2020-01-01T00:00:00Z"},
        {"name": "off", "keyEnv": "OFF_KEY", "disabled": True},
        {"name": "hashed", "keyHash": hash_key(HASHED_KEY)},
    ]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def router(upstream: FakeOpenAI) -> Iterator[RouterProcess]:
    config = {
        "deployments": [
            openai_deployment(
                upstream, name="dear", pricing={"inputPerMillion": "1", "outputPerMillion": "2"}
            ),
            {"name": "cheap", "model": "cheap", "provider": "mock"},
        ],
        "keys": _keys(),
        "settings": {"numRetries": 0},
    }
    env = {**KEYS, "TEST_UPSTREAM_KEY": UPSTREAM_KEY, "KUBELLM_MASTER_KEY": MASTER_KEY}
    with RouterProcess(config, env=env) as proc:
        yield proc


def request(
    router: RouterProcess, method: str, path: str, key: str | None = None, body: bytes | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """One request with the path sent exactly as written."""
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def error_of(raw: bytes) -> dict[str, Any]:
    error = orjson.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


CHAT = orjson.dumps({"model": "gpt-test", "messages": MESSAGES})


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_api_key"),
        ({"Authorization": ""}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer"}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer    "}, 401, "invalid_api_key"),
        ({"Authorization": f"Basic {KEYS['TEAM_KEY']}"}, 401, "invalid_api_key"),
        ({"Authorization": f"Token {KEYS['TEAM_KEY']}"}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEYS['TEAM_KEY']}x"}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEYS['TEAM_KEY'][:-1]}"}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEYS['TEAM_KEY'].upper()}"}, 401, "invalid_api_key"),
        (
            {"Authorization": f"Bearer {hash_key(KEYS['TEAM_KEY'])}"},
            401,
            "invalid_api_key",
        ),  # the hash is no key
        ({"Authorization": f"Bearer {hash_key(HASHED_KEY)}"}, 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEYS['OLD_KEY']}"}, 401, "key_expired"),
        ({"Authorization": f"Bearer {KEYS['OFF_KEY']}"}, 401, "key_disabled"),
        ({"api-key": KEYS["OFF_KEY"]}, 401, "key_disabled"),  # Azure-style header: same checks
        ({"x-api-key": KEYS["OLD_KEY"]}, 401, "key_expired"),  # Anthropic-style header: same checks
        ({"Authorization": f"Bearer {KEYS['BUDGET_KEY']}"}, 429, "budget_exceeded"),
        ({"Authorization": f"Bearer {KEYS['NARROW_KEY']}"}, 403, "permission_denied"),
        (
            {"Authorization": f"Bearer {KEYS['NARROW_KEY']}", "x-kubellm-fallbacks": "gpt-test"},
            403,
            "permission_denied",
        ),
        ({"Authorization": f"Bearer {KEYS['TEAM_KEY']}"}, 200, None),
        ({"Authorization": f"bearer {KEYS['TEAM_KEY']}"}, 200, None),  # the scheme is case-insensitive
        ({"Authorization": f"Bearer {HASHED_KEY}"}, 200, None),
        ({"Authorization": f"Bearer {MASTER_KEY}"}, 200, None),
    ],
    ids=lambda v: repr(v)[:60],
)
def test_authentication_table(
    router: RouterProcess, upstream: FakeOpenAI, headers: dict[str, str], status: int, code: str | None
) -> None:
    before = upstream.calls
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    conn.request(
        "POST", "/v1/chat/completions", body=CHAT, headers={"Content-Type": "application/json", **headers}
    )
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    assert resp.status == status, raw
    if status != 200:
        assert error_of(raw)["code"] == code
        assert upstream.calls == before  # refused before anything reached the upstream
        for value in headers.values():
            if len(value) > 12:
                assert value.split()[-1] not in raw.decode(), "the presented key is echoed"


def test_a_narrow_key_cannot_reach_other_models_through_fallbacks(upstream: FakeOpenAI) -> None:
    """x-kubellm-fallbacks named groups the key may not use: when the allowed group failed, the
    request was served by the forbidden one. Now a named forbidden group is a 403 up front."""
    with FakeOpenAI(UPSTREAM_KEY, "secret") as secret:
        config = {
            "deployments": [
                openai_deployment(secret, name="secret", model="secret"),
                openai_deployment(upstream, name="allowed", model="allowed"),
            ],
            "keys": [{"name": "narrow", "keyEnv": "NARROW_KEY", "models": ["allowed"]}],
            "settings": {"numRetries": 0},
        }
        with RouterProcess(config, env={**KEYS, "TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as proc:
            client = openai.OpenAI(base_url=proc.v1, api_key=KEYS["NARROW_KEY"], max_retries=0)
            upstream.queue(Fault(status=503))
            with pytest.raises(openai.PermissionDeniedError) as info:
                client.chat.completions.create(
                    model="allowed", messages=MESSAGES, extra_headers={"x-kubellm-fallbacks": "secret"}
                )
            assert info.value.body["param"] == "x-kubellm-fallbacks"  # type: ignore[index]
            assert secret.calls == 0
            upstream.faults.clear()
            # Naming only allowed (or unknown) groups is fine.
            answer = client.chat.completions.create(
                model="allowed", messages=MESSAGES, extra_headers={"x-kubellm-fallbacks": "allowed,nope"}
            )
            assert answer.choices[0].message.content
            assert secret.calls == 0


# --------------------------------------------------------------------------- paths and methods


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/admin/spend", 403),
        ("GET", "//admin/spend", 404),
        ("GET", "/admin//spend", 404),
        ("GET", "/admin/spend/", 404),
        ("GET", "/ADMIN/spend", 404),
        ("GET", "/Admin/Spend", 404),
        ("GET", "/v1/../admin/spend", 404),
        ("GET", "/v1/%2e%2e/admin/spend", 404),
        ("GET", "/v1/%2E%2E/admin/spend", 404),
        ("GET", "/v1/..%2fadmin/spend", 404),
        ("GET", "/v1/models/..%2f..%2fadmin%2fspend", 404),
        ("GET", "/admin/spend%00", 404),
        ("GET", "/admin/spend;x=1", 404),
        ("GET", "/admin/spend?by=key&since=0", 403),
        ("POST", "/admin/spend", 405),
        ("HEAD", "/admin/spend", 405),
        ("OPTIONS", "/admin/spend", 405),
        ("DELETE", "/admin/spend", 405),
    ],
)
def test_admin_paths_never_open_to_a_virtual_key(
    router: RouterProcess, method: str, path: str, status: int
) -> None:
    got, raw, _ = request(router, method, path, KEYS["TEAM_KEY"])
    assert got == status, raw[:300]
    if method != "HEAD":
        error_of(raw)
    # And without any key, never more than a 401/404/405.
    got, _, _ = request(router, method, path)
    assert got in (401, 404, 405)
    # The master key does get it, on the one real path.
    if (method, path.partition("?")[0]) == ("GET", "/admin/spend"):
        assert request(router, method, path, MASTER_KEY)[0] == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("HEAD", "/v1/chat/completions", 405),
        ("OPTIONS", "/v1/chat/completions", 405),
        ("PUT", "/v1/chat/completions", 405),
        ("PATCH", "/v1/chat/completions", 405),
        ("DELETE", "/v1/chat/completions", 405),
        ("GET", "/v1/chat/completions", 405),
        ("TRACE", "/v1/chat/completions", 405),
        ("POST", "/v1/chat/completions/", 404),
        ("POST", "//v1/chat/completions", 404),
        ("POST", "/V1/chat/completions", 404),
        ("POST", "/v1/Chat/Completions", 404),
        ("POST", "/v1/chat/completions%2f", 404),
        ("POST", "/v1/./chat/completions", 404),
        ("PUT", "/v1/embeddings", 405),
        ("POST", "/v1/models", 405),
    ],
)
def test_model_endpoint_tricks(
    router: RouterProcess, upstream: FakeOpenAI, method: str, path: str, status: int
) -> None:
    before = upstream.calls
    for key in (None, KEYS["NARROW_KEY"], KEYS["OFF_KEY"]):
        got, raw, headers = request(router, method, path, key, CHAT)
        assert got == status, (key, raw[:300])
        assert "location" not in headers
        if method != "HEAD":
            error_of(raw)
    assert upstream.calls == before


def test_models_list_shows_only_what_a_key_may_use(router: RouterProcess) -> None:
    narrow = openai.OpenAI(base_url=router.v1, api_key=KEYS["NARROW_KEY"], max_retries=0)
    assert [m.id for m in narrow.models.list()] == ["cheap"]
    with pytest.raises(openai.NotFoundError):
        narrow.models.retrieve("gpt-test")
    status, _, _ = request(router, "GET", "/v1/models", KEYS["OFF_KEY"])
    assert status == 401


# --------------------------------------------------------------------------- constant time


def test_keys_are_compared_as_hashes_in_constant_time() -> None:
    """The presented key is hashed once; the master hash is compared with hmac.compare_digest, and
    virtual keys are found by the dict lookup of that SHA-256 (which leaks nothing usable: timing
    tells at most how many leading bytes of two unrelated digests match). No raw key is kept."""
    source = inspect.getsource(_state.RouterState.find_key)
    assert "hashlib.sha256(presented.encode()).digest()" in source
    assert "hmac.compare_digest(digest, self.master_key_hash)" in source
    assert "self.keys.get(digest)" in source
    assert "==" not in source  # no short-circuit comparison of secrets anywhere in it
    config = parse_config({"keys": [{"name": "k", "keyHash": hash_key(HASHED_KEY)}]})
    state = build_state(config)
    assert all(len(k) == 32 for k in state.keys)  # SHA-256 digests, never the keys themselves
    assert state.find_key(HASHED_KEY)[1] is not None and state.find_key(HASHED_KEY[:-1] + "X") == (
        False,
        None,
    )


def test_lookup_time_does_not_depend_on_how_much_of_the_key_is_right() -> None:
    """A coarse, in-process timing check (network timing on a shared 2-core CI machine is noise):
    the median time of a lookup that matches every byte but the last is within 2x of one that
    matches none. Interleaved rounds and medians keep it stable under load."""
    key = "sk-" + "a" * 61
    state = build_state(parse_config({"keys": [{"name": "k", "keyHash": hash_key(key)}]}))
    near, far = key[:-1] + "b", "sk-" + "z" * 61

    def timed(candidate: str) -> float:
        started = time.perf_counter_ns()
        for _ in range(2000):
            state.find_key(candidate)
        return float(time.perf_counter_ns() - started)

    rounds = [(timed(near), timed(far)) for _ in range(15)]
    ratio = statistics.median(n for n, _ in rounds) / statistics.median(f for _, f in rounds)
    assert 0.5 < ratio < 2.0, ratio


# --------------------------------------------------------------------------- secrets


class PasswordRedis(RedisServer):
    """redis-server with ``requirepass``."""

    def __init__(self, password: str) -> None:
        super().__init__()
        self.password = password

    def start(self) -> PasswordRedis:
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        cmd += ["--dir", str(self.dir), "--requirepass", self.password]
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_ping()
        return self

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                time.sleep(0.02)
                return b"+PONG" in sock.recv(64)
        except OSError:
            return False


def test_no_secret_appears_in_any_output(tmp_path: Path) -> None:
    """Every kind of secret configured at once, every output grepped: logs at debug level, metrics,
    readiness, every error body and response header, the sinks' deliveries, the OTLP export, the
    local ledger journal, and every key and value the router wrote to Redis."""
    secrets = {
        **KEYS,
        "UPSTREAM": UPSTREAM_KEY,
        "UPSTREAM_FILE": "sk-sec-upstream-file-0123456789",
        "UPSTREAM_INLINE": "sk-sec-upstream-inline-0123456789",
        "MASTER": MASTER_KEY,
        "HASHED": HASHED_KEY,
        "REDIS_PASSWORD": "redis-sec-password-0123456789",
        "HOOK_TOKEN": "hook-sec-token-0123456789",
        "OTEL_TOKEN": "otel-sec-token-0123456789",
        "UNKNOWN": "sk-sec-unknown-0123456789",
    }
    key_file = tmp_path / "upstream.key"
    key_file.write_text(secrets["UPSTREAM_FILE"])
    with (
        PasswordRedis(secrets["REDIS_PASSWORD"]) as redis_server,
        FakeOpenAI(UPSTREAM_KEY, "env") as by_env,
        FakeOpenAI(secrets["UPSTREAM_FILE"], "file") as by_file,
        FakeOpenAI(secrets["UPSTREAM_INLINE"], "inline") as inline,
        FakeWebhook(value=f"Bearer {secrets['HOOK_TOKEN']}") as hook,
        FakeCollector(required_headers={"Authorization": f"Bearer {secrets['OTEL_TOKEN']}"}) as collector,
    ):
        pricing = {"inputPerMillion": "1", "outputPerMillion": "2"}
        config = {
            "deployments": [
                openai_deployment(by_env, name="env", pricing=pricing),
                {
                    **openai_deployment(by_file, name="file", model="file"),
                    "apiKeyEnv": None,
                    "apiKeyFile": str(key_file),
                },
                {
                    **openai_deployment(inline, name="inline", model="inline"),
                    "apiKeyEnv": None,
                    "apiKey": secrets["UPSTREAM_INLINE"],
                },
            ],
            "keys": _keys(),
            "settings": {
                "numRetries": 0,
                "redis": {"url": redis_server.url, "passwordEnv": "REDIS_PASSWORD"},
                "sinks": [
                    {
                        "type": "webhook",
                        "url": hook.url,
                        "headersEnv": "HOOK_HEADERS",
                        "flushIntervalSeconds": 0.2,
                        "includePayloads": True,
                    }
                ],
                "otel": {"endpoint": collector.endpoint, "headersEnv": "OTEL_HEADERS"},
            },
        }
        deployments: list[dict[str, Any]] = config["deployments"]  # type: ignore[assignment]
        config["deployments"] = [{k: v for k, v in d.items() if v is not None} for d in deployments]
        env = {
            **KEYS,
            "TEST_UPSTREAM_KEY": UPSTREAM_KEY,
            "KUBELLM_MASTER_KEY": MASTER_KEY,
            "REDIS_PASSWORD": secrets["REDIS_PASSWORD"],
            "HOOK_HEADERS": orjson.dumps({"Authorization": f"Bearer {secrets['HOOK_TOKEN']}"}).decode(),
            "OTEL_HEADERS": orjson.dumps({"Authorization": f"Bearer {secrets['OTEL_TOKEN']}"}).decode(),
        }
        outputs: list[str] = []
        with RouterProcess(config, env=env, args=["--log-level", "debug"]) as router:
            presented = [*KEYS.values(), MASTER_KEY, HASHED_KEY, secrets["UNKNOWN"]]
            for key in presented:
                client = openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0)
                for model in ("gpt-test", "file", "inline", "nope"):
                    for stream in (False, True):
                        try:
                            raw = client.chat.completions.with_raw_response.create(
                                model=model, messages=MESSAGES, stream=stream
                            )
                            outputs += [str(raw.headers), raw.http_response.read().decode()]
                        except openai.APIStatusError as exc:
                            outputs += [exc.response.text, str(exc.response.headers)]
                for path in ("/v1/models", "/v1/key/info", "/admin/spend", "/v1/models/gpt-test"):
                    _status, body = http_get(router.base_url + path, {"Authorization": f"Bearer {key}"})
                    outputs.append(body.decode())
            # Upstream failures, including an upstream that quotes the credential back.
            team = openai.OpenAI(base_url=router.v1, api_key=KEYS["TEAM_KEY"], max_retries=0)
            # The 401 goes last: it keeps the deployment out, so later faults would not be reached.
            for fault in (
                Fault(status=400, body={"error": {"message": f"key {UPSTREAM_KEY} may not do that"}}),
                Fault(status=500, body={"error": {"message": f"crash while using {UPSTREAM_KEY}"}}),
                Fault(status=429, body={"error": {"message": f"{UPSTREAM_KEY} is rate limited"}}),
                Fault(status=401, body={"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEY}"}}),
            ):
                by_env.queue(fault)
                with pytest.raises(openai.APIStatusError) as info:
                    team.chat.completions.create(model="gpt-test", messages=MESSAGES)
                outputs += [info.value.response.text, str(info.value.response.headers)]
            # Malformed requests and unknown routes.
            for body in (b"{", b"[]", orjson.dumps({"model": "gpt-test"}), b"x" * 10):
                outputs.append(
                    request(router, "POST", "/v1/chat/completions", KEYS["TEAM_KEY"], body)[1].decode()
                )
            outputs.append(request(router, "GET", "/nothing", KEYS["TEAM_KEY"])[1].decode())
            outputs.append(http_get(router.base_url + "/metrics")[1].decode())
            outputs.append(http_get(router.base_url + "/health/readiness")[1].decode())
            hook.wait_for(4)
            collector.wait_for_spans(4)
            time.sleep(0.5)
            # Redis: every key name and value the router wrote.
            client_r = redis.Redis(
                host="127.0.0.1", port=redis_server.port, password=secrets["REDIS_PASSWORD"]
            )
            for name in client_r.scan_iter(count=1000):
                outputs.append(str(name))
                kind = str(client_r.type(name))
                outputs.append(str(client_r.dump(name)))
                if "stream" in kind:
                    outputs.append(str(client_r.xrange(name)))
            client_r.close()
        outputs.append(router.logs())
        outputs += [b.decode(errors="replace") for b in hook.bodies]
        outputs += [e.body.decode(errors="replace") for e in collector.exports]
        state_dir = router.dir / "state"
        outputs += [
            p.read_text(errors="replace")
            for p in state_dir.rglob("*")
            if p.is_file() and p.suffix != ".sqlite"
        ]
    everything = "\n".join(outputs)
    logs = router.logs()
    assert '"request":{"model":"gpt-test"' in logs  # per-request lines, with payloads, were written
    for name, secret in secrets.items():
        assert secret not in everything, name
    assert "[redacted]" in everything  # the upstream that quoted its credential was redacted


# --------------------------------------------------------------------------- SSRF


class Attacker:
    """A server a client would like the router to call; it must receive nothing."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.server = ThreadedApp(app)

    async def _any(self, request: web.Request) -> web.Response:
        self.hits.append(f"{request.method} {request.path}")
        return web.json_response({"id": "owned", "choices": []})

    @property
    def url(self) -> str:
        return self.server.base_url + "/v1"


def test_a_request_cannot_make_the_router_call_a_url_of_its_choosing(router: RouterProcess) -> None:
    attacker = Attacker()
    with attacker.server:
        target = attacker.url
        key = KEYS["TEAM_KEY"]
        # Fields with which other routers let a request pick the upstream: refused, naming the field.
        for operation, base in (
            ("/v1/chat/completions", {"model": "gpt-test", "messages": MESSAGES}),
            ("/v1/completions", {"model": "gpt-test", "prompt": "hi"}),
            ("/v1/embeddings", {"model": "gpt-test", "input": "hi"}),
        ):
            for field in ("api_base", "base_url"):
                status, raw, _ = request(
                    router, "POST", operation, key, orjson.dumps({**base, field: target})
                )
                assert status == 400 and error_of(raw)["param"] == field, raw
        # A URL as the model name, or as a fallback group, is just an unknown name.
        status, raw, _ = request(
            router, "POST", "/v1/chat/completions", key, orjson.dumps({"model": target, "messages": MESSAGES})
        )
        assert status == 404 and error_of(raw)["code"] == "model_not_found"
        client = openai.OpenAI(base_url=router.v1, api_key=key, max_retries=0)
        for headers in (
            {"x-kubellm-fallbacks": target},
            {"x-kubellm-base-url": target, "x-kubellm-api-base": target, "X-Forwarded-Host": "127.0.0.1"},
            {"Host": target.split("//")[1].split("/")[0], "X-Forwarded-Proto": "http"},
            {"x-api-base": target, "openai-base-url": target},
        ):
            answer = client.chat.completions.create(
                model="gpt-test", messages=MESSAGES, extra_headers=headers
            )
            assert answer.id != "owned"
        # URLs inside the content are the upstream's business: the router passes them on, unfetched.
        image: Any = [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": target + "/x.png"}},
        ]
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": image}])
        # The Anthropic-format endpoint drops what it does not know.
        status, _, _ = request(
            router,
            "POST",
            "/v1/messages",
            key,
            orjson.dumps(
                {
                    "model": "gpt-test",
                    "max_tokens": 5,
                    "messages": MESSAGES,
                    "api_base": target,
                    "base_url": target,
                }
            ),
        )
        assert status == 200
        time.sleep(0.2)
    assert attacker.hits == []


# --------------------------------------------------------------------------- TLS


def test_tls_with_a_given_certificate(upstream: FakeOpenAI, tmp_path: Path) -> None:
    ca, cert, key = certificates(tmp_path)
    config = {"deployments": [openai_deployment(upstream)]}
    proc = RouterProcess(
        config,
        env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY, "KUBELLM_MASTER_KEY": MASTER_KEY},
        args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
    )
    proc.start(wait=False)
    try:
        trusted = ssl.create_default_context(cafile=str(ca))
        url = f"https://127.0.0.1:{proc.port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", proc.port, context=trusted, timeout=2)
                conn.request("GET", "/health/readiness")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, proc.logs()
            time.sleep(0.1)
        http_client = openai.DefaultHttpxClient(verify=trusted)
        client = openai.OpenAI(
            base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0, http_client=http_client
        )
        assert client.chat.completions.create(model="gpt-test", messages=MESSAGES).choices[0].message.content
        stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        # A client that does not trust the CA refuses the connection.
        untrusting = openai.OpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            untrusting.chat.completions.create(model="gpt-test", messages=MESSAGES)
        # Plain HTTP on the TLS port is not served, and leaves the router serving.
        with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
            sock.sendall(b"GET /health/readiness HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = sock.recv(200)
            except ConnectionResetError:
                answer = b""
        assert b"200 OK" not in answer
        assert client.models.list().data
        # Idle TLS connections (the client's pool keeps one) do not hold a shutdown for the whole
        # grace period waiting for a close_notify the client never sends: they were, 30 s by default.
        started = time.monotonic()
        assert proc.stop() in (0, -signal.SIGTERM)  # a clean exit (uvicorn re-raises the signal)
        assert time.monotonic() - started < 5
    finally:
        proc.stop()


def _tls_fake(directory: Path, *names: str) -> tuple[FakeOpenAI, Path]:
    """A fake OpenAI upstream over TLS (certificate for 127.0.0.1, localhost and ``names``), and its CA."""
    ca, cert, key = certificates(directory, *names)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    fake.server = ThreadedApp(fake.server.app, ssl_context=server_context)
    return fake, ca


def _chat_and_stream(proc: RouterProcess) -> None:
    client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert answer.choices[0].message.content
    stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_https_upstream_is_verified_against_the_trusted_cas(tmp_path: Path) -> None:
    """Upstreams over TLS: verified with the system's CA store, which SSL_CERT_FILE replaces."""
    fake, ca = _tls_fake(tmp_path)
    with fake:
        assert fake.base_url.startswith("https://")
        config = {"deployments": [openai_deployment(fake)]}
        env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY}
        with RouterProcess(config, env={**env, "SSL_CERT_FILE": str(ca)}) as proc:
            _chat_and_stream(proc)
        assert len(fake.seen) == 2
        # Without the test CA the upstream's certificate is not trusted: a clear 502, no request.
        with RouterProcess(config, env=env) as proc:
            client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model="gpt-test", messages=MESSAGES)
            assert caught.value.status_code == 502
            assert "TLS" in caught.value.message
        assert len(fake.seen) == 2


def test_upstreams_through_the_https_proxy_of_the_environment(tmp_path: Path) -> None:
    """HTTPS_PROXY as Kubernetes pods get it: the upstream's name is resolved by the proxy only."""
    fake, ca = _tls_fake(tmp_path, "upstream.test")
    with fake, ForwardProxy({"upstream.test": fake.server.port}) as proxy:
        deployment = openai_deployment(fake, baseUrl=f"https://upstream.test:{fake.server.port}/v1")
        env = {
            "TEST_UPSTREAM_KEY": UPSTREAM_KEY,
            "SSL_CERT_FILE": str(ca),
            "HTTPS_PROXY": proxy.url,
            "NO_PROXY": "other.example",
        }
        with RouterProcess({"deployments": [deployment]}, env=env) as proc:
            _chat_and_stream(proc)
        assert len(fake.seen) == 2
        assert set(proxy.lines) == {f"CONNECT upstream.test:{fake.server.port} HTTP/1.1"}


# --------------------------------------------------------------------------- quoted credentials

LEAK_KEY = "sk-leak-9fQ2mZr7XkP4wL8sTb3nVy6Hc1Jd"
LEAK_HEADER = "hdr-secret-Yt5Rw2Qe8Ui4Op7As"
LEAK_ANTHROPIC = "sk-ant-leak-Gm4Nb7Vc2Xz9Lk5Jh3"


def _leak_cases(key: str) -> dict[str, tuple[int, Any]]:
    """Upstream error answers, by mode, each quoting ``key`` (or a piece of it) somewhere."""
    return {
        "message": (
            400,
            {"error": {"message": f"Incorrect API key provided: {key}", "type": "x", "code": None}},
        ),
        "code": (404, {"error": {"message": "no such model", "type": "invalid_request_error", "code": key}}),
        "type": (500, {"error": {"message": "boom", "type": key}}),
        "param": (400, {"error": {"message": "bad", "param": key, "code": "bad_param"}}),
        "nested": (500, {"error": {"message": {"detail": [{"msg": key}]}}}),
        "suffix": (400, {"error": {"message": f"key ending in {key[-12:]}", "code": key[-12:]}}),
        "halves": (403, {"error": {"message": f"{key[:8]}...{key[-8:]} may not", "code": "denied"}}),
        "header": (500, {"error": {"message": f"bad header {LEAK_HEADER}", "code": LEAK_HEADER}}),
        "auth": (401, {"error": {"message": f"invalid {key}"}}),
        "limited": (429, {"error": {"message": f"{key} is rate limited"}}),
        "text": (502, f"proxy error talking with {key}"),
    }


class QuotingUpstream:
    """OpenAI- and Anthropic-shaped upstream whose errors quote the credential it was sent.

    The mode is the last user message; stream modes send a few chunks, then an error event.
    """

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        self.server = ThreadedApp(app)

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        mode = body["messages"][-1]["content"]
        if body.get("stream") and mode.startswith("stream"):
            return await self._openai_stream(request, mode)
        status, doc = _leak_cases(LEAK_KEY)[mode.removeprefix("stream-")]
        headers = {"Retry-After": LEAK_KEY, "x-upstream-key": LEAK_KEY}
        if isinstance(doc, str):
            return web.Response(status=status, text=doc, headers=headers)
        return web.json_response(doc, status=status, headers=headers)

    async def _openai_stream(self, request: web.Request, mode: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-upstream-key": LEAK_KEY})
        await resp.prepare(request)
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        if mode != "stream-first":
            for delta in ({"role": "assistant", "content": ""}, {"content": "partial"}):
                chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        error = {"message": f"generation failed for {LEAK_KEY}", "type": LEAK_KEY, "code": LEAK_KEY[-12:]}
        await resp.write(b"data: " + orjson.dumps({"error": error, "detail": {"key": LEAK_KEY}}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            doc = {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": f"key {LEAK_ANTHROPIC}"},
            }
            return web.json_response(doc, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        message = {"id": "m", "type": "message", "role": "assistant", "model": "c", "content": [],
                   "usage": {"input_tokens": 3, "output_tokens": 1}}  # fmt: skip
        for name, doc in (
            ("message_start", {"message": message}),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "partial"}}),
            (
                "error",
                {"error": {"type": "overloaded_error", "message": f"{LEAK_ANTHROPIC[-12:]} overloaded"}},
            ),
        ):
            await resp.write(
                f"event: {name}\ndata: ".encode() + orjson.dumps({"type": name, **doc}) + b"\n\n"
            )
        return resp


def _pieces_of(secret: str) -> list[str]:
    return [secret[i : i + 8] for i in range(len(secret) - 7)]


COOLDOWN = 0.2


def test_no_piece_of_a_quoted_credential_reaches_any_output() -> None:
    """Redaction rewrote error.message only, and only the whole key: error.code (and type, copied
    into code) reached the client whole, as did a quoted 12-character suffix and every in-stream
    error event. Every field, every stream event and every log line is scrubbed now."""
    upstream = QuotingUpstream()
    with upstream.server:
        config = {
            "deployments": [
                {
                    "model": "leaky", "provider": "openai-compatible",
                    "baseUrl": upstream.server.base_url + "/v1",
                    "apiKey": LEAK_KEY, "headers": {"X-Custom-Auth": LEAK_HEADER}, "logPayloads": True,
                },
                {
                    "model": "claude-leaky", "provider": "anthropic", "baseUrl": upstream.server.base_url,
                    "apiKey": LEAK_ANTHROPIC,
                },
            ],
            "settings": {
                "numRetries": 0, "cooldown": {"failureThreshold": 1000, "cooldownSeconds": COOLDOWN},
            },
        }  # fmt: skip
        outputs: list[str] = []
        with RouterProcess(config, args=["--log-level", "debug"]) as router:
            client = openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0)
            claude = anthropic.Anthropic(base_url=router.base_url, api_key="x", max_retries=0)
            # A 401/403 keeps the deployment out for cooldownSeconds (the rejection is remembered):
            # those cases go last, each after the cooldown, so every case reaches the upstream.
            rejected = ("halves", "auth")
            modes = [m for m in _leak_cases(LEAK_KEY) if m not in rejected] + list(rejected)
            for mode in modes:
                messages: Any = [{"role": "user", "content": mode}]
                if mode in rejected:
                    time.sleep(COOLDOWN * 2)
                with pytest.raises(openai.APIStatusError) as info:
                    client.chat.completions.create(model="leaky", messages=messages)
                outputs += [info.value.response.text, str(info.value.response.headers)]
                if mode in rejected:
                    time.sleep(COOLDOWN * 2)
                with pytest.raises(anthropic.APIStatusError) as caught:
                    claude.messages.create(model="leaky", max_tokens=5, messages=messages)
                outputs += [caught.value.response.text, str(caught.value.response.headers)]
            time.sleep(COOLDOWN * 2)
            for mode in ("stream-mid", "stream-first"):
                messages = [{"role": "user", "content": mode}]
                for path, body in (
                    ("/v1/chat/completions", {"model": "leaky", "messages": messages, "stream": True}),
                    (
                        "/v1/messages",
                        {"model": "leaky", "max_tokens": 5, "messages": messages, "stream": True},
                    ),
                    ("/v1/chat/completions", {"model": "claude-leaky", "messages": messages, "stream": True}),
                    ("/v1/messages", {"model": "claude-leaky", "max_tokens": 5, "messages": messages}),
                ):
                    status, raw, headers = request(router, "POST", path, None, orjson.dumps(body))
                    assert status in (200, 400, 502), raw
                    outputs += [raw.decode(errors="replace"), str(headers)]
                with pytest.raises(openai.APIError) as err:  # a 502, or an error event mid-stream
                    list(client.chat.completions.create(model="leaky", messages=messages, stream=True))
                outputs += [str(err.value.body), err.value.message]
            time.sleep(0.3)  # the access log is written in batches
        logs = router.logs()
    everything = "\n".join([*outputs, logs])
    assert '"request":{"model":"leaky"' in logs  # the payload-logging access lines were written
    assert "[redacted]" in everything
    for secret in (LEAK_KEY, LEAK_HEADER, LEAK_ANTHROPIC):
        leaked = [p for p in _pieces_of(secret) if p in everything]
        assert not leaked, (secret, leaked)
