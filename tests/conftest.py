from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.servers import RouterProcess

pytest_plugins = ["tests.support.coverage_matrix"]

UPSTREAM_KEY = "sk-test-key-7Hq2Vw9Lx4"  # no word a router message uses: see router/_redact.py
MASTER_KEY = "sk-master-test-0123456789"


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


def openai_deployment(fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    dep: dict[str, Any] = {
        "model": "gpt-test",
        "provider": "openai-compatible",
        "upstreamModel": "upstream-model",
        "baseUrl": fake.base_url,
        "apiKeyEnv": "TEST_UPSTREAM_KEY",
    }
    dep.update(extra)
    return dep


@pytest.fixture
def start_router() -> Iterator[Callable[..., RouterProcess]]:
    started: list[RouterProcess] = []

    def start(
        config: dict[str, Any] | None = None, *, env: dict[str, str] | None = None, **kwargs: Any
    ) -> RouterProcess:
        proc = RouterProcess(config, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})}, **kwargs)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
