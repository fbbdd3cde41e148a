"""Contracts with other libraries' internals, checked against the pinned versions.

The router extends uvicorn's httptools protocol and writes into its request/response cycle
(router/server/_protocol.py, router/server/_direct.py: the server adapter), and folds histogram observations
into prometheus_client's children (router/observability/_metrics.py ``observe_many``). These tests pin what
that code relies on, so that an upgrade that changes it fails here, naming what moved, rather
than somewhere in the end-to-end suites; and they keep the coupling inside those modules.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry, Histogram
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from kubellm.router.server._protocol import GuardedHttpToolsProtocol

ROUTER = Path(__file__).resolve().parent.parent / "router"

#: The only modules allowed to import uvicorn's internals.
SERVER_ADAPTER = {"_protocol.py", "_direct.py", "_supervisor.py"}
#: uvicorn's modules that are not its public API (``uvicorn.run``, ``uvicorn.Config``).
UVICORN_INTERNALS = (
    "uvicorn.protocols",
    "uvicorn.server",
    "uvicorn._types",
    "uvicorn.config",
    "uvicorn.supervisors",
)


def test_uvicorn_is_the_pinned_minor() -> None:
    # pyproject pins uvicorn[standard]>=0.54,<0.55: widen it only with these contracts re-checked.
    assert uvicorn.__version__.startswith("0.54.")


def test_overridden_protocol_methods_keep_their_signatures() -> None:
    overridden = [
        name
        for name, value in vars(GuardedHttpToolsProtocol).items()
        if callable(value) and hasattr(HttpToolsProtocol, name)
    ]
    assert len(overridden) >= 14  # the deadline, draining, 400-as-JSON and fast-path hooks
    for name in overridden:
        ours = list(inspect.signature(getattr(GuardedHttpToolsProtocol, name)).parameters)
        theirs = list(inspect.signature(getattr(HttpToolsProtocol, name)).parameters)
        assert ours == theirs, f"uvicorn's HttpToolsProtocol.{name} now takes {theirs}"


def test_the_replaced_response_complete_is_still_uvicorns() -> None:
    # GuardedHttpToolsProtocol.on_response_complete is uvicorn's with the keep-alive timer swapped
    # for a sweep deadline: if uvicorn's changes, ours must be re-derived from it.
    source = inspect.getsource(HttpToolsProtocol.on_response_complete)
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == "64e254f28e389e7614f2c828176d639174e66aa9d814a4b06624ec86ec0a5b95", source


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_cycle_fields_the_fast_path_reads_and_writes_exist() -> None:
    assert list(inspect.signature(RequestResponseCycle.__init__).parameters) == [
        "self",
        "scope",
        "transport",
        "flow",
        "logger",
        "access_logger",
        "access_log",
        "default_headers",
        "message_event",
        "expect_100_continue",
        "keep_alive",
        "on_response",
    ]
    transport = _Transport()
    flow = FlowControl(transport)
    cycle = RequestResponseCycle(
        {"type": "http", "headers": []},
        transport,
        flow,
        None,
        None,
        False,
        [],
        asyncio.Event(),
        False,
        True,
        lambda: None,
    )
    # router/server/_direct.py reads and assigns these (and nothing else of the cycle).
    for field in (
        "scope",
        "body",
        "more_body",
        "disconnected",
        "message_event",
        "waiting_for_100_continue",
        "transport",
        "keep_alive",
        "response_started",
        "response_complete",
        "default_headers",
        "on_response",
    ):
        assert hasattr(cycle, field), f"RequestResponseCycle has no {field!r} any more"
    for name in ("resume_reading", "drain", "write_paused", "read_paused"):
        assert hasattr(flow, name), f"FlowControl has no {name!r} any more"
    assert STATUS_LINE[200].startswith(b"HTTP/1.1 200")


def test_the_protocol_state_the_adapter_uses_exists() -> None:
    async def main() -> None:
        async def app(scope: object, receive: object, send: object) -> None:
            raise AssertionError("not called")

        config = uvicorn.Config(app, lifespan="off", log_config=None)
        config.load()
        from uvicorn.server import ServerState

        protocol = GuardedHttpToolsProtocol(config, ServerState(), {})
        protocol.connection_made(_Transport())
        for name in (
            "transport",
            "flow",
            "pipeline",
            "cycle",
            "tasks",
            "connections",
            "server_state",
            "timeout_keep_alive",
            "scheme",
            "loop",
            "app",
        ):
            assert hasattr(protocol, name), f"HttpToolsProtocol has no {name!r} any more"
        assert callable(protocol._unset_keepalive_if_required)
        protocol.connection_lost(None)

    asyncio.run(main())


def test_prometheus_histogram_children_keep_the_fields_observe_many_folds_into() -> None:
    child = Histogram("contract_seconds", "x", ["a"], registry=CollectorRegistry()).labels("x")
    assert isinstance(child._upper_bounds, list)
    assert hasattr(child._sum, "inc")
    assert all(hasattr(b, "inc") for b in child._buckets)
    assert len(child._buckets) == len(child._upper_bounds)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_only_the_server_adapter_imports_uvicorn_internals() -> None:
    offenders = [
        str(path.relative_to(ROUTER))
        for path in ROUTER.rglob("*.py")
        if path.name not in SERVER_ADAPTER
        and any(name.startswith(UVICORN_INTERNALS) for name in _imports(path))
    ]
    assert offenders == []


def test_only_observe_many_touches_histogram_internals() -> None:
    offenders = [
        str(path.relative_to(ROUTER))
        for path in ROUTER.rglob("*.py")
        if path.name != "_metrics.py"
        and ("._upper_bounds" in path.read_text() or "._sum.inc" in path.read_text())
    ]
    assert offenders == []
