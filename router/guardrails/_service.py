"""The guardrails service: runs a request's pre-call hooks on the prompt and its post-call hooks on
the typed outcome (an :class:`Answer` or a :class:`Stream`), before any inbound API renders it.

Which hooks a request passes: its model group's ``guardrails``, then its key's, in that order and
each name once. The definitions are compiled with the config (:func:`compile_guardrails`, called
by ``build_state``), so a reload that breaks one is refused; this service only holds the webhook
connection pool, built once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from .._errors import KubellmError
from ..config._schema import RouterConfig
from ..core._outcome import Answer, Failure, Outcome, Stream
from ..observability import _metrics as metrics
from ..providers import Operation
from ..upstream import _client as http
from ._builtin import Check, GuardrailUnavailableError, MaxPromptSize, Redact, compile_builtin, denied
from ._stream import Refused, StreamGuard, buffered, guarded
from ._text import answer_texts, map_answer, map_request, request_texts
from ._webhook import Verdict, Webhook, WebhookFailed, compile_webhook

__all__ = ["Guard", "Guardrails", "compile_guardrails"]

log = logging.getLogger("kubellm.router")

Guard = Check | Redact | MaxPromptSize | Webhook


def compile_guardrails(config: RouterConfig) -> dict[str, Guard]:
    """Every guardrail of ``config`` by name; raises ConfigError naming the field."""
    out: dict[str, Guard] = {}
    for i, guard in enumerate(config.guardrails):
        where = f"guardrails[{i}]"
        out[guard.name] = compile_webhook(guard, where) if guard.type == "webhook" else compile_builtin(guard)
    return out


def decided(name: str, phase: str, decision: str) -> None:
    metrics.child(metrics.GUARDRAIL_DECISIONS, name, phase, decision).inc()


@dataclass(frozen=True, slots=True)
class Context:
    """Who asks: what the webhook is told besides the text."""

    operation: Operation
    model: str
    key: str
    request_id: str

    def payload(self, name: str, stage: str) -> dict[str, Any]:
        return {
            "guardrail": name,
            "stage": stage,
            "operation": self.operation.value,
            "model": self.model,
            "key": self.key,
            "requestId": self.request_id,
        }


def _applying(guard: Redact) -> Callable[[str, str], str]:
    return lambda _role, text: guard.apply(text)


def chain(guards: dict[str, Guard], *lists: Sequence[str]) -> list[Guard]:
    """The guards named by ``lists`` (the group's, then the key's), each once, in order."""
    seen: dict[str, Guard] = {}
    for names in lists:
        for name in names:
            if name not in seen and name in guards:
                seen[name] = guards[name]
    return list(seen.values())


class Guardrails:
    """Runs guardrails; owns the webhook connection pool (closed at shutdown)."""

    def __init__(self) -> None:
        self.pool = http.ConnectionPool(max_idle_per_origin=64)

    async def stop(self) -> None:
        await self.pool.close()

    # -- the webhook ---------------------------------------------------------------------------

    async def _ask(
        self, hook: Webhook, ctx: Context, stage: str, field: str, items: list[Any]
    ) -> Verdict | None:
        """The webhook's verdict, or None when it failed and is fail-open; raises when fail-closed."""
        payload = {**ctx.payload(hook.name, stage), field: items}
        try:
            return await hook.ask(self.pool, payload, len(items))
        except WebhookFailed as exc:
            if hook.fail_open:
                decided(hook.name, stage, "fail_open")
                log.warning(
                    "guardrail %r (%s): %s; letting the request through (failOpen)", hook.name, stage, exc
                )
                return None
            decided(hook.name, stage, "fail_closed")
            log.warning("guardrail %r (%s): %s; refusing the request", hook.name, stage, exc)
            what = "prompt" if stage == "pre" else "answer"
            raise GuardrailUnavailableError(
                f"guardrail {hook.name!r} could not check the {what}: {exc}",
                param=hook.name,
            ) from None

    # -- pre-call ------------------------------------------------------------------------------

    async def pre(self, guards: list[Guard], body: dict[str, Any], ctx: Context) -> dict[str, Any]:
        """The prompt after every pre-call guardrail; raises the refusal (400/403/503)."""
        for guard in guards:
            if "pre" not in guard.stages:
                continue
            if isinstance(guard, MaxPromptSize):
                err = guard.check([t for _, t in request_texts(body, ctx.operation)])
                decided(guard.name, "pre", "allow" if err is None else "deny")
                if err is not None:
                    raise err
            elif isinstance(guard, Check):
                if any(guard.violation(t) for _, t in request_texts(body, ctx.operation)):
                    decided(guard.name, "pre", "deny")
                    raise denied(guard.name, "pre", guard.reason)
                decided(guard.name, "pre", "allow")
            elif isinstance(guard, Redact):
                new = map_request(body, ctx.operation, _applying(guard))
                decided(guard.name, "pre", "redact" if new != body else "allow")
                body = new
            else:
                body = await self._pre_webhook(guard, body, ctx)
        return body

    async def _pre_webhook(self, hook: Webhook, body: dict[str, Any], ctx: Context) -> dict[str, Any]:
        texts = request_texts(body, ctx.operation)
        messages = [{"role": role, "content": text} for role, text in texts]
        verdict = await self._ask(hook, ctx, "pre", "messages", messages)
        if verdict is None:
            return body
        decided(hook.name, "pre", verdict.action)
        if verdict.action == "deny":
            raise denied(hook.name, "pre", verdict.reason or "the guardrail service refused it")
        if verdict.action == "allow" or verdict.texts is None:
            return body
        replacements = iter(verdict.texts)
        return map_request(body, ctx.operation, lambda _role, _text: next(replacements))

    # -- post-call -----------------------------------------------------------------------------

    async def post(self, guards: list[Guard], outcome: Outcome, ctx: Context) -> Outcome:
        """The outcome after every post-call guardrail: a refusal becomes a :class:`Failure` (or, on
        a stream already under way, its last event)."""
        guards = [g for g in guards if "post" in g.stages and not isinstance(g, MaxPromptSize)]
        if not guards or isinstance(outcome, Failure) or outcome.wire is Operation.EMBEDDING:
            return outcome
        try:
            if isinstance(outcome, Answer):
                return await self._post_answer(guards, outcome, ctx)
            return await self._post_stream(guards, outcome, ctx)
        except KubellmError as err:
            metrics.ERRORS.labels(ctx.model, err.type).inc()
            return Failure(error=err, headers=outcome.headers)

    async def _post_answer(self, guards: list[Guard], answer: Answer, ctx: Context) -> Answer:
        try:
            doc = answer.doc()
        except orjson.JSONDecodeError:
            return answer
        original = doc
        for guard in guards:
            if isinstance(guard, Check):
                if any(guard.violation(t) for t in answer_texts(doc, answer.wire)):
                    decided(guard.name, "post", "deny")
                    raise denied(guard.name, "post", guard.reason)
                decided(guard.name, "post", "allow")
            elif isinstance(guard, Redact):
                new = map_answer(doc, answer.wire, _applying(guard))
                decided(guard.name, "post", "redact" if new != doc else "allow")
                doc = new
            elif isinstance(guard, Webhook):
                doc = await self._post_webhook(guard, doc, answer.wire, ctx)
        if doc is original:
            return answer
        return replace(answer, body=orjson.dumps(doc), _doc=[doc])

    async def _post_webhook(self, hook: Webhook, doc: Any, wire: Operation, ctx: Context) -> Any:
        verdict = await self._ask(hook, ctx, "post", "output", answer_texts(doc, wire))
        if verdict is None:
            return doc
        decided(hook.name, "post", verdict.action)
        if verdict.action == "deny":
            raise denied(hook.name, "post", verdict.reason or "the guardrail service refused it")
        if verdict.action == "allow" or verdict.texts is None:
            return doc
        replacements = iter(verdict.texts)
        return map_answer(doc, wire, lambda _role, _text: next(replacements))

    async def _post_stream(self, guards: list[Guard], stream: Stream, ctx: Context) -> Stream | Failure:
        builtin = StreamGuard(
            [g for g in guards if isinstance(g, Check)], [g for g in guards if isinstance(g, Redact)], decided
        )
        hooks = [g for g in guards if isinstance(g, Webhook)]
        if not hooks:
            # Built-ins run as the stream flows: a refusal part-way ends it with an error event.
            return replace(stream, events=guarded(stream.events, builtin, stream.wire, ctx.model))
        # A webhook judges the whole answer, so the stream is held until it is complete: a refusal
        # is still a proper 403 before the first byte.
        try:
            held = await buffered(stream.events, builtin, stream.wire)
        except Refused as refused:
            raise refused.error from None
        for hook in hooks:
            texts = held.texts()
            verdict = await self._ask(hook, ctx, "post", "output", texts)
            if verdict is None:
                continue
            decided(hook.name, "post", verdict.action)
            if verdict.action == "deny":
                raise denied(hook.name, "post", verdict.reason or "the guardrail service refused it")
            if verdict.action == "redact" and verdict.texts is not None:
                held.rewrite(verdict.texts)
        return replace(stream, events=held.replay())
