"""Every error a client can see, in one place.

Each exception knows its HTTP status and renders itself as an OpenAI-style
error body ``{"error": {"message", "type", "param", "code"}}``. Routing acts on
the ``code`` (``context_length_exceeded``, ``content_filter``...) and on
:attr:`KubellmError.retryable`.

Hierarchy::

    KubellmError
    ├── InvalidRequestError        400 invalid_request_error
    │   ├── ContextLengthExceededError  400 code=context_length_exceeded
    │   └── ContentFilterError          400 code=content_filter
    ├── AuthenticationError        401 authentication_error
    ├── PermissionDeniedError      403 permission_error
    ├── ModelNotFoundError         404 invalid_request_error code=model_not_found
    ├── NotFoundError              404 not_found_error
    ├── PayloadTooLargeError       413 invalid_request_error
    ├── RateLimitError             429 rate_limit_error (keeps Retry-After)
    └── UpstreamError              502 upstream_error (and subclasses)
        ├── UpstreamStatusError    upstream's own status, message kept
        ├── UpstreamConnectError   502 code=upstream_connect_error
        ├── UpstreamTimeoutError   504 timeout_error
        └── UpstreamProtocolError  502 code=upstream_bad_response, or what broke on an open connection:
            │                      upstream_connection_closed (it ended before the answer did),
            │                      upstream_protocol_error (invalid HTTP), upstream_head_too_large,
            │                      upstream_bad_encoding (a Content-Encoding refused or undecodable)
            └── UpstreamStreamTruncatedError  502 code=upstream_stream_truncated
"""

from __future__ import annotations

from typing import Any

import orjson


class KubellmError(Exception):
    status: int = 500
    type: str = "api_error"
    default_code: str | None = None
    #: Whether the router may retry the request on another deployment.
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


class InvalidRequestError(KubellmError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class ContentFilterError(InvalidRequestError):
    default_code = "content_filter"


class AuthenticationError(KubellmError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(KubellmError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class ModelNotFoundError(KubellmError):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class NotFoundError(KubellmError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class PayloadTooLargeError(KubellmError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimitError(KubellmError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    retryable = True


class ServiceUnavailableError(KubellmError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"
    retryable = True


class UpstreamError(KubellmError):
    status = 502
    type = "upstream_error"
    retryable = True


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status that maps to no finer class."""

    def __init__(self, message: str, *, status: int, **kwargs: Any) -> None:
        super().__init__(message, status=status, **kwargs)
        self.retryable = status >= 500 or status in (408, 409, 429)
        if status < 500:
            self.type = "invalid_request_error"


class UpstreamConnectError(UpstreamError):
    default_code = "upstream_connect_error"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    type = "timeout_error"
    default_code = "timeout"


class UpstreamProtocolError(UpstreamError):
    default_code = "upstream_bad_response"


class UpstreamStreamTruncatedError(UpstreamProtocolError):
    """The upstream's stream stopped before the end event its protocol defines."""

    default_code = "upstream_stream_truncated"


def error_body(
    status: int, message: str, *, type: str, param: str | None = None, code: str | None = None
) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


#: The body of a 500: an unexpected error inside the router, logged with its traceback.
INTERNAL_ERROR_BODY = error_body(
    500, "internal router error; see the router log", type="api_error", code="internal_error"
)
