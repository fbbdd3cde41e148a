"""The built-in guardrails, compiled once per config: regex deny, regex redact, blocked terms and a
maximum prompt size. They are pure functions of text, so they run inline on the request path."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .._errors import KubellmError
from ..config._schema import GuardrailConfig
from ..metering._tokens import count_tokens

__all__ = [
    "Check",
    "GuardrailDeniedError",
    "GuardrailPromptTooLargeError",
    "GuardrailUnavailableError",
    "MaxPromptSize",
    "Redact",
    "compile_builtin",
    "denied",
    "stages_of",
]


class GuardrailDeniedError(KubellmError):
    """A guardrail refused the prompt or the answer: a policy decision, so 403."""

    status = 403
    type = "permission_error"
    default_code = "guardrail_denied"


class GuardrailPromptTooLargeError(KubellmError):
    status = 400
    type = "invalid_request_error"
    default_code = "guardrail_prompt_too_large"


class GuardrailUnavailableError(KubellmError):
    """A fail-closed webhook could not be asked: the request is refused, but not on its merits."""

    status = 503
    type = "service_unavailable"
    default_code = "guardrail_unavailable"


_WHAT = {"pre": "prompt", "post": "answer"}


def denied(name: str, stage: str, reason: str) -> GuardrailDeniedError:
    """The client's error: names the guardrail (in the message and ``param``), never the matched text."""
    return GuardrailDeniedError(f"the {_WHAT[stage]} was refused by guardrail {name!r}: {reason}", param=name)


@dataclass(frozen=True, slots=True)
class Check:
    """A deny rule: ``regex-deny`` (any of its patterns) or ``blocked-terms`` (any term as a whole word)."""

    name: str
    stages: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]
    reason: str
    #: Characters a stream holds back, so that text is checked before the client sees it.
    window: int = 64

    def violation(self, text: str) -> bool:
        return any(p.search(text) is not None for p in self.patterns)


@dataclass(frozen=True, slots=True)
class Redact:
    name: str
    stages: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]
    replacement: str
    #: Characters a stream holds back so that a match split across chunks is still found whole.
    window: int

    def apply(self, text: str) -> str:
        for pattern in self.patterns:
            text = pattern.sub(self.replacement, text)
        return text


@dataclass(frozen=True, slots=True)
class MaxPromptSize:
    name: str
    max_chars: int | None
    max_tokens: int | None
    stages: frozenset[str] = field(default=frozenset({"pre"}))

    def check(self, texts: list[str]) -> KubellmError | None:
        param = self.name
        chars = sum(len(t) for t in texts)
        if self.max_chars is not None and chars > self.max_chars:
            return GuardrailPromptTooLargeError(
                f"the prompt has {chars} characters; guardrail {self.name!r} allows {self.max_chars}",
                param=param,
            )
        if self.max_tokens is not None:
            tokens = sum(count_tokens(t) for t in texts)
            if tokens > self.max_tokens:
                return GuardrailPromptTooLargeError(
                    f"the prompt has about {tokens} tokens; guardrail {self.name!r} allows {self.max_tokens}",
                    param=param,
                )
        return None


def stages_of(config: GuardrailConfig) -> frozenset[str]:
    if config.stages is not None:
        return frozenset(config.stages)
    return frozenset({"pre"}) if config.type == "max-prompt-size" else frozenset({"pre", "post"})


def blocked_terms_pattern(terms: list[str]) -> re.Pattern[str]:
    """One pattern for all terms: each escaped, whole words only (no word character on either side),
    so a term that starts or ends with punctuation still matches where ``\\b`` would not."""
    alternatives = "|".join(re.escape(t.strip()) for t in sorted(terms, key=len, reverse=True) if t.strip())
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def compile_builtin(config: GuardrailConfig) -> Check | Redact | MaxPromptSize:
    stages = stages_of(config)
    flags = re.IGNORECASE if config.ignore_case else 0
    if config.type == "regex-deny":
        patterns = tuple(re.compile(p, flags) for p in config.patterns)
        return Check(config.name, stages, patterns, "it matches a denied pattern", config.stream_window_chars)
    if config.type == "blocked-terms":
        terms = (blocked_terms_pattern(config.terms),)
        return Check(config.name, stages, terms, "it contains a blocked term", config.stream_window_chars)
    if config.type == "regex-redact":
        patterns = tuple(re.compile(p, flags) for p in config.patterns)
        return Redact(config.name, stages, patterns, config.replacement, config.stream_window_chars)
    assert config.type == "max-prompt-size"
    return MaxPromptSize(config.name, config.max_chars, config.max_tokens)
