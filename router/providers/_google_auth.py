"""Google service-account credentials: the OAuth 2.0 JWT-bearer flow (RFC 7523).

A service-account key JSON (``type: service_account``) signs an RS256 JWT
asserting ``iss = client_email``, ``aud = token_uri`` and the cloud-platform
scope; POSTing it to the key's ``token_uri`` returns an access token, cached
until five minutes before it expires. ``token_uri`` comes from the key file
itself (Google's is ``https://oauth2.googleapis.com/token``), so a test or a
private token service is configured by the credential, not by code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import orjson

from .. import _redact as redact
from .._errors import AuthenticationError, InvalidRequestError
from ._base import RequestContext, UpstreamClient, UpstreamRequest

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
#: Refresh this long before the token's stated expiry.
REFRESH_MARGIN = 300.0
#: Assertions are valid for an hour, Google's maximum.
ASSERTION_LIFETIME = 3600


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    client_email: str
    private_key_id: str | None
    token_uri: str
    project_id: str | None
    key: Any  # cryptography's RSAPrivateKey

    @property
    def cache_key(self) -> str:
        return f"{self.client_email}|{self.private_key_id}|{self.token_uri}"

    def assertion(self, now: float | None = None) -> str:
        """A signed RS256 JWT asking for the cloud-platform scope."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        issued = int(now if now is not None else time.time())
        header: dict[str, str] = {"alg": "RS256", "typ": "JWT"}
        if self.private_key_id:
            header["kid"] = self.private_key_id
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        signing_input = f"{_b64url(orjson.dumps(header))}.{_b64url(orjson.dumps(claims))}".encode()
        signature = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{_b64url(signature)}"


_PARSED: dict[str, ServiceAccount] = {}


def service_account_secrets(credential: str) -> list[str]:
    """The secret fields of a service-account key JSON (its e-mail and project are no secret, and
    redacting them would garble Google's messages); the whole text if it is not one."""
    try:
        doc = orjson.loads(credential)
    except orjson.JSONDecodeError:
        return [credential]
    if not isinstance(doc, dict):
        return [credential]
    return [v for k in ("private_key", "private_key_id") if isinstance(v := doc.get(k), str)]


def load_service_account(credential: str, provider: str) -> ServiceAccount:
    """Parse (once per distinct credential) a service-account key JSON."""
    digest = hashlib.sha256(credential.encode()).hexdigest()
    cached = _PARSED.get(digest)
    if cached is not None:
        return cached
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    bad = InvalidRequestError(
        f"{provider}: the deployment's credential is not a service-account key JSON "
        "(expected type, client_email, private_key)",
        code="invalid_credential",
    )
    try:
        doc = orjson.loads(credential)
    except orjson.JSONDecodeError:
        raise bad from None
    if not isinstance(doc, dict) or doc.get("type") != "service_account":
        raise bad
    email, pem = doc.get("client_email"), doc.get("private_key")
    if not isinstance(email, str) or not isinstance(pem, str):
        raise bad
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise bad from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise bad
    account = ServiceAccount(
        email,
        doc.get("private_key_id"),
        doc.get("token_uri") or DEFAULT_TOKEN_URI,
        doc.get("project_id"),
        key,
    )
    _PARSED[digest] = account
    return account


class TokenCache:
    """Access tokens per service account, fetched once and shared by concurrent requests."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def peek(self, account: ServiceAccount) -> str | None:
        entry = self._tokens.get(account.cache_key)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        return None

    async def get(
        self, client: UpstreamClient, account: ServiceAccount, ctx: RequestContext, provider: str
    ) -> str:
        token = self.peek(account)
        if token is not None:
            return token
        lock = self._locks.setdefault(account.cache_key, asyncio.Lock())
        async with lock:
            token = self.peek(account)
            if token is None:
                token = await self._fetch(client, account, ctx, provider)
        return token

    async def _fetch(
        self, client: UpstreamClient, account: ServiceAccount, ctx: RequestContext, provider: str
    ) -> str:
        form = urllib.parse.urlencode({"grant_type": GRANT_TYPE, "assertion": account.assertion()}).encode()
        request = UpstreamRequest(
            "POST", account.token_uri, {"Content-Type": "application/x-www-form-urlencoded"}, form
        )
        resp = await client.send(request, ctx)
        raw = await resp.read()
        doc: Any = None
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(raw)
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if resp.status != 200 or not isinstance(token, str):
            # Only the OAuth error code is repeated: the description may quote the assertion.
            code = doc.get("error") if isinstance(doc, dict) else None
            reason = f" ({code})" if isinstance(code, str) and code.replace("_", "").isalpha() else ""
            err = AuthenticationError(
                f"{provider}: the token endpoint refused the deployment's service account "
                f"with status {resp.status}{reason}",
                code="upstream_authentication_error",
            )
            err.retryable = True
            raise err
        self.put(account, token, float(doc.get("expires_in") or 3600))
        return token

    def put(self, account: ServiceAccount, token: str, lifetime: float) -> None:
        """Remember a token; it is used until :data:`REFRESH_MARGIN` before it expires."""
        redact.remember([token])  # before any request carries it
        self._tokens[account.cache_key] = (token, time.monotonic() + lifetime - REFRESH_MARGIN)
