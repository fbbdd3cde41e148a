"""``multipart/form-data`` in and out: the uploads of OpenAI's audio and files APIs.

The router reads a whole upload (bounded by ``settings.maxUploadBytes``) before it sends it on, so
that a retry or a fallback can send it again. Parsing is a few ``bytes.find`` calls over the body;
the parts are RFC 7578's: a ``Content-Disposition: form-data; name=…`` header each, a
``filename`` on file parts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from .._errors import InvalidRequestError, PayloadTooLargeError
from ..server._inbound import Inbound

__all__ = ["Form", "Upload", "UploadBody", "encode_form", "parse_form", "read_form"]

#: More parts than any OpenAI endpoint takes: a form past it is refused, not parsed.
MAX_PARTS = 64
#: A text field's largest size (a prompt, a language code...): files are the big parts.
MAX_FIELD_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Upload:
    """A file part: what the client named it, its type, its bytes."""

    filename: str
    content_type: str
    data: bytes = field(repr=False)

    def describe(self) -> dict[str, Any]:
        """What logs, sinks and cache keys see of the file: never its bytes."""
        return {"filename": self.filename, "content_type": self.content_type, "bytes": len(self.data)}


@dataclass(slots=True)
class Form:
    """A parsed form: text fields in order (a name may repeat) and file parts by field name."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, Upload] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        for key, value in self.fields:
            if key == name:
                return value
        return None


class UploadBody(dict[str, Any]):
    """An upload as the core sees it: the text fields (a repeated name as a list) and, under the
    file's field name, :meth:`Upload.describe`; the file itself rides along in :attr:`uploads`."""

    uploads: dict[str, Upload]

    @classmethod
    def of(cls, form: Form) -> UploadBody:
        body = cls()
        for name, value in form.fields:
            if name in body:
                previous = body[name]
                body[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
            elif name.endswith("[]"):
                body[name] = [value]
            else:
                body[name] = value
        for name, upload in form.files.items():
            body[name] = upload.describe()
        body.uploads = dict(form.files)
        return body


def _malformed(reason: str, param: str | None = "file") -> InvalidRequestError:
    return InvalidRequestError(
        f"the multipart/form-data body is malformed: {reason}", param=param, code="invalid_multipart"
    )


def _boundary(content_type: str | None) -> bytes:
    if content_type is None:
        raise InvalidRequestError(
            "this endpoint takes a multipart/form-data body; the request has no Content-Type",
            param="Content-Type",
            code="invalid_content_type",
        )
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        raise InvalidRequestError(
            f"this endpoint takes a multipart/form-data body, not {message.get_content_type()}",
            param="Content-Type",
            code="invalid_content_type",
        )
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise _malformed("the Content-Type has no boundary", "Content-Type")
    return boundary.encode("latin-1")


def _disposition(head: bytes) -> tuple[str, str | None, str]:
    """The part's field name, its filename (None for a text field) and its content type."""
    message = Message()
    for line in head.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if not sep:
            raise _malformed("a part header has no colon")
        message[key.decode("latin-1").strip()] = value.decode("utf-8", "replace").strip()
    if message.get_content_disposition() != "form-data":
        raise _malformed("a part has no 'Content-Disposition: form-data' header")
    name = message.get_param("name", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise _malformed("a part has no field name")
    filename = message.get_filename()
    content_type = message.get("content-type") or "application/octet-stream"
    return name, filename, content_type


def parse_form(raw: bytes, content_type: str | None) -> Form:
    """The form in ``raw``; :class:`InvalidRequestError` when it is not well-formed."""
    delimiter = b"--" + _boundary(content_type)
    start = raw.find(delimiter)
    if start < 0 or (start and raw[start - 2 : start] != b"\r\n"):
        raise _malformed("the body does not start with the boundary")
    form = Form()
    pos = start + len(delimiter)
    parts = 0
    while True:
        if raw[pos : pos + 2] == b"--":
            return form
        if raw[pos : pos + 2] != b"\r\n":
            raise _malformed("a boundary is not followed by a line break")
        pos += 2
        end = raw.find(b"\r\n" + delimiter, pos)
        if end < 0:
            raise _malformed("the body ends before its closing boundary")
        parts += 1
        if parts > MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} parts", None)
        head_end = raw.find(b"\r\n\r\n", pos, end)
        if head_end < 0:
            raise _malformed("a part has no blank line after its headers")
        name, filename, part_type = _disposition(raw[pos:head_end])
        data = raw[head_end + 4 : end]
        if filename is not None:
            if name in form.files:
                raise _malformed(f"the field {name!r} holds more than one file", name)
            form.files[name] = Upload(filename, part_type, data)
        else:
            if len(data) > MAX_FIELD_BYTES:
                raise PayloadTooLargeError(
                    f"the form field {name!r} is larger than {MAX_FIELD_BYTES} bytes", param=name
                )
            try:
                form.fields.append((name, data.decode("utf-8")))
            except UnicodeDecodeError:
                raise _malformed(f"the field {name!r} is not UTF-8 text", name) from None
        pos = end + 2 + len(delimiter)


async def read_form(inbound: Inbound, limit: int, file_field: str = "file") -> Form:
    """Read and parse an upload of at most ``limit`` bytes; a larger one is a 413 naming the field."""
    try:
        raw = await inbound.read(limit)
    except PayloadTooLargeError as err:
        raise PayloadTooLargeError(
            f"the upload is larger than the limit of {limit} bytes (settings.maxUploadBytes): "
            f"send a smaller '{file_field}'",
            param=file_field,
        ) from err
    return parse_form(raw, inbound.headers.get("content-type"))


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def encode_form(fields: list[tuple[str, str]], files: dict[str, Upload]) -> tuple[str, bytes]:
    """``(content type, body)`` of a form with ``fields`` and then ``files``."""
    boundary = "kubellm-" + os.urandom(12).hex()
    out: list[bytes] = []
    for name, value in fields:
        out.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, upload in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"; '
            f'filename="{_quote(upload.filename)}"\r\nContent-Type: {_quote(upload.content_type)}\r\n\r\n'
        )
        out.append(head.encode() + upload.data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(out)


def form_fields(body: dict[str, Any], skip: frozenset[str]) -> list[tuple[str, str]]:
    """A body's text fields back as form fields (lists repeat their name), leaving out ``skip``."""
    fields: list[tuple[str, str]] = []
    for name, value in body.items():
        if name in skip:
            continue
        values = value if isinstance(value, list) else [value]
        fields.extend((name, v if isinstance(v, str) else str(v)) for v in values)
    return fields
