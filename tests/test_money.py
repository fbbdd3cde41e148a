"""Money is printed as a plain decimal string everywhere: never ``0E-12`` or ``1E-12``.

Through a real router process (``/admin/spend``, ``/v1/key/info``), and the shared formatter
under hypothesis.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import orjson
import requests
from hypothesis import given
from hypothesis import strategies as st

from kubellm.router.metering._pricing import PICO, format_usd, from_pico
from tests.conftest import MASTER_KEY
from tests.support.servers import RouterProcess

KEY = "sk-money-0123456789abcdef"
BUDGET = {"amountUsd": "2.50", "period": "daily"}
PLAIN = re.compile(r"-?(0|[1-9]\d*)(\.\d*[1-9])?")


def amounts(doc: Any) -> list[str]:
    """Every value of a field named like money (``...Usd``) in a JSON document."""
    if isinstance(doc, dict):
        found = [v for k, v in doc.items() if k.endswith("Usd")]
        return found + [a for v in doc.values() for a in amounts(v)]
    if isinstance(doc, list):
        return [a for v in doc for a in amounts(v)]
    return []


def get(router: RouterProcess, path: str, key: str) -> dict[str, Any]:
    resp = requests.get(router.base_url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return dict(orjson.loads(resp.content))


def test_spend_is_printed_without_an_exponent() -> None:
    """A fresh /admin/spend said "0E-12"; one pico-USD would have said "1E-12"."""
    config = {
        "deployments": [
            # One prompt token costs exactly one pico-USD, the smallest amount the ledger keeps.
            {
                "name": "tiny",
                "model": "tiny-embedding",
                "provider": "mock",
                "pricing": {"inputPerMillion": "0.000001", "outputPerMillion": "0"},
            }
        ],
        "keys": [{"name": "wallet", "keyEnv": "MONEY_KEY", "budget": BUDGET}],
    }
    with RouterProcess(config, env={"MONEY_KEY": KEY, "KUBELLM_MASTER_KEY": MASTER_KEY}) as router:
        fresh = get(router, "/admin/spend", MASTER_KEY)
        assert fresh["total"]["spendUsd"] == "0"
        info = get(router, "/v1/key/info", KEY)
        assert info["budget"]["spentUsd"] == "0" and info["usage"]["spendUsd"] == "0"
        assert info["budget"]["amountUsd"] == "2.5" and info["budget"]["remainingUsd"] == "2.5"

        resp = requests.post(
            router.v1 + "/embeddings",
            json={"model": "tiny-embedding", "input": "a"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=10,
        )
        assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == 1

        spent = get(router, "/admin/spend", MASTER_KEY)
        assert spent["total"]["spendUsd"] == "0.000000000001"
        assert spent["groups"]["wallet"]["spendUsd"] == "0.000000000001"
        info = get(router, "/v1/key/info", KEY)
        assert info["usage"]["spendUsd"] == "0.000000000001"
        assert info["budget"]["spentUsd"] == "0.000000000001"
        assert info["budget"]["remainingUsd"] == "2.499999999999"
        for doc in (fresh, spent, info):
            for amount in amounts(doc):
                assert isinstance(amount, str) and PLAIN.fullmatch(amount), doc


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_the_formatter_is_plain_exact_and_canonical(amount: Decimal) -> None:
    text = format_usd(amount)
    assert PLAIN.fullmatch(text), text  # no exponent, no trailing zeros, no "+"
    assert text != "-0"
    assert Decimal(text) == amount  # exact: nothing rounded away


@given(st.integers(-(10**24), 10**24))
def test_ledger_amounts_print_as_their_pico_value(pico: int) -> None:
    """Every amount the stores keep (whole pico-USD, 12 places) prints as its digits, exactly."""
    whole, fraction = divmod(abs(pico), 10**12)
    digits = f"{fraction:012d}".rstrip("0")
    expected = ("-" if pico < 0 else "") + str(whole) + (f".{digits}" if digits else "") if pico else "0"
    assert format_usd(from_pico(pico)) == expected
    assert Decimal(format_usd(from_pico(pico))) == pico * PICO
