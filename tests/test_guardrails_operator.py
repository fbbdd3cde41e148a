"""Guardrails through the operator: the platform defines them in the operator's settings file,
ModelGroups and ApiKeys name them, and the rendered config carries both (pure builders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm.operator import _crds
from kubellm.operator._build import Ref, build_config
from kubellm.operator._runtime import load_guardrails
from kubellm.router.config._schema import ConfigError, GuardrailConfig
from kubellm.router.core._state import build_state
from tests.test_operator_build import NOW, ak, key_secrets, md, mg

PII = GuardrailConfig.model_validate({"name": "pii", "type": "regex-redact", "patterns": [r"\d{3}-\d{4}"]})


def test_groups_and_keys_name_the_platforms_guardrails() -> None:
    result = build_config(
        [md("d1")],
        [mg("m", guardrails=["pii"]), mg("other", model="x", guardrails=["nope"])],
        [ak("k1", guardrails=["pii"]), ak("k2", guardrails=["nope"])],
        key_secrets("k1") | {("team", "k2-apikey"): {"key": "sk-" + "B" * 48}},
        now=NOW,
        guardrails=[PII],
    )
    config = result.config
    assert [g.name for g in config.guardrails] == ["pii"]
    assert {g.name: g.guardrails for g in config.model_groups} == {"m": ["pii"]}
    assert {k.name: k.guardrails for k in config.keys} == {"team/k1": ["pii"]}
    bad_group = result.verdicts[Ref("ModelGroup", "team", "other")]
    bad_key = result.verdicts[Ref("ApiKey", "team", "k2")]
    assert (bad_group.ok, bad_group.reason) == (False, "GuardrailNotFound")
    assert (bad_key.ok, bad_key.reason) == (False, "GuardrailNotFound")
    assert "'nope'" in bad_key.message
    assert "pii" in build_state(config).guardrails  # the router compiles what the operator rendered


def test_crds_have_the_fields() -> None:
    assert "guardrails" in _crds.model_group_spec()["properties"]
    assert "guardrails" in _crds.api_key_spec()["properties"]


def test_settings_file_guardrails(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("settings: {}\nguardrails:\n- {name: t, type: blocked-terms, terms: [x]}\n")
    assert [g.name for g in load_guardrails(str(path))] == ["t"]
    path.write_text("guardrails:\n- {name: t, type: blocked-terms}\n")
    with pytest.raises(ConfigError, match=r"guardrails\[0\]"):
        load_guardrails(str(path))


def test_chart_puts_router_guardrails_in_the_operators_settings_file(tmp_path: Path) -> None:
    from kubellm.operator._runtime import load_settings
    from tests.test_chart import RELEASE, find, render

    values = tmp_path / "values.yaml"
    values.write_text(
        "router:\n  settings: {numRetries: 3}\n"
        "  guardrails:\n  - {name: pii, type: regex-redact, patterns: ['\\d{3}-\\d{4}']}\n"
    )
    docs = render([values])
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(find(docs, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"])
    assert load_settings(str(settings_file)).num_retries == 3
    (guard,) = load_guardrails(str(settings_file))
    assert (guard.name, guard.patterns) == ("pii", [r"\d{3}-\d{4}"])
