"""Config of caller identities: how bearer JWTs are validated, and who they name.

Validation (``settings.identity``) is process-wide and built once at start: the Kubernetes
TokenReview client and the OIDC issuers' key sets. What an identity may do (its models, limits,
budget, team) comes from ``identityBindings`` (see ``IdentityBindingConfig`` in ``_schema``),
which reload live like keys.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel


def _no_control_characters(value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain control characters (line breaks, tabs, ...)")
    return value


_Name = Annotated[str, AfterValidator(_no_control_characters)]
Algorithm = Literal["RS256", "ES256"]
_DEFAULT_ALGORITHMS: tuple[Algorithm, ...] = ("RS256", "ES256")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True
    )


class KubernetesIdentity(_Model):
    """Kubernetes ServiceAccount tokens (projected, audience-bound) as credentials.

    Every token is confirmed with the API server's TokenReview (so a deleted ServiceAccount or a
    deleted bound Pod is refused), and the answer is cached for at most `cacheTtlSeconds` and
    never past the token's `exp`."""

    enabled: bool = Field(False, description="Accept ServiceAccount tokens.")
    audiences: list[str] = Field(
        default_factory=lambda: ["kubellm"],
        min_length=1,
        description="Audiences a token must be bound to (one of them); `kubectl create token --audience`.",
    )
    issuer: str | None = Field(
        None,
        description="The cluster's service-account issuer (`--service-account-issuer`). When set, a JWT "
        "naming another issuer is refused without asking the API server.",
    )
    kubeconfig: str | None = Field(
        None,
        description="Kubeconfig used for TokenReview. Default: in-cluster credentials, else `$KUBECONFIG`.",
    )
    cache_ttl_seconds: float = Field(
        60.0, gt=0, le=3600, description="How long an accepted token is trusted before it is reviewed again."
    )
    timeout_seconds: float = Field(5.0, gt=0, le=60, description="Timeout of one TokenReview call.")


class OidcIssuer(_Model):
    """A generic OIDC/JWT issuer: tokens are verified locally against its JWKS."""

    name: _Name = Field(
        ..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="Short name, used in identity names."
    )
    issuer: str = Field(..., min_length=1, description="The exact `iss` claim of its tokens.")
    discovery_url: str | None = Field(
        None, description="OpenID discovery document (`.../.well-known/openid-configuration`)."
    )
    jwks_url: str | None = Field(None, description="The JWKS URL (instead of `discoveryUrl`).")
    audiences: list[str] = Field(
        ..., min_length=1, description="Accepted `aud` values; a token must carry one of them."
    )
    algorithms: list[Algorithm] = Field(
        default_factory=lambda: list(_DEFAULT_ALGORITHMS),
        min_length=1,
        description="Accepted signature algorithms.",
    )
    clock_skew_seconds: float = Field(
        30.0, ge=0, le=600, description="Leeway when checking `exp`, `nbf` and `iat`."
    )
    subject_claim: str = Field("sub", description="The claim that names the caller (`oidc:NAME/VALUE`).")
    team_claim: str | None = Field(
        None, description="A claim whose value is the caller's team, when its binding names none."
    )
    jwks_min_refresh_seconds: float = Field(
        30.0, ge=0, description="A token with an unknown `kid` refetches the JWKS at most this often."
    )
    cache_ttl_seconds: float = Field(
        300.0, gt=0, le=86400, description="How long a verified token is trusted (never past `exp`)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> OidcIssuer:
        if (self.discovery_url is None) == (self.jwks_url is None):
            raise ValueError("set exactly one of discoveryUrl, jwksUrl")
        return self


class IdentitySettings(_Model):
    """Bearer JWTs as credentials, besides virtual keys (see docs/kubernetes.md, Identities)."""

    kubernetes: KubernetesIdentity = Field(
        default_factory=lambda: KubernetesIdentity(), description="ServiceAccount tokens."
    )
    oidc: list[OidcIssuer] = Field(default_factory=list, description="Generic OIDC issuers.")
    max_cached_tokens: int = Field(
        10_000, ge=1, description="Validated (and refused) tokens remembered at most."
    )
    negative_cache_ttl_seconds: float = Field(
        10.0, gt=0, le=600, description="How long a refused token is refused without validating it again."
    )

    @property
    def enabled(self) -> bool:
        return self.kubernetes.enabled or bool(self.oidc)

    @model_validator(mode="after")
    def _unique(self) -> IdentitySettings:
        names = [i.name for i in self.oidc]
        if len(names) != len(set(names)):
            raise ValueError("oidc: issuer names must be unique")
        return self


class ServiceAccountMatch(_Model):
    """ServiceAccounts a binding covers."""

    namespace: _Name = Field(..., min_length=1, description="The ServiceAccounts' namespace.")
    name: _Name = Field(
        "*", min_length=1, description="The ServiceAccount's name; `*` means every one of the namespace."
    )


class OidcMatch(_Model):
    """OIDC callers a binding covers: all conditions must hold."""

    issuer: _Name = Field(..., min_length=1, description="Name of an issuer in `settings.identity.oidc`.")
    subjects: list[str] = Field(
        default_factory=list, description="Accepted subject values (`subjectClaim`); empty means any."
    )
    claims: dict[str, str] = Field(
        default_factory=dict,
        description="Claim -> required value (a list claim must contain it), e.g. `groups: ml-team`.",
    )
