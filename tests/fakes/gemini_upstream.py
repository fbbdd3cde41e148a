"""A fake Google Gemini API (AI Studio and Vertex AI) that enforces the documented wire protocol.

* AI Studio: ``POST /v1beta/models/{model}:{generateContent|streamGenerateContent|batchEmbedContents}``
  with the key in ``x-goog-api-key`` (a wrong key gets Google's real 400 ``API_KEY_INVALID``).
* Vertex AI: ``POST /v1/projects/{p}/locations/{l}/publishers/google/models/{model}:{...|predict}``
  with ``Authorization: Bearer`` holding a token this fake issued.
* OAuth: ``POST /token`` implements the JWT-bearer grant: it verifies the RS256
  assertion's signature with the service account's public key and its claims.

:func:`validate_generate_content` is the request check as a plain function (the
property tests call it directly): roles ``user``/``model`` only, alternating
turns, Google's function-call turn rules, part shapes, the Schema subset and
``generationConfig`` fields, with Google's own error messages. Streams are
``alt=sse`` events (``data: {...}\\r\\n\\r\\n``), each a whole GenerateContentResponse.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.fakes import surface_wire
from tests.support.servers import FakeServer, ThreadedApp

GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
PART_DATA = (
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
)
PART_META = ("thought", "thoughtSignature", "videoMetadata")
TOP_LEVEL = {
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "generationConfig",
    "safetySettings",
    "cachedContent",
    "labels",
}
GENERATION = {
    "temperature",
    "topP",
    "topK",
    "candidateCount",
    "maxOutputTokens",
    "stopSequences",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseMimeType",
    "responseSchema",
    "thinkingConfig",
    "responseLogprobs",
    "logprobs",
    "responseModalities",
}
SCHEMA_KEYS = {
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "items",
    "minItems",
    "maxItems",
    "properties",
    "required",
    "propertyOrdering",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "anyOf",
    "minProperties",
    "maxProperties",
    "default",
    "example",
}
TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"}
FORMATS = {"enum", "date-time", "float", "double", "int32", "int64"}
FUNCTION_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_.:-]{0,63}")
ALTERNATE = "Please ensure that multiturn requests alternate between user and model."
CALL_AFTER = (
    "Please ensure that function call turn comes immediately after a user turn "
    "or after a function response turn."
)
RESPONSE_AFTER = "Please ensure that function response turn comes immediately after a function call turn."
RESPONSE_COUNT = (
    "Please ensure that the number of function response parts is equal to the number of function "
    "call parts of the function call turn."
)


class Invalid(Exception):
    """A request Google would answer with 400 INVALID_ARGUMENT."""


def _unknown(doc: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in doc:
        if key not in allowed:
            raise Invalid(
                f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': Cannot find field."
            )


def _base64(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value:
        raise Invalid(f"{where}: base64 data is required")
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error:
        raise Invalid(f"Invalid value at '{where}' (TYPE_BYTES), Base64 decoding failed") from None


def validate_schema(schema: Any, where: str, *, root_params: bool = False) -> None:
    if not isinstance(schema, dict):
        raise Invalid(f"{where}: must be a Schema object")
    _unknown(schema, SCHEMA_KEYS, where)
    kind = schema.get("type")
    if kind is not None and kind not in TYPES:
        raise Invalid(
            f"Invalid value at '{where}.type' "
            f'(type.googleapis.com/google.ai.generativelanguage.v1beta.Type), "{kind}"'
        )
    if "format" in schema and schema["format"] not in FORMATS:
        raise Invalid(f"{where}.format: only 'enum' and 'date-time' are supported for STRING type")
    if kind == "OBJECT":
        props = schema.get("properties")
        if root_params and not props:
            raise Invalid(f"{where}.properties: should be non-empty for OBJECT type")
        for name, sub in (props or {}).items():
            validate_schema(sub, f"{where}.properties[{name}]")
        for req in schema.get("required") or []:
            if req not in (props or {}):
                raise Invalid(f"{where}.required[{req}]: property is not defined")
    elif "properties" in schema or "required" in schema:
        raise Invalid(f"{where}: properties and required are only allowed for OBJECT type")
    if kind == "ARRAY":
        if "items" not in schema:
            raise Invalid(f"{where}.items: missing field.")
        validate_schema(schema["items"], f"{where}.items")
    if "enum" in schema and not all(isinstance(v, str) for v in schema["enum"]):
        raise Invalid(f"{where}.enum: only string values are allowed")
    for i, sub in enumerate(schema.get("anyOf") or []):
        validate_schema(sub, f"{where}.anyOf[{i}]")
    if "nullable" in schema and not isinstance(schema["nullable"], bool):
        raise Invalid(f"{where}.nullable: must be a boolean")


def _part(part: Any, role: str, where: str) -> str:
    if not isinstance(part, dict):
        raise Invalid(f"{where}: a Part must be an object")
    _unknown(part, set(PART_DATA) | set(PART_META), where)
    data = [k for k in PART_DATA if k in part]
    if len(data) != 1:
        raise Invalid(f"{where}: a Part must set exactly one data field (oneof), got {data}")
    kind = data[0]
    value = part[kind]
    if kind == "text":
        if not isinstance(value, str) or not value:
            raise Invalid(
                "Unable to submit request because it has an empty text parameter. Add a value to the "
                "parameter and try again."
            )
    elif kind == "inlineData":
        if not isinstance(value, dict) or not isinstance(value.get("mimeType"), str):
            raise Invalid(f"{where}.inlineData.mimeType: required")
        _base64(value.get("data"), f"{where}.inlineData.data")
    elif kind == "fileData":
        if not isinstance(value, dict) or not value.get("mimeType") or not value.get("fileUri"):
            raise Invalid(f"{where}.fileData: mimeType and fileUri are required")
    elif kind == "functionCall":
        if role != "model":
            raise Invalid(f"{where}: functionCall parts belong to model turns")
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise Invalid(f"{where}.functionCall.name: required")
        if not isinstance(value.get("args", {}), dict):
            raise Invalid(f"{where}.functionCall.args: must be an object")
    elif kind == "functionResponse":
        if role != "user":
            raise Invalid(f"{where}: functionResponse parts belong to user turns")
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise Invalid(f"{where}.functionResponse.name: required")
        if not isinstance(value.get("response"), dict):
            raise Invalid(
                f"Invalid value at '{where}.function_response.response' (type.googleapis.com/"
                "google.protobuf.Struct), must be a JSON object"
            )
    if "thoughtSignature" in part:
        _base64(part["thoughtSignature"], f"{where}.thoughtSignature")
    return kind


def _contents(contents: Any) -> None:
    if not isinstance(contents, list) or not contents:
        raise Invalid("* GenerateContentRequest.contents: contents is not specified")
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for i, content in enumerate(contents):
        where = f"contents[{i}]"
        if not isinstance(content, dict):
            raise Invalid(f"{where}: must be a Content object")
        _unknown(content, {"role", "parts"}, where)
        role = content.get("role")
        if role not in ("user", "model"):
            raise Invalid(f"Please use a valid role: user, model. (got {role!r} at {where})")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise Invalid(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.")
        for j, part in enumerate(parts):
            _part(part, role, f"{where}.parts[{j}]")
        if turns and turns[-1][0] == role:
            raise Invalid(ALTERNATE)
        turns.append((role, parts))
    for i, (_role, parts) in enumerate(turns):
        calls = [p["functionCall"]["name"] for p in parts if "functionCall" in p]
        answers = [p["functionResponse"]["name"] for p in parts if "functionResponse" in p]
        if calls:
            prev = turns[i - 1] if i else None
            if prev is None or prev[0] != "user":
                raise Invalid(CALL_AFTER)
            if i + 1 < len(turns) and not any("functionResponse" in p for p in turns[i + 1][1]):
                raise Invalid(RESPONSE_AFTER)
        if answers:
            prev_calls = (
                [p["functionCall"]["name"] for p in turns[i - 1][1] if "functionCall" in p] if i else []
            )
            if not prev_calls:
                raise Invalid(RESPONSE_AFTER)
            if len(prev_calls) != len(answers):
                raise Invalid(RESPONSE_COUNT)
            if Counter(prev_calls) != Counter(answers):
                raise Invalid(
                    f"function response names {answers} do not match the function calls {prev_calls}"
                )


def _tools(body: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    tools = body.get("tools")
    if tools is None:
        return names
    if not isinstance(tools, list):
        raise Invalid("tools: must be a list")
    for i, tool in enumerate(tools):
        _unknown(tool, {"functionDeclarations", "googleSearch", "codeExecution"}, f"tools[{i}]")
        for j, decl in enumerate(tool.get("functionDeclarations") or []):
            where = f"tools[{i}].function_declarations[{j}]"
            _unknown(decl, {"name", "description", "parameters", "response"}, where)
            name = decl.get("name")
            if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
                raise Invalid(
                    f"* GenerateContentRequest.{where}.name: Invalid function name. Must start with a "
                    "letter or an underscore. Must be alphameric (a-z, A-Z, 0-9), underscores (_), dots "
                    "(.), colons (:) or dashes (-), with a maximum length of 64."
                )
            if name in names:
                raise Invalid(f"{where}.name: duplicate function name {name!r}")
            names.add(name)
            if "parameters" in decl:
                validate_schema(decl["parameters"], f"{where}.parameters", root_params=True)
    config = body.get("toolConfig")
    if config is not None:
        _unknown(config, {"functionCallingConfig"}, "tool_config")
        fcc = config.get("functionCallingConfig") or {}
        _unknown(fcc, {"mode", "allowedFunctionNames"}, "tool_config.function_calling_config")
        mode = fcc.get("mode", "AUTO")
        if mode not in ("AUTO", "ANY", "NONE", "VALIDATED"):
            raise Invalid(f"Invalid value at 'tool_config.function_calling_config.mode', \"{mode}\"")
        allowed = fcc.get("allowedFunctionNames")
        if allowed is not None:
            if mode not in ("ANY", "VALIDATED"):
                raise Invalid("allowed_function_names may only be set when mode is ANY or VALIDATED")
            for name in allowed:
                if name not in names:
                    raise Invalid(f"allowed_function_names: {name!r} is not a declared function")
    return names


def _generation(config: Any) -> None:
    if config is None:
        return
    _unknown(config, GENERATION, "generation_config")
    ranges = {
        "temperature": (0, 2),
        "topP": (0, 1),
        "candidateCount": (1, 8),
        "maxOutputTokens": (1, 10**7),
        "presencePenalty": (-2, 2),
        "frequencyPenalty": (-2, 2),
    }
    for key, (low, high) in ranges.items():
        value = config.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high
        ):
            raise Invalid(f"generation_config.{key}: {value!r} is out of range [{low}, {high}]")
    for key in ("candidateCount", "maxOutputTokens", "seed", "topK"):
        if key in config and not isinstance(config[key], int):
            raise Invalid(f"generation_config.{key}: must be an integer")
    stops = config.get("stopSequences")
    if stops is not None and (
        not isinstance(stops, list) or len(stops) > 5 or not all(isinstance(s, str) and s for s in stops)
    ):
        raise Invalid("generation_config.stop_sequences: at most 5 non-empty strings")
    mime = config.get("responseMimeType")
    if mime is not None and mime not in ("text/plain", "application/json", "text/x.enum"):
        raise Invalid(
            f"generation_config.response_mime_type: allowed mimetypes are `text/plain`, "
            f"`application/json` and `text/x.enum`, got {mime!r}"
        )
    if "responseSchema" in config:
        if mime not in ("application/json", "text/x.enum"):
            raise Invalid("generation_config.response_schema: response_mime_type must be application/json")
        validate_schema(config["responseSchema"], "generation_config.response_schema")
    thinking = config.get("thinkingConfig")
    if thinking is not None:
        _unknown(thinking, {"thinkingBudget", "includeThoughts"}, "generation_config.thinking_config")


def validate_generate_content(body: Any) -> str | None:
    """Google's verdict on a GenerateContentRequest: None if accepted, else its error message."""
    try:
        if not isinstance(body, dict):
            raise Invalid("Invalid JSON payload received.")
        _unknown(body, TOP_LEVEL, "")
        _contents(body.get("contents"))
        system = body.get("systemInstruction")
        if system is not None:
            _unknown(system, {"role", "parts"}, "system_instruction")
            if not system.get("parts") or not all(
                isinstance(p, dict) and set(p) == {"text"} and p["text"] for p in system["parts"]
            ):
                raise Invalid("system_instruction: parts must be non-empty text parts")
        _tools(body)
        _generation(body.get("generationConfig"))
    except Invalid as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------ server


@dataclass
class Reply:
    """One scripted answer. Parts default to a short text reply."""

    parts: list[dict[str, Any]] | None = None
    finish_reason: str = "STOP"
    usage: dict[str, Any] | None = None
    block_reason: str | None = None


@dataclass
class Fault:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    query: str
    headers: dict[str, str]
    body: Any


DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog"
DEFAULT_USAGE = {"promptTokenCount": 11, "candidatesTokenCount": 9, "totalTokenCount": 20}


def google_error(code: int, status: str, message: str, details: list[Any] | None = None) -> web.Response:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        err["details"] = details
    return web.Response(status=code, body=orjson.dumps({"error": err}), content_type="application/json")


def vector(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i % 32] - 127.5) / 127.5, 6) for i in range(dims)]


class FakeGemini(FakeServer):
    def __init__(
        self,
        api_key: str = "gemini-test-key",
        project: str = "test-project",
        location: str = "us-central1",
        token_lifetime: int = 3599,
    ) -> None:
        self.api_key = api_key
        self.project = project
        self.location = location
        self.token_lifetime = token_lifetime
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.client_email = "router@test-project.iam.gserviceaccount.com"
        self.tokens: dict[str, float] = {}
        self.token_requests = 0
        self.seen: list[Seen] = []
        self.replies: list[Reply] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1beta/models/{call}", self._studio)
        app.router.add_post(
            "/v1/projects/{project}/locations/{location}/publishers/google/models/{call}", self._vertex
        )
        app.router.add_post("/token", self._token)
        self.server = ThreadedApp(app)

    @property
    def studio_url(self) -> str:
        return self.server.base_url + "/v1beta"

    @property
    def vertex_url(self) -> str:
        return self.server.base_url + "/v1"

    @property
    def token_uri(self) -> str:
        return self.server.base_url + "/token"

    def service_account(self, key: rsa.RSAPrivateKey | None = None) -> dict[str, Any]:
        pem = (
            (key or self.private_key)
            .private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            .decode()
        )
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": "key-1",
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "1",
            "token_uri": self.token_uri,
        }

    def queue(self, *items: Reply | Fault) -> None:
        with self._lock:
            for item in items:
                (self.replies if isinstance(item, Reply) else self.faults).append(item)

    def reset(self) -> None:
        with self._lock:
            self.replies.clear()
            self.faults.clear()
            self.seen.clear()

    # -------------------------------------------------------------- OAuth

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1

        def refuse(description: str) -> web.Response:
            return web.json_response({"error": "invalid_grant", "error_description": description}, status=400)

        if request.content_type != "application/x-www-form-urlencoded":
            return web.json_response({"error": "invalid_request"}, status=400)
        form = {k: v[0] for k, v in parse_qs((await request.read()).decode()).items()}
        if form.get("grant_type") != GRANT:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        pieces = form.get("assertion", "").split(".")
        if len(pieces) != 3:
            return refuse("Invalid JWT.")

        def unb64(text: str) -> bytes:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

        try:
            header, claims = orjson.loads(unb64(pieces[0])), orjson.loads(unb64(pieces[1]))
            signature = unb64(pieces[2])
        except (ValueError, binascii.Error):
            return refuse("Invalid JWT.")
        if header.get("alg") != "RS256":
            return refuse("Invalid JWT: alg must be RS256.")
        try:
            self.private_key.public_key().verify(
                signature, f"{pieces[0]}.{pieces[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except Exception:
            return refuse("Invalid JWT Signature.")
        now = time.time()
        if claims.get("iss") != self.client_email:
            return refuse("Invalid JWT: iss is not the service account.")
        if claims.get("aud") != self.token_uri:
            return refuse("Invalid JWT: Token must be a short-lived token and in a reasonable timeframe.")
        if SCOPE not in str(claims.get("scope", "")).split():
            return refuse("Invalid OAuth scope or ID token audience provided.")
        iat, exp = claims.get("iat"), claims.get("exp")
        if (
            not isinstance(iat, int)
            or not isinstance(exp, int)
            or abs(iat - now) > 300
            or exp <= now
            or exp - iat > 3600
        ):
            return refuse(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable "
                "timeframe. Check your iat and exp values in the JWT claim."
            )
        token = f"ya29.fake-{self.token_requests}-{hashlib.sha256(pieces[2].encode()).hexdigest()[:8]}"
        self.tokens[token] = now + self.token_lifetime
        return web.json_response(
            {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    # ---------------------------------------------------------- requests

    async def _read(self, request: web.Request) -> tuple[Any, web.Response | None]:
        if request.content_type != "application/json":
            return None, google_error(400, "INVALID_ARGUMENT", "Content-Type must be application/json")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return None, google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        self.seen.append(Seen(request.path, request.query_string, dict(request.headers), body))
        with self._lock:
            fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            payload = orjson.dumps(fault.body) if fault.body is not None else b""
            return None, web.Response(
                status=fault.status, body=payload, headers=fault.headers, content_type="application/json"
            )
        return body, None

    async def _studio(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("x-goog-api-key")
        if key is None:
            return google_error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers "
                "without established identity). Please use API Key or other form of API "
                "consumer identity to call this API.",
            )
        if key != self.api_key:
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            )
        return await self._dispatch(request, vertex=False)

    async def _vertex(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if not auth.startswith("Bearer ") or self.tokens.get(token, 0) < time.time():
            return google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. "
                "Expected OAuth 2 access token, login cookie or other valid authentication "
                "credential.",
            )
        if request.match_info["project"] != self.project or request.match_info["location"] != self.location:
            return google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission denied on resource project {request.match_info['project']}.",
            )
        return await self._dispatch(request, vertex=True)

    async def _dispatch(self, request: web.Request, vertex: bool) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        body, failure = await self._read(request)
        if failure is not None:
            return failure
        if method == "generateContent":
            return self._generate(body, stream=False)
        if method == "streamGenerateContent":
            if request.query.get("alt") != "sse":
                return google_error(400, "INVALID_ARGUMENT", "this fake only streams with alt=sse")
            return await self._stream(request, body)
        if method == "batchEmbedContents" and not vertex:
            return self._batch_embed(model, body)
        if method == "predict" and "imagen" in model:  # see tests.fakes.surface_wire
            try:
                return web.json_response(surface_wire.imagen_predict(body))
            except surface_wire.SurfaceWireError as err:
                return google_error(400, "INVALID_ARGUMENT", err.message)
        if method == "predict" and vertex:
            return self._predict(body)
        return google_error(404, "NOT_FOUND", f"method {method!r} not found")

    def _reply(self) -> Reply:
        with self._lock:
            return self.replies.pop(0) if self.replies else Reply()

    def _check(self, body: Any) -> web.Response | None:
        problem = validate_generate_content(body)
        return google_error(400, "INVALID_ARGUMENT", problem) if problem else None

    def _candidates(self, body: dict[str, Any], reply: Reply) -> list[dict[str, Any]]:
        count = (body.get("generationConfig") or {}).get("candidateCount", 1)
        parts = reply.parts if reply.parts is not None else [{"text": DEFAULT_TEXT}]
        out = []
        for i in range(count):
            cand_parts = parts if i == 0 else [{"text": f"{DEFAULT_TEXT} ({i})"}]
            out.append(
                {
                    "content": {"parts": cand_parts, "role": "model"},
                    "finishReason": reply.finish_reason,
                    "index": i,
                }
            )
        return out

    def _generate(self, body: Any, stream: bool) -> web.Response:
        failure = self._check(body)
        if failure is not None:
            return failure
        reply = self._reply()
        usage = reply.usage or DEFAULT_USAGE
        if reply.block_reason:
            doc: dict[str, Any] = {
                "promptFeedback": {"blockReason": reply.block_reason},
                "usageMetadata": usage,
            }
        else:
            doc = {
                "candidates": self._candidates(body, reply),
                "usageMetadata": usage,
                "modelVersion": "gemini-fake-001",
                "responseId": "resp-fake",
            }
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def _stream(self, request: web.Request, body: Any) -> web.StreamResponse:
        failure = self._check(body)
        if failure is not None:
            return failure
        reply = self._reply()
        usage = reply.usage or DEFAULT_USAGE
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if reply.block_reason:
            events = [{"promptFeedback": {"blockReason": reply.block_reason}, "usageMetadata": usage}]
        else:
            events = []
            for cand in self._candidates(body, reply):
                pieces: list[dict[str, Any]] = []
                for part in cand["content"]["parts"]:
                    if "text" in part:
                        words = part["text"].split(" ")
                        pieces += [
                            {"text": " ".join(words[i : i + 3]) + (" " if i + 3 < len(words) else "")}
                            for i in range(0, len(words), 3)
                        ]
                    else:
                        pieces.append(part)
                if not pieces:  # a blocked answer: a candidate with a finish reason and no content
                    events.append(
                        {
                            "candidates": [{"finishReason": cand["finishReason"], "index": cand["index"]}],
                            "usageMetadata": usage,
                        }
                    )
                for n, piece in enumerate(pieces):
                    chunk: dict[str, Any] = {
                        "content": {"parts": [piece], "role": "model"},
                        "index": cand["index"],
                    }
                    if n == len(pieces) - 1:
                        chunk["finishReason"] = cand["finishReason"]
                    events.append(
                        {
                            "candidates": [chunk],
                            "usageMetadata": {"promptTokenCount": usage["promptTokenCount"]}
                            if n < len(pieces) - 1
                            else usage,
                            "modelVersion": "gemini-fake-001",
                            "responseId": "resp-fake",
                        }
                    )
        for event in events:
            await resp.write(b"data: " + orjson.dumps(event) + b"\r\n\r\n")
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    def _batch_embed(self, model: str, body: Any) -> web.Response:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return google_error(400, "INVALID_ARGUMENT", "* BatchEmbedContentsRequest.requests: required")
        vectors = []
        for i, req in enumerate(requests):
            if req.get("model") != f"models/{model}":
                return google_error(400, "INVALID_ARGUMENT", f"requests[{i}].model: must be models/{model}")
            parts = (req.get("content") or {}).get("parts") or []
            if not parts or not all(isinstance(p.get("text"), str) and p["text"] for p in parts):
                return google_error(400, "INVALID_ARGUMENT", f"requests[{i}].content.parts: text required")
            dims = req.get("outputDimensionality", 8)
            vectors.append({"values": vector(parts[0]["text"], dims)})
        return web.json_response({"embeddings": vectors})

    def _predict(self, body: Any) -> web.Response:
        instances = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(instances, list) or not instances:
            return google_error(400, "INVALID_ARGUMENT", "instances: required")
        dims = ((body.get("parameters") or {}).get("outputDimensionality")) or 8
        predictions = []
        for i, inst in enumerate(instances):
            if not isinstance(inst.get("content"), str):
                return google_error(400, "INVALID_ARGUMENT", f"instances[{i}].content: required")
            predictions.append(
                {
                    "embeddings": {
                        "statistics": {"truncated": False, "token_count": len(inst["content"].split())},
                        "values": vector(inst["content"], dims),
                    }
                }
            )
        return web.json_response({"predictions": predictions, "metadata": {"billableCharacterCount": 10}})
