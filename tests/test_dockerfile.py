"""The container recipe, checked without a Docker engine.

The Dockerfile is parsed (stages, user, entrypoint, healthcheck), the build context is assembled the
way Docker would (``.dockerignore``, then the builder's COPY instructions), and the builder's and
the runtime's RUN commands are executed in clean virtual environments: ``pip wheel .[all]`` into a
wheel directory, then the runtime's offline ``pip install`` from it, then the runtime's smoke
checks. The image's ENTRYPOINT + CMD is started and its HEALTHCHECK command run against it.

The wheel directory and the runtime venv are cached under ``~/.cache/kubellm/docker-recipe/``,
keyed by pyproject.toml and the install commands; on a cache hit only the kubellm wheel is rebuilt
(and reinstalled), so the current sources are always what is tested.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.servers import free_port, http_get

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CACHE_ROOT = (
    Path(os.environ.get("KUBELLM_CACHE_ROOT") or Path.home() / ".cache" / "kubellm") / "docker-recipe"
)
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make ", "cargo", "rustc", "python3-dev", "libc6-dev")


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    op: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
        text = self.args
        if self.op == "HEALTHCHECK":
            text = text.split(" CMD ", 1)[1] if " CMD " in f" {text}" else ""
            text = text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return [str(v) for v in value]

    def flags(self) -> dict[str, str]:
        """Leading --flag=value options (HEALTHCHECK, RUN --mount, COPY --from)."""
        out: dict[str, str] = {}
        for token in shlex.split(self.args):
            if not token.startswith("--"):
                break
            name, _, value = token[2:].partition("=")
            out[name] = value
        return out

    def body(self) -> str:
        """The arguments without the leading --flags."""
        rest = self.args
        while rest.startswith("--"):
            rest = rest.split(None, 1)[1] if " " in rest else ""
        return rest.strip()


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, op: str) -> list[Instruction]:
        return [i for i in self.instructions if i.op == op]

    def last(self, op: str) -> Instruction | None:
        found = self.all(op)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for token in shlex.split(ins.args):
                key, _, value = token.partition("=")
                out[key] = value
        return out


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Handles comments, parser directives and line continuations."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comments inside a continued instruction
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append((start, buf + line))
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        op, _, rest = line.strip().partition(" ")
        op = op.upper()
        rest = re.sub(r"\s+", " ", rest.strip())
        if op == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base, name))
        elif op == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            assert stages, f"Dockerfile:{number}: {op} before FROM"
            stages[-1].instructions.append(Instruction(op, rest, number))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _, parsed = parse_dockerfile(DOCKERFILE.read_text())
    return {s.name: s for s in parsed}


# --------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching (Go filepath.Match plus ``**``), as a regex."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + r"\Z")


def load_dockerignore(path: Path) -> list[tuple[bool, re.Pattern[str], str]]:
    rules: list[tuple[bool, re.Pattern[str], str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pat), pat))
    return rules


def excluded(rel: str, rules: list[tuple[bool, re.Pattern[str], str]]) -> bool:
    """Docker: a path is excluded when the last pattern matching it, or one of its parents, excludes."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negate, regex, _ in rules:
        if any(regex.match(c) for c in candidates):
            verdict = not negate
    return verdict


def build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send (symlinks kept as symlinks); returns the file list."""
    rules = load_dockerignore(DOCKERIGNORE)
    reincluded = [pat for negate, _, pat in rules if negate]
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir
        keep_dirs = []
        for d in dirnames:
            rel = f"{rel_dir}/{d}" if rel_dir else d
            full = Path(dirpath) / d
            if full.is_symlink():
                filenames.append(d)  # a symlinked directory is sent as a symlink
                continue
            if excluded(rel, rules) and not any(p.startswith(rel + "/") or p == rel for p in reincluded):
                continue
            keep_dirs.append(d)
        dirnames[:] = keep_dirs
        for f in filenames:
            rel = f"{rel_dir}/{f}" if rel_dir else f
            if excluded(rel, rules):
                continue
            src, target = ROOT / rel, dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                target.symlink_to(os.readlink(src))
            else:
                shutil.copy2(src, target)
            files.append(rel)
    return sorted(files)


def test_dockerignore_sends_only_what_the_wheel_needs(tmp_path: Path, stages: dict[str, Stage]) -> None:
    files = build_context(tmp_path)
    for needed in (
        "pyproject.toml",
        "README.md",
        "kubellm/cli.py",
        "router/server/_app.py",
        "operator/_runtime.py",
    ):
        assert needed in files
    assert "kubellm/router" in files and (tmp_path / "kubellm" / "router").is_symlink()
    for kept_out in (".git/", "tests/", "charts/", "bench/", ".hypothesis/", "__pycache__", ".mypy_cache/"):
        assert not [f for f in files if f.startswith(kept_out) or f"/{kept_out}" in f], kept_out
    assert not [f for f in files if f.endswith((".pyc", ".pyo"))]
    # Every COPY source of the builder is in the context.
    for ins in stages["builder"].all("COPY"):
        *sources, _ = shlex.split(ins.body())
        for src in sources:
            assert (tmp_path / src).exists(), f"Dockerfile:{ins.line}: COPY {src} is not in the build context"


def test_dockerignore_matching_follows_docker_rules(tmp_path: Path) -> None:
    ignore = tmp_path / ".dockerignore"
    ignore.write_text("*\n!src\n**/__pycache__\nsrc/secret.txt\n# comment\n")
    rules = load_dockerignore(ignore)
    assert excluded("tests/x.py", rules) and excluded("Makefile", rules)
    assert not excluded("src/a/b.py", rules)
    assert excluded("src/a/__pycache__/b.pyc", rules) and excluded("src/secret.txt", rules)


# --------------------------------------------------------------------------- the recipe, parsed


def test_two_stages_from_python_311_slim(stages: dict[str, Stage]) -> None:
    assert list(stages) == ["builder", "runtime"]
    assert {s.base for s in stages.values()} == {"python:3.11-slim"}
    builder_runs = [i.body() for i in stages["builder"].all("RUN")]
    assert any(re.search(r"pip wheel .*--wheel-dir /wheels .*\.\[all\]", r) for r in builder_runs)


def test_runtime_stage_is_lean_and_unprivileged(stages: dict[str, Stage]) -> None:
    runtime = stages["runtime"]
    # No source tree and no build tools in the runtime image: only the builder's wheels, mounted.
    assert runtime.all("COPY") == [] and runtime.all("ADD") == []
    runs = runtime.all("RUN")
    text = " ".join(r.args for r in runs)
    assert "apt-get" not in text and "apk " not in text
    for tool in BUILD_TOOLS:
        assert tool not in text, tool
    install = [r for r in runs if "pip install" in r.body()]
    assert len(install) == 1
    assert install[0].flags()["mount"] == "type=bind,from=builder,source=/wheels,target=/wheels"
    assert "--no-index" in install[0].body() and '"kubellm[all]"' in install[0].body()
    user = runtime.last("USER")
    assert user is not None and user.args.split(":")[0] == "10001"
    assert any("--uid 10001" in r.args for r in runs), "the kubellm user is created with uid 10001"
    assert runtime.env()["KUBELLM_STATE_DIR"] == "/var/lib/kubellm"


def test_one_image_two_entrypoints(stages: dict[str, Stage]) -> None:
    runtime = stages["runtime"]
    entrypoint, cmd = runtime.last("ENTRYPOINT"), runtime.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form() == ["kubellm"]
    assert cmd is not None
    command = cmd.exec_form()
    assert command is not None and command[0] == "router"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    expose = runtime.last("EXPOSE")
    assert expose is not None and command[command.index("--port") + 1] == expose.args == "8000"


def test_healthcheck_probes_liveness_with_python(stages: dict[str, Stage]) -> None:
    check = stages["runtime"].last("HEALTHCHECK")
    assert check is not None
    argv = check.exec_form()
    assert argv is not None and argv[:2] == ["python", "-c"]
    assert "urllib" in argv[2] and "http://127.0.0.1:8000/health/liveness" in argv[2]
    flags = check.flags()
    assert flags["interval"] and flags["timeout"] and int(flags["retries"]) >= 1


# --------------------------------------------------------------------------- the recipe, executed


@dataclass
class Recipe:
    context: Path
    wheels: Path
    venv: Path
    runtime: Stage
    builder: Stage

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
        env.update(self.runtime.env())
        env.pop("PIP_NO_CACHE_DIR", None)  # the pip cache makes reruns fast; the result is the same
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        env["HOME"] = str(self.venv.parent / "home")
        env["KUBELLM_STATE_DIR"] = str(self.venv.parent / "state")
        env.update(extra)
        return env

    def run_stage_command(
        self, ins: Instruction, cwd: Path, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        """A RUN of the Dockerfile through /bin/sh -c, as Docker runs it, with /wheels mapped."""
        script = ins.body().replace("/wheels", str(self.wheels))
        return subprocess.run(
            ["/bin/sh", "-c", script],
            cwd=cwd,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, **kwargs)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{shlex.join(argv)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    result: subprocess.CompletedProcess[str] = out
    return result


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prune(keep: str, max_age_days: float = 7.0) -> None:
    """Drop cached recipes of other pyproject versions unused for a week (and not in use now)."""
    for lock in CACHE_ROOT.glob("*.lock"):
        key = lock.stem
        if key == keep or time.time() - lock.stat().st_mtime < max_age_days * 86400:
            continue
        with lock.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            shutil.rmtree(CACHE_ROOT / key, ignore_errors=True)
        lock.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def recipe(stages: dict[str, Stage], tmp_path_factory: pytest.TempPathFactory) -> Recipe:
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the image is python:3.11-slim; this check needs a Python 3.11 interpreter")
    builder, runtime = stages["builder"], stages["runtime"]
    build_run = next(i for i in builder.all("RUN") if "pip wheel" in i.body())
    install_run = next(i for i in runtime.all("RUN") if "pip install" in i.body())
    key = hashlib.sha256(
        b"\0".join(
            [
                (ROOT / "pyproject.toml").read_bytes(),
                build_run.body().encode(),
                install_run.body().encode(),
                sys.version.encode(),
            ]
        )
    ).hexdigest()[:16]
    cache = CACHE_ROOT / key
    context = tmp_path_factory.mktemp("docker-context")
    build_context(context)
    # The builder's COPY instructions, into its WORKDIR.
    workdir = context.parent / "src"
    workdir.mkdir()
    for ins in builder.all("COPY"):
        *sources, dest = shlex.split(ins.body())
        for src in sources:
            source, target = context / src, workdir / dest
            if dest.endswith("/"):
                target = target / Path(src).name
            if source.is_dir() and not source.is_symlink():
                shutil.copytree(source, target, symlinks=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target, follow_symlinks=False)
    with _locked(CACHE_ROOT / f"{key}.lock"):
        wheels, venv, builder_venv = cache / "wheels", cache / "venv", cache / "builder-venv"
        done = cache / "complete"
        rec = Recipe(workdir, wheels, venv, runtime, builder)
        started = time.monotonic()
        if not done.exists():
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            # Builder: a clean interpreter runs the Dockerfile's `pip wheel ... ".[all]"`.
            _run([sys.executable, "-m", "venv", str(builder_venv)])
            builder_rec = Recipe(workdir, wheels, builder_venv, builder, builder)
            out = builder_rec.run_stage_command(build_run, workdir)
            assert out.returncode == 0, f"builder RUN failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            # Runtime: another clean interpreter runs the Dockerfile's offline `pip install`.
            _run([sys.executable, "-m", "venv", str(venv)])
            out = rec.run_stage_command(install_run, workdir)
            assert out.returncode == 0, f"runtime RUN failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            done.write_text(f"{time.monotonic() - started:.0f}s\n")
        else:
            # Cached dependencies: rebuild and reinstall only kubellm itself from the current sources.
            for old in wheels.glob("kubellm-*.whl"):
                old.unlink()
            pip = str(builder_venv / "bin" / "pip")
            _run([pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), "."], cwd=workdir)
            _run(
                [
                    str(venv / "bin" / "pip"),
                    "install",
                    "--no-index",
                    "--find-links",
                    str(wheels),
                    "--no-deps",
                    "--force-reinstall",
                    "kubellm",
                ]
            )
            out = rec.run_stage_command(install_run, workdir)  # the Dockerfile's own command, offline
            assert out.returncode == 0, out.stderr
        os.utime(CACHE_ROOT / f"{key}.lock")
    _prune(key)
    return rec


def test_wheel_is_built_from_the_context_and_installed_offline(recipe: Recipe) -> None:
    wheels = sorted(p.name for p in recipe.wheels.glob("*.whl"))
    assert any(w.startswith("kubellm-0.1.0-py3-none-any") for w in wheels)
    freeze = _run([str(recipe.bin / "pip"), "freeze"], env=recipe.env()).stdout.lower()
    for extra in ("kopf", "botocore", "cryptography"):  # [all]: operator, bedrock, vertex
        assert f"{extra}==" in freeze, extra
    assert "kubellm @ file" not in freeze and "-e " not in freeze  # a real install, not the checkout
    where = _run(
        [str(recipe.bin / "python"), "-c", "import kubellm; print(kubellm.__file__)"],
        env=recipe.env(),
        cwd="/",
    ).stdout.strip()
    assert where.startswith(str(recipe.venv)), where


def test_runtime_smoke_checks_pass(recipe: Recipe) -> None:
    """The runtime stage's own checks: `kubellm --help`, both commands, `import operator` is stdlib."""
    checks = [i for i in recipe.runtime.all("RUN") if "kubellm --help" in i.body()]
    assert checks, "the runtime stage smoke-tests the installed commands"
    for ins in checks:
        out = recipe.run_stage_command(ins, Path("/"))
        assert out.returncode == 0, f"Dockerfile:{ins.line} failed:\n{out.stdout}\n{out.stderr}"
    for argv in (["kubellm", "--help"], ["kubellm", "router", "--help"], ["kubellm", "operator", "--help"]):
        out = _run([str(recipe.bin / argv[0]), *argv[1:]], env=recipe.env(), cwd="/")
        assert "usage: kubellm" in out.stdout
    code = (
        "import operator, sysconfig, kubellm.operator, kubellm.router;"
        "print(operator.__file__); print(sysconfig.get_paths()['stdlib']); print(operator.itemgetter)"
    )
    lines = _run([str(recipe.bin / "python"), "-c", code], env=recipe.env(), cwd="/").stdout.splitlines()
    assert lines[0].startswith(lines[1]) and lines[0].endswith("operator.py"), lines
    assert "itemgetter" in lines[2]


def _healthcheck(recipe: Recipe, port: int) -> subprocess.CompletedProcess[str]:
    check = recipe.runtime.last("HEALTHCHECK")
    assert check is not None
    argv = check.exec_form()
    assert argv is not None
    argv = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in argv]
    return subprocess.run(
        [str(recipe.bin / argv[0]), *argv[1:]],
        env=recipe.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_entrypoint_and_cmd_serve_and_pass_the_healthcheck(recipe: Recipe, tmp_path: Path) -> None:
    """`docker run IMAGE` = ENTRYPOINT + CMD: the router starts on 0.0.0.0 (with a master key, as
    the non-loopback default demands) and the HEALTHCHECK command succeeds against it."""
    entrypoint, cmd = recipe.runtime.last("ENTRYPOINT"), recipe.runtime.last("CMD")
    assert entrypoint is not None and cmd is not None
    port = free_port()
    argv = [*(entrypoint.exec_form() or []), *(cmd.exec_form() or [])]
    argv = [str(port) if a == "8000" else a for a in argv]
    env = recipe.env(KUBELLM_MASTER_KEY="sk-docker-test-0123456789", KUBELLM_STATE_DIR=str(tmp_path))
    # Without a key the image refuses to listen on 0.0.0.0 (the secure default).
    bare = {k: v for k, v in env.items() if k != "KUBELLM_MASTER_KEY"}
    refused = subprocess.run(
        [str(recipe.bin / argv[0]), *argv[1:]],
        env=bare,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "refusing to listen" in refused.stderr
    log = (tmp_path / "router.log").open("w")
    proc = subprocess.Popen(
        [str(recipe.bin / argv[0]), *argv[1:]], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{port}/health/readiness", timeout=1)[0] == 200:
                    break
            assert proc.poll() is None, (tmp_path / "router.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "router.log").read_text()
            time.sleep(0.1)
        check = _healthcheck(recipe, port)
        assert check.returncode == 0, check.stderr
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    down = _healthcheck(recipe, port)
    assert down.returncode != 0, "the HEALTHCHECK fails once nothing listens"
