"""A Responses API request (``POST /v1/responses``) as the OpenAI chat request other backends serve.

Deployments that speak Responses natively (OpenAI, Azure OpenAI) get the client's body; every
other deployment gets :func:`responses_request_to_chat`'s chat body. The mapping:

* ``instructions`` becomes a leading system message; ``input`` (a string, or a list of items) the
  messages: input messages keep their role (``input_text`` / ``output_text`` parts become text,
  ``input_image`` an ``image_url`` part), consecutive ``function_call`` items one assistant message
  with ``tool_calls``, each ``function_call_output`` a ``tool`` message. Reasoning items are
  dropped (chat has no place for them).
* function ``tools`` become chat function tools; ``tool_choice`` maps one to one
  (``allowed_tools`` narrows ``tools`` to the allowed ones).
* ``text.format`` becomes ``response_format``; ``max_output_tokens`` ``max_completion_tokens``;
  ``reasoning.effort`` ``reasoning_effort`` (for the providers that support it).

What chat cannot carry (built-in tools such as ``web_search``, files, item references) is a 400
naming the field, never a silently different request.
"""

from __future__ import annotations

from typing import Any

from ..._errors import InvalidRequestError
from .._openai_validate import CLIENT_TARGET_FIELDS, as_integer

#: Responses parameters that pass to chat under the same name.
_SAME_NAME = ("temperature", "top_p", "parallel_tool_calls", "top_logprobs", "prompt_cache_key")
_MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
_CHOICE_MODES = frozenset({"auto", "none", "required"})


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param)


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of items (a string is one user message)."""
    raw = body.get("input")
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": raw}]}]
    if not isinstance(raw, list):
        raise _bad("input", "expected a string or a list of input items")
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _bad(f"input[{i}]", "expected an object")
        if not isinstance(item.get("type", ""), str):
            raise _bad(f"input[{i}].type", "expected a string")
    return raw


def _part_to_chat(part: Any, where: str) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": str(part.get("text") or "")}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal") or "")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise _bad(f"{where}.image_url", "only images given by image_url are supported (not file_id)")
        image: dict[str, Any] = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise _bad(f"{where}.type", f"content parts of type {kind!r} are not supported by this deployment")


def _content_to_chat(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, "expected a string or a list of content parts")
    parts = [_part_to_chat(part, f"{where}[{j}]") for j, part in enumerate(content)]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)  # plain text reaches every provider
    return parts


def _message_to_chat(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise _bad(f"{where}.role", "expected one of user, assistant, system, developer")
    content = _content_to_chat(item.get("content"), f"{where}.content")
    if role == "assistant" and not isinstance(content, str):
        raise _bad(f"{where}.content", "assistant messages carry text only")
    return {"role": role, "content": content}


def _output_text(output: Any, where: str) -> str:
    """A function_call_output's ``output``: a string, or content parts of which chat keeps the text."""
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise _bad(where, "expected a string or a list of content parts")
    texts = []
    for j, part in enumerate(output):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
            raise _bad(f"{where}[{j}].type", "tool outputs sent to this deployment carry text only")
        texts.append(str(part.get("text") or ""))
    return "".join(texts)


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name = item.get("call_id"), item.get("name")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{where}.call_id", "Field required")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name", "Field required")
    arguments = item.get("arguments")
    args = arguments if isinstance(arguments, str) else "{}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items as chat messages, in order."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message_to_chat(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            last = out[-1] if out else None
            # Parallel calls are separate items; chat wants them on one assistant message.
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant" and isinstance(last["content"], str):
                last["tool_calls"] = [call]
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"{where}.call_id", "Field required")
            text = _output_text(item.get("output"), f"{where}.output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind != "reasoning":
            raise _bad(f"{where}.type", f"input items of type {kind!r} are not supported by this deployment")
    return out


def _tool_to_chat(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise _bad(f"{where}.type", f"only function tools are supported by this deployment, not {kind!r}")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name", "Field required")
    parameters = tool.get("parameters")
    fn: dict[str, Any] = {
        "name": name,
        "parameters": parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}},
    }
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        fn["strict"] = tool["strict"]
    return {"type": "function", "function": fn}


def _tool_choice_to_chat(choice: Any, chat: dict[str, Any]) -> None:
    if isinstance(choice, str):
        if choice not in _CHOICE_MODES:
            raise _bad("tool_choice", "expected auto, none, required or a tool choice object")
        chat["tool_choice"] = choice
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
        listed = choice.get("tools")
        if not isinstance(listed, list):
            raise _bad("tool_choice.tools", "expected a list of tools")
        allowed = {t.get("name") for t in listed if isinstance(t, dict)}
        chat["tools"] = [t for t in chat.get("tools", []) if t["function"]["name"] in allowed]
        chat["tool_choice"] = choice["mode"]
    else:
        raise _bad("tool_choice", f"tool choices of type {kind!r} are not supported by this deployment")


def _format_to_chat(text: Any, chat: dict[str, Any]) -> None:
    if text is None:
        return
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema", "Field required (a JSON schema object)")
        schema: dict[str, Any] = {"name": str(fmt.get("name") or "output"), "schema": fmt["schema"]}
        for name in ("strict", "description"):
            if fmt.get(name) is not None:
                schema[name] = fmt[name]
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind != "text":
        raise _bad("text.format.type", "expected text, json_object or json_schema")


def responses_request_to_chat(
    body: dict[str, Any], history: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The chat request for a Responses request; ``history`` are the earlier turns' items
    (``previous_response_id`` expanded), which come before the request's own input."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    elif instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions", "expected a string")
    messages += items_to_messages([*(history or []), *input_items(body)])
    if not messages:
        raise _bad("input", "Field required (a string or a non-empty list of input items)")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("stream"):
        # Usage always: it fills response.completed and meters the request.
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    for name in _SAME_NAME:
        if body.get(name) is not None:
            chat[name] = body[name]
    limit = body.get("max_output_tokens")
    if limit is not None:
        chat["max_completion_tokens"] = limit
    user = body.get("safety_identifier") or body.get("user")
    if isinstance(user, str):
        chat["user"] = user
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools", "expected a list")
    if tools:
        chat["tools"] = [_tool_to_chat(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    if body.get("tool_choice") is not None and chat.get("tools"):
        _tool_choice_to_chat(body["tool_choice"], chat)
    _format_to_chat(body.get("text"), chat)
    return chat


#: Options that need state or machinery the router does not have.
_REFUSED = {
    "background": "background responses are not supported by the router",
    "conversation": "conversations are not supported by the router; use previous_response_id",
    "prompt": "prompt templates are not supported by the router",
}


#: Top-level fields and the JSON types they must have (None always allowed).
_TYPES: dict[str, tuple[type, ...]] = {
    "instructions": (str,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_logprobs": (int,),
    "prompt_cache_key": (str,),
    "user": (str,),
    "safety_identifier": (str,),
    "metadata": (dict,),
    "tools": (list,),
    "text": (dict,),
    "reasoning": (dict,),
    "tool_choice": (str, dict),
}


def _check_types(body: dict[str, Any]) -> None:
    for name, kinds in _TYPES.items():
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            names = " or ".join({str: "a string", int: "an integer", float: "a number", dict: "an object",
                                 list: "a list"}[k] for k in kinds)  # fmt: skip
            raise _bad(name, f"expected {names}")


def check_request(body: dict[str, Any]) -> None:
    """Reject what no deployment could serve, naming the field (the shape of the rest is checked
    by the translation, or by the upstream that speaks Responses natively)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "Field required")
    if "stream" in body and body["stream"] is not None and not isinstance(body["stream"], bool):
        raise _bad("stream", "expected a boolean")
    for name in ("store", "parallel_tool_calls"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise _bad(name, "expected a boolean")
    for name in ("max_output_tokens", "top_logprobs"):
        if body.get(name) is not None and as_integer(body[name]) is not None:
            body[name] = as_integer(body[name])  # 3.0 is 3, as JSON Schema counts it
    limit = body.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise _bad("max_output_tokens", "expected an integer of at least 1")
    for name in CLIENT_TARGET_FIELDS:
        if name in body:
            raise _bad(name, "the upstream is chosen by the router's config, never by a request")
    _check_types(body)
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise _bad("previous_response_id", "expected a response id")
    if body.get("input") is None and previous is None:
        raise _bad("input", "Field required")
    input_items(body)
    for name, why in _REFUSED.items():
        if body.get(name) is not None and body[name] is not False:  # 0 == False, yet not false
            raise _bad(name, why)
