"""Generated docs stay in step with the code that generates them."""

from __future__ import annotations

from pathlib import Path

from kubellm.router._docs import config_reference

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
