"""OpenAI's published OpenAPI description as JSON-schema validators, for checking answers' shapes.

The description lives beside the repository, at ``../shared/openai-openapi/openapi.yaml`` (see its
README): a clone without it skips the tests that use it, saying so. Its quirks, handled here:
3.0-style ``nullable: true`` inside a 3.1 document (turned into a null alternative), and no schema
for a base64 embedding, whose ``embedding`` is a string (callers pass ``overrides``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

SPEC_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "openai-openapi" / "openapi.yaml"


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is not True:
        return out
    if isinstance(out.get("enum"), list) and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = [kind, "null"]
        return out
    if isinstance(kind, list):
        out["type"] = [*kind, "null"] if "null" not in kind else kind
        return out
    return {"anyOf": [out, {"type": "null"}]}


@functools.cache
def components() -> dict[str, Any]:
    if not SPEC_PATH.exists():
        pytest.skip(f"OpenAI's OpenAPI description is not at {SPEC_PATH} in this clone")
    with SPEC_PATH.open() as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return dict(_nullable(spec["components"]))


def validate(name: str, instance: Any, overrides: dict[str, Any] | None = None) -> None:
    """Check ``instance`` against ``components.schemas[name]``; ``overrides`` replaces named schemas."""
    comps = components()
    schemas = {**comps["schemas"], **(overrides or {})}
    root = {"$ref": f"#/components/schemas/{name}", "components": {**comps, "schemas": schemas}}
    errors = sorted(jsonschema.Draft202012Validator(root).iter_errors(instance), key=lambda e: e.path)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]


def _discriminated(node: Any) -> Any:
    """``oneOf`` with a ``discriminator`` as ``anyOf``: OpenAPI picks the member the discriminator
    names, so members that overlap (the Responses ``InputItem`` union: an easy input message is
    also an ``Item`` message) are not a "valid under each of" error as plain JSON schema makes them."""
    if isinstance(node, list):
        return [_discriminated(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _discriminated(value) for key, value in node.items()}
    if "discriminator" in out and "oneOf" in out:
        out["anyOf"] = out.pop("oneOf")
    return out


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    comps = _discriminated(components())
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": comps})


@functools.cache
def _stream_event_schemas() -> dict[str, str]:
    """Responses stream event type (``response.output_text.delta``...) -> its schema's name."""
    members = components()["schemas"]["ResponseStreamEvent"]["anyOf"]
    out: dict[str, str] = {}
    for member in members:
        name = member["$ref"].rsplit("/", 1)[-1]
        kinds = components()["schemas"][name].get("properties", {}).get("type", {}).get("enum") or []
        out.update({kind: name for kind in kinds if kind is not None})
    return out


def validate_fast(name: str, instance: Any) -> None:
    """:func:`validate` without overrides, with the validator built once per schema."""
    errors = sorted(_validator(name).iter_errors(instance), key=lambda e: e.path)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]


def validate_stream_event(event: Any) -> None:
    """A Responses stream event against the member of ``ResponseStreamEvent`` its ``type`` names
    (the union's own errors would not say which field is wrong), then against the union."""
    assert isinstance(event, dict), event
    name = _stream_event_schemas().get(str(event.get("type")))
    assert name is not None, f"{event.get('type')!r} is not a Responses stream event type"
    validate_fast(name, event)
    validate_fast("ResponseStreamEvent", event)
