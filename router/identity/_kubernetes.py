"""ServiceAccount tokens, confirmed by the API server's TokenReview.

TokenReview is authoritative: besides the signature, expiry and audience it checks that the
ServiceAccount (and the Pod or Secret the token is bound to) still exists, which no local JWKS
check can. The cost is one API call per token per cache period (see ``_service``), over one
pooled client built once per process.
"""

from __future__ import annotations

import logging
from typing import Any

from .._errors import AuthenticationError, ServiceUnavailableError
from ..config._identity import KubernetesIdentity
from ..kube import KubeClient, KubeError, auto_config
from ._token import Identity, service_account

log = logging.getLogger("kubellm.identity")

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
_SA_PREFIX = "system:serviceaccount:"


class TokenReviewer:
    def __init__(self, settings: KubernetesIdentity) -> None:
        self.settings = settings
        self._client: KubeClient | None = None

    def _kube(self) -> KubeClient:
        if self._client is None:
            try:
                config = auto_config(self.settings.kubeconfig)
            except KubeError as err:
                log.error("ServiceAccount tokens cannot be reviewed: %s", err)
                raise ServiceUnavailableError(
                    "ServiceAccount tokens cannot be checked: the router has no Kubernetes credentials"
                ) from None
            self._client = KubeClient(config, timeout=self.settings.timeout_seconds)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def review(self, token: str) -> Identity:
        """The ServiceAccount ``token`` belongs to; raises a 401 when the API server refuses it."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(self.settings.audiences)},
        }
        try:
            answer = await self._kube().create(TOKEN_REVIEWS, body)
        except KubeError as err:
            # The message names the path and the API server's reason, never the request body.
            log.warning("TokenReview failed: %s", err)
            if err.status in (401, 403):
                raise ServiceUnavailableError(
                    "ServiceAccount tokens cannot be checked: the router may not create TokenReviews "
                    "(see its RBAC in docs/kubernetes.md)"
                ) from None
            raise ServiceUnavailableError(
                "ServiceAccount tokens cannot be checked right now: the Kubernetes API is unavailable"
            ) from None
        return identity_of(answer.get("status") or {})


def identity_of(status: dict[str, Any]) -> Identity:
    """The ServiceAccount a TokenReview's status vouches for."""
    if not status.get("authenticated"):
        # status.error says why (expired, ServiceAccount deleted, bound Pod gone); it is logged, not
        # returned, as it may name objects the caller should not learn about.
        log.info("TokenReview refused a token: %s", status.get("error") or "not authenticated")
        raise AuthenticationError(
            "invalid ServiceAccount token: expired, revoked, for another audience, or its "
            "ServiceAccount no longer exists",
            code="invalid_token",
        )
    username = str((status.get("user") or {}).get("username") or "")
    namespace, _, name = username.removeprefix(_SA_PREFIX).partition(":")
    if not username.startswith(_SA_PREFIX) or not namespace or not name:
        raise AuthenticationError("the bearer token is not a ServiceAccount token", code="invalid_token")
    return service_account(namespace, name)
