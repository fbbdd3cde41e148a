"""``multipart/form-data`` requests (``/v1/images/edits``) as the JSON objects the core works on.

The core validates, routes, caches and logs JSON bodies. A multipart upload becomes one: each text
field a string (a repeated field, a list of them), each file ``{"filename", "content_type",
"b64"}`` (base64, so the body stays JSON everywhere it travels: cache keys, payload logs, the
upstream request), under the field's own name (``image`` or the SDK's ``image[]``). Providers that
forward the upload rebuild the form with :func:`encode_form`.
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .._errors import InvalidRequestError, PayloadTooLargeError
from ..server._inbound import Inbound

__all__ = ["FormInbound", "encode_form", "form_files", "is_file", "parse_form"]

#: Fields and files one upload may carry.
MAX_PARTS = 64


def is_file(value: Any) -> bool:
    """Whether a body value is an uploaded file (see the module docstring)."""
    return isinstance(value, dict) and isinstance(value.get("b64"), str) and "filename" in value


def form_files(value: Any) -> list[dict[str, Any]]:
    """The files of a body value: one, several (a repeated field), or none."""
    items = value if isinstance(value, list) else [value]
    return [item for item in items if is_file(item)]


async def parse_form(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart body as a JSON-able dict; :class:`InvalidRequestError` when it is malformed."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield raw

    parser = MultiPartParser(
        Headers({"content-type": content_type}), stream(), max_files=MAX_PARTS, max_fields=MAX_PARTS
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        message = f"the multipart body is malformed: {exc.message}"
        raise InvalidRequestError(message, code="invalid_multipart") from None
    doc: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            item: Any = value
            if isinstance(value, UploadFile):
                data = await value.read()
                item = {
                    "filename": value.filename or "upload",
                    "content_type": value.content_type or "application/octet-stream",
                    "b64": base64.b64encode(data).decode("ascii"),
                }
            if name in doc:
                previous = doc[name]
                doc[name] = [*previous, item] if isinstance(previous, list) else [previous, item]
            else:
                doc[name] = [item] if name.endswith("[]") else item
    finally:
        await form.close()
    return doc


def encode_form(body: dict[str, Any]) -> tuple[bytes, str]:
    """``body`` (as :func:`parse_form` made it) as a multipart body, and its content type."""
    boundary = "kubellm-" + os.urandom(12).hex()
    parts: list[bytes] = []
    for name, value in body.items():
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            quoted = name.replace('"', "%22")
            if is_file(item):
                filename = str(item["filename"]).replace('"', "%22").replace("\r", "").replace("\n", "")
                head = (
                    f'Content-Disposition: form-data; name="{quoted}"; filename="{filename}"\r\n'
                    f"Content-Type: {item.get('content_type') or 'application/octet-stream'}\r\n\r\n"
                )
                data = base64.b64decode(item["b64"])
            else:
                head = f'Content-Disposition: form-data; name="{quoted}"\r\n\r\n'
                text = item if isinstance(item, str) else orjson.dumps(item).decode()
                data = text.encode()
            parts.append(f"--{boundary}\r\n".encode() + head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class FormInbound(Inbound):
    """A request whose multipart body reads as the JSON the core expects (JSON bodies pass as sent)."""

    def __init__(self, outer: Inbound) -> None:
        self.outer = outer
        self.headers = outer.headers

    @property
    def gone(self) -> bool:
        return self.outer.gone

    async def read(self, limit: int) -> bytes:
        raw = await self.outer.read(limit)
        content_type = self.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return raw
        if len(raw) > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        return orjson.dumps(await parse_form(content_type, raw))

    def cancel_on_disconnect(self, task: Any) -> Callable[[], None]:
        return self.outer.cancel_on_disconnect(task)
