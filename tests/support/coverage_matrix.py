"""The provider-by-feature table of ``docs/providers.md``, generated from test markers, never by hand.

A test that proves a provider feature end to end says so with
``@pytest.mark.covers("<provider>", "<feature>", ...)`` (on the function, its class, the module's
``pytestmark`` or a ``pytest.param(..., marks=...)``). The table has one row per registered provider
(``kubellm.router.providers.provider_names()``) and one column per feature in :data:`FEATURES`;
a cell is ✅ iff some test carries that marker, else —.

Reading the markers runs no test: they are read statically (``ast``) from ``tests/**/test_*.py``
when their arguments are literals or module-level string constants; a module whose markers are
computed (``pytest.mark.covers(name, *features)`` in a loop) is *collected* instead, in a
``pytest --collect-only`` subprocess, which sees the markers each item ends up with.
``tests/test_provider_matrix.py`` compares ``docs/providers.md`` byte for byte with :func:`render`,
so a hand edit, a new marker or a newly registered provider without a regeneration fails it.
Regenerate with::

    python -m tests.support.coverage_matrix --write      # or --check, or print to stdout

As a pytest plugin (``pytest_plugins`` in ``tests/conftest.py``) it also records which covering
tests PASSED; with ``KUBELLM_WRITE_PROVIDER_MATRIX=1`` (writes ``docs/providers.md``) or
``--provider-matrix PATH`` it writes the table after the run, where a run can only take claims
away: a cell whose covering tests ran in this session and none passed is written as —, so the
document never claims what just failed (and the static check then fails until it is fixed).
Cells whose tests did not run in a partial run keep their static value.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FEATURES = (
    "chat", "stream", "tools", "vision", "json_mode", "embeddings", "stream_usage",
    "images", "image_edits", "moderations", "rerank",
    "audio_speech", "audio_transcription", "audio_translation", "files", "batches",
)  # fmt: skip
COMMAND = "python -m tests.support.coverage_matrix --write"
ROOT = Path(__file__).resolve().parents[2]
DOC = Path("docs") / "providers.md"
ENV = "KUBELLM_WRITE_PROVIDER_MATRIX"
PLUGIN = "tests.support.coverage_matrix"
YES, NO = "✅", "—"

Coverage = dict[str, set[str]]


class MarkerError(ValueError):
    """A ``covers`` marker the generator cannot read, or that names an unknown feature."""


class ComputedMarker(MarkerError):
    """A ``covers`` marker whose arguments are computed: its module is read by collection."""


@dataclass(frozen=True, slots=True)
class Claim:
    provider: str
    feature: str
    where: str  # file:line


# --- reading the markers --------------------------------------------------------------------------


def _is_covers(func: ast.expr) -> bool:
    """``pytest.mark.covers`` or ``mark.covers`` (after ``from pytest import mark``)."""
    if not (isinstance(func, ast.Attribute) and func.attr == "covers"):
        return False
    mark = func.value
    if isinstance(mark, ast.Name):
        return mark.id == "mark"
    return (
        isinstance(mark, ast.Attribute)
        and mark.attr == "mark"
        and isinstance(mark.value, ast.Name)
        and mark.value.id == "pytest"
    )


def _claims(args: Iterable[Any], where: str) -> Iterator[Claim]:
    values = list(args)
    if len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise MarkerError(f"{where}: covers() takes a provider and at least one feature, all string literals")
    provider, *features = values
    for feature in features:
        if feature not in FEATURES:
            raise MarkerError(f"{where}: unknown feature {feature!r}; known: {', '.join(FEATURES)}")
        yield Claim(provider, feature, where)


def _assignments(node: ast.stmt) -> list[tuple[str, ast.expr | None]]:
    """``(name, value)`` for each name a module-level statement binds (value None if not simple)."""
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [(node.target.id, node.value)]
    if not isinstance(node, ast.Assign):
        return []
    pairs: list[tuple[str, ast.expr | None]] = []
    for target in node.targets:
        if isinstance(target, ast.Name):
            pairs.append((target.id, node.value))
        elif isinstance(target, ast.Tuple):  # A, B = "a", "b"
            values = node.value.elts if isinstance(node.value, ast.Tuple) else []
            same = len(values) == len(target.elts)
            for i, elt in enumerate(target.elts):
                if isinstance(elt, ast.Name):
                    pairs.append((elt.id, values[i] if same else None))
    return pairs


def _module_names(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """Module-level string constants (bound once) and aliases of the marker (``c = pytest.mark.covers``)."""
    constants: dict[str, str] = {}
    aliases: set[str] = set()
    bound: dict[str, int] = {}
    for node in tree.body:
        for name, value in _assignments(node):
            bound[name] = bound.get(name, 0) + 1
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                constants[name] = value.value
            elif value is not None and _is_covers(value):
                aliases.add(name)
    return {k: v for k, v in constants.items() if bound[k] == 1}, aliases


def scan_source(source: str, filename: str = "<test>") -> list[Claim]:
    """Every ``covers`` marker in one test module's source.

    Arguments must be string literals or module-level string constants, so that the table
    can be built without running anything.
    """
    tree = ast.parse(source, filename)
    constants, aliases = _module_names(tree)
    claims: list[Claim] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if not (_is_covers(func) or (isinstance(func, ast.Name) and func.id in aliases)):
            continue
        where = f"{filename}:{node.lineno}"
        values: list[str] = []
        for arg in node.args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                values.append(arg.value)
            elif isinstance(arg, ast.Name) and arg.id in constants:
                values.append(constants[arg.id])
            else:
                raise ComputedMarker(f"{where}: covers() has computed arguments")
        if node.keywords:
            raise MarkerError(f"{where}: covers() takes positional arguments only")
        claims.extend(_claims(values, where))
    return claims


def scan(tests_dir: Path = ROOT / "tests") -> list[Claim]:
    """Every claim of the test modules under ``tests_dir``: read statically, or collected if computed."""
    claims: list[Claim] = []
    computed: list[Path] = []
    for path in sorted(tests_dir.rglob("test_*.py")):
        where = path.relative_to(tests_dir.parent).as_posix()
        try:
            claims.extend(scan_source(path.read_text(encoding="utf-8"), where))
        except ComputedMarker:
            computed.append(path)
    if computed:
        claims.extend(collect(computed, tests_dir.parent))
    return claims


#: ``python -c`` program running pytest with the repository importable. Not PYTHONPATH: the
#: repository's top-level ``operator`` directory would shadow the standard library at start-up.
_LAUNCH = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import pytest; sys.exit(pytest.main(sys.argv[1:]))"
)


def subprocess_pytest(*args: str) -> list[str]:
    """A command line running pytest in a subprocess, with this plugin importable from any directory."""
    return [sys.executable, "-c", _LAUNCH, str(ROOT), "-p", "no:cacheprovider", "-p", PLUGIN, *args]


def collect(files: list[Path], rootdir: Path) -> list[Claim]:
    """The claims of the items pytest collects from ``files`` (nothing is run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "claims.json"
        env = {k: v for k, v in os.environ.items() if k != ENV}
        claims_to = f"--provider-matrix-claims={out}"
        cmd = subprocess_pytest("--collect-only", "-q", f"--rootdir={rootdir}", claims_to, *map(str, files))
        proc = subprocess.run(
            cmd, cwd=rootdir, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode not in (0, 5) or not out.exists():
            names = ", ".join(f.name for f in files)
            raise MarkerError(f"collecting {names} failed:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
        return [Claim(**c) for c in json.loads(out.read_text(encoding="utf-8"))]


def item_claims(item: pytest.Item) -> list[Claim]:
    return [c for marker in item.iter_markers("covers") for c in _claims(marker.args, item.nodeid)]


def coverage(claims: Iterable[Claim]) -> Coverage:
    covered: Coverage = {}
    for claim in claims:
        covered.setdefault(claim.provider, set()).add(claim.feature)
    return covered


def unknown_providers(claims: Iterable[Claim], providers: Iterable[str]) -> list[str]:
    known = set(providers)
    return [f"{c.where}: covers() names {c.provider!r}, which is not a registered provider" for c in claims
            if c.provider not in known]  # fmt: skip


def registered_providers() -> list[str]:
    from kubellm.router.providers import provider_names

    return sorted(provider_names())


# --- the document ---------------------------------------------------------------------------------


def render(providers: Iterable[str], covered: Mapping[str, set[str]]) -> str:
    lines = [
        "# Provider feature coverage",
        "",
        f"<!-- GENERATED FILE, do not edit: regenerate with `{COMMAND}` -->",
        "",
        f"Generated by `{COMMAND}` from the `@pytest.mark.covers(provider, *features)` markers of the tests "
        "in `tests/`; `tests/test_provider_matrix.py` fails whenever this file and the markers disagree.",
        "",
        f"{YES}: an end-to-end test proves the feature against a fake that enforces the provider's wire "
        f"protocol. {NO}: no test does (the provider lacks the feature, or it is untested).",
        "",
        "| provider | " + " | ".join(FEATURES) + " |",
        "|---|" + ":-:|" * len(FEATURES),
    ]
    for provider in sorted(providers):
        cells = [YES if feature in covered.get(provider, ()) else NO for feature in FEATURES]
        lines.append(f"| `{provider}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def current(tests_dir: Path = ROOT / "tests") -> str:
    return render(registered_providers(), coverage(scan(tests_dir)))


# --- the pytest plugin ----------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--provider-matrix",
        metavar="PATH",
        default=None,
        help=f"after the run, write the provider feature table to PATH (as {ENV}=1 does to {DOC})",
    )
    parser.addoption(
        "--provider-matrix-claims",
        metavar="PATH",
        default=None,
        help="after collection, write the covers claims of the collected items to PATH as JSON",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    target = session.config.getoption("--provider-matrix-claims", default=None)
    if target is not None:
        claims = [{"provider": c.provider, "feature": c.feature, "where": c.where}
                  for item in session.items for c in item_claims(item)]  # fmt: skip
        Path(target).write_text(json.dumps(claims), encoding="utf-8")


def pytest_configure(config: pytest.Config) -> None:
    target = config.getoption("--provider-matrix", default=None)
    if target is None and os.environ.get(ENV) == "1":
        target = config.rootpath / DOC
    if target is not None:
        config.pluginmanager.register(
            MatrixRecorder(config.rootpath / "tests", Path(target)), "provider-matrix"
        )


class MatrixRecorder:
    """Notes the outcome of every covering test, then writes the table when the session ends."""

    def __init__(self, tests_dir: Path, target: Path) -> None:
        self.tests_dir = tests_dir
        self.target = target
        self.ran: set[tuple[str, str]] = set()
        self.passed: set[tuple[str, str]] = set()
        self._failed: set[str] = set()
        self.disproved: set[tuple[str, str]] = set()
        self.problem: str | None = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        cells = {(c.provider, c.feature) for c in item_claims(item)}
        if cells:
            self.ran |= cells
            if not report.passed:
                self._failed.add(item.nodeid)
            elif report.when == "teardown" and item.nodeid not in self._failed:
                self.passed |= cells
        return report

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        try:
            covered = coverage(scan(self.tests_dir))
        except MarkerError as err:
            self.problem = str(err)
            return
        self.disproved = {cell for cell in self.ran - self.passed if cell[1] in covered.get(cell[0], ())}
        for provider, feature in self.disproved:
            covered[provider].discard(feature)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.target.write_text(render(registered_providers(), covered), encoding="utf-8")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.problem is not None:
            terminalreporter.write_line(f"provider matrix NOT written: {self.problem}", red=True)
            return
        note = f"provider matrix written to {self.target}"
        if self.disproved:
            cells = ", ".join(f"{p}/{f}" for p, f in sorted(self.disproved))
            note += f"; no covering test passed for: {cells} (written as {NO})"
        terminalreporter.write_line(note)


# --- the command ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.coverage_matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write the table to {DOC}")
    action.add_argument("--check", action="store_true", help=f"exit 1 if {DOC} is not current")
    parser.add_argument("--output", type=Path, default=ROOT / DOC, help="the document (default: %(default)s)")
    args = parser.parse_args(argv)
    claims = scan()
    problems = unknown_providers(claims, registered_providers())
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    text = render(registered_providers(), coverage(claims))
    if args.write:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    elif args.check:
        if not args.output.exists() or args.output.read_text(encoding="utf-8") != text:
            print(f"{args.output} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
