"""The config reference, generated from the pydantic schema so it cannot drift."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ._schema import RouterConfig


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(see type)"
        return f"`{value!r}`"
    return f"`{field.default!r}`" if field.default is not None else "unset"


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for field in model.model_fields.values():
            for arg in (field.annotation, *typing.get_args(field.annotation)):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    visit(arg)

    visit(root)
    return seen


#: Settings read once, when the router's services are built (router/core/_services.py, the sink hub).
BUILT_AT_START = (
    "redis",
    "cache",
    "cooldown",
    "stateDir",
    "sinks",
    "otel",
    "identity",
)


def config_reference() -> str:
    out = [
        "# Router config reference",
        "",
        "Generated from `kubellm.router.config` by `kubellm config-docs -o docs/config.md`; do not edit.",
        "",
        "## What reloads live",
        "",
        "A changed config file (or config Secret) is applied without a restart, atomically: each request",
        "sees one config from start to end. Everything reloads live except the settings the router's",
        "services are built from at start, which take effect at the next restart (rolling the pods):",
        "",
        *[f"- `settings.{name}`" for name in BUILT_AT_START],
        "",
        "Reloading live: deployments, model groups, keys (and their limits, budgets and model access),",
        "the master key, retries, backoff, timeouts, queueing, fallbacks, body limits, the access log",
        "switch, the drain delay and the reload interval itself.",
        "",
    ]
    for model in _models(RouterConfig):
        out += [
            f"## {model.__name__}",
            "",
            (model.__doc__ or "").strip(),
            "",
            "| field | type | default | description |",
            "|---|---|---|---|",
        ]
        for name, field in model.model_fields.items():
            alias = field.alias or name
            kind, default, text = _type_name(field.annotation), _default(field), field.description or ""
            out.append(f"| `{alias}` | {kind} | {default} | {text} |")
        out.append("")
    return "\n".join(out)
