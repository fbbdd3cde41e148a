"""Providers with an optional dependency refuse their config when it is missing.

On a plain ``pip install kubellm``, a Bedrock deployment loaded and every request then got an
opaque 500. Now the config is refused when it loads, naming the extra to install; a hot reload
keeps the last good config, and the operator leaves the ModelDeployment out (Ready=False). The
missing module is simulated in a real router process by a package earlier on ``PYTHONPATH``
whose import raises ImportError, as on an install without the extra.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from kubellm.operator._build import Ref, build_config
from tests.fakes.bedrock_upstream import FakeBedrock
from tests.support.servers import RouterProcess, http_get

AKID, SECRET = "AKIDEXAMPLETEST01", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
API_KEY = "ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl"
CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
MOCK = {"name": "mock-a", "model": "mock", "provider": "mock"}


def _without(tmp_path: Path, package: str) -> dict[str, str]:
    """Environment for a router that cannot import ``package``."""
    shim = tmp_path / "shim" / package
    shim.mkdir(parents=True)
    # ModuleNotFoundError, as for a package that is not installed: libraries that probe for an
    # optional dependency (PyJWT probes for cryptography) catch exactly that.
    message = f"No module named {package!r} (test shim)"
    (shim / "__init__.py").write_text(f"raise ModuleNotFoundError({message!r}, name={package!r})\n")
    path = os.pathsep.join(p for p in (str(tmp_path / "shim"), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def _bedrock(credential: str, base_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    return {
        "name": "claude",
        "model": "claude",
        "provider": "bedrock",
        "upstreamModel": CLAUDE,
        "baseUrl": base_url,
        "region": "us-east-1",
        "apiKey": credential,
    }


def _refused(router: RouterProcess) -> str:
    router.start(wait=False)
    assert router.proc is not None
    assert router.proc.wait(30) != 0
    return router.logs()


def test_bedrock_without_botocore_is_refused_at_startup(tmp_path: Path) -> None:
    router = RouterProcess(
        {"deployments": [MOCK, _bedrock(f"{AKID}:{SECRET}")]}, env=_without(tmp_path, "botocore")
    )
    logs = _refused(router)
    assert "deployments[1].provider: 'bedrock' needs the optional dependency botocore" in logs
    assert "pip install 'kubellm[bedrock]'" in logs
    assert SECRET not in logs


def test_bedrock_with_an_api_key_needs_no_botocore(
    tmp_path: Path, start_router: Callable[..., RouterProcess]
) -> None:
    """A Bedrock API key is a bearer token: nothing to sign, so the extra is not needed."""
    with FakeBedrock({}, api_key=API_KEY) as fake:
        router = start_router(
            {"deployments": [_bedrock(API_KEY, fake.base_url)]}, env=_without(tmp_path, "botocore")
        )
        client = openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0)
        answer = client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content


def test_a_reload_that_needs_a_missing_extra_keeps_the_last_good_config(
    tmp_path: Path, start_router: Callable[..., RouterProcess]
) -> None:
    router = start_router(
        {"deployments": [MOCK], "settings": {"reloadIntervalSeconds": 0.1}},
        env=_without(tmp_path, "botocore"),
    )
    version = orjson.loads(http_get(router.base_url + "/health/readiness")[1])["configVersion"]
    router.write_config(
        {"deployments": [MOCK, _bedrock(f"{AKID}:{SECRET}")], "settings": {"reloadIntervalSeconds": 0.1}}
    )
    deadline = time.monotonic() + 10
    while "config reload rejected" not in router.logs():
        assert time.monotonic() < deadline, router.logs()[-2000:]
        time.sleep(0.05)
    assert "pip install 'kubellm[bedrock]'" in router.logs()
    assert orjson.loads(http_get(router.base_url + "/health/readiness")[1])["configVersion"] == version
    client = openai.OpenAI(base_url=router.v1, api_key="x", max_retries=0)
    assert client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}]).choices


def test_vertex_without_cryptography_is_refused_at_startup(tmp_path: Path) -> None:
    vertex = {
        "name": "gem",
        "model": "gem",
        "provider": "vertex",
        "upstreamModel": "gemini-2.0-flash",
        "project": "p",
        "location": "us-central1",
        "apiKey": '{"type": "service_account"}',
    }
    logs = _refused(RouterProcess({"deployments": [vertex]}, env=_without(tmp_path, "cryptography")))
    assert "deployments[0].provider: 'vertex' needs the optional dependency cryptography" in logs
    assert "pip install 'kubellm[vertex]'" in logs


def test_the_operator_leaves_the_deployment_out_with_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in [m for m in sys.modules if m == "botocore" or m.startswith("botocore.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "botocore", None)  # import botocore raises ImportError

    def md(name: str, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "kubellm.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "team", "generation": 1},
            "spec": {"model": name, **spec},
        }

    signed = md("signed", provider="bedrock", region="us-east-1", credentials={"env": "AWS_KEYS"})
    chain = md("chain", provider="bedrock", region="us-east-1")
    result = build_config([signed, chain, md("mocked", provider="mock")], secrets={})
    verdict = result.verdicts[Ref("ModelDeployment", "team", "chain")]
    assert (verdict.ok, verdict.reason) == (False, "ProviderExtraMissing")
    assert "pip install 'kubellm[bedrock]'" in verdict.message
    # A credential from the router's environment may be a Bedrock API key: only the router can tell.
    assert result.verdicts[Ref("ModelDeployment", "team", "signed")].ok
    assert {d.name for d in result.config.deployments} == {"team/signed", "team/mocked"}
