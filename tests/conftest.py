from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.servers import RouterProcess

pytest_plugins = ["tests.support.coverage_matrix"]

#: Support modules that start processes or servers (router processes, Redis, a Kubernetes control
#: plane, nginx): a test module that uses any of them is end-to-end.
_E2E_SUPPORT = (
    "tests.support.servers",
    "tests.support.redis_server",
    "tests.support.redis_cluster",
    "tests.support.kube",
    "tests.support.chaos",
    "tests.support.proxy",
    "tests.support.ledger_crash",
    "tests.support.prometheus",
    "subprocess",
)


def _uses_processes(module: Any) -> bool:
    for value in vars(module).values():
        name = value.__name__ if isinstance(value, type(pytest)) else getattr(value, "__module__", None)
        if isinstance(name, str) and name.startswith(_E2E_SUPPORT):
            return True
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``e2e`` every test that starts processes or servers; the rest is the in-process inner
    loop, ``pytest -m "not e2e"`` (docs/development.md)."""
    seen: dict[str, bool] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        if module.__name__ not in seen:
            seen[module.__name__] = _uses_processes(module)
        if seen[module.__name__] or "start_router" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


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
