"""Getting one answer for one request: deployment choice, retries, fallbacks, streaming.

For each model group in the chain (the requested group, then its fallbacks),
deployments are tried in the order the group's strategy gives, skipping those
whose circuit breaker is open or whose context window is too small. A failed
deployment is retried only when no other is available, after an exponential
backoff with jitter that honours ``Retry-After``. Everything is bounded by the
request's deadline. Once the first streamed byte has been sent, nothing is
retried: a later failure travels to the client as an error event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .. import _redact as redact
from .._errors import (
    AuthenticationError,
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    KubellmError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStreamTruncatedError,
    UpstreamTimeoutError,
)
from .._sse import Event
from ..config._schema import Timeouts
from ..inbound._base import stream_headers
from ..metering._meter import CallerRefused, Meter, Ticket
from ..metering._tokens import prompt_tokens, requested_completion_tokens
from ..observability import _metrics as metrics
from ..observability._finish import finish_request
from ..providers import (
    TRANSLATED,
    UNCACHED,
    Operation,
    Payload,
    RequestContext,
    StreamTranslator,
    UpstreamClient,
    UpstreamResponse,
    Usage,
)
from ._balancer import Headroom, Stats, order_tier
from ._cache import cache_key, pack_answer, pack_stream, read_quietly, replay, write_quietly
from ._health import rejection_reason
from ._outcome import Answer, Batch, Failure, Outcome, Stream, StreamError, StreamEvent

if TYPE_CHECKING:
    from ._cache import ResponseCache
    from ._health import HealthTracker
    from ._state import Deployment, ModelGroup, RouterState, VirtualKey

#: Streams renew their concurrency leases this often (leases expire after 30 s without renewal).
LEASE_RENEW_SECONDS = 10.0


@dataclass(slots=True)
class RequestOptions:
    """What a client may choose per request, through ``x-kubellm-*`` headers."""

    #: None: the group's own chain; an empty list: no fallbacks.
    fallbacks: list[str] | None = None
    num_retries: int | None = None
    timeouts: dict[str, float] = field(default_factory=dict)
    cache_read: bool = True
    cache_write: bool = True


@dataclass(slots=True, kw_only=True)
class Call:
    """One client request on its way through the dispatcher."""

    request_id: str
    operation: Operation
    body: dict[str, Any]
    stream: bool
    include_usage: bool
    group: ModelGroup
    caller_label: str
    key: VirtualKey | None
    options: RequestOptions
    state: RouterState
    started: float
    deadline: float
    #: For operations in TRANSLATED: the chat request for deployments that do not speak
    #: ``operation`` natively (None: no chat form). Called once, on the first such deployment.
    to_chat: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
    attempts: int = 0
    #: The deployment of the latest attempt, named in error responses.
    last_deployment: str | None = None
    ticket: Ticket | None = None
    #: The client's W3C trace context (``traceparent``, ``tracestate``), joined by the OTel spans.
    trace_context: tuple[str, str | None] | None = None
    #: Why the request failed, and the model groups it tried: what error sinks (Sentry) report.
    error: KubellmError | None = None
    groups_tried: tuple[str, ...] = ()
    #: Client headers a deployment speaking ``operation`` natively gets (the inbound API's
    #: ``forward_headers``, e.g. ``anthropic-beta``), by lower-case name.
    forward_headers: dict[str, str] = field(default_factory=dict)
    #: ``to_chat``'s answer, once asked for.
    chat_request: dict[str, Any] | None = None
    _prompt_tokens: int | None = None

    @property
    def prompt_tokens(self) -> int:
        """A cheap estimate, computed only when a context window or a limit needs it."""
        if self._prompt_tokens is None:
            self._prompt_tokens = prompt_tokens(self.body)
        return self._prompt_tokens

    @property
    def estimated_tokens(self) -> int:
        """Prompt plus requested completion: what a tpm limit reserves before the call."""
        return self.prompt_tokens + requested_completion_tokens(self.body)

    def chat_body(self) -> dict[str, Any] | None:
        """The request as chat, for a deployment that does not speak :attr:`operation`; raises the
        translation's :class:`InvalidRequestError` (a request only the native dialect can carry)."""
        if self.chat_request is None and self.to_chat is not None:
            self.chat_request = self.to_chat(self.body)
        return self.chat_request

    def serves(self, dep: Deployment) -> bool:
        """Whether ``dep`` can answer: natively, or through chat for a translated operation."""
        if not dep.serves_mode(self.operation):
            return False
        provider = dep.provider
        if provider.speaks(self.operation, dep.config):
            return True
        if (
            self.operation not in TRANSLATED
            or self.to_chat is None
            or Operation.CHAT not in provider.operations
        ):
            return False
        try:
            return self.chat_body() is not None
        except InvalidRequestError:
            # Only the native dialect can carry this request (an Anthropic document, say): leave it
            # to the group's deployments that speak it. The server layer already answered 400 when
            # the group has none.
            return False

    def base_headers(self) -> dict[str, str]:
        """The headers every answer carries, whichever deployment (or none) produced it."""
        headers = {
            "x-request-id": self.request_id,
            "x-kubellm-model-group": self.group.name,
            "x-kubellm-attempts": str(self.attempts),
        }
        if self.ticket is not None:
            headers.update(self.ticket.headers)
        return headers


class _GroupFailed(Exception):
    def __init__(self, error: KubellmError) -> None:
        self.error = error


class _Saturated(Exception):
    """A deployment's own limits refused the request; it is skipped, not counted as a failure."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after


def _retry_after(err: KubellmError) -> float | None:
    value = err.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _unreadable(dep: Deployment, exc: Exception) -> UpstreamProtocolError:
    """A provider adapter choked on what the upstream sent: a bad upstream answer, so retryable."""
    logging.getLogger("kubellm.router").warning(
        "deployment %r sent a response its adapter cannot read (%s)", dep.name, type(exc).__name__
    )
    return UpstreamProtocolError(f"deployment {dep.name!r} sent a response the router cannot read")


def _counts_against_deployment(err: KubellmError) -> bool:
    """Transient failures that say something about the deployment's health, not about the request.

    Credential rejections are not among them: they are not transient (see :func:`_credential_error`)."""
    return err.retryable and isinstance(err, UpstreamError | RateLimitError)


def _credential_error(dep_name: str, status: int, detail: str | None = None) -> KubellmError:
    """The upstream rejected a deployment's credentials (401) or their permissions (403).

    Retryable, so that another deployment or a fallback group may answer, but never on the same
    deployment: its next call would be refused too. ``detail`` is the provider's message of this
    attempt (already free of the credential); without it (a deployment skipped because its last
    answer was a rejection) the message says what that answer was."""
    message = f"deployment {dep_name!r}: {detail or rejection_reason(status)}"
    err: KubellmError
    if status == 401:
        err = AuthenticationError(message, code="upstream_authentication_error")
    else:
        err = PermissionDeniedError(message, code="upstream_permission_denied")
    err.retryable = True
    return err


class Dispatcher:
    def __init__(
        self,
        upstream: UpstreamClient,
        health: HealthTracker,
        stats: Stats,
        cache: ResponseCache | None,
        meter: Meter,
    ) -> None:
        self.meter = meter
        self.upstream = upstream
        self.health = health
        self.stats = stats
        self.cache = cache
        self.rng = random.Random()

    # -- the chain of model groups -------------------------------------------------------------

    async def run(self, call: Call) -> Outcome:
        key = self._cache_key(call)
        if key is not None and call.options.cache_read and self.cache is not None:
            hit = await read_quietly(self.cache, key)
            replayed = self._replay(call, hit) if hit is not None else None
            if replayed is not None:
                return replayed
        chain = [call.group]
        visited = {call.group.name}
        last: KubellmError | None = None
        for index in range(len(chain) + 32):
            if index >= len(chain):
                break
            group = chain[index]
            if index:
                metrics.FALLBACKS.labels(call.group.name, group.name).inc()
            try:
                return await self._run_group(call, group, key)
            except _GroupFailed as failed:
                last = failed.error
            for name in self._fallbacks_for(call, last):
                target = call.state.groups.get(name)
                if target is not None and target.name not in visited:
                    visited.add(target.name)
                    chain.append(target)
        assert last is not None
        metrics.ERRORS.labels(call.group.name, last.type).inc()
        call.error, call.groups_tried = last, tuple(g.name for g in chain)
        self.finish(call, None, last.status, None, None)
        headers = call.base_headers()
        if call.last_deployment is not None:
            headers["x-kubellm-deployment"] = call.last_deployment
        return Failure(error=last, headers=headers)

    def finish(
        self,
        call: Call,
        dep: Deployment | None,
        status: int,
        usage: Usage | None,
        ttft: float | None,
        payloads: list[bytes] | None = None,
        *,
        cached: bool = False,
    ) -> None:
        finish_request(self.meter, call, dep, status, usage, ttft, payloads, cached=cached)

    def _fallbacks_for(self, call: Call, err: KubellmError) -> list[str]:
        if call.options.fallbacks == []:
            return []
        settings = call.group.settings
        if isinstance(err, ContextLengthExceededError):
            return settings.context_window_fallbacks
        if isinstance(err, ContentFilterError):
            return settings.content_policy_fallbacks
        if not err.retryable:
            return []
        return call.options.fallbacks if call.options.fallbacks is not None else settings.fallbacks

    # -- one model group ----------------------------------------------------------------------

    async def _run_group(self, call: Call, group: ModelGroup, key: str | None) -> Outcome:
        settings = call.state.config.settings
        retries = call.options.num_retries if call.options.num_retries is not None else settings.num_retries
        budget = 1 + retries
        failed: set[str] = set()
        #: Deployments whose credentials the upstream rejected during this request: never retried.
        rejected: set[str] = set()
        saturated: dict[str, float] = {}
        queue_until = time.monotonic() + settings.queue_wait_seconds
        last: KubellmError | None = None
        tries = 0
        backoff = settings.initial_backoff_seconds
        while tries < budget:
            dep = await self._choose(call, group, failed, saturated, rejected)
            if isinstance(dep, KubellmError):
                why_none = dep
                if saturated and not isinstance(why_none, ContextLengthExceededError):
                    wait = min(saturated.values())
                    if time.monotonic() + wait <= min(queue_until, call.deadline):
                        await asyncio.sleep(wait)  # queue for a free slot, as configured
                        saturated.clear()
                        continue
                    raise _GroupFailed(last or self._saturated(group, wait))
                if await self._wait_for_cooldown(call, group, why_none):
                    continue
                raise _GroupFailed(last or why_none)
            if dep.name in failed:
                # Only a deployment that already failed is left: back off before trying it again.
                delay = min(backoff, settings.max_backoff_seconds) * (0.5 + self.rng.random() / 2)
                if time.monotonic() + delay >= call.deadline:
                    assert last is not None  # it failed before
                    raise _GroupFailed(last)
                await asyncio.sleep(delay)
                backoff *= 2
            try:
                return await self._attempt(call, group, dep, key)
            except _Saturated as full:
                saturated[dep.name] = full.retry_after
                continue
            except (AuthenticationError, PermissionDeniedError) as err:
                tries += 1
                last = _credential_error(dep.name, err.status, err.message)
                rejected.add(dep.name)
                await self.health.reject(dep.name, err.status)
                metrics.COOLDOWNS.labels(dep.name).inc()
            except KubellmError as err:
                tries += 1
                last = err
                retry_after = _retry_after(err) if err.status == 429 else None
                if _counts_against_deployment(err) and await self.health.failure(dep.name, retry_after):
                    metrics.COOLDOWNS.labels(dep.name).inc()
                if not err.retryable:
                    raise _GroupFailed(err) from None
                failed.add(dep.name)
        assert last is not None
        raise _GroupFailed(last)

    @staticmethod
    def _saturated(group: ModelGroup, retry_after: float) -> RateLimitError:
        return RateLimitError(
            f"every deployment of model {group.name!r} is at its rate or concurrency limit",
            code="deployments_saturated",
            headers={"Retry-After": str(max(1, int(retry_after + 0.999)))},
        )

    async def _choose(
        self,
        call: Call,
        group: ModelGroup,
        failed: set[str],
        saturated: dict[str, float],
        rejected: set[str],
    ) -> Deployment | KubellmError:
        """The next deployment to try, or the reason none can serve.

        A deployment whose credentials were rejected is skipped like an open breaker; when only
        such deployments are left, the reason is the credential error, not a cooldown."""
        too_long = 0
        cooling = 0
        denied: Deployment | None = None
        retry_same: Deployment | None = None
        for tier in group.tiers:
            usable = []
            for dep in tier:
                if dep.name in saturated or not call.serves(dep):
                    continue
                window = dep.config.context_window
                if window is not None and call.prompt_tokens > window:
                    too_long += 1
                    continue
                if dep.name in rejected:
                    denied = denied or dep
                    continue
                if self.health.is_open(dep.name):
                    if self.health.rejected(dep.name):
                        denied = denied or dep
                    else:
                        cooling += 1
                    continue
                usable.append(dep)
            headroom = await self._headroom(usable) if group.settings.strategy == "usage-based" else None
            for dep in order_tier(group, usable, self.stats, self.rng, stream=call.stream, headroom=headroom):
                if not self.health.clear(dep.name) and not await self.health.admit(dep.name):
                    if self.health.rejected(dep.name):  # another request is probing it
                        denied = denied or dep
                    else:
                        cooling += 1
                    continue
                if dep.name in failed:
                    retry_same = retry_same or dep
                    continue
                return dep
        if retry_same is not None:
            return retry_same
        if denied is not None and not cooling:
            return _credential_error(denied.name, self.health.rejected(denied.name) or 401)
        if too_long and not cooling and not saturated:
            return ContextLengthExceededError(
                f"the prompt (about {call.prompt_tokens} tokens) exceeds the context window of every "
                f"deployment of model {group.name!r}",
                param="messages",
            )
        if cooling:
            return ServiceUnavailableError(
                f"every deployment of model {group.name!r} is cooling down",
                code="no_deployment_available",
                headers=self._retry_after_header(group),
            )
        return InvalidRequestError(
            f"no deployment of model {group.name!r} supports {call.operation.value} requests", param="model"
        )

    async def _headroom(self, deps: list[Deployment]) -> Headroom | None:
        """Share of limits left per deployment; :meth:`_choose` asks only for the usage-based strategy."""
        if not deps:
            return None
        rules = {d.name: d.limit_rule for d in deps if d.limit_rule is not None}
        try:
            room = await self.meter.limiter.headroom(list(rules.values())) if rules else {}
        except Exception:
            return None
        share: dict[str, float] = {}
        for name, r in rules.items():
            left = room.get(r.scope)
            if left is None:
                continue
            parts = [
                left.rpm_left / r.rpm if r.rpm and left.rpm_left is not None else 1.0,
                left.tpm_left / r.tpm if r.tpm and left.tpm_left is not None else 1.0,
                left.parallel_left / r.max_parallel
                if r.max_parallel and left.parallel_left is not None
                else 1.0,
            ]
            share[name] = min(parts)
        return lambda dep: share.get(dep.name, 1.0)

    def _cooling_ends(self, group: ModelGroup) -> list[float]:
        """When the group's open breakers half-open; credential rejections are not waited for."""
        cooling = self.health.cooling()
        names = [d.name for d in group.deployments if d.name in cooling]
        return [cooling[n] for n in names if not self.health.rejected(n)]

    def _retry_after_header(self, group: ModelGroup) -> dict[str, str]:
        ends = self._cooling_ends(group)
        if not ends:
            return {"Retry-After": "1"}
        return {"Retry-After": str(max(1, int(min(ends) - self.health.clock() + 0.999)))}

    async def _wait_for_cooldown(self, call: Call, group: ModelGroup, why: KubellmError) -> bool:
        """Sleep until the first breaker of the group half-opens, if that is before the deadline."""
        if not isinstance(why, ServiceUnavailableError):
            return False
        ends = self._cooling_ends(group)
        if not ends:
            return False
        delay = min(ends) - self.health.clock() + 0.01
        settings = call.state.config.settings
        if delay <= 0 or delay > settings.max_backoff_seconds or time.monotonic() + delay >= call.deadline:
            return False
        await asyncio.sleep(delay)
        return True

    # -- one attempt on one deployment ---------------------------------------------------------

    def _timeouts(self, call: Call, dep: Deployment) -> Timeouts | None:
        """The attempt's own timeouts when the request overrides the deployment's; the deadline
        bounds the total separately (``RequestContext.total_timeout``)."""
        if call.deadline <= time.monotonic():
            raise UpstreamTimeoutError("the request deadline passed before an attempt", code="total_timeout")
        if not call.options.timeouts:
            return None
        return Timeouts.model_construct(**{**dep.config.timeouts.model_dump(), **call.options.timeouts})

    async def _attempt(self, call: Call, group: ModelGroup, dep: Deployment, key: str | None) -> Outcome:
        if call.ticket is not None and (dep.limit_rule is not None or call.ticket.pending):
            try:  # with the first attempt, also the caller's limits and budget: one round trip
                admission = await self.meter.admit_deployment(call, call.ticket, dep)
            except CallerRefused as refused:
                raise _GroupFailed(refused.error) from None
            if admission is not None and not admission.allowed:
                raise _Saturated(admission.retry_after or 1.0)
        call.attempts += 1
        if call.attempts > 1:
            metrics.RETRIES.labels(call.group.name).inc()
        call.last_deployment = dep.name
        timeouts = self._timeouts(call, dep)
        wire, body = call.operation, call.body
        if not dep.provider.speaks(wire, dep.config):
            wire, chat = Operation.CHAT, call.chat_body()
            assert chat is not None  # call.serves(dep) held
            body = chat
        ctx = RequestContext(
            call.request_id,
            wire,
            group.name,
            dep.config,
            call.stream,
            call.include_usage,
            api_key=dep.api_key,
            timeouts=timeouts,
            deadline=call.deadline,
            # Only the native dialect carries them: a chat translation has no place for betas.
            client_headers=call.forward_headers if wire is call.operation else {},
        )
        headers = call.base_headers()
        headers["x-kubellm-model-group"] = group.name
        headers["x-kubellm-deployment"] = dep.name
        if key is not None:
            headers["x-kubellm-cache"] = "miss"
        stats = self.stats[dep.name]
        stats.in_flight += 1
        handed_off = False
        try:
            first_token = ctx.effective_timeouts.first_token
            if first_token is None:
                resp = await dep.provider.send(self.upstream, body, ctx)
            else:
                try:
                    async with asyncio.timeout(first_token):
                        resp = await dep.provider.send(self.upstream, body, ctx)
                except TimeoutError:
                    raise self._first_token_timeout(dep) from None
            if resp.status >= 400:
                raw = await resp.read()
                raise dep.provider.map_error(resp.status, resp.headers, raw)
            if call.stream:
                response = await self._open_stream(call, dep, resp, ctx, headers, key)
                handed_off = True
                if not self.health.clear(dep.name):
                    await self.health.success(dep.name)
                return response
            raw = await resp.read()
            try:
                parsed = dep.provider.parse_response(raw, ctx)
            except KubellmError:
                raise
            except Exception as exc:
                raise _unreadable(dep, exc) from None
            if not self.health.clear(dep.name):
                await self.health.success(dep.name)
            stats.observe(time.monotonic() - call.started, None)
            self.finish(call, dep, 200, parsed.usage, None, [parsed.body])
            if key is not None:
                await self._store(call, key, pack_answer(wire, parsed.body))
            return Answer(headers=headers, body=parsed.body, usage=parsed.usage, wire=wire)
        except KubellmError as err:
            # Upstreams quote the credential they were sent, in any field: scrub the error before
            # the retry loop, the client, a log line or the other Anthropic-shaped endpoint sees it.
            raise redact.scrub_error(err) from None
        finally:
            if not handed_off:
                stats.in_flight -= 1

    def _first_token_timeout(self, dep: Deployment) -> UpstreamTimeoutError:
        return UpstreamTimeoutError(
            f"deployment {dep.name!r} sent nothing before the first-token timeout", code="first_token_timeout"
        )

    async def _open_stream(
        self,
        call: Call,
        dep: Deployment,
        resp: UpstreamResponse,
        ctx: RequestContext,
        headers: dict[str, str],
        key: str | None,
    ) -> Stream:
        """Read until the first chunk is ready, so that failures before any byte can still be retried."""
        translator = dep.provider.stream_translator(ctx)
        chunks = resp.iter_chunks().__aiter__()
        first: list[Payload] = []
        ended = False
        try:
            try:
                async with asyncio.timeout(ctx.effective_timeouts.first_token):
                    while not first and translator.error is None:
                        try:
                            data = await anext(chunks)
                        except StopAsyncIteration:
                            first = translator.finish()
                            ended = True
                            break
                        first = translator.feed(data)
            except TimeoutError:
                raise self._first_token_timeout(dep) from None
            except KubellmError:
                raise
            except Exception as exc:
                raise _unreadable(dep, exc) from None
            if translator.error is not None and not first:
                raise translator.error
        except BaseException:
            resp.close()
            raise
        events = self._relay(call, dep, resp, chunks, translator, first, ended, key, ctx.operation)
        return Stream(headers=stream_headers(headers), events=events, wire=ctx.operation)

    async def _relay(
        self,
        call: Call,
        dep: Deployment,
        resp: UpstreamResponse,
        chunks: AsyncIterator[bytes],
        translator: StreamTranslator,
        first: list[Payload],
        ended: bool,
        key: str | None,
        wire: Operation,
    ) -> AsyncIterator[StreamEvent]:
        status = 200
        finished = False
        ttft: float | None = None
        # Payload references are cheap to keep; they feed the cache and, if the provider reports no
        # usage, the tokenizer.
        keep: Batch = []
        renew_at = time.monotonic() + LEASE_RENEW_SECONDS
        try:
            yield self._batch(first, keep)
            ttft = time.monotonic() - call.started
            if not ended and translator.error is None:
                async for data in chunks:
                    out = translator.feed(data)
                    if out:
                        yield self._batch(out, keep)
                    if translator.error is not None:
                        break
                    if call.ticket is not None and call.ticket.leases and time.monotonic() > renew_at:
                        renew_at = time.monotonic() + LEASE_RENEW_SECONDS
                        await self.meter.renew(call.ticket)
                tail = translator.finish()
                if tail:
                    yield self._batch(tail, keep)
            if translator.error is not None:
                raise translator.error
            # Record before the client can see the end of the stream, so a crash cannot lose it.
            finished = True
            self._finish_stream(call, dep, 200, translator, ttft, keep)
            if key is not None:  # packing decodes every payload: only for the cache
                await self._store(call, key, pack_stream(wire, keep))
        except Exception as exc:
            err = redact.scrub_error(exc if isinstance(exc, KubellmError) else _unreadable(dep, exc))
            if isinstance(err, UpstreamStreamTruncatedError):
                logging.getLogger("kubellm.router").warning(
                    "deployment %r: %s (after %d events)", dep.name, err.message, len(keep)
                )
            status = err.status
            call.error = err
            metrics.ERRORS.labels(call.group.name, err.type).inc()
            if _counts_against_deployment(err):
                await self.health.failure(dep.name)
            yield StreamError(error=err)
        except BaseException:
            status = 499
            raise
        finally:
            resp.close()
            if not finished:
                self._finish_stream(call, dep, status, translator, ttft, keep)

    def _finish_stream(
        self,
        call: Call,
        dep: Deployment,
        status: int,
        translator: StreamTranslator,
        ttft: float | None,
        payloads: Batch,
    ) -> None:
        stats = self.stats[dep.name]
        stats.in_flight -= 1
        if status == 200:
            stats.observe(time.monotonic() - call.started, ttft)
        data = [p if isinstance(p, bytes) else p.data for p in payloads]
        self.finish(call, dep, status, translator.usage, ttft, data)

    @staticmethod
    def _batch(payloads: list[Payload], keep: Batch) -> Batch:
        """The translator's payloads as bytes (or named events), scrubbed, and kept for the cache
        and the tokenizer (references are cheap to keep)."""
        batch: Batch = [p if isinstance(p, bytes | Event) else orjson.dumps(p) for p in payloads]
        if redact.active():
            for i, p in enumerate(batch):
                # Only a payload with an "error" key can carry an upstream's error text (error events
                # themselves become KubellmErrors, scrubbed in _relay). The substring test is a memchr
                # over bytes already in cache; a full scan per chunk would cost more than the relay.
                data = p if isinstance(p, bytes) else p.data
                if b'"error"' in data:
                    clean = redact.scrub_payload(data)
                    batch[i] = clean if isinstance(p, bytes) else Event(p.name, clean)
        keep.extend(batch)
        return batch

    # -- cache ---------------------------------------------------------------------------------

    def _cache_key(self, call: Call) -> str | None:
        if self.cache is None or not (call.options.cache_read or call.options.cache_write):
            return None
        if call.operation in UNCACHED:
            return None
        opted = call.group.caches or (call.key is not None and call.key.config.cache)
        if not opted:
            return None
        # Forwarded headers (betas) change the answer, so they are part of the key.
        body = {**call.body, "_headers": call.forward_headers} if call.forward_headers else call.body
        return cache_key(call.group.name, call.operation.value, call.stream, body)

    async def _store(self, call: Call, key: str | None, value: bytes) -> None:
        if key is not None and call.options.cache_write and self.cache is not None:
            await write_quietly(self.cache, key, value)

    def _replay(self, call: Call, hit: bytes) -> Answer | Stream | None:
        headers = {**call.base_headers(), "x-kubellm-deployment": "cache", "x-kubellm-cache": "hit"}
        replayed = replay(hit, headers)
        if replayed is None:
            return None
        metrics.CACHE_HITS.labels(call.group.name).inc()
        self.finish(call, None, 200, None, None, cached=True)
        return replayed
