"""OpenAI chat requests rewritten as Google ``GenerateContent`` requests (AI Studio and Vertex AI).

Roles become ``user``/``model`` turns (consecutive turns of one role merged, as
Gemini wants them to alternate); system messages become ``systemInstruction``;
tool calls become ``functionCall`` parts and tool results ``functionResponse``
parts, named by looking the call id up in the assistant message that made the
call and sent in the order of the calls. JSON schemas (tools, ``json_schema``)
are rewritten into Google's OpenAPI 3.0 Schema subset.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from typing import Any

import orjson

from .._errors import InvalidRequestError
from ._base import RequestContext
from ._translate import (
    content_text,
    max_tokens,
    parse_data_url,
    reject_unsupported,
    split_system,
    stop_list,
    tool_arguments,
)

UNSUPPORTED = frozenset({
    "logprobs", "top_logprobs", "logit_bias", "functions", "function_call", "audio", "modalities",
    "prediction", "web_search_options",
})  # fmt: skip
#: Separates a tool-call id from the Gemini ``thoughtSignature`` carried inside it.
SIGNATURE_SEP = "~sig~"
_THINKING_BUDGET = {"none": 0, "minimal": 0, "low": 1024, "medium": 8192, "high": 24576}
#: The Schema fields of Google's OpenAPI 3.0 subset that we send (the rest of a JSON schema is dropped).
_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "items", "minItems", "maxItems",
    "properties", "required", "propertyOrdering", "minimum", "maximum", "minLength", "maxLength", "pattern",
    "anyOf", "minProperties", "maxProperties", "default", "example",
})  # fmt: skip
_FORMATS = frozenset({"enum", "date-time", "float", "double", "int32", "int64"})


def json_schema_to_gemini(
    schema: Any, param: str, defs: Mapping[str, Any] | None = None, depth: int = 0
) -> dict[str, Any]:
    """A JSON schema rewritten into Google's Schema subset: inlined $refs, upper-case types, nullable."""
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"'{param}': expected a JSON schema object", param=param)
    if depth > 32:
        raise InvalidRequestError(f"'{param}': the schema nests too deeply or is recursive", param=param)
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1])
        if target is None:
            raise InvalidRequestError(f"'{param}': cannot resolve $ref {ref!r}", param=param)
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return json_schema_to_gemini(merged, param, defs, depth + 1)
    out: dict[str, Any] = {}
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) < len(kind):
            out["nullable"] = True
        if len(kinds) > 1:
            out["anyOf"] = [{"type": str(k).upper()} for k in kinds]
        kind = kinds[0] if len(kinds) == 1 else None
    if isinstance(kind, str) and kind != "null":
        out["type"] = kind.upper()
    elif kind == "null":
        out["nullable"] = True
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            subs = [s for s in options if not (isinstance(s, dict) and s.get("type") == "null")]
            if len(subs) < len(options):
                out["nullable"] = True
            converted = [json_schema_to_gemini(s, param, defs, depth + 1) for s in subs]
            if len(converted) == 1:
                out.update(converted[0])
            elif converted:
                out["anyOf"] = converted
    if "const" in schema:
        out.setdefault("type", "STRING")
        out["enum"] = [str(schema["const"])]
    for key, value in schema.items():
        if key not in _SCHEMA_KEYS or key in ("type", "anyOf"):
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {
                k: json_schema_to_gemini(v, f"{param}.properties.{k}", defs, depth + 1)
                for k, v in value.items()
            }
        elif key == "items" and isinstance(value, dict):
            out[key] = json_schema_to_gemini(value, f"{param}.items", defs, depth + 1)
        elif key == "enum" and isinstance(value, list):
            values = [v for v in value if v is not None]
            if len(values) < len(value):
                out["nullable"] = True
            if all(isinstance(v, str) for v in values):
                out["enum"] = values
                out.setdefault("type", "STRING")
        elif key == "format":
            if value in _FORMATS:
                out[key] = value
        elif key == "required" and isinstance(value, list):
            props = schema.get("properties")
            out[key] = [r for r in value if isinstance(props, dict) and r in props]
        elif key not in ("items", "properties"):
            out[key] = value
    if "enum" in out and out.get("type") == "STRING":
        out["format"] = "enum"
    return out


def _image_part(url: str, param: str) -> dict[str, Any]:
    image = parse_data_url(url, param)
    if image is not None:
        return {"inlineData": {"mimeType": image.mime_type, "data": image.data}}
    mime, _ = mimetypes.guess_type(url.split("?", 1)[0])
    if mime is None:
        raise InvalidRequestError(
            f"'{param}': cannot tell the image type of this URL; send a base64 data URL instead", param=param
        )
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def openai_content_to_gemini_parts(content: Any, param: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise InvalidRequestError(
                    f"'{where}.image_url.url' is required", param=f"{where}.image_url.url"
                )
            parts.append(_image_part(url, f"{where}.image_url.url"))
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            parts.append(
                {
                    "inlineData": {
                        "mimeType": f"audio/{audio.get('format', 'wav')}",
                        "data": audio.get("data", ""),
                    }
                }
            )
        elif kind == "file" and isinstance(part.get("file"), dict) and part["file"].get("file_data"):
            inline = parse_data_url(part["file"]["file_data"], f"{where}.file.file_data")
            if inline is None:
                raise InvalidRequestError(f"'{where}.file.file_data': expected a data URL", param=where)
            parts.append({"inlineData": {"mimeType": inline.mime_type, "data": inline.data}})
        else:
            raise InvalidRequestError(
                f"'{where}': content part type {kind!r} is not supported by Gemini", param=where
            )
    return parts


def _tool_result(content: Any) -> dict[str, Any]:
    text = content_text(content)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"output": text}
    return value if isinstance(value, dict) else {"output": value}


def _append(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    """Gemini wants user and model turns to alternate: consecutive turns of one role are merged."""
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def openai_messages_to_gemini(messages: list[dict[str, Any]], offset: int = 0) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name
    order: dict[str, int] = {}  # tool call id -> position in its assistant turn
    results: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        if results:
            _append(contents, "user", [part for _, part in sorted(results, key=lambda r: r[0])])
            results.clear()

    for i, message in enumerate(messages, offset):
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in names:
                raise InvalidRequestError(
                    f"'messages[{i}].tool_call_id' matches no tool call of an earlier assistant message",
                    param=f"messages[{i}].tool_call_id",
                )
            part = {
                "functionResponse": {"name": names[call_id], "response": _tool_result(message.get("content"))}
            }
            results.append((order[call_id], part))
            continue
        flush()
        if role == "user":
            _append(
                contents,
                "user",
                openai_content_to_gemini_parts(message.get("content"), f"messages[{i}].content"),
            )
        elif role == "assistant":
            parts: list[dict[str, Any]] = []
            text = content_text(message.get("content"))
            if text:
                parts.append({"text": text})
            for j, call in enumerate(message.get("tool_calls") or []):
                fn = call.get("function") or {}
                name = fn.get("name")
                if not isinstance(name, str) or not name:
                    raise InvalidRequestError(
                        f"'messages[{i}].tool_calls[{j}].function.name' is required",
                        param=f"messages[{i}].tool_calls[{j}].function.name",
                    )
                args = tool_arguments(
                    fn.get("arguments"), f"messages[{i}].tool_calls[{j}].function.arguments"
                )
                fc_part: dict[str, Any] = {
                    "functionCall": {"name": name, "args": args if isinstance(args, dict) else {}}
                }
                call_id = str(call.get("id") or f"call_{i}_{j}")
                if SIGNATURE_SEP in call_id:
                    fc_part["thoughtSignature"] = call_id.split(SIGNATURE_SEP, 1)[1]
                names[call_id] = name
                order[call_id] = j
                parts.append(fc_part)
            _append(contents, "model", parts)
        else:
            raise InvalidRequestError(
                f"'messages[{i}].role': {role!r} messages are not supported by Gemini; use tools",
                param=f"messages[{i}].role",
            )
    flush()
    return contents


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    limit = max_tokens(body)
    if limit is not None:
        config["maxOutputTokens"] = limit
    stops = [s for s in stop_list(body) or [] if s]
    if stops:
        config["stopSequences"] = stops
    if isinstance(body.get("n"), int) and body["n"] > 1:
        config["candidateCount"] = body["n"]
    fmt = body.get("response_format") or {}
    if fmt.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        if isinstance(spec.get("schema"), dict):
            config["responseSchema"] = json_schema_to_gemini(
                spec["schema"], "response_format.json_schema.schema"
            )
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in _THINKING_BUDGET:
            raise InvalidRequestError(
                f"'reasoning_effort': {effort!r} is not supported", param="reasoning_effort"
            )
        config["thinkingConfig"] = {"thinkingBudget": _THINKING_BUDGET[effort]}
    return config


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        return None, None
    decls: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function":
            raise InvalidRequestError(
                f"'tools[{i}].type': only function tools are supported", param=f"tools[{i}].type"
            )
        fn = tool["function"]
        decl: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description"):
            decl["description"] = fn["description"]
        params = fn.get("parameters")
        if params:
            schema = json_schema_to_gemini(params, f"tools[{i}].function.parameters")
            # Gemini rejects an OBJECT with no properties: a function without arguments omits the schema.
            if schema.get("properties") or schema.get("type") not in ("OBJECT", None):
                decl["parameters"] = schema
        decls.append(decl)
    config: dict[str, Any] | None = None
    if choice == "none":
        config = {"functionCallingConfig": {"mode": "NONE"}}
    elif choice == "auto":
        config = {"functionCallingConfig": {"mode": "AUTO"}}
    elif choice == "required":
        config = {"functionCallingConfig": {"mode": "ANY"}}
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise InvalidRequestError("'tool_choice.function.name' is required", param="tool_choice")
        config = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    elif choice is not None:
        raise InvalidRequestError(f"'tool_choice': {choice!r} is not supported", param="tool_choice")
    return [{"functionDeclarations": decls}], config


def openai_to_gemini_request(body: dict[str, Any], ctx: RequestContext, provider: str) -> dict[str, Any]:
    body = dict(body)
    if body.get("logprobs") is False:
        body.pop("logprobs")
    reject_unsupported(body, UNSUPPORTED, ctx, provider)
    if body.get("parallel_tool_calls") is False:
        reject_unsupported({"parallel_tool_calls": False}, frozenset({"parallel_tool_calls"}), ctx, provider)
    system, messages = split_system(body["messages"])
    contents = openai_messages_to_gemini(messages)
    if not contents:
        raise InvalidRequestError(
            "'messages': Gemini needs at least one non-empty user or assistant message", param="messages"
        )
    request: dict[str, Any] = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": [{"text": system}]}
    tools, tool_config = _tools(body)
    if tools:
        request["tools"] = tools
    if tool_config:
        request["toolConfig"] = tool_config
    config = _generation_config(body)
    if config:
        request["generationConfig"] = config
    return request
