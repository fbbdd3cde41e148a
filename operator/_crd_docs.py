"""A field reference for the CRDs, generated from their OpenAPI schemas (`docs/crds.md`).

Run ``python -m kubellm.operator._crd_docs > docs/crds.md``; a test fails when it is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

CRD_DIR = Path(__file__).resolve().parent.parent / "crds"


def _type(schema: dict[str, Any]) -> str:
    kind = str(schema.get("type", "object" if "properties" in schema else "any"))
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if schema.get("enum"):
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if schema.get("format"):
        return f"{kind} ({schema['format']})"
    return kind


def _rows(schema: dict[str, Any], prefix: str, out: list[str]) -> None:
    required = set(schema.get("required", []))
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        default = f"`{sub['default']}`" if "default" in sub else ("**required**" if name in required else "")
        text = " ".join(str(sub.get("description", "")).split())
        out.append(f"| `{path}` | {_type(sub)} | {default} | {text} |")
        items = sub.get("items", {})
        if "properties" in sub:
            _rows(sub, path, out)
        elif "properties" in items:
            _rows(items, f"{path}[]", out)


def _rules(schema: dict[str, Any], prefix: str, out: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        out.append(f"| `{prefix or '.'}` | {rule.get('message', rule.get('rule'))} |")
    for name, sub in schema.get("properties", {}).items():
        _rules(sub, f"{prefix}.{name}" if prefix else name, out)
        if "properties" in sub.get("items", {}):
            _rules(sub["items"], f"{prefix}.{name}[]" if prefix else f"{name}[]", out)


def crd_reference(crd_dir: Path = CRD_DIR) -> str:
    out = [
        "# CRD reference",
        "",
        "Generated from `crds/` by `python -m kubellm.operator._crd_docs > docs/crds.md`; do not edit.",
        "",
    ]
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        names = crd["spec"]["names"]
        version = crd["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        out += [
            f"## {names['kind']}",
            "",
            f"`{crd['spec']['group']}/{version['name']}`, {crd['spec']['scope'].lower()}, "
            f"short names: {', '.join(f'`{s}`' for s in names.get('shortNames', []))}.",
            "",
        ]
        if schema.get("description"):
            out += [" ".join(str(schema["description"]).split()), ""]
        for part in ("spec", "status"):
            sub = schema.get("properties", {}).get(part)
            if not sub:
                continue
            out += [f"### {part}", "", "| field | type | default | description |", "|---|---|---|---|"]
            _rows(sub, "", out)
            out.append("")
        rules: list[str] = []
        _rules(schema.get("properties", {}).get("spec", {}), "spec", rules)
        if rules:
            out += ["### Validation rules (CEL)", "", "| where | message |", "|---|---|", *rules, ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(crd_reference())
