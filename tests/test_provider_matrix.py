"""docs/providers.md is generated from the tests' covers markers and stays in step with them."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.support.coverage_matrix import (
    COMMAND,
    DOC,
    FEATURES,
    NO,
    ROOT,
    YES,
    Claim,
    ComputedMarker,
    MarkerError,
    coverage,
    registered_providers,
    render,
    scan,
    scan_source,
    subprocess_pytest,
    unknown_providers,
)


@pytest.fixture(scope="module")
def claims() -> list[Claim]:
    return scan()


def test_providers_doc_is_current(claims: list[Claim]) -> None:
    doc = ROOT / DOC
    assert doc.exists(), f"{DOC} is missing: run `{COMMAND}`"
    expected = render(registered_providers(), coverage(claims))
    assert doc.read_text(encoding="utf-8") == expected, (
        f"{DOC} is stale or was edited by hand: run `{COMMAND}`"
    )


def test_every_marker_names_a_registered_provider(claims: list[Claim]) -> None:
    assert unknown_providers(claims, registered_providers()) == []


def test_a_cell_is_checked_iff_some_test_carries_its_marker(claims: list[Claim]) -> None:
    covered = coverage(claims)
    rows: dict[str, dict[str, str]] = {}
    for line in (ROOT / DOC).read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            name, *values = (c.strip() for c in line.strip("|").split("|"))
            rows[name.strip("`")] = dict(zip(FEATURES, values, strict=True))
    assert sorted(rows) == registered_providers()
    for provider, cells in rows.items():
        for feature, cell in cells.items():
            assert cell == (YES if feature in covered.get(provider, ()) else NO), (provider, feature)


SAMPLE = """
import pytest
from pytest import mark

pytestmark = [pytest.mark.covers("acme", "embeddings")]
GAMMA, DELTA = "gamma", "delta"
cov = pytest.mark.covers


@pytest.mark.covers("acme", "chat", "stream")
def test_a():
    pass


@pytest.mark.covers("acme", "tools")
class TestB:
    def test_b(self):
        pass


@pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.covers("beta", "vision")), 2])
def test_c(x):
    pass


covers = mark.covers("beta", "json_mode")


@covers
def test_d():
    pass


def test_e():
    "pytest.mark.covers('acme', 'stream_usage') in a string is not a marker"


@cov(GAMMA, "stream_usage")
@cov(DELTA, "chat")
def test_f():
    pass
"""


def test_scanner_finds_every_way_of_attaching_a_marker() -> None:
    got = {(c.provider, c.feature) for c in scan_source(SAMPLE, "sample.py")}
    assert got == {
        ("acme", "embeddings"),
        ("acme", "chat"),
        ("acme", "stream"),
        ("acme", "tools"),
        ("beta", "vision"),
        ("beta", "json_mode"),
        ("gamma", "stream_usage"),
        ("delta", "chat"),
    }


@pytest.mark.parametrize(
    "source",
    [
        "import pytest\nfrom x import F\n@pytest.mark.covers('acme', F)\ndef test(): pass\n",
        "import pytest\nF = 'chat'\nF = 'tools'\n@pytest.mark.covers('acme', F)\ndef test(): pass\n",
        "import pytest\n@pytest.mark.covers('acme', *['chat'])\ndef test(): pass\n",
    ],
)
def test_scanner_hands_computed_markers_to_collection(source: str) -> None:
    with pytest.raises(ComputedMarker):
        scan_source(source, "computed.py")


@pytest.mark.parametrize(
    "source",
    [
        "import pytest\n@pytest.mark.covers('acme', 'telepathy')\ndef test(): pass\n",
        "import pytest\n@pytest.mark.covers('acme')\ndef test(): pass\n",
        "import pytest\n@pytest.mark.covers(provider='acme')\ndef test(): pass\n",
    ],
)
def test_scanner_rejects_markers_it_cannot_read(source: str) -> None:
    with pytest.raises(MarkerError):
        scan_source(source, "bad.py")


def test_render_is_a_full_table_with_a_generated_header() -> None:
    text = render(["b", "a"], {"a": {"chat", "tools"}})
    assert COMMAND in text.splitlines()[2]
    rest = " — |" * (len(FEATURES) - 3)
    assert "| `a` | ✅ | — | ✅ |" + rest in text
    assert "| `b` | — | — | — |" + rest in text
    assert text.index("| `a`") < text.index("| `b`")
    assert unknown_providers([Claim("zed", "chat", "x.py:1")], ["a"]) == [
        "x.py:1: covers() names 'zed', which is not a registered provider"
    ]


def test_computed_markers_are_read_by_collecting_their_module(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_static.py").write_text(
        "import pytest\n\n@pytest.mark.covers('mock', 'chat')\ndef test(): pass\n"
    )
    (tests / "test_computed.py").write_text(
        textwrap.dedent(
            """
            import pytest

            FEATURES = {"groq": ["tools"], "xai": ["vision", "json_mode"]}

            @pytest.mark.parametrize(
                "name", [pytest.param(n, marks=pytest.mark.covers(n, *f)) for n, f in FEATURES.items()]
            )
            def test_vendor(name):
                pass
            """
        )
    )
    assert coverage(scan(tests)) == {"mock": {"chat"}, "groq": {"tools"}, "xai": {"vision", "json_mode"}}


def test_plugin_writes_only_what_passing_tests_prove(tmp_path: Path) -> None:
    """A run with the plugin writes the table; a covered cell whose tests all failed is written as —."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    covers: test\n")
    (tests / "test_sample.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.covers("mock", "chat")
            def test_passes():
                pass

            @pytest.mark.covers("mock", "stream")
            def test_fails():
                assert False

            @pytest.mark.covers("mock", "tools")
            def test_not_run():
                pass
            """
        )
    )
    out = tmp_path / "providers.md"
    env = {k: v for k, v in os.environ.items() if k != "KUBELLM_WRITE_PROVIDER_MATRIX"}
    ini = str(tmp_path / "pytest.ini")
    cmd = subprocess_pytest(f"--rootdir={tmp_path}", "-c", ini, f"--provider-matrix={out}", "-q", "-k",
                            "not test_not_run", str(tests))  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # test_fails failed
    assert "no covering test passed for: mock/stream" in proc.stdout
    mock_row = next(
        line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| `mock`")
    )
    # chat passed, stream failed (taken away), tools did not run (kept from the markers).
    assert mock_row == "| `mock` | ✅ | — | ✅ |" + " — |" * (len(FEATURES) - 3)
