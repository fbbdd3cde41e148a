"""JSON logs written by a background thread, so the event loop never blocks on I/O."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info and record.levelno >= logging.ERROR:
            # The type only: tracebacks stay out of logs that may be shipped off the machine.
            doc["error"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return orjson.dumps(doc).decode()


def configure(level: str = "info") -> None:
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    sink = logging.StreamHandler(sys.stderr)
    sink.setFormatter(JsonFormatter())
    listener = logging.handlers.QueueListener(records, sink, respect_handler_level=False)
    listener.start()
    atexit.register(listener.stop)
    root = logging.getLogger("kubellm")
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level.upper())
    root.propagate = False
