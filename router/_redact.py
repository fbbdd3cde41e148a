"""Keeping upstream credentials out of everything the router says.

Upstreams quote the credential they were sent, whole or in part ("Incorrect API key
provided: sk-abc...wxyz", "key ending in 0123456789ab"), in any field of an error. So
every error from an upstream, streamed or not, and every router log line, passes
through :func:`scrub_text` (or :func:`scrub_error`, :func:`scrub_value`) first.

The rule: a credential is any secret a deployment sends upstream (see
``Provider.credentials``) of at least :data:`PIECE` characters. Redacted is every run
of at least :data:`PIECE` consecutive characters of a credential, wherever it appears;
overlapping and adjacent runs become one :data:`REDACTED`. So the whole key goes,
as does a quoted 12-character suffix, and both halves of ``sk-abcdefgh...stuvwxyz``.
Shorter pieces stay: a 4-character tail or the ``sk-`` prefix identifies no key, and
matching them would garble ordinary words. Values shorter than :data:`PIECE` are no
secret worth the name (``none``, ``EMPTY``) and are not treated as credentials.

The credentials are kept process-wide, as the set of their :data:`PIECE`-grams: the
config loader registers each deployment's, and providers register the tokens they
fetch later. A scan costs one set lookup per character of the scanned text, whatever
the number of credentials, which is why only error text and log lines are scanned.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from ._errors import KubellmError

#: The shortest run of a credential's characters that is redacted, and the shortest credential.
PIECE = 8
REDACTED = "[redacted]"

_lock = threading.Lock()
#: Every PIECE-gram of every registered credential; replaced whole, so readers need no lock.
_grams: frozenset[str] = frozenset()


def grams(secrets: Iterable[str | None]) -> frozenset[str]:
    """The :data:`PIECE`-character substrings of the secrets long enough to count."""
    return frozenset(
        s[i : i + PIECE] for s in secrets if s and len(s) >= PIECE for i in range(len(s) - PIECE + 1)
    )


def remember(secrets: Iterable[str | None]) -> None:
    """Register credentials; they stay registered (a rotated-out key is still a secret)."""
    global _grams
    new = grams(secrets) - _grams
    if new:
        with _lock:
            _grams = _grams | new


def active() -> bool:
    return bool(_grams)


def scrub_text(text: str, known: frozenset[str] | None = None) -> str:
    """``text`` with every run of :data:`PIECE`+ characters of a credential replaced."""
    table = _grams if known is None else known
    if not table or len(text) < PIECE:
        return text
    spans: list[tuple[int, int]] = []
    start = end = -1
    for i in range(len(text) - PIECE + 1):
        if text[i : i + PIECE] in table:
            if i > end:
                if end >= 0:
                    spans.append((start, end))
                start = i
            end = i + PIECE
    if end < 0:
        return text
    spans.append((start, end))
    parts: list[str] = []
    done = 0
    for a, b in spans:
        parts += [text[done:a], REDACTED]
        done = b
    parts.append(text[done:])
    return "".join(parts)


def scrub_value(value: Any, known: frozenset[str] | None = None) -> Any:
    """A JSON-like value with every string in it (keys included) scrubbed."""
    if isinstance(value, str):
        return scrub_text(value, known)
    if isinstance(value, dict):
        return {scrub_text(str(k), known): scrub_value(v, known) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(v, known) for v in value]
    return value


def scrub_payload(data: bytes, known: frozenset[str] | None = None) -> bytes:
    """A JSON payload (a stream event) with every string in it scrubbed; other bytes as text."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        text = data.decode("utf-8", "replace")
        clean = scrub_text(text, known)
        return data if clean == text else clean.encode()
    clean_doc = scrub_value(doc, known)
    return data if clean_doc == doc else orjson.dumps(clean_doc)


def scrub_error(err: KubellmError, known: frozenset[str] | None = None) -> KubellmError:
    """Scrub, in place, every field of an error a client or a log may see; returns it.

    ``type`` is left: it is always the router's own (the error's class), never upstream text.
    """
    err.message = scrub_text(err.message, known)
    err.args = (err.message,)
    if err.code is not None:
        err.code = scrub_text(err.code, known)
    if err.param is not None:
        err.param = scrub_text(err.param, known)
    err.headers = {k: scrub_text(v, known) for k, v in err.headers.items()}
    return err
