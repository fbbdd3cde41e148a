"""A fake Amazon Bedrock Runtime that enforces the wire protocol: SigV4, the Converse schema, event streams.

* Every request's SigV4 signature is verified by recomputing it with botocore from the known
  test credentials over the request exactly as received (method, raw path, signed headers, body
  bytes), with AWS's own error types (``InvalidSignatureException``, ``UnrecognizedClientException``).
* Converse / ConverseStream bodies are validated against botocore's service model for
  ``bedrock-runtime`` (required members, unions with exactly one member, enums, patterns, ranges,
  base64 blobs, no unknown members), plus the conversation rules Bedrock enforces, with its own
  messages (:func:`validate_converse` is the plain function property tests call).
* ConverseStream answers are real ``application/vnd.amazon.eventstream`` frames with both CRCs,
  encoded here independently of the router's decoder (:func:`encode_frame`).
* InvokeModel serves Amazon Titan text embeddings and Cohere embed with their documented bodies.
* Anthropic models (``anthropic.`` in the model id) serve InvokeModel, InvokeModelWithResponseStream
  and CountTokens with Bedrock's Claude bodies (:mod:`tests.fakes.bedrock_anthropic`); their answers
  come from :attr:`FakeBedrock.claude`, a :class:`~tests.fakes.anthropic_upstream.FakeAnthropic`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import re
import struct
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.loaders import Loader

from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.bedrock_anthropic import is_claude, serve_claude
from tests.support.servers import FakeServer, ThreadedApp

SERVICE = Loader().load_service_model("bedrock-runtime", "service-2")
SHAPES: dict[str, Any] = SERVICE["shapes"]
AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<akid>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)"
    r"/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?Signature=(?P<sig>[0-9a-f]{64})"
)
BAD_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. Check your AWS "
    "Secret Access Key and signing method. Consult the service documentation for details."
)
ALTERNATE = (
    "A conversation must alternate between user and assistant roles. Make sure the conversation "
    "alternates between user and assistant roles and try again."
)
START_USER = (
    "A conversation must start with a user message. "
    "Try again with a conversation that starts with a user message."
)
NEEDS_TOOL_CONFIG = "The toolConfig field must be defined when using toolUse and toolResult content blocks."


class Invalid(Exception):
    """A request Bedrock answers with 400 ValidationException."""


# ------------------------------------------------------ the service model


def validate_shape(value: Any, shape_name: str, path: str) -> None:
    """Check a JSON value against a shape of botocore's bedrock-runtime model (rest-json wire form)."""
    shape = SHAPES[shape_name]
    kind = shape["type"]

    def fail(constraint: str) -> Invalid:
        return Invalid(
            f"1 validation error detected: Value at '{path}' failed to satisfy constraint: {constraint}"
        )

    if shape.get("document"):
        return
    if kind == "structure":
        if not isinstance(value, dict):
            raise fail("Member must be an object")
        members = {n: m for n, m in shape["members"].items() if "location" not in m}
        for name in value:
            if name not in members:
                raise Invalid(f"Unexpected field {name!r} at '{path}'")
        if shape.get("union"):
            set_members = [n for n in value if value[n] is not None]
            if len(set_members) != 1:
                raise fail(f"Member must have exactly one member set (union), got {set_members}")
        for name in shape.get("required", []):
            if name in members and value.get(name) is None:
                raise fail(f"Member '{name}' must not be null")
        for name, member in members.items():
            if value.get(name) is not None:
                validate_shape(value[name], member["shape"], f"{path}.{name}" if path else name)
    elif kind == "list":
        if not isinstance(value, list):
            raise fail("Member must be a list")
        if len(value) < shape.get("min", 0) or len(value) > shape.get("max", 10**9):
            raise fail(f"Member must have length between {shape.get('min', 0)} and {shape.get('max')}")
        for i, item in enumerate(value):
            validate_shape(item, shape["member"]["shape"], f"{path}.{i + 1}.member")
    elif kind == "map":
        if not isinstance(value, dict) or not shape.get("min", 0) <= len(value) <= shape.get("max", 10**9):
            raise fail("Member must be a map of the allowed size")
        for key, item in value.items():
            validate_shape(key, shape["key"]["shape"], f"{path}.key")
            validate_shape(item, shape["value"]["shape"], f"{path}.{key}")
    elif kind == "string":
        if not isinstance(value, str):
            raise fail("Member must be a string")
        if "enum" in shape and value not in shape["enum"]:
            raise fail(f"Member must satisfy enum value set: {shape['enum']}")
        if len(value) < shape.get("min", 0) or len(value) > shape.get("max", 10**9):
            raise fail(f"Member must have length between {shape.get('min', 0)} and {shape.get('max')}")
        if "pattern" in shape and not re.fullmatch(shape["pattern"], value):
            raise fail(f"Member must satisfy regular expression pattern: {shape['pattern']}")
    elif kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("Member must be an integer")
        if value < shape.get("min", -(2**63)) or value > shape.get("max", 2**63):
            raise fail(f"Member must have value between {shape.get('min')} and {shape.get('max')}")
    elif kind in ("float", "double"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("Member must be a number")
        if value < shape.get("min", float("-inf")) or value > shape.get("max", float("inf")):
            raise fail(f"Member must have value less than or equal to {shape.get('max')}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise fail("Member must be a boolean")
    elif kind == "blob":
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise fail("Member must be base64-encoded") from None
        if len(raw) < shape.get("min", 0):
            raise fail(f"Member must have length greater than or equal to {shape.get('min')}")


def _blocks(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [b[kind] for b in message["content"] if kind in b]


def validate_converse(body: Any) -> str | None:
    """Bedrock's verdict on a Converse / ConverseStream body: None if accepted, else its message."""
    try:
        validate_shape(body, "ConverseRequest", "")
        messages = body.get("messages")
        if not messages:
            raise Invalid("The messages field is required.")
        if messages[0]["role"] != "user":
            raise Invalid(START_USER)
        for i, message in enumerate(messages):
            if i and message["role"] == messages[i - 1]["role"]:
                raise Invalid(ALTERNATE)
            if not message["content"]:
                raise Invalid(
                    f"The content field in the Message object at messages.{i} is empty. Add a "
                    "ContentBlock object to the content field and try again."
                )
            for j, block in enumerate(message["content"]):
                if "text" in block and not block["text"].strip():
                    raise Invalid(
                        f"The text field in the ContentBlock object at messages.{i}.content.{j} is "
                        "blank. Add text to the text field, and try again."
                    )
                if ("image" in block or "document" in block or "toolResult" in block) and message[
                    "role"
                ] != "user":
                    raise Invalid(
                        f"messages.{i}.content.{j}: images, documents and tool results belong to user "
                        "messages"
                    )
                if "toolUse" in block:
                    if message["role"] != "assistant":
                        raise Invalid(
                            f"messages.{i}.content.{j}: toolUse blocks belong to assistant messages"
                        )
                    if not isinstance(block["toolUse"]["input"], dict):
                        raise Invalid(f"messages.{i}.content.{j}.toolUse.input must be a JSON object")
            results = [r["toolUseId"] for r in _blocks(message, "toolResult")]
            uses = [u["toolUseId"] for u in _blocks(messages[i - 1], "toolUse")] if i else []
            if len(results) > len(uses):
                raise Invalid(
                    f"The number of toolResult blocks at messages.{i}.content exceeds the number of "
                    "toolUse blocks of previous turn."
                )
            if uses and sorted(results) != sorted(uses):
                missing = [u for u in uses if u not in results]
                raise Invalid(
                    f"Expected toolResult blocks at messages.{i}.content for the following Ids: "
                    f"{', '.join(missing) or results}"
                )
        uses_tools = any("toolUse" in b or "toolResult" in b for m in messages for b in m["content"])
        config = body.get("toolConfig")
        if uses_tools and config is None:
            raise Invalid(NEEDS_TOOL_CONFIG)
        if config is not None:
            names = [t["toolSpec"]["name"] for t in config["tools"] if "toolSpec" in t]
            if len(names) != len(set(names)):
                raise Invalid("The toolConfig.tools field contains duplicate tool names.")
            for t in config["tools"]:
                schema = t.get("toolSpec", {}).get("inputSchema", {}).get("json")
                if "toolSpec" in t and (not isinstance(schema, dict) or schema.get("type") != "object"):
                    raise Invalid(
                        "The value at toolConfig.tools.0.toolSpec.inputSchema.json.type must be object"
                    )
            chosen = (config.get("toolChoice") or {}).get("tool")
            if chosen is not None and chosen["name"] not in names:
                raise Invalid(f"The tool {chosen['name']} in toolChoice is not in toolConfig.tools.")
        output = (body.get("outputConfig") or {}).get("textFormat")
        if output is not None:
            try:
                parsed = orjson.loads(output["structure"]["jsonSchema"]["schema"])
            except (orjson.JSONDecodeError, KeyError):
                raise Invalid(
                    "outputConfig.textFormat.structure.jsonSchema.schema is not valid JSON"
                ) from None
            if not isinstance(parsed, dict):
                raise Invalid("outputConfig.textFormat.structure.jsonSchema.schema must be a JSON object")
    except Invalid as exc:
        return str(exc)
    return None


# ------------------------------------------------------------- framing

_TYPED = {"byte": (2, ">b"), "short": (3, ">h"), "int": (4, ">i"), "long": (5, ">q"), "timestamp": (8, ">q")}


def _header(name: str, value: Any) -> bytes:
    raw_name = name.encode()
    out = struct.pack(">B", len(raw_name)) + raw_name
    if isinstance(value, bool):
        return out + bytes([0 if value else 1])
    if isinstance(value, str):
        data = value.encode()
        return out + struct.pack(">BH", 7, len(data)) + data
    if isinstance(value, bytes):
        return out + struct.pack(">BH", 6, len(value)) + value
    if isinstance(value, uuid.UUID):
        return out + bytes([9]) + value.bytes
    if isinstance(value, dt.datetime):
        return out + struct.pack(">Bq", 8, int(value.timestamp() * 1000))
    kind, number = value  # ("int", 7) and friends
    code, fmt = _TYPED[kind]
    return out + bytes([code]) + struct.pack(fmt, number)


def encode_frame(headers: dict[str, Any], payload: bytes) -> bytes:
    """One event-stream message: prelude, prelude CRC, headers, payload, message CRC."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    prelude = struct.pack(">II", 16 + len(head) + len(payload), len(head))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event_frame(event: str, body: dict[str, Any]) -> bytes:
    # Real events carry a "p" field of padding, so payload sizes do not leak the text.
    payload = orjson.dumps(
        {**body, "p": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0"[: 7 + len(event) % 9]}
    )
    return encode_frame(
        {":event-type": event, ":content-type": "application/json", ":message-type": "event"}, payload
    )


def exception_frame(kind: str, message: str) -> bytes:
    return encode_frame(
        {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"},
        orjson.dumps({"message": message}),
    )


def converse_stream_frames(
    blocks: list[dict[str, Any]], stop_reason: str, usage: dict[str, int]
) -> list[bytes]:
    """The frames ConverseStream sends for an answer made of these content blocks."""
    frames = [event_frame("messageStart", {"role": "assistant"})]
    for i, block in enumerate(blocks):
        if "text" in block:
            words = block["text"].split(" ")
            for n in range(0, len(words), 2):
                piece = " ".join(words[n : n + 2]) + (" " if n + 2 < len(words) else "")
                frames.append(
                    event_frame("contentBlockDelta", {"contentBlockIndex": i, "delta": {"text": piece}})
                )
        else:
            use = block["toolUse"]
            frames.append(
                event_frame(
                    "contentBlockStart",
                    {
                        "contentBlockIndex": i,
                        "start": {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}},
                    },
                )
            )
            text = orjson.dumps(use["input"]).decode()
            for n in range(0, len(text), 7):
                frames.append(
                    event_frame(
                        "contentBlockDelta",
                        {"contentBlockIndex": i, "delta": {"toolUse": {"input": text[n : n + 7]}}},
                    )
                )
        frames.append(event_frame("contentBlockStop", {"contentBlockIndex": i}))
    frames.append(event_frame("messageStop", {"stopReason": stop_reason}))
    frames.append(event_frame("metadata", {"usage": usage, "metrics": {"latencyMs": 321}}))
    return frames


# ---------------------------------------------------------------- server


@dataclass
class Reply:
    blocks: list[dict[str, Any]] | None = None
    stop_reason: str = "end_turn"
    usage: dict[str, int] | None = None
    #: For streams: send this many frames, then this exception event.
    exception: tuple[str, str] | None = None
    exception_after: int = 0


@dataclass
class Fault:
    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any


DEFAULT_TEXT = "Hello from Bedrock, how can I help you today?"
DEFAULT_USAGE = {"inputTokens": 12, "outputTokens": 10, "totalTokens": 22}


def aws_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"message": message}),
        content_type="application/json",
        headers={
            "x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-amzn-RequestId": str(uuid.uuid4()),
            **(headers or {}),
        },
    )


def embedding(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i % 32] - 127.5) / 127.5, 6) for i in range(dims)]


class FakeBedrock(FakeServer):
    def __init__(
        self,
        credentials: dict[str, tuple[str, str | None]],
        region: str = "us-east-1",
        api_key: str | None = None,
    ) -> None:
        #: access key id -> (secret, session token)
        self.credentials = credentials
        self.region = region
        self.api_key = api_key
        self.seen: list[Seen] = []
        self.replies: list[Reply] = []
        self.faults: list[Fault] = []
        #: What Claude models answer (scripts, faults, the prompt cache), never served itself.
        self.claude = FakeAnthropic()
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/model/{tail:.+}", self._handle)
        self.server = ThreadedApp(app)

    def queue(self, *items: Reply | Fault) -> None:
        with self._lock:
            for item in items:
                (self.replies if isinstance(item, Reply) else self.faults).append(item)

    def reset(self) -> None:
        with self._lock:
            self.replies.clear()
            self.faults.clear()
            self.seen.clear()

    def verify_signature(self, method: str, raw_path: str, headers: Any, body: bytes) -> web.Response | None:
        """AWS's SigV4 check: None if the signature is right, else AWS's error answer."""
        auth = headers.get("Authorization", "")
        if self.api_key is not None and auth == f"Bearer {self.api_key}":
            return None
        if not auth:
            return aws_error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        m = AUTH.fullmatch(auth)
        if m is None:
            return aws_error(
                403,
                "IncompleteSignatureException",
                "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters.",
            )
        if m["akid"] not in self.credentials:
            return aws_error(
                403, "UnrecognizedClientException", "The security token included in the request is invalid."
            )
        secret, token = self.credentials[m["akid"]]
        if headers.get("X-Amz-Security-Token") != token:
            return aws_error(
                403, "UnrecognizedClientException", "The security token included in the request is invalid."
            )
        if m["service"] != "bedrock" or m["region"] != self.region:
            return aws_error(
                403,
                "InvalidSignatureException",
                f"Credential should be scoped to a valid region and "
                f"to correct service: 'bedrock'. (got {m['region']}/{m['service']})",
            )
        amz_date = headers.get("X-Amz-Date", "")
        try:
            when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            return aws_error(403, "IncompleteSignatureException", "Date must be in ISO-8601 'basic format'.")
        if abs((dt.datetime.now(dt.UTC) - when).total_seconds()) > 300 or m["date"] != amz_date[:8]:
            return aws_error(403, "InvalidSignatureException", "Signature expired or not yet valid.")
        signed = m["signed"].split(";")
        needed = {"host", "x-amz-date"} | ({"x-amz-security-token"} if token else set())
        if not needed <= set(signed) or any(h not in headers for h in signed):
            return aws_error(403, "InvalidSignatureException", BAD_SIGNATURE)
        request = AWSRequest(
            method=method,
            url=f"http://{headers['Host']}{raw_path}",
            data=body,
            headers={h: headers[h] for h in signed},
        )
        request.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(m["akid"], secret, token), "bedrock", self.region)
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if expected != m["sig"] or signer.signed_headers(signer.headers_to_sign(request)) != m["signed"]:
            return aws_error(403, "InvalidSignatureException", BAD_SIGNATURE)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        denied = self.verify_signature(request.method, request.raw_path, request.headers, body)
        if denied is not None:
            return denied
        raw_model, _, operation = request.raw_path.split("?", 1)[0].removeprefix("/model/").rpartition("/")
        model = unquote(raw_model)
        if request.content_type != "application/json":
            return aws_error(400, "ValidationException", "Content-Type must be application/json")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return aws_error(400, "SerializationException", "Malformed input request")
        self.seen.append(Seen(f"/model/{model}/{operation}", dict(request.headers), doc))
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            return aws_error(fault.status, fault.error_type, fault.message, fault.headers)
        if is_claude(model) and operation in ("invoke", "invoke-with-response-stream", "count-tokens"):
            return await serve_claude(self.claude, request, model, operation, doc)
        if operation in ("converse", "converse-stream"):
            problem = validate_converse(doc)
            if problem is not None:
                return aws_error(400, "ValidationException", problem)
            with self._lock:
                reply = self.replies.pop(0) if self.replies else Reply()
            blocks = reply.blocks if reply.blocks is not None else [{"text": DEFAULT_TEXT}]
            usage = reply.usage or DEFAULT_USAGE
            if operation == "converse":
                return web.json_response(
                    {
                        "output": {"message": {"role": "assistant", "content": blocks}},
                        "stopReason": reply.stop_reason,
                        "usage": usage,
                        "metrics": {"latencyMs": 321},
                    }
                )
            return await self._stream(request, blocks, reply, usage)
        if operation == "invoke":
            return self._invoke(model, doc)
        return aws_error(404, "UnknownOperationException", f"unknown operation {operation!r}")

    async def _stream(
        self, request: web.Request, blocks: list[dict[str, Any]], reply: Reply, usage: dict[str, int]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "application/vnd.amazon.eventstream",
                "x-amzn-RequestId": str(uuid.uuid4()),
            }
        )
        await resp.prepare(request)
        frames = converse_stream_frames(blocks, reply.stop_reason, usage)
        if reply.exception is not None:
            frames = [*frames[: reply.exception_after], exception_frame(*reply.exception)]
        for frame in frames:
            await resp.write(frame)
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    def _invoke(self, model: str, doc: Any) -> web.Response:
        if "titan-embed" in model:
            extra = set(doc) - {"inputText", "dimensions", "normalize", "embeddingTypes"}
            if extra:
                return aws_error(
                    400,
                    "ValidationException",
                    f"Malformed input request: extraneous key "
                    f"[{sorted(extra)[0]}] is not permitted, please reformat your input and try again.",
                )
            text = doc.get("inputText")
            if not isinstance(text, str) or not text:
                return aws_error(400, "ValidationException", "Malformed input request: inputText is required")
            dims = doc.get("dimensions", 1024)
            if dims not in (256, 512, 1024):
                return aws_error(
                    400,
                    "ValidationException",
                    "Malformed input request: dimensions must be one of 256, 512, 1024",
                )
            return web.json_response(
                {"embedding": embedding(text, dims), "inputTextTokenCount": len(text.split())}
            )
        if "cohere.embed" in model:
            extra = set(doc) - {"texts", "input_type", "truncate", "embedding_types", "images"}
            texts = doc.get("texts")
            if extra or not isinstance(texts, list) or not 1 <= len(texts) <= 96:
                return aws_error(
                    400,
                    "ValidationException",
                    "Malformed input request: texts must hold 1 to 96 strings and no other keys are allowed",
                )
            if doc.get("input_type") not in (
                "search_document",
                "search_query",
                "classification",
                "clustering",
            ):
                return aws_error(
                    400,
                    "ValidationException",
                    "Malformed input request: #/input_type: "
                    f"{doc.get('input_type')} is not a valid enum value",
                )
            tokens = sum(len(t.split()) for t in texts)
            return web.json_response(
                {
                    "id": str(uuid.uuid4()),
                    "response_type": "embeddings_floats",
                    "texts": texts,
                    "embeddings": [embedding(t, 6) for t in texts],
                },
                headers={"X-Amzn-Bedrock-Input-Token-Count": str(tokens)},
            )
        return aws_error(
            400, "ValidationException", f"model {model} does not support InvokeModel in this fake"
        )
