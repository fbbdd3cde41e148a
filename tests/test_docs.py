"""Generated docs stay in step with the code that generates them."""

from __future__ import annotations

from pathlib import Path

from kubellm.router.config._docs import config_reference

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_current() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), (
        "docs/config.md is stale: run `kubellm config-docs -o docs/config.md`"
    )


def test_every_config_field_is_documented() -> None:
    text = config_reference()
    for line in text.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented field: {line}"


def test_crd_reference_is_current_and_complete() -> None:
    from kubellm.operator._crd_docs import crd_reference

    text = crd_reference()
    assert (ROOT / "docs" / "crds.md").read_text() == text, (
        "docs/crds.md is stale: run `python -m kubellm.operator._crd_docs > docs/crds.md`"
    )
    undocumented = [line for line in text.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undocumented == []


def test_example_router_config_is_valid() -> None:
    from kubellm.router import load_config

    config = load_config(ROOT / "examples" / "router.yaml")
    assert {d.model for d in config.deployments} == {"gpt-4o-mini"}


def test_settings_built_at_start_are_real_settings() -> None:
    from kubellm.router.config._docs import BUILT_AT_START
    from kubellm.router.config._schema import RouterSettings

    aliases = {field.alias or name for name, field in RouterSettings.model_fields.items()}
    assert set(BUILT_AT_START) <= aliases
