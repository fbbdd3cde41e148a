"""The ASGI application: routes, error rendering, lifespan and config reload."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from .._errors import INTERNAL_ERROR_BODY, KubellmError, ModelNotFoundError, error_body
from ..audio._routes import register_audio_routes
from ..config._schema import ConfigError, RouterConfig, load_config
from ..core._router import JSON, Router, authenticate_caller, error_response
from ..core._services import build_services
from ..core._state import RouterState, build_state, changed_deployments
from ..files._routes import register_files_routes
from ..inbound._anthropic import MessagesApi
from ..inbound._count_tokens import handle_count_tokens
from ..inbound.responses import ResponsesApi
from ..observability import _metrics as metrics
from ..observability._hub import hub as sink_hub
from ..openapi import install as install_openapi
from ..providers import Operation
from . import _protocol as _http
from ._admin import register_admin_routes
from ._direct import Endpoint
from ._inbound import AsgiInbound, Inbound
from ._responses_routes import register_responses_routes
from ._surface_routes import register_surface_routes

log = logging.getLogger("kubellm.router")

#: Set by ``kubellm router --kube-secret`` for every worker process.
ENV_KUBE_SECRET = "KUBELLM_KUBE_SECRET"
ENV_KUBECONFIG = "KUBELLM_KUBECONFIG"
ENV_REQUIRE_AUTH = "KUBELLM_REQUIRE_AUTH"


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the config comes from: a file that is watched, a fixed document, or a Kubernetes
    Secret (``namespace/name``) that is watched through the API."""

    path: Path | None = None
    config: RouterConfig | None = None
    kube_secret: str | None = None
    kubeconfig: str | None = None
    #: Kubernetes source on a non-loopback address: refuse configs that configure no key.
    require_auth: bool = False

    def load(self) -> RouterConfig:
        if self.path is not None:
            return load_config(self.path)
        if self.kube_secret is not None:
            return RouterConfig()  # serves nothing; readiness stays false until the Secret loads
        assert self.config is not None
        return self.config


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        # Kubernetes swaps mounted ConfigMaps through a symlink, which changes the inode.
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _swap_state(router: Router, state: RouterState) -> asyncio.Task[None]:
    """Serve ``state`` from now on; credential rejections of changed deployments are cleared."""
    changed = changed_deployments(router.state, state)
    router.state = state
    return asyncio.get_running_loop().create_task(router.health.forget_rejections(changed))


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
        await _swap_state(router, state)
        metrics.set_config_version(old, state.version)
        metrics.CONFIG_RELOADS.labels("applied").inc()
        log.info("config reloaded: version %s -> %s", old, state.version)


async def _watch_kube(router: Router, source: ConfigSource, loaded: asyncio.Event) -> None:
    """Follow the config Secret; sets ``loaded`` once the first config is serving."""
    from ..kube import watch_config_secret

    assert source.kube_secret is not None
    namespace, _, name = source.kube_secret.partition("/")
    pending: set[asyncio.Task[None]] = set()  # referenced until done, so they are not collected

    def on_config(config: RouterConfig) -> None:
        try:
            state = build_state(config)
            if source.require_auth and not state.auth_required:
                raise ConfigError("no master key and no API keys, and the router listens beyond loopback")
        except ConfigError as err:
            metrics.CONFIG_RELOADS.labels("invalid").inc()
            log.error("config from Secret %s rejected: %s", source.kube_secret, err.message)
            return
        old = router.state.version if loaded.is_set() else None
        if old == state.version:
            return
        pending.add(_swap_state(router, state))
        pending.difference_update([t for t in pending if t.done()])
        metrics.set_config_version(old, state.version)
        metrics.CONFIG_RELOADS.labels("applied").inc()
        log.info("config from Secret %s: version %s -> %s", source.kube_secret, old, state.version)
        loaded.set()

    def on_error(err: Exception) -> None:
        log.warning("config Secret %s: %s", source.kube_secret, err)

    await watch_config_secret(namespace, name, source.kubeconfig, on_config, on_error)


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
        _http.start_draining()
        delay = router.state.config.settings.drain_delay_seconds
        log.info("SIGTERM: draining; readiness is false, shutting down in %.1fs", delay)
        loop.call_soon_threadsafe(loop.call_later, delay, uvicorn_handler, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON)


#: Azure OpenAI's data-plane paths, ``/openai/deployments/{deployment}/<operation>``: the deployment
#: names the model group, so ``AzureOpenAI(azure_endpoint=<router>)`` clients work unchanged.
AZURE_PREFIX = "/openai/deployments/"

#: An endpoint of a path with the model group in it; ``model`` is taken from the path.
ModelEndpoint = Callable[[Inbound, str], Awaitable[Response]]


def _string_param(name: str, where: str, *, required: bool = False) -> dict[str, Any]:
    """An OpenAPI parameter, for endpoints that read the raw request."""
    return {"name": name, "in": where, "required": required, "schema": {"type": "string"}}


class RouterApp(FastAPI):
    """FastAPI for every route, except that the model endpoints skip its middleware stack.

    Measured under load, FastAPI's layers (dependency solving, query parsing, telemetry and
    body-limit middleware, exception wrappers) took about a third of the router's CPU per
    request. The POST model endpoints do their own validation and error rendering, so they are
    dispatched straight from the ASGI entry, or before ASGI by the router's protocol
    (:mod:`._direct`); they stay registered with FastAPI for the OpenAPI spec.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast_routes: dict[str, Endpoint] = {}
        #: (operation suffix, endpoint) under :data:`AZURE_PREFIX`, longest suffix first.
        self.deployment_routes: list[tuple[str, ModelEndpoint]] = []

    def add_fast_route(self, path: str, endpoint: Endpoint, **openapi: Any) -> None:
        """A POST model endpoint at ``path`` and at ``path`` without ``/v1``."""

        async def asgi_endpoint(request: Request) -> Response:
            return await endpoint(AsgiInbound(request))

        name = openapi.pop("name", path.strip("/"))
        for prefix in ("/v1", ""):
            self.add_api_route(
                prefix + path,
                asgi_endpoint,
                methods=["POST"],
                include_in_schema=prefix == "/v1",
                name=f"{name}{prefix.replace('/', '_')}",
                **openapi,
            )
            self.fast_routes[prefix + path] = endpoint

    def add_deployment_route(self, suffix: str, endpoint: ModelEndpoint, **openapi: Any) -> None:
        """A POST model endpoint at ``/openai/deployments/{deployment_id}<suffix>`` (Azure's paths)."""

        async def asgi_endpoint(request: Request) -> Response:
            return await endpoint(AsgiInbound(request), request.path_params["deployment_id"])

        # The endpoint reads the raw request, so FastAPI cannot see the parameter: declare it.
        extra = dict(openapi.get("openapi_extra") or {})  # a copy: callers may share theirs
        param = _string_param("deployment_id", "path", required=True)
        openapi["openapi_extra"] = {**extra, "parameters": [*extra.get("parameters", []), param]}
        self.add_api_route(
            AZURE_PREFIX + "{deployment_id}" + suffix,
            asgi_endpoint,
            methods=["POST"],
            **openapi,
        )
        self.deployment_routes.append((suffix, endpoint))
        # "/chat/completions" before "/completions", which it ends with.
        self.deployment_routes.sort(key=lambda route: -len(route[0]))

    def find_fast_route(self, path: str) -> Endpoint | None:
        """The endpoint of a path with a parameter in it; asked only once the exact lookup missed."""
        if not path.startswith(AZURE_PREFIX):
            return None
        rest = path[len(AZURE_PREFIX) :]
        for suffix, endpoint in self.deployment_routes:
            # The SDK percent-encodes the name, and the path arrives decoded: a name may hold a '/'.
            # The longest suffix that matches decides, so an empty name is no route.
            if rest.endswith(suffix):
                name = rest[: -len(suffix)]
                return _bind_model(endpoint, name) if name else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.fast_routes.get(scope["path"]) or self.find_fast_route(scope["path"])
            if endpoint is not None:
                request = Request(scope, receive)
                try:
                    response = await endpoint(AsgiInbound(request))
                except ClientDisconnect:
                    return  # the client left while sending its body: no one to answer
                except Exception:
                    log.exception("unhandled error on POST %s", scope["path"])
                    response = Response(INTERNAL_ERROR_BODY, status_code=500, media_type=JSON)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of the request's path takes."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _bind_model(endpoint: ModelEndpoint, model: str) -> Endpoint:
    async def bound(inbound: Inbound) -> Response:
        return await endpoint(inbound, model)

    return bound


def create_app(source: ConfigSource) -> RouterApp:
    """Build the router app. Raises :class:`ConfigError` if the initial config is invalid."""
    state = build_state(source.load())
    router = Router(state, build_services(state.config.settings))
    loaded = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks: list[asyncio.Task[None]] = []

        async def start_services() -> None:
            if router.services.redis is not None:
                tasks.append(asyncio.create_task(router.health.run_refresh(router.deployment_names)))
            await router.meter.ledger.start()
            sink_hub.start(router.state.config.settings)  # settings.otel and settings.sinks

        async def start_after_first_config() -> None:
            await loaded.wait()  # settings (cooldown, cache, Redis) come with the first config
            router.adopt(build_services(router.state.config.settings))
            await start_services()

        if source.kube_secret is not None:
            tasks.append(asyncio.create_task(_watch_kube(router, source, loaded)))
            tasks.append(asyncio.create_task(start_after_first_config()))
        else:
            loaded.set()
            metrics.set_config_version(None, router.state.version)
            await start_services()
        if source.path is not None:
            tasks.append(asyncio.create_task(_watch_config(router, source)))
        _drain_on_sigterm(router)
        # Everything built so far (modules, config, pydantic schemas) lives as long as the process:
        # keep it out of the collector's full passes, which otherwise walk it again and again.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            router.draining = True
            for task in tasks:
                task.cancel()
            await router.upstream.stop()
            await router.services.guardrails.stop()
            await router.services.identities.close()
            await router.meter.drain()
            await asyncio.to_thread(sink_hub.close)  # flush what the sinks still hold
            if router.services.redis is not None:
                await router.services.redis.aclose()

    app = RouterApp(
        title="kubellm router",
        version=router.state.version,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # No 307 to the slash-less path: its Location would echo the client's Host header.
        redirect_slashes=False,
    )
    app.state.router = router
    register_admin_routes(app, router)

    def openai_route(path: str, operation: Operation, summary: str) -> None:
        async def endpoint(inbound: Inbound) -> Response:
            return await router.handle(operation, inbound)

        app.add_fast_route(path, endpoint, summary=summary, name=operation.value)  # described in .openapi

    openai_route("/chat/completions", Operation.CHAT, "Create a chat completion (OpenAI format)")
    openai_route("/completions", Operation.COMPLETION, "Create a text completion (OpenAI format)")
    openai_route("/embeddings", Operation.EMBEDDING, "Create embeddings (OpenAI format)")

    # Azure OpenAI's paths: the deployment in the path is the model group, whatever the body says;
    # `api-version` is accepted and not needed (the router speaks one version of each API).
    def azure_route(suffix: str, operation: Operation, summary: str) -> None:
        async def endpoint(inbound: Inbound, model: str) -> Response:
            return await router.handle(operation, inbound, model=model)

        app.add_deployment_route(suffix, endpoint, summary=summary, name=f"azure_{operation.value}")

    azure_route("/chat/completions", Operation.CHAT, "Create a chat completion (Azure OpenAI path)")
    azure_route("/completions", Operation.COMPLETION, "Create a text completion (Azure OpenAI path)")
    azure_route("/embeddings", Operation.EMBEDDING, "Create embeddings (Azure OpenAI path)")

    # Anthropic's Messages API in front of any deployment; see _anthropic_inbound.
    messages_api = MessagesApi()
    # OpenAI's Responses API in front of any deployment; see inbound/responses.
    responses_api = ResponsesApi(lambda: router.services.responses)
    register_responses_routes(app, router, responses_api)
    # Images, moderations and rerank; see inbound/surface.
    register_surface_routes(app, router)
    # OpenAI's audio API (speech, transcriptions, translations); see audio/.
    register_audio_routes(app, router)
    # OpenAI's files and batches APIs on OpenAI and Azure deployments; see files/.
    register_files_routes(app, router)

    async def anthropic_messages(inbound: Inbound) -> Response:
        return await router.serve(messages_api, inbound)

    app.add_fast_route(
        "/messages", anthropic_messages, summary="Create a message (Anthropic format)", name="messages"
    )

    async def anthropic_count_tokens(inbound: Inbound) -> Response:
        return await handle_count_tokens(router, inbound)

    app.add_fast_route(
        "/messages/count_tokens",
        anthropic_count_tokens,
        summary="Count the input tokens of a message (Anthropic format)",
        name="count_tokens",
    )

    async def visible_models(request: Request) -> list[str]:
        """Model groups the caller may use; raises if the caller is not authenticated."""
        caller = await authenticate_caller(router.state, request.headers, router.identities)
        groups = sorted(router.state.groups)
        if caller.key is not None:
            groups = [g for g in groups if caller.key.may_use(g)]
        return groups

    def model_card(name: str) -> dict[str, Any]:
        card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "kubellm"}
        group = router.state.groups.get(name)
        if group is not None:  # what it serves (see _modes): the first mode, and all of them
            modes = group.modes
            card["mode"], card["modes"] = (modes[0] if modes else "chat"), modes
        return card

    async def list_models(request: Request) -> Response:
        try:
            groups = await visible_models(request)
        except KubellmError as err:
            return error_response(err)
        return _json({"object": "list", "data": [model_card(g) for g in groups]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        try:
            groups = await visible_models(request)
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
            # The endpoint reads the raw request, so FastAPI cannot see the parameter: declare it.
            openapi_extra={"parameters": [_string_param("model", "path", required=True)]},
        )

    @app.get("/health/liveness", summary="Liveness probe")
    async def liveness() -> Response:
        return _json({"status": "alive"})

    @app.get("/health/readiness", summary="Readiness probe")
    async def readiness() -> Response:
        state = router.state
        ready = not router.draining and loaded.is_set()
        doc = {
            "status": "ready" if ready else ("draining" if router.draining else "waiting-for-config"),
            "configVersion": state.version if loaded.is_set() else None,
            "modelGroups": len(state.groups),
            # Shared state unreachable: limits fail open or closed as configured and usage records
            # wait in the local journal; the router keeps serving.
            "degraded": router.meter.degraded,
            # Per deployment: not a readiness condition (other deployments, or other replicas'
            # retries, may still serve), but where an operator sees a rejected credential.
            "deployments": {name: router.health.describe(name) for name in router.deployment_names()},
        }
        return _json(doc, 200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # Built on the first GET /openapi.json, once all routes are in.
    install_openapi(app, lambda: router.state.auth_required)

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
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names only the first route's methods; a path may have more
            headers = {**(headers or {}), "allow": ", ".join(_allowed_methods(app, request.scope))}
        return Response(
            error_body(exc.status_code, message, type=kind, code=code),
            status_code=exc.status_code,
            media_type=JSON,
            headers=headers,
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return Response(INTERNAL_ERROR_BODY, status_code=500, media_type=JSON)

    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and worker processes; the CLI passes its choices by environment."""
    from ..config._quickstart import source_from_env

    if os.environ.get(ENV_KUBE_SECRET):
        return create_app(
            ConfigSource(
                kube_secret=os.environ[ENV_KUBE_SECRET],
                kubeconfig=os.environ.get(ENV_KUBECONFIG) or None,
                require_auth=os.environ.get(ENV_REQUIRE_AUTH) == "1",
            )
        )
    return create_app(source_from_env(os.environ))
