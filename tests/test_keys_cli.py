"""`kubellm keys`, offline: its contract with the operator, the spec it writes, the list output,
and how API errors become messages and exit codes (the real API server: tests/test_keys_e2e.py)."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from kubellm import keys, keys_cli
from kubellm.cli import build_parser
from kubellm.operator import _build, _crds, _keys
from kubellm.router.kube import KubeError


def test_the_ApiKey_contract_matches_the_operator() -> None:
    # The CLI may not import the operator's private modules, so it keeps copies: they must agree.
    assert keys.API_VERSION == _crds.API_VERSION
    assert keys.KEY_DATA == _build.KEY_DATA
    assert keys.ROTATE_ANNOTATION == _keys.ROTATE_ANNOTATION
    assert keys.ROTATED_FOR_ANNOTATION == _keys.ROTATED_FOR_ANNOTATION
    assert keys.APIKEY_LABEL == _keys.APIKEY_LABEL
    key = keys.generate_key()
    assert len(key) == len(_keys.generate_key()) and len(key) >= _build.MIN_KEY_LENGTH
    assert keys.key_prefix(key) == _build.key_prefix(key)
    body = {"metadata": {"name": "app", "namespace": "a"}, "spec": {}}
    assert keys.secret_name_of(body) == _build.key_secret_name(body) == "app-apikey"
    body["spec"] = {"secretName": "custom"}
    assert keys.secret_name_of(body) == _build.key_secret_name(body) == "custom"


def _create_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["keys", "create", "k", *argv])


def test_create_flags_become_the_ApiKey_spec() -> None:
    args = _create_args(
        "--owner", "o@x", "--team", "t", "--model", "a,b", "--model", "c", "--rpm", "5", "--tpm", "900",
        "--max-parallel", "2", "--budget", "12.50", "--period", "daily", "--cache", "--secret-name", "s",
        "--expires", "2030-01-01T00:00:00Z",
    )  # fmt: skip
    assert keys_cli.spec_from_args(args) == {
        "owner": "o@x",
        "team": "t",
        "models": ["a", "b", "c"],
        "limits": {"rpm": 5, "tpm": 900, "maxParallelRequests": 2},
        "budget": {"amountUsd": "12.50", "period": "daily"},
        "expiresAt": "2030-01-01T00:00:00Z",
        "cache": True,
        "secretName": "s",
    }
    assert keys_cli.spec_from_args(_create_args()) == {}
    with pytest.raises(keys.KeysError) as err:
        keys_cli.spec_from_args(_create_args("--period", "daily"))
    assert err.value.code == keys.EXIT_USAGE


def test_expiry_takes_rfc3339_or_a_duration() -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert keys.parse_expiry("30d", now) == "2027-01-02T12:00:00Z"
    assert keys.parse_expiry("90m", now) == "2026-12-03T13:30:00Z"
    assert keys.parse_expiry("2027-01-01T00:00:00Z", now) == "2027-01-01T00:00:00Z"
    for bad in ("soon", "0d", "30y", ""):
        with pytest.raises(keys.KeysError):
            keys.parse_expiry(bad, now)


def test_list_shows_prefixes_and_state_never_more() -> None:
    item = {
        "metadata": {"name": "app", "namespace": "a", "creationTimestamp": "2026-12-03T10:00:00Z"},
        "spec": {"owner": "o@x", "models": ["m1", "m2"], "secretName": "app-key"},
        "status": {
            "keyPrefix": "sk-AbCdE",
            "state": "Active",
            "spendSummary": "$1.00/$5.00 daily",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    out = keys_cli.table([item], now=datetime(2026, 12, 3, 12, 0, tzinfo=UTC))
    header, row = out.splitlines()
    assert header.split() == [
        "NAME",
        "OWNER",
        "TEAM",
        "MODELS",
        "KEY",
        "STATE",
        "READY",
        "SPEND/BUDGET",
        "EXPIRES",
        "AGE",
    ]
    assert row.split() == [
        "app",
        "o@x",
        "-",
        "m1,m2",
        "sk-AbCdE…",
        "Active",
        "True",
        "$1.00/$5.00",
        "daily",
        "-",
        "2h",
    ]
    summary = keys_cli.summary(item)
    assert summary["secretName"] == "app-key" and summary["ready"] == "True"
    assert keys_cli.summary({"metadata": {"name": "new"}})["ready"] == "Unknown"


@pytest.mark.parametrize(
    ("status", "message", "code", "says"),
    [
        (
            0,
            "GET /x: ClientConnectorError: refused",
            keys.EXIT_ERROR,
            "cannot reach the Kubernetes API server",
        ),
        (401, "GET /x: 401 Unauthorized", keys.EXIT_FORBIDDEN, "rejected the credentials"),
        (
            403,
            'POST /x: 403 apikeys.kubellm.io is forbidden: User "u" cannot create resource "apikeys"',
            keys.EXIT_FORBIDDEN,
            'permission denied: apikeys.kubellm.io is forbidden: User "u"',
        ),
        (404, 'POST /x: 404 namespaces "ns" not found', keys.EXIT_NOT_FOUND, "namespace 'ns' not found"),
        (404, "GET /x: 404 the server could not find the requested resource", keys.EXIT_NOT_FOUND, "crds/"),
        (404, 'GET /x: 404 apikeys.kubellm.io "k" not found', keys.EXIT_NOT_FOUND, "ApiKey 'k' not found"),
        (409, "POST /x: 409 already exists", keys.EXIT_EXISTS, "already exists"),
        (422, "POST /x: 422 spec.budget.amountUsd: Invalid", keys.EXIT_USAGE, "invalid ApiKey 'k'"),
        (500, "GET /x: 500 etcd down", keys.EXIT_ERROR, "etcd down"),
    ],
)
def test_api_errors_become_clear_messages(status: int, message: str, code: int, says: str) -> None:
    err = keys.explain(KubeError(message, status), "ns", "ApiKey 'k'")
    assert err.code == code
    assert says in err.message
    if status:  # the server's own words, not the client's request line
        assert "POST /x" not in err.message and "GET /x" not in err.message


def test_the_documented_team_key_admin_role_is_the_shipped_one() -> None:
    root = Path(__file__).resolve().parents[1]
    shipped = yaml.safe_load((root / "deploy" / "team-key-admin.yaml").read_text())
    text = (root / "docs" / "kubernetes.md").read_text()
    section = text[text.index("### Team key admins") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block
    role, binding = yaml.safe_load_all(block[1])
    assert role["kind"] == shipped["kind"] == "Role"
    assert role["rules"] == shipped["rules"]
    assert binding["roleRef"]["name"] == shipped["metadata"]["name"] == "kubellm-key-admin"
