"""A small, deterministic instance of a JSON schema, for the mock's tool calls and structured output.

It covers what tool ``parameters`` and ``response_format.json_schema`` schemas use in practice
(types, required properties, enums and consts, nested objects and arrays, local ``$ref``s,
``anyOf``/``oneOf``/``allOf``, length, item and range bounds, common string formats): enough for a
client to parse the answer with the same schema it sent. Only required properties are filled,
so the instance stays minimal. What it cannot satisfy (``pattern``, ``not``) it ignores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

#: ``format`` values a validator may check, with a fixed valid example each.
_FORMATS = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "mock@example.com",
    "idn-email": "mock@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}

_TYPE_ORDER = ("object", "array", "string", "integer", "number", "boolean", "null")

#: Deeper than this, ``$ref`` cycles (a tree node's parent) take a non-recursive alternative.
_MAX_DEPTH = 16
#: Deeper than this, a cycle no finite instance satisfies (every node needs a child) stops, invalid.
_HARD_DEPTH = 2 * _MAX_DEPTH


def instance_of(schema: Any) -> Any:
    """A value valid under ``schema`` (draft 2020-12 or draft 7 keywords), the same on every call."""
    return _Generator(schema if isinstance(schema, dict) else {}).value(schema, 0)


class _Generator:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}  # a remote reference: nothing to read, so anything goes
        node: Any = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict):
                node = node.get(key, {})
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return {}
        return node

    def value(self, schema: Any, depth: int) -> Any:
        if schema is True or not isinstance(schema, dict):
            return {} if depth == 0 else None
        if "$ref" in schema:
            target = self.resolve(str(schema["$ref"]))
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = _merge(target, rest) if isinstance(target, dict) else rest
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    merged = _merge(merged, part)
            return self.value(merged, depth)
        for choice in ("anyOf", "oneOf"):
            options = schema.get(choice)
            if isinstance(options, list) and options:
                rest = {k: v for k, v in schema.items() if k != choice}
                return self.value(_merge(rest, _simplest(options, depth)), depth)
        # A schema that names no type allows anything: an object at the top, as tools expect.
        return self.typed(schema, _type_of(schema) or ("object" if depth == 0 else "string"), depth)

    def typed(self, schema: dict[str, Any], kind: str, depth: int) -> Any:
        if depth > _HARD_DEPTH and kind in ("object", "array"):
            return {} if kind == "object" else []
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, depth)
        if kind == "string":
            return _string(schema)
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer")
        if kind == "boolean":
            return True
        return None

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        found = schema.get("properties")
        properties: dict[str, Any] = found if isinstance(found, dict) else {}
        listed = schema.get("required")
        required = [r for r in listed if isinstance(r, str)] if isinstance(listed, list) else []
        out: dict[str, Any] = {}
        for name in required:
            out[name] = self.value(properties.get(name, {}), depth + 1)
        wanted = schema.get("minProperties")
        if isinstance(wanted, int):
            for name, sub in properties.items():
                if len(out) >= wanted:
                    break
                out.setdefault(name, self.value(sub, depth + 1))
            extra = schema.get("additionalProperties", True)
            while len(out) < wanted and extra is not False:
                out[f"field_{len(out)}"] = self.value(extra, depth + 1) if isinstance(extra, dict) else "mock"
        return out

    def array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        found = schema.get("prefixItems")
        prefix: list[Any] = found if isinstance(found, list) else []
        items = schema.get("items", {})
        if isinstance(items, list):  # draft 7 tuples
            prefix, items = items, schema.get("additionalItems", {})
        wanted = _count(schema, "minItems") or 0
        if depth >= _MAX_DEPTH:
            prefix = prefix[:wanted]
        out = [self.value(sub, depth + 1) for sub in prefix]
        while len(out) < wanted:
            out.append(self.value(items, depth + 1))
            if schema.get("uniqueItems") and out.count(out[-1]) > 1:
                out[-1] = _distinct(out[-1], len(out))
        return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **extra}
    if isinstance(base.get("properties"), dict) and isinstance(extra.get("properties"), dict):
        merged["properties"] = {**base["properties"], **extra["properties"]}
    if "required" in base and "required" in extra:
        merged["required"] = list(dict.fromkeys([*base["required"], *extra["required"]]))
    return merged


def _simplest(options: list[Any], depth: int) -> dict[str, Any]:
    """The first option, except past the depth limit, where a non-recursive one ends the cycle."""
    dicts = [o for o in options if isinstance(o, dict)] or [{}]
    if depth >= _MAX_DEPTH:
        for option in dicts:
            if "$ref" not in option and _type_of(option) not in ("object", "array", None):
                return option
    return dicts[0]


def _type_of(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, str):
        return kind
    if isinstance(kind, list) and kind:
        # Prefer a real value over null; among the rest, the order the schema lists them.
        real = [k for k in kind if k != "null"]
        return str(real[0] if real else kind[0])
    for hint, implied in (("properties", "object"), ("items", "array"), ("prefixItems", "array")):
        if hint in schema:
            return implied
    if any(k in schema for k in ("minLength", "maxLength", "format", "pattern")):
        return "string"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return "number"
    return "object" if "required" in schema else None


def _string(schema: dict[str, Any]) -> str:
    fmt = schema.get("format")
    text = _FORMATS.get(fmt, "mock") if isinstance(fmt, str) else "mock"
    low = _count(schema, "minLength") or 0
    high = _count(schema, "maxLength")
    if len(text) < low:
        text += "x" * (low - len(text))
    if high is not None and len(text) > high:
        text = text[: max(high, low)]
    return text


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    low, low_open = _bound(schema, "minimum", "exclusiveMinimum", max)
    high, high_open = _bound(schema, "maximum", "exclusiveMaximum", min)
    value: float
    if low is None:
        value = 0 if high is None else min(0, high - 1 if high_open else high)
        if integer:
            value = math.floor(value)
    else:
        value = low + 1 if low_open else low
        if integer:
            value = math.floor(low) + 1 if low_open else math.ceil(low)
        if high is not None and not integer and (value > high or (high_open and value >= high)):
            value = (low + high) / 2  # a narrow range: its middle
    step = schema.get("multipleOf")
    if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
        value = math.ceil(value / step) * step
    if integer or float(value).is_integer():
        return int(value)
    return value


def _bound(
    schema: dict[str, Any], inclusive: str, exclusive: str, tighter: Callable[[float, float], float]
) -> tuple[float | None, bool]:
    """The tightest bound on one side, and whether it is open (exclusive)."""
    closed = _numeric(schema.get(inclusive))
    flag = schema.get(exclusive)
    if flag is True:  # draft 4: a flag on the inclusive bound
        return closed, closed is not None
    opened = _numeric(flag)
    if opened is None or (closed is not None and tighter(closed, opened) == closed and closed != opened):
        return closed, False
    return opened, True


def _count(schema: dict[str, Any], name: str) -> int | None:
    value = schema.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _numeric(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _distinct(value: Any, n: int) -> Any:
    """Another value of the same kind, for ``uniqueItems``."""
    if isinstance(value, str):
        return f"{value}{n}"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + n
    return value
