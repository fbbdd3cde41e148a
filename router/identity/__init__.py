"""Caller identities: Kubernetes ServiceAccount tokens (TokenReview) and OIDC/JWT bearer tokens
(JWKS), mapped by IdentityBindings to virtual keys of their own. See docs/kubernetes.md."""

from ._service import Identities
from ._token import Identity, looks_like_jwt

__all__ = ["Identities", "Identity", "looks_like_jwt"]
