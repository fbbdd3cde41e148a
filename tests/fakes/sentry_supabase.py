"""Fake Sentry and Supabase ingestion, each enforcing its documented protocol.

* :class:`FakeSentry`: ``POST /api/{project_id}/envelope/`` with ``X-Sentry-Auth: Sentry
  sentry_version=7, sentry_key=..., sentry_client=...``; the body is an envelope (a JSON header
  line, then items: a JSON item header line with ``type`` and ``length``, then exactly ``length``
  bytes, then a newline or the end). At most one ``event`` item per envelope, whose ``event_id``
  (32 hex digits) must match the envelope header's; events need ``timestamp`` and ``platform``, a
  valid ``level``, a list-of-strings ``fingerprint`` and tags within Sentry's key and value sizes.
* :class:`FakeSupabase`: PostgREST under ``/rest/v1/{table}``: the ``apikey`` header and a bearer
  token, a JSON object or array body whose objects share their keys (PGRST102), known columns only
  (PGRST204), column types, the table's primary key (23505 and 409, unless
  ``Prefer: resolution=ignore-duplicates`` with ``on_conflict`` on it), ``Prefer: return=minimal``
  (201, no body) or ``return=representation``. Every error body is PostgREST's
  ``{"code", "details", "hint", "message"}``.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.sink_receivers import Receiver, is_iso

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_LEVELS = frozenset({"fatal", "error", "warning", "info", "debug"})
_PLATFORMS = frozenset({"python", "other", "node", "javascript", "go", "java"})


def parse_auth(header: str) -> dict[str, str] | None:
    if not header.startswith("Sentry "):
        return None
    pairs = {}
    for part in header[len("Sentry ") :].split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return None
        pairs[key] = value
    return pairs


def parse_envelope(raw: bytes) -> tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]]]:
    """(header, [(item header, payload)]); raises ValueError on a malformed envelope."""
    line, _, rest = raw.partition(b"\n")
    header = orjson.loads(line)
    if not isinstance(header, dict):
        raise ValueError("envelope header must be a JSON object")
    items = []
    while rest:
        line, sep, rest = rest.partition(b"\n")
        if not line and not sep:
            break
        item = orjson.loads(line)
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ValueError("item header needs a type")
        length = item.get("length")
        if isinstance(length, int):
            if len(rest) < length:
                raise ValueError("item payload shorter than its length")
            payload, rest = rest[:length], rest[length:]
            if rest and not rest.startswith(b"\n"):
                raise ValueError("length-prefixed payload not followed by a newline")
            rest = rest[1:]
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((item, payload))
    return header, items


def event_problem(event: Any) -> str | None:
    if not isinstance(event, dict):
        return "event must be an object"
    if not isinstance(event.get("event_id"), str) or not _HEX32.match(event["event_id"]):
        return "event_id must be 32 hex digits"
    if not (is_iso(event.get("timestamp")) or isinstance(event.get("timestamp"), int | float)):
        return "timestamp is required"
    if event.get("platform") not in _PLATFORMS:
        return "platform is required"
    if event.get("level", "error") not in _LEVELS:
        return "invalid level"
    fingerprint = event.get("fingerprint", [])
    if not isinstance(fingerprint, list) or not all(isinstance(p, str) and p for p in fingerprint):
        return "fingerprint must be a list of non-empty strings"
    tags = event.get("tags", {})
    if not isinstance(tags, dict) or not all(
        isinstance(v, str) and 0 < len(k) <= 32 and len(v) <= 200 for k, v in tags.items()
    ):
        return "tags must map keys of up to 32 characters to strings of up to 200"
    values = (event.get("exception") or {}).get("values")
    if not isinstance(values, list) or not all(
        isinstance(v, dict) and isinstance(v.get("type"), str) and isinstance(v.get("value"), str)
        for v in values
    ):
        return "exception.values must be a list of {type, value}"
    return None


class FakeSentry(Receiver):
    path = "/api/{project_id}/envelope/"

    def __init__(self, public_key: str = "0123456789abcdef0123456789abcdef", project_id: str = "42") -> None:
        super().__init__()
        self.public_key, self.project_id = public_key, project_id
        self.headers: list[dict[str, str]] = []
        self.rejected: list[str] = []

    def dsn(self) -> str:
        host = self.base_url.split("://", 1)[1]
        return f"http://{self.public_key}@{host}/{self.project_id}"

    def _no(self, status: int, detail: str) -> web.Response:
        self.rejected.append(detail)
        return web.json_response({"detail": detail}, status=status)

    async def _handle(self, request: web.Request) -> web.Response:
        fail = await self.gate()
        if fail is not None:
            headers = {"Retry-After": "0"} if fail == 429 else {}
            return web.json_response({"detail": "injected failure"}, status=fail, headers=headers)
        if request.match_info["project_id"] != self.project_id:
            return self._no(404, "unknown project")
        auth = parse_auth(request.headers.get("X-Sentry-Auth", ""))
        if auth is None:
            return self._no(403, "missing authorization information")
        if auth.get("sentry_version") != "7" or not re.match(r"^kubellm/\S+$", auth.get("sentry_client", "")):
            return self._no(400, "bad sentry_version or sentry_client")
        if auth.get("sentry_key") != self.public_key:
            return self._no(401, "invalid api key")
        if request.content_type not in ("application/x-sentry-envelope", "text/plain", ""):
            return self._no(415, f"unsupported content type {request.content_type}")
        raw = await request.read()
        try:
            header, items = parse_envelope(raw)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return self._no(400, f"invalid envelope: {exc}")
        events = [orjson.loads(p) for item, p in items if item["type"] == "event"]
        if len(events) > 1:
            return self._no(400, "more than one event in an envelope")
        for event in events:
            problem = event_problem(event)
            if problem:
                return self._no(400, problem)
            if header.get("event_id") != event["event_id"]:
                return self._no(400, "envelope event_id does not match the event's")
        self.headers.append(dict(request.headers))
        self.keep(raw, events)
        return web.json_response({"id": header.get("event_id")})


def _type_ok(kind: str, value: Any) -> bool:
    if value is None:
        return "not null" not in kind and "primary key" not in kind
    base = kind.split()[0]
    checks: dict[str, Any] = {
        "text": lambda v: isinstance(v, str),
        "timestamptz": is_iso,
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "double": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "numeric": lambda v: isinstance(v, int | float | str) and not isinstance(v, bool),
        "jsonb": lambda v: True,
    }
    return bool(checks[base](value))


class FakeSupabase(Receiver):
    path = "/rest/v1/{table}"

    def __init__(
        self, columns: dict[str, str], api_key: str = "sb-service-key", table: str = "kubellm_requests"
    ):
        super().__init__()
        self.columns, self.api_key, self.table = dict(columns), api_key, table
        self.rows: dict[str, dict[str, Any]] = {}
        self.prefer: list[str] = []
        self.rejected: list[dict[str, Any]] = []

    @property
    def base(self) -> str:
        return self.base_url

    def _error(self, status: int, code: str, message: str, hint: str | None = None) -> web.Response:
        body = {"code": code, "details": None, "hint": hint, "message": message}
        self.rejected.append(body)
        return web.json_response(body, status=status)

    async def _handle(self, request: web.Request) -> web.Response:
        fail = await self.gate()
        if fail is not None:
            return self._error(fail, "PGRST000", "injected failure")
        if request.headers.get("apikey") != self.api_key:
            return self._error(
                401,
                "PGRST301",
                "Invalid API key",
                "Double check your Supabase `anon` or `service_role` API key.",
            )
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401, "PGRST301", "JWT could not be decoded")
        if request.match_info["table"] != self.table:
            return self._error(
                404,
                "PGRST205",
                f"Could not find the table 'public.{request.match_info['table']}' in the schema cache",
            )
        if request.content_type != "application/json":
            return self._error(
                415, "PGRST107", f"None of these media types are available: {request.content_type}"
            )
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "PGRST102", "Empty or invalid json")
        rows = doc if isinstance(doc, list) else [doc]
        if not all(isinstance(r, dict) for r in rows) or len({frozenset(r) for r in rows}) > 1:
            return self._error(400, "PGRST102", "All object keys must match")
        prefer = {p.strip() for p in request.headers.get("Prefer", "").split(",") if p.strip()}
        self.prefer.append(request.headers.get("Prefer", ""))
        for r in rows:
            for name, value in r.items():
                if name not in self.columns:
                    return self._error(
                        400,
                        "PGRST204",
                        f"Could not find the '{name}' column of '{self.table}' in the schema cache",
                    )
                if not _type_ok(self.columns[name], value):
                    return self._error(400, "22P02", f"invalid input for column {name}: {value!r}")
            for name, kind in self.columns.items():
                if name not in r and "not null" in kind:
                    return self._error(
                        400, "23502", f'null value in column "{name}" violates not-null constraint'
                    )
        ignore = "resolution=ignore-duplicates" in prefer and request.query.get("on_conflict") == "request_id"
        fresh = []
        for r in rows:
            if r["request_id"] in self.rows or r["request_id"] in {f["request_id"] for f in fresh}:
                if ignore:
                    continue
                return self._error(409, "23505", 'duplicate key value violates unique constraint "pkey"')
            fresh.append(r)
        for r in fresh:
            self.rows[r["request_id"]] = r
        self.keep(orjson.dumps(rows), fresh)
        if "return=representation" in prefer:
            return web.json_response(fresh, status=201)
        return web.Response(status=201)
