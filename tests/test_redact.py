"""The credential scrubber (router/_redact.py): whole keys and every 8+ character piece of them go."""

from __future__ import annotations

import string

import orjson
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kubellm.router import _redact as redact
from kubellm.router._errors import RateLimitError, UpstreamStatusError
from kubellm.router._redact import PIECE, REDACTED, grams, scrub_error, scrub_payload, scrub_text, scrub_value

KEY = "sk-proj-Zq81vXk2LmN0pQr7StUv9WxYz3Ab"
KNOWN = grams([KEY])

#: What real keys are made of.
KEY_CHARS = string.ascii_letters + string.digits + "-_"
KEYS = st.text(KEY_CHARS, min_size=PIECE, max_size=80)


def _pieces(key: str) -> set[str]:
    return {key[i : i + PIECE] for i in range(len(key) - PIECE + 1)}


def _leaks(key: str, text: str) -> list[str]:
    return [p for p in _pieces(key) if p in text]


def test_whole_key_suffix_and_prefix_plus_suffix() -> None:
    assert (
        scrub_text(f"Incorrect API key provided: {KEY}.", KNOWN) == f"Incorrect API key provided: {REDACTED}."
    )
    # The quoted last 12 characters, as OpenAI's own 401 message does.
    assert scrub_text(f"key ending in ...{KEY[-12:]}", KNOWN) == f"key ending in ...{REDACTED}"
    # A prefix and a suffix, each long enough to count.
    assert scrub_text(f"{KEY[:8]}...{KEY[-8:]} is invalid", KNOWN) == f"{REDACTED}...{REDACTED} is invalid"
    # Shorter pieces identify no key and stay (the rule is documented in _redact).
    assert scrub_text(f"{KEY[:6]}...{KEY[-4:]}", KNOWN) == f"{KEY[:6]}...{KEY[-4:]}"
    # Two pieces back to back become one marker; text without a piece is returned unchanged.
    assert scrub_text(KEY + KEY, KNOWN) == REDACTED
    assert scrub_text("nothing to see", KNOWN) == "nothing to see"


def test_short_values_are_not_credentials() -> None:
    assert grams(["none", "EMPTY", "", None]) == frozenset()
    assert scrub_text("none of this is EMPTY", grams(["none", "EMPTY"])) == "none of this is EMPTY"


def test_every_field_of_an_error_and_its_headers() -> None:
    err = UpstreamStatusError(f"bad {KEY}", status=400, code=KEY[-12:], param=f"x{KEY}")
    scrub_error(err, KNOWN)
    doc = orjson.dumps(err.to_dict()).decode()
    assert not _leaks(KEY, doc) and str(err) == err.message
    limited = RateLimitError("slow", headers={"Retry-After": KEY})
    assert scrub_error(limited, KNOWN).headers == {"Retry-After": REDACTED}


def test_json_values_and_payloads() -> None:
    value = {"error": {"message": KEY, "details": [{"k": KEY[3:20]}], KEY: 1}, "n": 3}
    clean = scrub_value(value, KNOWN)
    assert not _leaks(KEY, orjson.dumps(clean).decode()) and clean["n"] == 3
    payload = orjson.dumps(value)
    assert not _leaks(KEY, scrub_payload(payload, KNOWN).decode())
    ordinary = b'{"choices":[{"delta":{"content":"hi"}}]}'
    assert scrub_payload(ordinary, KNOWN) is ordinary  # untouched bytes are returned as they were
    assert not _leaks(KEY, scrub_payload(b"not json " + KEY.encode(), KNOWN).decode())


@settings(max_examples=300, deadline=None)
@given(
    key=KEYS,
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    cuts=st.lists(st.tuples(st.integers(0, 80), st.integers(PIECE, 80)), min_size=1, max_size=4),
)
def test_no_piece_of_a_random_key_survives_in_random_text(
    key: str, before: str, after: str, cuts: list[tuple[int, int]]
) -> None:
    # The marker is the only text the scrubber writes: a key spelling "redacted" would match it.
    assume("redacted" not in key)
    quoted = [key[a : a + n] for a, n in cuts if len(key[a : a + n]) >= PIECE] or [key]
    text = before + " ".join([key, *quoted]) + after
    assert not _leaks(key, scrub_text(text, grams([key])))


@settings(max_examples=100, deadline=None)
@given(key=KEYS, other=KEYS, filler=st.text(max_size=60))
def test_several_credentials_and_nothing_else_changes(key: str, other: str, filler: str) -> None:
    assume("redacted" not in key + other)
    known = grams([key, other])
    text = f"{filler}{other[-PIECE:]}|{key}"
    out = scrub_text(text, known)
    assert not _leaks(key, out) and not _leaks(other, out)
    if not any(g in filler for g in known):
        assert scrub_text(filler, known) == filler  # text with no piece in it is left alone


def test_the_process_wide_registry() -> None:
    secret = "reg-" + "Q7w" * 6
    redact.remember([secret, None, "short"])
    assert redact.active() and scrub_text(f"x {secret} y") == f"x {REDACTED} y"


def test_what_each_provider_counts_as_its_credentials() -> None:
    from kubellm.router.config._schema import DeploymentConfig
    from kubellm.router.providers import get_provider

    def dep(provider: str, **extra: object) -> DeploymentConfig:
        return DeploymentConfig.model_validate({"model": "m", "provider": provider, **extra})

    plain = dep(
        "openai-compatible", headers={"X-Api-Key": "hdr-Secret-0123", "Content-Type": "application/json"}
    )
    assert get_provider("openai-compatible").credentials(plain, KEY) == [KEY, "hdr-Secret-0123"]
    aws = orjson.dumps(
        {
            "accessKeyId": "AKIAEXAMPLE12345",
            "secretAccessKey": "wJalrXUtnFEMI/K7MDENG",
            "sessionToken": "FQoG-tok",
        }
    ).decode()
    assert get_provider("bedrock").credentials(dep("bedrock"), aws) == [
        "AKIAEXAMPLE12345", "wJalrXUtnFEMI/K7MDENG", "FQoG-tok"
    ]  # fmt: skip
    account = orjson.dumps(
        {"type": "service_account", "client_email": "a@p.iam.gserviceaccount.com", "private_key": "-----PEM",
         "private_key_id": "kid-0123456789", "project_id": "p"}
    ).decode()  # fmt: skip
    assert get_provider("vertex").credentials(dep("vertex"), account) == ["-----PEM", "kid-0123456789"]
