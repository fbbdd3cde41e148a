"""Generic OIDC/JWT issuers: tokens verified locally against the issuer's JWKS.

The key set is fetched once (through the discovery document or straight from ``jwksUrl``) and
fetched again only when a token names a ``kid`` it does not have, at most once per
``jwksMinRefreshSeconds``, so a flood of forged ``kid``s costs the issuer nothing. Concurrent
requests that need a refresh share one fetch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt

from .._errors import AuthenticationError, ServiceUnavailableError
from ..config._identity import OidcIssuer
from ._token import Identity, Unverified, oidc_subject

log = logging.getLogger("kubellm.identity")

#: GET url -> decoded JSON; raises OSError-like errors when the issuer is unreachable.
Fetch = Callable[[str], Awaitable[Any]]


class JwksUnavailable(Exception):
    """The issuer's discovery document or key set could not be fetched or read."""


class OidcVerifier:
    def __init__(self, config: OidcIssuer, fetch: Fetch) -> None:
        self.config = config
        self._fetch = fetch
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._refreshing: asyncio.Future[None] | None = None
        #: Fetches of the key set so far (the tests count them).
        self.fetches = 0

    async def _load(self) -> None:
        cfg = self.config
        url = cfg.jwks_url
        if url is None:
            assert cfg.discovery_url is not None
            discovery = await self._fetch(cfg.discovery_url)
            url = discovery.get("jwks_uri") if isinstance(discovery, dict) else None
            if not isinstance(url, str):
                raise JwksUnavailable("the discovery document has no jwks_uri")
        doc = await self._fetch(url)
        try:
            keyset = jwt.PyJWKSet.from_dict(doc)
        except jwt.PyJWTError as exc:
            raise JwksUnavailable(f"unusable JWKS: {exc}") from None
        self._keys = {k.key_id: k for k in keyset.keys}
        self.fetches += 1

    def _due(self, forced: bool) -> bool:
        if self._fetched_at is None:
            return True
        # Without any key (the issuer was down) retry each second, else at the configured pace.
        wait = self.config.jwks_min_refresh_seconds if self._keys else 1.0
        return forced and time.monotonic() - self._fetched_at >= wait

    async def _refresh(self, *, forced: bool) -> None:
        """Fetch the key set when due; callers arriving meanwhile wait for the same fetch."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        if not self._due(forced):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refreshing = future
        try:
            await self._load()
            future.set_result(None)
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marked retrieved: each waiter re-raises it itself
            raise
        finally:
            self._fetched_at = time.monotonic()
            self._refreshing = None

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        try:
            await self._refresh(forced=False)
            if kid not in self._keys:
                await self._refresh(forced=True)
        except (JwksUnavailable, OSError, TimeoutError, ValueError) as exc:
            log.warning("JWKS of issuer %s unavailable: %s", self.config.name, exc)
        if not self._keys:
            raise ServiceUnavailableError(
                f"tokens of issuer {self.config.name!r} cannot be checked: its JWKS is unavailable"
            )
        key = self._keys.get(kid)
        if key is None:
            raise AuthenticationError(
                f"the bearer token's signing key (kid) is not one of issuer {self.config.name!r}",
                code="invalid_token",
            )
        return key

    async def verify(self, token: str, seen: Unverified) -> Identity:
        cfg = self.config
        alg = seen.header.get("alg")
        if alg not in cfg.algorithms:
            raise AuthenticationError(
                f"the bearer token's algorithm is not accepted (accepted: {', '.join(cfg.algorithms)})",
                code="invalid_token",
            )
        kid = seen.header.get("kid")
        key = await self.key_for(kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                audience=cfg.audiences,
                issuer=cfg.issuer,
                leeway=cfg.clock_skew_seconds,
                options={"require": ["exp", "iss", "aud", cfg.subject_claim]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("the bearer token has expired", code="token_expired") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError(
                "the bearer token is not bound to an accepted audience", code="invalid_audience"
            ) from None
        except jwt.PyJWTError as exc:
            # PyJWT's messages name the claim or check at fault, never the token.
            raise AuthenticationError(f"invalid bearer token: {exc}", code="invalid_token") from None
        subject = claims.get(cfg.subject_claim)
        if not isinstance(subject, str | int) or isinstance(subject, bool) or not str(subject):
            raise AuthenticationError(
                f"the bearer token's {cfg.subject_claim!r} claim is not a string", code="invalid_token"
            )
        return oidc_subject(cfg.name, str(subject), claims)
