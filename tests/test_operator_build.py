"""The operator's pure builders: resources (+ Secrets) -> router config, verdicts and statuses."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from kubellm.operator import _crds
from kubellm.operator._build import BuildError, Ref, build_config, key_hash
from kubellm.operator._keys import generate_key
from kubellm.operator._runtime import redacted, render_documents
from kubellm.operator._status import (
    Health,
    KeyUsage,
    api_key_status,
    condition,
    deployment_status,
    status_patch,
)
from kubellm.router.config._schema import parse_config
from kubellm.router.core._state import build_state
from kubellm.router.providers import provider_names

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "kubernetes"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
KEY = "sk-" + "A" * 48


def example_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def md(name: str, ns: str = "team", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {"model": "m", "provider": "mock", **spec},
    }


def mg(name: str, ns: str = "team", created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "ModelGroup",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
        "spec": spec,
    }


def ak(name: str, ns: str = "team", created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "ApiKey",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created, "generation": 1},
        "spec": spec,
    }


def key_secrets(*names: str, ns: str = "team", key: str = KEY) -> dict[tuple[str, str], dict[str, str]]:
    return {
        (ns, f"{n}-apikey"): {"key": key if len(names) == 1 else f"{key}{i}"} for i, n in enumerate(names)
    }


# ---- examples -------------------------------------------------------------------


def test_every_provider_example_renders() -> None:
    result = render_documents(example_docs(), namespace="demo", now=NOW)
    providers = {d.provider for d in result.config.deployments}
    assert providers == set(provider_names()), set(provider_names()) - providers
    bad = {str(r): v for r, v in result.rejected().items() if r.kind != "ApiKey"}
    assert not bad, bad
    # Keys are generated in the cluster: offline, their Secrets do not exist yet.
    assert {v.reason for r, v in result.verdicts.items() if r.kind == "ApiKey"} == {"KeySecretMissing"}
    # The router accepts it as it is, and computes the same version from the JSON.
    state = build_state(result.config)
    assert state.groups["mock-gpt"] is state.groups["mock"]  # the alias from the ModelGroup
    text = orjson.dumps(result.document())
    assert parse_config(orjson.loads(text)).version == result.version
    group = next(g for g in result.config.model_groups if g.name == "gpt-4o-mini")
    assert group.fallbacks == ["claude-sonnet", "gemini-flash"] and group.strategy == "lowest-latency"
    openai = next(d for d in result.config.deployments if d.name == "demo/openai-gpt-4o-mini")
    assert openai.api_key == "replace-me" and openai.pricing.input_per_million == Decimal("0.15")
    assert openai.timeouts.first_token == 30
    vertex = next(d for d in result.config.deployments if d.provider == "vertex")
    assert vertex.project == "replace-me" and '"service_account"' in (vertex.api_key or "")


def test_example_keys_render_with_hashes_limits_and_budgets() -> None:
    docs = example_docs()
    keys = {"team-a-app-llm-key": "sk-" + "a" * 48, "ci-bot-apikey": "sk-" + "b" * 48}
    for name, value in keys.items():
        docs.append(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"key": value}}
        )
    result = render_documents(docs, namespace="demo", now=NOW)
    rendered = {k.name: k for k in result.config.keys}
    assert set(rendered) == {"demo/team-a-app", "demo/ci-bot"}
    app = rendered["demo/team-a-app"]
    assert app.key_hash == key_hash(keys["team-a-app-llm-key"]) and app.key_prefix == "sk-aaaaa"
    assert app.models == ["gpt-4o-mini", "claude-sonnet", "mock-gpt"] and app.limits.rpm == 600
    assert app.budget is not None and app.budget.amount_usd == Decimal(100) and app.budget.period == "monthly"
    assert app.owner == "checkout-service" and app.team == "team-a" and not app.disabled
    bot = rendered["demo/ci-bot"]
    assert bot.expires_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert result.next_change == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    # No key (only its hash) in the document.
    assert keys["ci-bot-apikey"] not in orjson.dumps(result.document()).decode()
    assert result.verdicts[Ref("ApiKey", "demo", "analyst")].reason == "KeySecretMissing"


# ---- deployments: unusable ones are left out with a reason ---------------------------

SECRET = {("team", "creds"): {"apiKey": "sk-upstream\n"}}


@pytest.mark.parametrize(
    ("spec", "reason", "message"),
    [
        (
            {"provider": "azure", "baseUrl": "https://x.openai.azure.com"},
            "ProviderFieldMissing",
            "apiVersion",
        ),
        ({"provider": "bedrock"}, "ProviderFieldMissing", "provider bedrock needs region"),
        ({"provider": "vertex", "project": "p"}, "ProviderFieldMissing", "needs project and location"),
        ({"provider": "openai-compatible"}, "ProviderFieldMissing", "needs baseUrl"),
        ({"credentials": {"secretKeyRef": {"name": "nope", "key": "apiKey"}}}, "SecretNotFound", "team/nope"),
        (
            {"credentials": {"secretKeyRef": {"name": "creds", "key": "k"}}},
            "SecretKeyNotFound",
            "has: apiKey",
        ),
        (
            {"credentials": {"env": "A", "file": "/f"}},
            "InvalidSpec",
            "exactly one of secretKeyRef, env, file",
        ),
        ({"pricing": {"inputPerMillion": "abc"}}, "InvalidSpec", "pricing.inputPerMillion"),
        ({"weight": -1}, "InvalidSpec", "weight must be 0 or more"),
        ({"provider": "nope"}, "InvalidSpec", "unknown provider 'nope'"),
        ({"timeouts": {"connect": 0}}, "InvalidSpec", "timeouts.connect"),
        ({"limits": {"rpm": 0}}, "InvalidSpec", "limits.rpm"),
    ],
)
def test_invalid_deployment_is_left_out_with_a_reason(
    spec: dict[str, Any], reason: str, message: str
) -> None:
    good = md("good", credentials={"secretKeyRef": {"name": "creds", "key": "apiKey"}}, provider="openai")
    result = build_config([good, md("bad", **spec)], secrets=SECRET)
    verdict = result.verdicts[Ref("ModelDeployment", "team", "bad")]
    assert (verdict.ok, verdict.reason) == (False, reason), verdict
    assert message in verdict.message, verdict.message
    assert [d.name for d in result.config.deployments] == ["team/good"]
    assert result.config.deployments[0].api_key == "sk-upstream"  # stripped of the trailing newline


def test_builder_messages_match_the_crd_messages() -> None:
    for rule, message in _crds.PROVIDER_RULES:
        provider = re.search(r"'([a-z-]+)'", rule)
        assert provider is not None
        result = build_config([md("x", provider=provider.group(1))])
        assert result.verdicts[Ref("ModelDeployment", "team", "x")].message == message


def test_credentials_env_and_file_pass_through() -> None:
    result = build_config([md("e", credentials={"env": "KEY"}), md("f", credentials={"file": "/k"})])
    deps = {d.name: d for d in result.config.deployments}
    assert deps["team/e"].api_key_env == "KEY" and deps["team/f"].api_key_file == "/k"


# ---- model groups ---------------------------------------------------------------------


def _group_verdicts(
    groups: list[dict[str, Any]], models: tuple[str, ...] = ("a", "b", "c")
) -> dict[str, Any]:
    deployments = [md(f"d-{m}", model=m) for m in models]
    result = build_config(deployments, groups)
    return {f"{r.namespace}/{r.name}": v for r, v in result.verdicts.items() if r.kind == "ModelGroup"}


def test_group_fallback_to_unserved_model_is_left_out() -> None:
    verdicts = _group_verdicts([mg("a", fallbacks=["b", "zzz"])])
    assert verdicts["team/a"].reason == "FallbackNotServed" and "'zzz'" in verdicts["team/a"].message


def test_group_conflicts_keep_the_oldest() -> None:
    older = mg("a", created="2026-01-01T00:00:00Z", strategy="least-busy")
    newer = mg("a2", ns="other", created="2026-02-01T00:00:00Z", model="a")
    verdicts = _group_verdicts([newer, older])
    assert verdicts["team/a"].ok and verdicts["other/a2"].reason == "Conflict"
    assert "team/a" in verdicts["other/a2"].message


def test_group_alias_conflicts() -> None:
    older = mg("c", created="2025-12-01T00:00:00Z", aliases=["x"])
    verdicts = _group_verdicts([mg("a", aliases=["b"]), older, mg("b", aliases=["x"])])
    assert verdicts["team/a"].reason == "AliasConflict" and "already a model" in verdicts["team/a"].message
    assert verdicts["team/b"].reason == "AliasConflict" and verdicts["team/c"].ok


def test_fallback_loop_is_broken_by_leaving_out_the_newest() -> None:
    groups = [
        mg("a", created="2026-01-01T00:00:00Z", fallbacks=["b"]),
        mg("b", created="2026-01-02T00:00:00Z", fallbacks=["c"]),
        mg("c", created="2026-01-03T00:00:00Z", fallbacks=["a"]),
    ]
    verdicts = _group_verdicts(groups)
    assert verdicts["team/c"].reason == "FallbackLoop" and "a -> b -> c -> a" in verdicts["team/c"].message
    assert verdicts["team/a"].ok and verdicts["team/b"].ok


def test_group_self_fallback_and_no_deployments() -> None:
    verdicts = _group_verdicts([mg("a", fallbacks=["a"]), mg("nobody")])
    assert verdicts["team/a"].reason == "InvalidSpec" and "itself" in verdicts["team/a"].message
    assert verdicts["team/nobody"].reason == "NoDeployments"


# ---- keys -------------------------------------------------------------------------------


def test_expired_key_is_left_out_and_the_next_expiry_is_reported() -> None:
    past, soon = (NOW - timedelta(seconds=1)).isoformat(), (NOW + timedelta(hours=1)).isoformat()
    keys = [ak("old", expiresAt=past), ak("new", expiresAt=soon)]
    result = build_config(api_keys=keys, secrets=key_secrets("old", "new"), now=NOW)
    old = result.verdicts[Ref("ApiKey", "team", "old")]
    assert (old.ok, old.reason, old.state) == (False, "Expired", "Expired")
    assert [k.name for k in result.config.keys] == ["team/new"]
    assert result.next_change == (NOW + timedelta(hours=1)).timestamp()


def test_disabled_and_budget_exceeded_keys() -> None:
    keys = [
        ak("off", disabled=True),
        ak("spent", budget={"amountUsd": "1.50", "period": "daily"}),
        ak("fine"),
    ]
    spend = {"team/spent": Decimal("1.50"), "team/fine": Decimal("1000")}
    result = build_config(api_keys=keys, secrets=key_secrets("off", "spent", "fine"), now=NOW, spend=spend)
    states = {r.name: v.state for r, v in result.verdicts.items()}
    assert states == {"off": "Disabled", "spent": "BudgetExceeded", "fine": "Active"}
    # The routers enforce budgets themselves: a spent key stays enabled (spend never changes the config).
    disabled = {k.name: k.disabled for k in result.config.keys}
    assert disabled == {"team/off": True, "team/spent": False, "team/fine": False}
    unspent = build_config(api_keys=keys, secrets=key_secrets("off", "spent", "fine"), now=NOW)
    assert unspent.version == result.version


def test_key_problems() -> None:
    keys = [
        ak("first", created="2026-01-01T00:00:00Z"),
        ak("copy", created="2026-01-02T00:00:00Z", secretName="first-apikey"),
        ak("short", secretName="short"),
        ak("period", budget={"amountUsd": "5", "period": "fortnightly"}),
        ak("missing"),
    ]
    secrets = {**key_secrets("first", "period"), ("team", "short"): {"key": "sk-123"}}
    secrets[("team", "period-apikey")] = {"key": "sk-" + "p" * 48}
    result = build_config(api_keys=keys, secrets=secrets, now=NOW)
    reasons = {r.name: v.reason for r, v in result.verdicts.items()}
    assert reasons == {
        "first": "Rendered",
        "copy": "DuplicateKey",
        "short": "KeyTooShort",
        "period": "InvalidSpec",
        "missing": "KeySecretMissing",
    }
    assert "fortnightly" in result.verdicts[Ref("ApiKey", "team", "period")].message


def test_generated_keys_are_strong() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(re.fullmatch(r"sk-[A-Za-z0-9_-]{48}", k) for k in keys)


# ---- versions -----------------------------------------------------------------------


def test_version_is_a_stable_content_hash() -> None:
    deps = [
        md("a", weight=2),
        md("b", model="n"),
        md("c", credentials={"secretKeyRef": {"name": "s", "key": "k"}}),
    ]
    secrets = {("team", "s"): {"k": "one"}}
    base = build_config(deps, [mg("m", aliases=["x"])], secrets=secrets, now=NOW).version
    assert (
        build_config(list(reversed(deps)), [mg("m", aliases=["x"])], secrets=secrets, now=NOW).version == base
    )
    noisy = copy.deepcopy(deps)
    for d in noisy:  # bookkeeping never changes the output
        d["metadata"].update(resourceVersion="99", generation=7, annotations={"x": "y"})
        d["status"] = {"conditions": []}
    assert build_config(noisy, [mg("m", aliases=["x"])], secrets=secrets, now=NOW).version == base
    changed = [md("a", weight=3), *deps[1:]]
    assert build_config(changed, [mg("m", aliases=["x"])], secrets=secrets, now=NOW).version != base
    rotated = {("team", "s"): {"k": "two"}}
    assert build_config(deps, [mg("m", aliases=["x"])], secrets=rotated, now=NOW).version != base


def test_an_invalid_whole_document_is_never_returned() -> None:
    with pytest.raises(BuildError, match="numRetries"):
        build_config([md("a")], settings={"numRetries": 99})


# ---- statuses ---------------------------------------------------------------------------


def test_condition_keeps_its_transition_time() -> None:
    first = condition("Ready", True, "Rendered", "ok", 1, [], NOW)
    later = condition("Ready", True, "Rendered", "still ok", 2, [first], NOW + timedelta(hours=1))
    assert later["lastTransitionTime"] == first["lastTransitionTime"] and later["observedGeneration"] == 2
    flipped = condition("Ready", False, "SecretNotFound", "x", 2, [first], NOW + timedelta(hours=1))
    assert flipped["lastTransitionTime"] != first["lastTransitionTime"]


def test_status_patch_only_when_something_changed() -> None:
    from kubellm.operator._build import Verdict

    body = md("a")
    verdict = Verdict(True, "Rendered", "serves")
    desired = deployment_status(body, verdict, "team/a", Health(), NOW)
    assert status_patch(None, desired) == {k: v for k, v in desired.items() if v is not None}
    body["status"] = desired
    again = deployment_status(body, verdict, "team/a", Health(), NOW + timedelta(minutes=5))
    assert status_patch(body["status"], again) is None
    cooling = deployment_status(body, verdict, "team/a", Health(NOW.timestamp() + 30), NOW)
    patch = status_patch(body["status"], cooling)
    assert patch is not None and set(patch) == {"openUntil", "conditions"}
    healthy = {c["type"]: c for c in cooling["conditions"]}["Healthy"]
    assert (healthy["status"], healthy["reason"]) == ("False", "CircuitOpen")
    unknown = deployment_status(body, verdict, "team/a", None, NOW)
    assert {c["type"]: c for c in unknown["conditions"]}["Healthy"]["status"] == "Unknown"


def test_rejected_credentials_are_the_healthy_reason() -> None:
    from kubellm.operator._build import Verdict

    verdict = Verdict(True, "Rendered", "serves")
    for open_until in (NOW.timestamp() + 30, NOW.timestamp() - 30):  # cooling, then waiting for a probe
        status = deployment_status(md("a"), verdict, "team/a", Health(open_until, 0.0, 401), NOW)
        healthy = {c["type"]: c for c in status["conditions"]}["Healthy"]
        assert (healthy["status"], healthy["reason"]) == ("False", "CredentialsRejected")
        assert healthy["message"].startswith("the upstream rejected the credentials (401)")
    forbidden = deployment_status(md("a"), verdict, "team/a", Health(NOW.timestamp() + 30, 0.0, 403), NOW)
    message = {c["type"]: c for c in forbidden["conditions"]}["Healthy"]["message"]
    assert "(403)" in message


def test_api_key_status_reports_spend_and_budget() -> None:
    from kubellm.operator._build import Verdict

    body = ak("k", budget={"amountUsd": "10", "period": "daily"})
    usage = KeyUsage(
        Decimal("2.345"), 7, 700, 70, NOW.timestamp() - 3600, NOW.timestamp() + 3600, rejected=9, failed=2
    )
    status = api_key_status(body, Verdict(True, "Rendered", "ok", state="Active"), KEY, usage, NOW)
    assert status["spend"] == "2.35" and status["remainingBudget"] == "7.66"
    assert status["spendSummary"] == "$2.35/$10.00 daily" and status["keyPrefix"] == "sk-AAAAA"
    assert status["usage"] == {
        "requests": 7,
        "rejected": 9,
        "failed": 2,
        "promptTokens": 700,
        "completionTokens": 70,
    }
    assert status["nextReset"] == "2026-06-01T13:00:00Z" and status["state"] == "Active"
    tiny = KeyUsage(Decimal("0.000042"), 1, 1, 1, 0, 1)
    assert api_key_status(ak("t"), Verdict(True, "Rendered", "ok"), None, tiny, NOW)["spend"] == "0.000042"


# ---- CRDs and the render command ------------------------------------------------------------


def test_crd_files_are_generated_from_the_schema_module() -> None:
    assert _crds.main(["--check"]) == 0, "run: python -m kubellm.operator._crds"
    md_crd = yaml.safe_load((ROOT / "crds" / "modeldeployments.yaml").read_text())
    schema = md_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["properties"]["spec"]["properties"]["provider"]["enum"] == sorted(provider_names())


def test_render_command(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "kubellm", "render", "-f", str(EXAMPLES), "-n", "demo"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    assert '"apiKey": "replace-me"' not in out.stdout and doc["deployments"][0]["apiKey"].startswith(
        "<redacted"
    )
    assert "config version" in out.stderr and "LEFT OUT ApiKey demo/ci-bot: KeySecretMissing" in out.stderr
    shown = subprocess.run([*cmd, "--show-secrets"], capture_output=True, text=True, check=False)
    assert '"apiKey": "replace-me"' in shown.stdout
    assert redacted(orjson.loads(shown.stdout)) == doc

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(md("broken", provider="bedrock")))
    failed = subprocess.run(
        [sys.executable, "-m", "kubellm", "render", "-f", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert "LEFT OUT ModelDeployment team/broken: ProviderFieldMissing: provider bedrock needs region" in (
        failed.stderr
    )
