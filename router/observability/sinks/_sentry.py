"""Sentry: failed requests as error events, sent to the project's envelope endpoint.

No SDK: the DSN ``{scheme}://{public_key}@{host}[/{path}]/{project_id}`` names the endpoint
``{scheme}://{host}[/{path}]/api/{project_id}/envelope/``, and every POST carries
``X-Sentry-Auth: Sentry sentry_version=7, sentry_key={public_key}, sentry_client=kubellm/{version}``.
An envelope holds at most one event, so a batch is one POST per event (accepted ones are not sent
again on a retry). The event id is derived from the request id, so a resent event is the same event.

Only failures are queued (:meth:`SentrySink.offer`): answers of 500 and above, and upstream errors
and timeouts whatever their status. Successes and client mistakes (4xx the router decided) never
reach the queue. Events group by what failed, not by message text: the fingerprint is the error
type, its code, the model group and the deployment, so one broken deployment is one issue however
its upstream words the error. The error text, which may quote the upstream and so the prompt, is in
the event only when the sink has ``includePayloads`` and the key or deployment opted into payload
logging; the request body and answer likewise. Neither the DSN nor any key ever is.
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from ._base import HttpSink, Sink, SinkSetupError, env_headers, env_secret
from ._record import Facts, Record, iso
from ._vendors import sink_options

if TYPE_CHECKING:
    from ...config._schema import SinkConfig

ENVELOPE = "application/x-sentry-envelope"
#: Errors that say something about an upstream, whatever status they ended in.
UPSTREAM_KINDS = frozenset({"upstream_error", "timeout_error"})
#: Sentry's limits on tag keys and values; longer ones are dropped by Sentry, so they are cut here.
TAG_KEY_MAX, TAG_VALUE_MAX = 32, 200


def parse_dsn(dsn: str) -> tuple[str, str]:
    """(envelope URL, public key) of a DSN; the error never quotes the DSN, which holds the key."""
    try:
        parts = urlsplit(dsn.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        raise SinkSetupError("the Sentry DSN is not a URL") from None
    path, _, project = parts.path.rstrip("/").rpartition("/")
    if parts.scheme not in ("http", "https") or not host or not parts.username:
        raise SinkSetupError("the Sentry DSN must look like https://<public_key>@<host>/<project_id>")
    if not project.isdigit():
        raise SinkSetupError("the Sentry DSN must end with the numeric project id")
    netloc = host if port is None else f"{host}:{port}"
    if ":" in host:  # an IPv6 literal
        netloc = f"[{host}]" if port is None else f"[{host}]:{port}"
    return f"{parts.scheme}://{netloc}{path}/api/{project}/envelope/", parts.username


def is_reported(status: int, kind: str | None) -> bool:
    """Whether a finished request is an error Sentry should see."""
    return status >= 500 or (status >= 400 and kind in UPSTREAM_KINDS)


def _tags(pairs: dict[str, Any]) -> dict[str, str]:
    return {k[:TAG_KEY_MAX]: str(v)[:TAG_VALUE_MAX] for k, v in pairs.items() if v is not None and v != ""}


class SentrySink(HttpSink):
    kind = "sentry"
    content_type = ENVELOPE

    def __init__(self, name: str, cfg: SinkConfig, dsn: str) -> None:
        from .... import __version__

        url, public_key = parse_dsn(dsn)
        self.client = f"kubellm/{__version__}"
        auth = f"Sentry sentry_version=7, sentry_key={public_key}, sentry_client={self.client}"
        super().__init__(
            name, url, {**env_headers(cfg.headers_env), "X-Sentry-Auth": auth}, **sink_options(cfg)
        )
        self.include_payloads = cfg.include_payloads
        self.environment = cfg.environment
        self.release = f"kubellm@{__version__}"
        self.server_name = socket.gethostname()

    def offer(self, record: Record) -> None:
        # On the request path: two attribute reads decide, and only failures take queue space.
        error = record.call.error
        if is_reported(record.status, error.type if error is not None else None):
            super().offer(record)

    def event(self, f: Facts) -> dict[str, Any]:
        kind = f.error_kind or ("upstream_error" if f.deployment else "api_error")
        code = f.error_code or f.error_type or str(f.status)
        deployment = f.deployment or "none"
        exhausted = len(f.groups_tried) > 1
        where = f"deployment {deployment!r}" if f.deployment else "no deployment"
        value = (
            f"HTTP {f.status} ({code}) for model {f.model_group!r} from {where} after {f.attempts} attempts"
        )
        if exhausted:
            value += f"; fallbacks ran out ({' -> '.join(f.groups_tried)})"
        payloads = self.include_payloads and f.payloads_allowed
        if payloads and f.error_message:
            value += f": {f.error_message}"
        event: dict[str, Any] = {
            "event_id": uuid.uuid5(uuid.NAMESPACE_URL, f"kubellm:{f.request_id}").hex,
            "timestamp": iso(f.end_ns),
            "platform": "python",
            "level": "error",
            "logger": "kubellm.router",
            "server_name": self.server_name,
            "release": self.release,
            "transaction": f"{f.operation} {f.model_group}",
            "fingerprint": ["kubellm", kind, code, f.model_group, deployment],
            "exception": {
                "values": [
                    {
                        "type": code,
                        "value": value,
                        "module": kind,
                        "mechanism": {"type": "kubellm", "handled": True},
                    }
                ]
            },
            "tags": _tags(
                {
                    "model_group": f.model_group,
                    "deployment": deployment,
                    "provider": f.provider,
                    "status": f.status,
                    "error.type": kind,
                    "error.code": code,
                    "key": f.key,
                    "key.team": f.key_team,
                    "stream": str(f.stream).lower(),
                    "fallbacks_exhausted": str(exhausted).lower(),
                    "request_id": f.request_id,
                }
            ),
            "contexts": {
                "kubellm": {
                    "request_id": f.request_id,
                    "operation": f.operation,
                    "model_group": f.model_group,
                    "groups_tried": list(f.groups_tried) or [f.model_group],
                    "deployment": f.deployment,
                    "upstream_model": f.upstream_model,
                    "server_address": f.server_address,
                    "attempts": f.attempts,
                    "latency_ms": f.latency_ms,
                    "ttft_ms": f.ttft_ms,
                    "stream": f.stream,
                }
            },
        }
        if self.environment:
            event["environment"] = self.environment
        if f.trace_context is not None:
            trace = f.trace_context[0].split("-")
            if len(trace) == 4 and len(trace[1]) == 32 and len(trace[2]) == 16:
                event["contexts"]["trace"] = {"trace_id": trace[1], "span_id": trace[2]}
        if payloads:
            event["extra"] = {"request": f.input, "response": f.answer}
        return event

    def envelope(self, event: dict[str, Any]) -> bytes:
        payload = orjson.dumps(event)
        header = {
            "event_id": event["event_id"],
            "sent_at": iso(time.time_ns()),
            "sdk": {"name": "kubellm", "version": self.client.partition("/")[2]},
        }
        item = {"type": "event", "length": len(payload), "content_type": "application/json"}
        return b"\n".join([orjson.dumps(header), orjson.dumps(item), payload]) + b"\n"

    def encode(self, batch: list[Record]) -> list[bytes]:
        return [self.envelope(self.event(r.facts)) for r in batch]

    @classmethod
    def from_config(cls, name: str, cfg: SinkConfig) -> Sink:
        return cls(name, cfg, env_secret(cfg.dsn_env, "dsnEnv (Sentry DSN)"))
