"""What a bearer JWT says before anyone vouches for it, and who it names once someone has.

Nothing read here is trusted: the unverified header and claims only route a token to the
validator that can check it (by ``iss``) and refuse the obviously bad ones (expired, another
audience) without a network call. Messages never contain the token.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from .._errors import AuthenticationError

#: The number of characters a bearer JWT may have at most (a projected token is ~1 KiB).
MAX_TOKEN_CHARS = 16 * 1024


def looks_like_jwt(token: str) -> bool:
    """Three base64url segments, the first a JSON object (``eyJ`` is ``{"`` encoded)."""
    return token.startswith("eyJ") and token.count(".") == 2 and len(token) <= MAX_TOKEN_CHARS


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller someone vouched for: a ServiceAccount (``sa:NS/NAME``) or an OIDC subject."""

    #: Stable name: the key name in limits, budgets and usage records.
    name: str
    kind: str  # "sa" | "oidc"
    #: ServiceAccount: its namespace and name. OIDC: the issuer's config name and the subject.
    scope: str
    subject: str
    claims: Mapping[str, Any] = field(default_factory=dict)


def service_account(namespace: str, name: str) -> Identity:
    return Identity(f"sa:{namespace}/{name}", "sa", namespace, name)


def oidc_subject(issuer: str, subject: str, claims: Mapping[str, Any]) -> Identity:
    return Identity(f"oidc:{issuer}/{subject}", "oidc", issuer, subject, claims)


@dataclass(frozen=True, slots=True)
class Unverified:
    header: Mapping[str, Any]
    claims: Mapping[str, Any]

    @property
    def issuer(self) -> str:
        value = self.claims.get("iss")
        return value if isinstance(value, str) else ""

    @property
    def audiences(self) -> list[str]:
        aud = self.claims.get("aud")
        if isinstance(aud, str):
            return [aud]
        return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []

    @property
    def expires(self) -> float | None:
        exp = self.claims.get("exp")
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def unverified(token: str) -> Unverified:
    """The header and claims, unchecked; a token that is not a JWT at all is a 401."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise AuthenticationError("malformed bearer token: not a JWT", code="invalid_token") from None
    return Unverified(header, claims)


def precheck(token: Unverified, audiences: Iterable[str], leeway: float = 0.0) -> None:
    """Refuse, without asking anyone, a token that is expired, not yet valid or for another audience."""
    now = time.time()
    exp = token.expires
    if exp is not None and exp + leeway <= now:
        raise AuthenticationError("the bearer token has expired", code="token_expired")
    nbf = token.claims.get("nbf")
    if isinstance(nbf, int | float) and nbf - leeway > now:
        raise AuthenticationError("the bearer token is not valid yet (nbf)", code="invalid_token")
    wanted = set(audiences)
    if not wanted.intersection(token.audiences):
        raise AuthenticationError(
            f"the bearer token is not bound to an accepted audience ({', '.join(sorted(wanted))})",
            code="invalid_audience",
        )
