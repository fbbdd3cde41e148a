"""The identity service: bearer JWTs to virtual keys, with a cache in front of the validators.

Built once per process by ``build_services``. The request path asks :meth:`Identities.lookup`
first: a token seen recently costs one dict lookup (and a clock read). Only a token not in the
cache goes to :meth:`Identities.resolve`, which routes it by its ``iss`` to an OIDC issuer
(local JWKS check) or to TokenReview, and caches the answer: accepted tokens until
``min(exp, now + cacheTtlSeconds)``, refused ones for ``negativeCacheTtlSeconds``. Concurrent
requests presenting the same new token share one validation.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .._errors import AuthenticationError, KubellmError
from ..config._identity import IdentitySettings
from ..core._state import RouterState, VirtualKey
from ..observability import _metrics as metrics
from ._bindings import BindingIndex
from ._kubernetes import TokenReviewer
from ._oidc import JwksUnavailable, OidcVerifier
from ._token import Identity, precheck, unverified

#: Largest discovery document or JWKS read.
MAX_JWKS_BYTES = 1024 * 1024


@dataclass(slots=True)
class _Entry:
    #: Monotonic time the entry stops being trusted.
    until: float
    identity: Identity | None
    error: KubellmError | None = None
    #: The config the key below was made for (identity keys follow config reloads).
    state: RouterState | None = None
    key: VirtualKey | None = None


class Identities:
    def __init__(self, settings: IdentitySettings) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[_Entry]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._index: tuple[RouterState, BindingIndex] | None = None
        self.reviewer = TokenReviewer(settings.kubernetes) if settings.kubernetes.enabled else None
        self.issuers = {i.issuer: OidcVerifier(i, self._fetch_json) for i in settings.oidc}
        #: Validations done (cache misses); the tests and the docs' figures read it.
        self.validations = 0

    async def close(self) -> None:
        if self.reviewer is not None:
            await self.reviewer.close()
        if self._session is not None:
            await self._session.close()

    # ---- the hot path -------------------------------------------------------

    def lookup(self, state: RouterState, token: str) -> VirtualKey | None:
        """The cached answer for ``token``: its key, a raised refusal, or None when not cached."""
        entry = self._cache.get(token)
        if entry is None:
            return None
        if time.monotonic() >= entry.until:
            del self._cache[token]
            return None
        return self._answer(state, entry)

    def _answer(self, state: RouterState, entry: _Entry) -> VirtualKey:
        if entry.error is not None:
            # A fresh exception each time: re-raising one instance would grow its traceback.
            raise AuthenticationError(entry.error.message, code=entry.error.code)
        if entry.state is not state:
            assert entry.identity is not None
            entry.key, entry.state = self._bindings(state).key_for(entry.identity), state
        assert entry.key is not None
        return entry.key

    def _bindings(self, state: RouterState) -> BindingIndex:
        if self._index is None or self._index[0] is not state:
            config = state.config
            index = BindingIndex(config.identity_bindings, list(self.settings.oidc), state.teams)
            self._index = (state, index)
        return self._index[1]

    # ---- cache misses ---------------------------------------------------------

    async def resolve(self, state: RouterState, token: str) -> VirtualKey:
        """Validate ``token`` (sharing a validation already in flight), cache and bind it.

        The validation runs as a task of its own, so a client that disconnects meanwhile
        cancels only its own wait: the others get the answer, and the cache keeps it."""
        task = self._inflight.get(token)
        if task is None:
            task = asyncio.ensure_future(self._validate(token))
            self._inflight[token] = task
            task.add_done_callback(lambda done: self._settled(token, done))
        entry = await asyncio.shield(task)
        return self._answer(state, entry)

    def _settled(self, token: str, task: asyncio.Future[_Entry]) -> None:
        if self._inflight.get(token) is task:
            del self._inflight[token]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _validate(self, token: str) -> _Entry:
        self.validations += 1
        now = time.monotonic()
        source = ["unknown"]
        try:
            identity, ttl = await self._identity(token, source)
        except AuthenticationError as err:
            metrics.IDENTITY_VALIDATIONS.labels(source[0], "refused").inc()
            entry = _Entry(now + self.settings.negative_cache_ttl_seconds, None, err)
        except KubellmError:
            metrics.IDENTITY_VALIDATIONS.labels(source[0], "unavailable").inc()
            raise
        else:
            metrics.IDENTITY_VALIDATIONS.labels(source[0], "accepted").inc()
            entry = _Entry(now + ttl, identity)
        self._remember(token, entry)
        return entry

    async def _identity(self, token: str, source: list[str]) -> tuple[Identity, float]:
        """Who ``token`` names and how long that may be trusted; raises a 401 (or a 503).
        ``source[0]`` is set to the validator that was asked (for the metrics)."""
        seen = unverified(token)
        expires = seen.expires
        verifier = self.issuers.get(seen.issuer)
        kube = self.settings.kubernetes
        if verifier is not None:
            source[0] = f"oidc:{verifier.config.name}"
            ttl = verifier.config.cache_ttl_seconds
            identity = await verifier.verify(token, seen)
        elif self.reviewer is not None and kube.issuer in (None, seen.issuer):
            # Cheap local refusals first: an expired token or one for another audience never
            # costs an API call. TokenReview then checks everything again, authoritatively.
            source[0] = "kubernetes"
            precheck(seen, kube.audiences)
            ttl = kube.cache_ttl_seconds
            identity = await self.reviewer.review(token)
        else:
            raise AuthenticationError("the bearer token's issuer is not accepted", code="invalid_token")
        if expires is not None:
            ttl = min(ttl, expires - time.time())
        return identity, max(ttl, 0.0)

    def _remember(self, token: str, entry: _Entry) -> None:
        cache, most = self._cache, self.settings.max_cached_tokens
        if len(cache) >= most:
            now = time.monotonic()
            for stale in [t for t, e in cache.items() if e.until <= now]:
                del cache[stale]
            if len(cache) >= most:  # still full: forget the oldest tenth (dicts keep insertion order)
                for old in list(cache)[: max(1, len(cache) // 10)]:
                    del cache[old]
        cache[token] = entry

    # ---- JWKS fetching --------------------------------------------------------

    async def _fetch_json(self, url: str) -> Any:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            # One pooled session per process; a new one only for a new event loop (the tests').
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            self._session_loop = loop
        try:
            async with self._session.get(url, headers={"accept": "application/json"}) as resp:
                raw = await resp.content.read(MAX_JWKS_BYTES + 1)
                if resp.status != 200:
                    raise JwksUnavailable(f"GET {url}: HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksUnavailable(f"GET {url}: {type(exc).__name__}: {exc}") from None
        if len(raw) > MAX_JWKS_BYTES:
            raise JwksUnavailable(f"GET {url}: larger than {MAX_JWKS_BYTES} bytes")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise JwksUnavailable(f"GET {url}: not JSON") from None
