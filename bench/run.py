#!/usr/bin/env python3
"""kubellm benchmark: nginx floor vs LiteLLM Proxy vs kubellm, in one run.

Starts, on 127.0.0.1 and random free ports:

* the fake upstreams (pinned to the client core): nginx ``return 200`` with a
  fixed chat.completion JSON (non-streamed) and ``fakeupstream`` (Go, SSE
  streaming);
* one proxy at a time (pinned to the proxy core): nginx ``proxy_pass``
  (the floor), LiteLLM Proxy, kubellm;

and drives them with ``loadgen`` (Go, pinned to the client core). See
bench/README.md for what is measured. Run ``python bench/run.py --help``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CACHE_DIR = Path(os.environ.get("KUBELLM_BENCH_CACHE", str(Path.home() / ".cache" / "kubellm" / "bench")))
BIN_DIR = CACHE_DIR / "bin"
LITELLM_VENV = CACHE_DIR / "litellm-venv"
# Newest litellm[proxy] that installs from PyPI here: 1.108.13+ pin
# litellm-proxy / litellm-proxy-extras releases that are not published.
LITELLM_VERSION = "1.108.7"

MASTER_KEY = "sk-bench-master"
UPSTREAM_KEY = "sk-bench-upstream"
MODEL = "gpt-4o-mini"  # public model routed to the nginx JSON upstream
STREAM_MODEL = "gpt-4o-mini-stream"  # public model routed to the Go SSE upstream
CHAT_PATH = "/v1/chat/completions"
CLIENT_CPU = "0"  # load generator + fake upstreams
PROXY_CPU = "1"  # the proxy under test

SYSTEMS = ("nginx", "litellm", "kubellm")
TARGET_RPS_X_LITELLM = 40.0
TARGET_ADDED_P50_MS = 0.5
TARGET_TTFB_OVERHEAD_MS = 1.0
TARGET_RSS_MB = 150.0
TARGET_RSS_REQUESTS = 100_000


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BenchError(Exception):
    """A setup or measurement step failed."""


class SkipSystem(Exception):
    """The system under test cannot be run here; it is reported as skipped."""


# --------------------------------------------------------------------------
# processes


class Processes:
    """Starts servers in their own process groups and always stops them."""

    def __init__(self, log_dir: Path, pin: bool) -> None:
        self.log_dir = log_dir
        self.pin = pin
        self.running: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cpu: str | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        full = [*argv]
        if self.pin and cpu is not None:
            full = ["taskset", "-c", cpu, *full]
        logf = (self.log_dir / f"{name}.log").open("ab")
        logf.write(f"$ {shlex.join(full)}\n".encode())
        logf.flush()
        try:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(cwd or self.log_dir),
                start_new_session=True,
            )
        except OSError as exc:
            logf.close()
            raise BenchError(f"cannot start {name}: {exc}") from exc
        self.running.append((name, proc, logf))
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 25) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for i, (_, p, logf) in enumerate(self.running):
            if p is proc:
                del self.running[i]
                _terminate_group(p)
                logf.close()
                return

    def stop_all(self) -> None:
        while self.running:
            _, p, logf = self.running.pop()
            _terminate_group(p)
            logf.close()


def _terminate_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we created for proc, then SIGKILL it."""
    pgid = proc.pid  # start_new_session=True: the group id is the leader's pid
    for sig, wait_s in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                break
            time.sleep(0.05)
        else:
            continue
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------
# /proc helpers


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if not Path(f"/proc/{pid}").exists():
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Rss:
    total_mb: float
    max_proc_mb: float
    processes: int


def measure_rss(pid: int) -> Rss:
    sizes = [rss_kib(p) / 1024.0 for p in process_tree(pid)]
    return Rss(total_mb=sum(sizes), max_proc_mb=max(sizes, default=0.0), processes=len(sizes))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    """Load average and, where the kernel has PSI, the share of time tasks waited for a CPU."""
    try:
        text = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        psi = dict(kv.split("=", 1) for kv in some[1:] if "=" in kv)
        text += f" (CPU pressure avg60 {psi.get('avg60', '?')}%)"
    except (OSError, IndexError, ValueError):
        pass
    return text


def mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024.0 / 1024.0
    except OSError:
        pass
    return 0.0


def neutral_cwd() -> str:
    """A working directory for helper processes: not the repo root, whose top-level
    packages (e.g. operator/) would shadow the standard library for `python -c`/`-m`."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return str(CACHE_DIR)


def cmd_output(argv: Sequence[str], timeout: float = 20.0) -> str:
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=neutral_cwd()
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (res.stdout + res.stderr).strip()


# --------------------------------------------------------------------------
# setup


def go_binary() -> str:
    found = shutil.which("go")
    if found:
        return found
    if Path("/usr/local/go/bin/go").exists():
        return "/usr/local/go/bin/go"
    raise BenchError("Go toolchain not found (need `go` on PATH or /usr/local/go/bin/go)")


def apt_install(packages: Sequence[str]) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(
            f"missing {', '.join(packages)}; install them (e.g. apt-get install {' '.join(packages)})"
        )
    log(f"installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", *packages], check=True, env=env, stdout=subprocess.DEVNULL
    )


def ensure_tools(want_pin: bool) -> bool:
    """Make sure nginx (and taskset when pinning) exist; return whether to pin."""
    missing = []
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        missing.append("nginx")
    if want_pin and not shutil.which("taskset"):
        missing.append("util-linux")
    if missing:
        apt_install(missing)
    if not want_pin:
        return False
    if (os.cpu_count() or 1) < 2:
        log("WARNING: fewer than 2 CPUs; running without CPU pinning")
        return False
    return True


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def build_go() -> None:
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    log(f"building loadgen and fakeupstream into {BIN_DIR}")
    res = subprocess.run(
        [go_binary(), "build", "-trimpath", "-o", str(BIN_DIR) + "/", "./loadgen", "./fakeupstream"],
        cwd=BENCH_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise BenchError(f"go build failed:\n{res.stdout}{res.stderr}")


def ensure_litellm_venv(version: str) -> Path:
    """Create ~/.cache/kubellm/bench/litellm-venv with litellm[proxy]==version unless present."""
    marker = LITELLM_VENV / ".kubellm-bench-installed"
    exe = LITELLM_VENV / "bin" / "litellm"
    if marker.exists() and marker.read_text().strip() == version and exe.exists():
        return exe
    if LITELLM_VENV.exists():
        log(f"recreating {LITELLM_VENV} (want litellm {version})")
        shutil.rmtree(LITELLM_VENV)
    log(f"creating {LITELLM_VENV} with litellm[proxy]=={version} (takes ~1 min)")
    LITELLM_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-I", "-m", "venv", str(LITELLM_VENV)], check=True, cwd=neutral_cwd())
    pip = str(LITELLM_VENV / "bin" / "pip")
    pip_log = CACHE_DIR / "litellm-pip-install.log"
    with pip_log.open("w") as out:
        res = subprocess.run(
            [pip, "install", "--disable-pip-version-check", f"litellm[proxy]=={version}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
            cwd=neutral_cwd(),
        )
    if res.returncode != 0 or not exe.exists():
        tail = "\n".join(pip_log.read_text(errors="replace").splitlines()[-15:])
        shutil.rmtree(LITELLM_VENV, ignore_errors=True)
        raise BenchError(f"pip install litellm[proxy]=={version} failed (log {pip_log}):\n{tail}")
    marker.write_text(version + "\n")
    return exe


def find_kubellm(cmd: str | None) -> list[str] | None:
    if cmd:
        return shlex.split(cmd)
    env_cmd = os.environ.get("KUBELLM_BENCH_CMD")
    if env_cmd:
        return shlex.split(env_cmd)
    found = shutil.which("kubellm")
    if found:
        return [found]
    for venv in (".venv", "venv"):
        cand = REPO_DIR / venv / "bin" / "kubellm"
        if cand.exists():
            return [str(cand)]
    return None


# --------------------------------------------------------------------------
# configs


def request_body(model: str, stream: bool) -> str:
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "max_tokens": 64,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":"))


def nginx_common(prefix: Path) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
"""


def nginx_http_common(prefix: Path) -> str:
    return f"""  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  client_body_temp_path {prefix}/client_body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
"""


def nginx_upstream_conf(prefix: Path, port: int, completion_json: str) -> str:
    if "'" in completion_json or "$" in completion_json:
        raise BenchError("completion JSON cannot be embedded in nginx.conf")
    return (
        nginx_common(prefix)
        + "http {\n"
        + nginx_http_common(prefix)
        + f"""  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location = {CHAT_PATH} {{
      default_type application/json;
      return 200 '{completion_json}';
    }}
    location = /health {{ return 200 'ok'; }}
    location / {{ return 404; }}
  }}
}}
"""
    )


def nginx_proxy_conf(prefix: Path, json_port: int, sse_port: int, up_json: int, up_sse: int) -> str:
    proxy = """      proxy_http_version 1.1;
      proxy_set_header Connection "";
"""
    upstream_opts = "keepalive 128; keepalive_requests 10000000; keepalive_timeout 600s;"
    return (
        nginx_common(prefix)
        + "http {\n"
        + nginx_http_common(prefix)
        + f"""  upstream json_upstream {{ server 127.0.0.1:{up_json}; {upstream_opts} }}
  upstream sse_upstream {{ server 127.0.0.1:{up_sse}; {upstream_opts} }}
  server {{
    listen 127.0.0.1:{json_port} backlog=4096;
    location / {{
      proxy_pass http://json_upstream;
{proxy}    }}
  }}
  server {{
    listen 127.0.0.1:{sse_port} backlog=4096;
    location / {{
      proxy_pass http://sse_upstream;
      proxy_buffering off;
{proxy}    }}
  }}
}}
"""
    )


def litellm_conf(up_json: int, up_sse: int) -> str:
    return f"""# generated by bench/run.py
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: http://127.0.0.1:{up_json}/v1
      api_key: {UPSTREAM_KEY}
  - model_name: {STREAM_MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: http://127.0.0.1:{up_sse}/v1
      api_key: {UPSTREAM_KEY}
litellm_settings:
  telemetry: false
  set_verbose: false
general_settings:
  master_key: {MASTER_KEY}
"""


def kubellm_conf(up_json: int, up_sse: int) -> str:
    return f"""# generated by bench/run.py
deployments:
  - name: bench-upstream
    model: {MODEL}
    provider: openai-compatible
    upstreamModel: {MODEL}
    baseUrl: http://127.0.0.1:{up_json}/v1
    apiKeyEnv: BENCH_UPSTREAM_KEY
  - name: bench-upstream-stream
    model: {STREAM_MODEL}
    provider: openai-compatible
    upstreamModel: {MODEL}
    baseUrl: http://127.0.0.1:{up_sse}/v1
    apiKeyEnv: BENCH_UPSTREAM_KEY
settings:
  masterKeyEnv: KUBELLM_MASTER_KEY
"""


# --------------------------------------------------------------------------
# HTTP checks


def http_post(port: int, path: str, body: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST",
            path,
            body=body.encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {MASTER_KEY}"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_get(port: int, path: str, timeout: float) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_until(
    what: str,
    check: Callable[[], str | None],
    proc: subprocess.Popen[bytes] | None,
    timeout: float,
) -> None:
    """Poll check() (None = ready, else a reason) until ready, proc exits or timeout."""
    deadline = time.monotonic() + timeout
    reason = "not checked"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} ({reason})")
        try:
            got = check()
        except (OSError, http.client.HTTPException) as exc:
            got = f"{type(exc).__name__}: {exc}"
        if got is None:
            return
        reason = got
        time.sleep(0.25)
    raise BenchError(f"{what} not ready after {timeout:.0f}s: {reason}")


def health_check(port: int) -> Callable[[], str | None]:
    def check() -> str | None:
        status = http_get(port, "/health", timeout=2)
        return None if status == 200 else f"GET /health: HTTP {status}"

    return check


def chat_check(port: int, path: str, model: str, stream: bool) -> Callable[[], str | None]:
    def check() -> str | None:
        status, body = http_post(port, path, request_body(model, stream), timeout=10)
        if status != 200:
            return f"HTTP {status}: {body[:300]!r}"
        if stream:
            if b"data: [DONE]" not in body:
                return f"stream without data: [DONE]: {body[:300]!r}"
            if b'"completion_tokens"' not in body:
                return f"stream without usage chunk: {body[-300:]!r}"
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            return f"non-JSON body: {body[:300]!r}"
        if not isinstance(doc, dict) or not doc.get("choices") or not doc.get("usage"):
            return f"body without choices/usage: {body[:300]!r}"
        return None

    return check


# --------------------------------------------------------------------------
# load generation


@dataclass
class Run:
    """One loadgen result (fields as printed by bench/loadgen)."""

    requests: int
    errors: int
    rps: float
    p50: float
    p99: float
    ttfb_p50: float
    ttfb_p99: float
    reconnects: int
    usage_missing: int
    duration_s: float
    first_error: str

    @staticmethod
    def parse(doc: dict[str, Any]) -> Run:
        return Run(
            requests=int(doc["requests"]),
            errors=int(doc["errors"]),
            rps=float(doc["rps"]),
            p50=float(doc["lat_p50_ms"]),
            p99=float(doc["lat_p99_ms"]),
            ttfb_p50=float(doc["ttfb_p50_ms"]),
            ttfb_p99=float(doc["ttfb_p99_ms"]),
            reconnects=int(doc["reconnects"]),
            usage_missing=int(doc["stream_usage_missing"]),
            duration_s=float(doc["duration_s"]),
            first_error=str(doc.get("first_error", "")),
        )


@dataclass
class Loadgen:
    pin: bool
    work_dir: Path
    timeout_s: float = 30.0

    def run(
        self,
        port: int,
        model: str,
        stream: bool,
        conc: int,
        duration: float = 0.0,
        warmup: float = 0.0,
        count: int = 0,
    ) -> Run:
        body_file = self.work_dir / f"body-{model}-{int(stream)}.json"
        body_file.write_text(request_body(model, stream))
        argv = [
            str(BIN_DIR / "loadgen"),
            "-url",
            f"http://127.0.0.1:{port}{CHAT_PATH}",
            "-body",
            f"@{body_file}",
            "-c",
            str(conc),
            "-H",
            f"Authorization: Bearer {MASTER_KEY}",
            "-timeout",
            f"{self.timeout_s}s",
        ]
        if stream:
            argv.append("-stream")
        if count > 0:
            argv += ["-n", str(count)]
            limit: float | None = None
        else:
            argv += ["-d", f"{duration}s", "-warmup", f"{warmup}s"]
            limit = duration + warmup + self.timeout_s + 30
        if self.pin:
            argv = ["taskset", "-c", CLIENT_CPU, *argv]
        env = {**os.environ, "GOMAXPROCS": "1" if self.pin else str(os.cpu_count() or 1)}
        try:
            res = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=limit, check=False, cwd=neutral_cwd()
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"loadgen timed out: {shlex.join(argv)}") from exc
        if res.returncode != 0:
            raise BenchError(f"loadgen failed ({res.returncode}): {res.stderr.strip()}")
        run = Run.parse(json.loads(res.stdout))
        if run.errors:
            log(f"  WARNING: {run.errors} failed requests (first: {run.first_error[:200]})")
        if run.reconnects:
            log(f"  note: server closed keep-alive connections {run.reconnects} times")
        if stream and run.usage_missing:
            log(f"  WARNING: {run.usage_missing} streams without a usage chunk")
        return run


# --------------------------------------------------------------------------
# systems


@dataclass
class Endpoint:
    """Where a system takes non-streamed and streamed chat requests."""

    json_port: int
    sse_port: int
    json_model: str
    sse_model: str
    proc: subprocess.Popen[bytes] | None = None  # the proxy process (for RSS)


@dataclass
class Result:
    name: str
    label: str
    skipped: str = ""
    c32: Run | None = None
    c1: Run | None = None
    sse: Run | None = None
    rss_start: Rss | None = None
    rss_after: Rss | None = None
    rss_n: Rss | None = None
    rss_n_requests: int = 0
    version: str = ""


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Processes
    loadgen: Loadgen
    work_dir: Path
    up_json: int = 0
    up_sse: int = 0
    current: Endpoint | None = None  # proxy being started, stopped if its start fails

    # --- upstreams -------------------------------------------------------
    def start_upstreams(self) -> None:
        chunks = str(self.args.stream_chunks)
        completion = cmd_output([str(BIN_DIR / "fakeupstream"), "-print-json", "-chunks", chunks])
        json.loads(completion)  # must be valid JSON
        self.up_json, self.up_sse = free_port(), free_port()
        prefix = self.work_dir / "nginx-upstream"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(nginx_upstream_conf(prefix, self.up_json, completion))
        nginx_proc = self.procs.start(
            "upstream-nginx",
            [
                nginx_binary(),
                "-p",
                str(prefix),
                "-e",
                str(prefix / "error.log"),
                "-c",
                str(prefix / "nginx.conf"),
            ],
            cpu=CLIENT_CPU,
        )
        go_env = {**os.environ, "GOMAXPROCS": "1" if self.procs.pin else str(os.cpu_count() or 1)}
        sse_proc = self.procs.start(
            "upstream-sse",
            [
                str(BIN_DIR / "fakeupstream"),
                "-addr",
                f"127.0.0.1:{self.up_sse}",
                "-chunks",
                chunks,
                "-delay",
                f"{self.args.chunk_delay_ms}ms",
            ],
            cpu=CLIENT_CPU,
            env=go_env,
        )
        for name, proc, port in (
            ("upstream-nginx", nginx_proc, self.up_json),
            ("upstream-sse", sse_proc, self.up_sse),
        ):
            wait_until(name, health_check(port), proc, 15)
        wait_until("upstream JSON", chat_check(self.up_json, CHAT_PATH, MODEL, False), nginx_proc, 10)
        wait_until("upstream SSE", chat_check(self.up_sse, CHAT_PATH, MODEL, True), sse_proc, 10)
        log(f"fake upstreams: nginx JSON on :{self.up_json}, Go SSE on :{self.up_sse}")

    # --- systems ---------------------------------------------------------
    def start_nginx_proxy(self) -> Endpoint:
        json_port, sse_port = free_port(), free_port()
        prefix = self.work_dir / "nginx-proxy"
        prefix.mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_proxy_conf(prefix, json_port, sse_port, self.up_json, self.up_sse))
        proc = self.procs.start(
            "nginx-proxy",
            [nginx_binary(), "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
            cpu=PROXY_CPU,
        )
        ep = Endpoint(json_port, sse_port, MODEL, MODEL, proc)
        self.current = ep
        self.wait_chat("nginx proxy", ep, 15)
        return ep

    def start_litellm(self) -> Endpoint:
        exe = ensure_litellm_venv(self.args.litellm_version)
        port = free_port()
        conf = self.work_dir / "litellm.yaml"
        conf.write_text(litellm_conf(self.up_json, self.up_sse))
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch at start
            "LITELLM_LOG": "ERROR",
            "LITELLM_MODE": "PRODUCTION",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("DATABASE_URL", None)
        proc = self.procs.start(
            "litellm",
            [
                str(exe),
                "--config",
                str(conf),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            cpu=PROXY_CPU,
            env=env,
            cwd=self.work_dir,
        )
        ep = Endpoint(port, port, MODEL, STREAM_MODEL, proc)
        self.current = ep
        self.wait_chat("litellm", ep, self.args.start_timeout)
        return ep

    def start_kubellm(self, cmd: list[str]) -> Endpoint:
        port = free_port()
        conf = self.work_dir / "kubellm.yaml"
        conf.write_text(kubellm_conf(self.up_json, self.up_sse))
        env = {
            **os.environ,
            "KUBELLM_MASTER_KEY": MASTER_KEY,
            "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
            "PYTHONUNBUFFERED": "1",
        }
        argv = [
            *cmd,
            "router",
            "--config",
            str(conf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            *shlex.split(self.args.kubellm_extra_args),
        ]
        proc = self.procs.start("kubellm", argv, cpu=PROXY_CPU, env=env, cwd=self.work_dir)
        ep = Endpoint(port, port, MODEL, STREAM_MODEL, proc)
        self.current = ep
        self.wait_chat("kubellm", ep, self.args.start_timeout)
        self.check_auth(port)
        return ep

    def check_auth(self, port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(
                "POST",
                CHAT_PATH,
                body=request_body(MODEL, False).encode(),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        if resp.status not in (401, 403):
            raise BenchError(f"auth is not enforced: request without a key got HTTP {resp.status}")

    def wait_chat(self, what: str, ep: Endpoint, timeout: float) -> None:
        wait_until(
            f"{what} (non-streamed)",
            chat_check(ep.json_port, CHAT_PATH, ep.json_model, False),
            ep.proc,
            timeout,
        )
        wait_until(f"{what} (streamed)", chat_check(ep.sse_port, CHAT_PATH, ep.sse_model, True), ep.proc, 30)

    # --- measurement -------------------------------------------------------
    def measure(self, res: Result, ep: Endpoint) -> None:
        a = self.args
        if ep.proc is not None:
            res.rss_start = measure_rss(ep.proc.pid)
        if not a.rss_only:
            log(f"{res.label}: non-streamed, {a.concurrency} connections, {a.warmup}s warmup + {a.duration}s")
            res.c32 = self.loadgen.run(
                ep.json_port, ep.json_model, False, a.concurrency, a.duration, a.warmup
            )
            log(f"  {res.c32.rps:,.0f} req/s  p50 {res.c32.p50:.3f} ms  p99 {res.c32.p99:.3f} ms")
            log(f"{res.label}: non-streamed, 1 connection")
            res.c1 = self.loadgen.run(ep.json_port, ep.json_model, False, 1, a.duration, a.warmup)
            log(f"  {res.c1.rps:,.0f} req/s  p50 {res.c1.p50:.3f} ms  p99 {res.c1.p99:.3f} ms")
            log(f"{res.label}: streamed ({a.stream_chunks} chunks), 1 connection")
            res.sse = self.loadgen.run(ep.sse_port, ep.sse_model, True, 1, a.duration, a.warmup)
            log(
                f"  TTFB p50 {res.sse.ttfb_p50:.3f} ms  p99 {res.sse.ttfb_p99:.3f} ms  "
                f"(full stream p50 {res.sse.p50:.3f} ms)"
            )
            if ep.proc is not None:
                res.rss_after = measure_rss(ep.proc.pid)
                log(f"  RSS {res.rss_after.total_mb:.1f} MB in {res.rss_after.processes} process(es)")
        if a.rss_requests > 0 and ep.proc is not None:
            n_json = a.rss_requests - a.rss_requests // 2
            n_sse = a.rss_requests // 2
            log(
                f"{res.label}: RSS check: {n_json:,} non-streamed + {n_sse:,} streamed requests, "
                f"{a.concurrency} connections"
            )
            t0 = time.monotonic()
            r1 = self.loadgen.run(ep.json_port, ep.json_model, False, a.concurrency, count=n_json)
            r2 = self.loadgen.run(ep.sse_port, ep.sse_model, True, a.concurrency, count=n_sse)
            res.rss_n = measure_rss(ep.proc.pid)
            res.rss_n_requests = r1.requests + r2.requests + r1.errors + r2.errors
            log(
                f"  RSS after {res.rss_n_requests:,} requests ({time.monotonic() - t0:.0f}s, "
                f"{r1.errors + r2.errors} errors): {res.rss_n.total_mb:.1f} MB total "
                f"(was {res.rss_start.total_mb if res.rss_start else 0:.1f} MB after start), "
                f"largest process {res.rss_n.max_proc_mb:.1f} MB"
            )

    def run_system(self, name: str) -> Result:
        labels = {"direct": "direct", "nginx": "nginx proxy", "litellm": "LiteLLM", "kubellm": "kubellm"}
        res = Result(name=name, label=labels[name])
        ep = Endpoint(0, 0, MODEL, MODEL)
        self.current = None
        try:
            if name == "direct":
                ep = Endpoint(self.up_json, self.up_sse, MODEL, MODEL)
                res.version = "fake upstreams"
            elif name == "nginx":
                ep = self.start_nginx_proxy()
                res.version = nginx_version()
            elif name == "litellm":
                ep = self.start_litellm()
                res.version = litellm_version()
            else:
                cmd = find_kubellm(self.args.kubellm_cmd)
                if cmd is None:
                    raise SkipSystem(
                        "`kubellm` command not found (not on PATH, no .venv/bin/kubellm in the repo); "
                        "install the package (pip install -e .) or pass --kubellm-cmd"
                    )
                res.version = kubellm_version(cmd)
                log(f"starting kubellm: {shlex.join(cmd)} router ...")
                ep = self.start_kubellm(cmd)
        except SkipSystem as exc:
            res.skipped = str(exc)
        except BenchError as exc:
            log_name = {"nginx": "nginx-proxy"}.get(name, name)
            tail = self.procs.log_tail(log_name)
            res.skipped = f"{exc}\n--- {self.procs.log_path(log_name)} (last lines) ---\n{tail}"
        if res.skipped:
            if self.current is not None and self.current.proc is not None:
                self.procs.stop(self.current.proc)
            self.current = None
            log(f"SKIPPING {res.label}: {res.skipped}")
            return res
        self.current = None
        try:
            self.measure(res, ep)
        finally:
            if ep.proc is not None:
                self.procs.stop(ep.proc)
        return res


def nginx_version() -> str:
    out = cmd_output([nginx_binary(), "-v"])
    return out.split("/", 1)[1] if "/" in out else out


def litellm_version() -> str:
    py = LITELLM_VENV / "bin" / "python"
    return (
        cmd_output([str(py), "-I", "-c", "import importlib.metadata as m; print(m.version('litellm'))"])
        or "unknown"
    )


def kubellm_version(cmd: list[str]) -> str:
    out = cmd_output([*cmd, "--version"], timeout=30)
    first = out.splitlines()[0] if out else ""
    if first and "error" not in first.lower() and "usage" not in first.lower():
        version = first
    else:
        snippet = "import importlib.metadata as m; print(m.version('kubellm'))"
        got = cmd_output([sys.executable, "-I", "-c", snippet])
        version = got if got and "Error" not in got else "unknown"
    git = cmd_output(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    if git and "fatal" not in git:
        dirty = cmd_output(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "kubellm", "router"])
        version += f" (git {git}{'+dirty' if dirty else ''})"
    return version


# --------------------------------------------------------------------------
# report


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def fmt_delta(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if abs(v) < 10 else f"{v:+.1f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    if num is None or not den:
        return "n/a"
    r = num / den
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def table_rows(results: list[Result], with_rss_n: bool) -> tuple[list[str], list[list[str]]]:
    by = {r.name: r for r in results}

    def rps(name: str) -> float | None:
        r = by.get(name)
        return r.c32.rps if r and r.c32 and r.c32.requests else None

    direct = by.get("direct")
    d_p50 = direct.c1.p50 if direct and direct.c1 else None
    d_ttfb = direct.sse.ttfb_p50 if direct and direct.sse else None
    header = [
        "system",
        "RPS @32",
        "vs LiteLLM",
        "vs nginx",
        "p50 @1 ms",
        "p99 @1 ms",
        "added p50 @1 ms",
        "p50 @32 ms",
        "p99 @32 ms",
        "TTFB p50 ms",
        "TTFB p99 ms",
        "added TTFB p50 ms",
        "RSS MB",
        "errors",
    ]
    if with_rss_n:
        header.append("RSS after N MB")
    rows: list[list[str]] = []
    for r in results:
        if r.skipped:
            row = [r.label, "skipped", *(["-"] * (len(header) - 2))]
            rows.append(row)
            continue
        c1, c32, sse = r.c1, r.c32, r.sse
        errors = sum(x.errors for x in (c1, c32, sse) if x is not None)
        row = [
            r.label,
            f"{c32.rps:,.0f}" if c32 else "n/a",
            fmt_ratio(rps(r.name), rps("litellm")),
            fmt_ratio(rps(r.name), rps("nginx")),
            fmt_ms(c1.p50 if c1 else None),
            fmt_ms(c1.p99 if c1 else None),
            fmt_delta(c1.p50 - d_p50 if c1 and d_p50 is not None else None)
            if r.name != "direct"
            else "(base)",
            fmt_ms(c32.p50 if c32 else None),
            fmt_ms(c32.p99 if c32 else None),
            fmt_ms(sse.ttfb_p50 if sse else None),
            fmt_ms(sse.ttfb_p99 if sse else None),
            fmt_delta(sse.ttfb_p50 - d_ttfb if sse and d_ttfb is not None else None)
            if r.name != "direct"
            else "(base)",
            f"{r.rss_after.total_mb:.1f}" if r.rss_after else "-",
            str(errors),
        ]
        if with_rss_n:
            start = f", {r.rss_start.total_mb:.1f} at start" if r.rss_start else ""
            row.append(f"{r.rss_n.total_mb:.1f} ({r.rss_n_requests:,} req{start})" if r.rss_n else "-")
        rows.append(row)
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(
        h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    out = [line, "-" * len(line)]
    for r in rows:
        out.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    return "\n".join(out)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def target_lines(results: list[Result], args: argparse.Namespace) -> list[str]:
    by = {r.name: r for r in results}
    k = by.get("kubellm")
    if k is None:
        return ["kubellm was not selected (--systems); targets not checked."]
    if k.skipped:
        return [f"kubellm was skipped: {k.skipped.splitlines()[0]}"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines: list[str] = []
    lit = by.get("litellm")
    direct = by.get("direct")
    if k.c32 and lit and lit.c32 and lit.c32.rps:
        ratio = k.c32.rps / lit.c32.rps
        lines.append(
            f"RPS @32 >= {TARGET_RPS_X_LITELLM:.0f}x LiteLLM: {ratio:.1f}x "
            f"({k.c32.rps:,.0f} vs {lit.c32.rps:,.0f}) -> {verdict(ratio >= TARGET_RPS_X_LITELLM)}"
        )
    else:
        lines.append(
            f"RPS @32 >= {TARGET_RPS_X_LITELLM:.0f}x LiteLLM: not measured (needs kubellm and litellm)"
        )
    if k.c1 and direct and direct.c1:
        added = k.c1.p50 - direct.c1.p50
        lines.append(
            f"added p50 @1 <= {TARGET_ADDED_P50_MS} ms: {added:.3f} ms "
            f"-> {verdict(added <= TARGET_ADDED_P50_MS)}"
        )
    if k.sse and direct and direct.sse:
        added = k.sse.ttfb_p50 - direct.sse.ttfb_p50
        lines.append(
            f"streaming TTFB p50 overhead <= {TARGET_TTFB_OVERHEAD_MS} ms: {added:.3f} ms "
            f"-> {verdict(added <= TARGET_TTFB_OVERHEAD_MS)}"
        )
    if k.rss_n and k.rss_n_requests >= TARGET_RSS_REQUESTS:
        lines.append(
            f"RSS < {TARGET_RSS_MB:.0f} MB per worker after {k.rss_n_requests:,} requests: "
            f"{k.rss_n.total_mb:.1f} MB (1 worker, whole process tree) "
            f"-> {verdict(k.rss_n.total_mb < TARGET_RSS_MB)}"
        )
    else:
        have = f"{k.rss_after.total_mb:.1f} MB after the short run" if k.rss_after else "n/a"
        lines.append(
            f"RSS < {TARGET_RSS_MB:.0f} MB per worker after {TARGET_RSS_REQUESTS:,} requests: not checked "
            f"(run with --rss-requests {TARGET_RSS_REQUESTS}); {have}"
        )
    return lines


def detail_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    header = [
        "system",
        "test",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p99 ms",
        "TTFB p50 ms",
        "TTFB p99 ms",
        "first error",
    ]
    rows: list[list[str]] = []
    for r in results:
        for test, run in (("json c=32", r.c32), ("json c=1", r.c1), ("sse c=1", r.sse)):
            if run is None:
                continue
            rows.append(
                [
                    r.label,
                    test,
                    f"{run.requests:,}",
                    str(run.errors),
                    f"{run.rps:,.0f}",
                    fmt_ms(run.p50),
                    fmt_ms(run.p99),
                    fmt_ms(run.ttfb_p50) if test.startswith("sse") else "-",
                    fmt_ms(run.ttfb_p99) if test.startswith("sse") else "-",
                    run.first_error[:80].replace("|", "/") or "-",
                ]
            )
    return header, rows


def environment_lines(
    args: argparse.Namespace, results: list[Result], pin: bool, load: tuple[str, str]
) -> list[str]:
    versions = {r.label: r.version for r in results if r.version and r.name != "direct"}
    go_v = cmd_output([go_binary(), "version"]).replace("go version ", "")
    pinning = (
        f"proxy on cpu {PROXY_CPU}, load generator + fake upstreams on cpu {CLIENT_CPU}" if pin else "none"
    )
    return [
        f"- machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, {mem_total_gib():.1f} GiB RAM, "
        f"Linux {platform.release()}",
        f"- pinning: {pinning}",
        f"- load average (1/5/15 min) before the run: {load[0]}; after: {load[1]} "
        "(an idle machine shows < 0.5 and CPU pressure ~0%; anything else busy makes the numbers noisy)",
        f"- versions: Python {platform.python_version()}, {go_v}, nginx {nginx_version()}"
        + "".join(f", {k} {v}" for k, v in versions.items() if k != "nginx proxy"),
        f"- load: {args.duration}s measured after {args.warmup}s warmup per test; "
        f"{args.concurrency} connections for RPS; streaming = {args.stream_chunks} content chunks, "
        f"{args.chunk_delay_ms} ms delay per chunk",
    ]


def write_results(
    path: Path,
    args: argparse.Namespace,
    results: list[Result],
    pin: bool,
    started: dt.datetime,
    elapsed: float,
    command: str,
    load: tuple[str, str],
) -> None:
    header, rows = table_rows(results, args.rss_requests > 0)
    dheader, drows = detail_rows(results)
    parts = [
        "# kubellm benchmark results",
        "",
        "Generated by `bench/run.py`; overwritten on every run. "
        "See bench/README.md for what the columns mean.",
        "",
        f"- command: `{command}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M:%S %Z')} (run took {elapsed:.0f} s)",
        *environment_lines(args, results, pin, load),
        "",
        "## Summary",
        "",
        md_table(header, rows),
        "",
        "## kubellm targets",
        "",
        *[f"- {line}" for line in target_lines(results, args)],
        "",
    ]
    skipped = [r for r in results if r.skipped]
    if skipped:
        parts += ["## Skipped", ""]
        for r in skipped:
            parts += [f"### {r.label}", "", "```", r.skipped, "```", ""]
    parts += ["## Details", "", md_table(dheader, drows), ""]
    path.write_text("\n".join(parts))


# --------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark nginx proxy_pass (floor), LiteLLM Proxy and kubellm "
        "against fake OpenAI upstreams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--systems",
        default=os.environ.get("BENCH_SYSTEMS", ",".join(SYSTEMS)),
        help="comma list of nginx,litellm,kubellm (direct is always measured)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=float(os.environ.get("BENCH_DURATION", "10")),
        help="measured seconds per test (env BENCH_DURATION)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=float(os.environ.get("BENCH_WARMUP", "2")),
        help="unmeasured warmup seconds before each test (env BENCH_WARMUP)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="connections for the RPS test")
    p.add_argument("--stream-chunks", type=int, default=20, help="content chunks per streamed response")
    p.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="upstream delay before each streamed chunk"
    )
    p.add_argument(
        "--rss-requests",
        type=int,
        default=int(os.environ.get("BENCH_RSS_REQUESTS", "0")),
        help="after the tests, send this many requests (half streamed) to each proxy, then read its "
        f"RSS; the kubellm target uses {TARGET_RSS_REQUESTS} (env BENCH_RSS_REQUESTS)",
    )
    p.add_argument(
        "--rss-only", action="store_true", help="skip the latency/RPS tests, only do --rss-requests"
    )
    p.add_argument(
        "--kubellm-cmd",
        default=None,
        help="command that runs kubellm (default: `kubellm` on PATH or the repo's .venv; "
        "env KUBELLM_BENCH_CMD)",
    )
    p.add_argument(
        "--kubellm-extra-args",
        default=os.environ.get("KUBELLM_BENCH_EXTRA_ARGS", ""),
        help="extra arguments appended to `kubellm router ...`, e.g. '--log-level warning' "
        "(env KUBELLM_BENCH_EXTRA_ARGS)",
    )
    p.add_argument(
        "--litellm-version", default=LITELLM_VERSION, help="litellm[proxy] version for the LiteLLM venv"
    )
    p.add_argument(
        "--start-timeout", type=float, default=180.0, help="seconds to wait for a proxy to serve requests"
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    p.add_argument(
        "--results",
        type=Path,
        default=BENCH_DIR / "RESULTS.md",
        help="markdown file to overwrite with the results",
    )
    p.add_argument("--no-results", action="store_true", help="do not write the results markdown")
    p.add_argument("--require-all", action="store_true", help="exit non-zero if a selected system is skipped")
    args = p.parse_args(argv)
    systems = [s.strip() for s in str(args.systems).split(",") if s.strip() and s.strip() != "direct"]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    args.system_list = [s for s in SYSTEMS if s in systems]
    if args.rss_only and args.rss_requests <= 0:
        args.rss_requests = TARGET_RSS_REQUESTS
    return args


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    print(f"bench: got signal {signum}, stopping servers", file=sys.stderr)
    raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    command = "python bench/run.py" + ("" if not argv else " " + shlex.join(argv))
    started = dt.datetime.now(dt.UTC)
    load_start = loadavg()
    if load_start != "unknown" and float(load_start.split()[0]) > 0.5:
        log(f"WARNING: load average is {load_start}; other processes will disturb the numbers")
    t0 = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    pin = ensure_tools(not args.no_pin)
    build_go()
    if "litellm" in args.system_list:
        ensure_litellm_venv(args.litellm_version)

    runs_dir = CACHE_DIR / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=started.strftime("%Y%m%d-%H%M%S-"), dir=runs_dir))
    log(f"logs and generated configs: {work_dir}")
    procs = Processes(work_dir, pin)
    atexit.register(procs.stop_all)
    bench = Bench(args=args, procs=procs, loadgen=Loadgen(pin=pin, work_dir=work_dir), work_dir=work_dir)
    results: list[Result] = []
    try:
        bench.start_upstreams()
        for name in [*([] if args.rss_only else ["direct"]), *args.system_list]:
            results.append(bench.run_system(name))
    finally:
        procs.stop_all()

    elapsed = time.monotonic() - t0
    raw = [dataclasses.asdict(r) for r in results]
    (work_dir / "results.json").write_text(json.dumps(raw, indent=2) + "\n")
    header, rows = table_rows(results, args.rss_requests > 0)
    print()
    print(text_table(header, rows))
    print()
    for line in target_lines(results, args):
        print("kubellm target: " + line)
    print(f"\ntotal run time {elapsed:.0f} s; logs in {work_dir}")
    if not args.no_results:
        load = (load_start, loadavg())
        write_results(args.results, args, results, pin, started, elapsed, command, load)
        print(f"wrote {args.results}")
    if args.require_all and any(r.skipped for r in results):
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
