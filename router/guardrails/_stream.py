"""Post-call guardrails on streamed answers, in every stream dialect the core produces.

Each answer text (a chat choice, a completion choice, an Anthropic content block, a Responses
output part) is a *slot*. As deltas arrive, a slot's text is accumulated: deny rules run over the
new text (with :data:`LOOKBACK` characters before it, so a match split across chunks is found),
and the last ``streamWindowChars`` characters are held back so that a redaction pattern split
across chunks is still matched whole. Held-back text is sent with the slot's end (a chat
``finish_reason`` chunk; a delta inserted before Anthropic's ``content_block_stop`` or the
Responses ``output_text.done``), and events that repeat a whole text (the Responses ``done``
events and ``response.completed``) carry the text exactly as it was streamed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from .._errors import KubellmError
from .._sse import Event
from ..core._outcome import Batch, StreamError, StreamEvent
from ..observability import _metrics as metrics
from ..providers import Operation
from ._builtin import Check, Redact, denied

__all__ = ["LOOKBACK", "Held", "Refused", "StreamGuard", "buffered", "guarded"]

#: Characters before the newest delta that deny rules search again, for matches across chunks.
LOOKBACK = 4096

Slot = int | tuple[int, int]
Decided = Callable[[str, str, str], None]


class Refused(Exception):
    def __init__(self, error: KubellmError) -> None:
        self.error = error


class _Texts:
    """What a slot's deltas become: ``delta`` -> text to send now, ``end`` -> text held back,
    ``final`` -> the slot's whole text as sent (``original``: what the upstream's event said)."""

    def delta(self, slot: Slot, text: str) -> str:
        raise NotImplementedError

    def end(self, slot: Slot) -> str:
        return ""

    def final(self, slot: Slot, original: str) -> str:
        raise NotImplementedError


class StreamGuard(_Texts):
    """The built-in deny and redact rules over a stream, with a hold-back window."""

    def __init__(self, checks: list[Check], redacts: list[Redact], decided: Decided) -> None:
        self.checks, self.redacts, self._decided = checks, redacts, decided
        self.window = max([r.window for r in redacts] + [c.window for c in checks], default=0)
        self._raw: dict[Slot, str] = {}
        self._pending: dict[Slot, str] = {}
        self._sent: dict[Slot, list[str]] = {}
        self._redacted: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.checks or self.redacts)

    def _check(self, text: str) -> None:
        for check in self.checks:
            if check.violation(text):
                self._decided(check.name, "post", "deny")
                raise Refused(denied(check.name, "post", check.reason))

    def _redact(self, text: str) -> str:
        for red in self.redacts:
            for pattern in red.patterns:
                text, n = pattern.subn(red.replacement, text)
                if n:
                    self._redacted.add(red.name)
        return text

    def _cut(self, pending: str) -> int:
        """Where the text that can be sent now ends: ``window`` before the end, never inside a match."""
        cut = len(pending) - self.window
        moved = True
        while moved and cut > 0:
            moved = False
            for red in self.redacts:
                for pattern in red.patterns:
                    for m in pattern.finditer(pending):
                        if m.start() < cut < m.end():
                            cut, moved = m.start(), True
        return max(cut, 0)

    def delta(self, slot: Slot, text: str) -> str:
        raw = self._raw.get(slot, "")
        self._raw[slot] = raw + text
        self._check(self._raw[slot][max(0, len(raw) - LOOKBACK) :])
        pending = self._pending.get(slot, "") + text
        cut = self._cut(pending)
        self._pending[slot] = pending[cut:]
        sent = self._redact(pending[:cut]) if cut else ""
        self._sent.setdefault(slot, []).append(sent)
        return sent

    def end(self, slot: Slot) -> str:
        pending = self._pending.pop(slot, "")
        sent = self._redact(pending) if pending else ""
        if sent:
            self._sent.setdefault(slot, []).append(sent)
        return sent

    def final(self, slot: Slot, original: str) -> str:
        if slot in self._sent:
            return "".join(self._sent[slot])
        self._check(original)
        return self._redact(original)

    def pending(self) -> list[Slot]:
        return [s for s, text in self._pending.items() if text]

    def finished(self) -> None:
        """The stream ended normally: record each rule's decision."""
        for check in self.checks:
            self._decided(check.name, "post", "allow")
        for red in self.redacts:
            self._decided(red.name, "post", "redact" if red.name in self._redacted else "allow")


class _Replace(_Texts):
    """A webhook's rewritten texts: each slot's first delta carries the whole new text."""

    def __init__(self, texts: dict[Slot, str]) -> None:
        self.texts = texts
        self._given: set[Slot] = set()

    def delta(self, slot: Slot, text: str) -> str:
        if slot in self._given or slot not in self.texts:
            return "" if slot in self.texts else text
        self._given.add(slot)
        return self.texts[slot]

    def final(self, slot: Slot, original: str) -> str:
        return self.texts.get(slot, original)


# -- the dialects -------------------------------------------------------------------------------


def _choices(data: bytes, texts: _Texts, chat: bool) -> list[bytes | Event]:
    """An OpenAI chat or completion chunk: a choice's ``finish_reason`` ends its slot."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return [data]
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list):
        return [data]
    changed = False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        slot = int(choice.get("index") or 0)
        holder = choice.get("delta") if chat else choice
        if not isinstance(holder, dict):
            holder = choice["delta"] = {}
        field = "content" if chat else "text"
        text = holder.get(field)
        out = texts.delta(slot, text) if isinstance(text, str) else None
        if choice.get("finish_reason") is not None:
            tail = texts.end(slot)
            if tail:
                out = (out or "") + tail
        if out is not None and out != text:
            holder[field] = out
            changed = True
    return [orjson.dumps(doc)] if changed else [data]


def _messages(event: Event, texts: _Texts) -> list[bytes | Event]:
    """An Anthropic Messages event: ``content_block_stop`` ends a block's slot."""
    if event.name not in ("content_block_delta", "content_block_stop"):
        return [event]
    doc = orjson.loads(event.data)
    slot = int(doc.get("index") or 0)
    if event.name == "content_block_stop":
        tail = texts.end(slot)
        if not tail:
            return [event]
        extra = {"type": "content_block_delta", "index": slot, "delta": {"type": "text_delta", "text": tail}}
        return [Event("content_block_delta", orjson.dumps(extra)), event]
    delta = doc.get("delta")
    if (
        not isinstance(delta, dict)
        or delta.get("type") != "text_delta"
        or not isinstance(delta.get("text"), str)
    ):
        return [event]
    out = texts.delta(slot, delta["text"])
    if out == delta["text"]:
        return [event]
    delta["text"] = out
    return [Event(event.name, orjson.dumps(doc))]


def _parts(content: Any, index: int, texts: _Texts) -> None:
    """Whole output_text parts of output item ``index``, as streamed."""
    if isinstance(content, list):
        for j, part in enumerate(content):
            if (
                isinstance(part, dict)
                and part.get("type") == "output_text"
                and isinstance(part.get("text"), str)
            ):
                part["text"] = texts.final((index, j), part["text"])


def _responses(event: Event, texts: _Texts) -> list[bytes | Event]:
    """A Responses event: ``response.output_text.done`` ends a part's slot; later events repeat it."""
    name = event.name
    if name not in _RESPONSES_EVENTS:
        return [event]
    doc = orjson.loads(event.data)
    slot = (int(doc.get("output_index") or 0), int(doc.get("content_index") or 0))
    out: list[bytes | Event] = []
    if name == "response.output_text.delta":
        if not isinstance(doc.get("delta"), str):
            return [event]
        doc["delta"] = texts.delta(slot, doc["delta"])
    elif name == "response.output_text.done":
        tail = texts.end(slot)
        if tail:
            extra = {k: v for k, v in doc.items() if k != "text"}
            extra.update(type="response.output_text.delta", delta=tail)
            out.append(Event("response.output_text.delta", orjson.dumps(extra)))
        if isinstance(doc.get("text"), str):
            doc["text"] = texts.final(slot, doc["text"])
    elif name == "response.content_part.done":
        part = doc.get("part")
        if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
            part["text"] = texts.final(slot, part["text"])
    elif name == "response.output_item.done":
        item = doc.get("item")
        if isinstance(item, dict):
            _parts(item.get("content"), slot[0], texts)
    else:  # the whole response, at its end
        response = doc.get("response")
        output = response.get("output") if isinstance(response, dict) else None
        for i, item in enumerate(output if isinstance(output, list) else []):
            if isinstance(item, dict):
                _parts(item.get("content"), i, texts)
    out.append(Event(name, orjson.dumps(doc)))
    return out


_RESPONSES_EVENTS = frozenset(
    {
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
        "response.incomplete",
    }
)


def process(batch: Batch, texts: _Texts, wire: Operation) -> Batch:
    out: Batch = []
    for payload in batch:
        if isinstance(payload, Event):
            if wire is Operation.MESSAGES:
                out.extend(_messages(payload, texts))
            elif wire is Operation.RESPONSES:
                out.extend(_responses(payload, texts))
            else:
                out.append(payload)
        elif wire in (Operation.CHAT, Operation.COMPLETION):
            out.extend(_choices(payload, texts, wire is Operation.CHAT))
        else:
            out.append(payload)
    return out


def _leftover(guard: StreamGuard, wire: Operation, last: bytes | None) -> Batch:
    """Text still held back when a chat or completion stream ended without a ``finish_reason``."""
    if last is None or wire not in (Operation.CHAT, Operation.COMPLETION):
        return []
    template = orjson.loads(last)
    out: Batch = []
    for slot in guard.pending():
        tail = guard.end(slot)
        choice: dict[str, Any] = {"index": slot, "finish_reason": None}
        if wire is Operation.CHAT:
            choice["delta"] = {"content": tail}
        else:
            choice["text"] = tail
        chunk = {k: template[k] for k in ("id", "object", "created", "model") if k in template}
        out.append(orjson.dumps({**chunk, "choices": [choice]}))
    return out


def _last_chunk(batch: Batch, last: bytes | None) -> bytes | None:
    for payload in reversed(batch):
        if isinstance(payload, bytes) and b'"choices"' in payload:
            return payload
    return last


async def _close(events: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


async def guarded(
    events: AsyncIterator[StreamEvent], guard: StreamGuard, wire: Operation, group: str
) -> AsyncIterator[StreamEvent]:
    """``events`` with the built-in rules applied as they flow; a refusal ends them with an error."""
    last: bytes | None = None
    try:
        async for item in events:
            if isinstance(item, StreamError):
                yield item
                return
            last = _last_chunk(item, last)
            try:
                out = process(item, guard, wire)
            except Refused as refused:
                # Stop paying for tokens nobody will see: closing the upstream stream ends it.
                metrics.ERRORS.labels(group, refused.error.type).inc()
                yield StreamError(error=refused.error)
                return
            if out:
                yield out
        tail = _leftover(guard, wire, last)
        if tail:
            yield tail
        guard.finished()
    finally:
        await _close(events)


class Held:
    """A whole stream held back for a webhook: its texts, rewritable, then replayed."""

    def __init__(self, batches: list[Batch], guard: StreamGuard, wire: Operation) -> None:
        self.batches, self.wire = batches, wire
        self._slots: list[Slot] = []
        self._texts: dict[Slot, str] = {}
        collector = _Collect(self._slots, self._texts)
        for batch in batches:
            process(batch, collector, wire)

    def texts(self) -> list[str]:
        return [self._texts[s] for s in self._slots]

    def rewrite(self, texts: list[str]) -> None:
        new = dict(zip(self._slots, texts, strict=True))
        replace = _Replace(new)
        self.batches = [process(b, replace, self.wire) for b in self.batches]
        self._texts = new

    async def replay(self) -> AsyncIterator[StreamEvent]:
        for batch in self.batches:
            yield batch


class _Collect(_Texts):
    def __init__(self, slots: list[Slot], texts: dict[Slot, str]) -> None:
        self.slots, self.texts = slots, texts

    def delta(self, slot: Slot, text: str) -> str:
        if slot not in self.texts:
            self.slots.append(slot)
            self.texts[slot] = ""
        self.texts[slot] += text
        return text

    def final(self, slot: Slot, original: str) -> str:
        return original


async def buffered(events: AsyncIterator[StreamEvent], guard: StreamGuard, wire: Operation) -> Held:
    """The whole stream, with the built-in rules applied; raises :class:`Refused` on a refusal and
    the stream's own error when it failed (nothing has been sent yet, so both are plain errors)."""
    batches: list[Batch] = []
    last: bytes | None = None
    try:
        async for item in events:
            if isinstance(item, StreamError):
                raise item.error
            last = _last_chunk(item, last)
            out = process(item, guard, wire)
            if out:
                batches.append(out)
    finally:
        await _close(events)
    tail = _leftover(guard, wire, last)
    if tail:
        batches.append(tail)
    guard.finished()
    return Held(batches, guard, wire)
