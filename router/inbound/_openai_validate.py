"""Request validation that names the field at fault.

Hand-written rather than pydantic on purpose: it runs on every request, checks
only what the router must rely on, and leaves every other field untouched so it
passes through to OpenAI-shaped upstreams as the client sent it.
"""

from __future__ import annotations

from typing import Any

import orjson

from .._errors import InvalidRequestError
from ..providers import Operation

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequestError("the request body is empty; send a JSON object", code="invalid_json")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = str(exc).split(":", 1)[0]
        raise InvalidRequestError(
            f"the request body is not valid JSON: {reason}", code="invalid_json"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(
            f"the request body must be a JSON object, got {_kind(doc)}", code="invalid_json"
        )
    # Counting brackets is C-fast and rules out deep nesting for nearly every request.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(doc, MAX_DEPTH):
        raise InvalidRequestError(
            f"the request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json"
        )
    return doc


#: orjson reads 1024 levels of nesting but writes only 254, and the router writes the body again
#: (upstream request, cache key, payload log): deeper documents are refused up front.
MAX_DEPTH = 128


def _deeper_than(doc: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}': {message}", param=param, code="invalid_value")


def _number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"expected a number, got {_kind(value)}")
    if not low <= value <= high:
        raise _bad(name, f"{value} is out of range; expected {low:g} to {high:g}")


def as_integer(value: Any) -> int | None:
    """``value`` as an integer, if it is one: JSON numbers have no int/float kinds, so ``3.0`` is 3
    (as JSON Schema counts it); None for anything else, booleans included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    # Past 2**53 a float is no exact integer: a literal beyond 64 bits, which orjson reads as a
    # float, would otherwise pass as the nearest one.
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return None


def integer_field(body: dict[str, Any], name: str) -> int | None:
    """``body[name]`` as an integer, written back as one (upstreams may refuse ``3.0``); None if
    it is missing or null. Raises if it is no integer."""
    value = body.get(name)
    if value is None:
        return None
    number = as_integer(value)
    if number is None:
        raise _bad(name, f"expected an integer, got {_kind(value)}")
    body[name] = number
    return number


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> None:
    value = integer_field(body, name)
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"{low} to {high}"
        raise _bad(name, f"{value} is out of range; expected {bound}")


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"expected a boolean, got {_kind(value)}")
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequestError("'model' is required", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _bad("model", f"expected a non-empty string, got {_kind(model)}")
    return model


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", f"expected an object, got {_kind(options)}")
        if not stream:
            raise _bad("stream_options", "only allowed when 'stream' is true")
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise _bad("stream_options.include_usage", f"expected a boolean, got {_kind(usage)}")
        include_usage = bool(usage)
    return stream, include_usage


def _sampling(body: dict[str, Any]) -> None:
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _integer(body, "n", 1, 128)
    _integer(body, "max_tokens", 1)
    _integer(body, "max_completion_tokens", 1)
    _integer(body, "seed", -(2**63), 2**63 - 1)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop", "expected a string or an array of strings")
        if len(stop) > 4:
            raise _bad("stop", "at most 4 stop sequences")


def _messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequestError(
            "'messages' is required", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise _bad("messages", f"expected an array, got {_kind(messages)}")
    if not messages:
        raise _bad("messages", "expected at least one message")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"expected an object, got {_kind(message)}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list or an object is unhashable
            shown = role if isinstance(role, str) else _kind(role)
            raise _bad(f"{where}.role", f"{shown!s} is not one of {', '.join(sorted(ROLES))}")
        _tool_calls(message, where)
        content = message.get("content")
        if content is None:
            if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
                continue
            if role == "assistant" and "content" in message:
                continue
            raise InvalidRequestError(
                f"'{where}.content' is required", param=f"{where}.content", code="missing_required_parameter"
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _bad(f"{where}.content[{j}]", "expected an object with a string 'type'")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content[{j}].text", "expected a string")
        elif not isinstance(content, str):
            raise _bad(f"{where}.content", f"expected a string or an array of parts, got {_kind(content)}")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise InvalidRequestError(
                f"'{where}.tool_call_id' is required for tool messages",
                param=f"{where}.tool_call_id",
                code="missing_required_parameter",
            )
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", f"expected an array, got {_kind(tools)}")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
                raise _bad(f"tools[{i}]", "expected an object with a 'function' object")
            if not isinstance(tool["function"].get("name"), str):
                raise _bad(f"tools[{i}].function.name", "expected a string")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str)):
        raise _bad("response_format", "expected an object with a string 'type'")


def _tool_calls(message: dict[str, Any], where: str) -> None:
    """Translating providers read these: a wrong shape must be a 400, not an exception."""
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _bad(f"{where}.tool_calls", f"expected an array, got {_kind(calls)}")
        for j, call in enumerate(calls):
            if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                raise _bad(f"{where}.tool_calls[{j}]", "expected an object with a 'function' object")
            if not isinstance(call["function"].get("name"), str):
                raise _bad(f"{where}.tool_calls[{j}].function.name", "expected a string")
    legacy = message.get("function_call")
    if legacy is not None and (not isinstance(legacy, dict) or not isinstance(legacy.get("name"), str)):
        raise _bad(f"{where}.function_call", "expected an object with a string 'name'")


def _tokens(values: list[Any]) -> list[int] | None:
    """An array of tokens as integers, or None if it is not one."""
    tokens = [as_integer(v) for v in values]
    return None if None in tokens else tokens  # type: ignore[return-value]


def _token_input(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        raise InvalidRequestError(f"'{name}' is required", param=name, code="missing_required_parameter")
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return
        tokens = _tokens(value)
        if tokens is not None:
            if any(isinstance(v, float) for v in value):
                body[name] = tokens
            return
        arrays = [_tokens(v) if isinstance(v, list) and v else None for v in value]
        if None not in arrays:
            if any(isinstance(t, float) for v in value for t in v):
                body[name] = arrays
            return
    raise _bad(name, "expected a string, an array of strings, or an array of token arrays")


#: Above any embedding model's size; the mock would otherwise build a vector this long.
MAX_DIMENSIONS = 65_536

#: Fields with which other routers let a request pick the upstream URL. kubellm calls only the URLs
#: of its config (no SSRF through the router), and says so rather than forwarding them upstream.
CLIENT_TARGET_FIELDS = ("api_base", "base_url")


def validate(operation: Operation, body: dict[str, Any]) -> tuple[str, bool, bool]:
    """Check a request; return (model, stream, include_usage)."""
    for name in CLIENT_TARGET_FIELDS:
        if name in body:
            raise InvalidRequestError(
                f"'{name}': the upstream is chosen by the router's config, never by a request",
                param=name,
                code="unsupported_parameter",
            )
    model = _model(body)
    if operation is not Operation.CHAT and "messages" in body:
        # Token estimates, the mock and the logs would read it as the prompt: refuse it here
        # rather than let a wrong endpoint get a wrong (or no) answer.
        field = "input" if operation is Operation.EMBEDDING else "prompt"
        raise InvalidRequestError(
            f"'messages' is not a parameter of {operation.value} requests: send '{field}', "
            "or use /v1/chat/completions",
            param="messages",
            code="unsupported_parameter",
        )
    if operation is Operation.EMBEDDING:
        _token_input(body, "input")
        _integer(body, "dimensions", 1, MAX_DIMENSIONS)
        fmt = body.get("encoding_format")
        if fmt is not None and fmt not in ("float", "base64"):
            raise _bad("encoding_format", "expected 'float' or 'base64'")
        return model, False, False
    stream, include_usage = _stream(body)
    _sampling(body)
    if operation is Operation.CHAT:
        _messages(body)
    else:
        _token_input(body, "prompt")
    return model, stream, include_usage
