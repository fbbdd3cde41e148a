"""Supabase: one row per finished request, inserted through the project's REST API (PostgREST).

A batch is one ``POST {url}/rest/v1/{table}?on_conflict=request_id`` with a JSON array of rows,
the ``apikey`` and ``Authorization: Bearer`` headers and
``Prefer: return=minimal,resolution=ignore-duplicates``: PostgREST inserts the rows in one
statement and answers 201 with no body. ``request_id`` is the table's primary key, so a batch resent
after a timeout (the first try may have been committed) inserts nothing twice instead of failing
with 409. Every row has every column (null when unknown): PostgREST requires the objects of a bulk
insert to share their keys. The table's SQL is in docs/observability.md (:data:`COLUMNS` here).

A 4xx answer (a missing table or column, a type mismatch, a key without insert rights) will fail
the same way every time, so the batch is dropped and counted; 408, 429, 5xx and connection errors
are retried with backoff. The PostgREST error (``code``, ``message``, ``hint``) is logged, never
the key.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from ._base import DeliveryError, HttpSink, Sink, SinkSetupError, env_headers, env_secret, log
from ._record import Facts, Record, iso, usage_event
from ._vendors import sink_options

if TYPE_CHECKING:
    from ...config._schema import SinkConfig

#: Column -> its Postgres type, in table order; the docs' CREATE TABLE is generated from this.
COLUMNS: dict[str, str] = {
    "request_id": "text primary key",
    "created_at": "timestamptz not null",
    "start_time": "timestamptz not null",
    "operation": "text not null",
    "model": "text not null",
    "model_group": "text not null",
    "deployment": "text",
    "provider": "text",
    "upstream_model": "text",
    "response_model": "text",
    "response_id": "text",
    "finish_reasons": "jsonb",
    "key": "text not null",
    "key_owner": "text",
    "key_team": "text",
    "key_metadata": "jsonb",
    "status": "integer not null",
    "error_type": "text",
    "error_code": "text",
    "stream": "boolean not null",
    "cached": "boolean not null",
    "attempts": "integer not null",
    "latency_ms": "double precision not null",
    "ttft_ms": "double precision",
    "prompt_tokens": "integer",
    "completion_tokens": "integer",
    "cached_tokens": "integer",
    "total_tokens": "integer",
    "usage_estimated": "boolean not null",
    "cost_usd": "numeric",
    "params": "jsonb",
    "request": "jsonb",
    "response": "text",
}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def table_sql(table: str = "kubellm_requests") -> str:
    """The CREATE TABLE statement for the rows this sink inserts."""
    columns = ",\n".join(f"  {name} {kind}" for name, kind in COLUMNS.items())
    return f"create table {table} (\n{columns}\n);"


def row(f: Facts, *, with_payloads: bool) -> dict[str, Any]:
    event = usage_event(f, with_payloads=with_payloads)
    event["created_at"] = iso(f.end_ns)
    event["error_code"] = f.error_code
    return {name: event[name] for name in COLUMNS}


class SupabaseSink(HttpSink):
    kind = "supabase"

    def __init__(self, name: str, cfg: SinkConfig, api_key: str) -> None:
        if not cfg.url:
            raise SinkSetupError("url (the Supabase project URL) is not configured")
        for what, value in (("table", cfg.table), ("schema", cfg.db_schema)):
            if value is not None and not _IDENTIFIER.match(value):
                raise SinkSetupError(f"{what} must be a plain SQL identifier")
        url = f"{cfg.url.rstrip('/')}/rest/v1/{quote(cfg.table)}?on_conflict=request_id"
        headers = {
            **env_headers(cfg.headers_env),
            "apikey": api_key,
            "Authorization": f"Bearer {api_key}",
            "Prefer": "return=minimal,resolution=ignore-duplicates",
        }
        if cfg.db_schema:
            headers["Content-Profile"] = cfg.db_schema  # PostgREST's way to name a non-public schema
        super().__init__(name, url, headers, **sink_options(cfg))
        self.include_payloads = cfg.include_payloads

    def encode(self, batch: list[Record]) -> bytes:
        return orjson.dumps([row(r.facts, with_payloads=self.include_payloads) for r in batch])

    async def deliver(self, prepared: Any) -> None:
        try:
            await super().deliver(prepared)
        except DeliveryError as err:
            if not err.retryable:
                self._explain(str(err))
            raise

    def _explain(self, status: str) -> None:
        body = self.last_body
        try:
            doc = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            log.warning(
                "sink %s: Supabase refused the rows (%s, code %s): %s%s",
                self.name,
                status,
                doc.get("code"),
                str(doc.get("message"))[:300],
                f" (hint: {str(doc['hint'])[:300]})" if doc.get("hint") else "",
            )

    @classmethod
    def from_config(cls, name: str, cfg: SinkConfig) -> Sink:
        return cls(name, cfg, env_secret(cfg.api_key_env, "apiKeyEnv (Supabase API key)"))
