"""JSON logs, written by a background thread so the event loop never blocks on I/O.

Ordinary log records go through :mod:`logging` (a queue handler and listener).
The access log, one line per request, skips ``logging`` altogether: the request
path puts a plain dict on a queue and the writer thread serialises and writes
lines in batches, which costs a few microseconds per request instead of a
``LogRecord`` and a formatter call.
"""

from __future__ import annotations

import atexit
import copy
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from typing import IO, Any

import orjson

from .. import _redact as redact

ENV_LOG_LEVEL = "KUBELLM_LOG_LEVEL"
#: How often the access-log thread writes what has queued up (seconds).
WRITE_INTERVAL = 0.05


_SECOND: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    global _SECOND
    second, prefix = _SECOND  # one tuple, swapped whole: safe between the writer threads
    if int(created) != second:
        second = int(created)
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _SECOND = (second, prefix)
    return f"{prefix}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        error = getattr(record, "error_type", None)
        if error:
            doc["error"] = error
        return orjson.dumps(doc).decode()


class _TypeOnlyQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread with the exception's type, never its traceback.

    The stock ``prepare`` folds the formatted traceback into the message; tracebacks may quote
    local values and stay out of logs that are shipped off the machine.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        # Log lines are few (requests go to the access log): scanning each for credentials is cheap.
        record.msg = redact.scrub_text(record.getMessage())
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and redact.active():
            record.fields = redact.scrub_value(fields)
        if record.exc_info:
            record.error_type = record.exc_info[0].__name__ if record.exc_info[0] else None
        record.exc_info = None
        record.exc_text = None
        return record


class AccessLog:
    """One JSON line per finished request, serialised and written off the event loop."""

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._stream = stream
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.enabled = True

    def emit(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._thread is None:
            self._start()
        fields["ts"] = time.time()
        self._queue.put(fields)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kubellm-access-log", daemon=True)
                self._thread.start()
                atexit.register(self.close)

    def _run(self) -> None:
        stream = self._stream or sys.stderr.buffer
        while True:
            # Wake on a timer rather than on every record: a thread woken per request makes the
            # event loop hand it the GIL per request.
            time.sleep(WRITE_INTERVAL)
            batch: list[dict[str, Any] | None] = []
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                continue
            lines: list[bytes] = []
            for fields in batch:
                if fields is None:
                    stream.write(b"".join(lines))
                    stream.flush()
                    return
                head = {
                    "ts": _timestamp(fields.pop("ts")),
                    "level": "info",
                    "logger": "kubellm.access",
                    "msg": "request",
                }
                if "request" in fields and redact.active():
                    # Payloads (logged by opt-in) are the only free text in an access-log line.
                    fields["request"] = redact.scrub_value(fields["request"])
                    fields["response"] = redact.scrub_value(fields.get("response"))
                lines.append(orjson.dumps({**head, **fields}) + b"\n")
            stream.write(b"".join(lines))
            stream.flush()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(2)


access_log = AccessLog()


def configure(level: str | None = None) -> None:
    """Route ``kubellm.*`` loggers to JSON on stderr. Idempotent; worker processes call it too."""
    level = level or os.environ.get(ENV_LOG_LEVEL, "info")
    os.environ[ENV_LOG_LEVEL] = level
    root = logging.getLogger("kubellm")
    root.setLevel(level.upper())
    root.propagate = False
    access_log.enabled = level in ("debug", "info")
    if any(isinstance(h, _TypeOnlyQueueHandler) for h in root.handlers):
        return
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    sink = logging.StreamHandler(sys.stderr)
    sink.setFormatter(JsonFormatter())
    listener = logging.handlers.QueueListener(records, sink, respect_handler_level=False)
    listener.start()
    atexit.register(listener.stop)
    root.handlers[:] = [_TypeOnlyQueueHandler(records)]
