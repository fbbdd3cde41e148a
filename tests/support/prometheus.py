"""Debian's ``prometheus`` scraping routers, and the check that the chart's Grafana dashboard works
against it: every panel's PromQL parses and returns at least one series with a finite value.

On loopback (tests/test_dashboard_prometheus.py)::

    with Prometheus([f"127.0.0.1:{r.port}" for r in routers]) as prom:
        prom.wait_targets_up()
        ...  # drive some load
        prom.wait_scraped()
        check_dashboard(prom)  # raises DashboardError listing every failing panel

Against router pods (the one-node cluster of tests/support/cluster.py): the pods live in the
node's network namespace, which the host cannot route into but which can reach the host side of
its veth. Run Prometheus inside that namespace, listening on the node IP (which the host reaches),
and give it the pod IPs and the router's container port (``router.port`` in values.yaml)::

    pod_ips = [p["status"]["podIP"] for p in router_pods]      # kubectl get pods -l ... -o json
    with Prometheus(
        [f"{ip}:8000" for ip in pod_ips],
        command_prefix=cluster.network.ns(),  # nsenter --net=/run/netns/kubellm-<id> --
        listen_host=cluster.node_ip,
    ) as prom:
        prom.wait_targets_up()
        ...  # load through the Service / NodePort
        prom.wait_scraped()
        check_dashboard(prom)

Pods that restart get new IPs: build the target list after the rollout has settled. The
Prometheus process, its data directory and its port stay on this machine either way; nothing
here sends a packet anywhere but to the targets given and to Prometheus' own listen address.

Template variables are given the values Grafana would give them (see :func:`template_values`):
``$__rate_interval``, ``$__interval`` and ``$__range`` become ``window``, which should cover the
whole load, so every panel is judged on all of it; a query variable (``label_values(...)``) is
itself asked of Prometheus, must return values, and takes its "All" value when it has one.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.support.servers import free_port

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "kubellm" / "dashboards" / "kubellm.json"


class Prometheus:
    """``prometheus`` with its own data directory, scraping ``targets`` (``host:port``) every
    ``scrape_interval`` seconds. ``command_prefix`` runs it under another command (a network
    namespace); ``listen_host`` is where it listens and where this class reaches its API."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        scrape_interval: float = 1.0,
        metrics_path: str = "/metrics",
        job: str = "kubellm-router",
        listen_host: str = "127.0.0.1",
        port: int | None = None,
        command_prefix: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        found = binary or shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(found).exists():
            raise RuntimeError("prometheus is not installed (Debian package `prometheus`)")
        self.binary = found
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.job = job
        self.listen_host = listen_host
        self.port = port or free_port()
        self.command_prefix = list(command_prefix)
        self.dir = Path(tempfile.mkdtemp(prefix="kubellm-prometheus-"))
        self.url = f"http://{listen_host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> dict[str, Any]:
        interval = f"{int(self.scrape_interval * 1000)}ms"
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self, timeout: float = 30) -> Prometheus:
        config = self.dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self._config()))
        argv = [
            *self.command_prefix,
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address={self.listen_host}:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        log = open(self.dir / "prometheus.log", "ab")  # noqa: SIM115 - the child keeps its own copy
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait(lambda: self._get("/-/ready")[0] == 200, timeout, "Prometheus not ready")
        return self

    def logs(self) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _get(self, path: str, params: Sequence[tuple[str, str]] = ()) -> tuple[int, Any]:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:  # 400/422 carry Prometheus' error as JSON
            body, status = err.read(), err.code
        except OSError:
            return 0, None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def _wait(self, ok: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} after {timeout}s:\n{self.logs()}")
            time.sleep(0.1)

    def active_targets(self) -> list[dict[str, Any]]:
        status, body = self._get("/api/v1/targets", [("state", "active")])
        if status != 200 or not isinstance(body, dict):
            return []
        targets: list[dict[str, Any]] = body["data"]["activeTargets"]
        return targets

    def wait_targets_up(self, timeout: float = 20) -> None:
        """Every target has been scraped successfully at least once."""

        def up() -> bool:
            targets = self.active_targets()
            return len(targets) == len(self.targets) and all(t["health"] == "up" for t in targets)

        try:
            self._wait(up, timeout, "targets not up")
        except RuntimeError as err:
            states = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.active_targets()]
            raise RuntimeError(f"{err}\ntargets: {states}") from None

    def wait_scraped(self, after: float | None = None, timeout: float = 20) -> None:
        """Every target has been scraped, successfully, since ``after`` (default: now), so what the
        routers counted until then is in Prometheus."""
        since = time.time() if after is None else after

        def fresh() -> bool:
            targets = self.active_targets()
            return len(targets) == len(self.targets) and all(
                t["health"] == "up" and _timestamp(t["lastScrape"]) > since for t in targets
            )

        self._wait(fresh, timeout, "targets not scraped again")

    def query(self, expr: str) -> tuple[list[dict[str, Any]], str | None]:
        """An instant query: its vector (or scalar, as one sample), or Prometheus' error."""
        status, body = self._get("/api/v1/query", [("query", expr)])
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            return [], f"HTTP {status}: {error}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}], None
        if data["resultType"] != "vector":
            return [], f"unexpected result type {data['resultType']}"
        result: list[dict[str, Any]] = data["result"]
        return result, None

    def label_values(self, label: str, match: str | None) -> tuple[list[str], str | None]:
        params = [("match[]", match)] if match else []
        status, body = self._get(f"/api/v1/label/{urllib.parse.quote(label)}/values", params)
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            return [], f"HTTP {status}: {error}"
        values: list[str] = body["data"]
        return values, None


def _timestamp(rfc3339: str) -> float:
    """Prometheus' RFC 3339 times ("2026-12-03T15:01:02.123456789Z"): nanoseconds, which
    ``datetime`` does not parse, and a zone."""
    m = re.fullmatch(r"([^.Z+]+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", rfc3339.strip())
    if m is None:
        return 0.0
    zone = (m.group(3) or "Z").replace("Z", "+00:00")
    return datetime.fromisoformat(m.group(1) + zone).timestamp() + float("0." + (m.group(2) or "0"))


# --------------------------------------------------------------------------- the dashboard


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel: ``expr`` as written, ``query`` with the variables substituted."""

    panel: str
    ref: str
    expr: str
    query: str = ""


@dataclass(frozen=True)
class Failure:
    where: str
    expr: str
    problem: str

    def __str__(self) -> str:
        return f"- {self.where}\n    expr:    {self.expr}\n    problem: {self.problem}"


class DashboardError(AssertionError):
    def __init__(self, failures: Sequence[Failure], checked: int) -> None:
        self.failures = list(failures)
        lines = "\n".join(str(f) for f in failures)
        super().__init__(f"{len(failures)} of {checked} dashboard queries failed:\n{lines}")


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def _panels(panels: Sequence[Mapping[str, Any]], row: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every panel with the row it sits under; a collapsed row keeps its panels in ``panels``."""
    for panel in panels:
        if panel.get("type") == "row":
            row = str(panel.get("title", ""))
            yield from _panels(panel.get("panels", []), row)
            continue
        yield (f"{row} / {panel.get('title', '?')}" if row else str(panel.get("title", "?"))), panel
        yield from _panels(panel.get("panels", []), row)


def panel_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    """Every PromQL target of every panel (rows' nested panels included), hidden ones too."""
    found: list[PanelQuery] = []
    for title, panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if isinstance(expr, str) and expr.strip():
                found.append(PanelQuery(title, str(target.get("refId", "?")), expr))
    return found


_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\[\[(\w+)(?::[\w-]+)?\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+?)\s*,\s*)?([A-Za-z_]\w*)\s*\)\s*$")


def _variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, dict):
        return str(query.get("query", ""))
    return str(query or variable.get("definition", ""))


def template_values(
    dashboard: Mapping[str, Any], prom: Prometheus, window: str, failures: list[Failure]
) -> dict[str, str]:
    """What each variable expands to: Grafana's interval built-ins become ``window``; each query
    variable's query is asked of Prometheus (no values is a failure) and takes its All value."""
    values = {
        "__rate_interval": window,
        "__interval": window,
        "__range": window,
        "__interval_ms": str(_seconds(window) * 1000),
        "__range_s": str(_seconds(window)),
        "__range_ms": str(_seconds(window) * 1000),
    }
    for variable in dashboard.get("templating", {}).get("list", []):
        name, kind = str(variable.get("name")), variable.get("type")
        if kind == "datasource":
            continue  # names the data source; never part of an expression
        if kind in ("custom", "constant", "textbox", "interval"):
            current = variable.get("current", {}).get("value") or _variable_query(variable).split(",")[0]
            values[name] = str(current[0] if isinstance(current, list) else current).strip()
            continue
        query = _variable_query(variable)
        match = _LABEL_VALUES.match(query)
        if kind != "query" or match is None:
            failures.append(Failure(f"variable ${name}", query, f"the check does not know type {kind!r}"))
            continue
        found, error = prom.label_values(match.group(2), match.group(1))
        if error or not found:
            failures.append(Failure(f"variable ${name}", query, error or "no values"))
        if variable.get("includeAll") and variable.get("allValue"):
            values[name] = str(variable["allValue"])
        else:  # Grafana's default for a multi-value Prometheus variable: (a|b|c), regex-escaped
            values[name] = "(" + "|".join(re.escape(v) for v in found) + ")" if found else ""
    return values


def _seconds(duration: str) -> int:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", duration))
    return max(1, int(total))


def substitute(expr: str, values: Mapping[str, str]) -> tuple[str, list[str]]:
    """``expr`` with ``$name``, ``${name}``, ``${name:format}`` and ``[[name]]`` replaced; and the
    names it uses that ``values`` lacks."""
    unknown: list[str] = []

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            unknown.append(name)
            return m.group(0)
        return values[name]

    return _VARIABLE.sub(one, expr), unknown


def _problem(prom: Prometheus, query: str) -> str | None:
    series, error = prom.query(query)
    if error:
        return error
    if not series:
        return "no series"
    numbers = [float(s["value"][1]) for s in series]
    if not any(math.isfinite(n) for n in numbers):
        return f"{len(series)} series, none with a finite value ({numbers[:3]})"
    return None


def check_dashboard(
    prom: Prometheus, dashboard: Mapping[str, Any] | None = None, *, window: str = "1m"
) -> list[PanelQuery]:
    """Asks Prometheus every panel query of the dashboard (the chart's by default); returns them, or
    raises :class:`DashboardError` naming each panel whose query fails to parse, returns no
    series, or only NaN (Grafana would draw nothing), with the expression and Prometheus' error."""
    board = dashboard if dashboard is not None else load_dashboard()
    failures: list[Failure] = []
    values = template_values(board, prom, window, failures)
    checked: list[PanelQuery] = []
    for pq in panel_queries(board):
        query, unknown = substitute(pq.expr, values)
        pq = PanelQuery(pq.panel, pq.ref, pq.expr, query)
        checked.append(pq)
        where = f"{pq.panel} [{pq.ref}]"
        if unknown:
            failures.append(Failure(where, pq.expr, f"undefined variables {sorted(set(unknown))}"))
            continue
        problem = _problem(prom, query)
        if problem:
            failures.append(Failure(where, query, problem))
    if not checked:
        failures.append(Failure("dashboard", "", "no panel has a PromQL target"))
    if failures:
        raise DashboardError(failures, len(checked))
    return checked


@contextlib.contextmanager
def prometheus(targets: Sequence[str], **kwargs: Any) -> Iterator[Prometheus]:
    """``Prometheus(targets, **kwargs)``, started, with its targets up."""
    with Prometheus(targets, **kwargs) as prom:
        prom.wait_targets_up()
        yield prom
