"""The request path: authenticate, validate, pick a deployment, call it, meter.

Everything here runs per request, so it stays lean: upstream bytes are passed
through untouched wherever the client's format matches the upstream's, and
logging happens through a queue off the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.responses import Response

from .._errors import (
    AuthenticationError,
    InvalidRequestError,
    KubellmError,
    ModelNotFoundError,
    PermissionDeniedError,
)
from ..guardrails import Context as GuardContext
from ..guardrails import chain as guard_chain
from ..identity import Identities, looks_like_jwt
from ..inbound._base import JSON, InboundApi, OpenAiApi
from ..metering._meter import Ticket
from ..observability import _metrics as metrics
from ..providers import TRANSLATED, Operation
from ..server._inbound import Inbound
from ._cache import wants as cache_wants
from ._dispatch import Call, RequestOptions
from ._outcome import Failure
from ._services import Services
from ._state import ModelGroup, RouterState, VirtualKey

__all__ = ["JSON", "Caller", "Router", "authenticate", "authenticate_caller", "error_response"]


@dataclass(slots=True)
class Caller:
    is_master: bool
    key: VirtualKey | None

    @property
    def label(self) -> str:
        if self.key is not None:
            return self.key.config.name
        return "master" if self.is_master else "anonymous"


def error_response(err: KubellmError, headers: dict[str, str] | None = None) -> Response:
    """An OpenAI-shaped error, for routes outside the inbound APIs (models, admin)."""
    return Response(
        err.to_json(), status_code=err.status, media_type=JSON, headers={**err.headers, **(headers or {})}
    )


class NeedsValidation(Exception):
    """A bearer JWT not in the identity cache: the caller must await its validation."""

    def __init__(self, token: str) -> None:
        super().__init__("bearer token to validate")
        self.token = token


def authenticate(
    state: RouterState, headers: Mapping[str, str], identities: Identities | None = None
) -> Caller:
    """The caller, from a virtual key, the master key or (with ``identities``) a cached bearer JWT.

    Raises :class:`NeedsValidation` for a JWT not validated yet (see :func:`authenticate_caller`)."""
    if not state.auth_required:
        return Caller(False, None)
    header = headers.get("authorization")
    if header is None:
        presented = headers.get("api-key") or headers.get("x-api-key")
        if presented is None:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>' or 'api-key: <key>'",
                code="missing_api_key",
            )
    else:
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AuthenticationError("malformed Authorization header: expected 'Bearer <key>'")
        presented = presented.strip()
    is_master, key = state.find_key(presented)
    if not is_master and key is None:
        # Virtual keys never get here: a JWT costs its shape check and one dict lookup once cached.
        if identities is None or not identities.enabled or not looks_like_jwt(presented):
            raise AuthenticationError("invalid API key")
        key = identities.lookup(state, presented)
        if key is None:
            raise NeedsValidation(presented)
    return _checked(is_master, key)


def _checked(is_master: bool, key: VirtualKey | None) -> Caller:
    if key is not None and key.config.disabled:
        raise AuthenticationError(f"API key {key.config.name!r} is disabled", code="key_disabled")
    expires = key.config.expires_at if key is not None else None
    if key is not None and expires is not None and expires.timestamp() <= time.time():
        raise AuthenticationError(
            f"API key {key.config.name!r} expired at {expires.isoformat()}", code="key_expired"
        )
    return Caller(is_master, key)


async def authenticate_caller(
    state: RouterState, headers: Mapping[str, str], identities: Identities | None
) -> Caller:
    """:func:`authenticate`, validating a bearer JWT seen for the first time."""
    try:
        return authenticate(state, headers, identities)
    except NeedsValidation as pending:
        assert identities is not None
        return _checked(False, await identities.resolve(state, pending.token))


def request_options(headers: Mapping[str, str]) -> RequestOptions:
    """Per-request choices from ``x-kubellm-*`` and ``Cache-Control`` headers."""
    options = RequestOptions()
    fallbacks = headers.get("x-kubellm-fallbacks")
    if fallbacks is not None:
        names = [n.strip() for n in fallbacks.split(",") if n.strip()]
        options.fallbacks = [] if names in ([], ["none"]) else names
    retries = headers.get("x-kubellm-num-retries")
    if retries is not None:
        if not (retries.isascii() and retries.isdigit()) or int(retries) > 10:  # "²" is a digit
            raise InvalidRequestError(
                "'x-kubellm-num-retries' must be an integer from 0 to 10",
                param="x-kubellm-num-retries",
                code="invalid_header",
            )
        options.num_retries = int(retries)
    for header, name in _TIMEOUT_HEADERS:
        value = headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < 86400:
            raise InvalidRequestError(
                f"'{header}' must be a number of seconds greater than 0", param=header, code="invalid_header"
            )
        options.timeouts[name] = seconds
    options.cache_read, options.cache_write = cache_wants(headers)
    return options


_TIMEOUT_HEADERS = (
    ("x-kubellm-timeout", "total"),
    ("x-kubellm-connect-timeout", "connect"),
    ("x-kubellm-first-token-timeout", "first_token"),
    ("x-kubellm-idle-timeout", "idle"),
)


_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def next_request_id() -> str:
    """Unique across processes and restarts: a random per-process prefix and a counter."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


class Router:
    """Serves requests against the current :class:`RouterState`."""

    def __init__(self, state: RouterState, services: Services) -> None:
        self.state = state
        self.openai_apis = {
            op: OpenAiApi(op) for op in (Operation.CHAT, Operation.COMPLETION, Operation.EMBEDDING)
        }
        self.draining = False
        self._use(services)

    def _use(self, services: Services) -> None:
        self.services = services
        self.upstream = services.upstream
        self.stats = services.stats
        self.health = services.health
        self.cache = services.cache
        self.meter = services.meter
        self.dispatcher = services.dispatcher
        self.identities = services.identities

    def adopt(self, services: Services) -> None:
        """Serve with ``services`` from now on. Only for a router whose config (and with it the
        settings its services are built from) arrives after it starts, from a Kubernetes Secret:
        called once, before that config is served."""
        self._use(services)

    def deployment_names(self) -> list[str]:
        return [d.name for g in self.state.groups.values() for d in g.deployments]

    async def handle(self, operation: Operation, inbound: Inbound, *, model: str | None = None) -> Response:
        """Serve an OpenAI chat, completions or embeddings request."""
        return await self.serve(self.openai_apis[operation], inbound, model=model)

    async def serve(self, api: InboundApi, inbound: Inbound, *, model: str | None = None) -> Response:
        """One request in ``api``'s dialect: authenticate, validate, admit, dispatch, render.

        ``model``, when given, is the model group named by the route (Azure's deployment paths)."""
        started = time.monotonic()
        state = self.state  # one snapshot for the whole request, even across a reload
        request_id = next_request_id()
        try:
            headers = inbound.headers
            caller = await authenticate_caller(state, headers, self.identities)
            options = request_options(headers)
            body = await api.read_body(inbound, state.config.settings)
            if model is not None:
                body["model"] = model
            requested = api.validate(body)
            group = self._group(state, caller, requested.model, options)
            body = await api.prepare(body, caller)
            key_guards = caller.key.config.guardrails if caller.key is not None else ()
            guards = guard_chain(state.guardrails, group.settings.guardrails, key_guards)
            guard_ctx = GuardContext(api.operation, group.name, caller.label, request_id)
            if guards:
                body = await self.services.guardrails.pre(guards, body, guard_ctx)
            # A request no deployment of the group can take natively is translated now, so that
            # one the translation refuses is a 400 before it counts against any limit.
            chat = None
            if api.operation in TRANSLATED and not group.speaks(api.operation):
                chat = api.to_chat(body)
        except KubellmError as err:
            metrics.ERRORS.labels("", err.type).inc()
            return api.render_error(err, {"x-request-id": request_id})
        deadline = started + options.timeouts.get("total", state.config.settings.request_timeout_seconds)
        call = Call(
            request_id=request_id,
            operation=api.operation,
            body=body,
            stream=requested.stream,
            include_usage=requested.include_usage,
            group=group,
            caller_label=caller.label,
            key=caller.key,
            options=options,
            state=state,
            started=started,
            deadline=deadline,
            to_chat=api.to_chat if api.operation in TRANSLATED else None,
            chat_request=chat,
            forward_headers={h: v for h in api.forward_headers if (v := headers.get(h)) is not None},
        )
        traceparent = headers.get("traceparent")
        if traceparent is not None:
            call.trace_context = (traceparent, headers.get("tracestate"))
        try:
            call.ticket = await self.meter.admit_caller(call)
        except KubellmError as err:
            call.ticket = Ticket()
            metrics.ERRORS.labels(group.name, err.type).inc()
            self.dispatcher.finish(call, None, err.status, None, None)
            return api.render(Failure(error=err, headers={"x-request-id": request_id}), call)
        current = asyncio.current_task()
        assert current is not None
        unwatch = inbound.cancel_on_disconnect(current)
        metrics.recorder.started(group.name)
        try:
            outcome = await self.dispatcher.run(call)
            if guards:
                outcome = await self.services.guardrails.post(guards, outcome, guard_ctx)
            return api.render(outcome, call)
        except asyncio.CancelledError:
            if not inbound.gone or current.cancelling() == 0:
                raise
            current.uncancel()
            self.dispatcher.finish(call, None, 499, None, None)
            return Response(status_code=499)
        finally:
            unwatch()
            metrics.recorder.ended(group.name)

    @staticmethod
    def _group(state: RouterState, caller: Caller, model: str, options: RequestOptions) -> ModelGroup:
        """The model group asked for, if it exists and the caller may use it and its fallbacks."""
        group = state.groups.get(model)
        if group is None:
            raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")
        key = caller.key
        if key is None:
            return group
        who = key.refuses(group.name)
        if who is not None:
            raise PermissionDeniedError(f"{who} may not use model {group.name!r}", param="model")
        # Fallbacks the client names are models it asks for: the key must be allowed them too.
        for name in options.fallbacks or ():
            target = state.groups.get(name)
            who = key.refuses(target.name) if target is not None else None
            if target is not None and who is not None:
                raise PermissionDeniedError(
                    f"{who} may not use model {target.name!r}", param="x-kubellm-fallbacks"
                )
        return group
