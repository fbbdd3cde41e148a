"""The package layout's rules: what the operator and the CLI may import from the router."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _router_imports(path: Path) -> list[tuple[int, str, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kubellm.router"):
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, "") for a in node.names if a.name.startswith("kubellm.router")]
    return found


def test_operator_and_cli_use_only_the_routers_public_names() -> None:
    files = [*sorted((ROOT / "operator").glob("*.py")), *sorted((ROOT / "kubellm").glob("*.py"))]
    private = [
        f"{path.relative_to(ROOT)}:{line}: {module} {name}"
        for path in files
        for line, module, name in _router_imports(path)
        if any(part.startswith("_") for part in module.split(".")) or name.startswith("_")
    ]
    assert private == []
    # and the rule has something to check: the operator does build on the router's config
    assert any(_router_imports(p) for p in files)


def test_router_modules_are_packages_along_the_request_path() -> None:
    router = ROOT / "router"
    top = sorted(p.name for p in router.glob("*.py"))
    # shared leaves only at the top: everything else lives in its stage's package
    assert top == [
        "__init__.py",
        "_errors.py",
        "_redact.py",
        "_sse.py",
        "kube.py",
        "redis_connect.py",
        "redis_store.py",
    ]
    for stage in (
        "server",
        "inbound",
        "core",
        "upstream",
        "metering",
        "observability",
        "config",
        "providers",
    ):
        assert (router / stage / "__init__.py").is_file(), stage
