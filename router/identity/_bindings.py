"""Which IdentityBinding covers an identity, and the virtual key it is metered as.

An identity is a key of its own to the metering machinery: ``sa:NS/NAME`` has its own limits,
budget and spend, with the binding's settings. A binding naming the ServiceAccount beats one
covering its whole namespace; an OIDC binding naming subjects beats one matching claims only,
which beats one matching the whole issuer; ties go to the first binding by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import PermissionDeniedError
from ..config._identity import OidcIssuer, OidcMatch
from ..config._schema import IdentityBindingConfig, KeyConfig
from ..core._state import Team, VirtualKey
from ._token import Identity


def _claim_holds(claims: Mapping[str, Any], name: str, wanted: str) -> bool:
    value = claims.get(name)
    if isinstance(value, list):
        return wanted in (str(v) for v in value)
    return value is not None and str(value) == wanted


def _oidc_matches(match: OidcMatch, identity: Identity) -> bool:
    if match.issuer != identity.scope:
        return False
    if match.subjects and identity.subject not in match.subjects:
        return False
    return all(_claim_holds(identity.claims, k, v) for k, v in match.claims.items())


class BindingIndex:
    """The bindings of one config, indexed; identity keys are made once per config and identity."""

    def __init__(
        self,
        bindings: list[IdentityBindingConfig],
        issuers: list[OidcIssuer],
        teams: Mapping[str, Team] | None = None,
    ) -> None:
        #: The config's teams: an identity whose team names one is limited by it too.
        self.teams: Mapping[str, Team] = teams or {}
        self.exact: dict[tuple[str, str], IdentityBindingConfig] = {}
        self.namespaces: dict[str, IdentityBindingConfig] = {}
        ranked: list[tuple[int, str, OidcMatch, IdentityBindingConfig]] = []
        for binding in sorted(bindings, key=lambda b: b.name):
            for sa in binding.service_accounts:
                if sa.name == "*":
                    self.namespaces.setdefault(sa.namespace, binding)
                else:
                    self.exact.setdefault((sa.namespace, sa.name), binding)
            for match in binding.oidc:
                rank = 0 if match.subjects else 1 if match.claims else 2
                ranked.append((rank, binding.name, match, binding))
        ranked.sort(key=lambda r: (r[0], r[1]))
        self.oidc = [(m, b) for _, _, m, b in ranked]
        self.team_claims = {i.name: i.team_claim for i in issuers}
        self._keys: dict[str, VirtualKey] = {}

    def binding_for(self, identity: Identity) -> IdentityBindingConfig | None:
        if identity.kind == "sa":
            found = self.exact.get((identity.scope, identity.subject))
            return found if found is not None else self.namespaces.get(identity.scope)
        return next((b for m, b in self.oidc if _oidc_matches(m, identity)), None)

    def key_for(self, identity: Identity) -> VirtualKey:
        """The identity's virtual key; a 403 when no binding covers it."""
        key = self._keys.get(identity.name)
        if key is not None:
            return key
        binding = self.binding_for(identity)
        if binding is None:
            what = "ServiceAccount" if identity.kind == "sa" else "OIDC subject"
            raise PermissionDeniedError(
                f"{what} {identity.name.partition(':')[2]!r} is authenticated but no IdentityBinding "
                "grants it access",
                code="identity_not_bound",
            )
        team = binding.team
        claim = self.team_claims.get(identity.scope) if identity.kind == "oidc" else None
        if team is None and claim is not None:
            value = identity.claims.get(claim)
            team = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
        # Built without validation: the binding's fields were validated with the config, and an
        # identity has no key hash or key env to check.
        config = KeyConfig.model_construct(
            name=identity.name,
            models=binding.models,
            limits=binding.limits,
            budget=binding.budget,
            disabled=binding.disabled,
            cache=binding.cache,
            guardrails=binding.guardrails,
            team=team,
            owner=binding.name,
            metadata={"identityBinding": binding.name},
        )
        key = VirtualKey(config, b"", self.teams.get(team or ""))
        if len(self._keys) >= 100_000:
            self._keys.clear()
        self._keys[identity.name] = key
        return key
