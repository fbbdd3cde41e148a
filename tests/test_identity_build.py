"""IdentityBindings -> router config, in process: what is rendered, what is left out and why,
and whose usage a binding's status counts."""

from __future__ import annotations

from typing import Any

from kubellm.operator._build import Ref, build_config
from kubellm.operator._identities import owner_of
from kubellm.router.config import RouterSettings

SETTINGS = RouterSettings.model_validate(
    {
        "identity": {
            "kubernetes": {"enabled": True},
            "oidc": [
                {"name": "corp", "issuer": "https://idp", "jwksUrl": "https://idp/k", "audiences": ["x"]}
            ],
        }
    }
)
DEPLOYMENT = {
    "apiVersion": "kubellm.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "mock", "namespace": "a"},
    "spec": {"model": "m", "provider": "mock"},
}


def binding(name: str, spec: dict[str, Any], namespace: str = "a", created: str = "") -> dict[str, Any]:
    meta = {"name": name, "namespace": namespace, "creationTimestamp": created}
    return {"apiVersion": "kubellm.io/v1alpha1", "kind": "IdentityBinding", "metadata": meta, "spec": spec}


def test_bindings_render_and_bad_ones_are_left_out_with_a_reason() -> None:
    bodies = [
        binding(
            "workers", {"serviceAccounts": ["*"], "team": "a", "budget": {"amountUsd": "2.5"}}, created="1"
        ),
        binding("batch", {"serviceAccounts": ["batch"], "limits": {"rpm": 5}}, created="2"),
        binding("again", {"serviceAccounts": ["batch"]}, created="3"),
        binding("corp", {"oidc": [{"issuer": "corp", "claims": {"groups": "ml"}}], "models": ["m"]}),
        binding("nope", {"oidc": [{"issuer": "elsewhere"}]}),
        binding("guarded", {"serviceAccounts": ["x"], "guardrails": ["missing"]}),
        binding("empty", {"team": "a"}),
        binding("broke", {"serviceAccounts": ["*"], "budget": {"amountUsd": "lots"}}, namespace="b"),
    ]
    result = build_config([DEPLOYMENT], identity_bindings=bodies, settings=SETTINGS)
    rendered = {b.name: b for b in result.config.identity_bindings}
    assert sorted(rendered) == ["a/batch", "a/corp", "a/workers"]
    assert rendered["a/workers"].service_accounts[0].name == "*"
    assert str(rendered["a/workers"].budget.amount_usd) == "2.5"  # type: ignore[union-attr]
    reasons = {ref.name: v.reason for ref, v in result.verdicts.items() if ref.kind == "IdentityBinding"}
    assert reasons == {
        "workers": "Rendered",
        "batch": "Rendered",
        "again": "Conflict",
        "corp": "Rendered",
        "nope": "IssuerNotConfigured",
        "guarded": "GuardrailNotFound",
        "empty": "InvalidSpec",
        "broke": "InvalidSpec",
    }
    assert "'elsewhere'" in result.verdicts[Ref("IdentityBinding", "a", "nope")].message


def test_service_account_bindings_need_the_routers_to_accept_their_tokens() -> None:
    result = build_config([DEPLOYMENT], identity_bindings=[binding("w", {"serviceAccounts": ["*"]})])
    verdict = result.verdicts[Ref("IdentityBinding", "a", "w")]
    assert not verdict.ok and verdict.reason == "ServiceAccountTokensDisabled"
    assert "settings.identity.kubernetes.enabled" in verdict.message


def test_usage_is_counted_for_the_binding_the_routers_chose() -> None:
    bodies = [
        binding("workers", {"serviceAccounts": ["*"]}),
        binding("batch", {"serviceAccounts": ["batch"]}),
        binding("alice", {"oidc": [{"issuer": "corp", "subjects": ["alice"]}]}),
    ]
    result = build_config([DEPLOYMENT], identity_bindings=bodies, settings=SETTINGS)
    rendered = {b.name: b for b in result.config.identity_bindings}
    assert owner_of("sa:a/batch", rendered) == "a/batch"
    assert owner_of("sa:a/web", rendered) == "a/workers"
    assert owner_of("sa:b/web", rendered) is None
    assert owner_of("oidc:corp/alice", rendered) == "a/alice"
    assert owner_of("oidc:corp/bob", rendered) is None


def test_the_documented_settings_and_bindings_work() -> None:
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "kubernetes.md").read_text()
    section = text[text.index("### Identities") : text.index("### Reviewing changes offline")]
    settings: dict[str, Any] = {}
    bindings, pods = [], []
    for block in re.findall(r"```yaml\n(.*?)```", section, re.S):
        for doc in yaml.safe_load_all(block):
            if doc.get("kind") == "IdentityBinding":
                bindings.append(doc)
            elif doc.get("kind") == "Pod":
                pods.append(doc)
            else:
                settings.setdefault("identity", {}).update(doc["identity"])
    parsed = RouterSettings.model_validate(settings)
    result = build_config([DEPLOYMENT], identity_bindings=bindings, settings=parsed)
    assert [v.reason for r, v in result.verdicts.items() if r.kind == "IdentityBinding"] == ["Rendered"] * 2
    source = pods[0]["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] in parsed.identity.kubernetes.audiences
