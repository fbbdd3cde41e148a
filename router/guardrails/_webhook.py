"""The external guardrail webhook: one POST per request and stage, with a timeout and fail-open or
fail-closed. The contract is in docs/guardrails.md.

The connection pool (the router's HTTP/1.1 client, :mod:`.._httpclient`, kept alive across
requests) belongs to the :class:`~._service.Guardrails` service, built once per process and
separate from the deployments' pool, so a guardrail service never shares connections or breakers
with the model deployments. A :class:`Webhook` itself is just the compiled config.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import orjson

from ..config._schema import ConfigError, GuardrailConfig
from ..upstream import _client as http
from ..upstream._client import _target  # type: ignore[attr-defined]
from ._builtin import stages_of


class WebhookFailed(Exception):
    """The webhook gave no usable answer (unreachable, timed out, non-2xx, malformed)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # allow | deny | redact
    reason: str | None
    #: ``redact``: the rewritten texts, one per text slot sent (``messages`` or ``output``).
    texts: list[str] | None


@dataclass(frozen=True, slots=True)
class Webhook:
    name: str
    stages: frozenset[str]
    url: str
    headers: dict[str, str]
    timeout: float
    fail_open: bool

    async def ask(self, pool: http.ConnectionPool, payload: dict[str, Any], slots: int) -> Verdict:
        """POST ``payload``; raises :class:`WebhookFailed` when no usable verdict came back in time."""
        body = orjson.dumps(payload)
        headers = {**self.headers, "content-type": "application/json", "accept": "application/json"}
        try:
            async with asyncio.timeout(self.timeout):
                resp = await pool.request(
                    "POST", self.url, headers, body, connect_timeout=self.timeout, total_timeout=self.timeout
                )
                try:
                    raw = await resp.read()
                finally:
                    resp.close()
        except TimeoutError:
            raise WebhookFailed(f"no answer within {self.timeout:g}s") from None
        except (http.ClientError, OSError, ValueError) as exc:
            raise WebhookFailed(f"request failed: {type(exc).__name__}") from None
        if not 200 <= resp.status < 300:
            raise WebhookFailed(f"answered HTTP {resp.status}")
        return _verdict(raw, payload["stage"], slots)


def _verdict(raw: bytes, stage: str, slots: int) -> Verdict:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise WebhookFailed("answered with a body that is not JSON") from None
    if not isinstance(doc, dict) or doc.get("action") not in ("allow", "deny", "redact"):
        raise WebhookFailed("answered without an action of allow, deny or redact")
    reason = doc.get("reason")
    reason = reason[:500] if isinstance(reason, str) and reason else None
    if doc["action"] != "redact":
        return Verdict(doc["action"], reason, None)
    field = "messages" if stage == "pre" else "output"
    items = doc.get(field)
    if items is None and stage == "post" and slots == 1 and isinstance(doc.get("text"), str):
        return Verdict("redact", reason, [doc["text"]])
    texts = (
        [m.get("content") if isinstance(m, dict) else m for m in items] if isinstance(items, list) else None
    )
    if texts is None or len(texts) != slots or not all(isinstance(t, str) for t in texts):
        raise WebhookFailed(f"answered redact without {field}: a list of {slots} texts")
    return Verdict("redact", reason, [str(t) for t in texts])


def compile_webhook(config: GuardrailConfig, where: str) -> Webhook:
    assert config.url is not None
    headers: dict[str, str] = {}
    if config.headers_env is not None:
        raw = os.environ.get(config.headers_env)
        if not raw:
            raise ConfigError(f"{where}.headersEnv: environment variable {config.headers_env} is not set")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
            raise ConfigError(f"{where}.headersEnv: {config.headers_env} must hold a JSON object of strings")
        headers = {str(k): v for k, v in doc.items()}
    try:
        _target(config.url)  # refuses what the client cannot send to
    except Exception:
        raise ConfigError(f"{where}.url: not an http(s) URL the router can call") from None
    return Webhook(
        config.name, stages_of(config), config.url, headers, config.timeout_seconds, config.fail_open
    )
