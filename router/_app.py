"""The ASGI application: routes, error rendering, lifespan and config reload."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from . import _metrics as metrics
from ._anthropic_inbound import handle_messages
from ._cache import RedisCache
from ._config import ConfigError, RedisSettings, RouterConfig, load_config
from ._errors import KubellmError, ModelNotFoundError, error_body
from ._health import RedisHealthStore
from ._proxy import JSON, Router, authenticate, error_response
from ._redis import connect as connect_redis
from ._state import build_state
from .providers import Operation

log = logging.getLogger("kubellm.router")


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the config comes from: a file that is watched, or a fixed document."""

    path: Path | None = None
    config: RouterConfig | None = None

    def load(self) -> RouterConfig:
        if self.path is not None:
            return load_config(self.path)
        assert self.config is not None
        return self.config


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        # Kubernetes swaps mounted ConfigMaps through a symlink, which changes the inode.
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


async def _watch_config(router: Router, source: ConfigSource) -> None:
    assert source.path is not None
    path = source.path
    seen = _file_signature(path)
    while True:
        await asyncio.sleep(router.state.config.settings.reload_interval_seconds)
        current = _file_signature(path)
        if current == seen or current is None:
            continue
        seen = current
        try:
            state = build_state(load_config(path))
        except ConfigError as err:
            metrics.CONFIG_RELOADS.labels("invalid").inc()
            log.error(
                "config reload rejected, still serving version %s: %s", router.state.version, err.message
            )
            continue
        if state.version == router.state.version:
            continue
        old = router.state.version
        router.state = state
        metrics.set_config_version(old, state.version)
        metrics.CONFIG_RELOADS.labels("applied").inc()
        log.info("config reloaded: version %s -> %s", old, state.version)


def redis_url(settings: RedisSettings) -> str | None:
    url = settings.url or (os.environ.get(settings.url_env) if settings.url_env else None)
    if not url:
        return None
    password = os.environ.get(settings.password_env) if settings.password_env else None
    if password:
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://:{quote(password, safe='')}@{rest}"
    return url


def _connect_shared_state(router: Router) -> Redis | None:
    """Move breakers and the cache to Redis when it is configured (read once, at start)."""
    settings = router.state.config.settings.redis
    url = redis_url(settings)
    if url is None:
        return None
    client = connect_redis(url)
    router.health.store = RedisHealthStore(client, settings.key_prefix)
    router.cache = router.dispatcher.cache = RedisCache(
        client, router.state.config.settings.cache, settings.key_prefix
    )
    return client


def _drain_on_sigterm(router: Router) -> None:
    """On SIGTERM: report not-ready at once, keep serving for the drain delay, then let uvicorn shut down.

    uvicorn's own handler (installed around the app's lifetime) stops accepting and waits for
    in-flight requests, streams included, for ``--grace-period`` seconds.
    """
    uvicorn_handler = signal.getsignal(signal.SIGTERM)
    if not callable(uvicorn_handler):
        return
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        router.draining = True
        delay = router.state.config.settings.drain_delay_seconds
        log.info("SIGTERM: draining; readiness is false, shutting down in %.1fs", delay)
        loop.call_soon_threadsafe(loop.call_later, delay, uvicorn_handler, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON)


_REQUEST_SCHEMA = {"type": "object", "required": ["model"], "additionalProperties": True}


def create_app(source: ConfigSource) -> FastAPI:
    """Build the router app. Raises :class:`ConfigError` if the initial config is invalid."""
    router = Router(build_state(source.load()))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.upstream.start()
        metrics.set_config_version(None, router.state.version)
        tasks: list[asyncio.Task[None]] = []
        if source.path is not None:
            tasks.append(asyncio.create_task(_watch_config(router, source)))
        redis = _connect_shared_state(router)
        if redis is not None:
            tasks.append(asyncio.create_task(router.health.run_refresh(router.deployment_names)))
        _drain_on_sigterm(router)
        try:
            yield
        finally:
            router.draining = True
            for task in tasks:
                task.cancel()
            await router.upstream.stop()
            if redis is not None:
                await redis.aclose()

    app = FastAPI(
        title="kubellm router",
        version=router.state.version,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.router = router

    def openai_route(path: str, operation: Operation, summary: str) -> None:
        async def endpoint(request: Request) -> Response:
            return await router.handle(operation, request)

        extra = {"requestBody": {"required": True, "content": {JSON: {"schema": _REQUEST_SCHEMA}}}}
        for prefix in ("/v1", ""):
            app.add_api_route(
                prefix + path,
                endpoint,
                methods=["POST"],
                summary=summary,
                include_in_schema=prefix == "/v1",
                openapi_extra=extra,
                name=f"{operation.value}{prefix.replace('/', '_')}",
            )

    openai_route("/chat/completions", Operation.CHAT, "Create a chat completion (OpenAI format)")
    openai_route("/completions", Operation.COMPLETION, "Create a text completion (OpenAI format)")
    openai_route("/embeddings", Operation.EMBEDDING, "Create embeddings (OpenAI format)")

    # Anthropic's Messages API in front of any deployment; see _anthropic_inbound.
    async def anthropic_messages(request: Request) -> Response:
        return await handle_messages(router, request)

    for prefix in ("/v1", ""):
        app.add_api_route(
            prefix + "/messages",
            anthropic_messages,
            methods=["POST"],
            include_in_schema=prefix == "/v1",
            summary="Create a message (Anthropic format)",
            name=f"messages{prefix.replace('/', '_')}",
        )

    def visible_models(request: Request) -> list[str]:
        """Model groups the caller may use; raises if the caller is not authenticated."""
        caller = authenticate(router.state, request)
        groups = sorted(router.state.groups)
        if caller.key is not None:
            groups = [g for g in groups if caller.key.may_use(g)]
        return groups

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "kubellm"}

    async def list_models(request: Request) -> Response:
        try:
            groups = visible_models(request)
        except KubellmError as err:
            return error_response(err)
        return _json({"object": "list", "data": [model_card(g) for g in groups]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        try:
            groups = visible_models(request)
        except KubellmError as err:
            return error_response(err)
        if name not in groups:
            missing = ModelNotFoundError(f"the model {name!r} does not exist", param="model")
            return error_response(missing)
        return _json(model_card(name))

    for prefix in ("/v1", ""):
        app.add_api_route(
            prefix + "/models",
            list_models,
            methods=["GET"],
            include_in_schema=prefix == "/v1",
            summary="List model groups",
        )
        app.add_api_route(
            prefix + "/models/{model:path}",
            get_model,
            methods=["GET"],
            include_in_schema=prefix == "/v1",
            summary="Retrieve a model group",
        )

    @app.get("/health/liveness", summary="Liveness probe")
    async def liveness() -> Response:
        return _json({"status": "alive"})

    @app.get("/health/readiness", summary="Readiness probe")
    async def readiness() -> Response:
        state = router.state
        ready = not router.draining
        doc = {
            "status": "ready" if ready else "draining",
            "configVersion": state.version,
            "modelGroups": len(state.groups),
        }
        return _json(doc, 200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message, kind, code = f"no route for {request.url.path}", "not_found_error", "not_found"
        elif exc.status_code == 405:
            message, kind, code = (
                f"method {request.method} is not allowed on {request.url.path}",
                "invalid_request_error",
                "method_not_allowed",
            )
        else:
            message, kind, code = str(exc.detail), "invalid_request_error", None
        return Response(
            error_body(exc.status_code, message, type=kind, code=code),
            status_code=exc.status_code,
            media_type=JSON,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = error_body(
            500, "internal router error; see the router log", type="api_error", code="internal_error"
        )
        return Response(body, status_code=500, media_type=JSON)

    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and worker processes; the CLI passes its choices by environment."""
    from ._quickstart import source_from_env

    return create_app(source_from_env(os.environ))
