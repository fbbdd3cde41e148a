"""Guardrails: pre-call hooks on prompts and post-call hooks on answers (streamed ones too), built
in (regex deny and redact, blocked terms, a maximum prompt size) or an external HTTP webhook.
See docs/guardrails.md."""

from ._builtin import GuardrailDeniedError, GuardrailPromptTooLargeError, GuardrailUnavailableError
from ._service import Context, Guard, Guardrails, chain, compile_guardrails

__all__ = [
    "Context",
    "Guard",
    "GuardrailDeniedError",
    "GuardrailPromptTooLargeError",
    "GuardrailUnavailableError",
    "Guardrails",
    "chain",
    "compile_guardrails",
]
