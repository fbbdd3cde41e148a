"""Calls to a deployment's files and batches API (OpenAI's, or Azure OpenAI's under ``/openai``
with an ``api-version``), and the choice of the deployment a new file goes to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import orjson

from .. import _redact as redact
from .._errors import (
    InvalidRequestError,
    KubellmError,
    ModelNotFoundError,
    PermissionDeniedError,
    UpstreamProtocolError,
)
from ..providers import Operation, RequestContext, UpstreamRequest, UpstreamResponse
from ..providers._openai_shaped import OpenAIShapedProvider
from ..providers.azure import AzureOpenAIProvider

if TYPE_CHECKING:
    from ..core._router import Caller, Router
    from ..core._state import Deployment, ModelGroup, RouterState

#: Providers whose deployments have OpenAI's files and batches APIs.
PLATFORM_PROVIDERS = frozenset({"openai", "azure"})


class ObjectNotFoundError(KubellmError):
    """OpenAI's 404 for a file or batch id it does not have (or that another key owns)."""

    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


def not_found(kind: str, object_id: str, param: str) -> ObjectNotFoundError:
    what = "File" if kind == "file" else "Batch"
    return ObjectNotFoundError(f"No such {what} object: {object_id}", param=param)


def path_id(object_id: str) -> str:
    return quote(object_id, safe="")


def group_for(state: RouterState, caller: Caller, model: str, param: str) -> ModelGroup:
    """The model group ``model`` names, if it exists and the caller may use it."""
    group = state.groups.get(model)
    if group is None:
        raise ModelNotFoundError(f"the model {model!r} does not exist", param=param)
    who = caller.key.refuses(group.name) if caller.key is not None else None
    if who is not None:
        raise PermissionDeniedError(f"{who} may not use model {group.name!r}", param=param)
    return group


def choose_deployment(router: Router, group: ModelGroup, param: str) -> Deployment:
    """The group's first OpenAI or Azure deployment by priority tier, one not cooling down if any."""
    candidates = [d for tier in group.tiers for d in tier if d.provider.name in PLATFORM_PROVIDERS]
    if not candidates:
        raise InvalidRequestError(
            f"no deployment of model {group.name!r} has a files and batches API "
            "(OpenAI and Azure OpenAI deployments do)",
            param=param,
        )
    cooling = router.health.cooling()
    healthy = [d for d in candidates if d.name not in cooling]
    return (healthy or candidates)[0]


def find_deployment(state: RouterState, name: str) -> Deployment | None:
    for group in state.groups.values():
        for dep in group.deployments:
            if dep.name == name:
                return dep
    return None


def _url(dep: Deployment, ctx: RequestContext, path: str, query: dict[str, str] | None) -> str:
    provider = dep.provider
    params = dict(query or {})
    if isinstance(provider, AzureOpenAIProvider):
        base = provider.base_url(ctx).removesuffix("/openai") + "/openai"
        params["api-version"] = dep.config.api_version or ""
    else:
        base = provider.base_url(ctx)
    return base + path + ("?" + urlencode(params) if params else "")


async def call(
    router: Router,
    dep: Deployment,
    group: str,
    method: str,
    path: str,
    *,
    query: dict[str, str] | None = None,
    body: bytes | None = None,
    content_type: str | None = None,
) -> UpstreamResponse:
    """One call to ``dep``'s files or batches API; an upstream error becomes a scrubbed KubellmError."""
    from ..core._router import next_request_id

    provider = dep.provider
    assert isinstance(provider, OpenAIShapedProvider)  # PLATFORM_PROVIDERS only
    operation = Operation.BATCHES if path.startswith("/batches") else Operation.FILES
    ctx = RequestContext(next_request_id(), operation, group, dep.config, api_key=dep.api_key)
    headers = {**provider.auth_headers(ctx), **dep.config.headers}
    if content_type is not None:
        headers["Content-Type"] = content_type
    try:
        resp = await router.upstream.send(
            UpstreamRequest(method, _url(dep, ctx, path, query), headers, body), ctx
        )
        if resp.status >= 400:
            raw = await resp.read()
            raise provider.map_error(resp.status, resp.headers, raw)
    except KubellmError as err:
        raise redact.scrub_error(err) from None
    return resp


async def call_json(
    router: Router, dep: Deployment, group: str, method: str, path: str, **kwargs: Any
) -> dict[str, Any]:
    """:func:`call`, answered with a JSON object."""
    resp = await call(router, dep, group, method, path, **kwargs)
    raw = await resp.read()
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        raise UpstreamProtocolError(f"deployment {dep.name!r} answered {method} {path} with no JSON object")
    return doc
