"""The IdentityBinding CRD: what Kubernetes ServiceAccounts and OIDC callers may do.

Kept apart from ``_crds`` (which assembles every CRD) so that module stays readable.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

SA_NAME_RULE = (
    "self == '*' || self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')",
    "serviceAccounts: a ServiceAccount name in this namespace, or '*' for all of them",
)
EMPTY_MESSAGE = "name at least one ServiceAccount (serviceAccounts) or OIDC caller (oidc)"


def identity_binding_spec() -> Schema:
    from ._crds import _limits, _names, _rule, _str, api_key_spec

    key = api_key_spec()["properties"]
    return {
        "type": "object",
        "x-kubernetes-validations": _rule(
            "(has(self.serviceAccounts) && size(self.serviceAccounts) > 0) || "
            "(has(self.oidc) && size(self.oidc) > 0)",
            EMPTY_MESSAGE,
        ),
        "properties": {
            "serviceAccounts": {
                "type": "array",
                "maxItems": 256,
                "x-kubernetes-list-type": "set",
                "description": "ServiceAccounts of this namespace it covers, by name; `*` means all of "
                "them. Each one is metered on its own as `sa:NAMESPACE/NAME`.",
                "items": _str("A ServiceAccount name, or `*`.", rule=SA_NAME_RULE, minLength=1),
            },
            "oidc": {
                "type": "array",
                "maxItems": 64,
                "x-kubernetes-list-type": "atomic",
                "description": "OIDC callers it covers (metered as `oidc:ISSUER/SUBJECT`); the issuer "
                "must be configured in the routers' settings (`settings.identity.oidc`).",
                "items": {
                    "type": "object",
                    "required": ["issuer"],
                    "properties": {
                        "issuer": _str("The issuer's name in `settings.identity.oidc`.", 63, minLength=1),
                        "subjects": _names("Accepted subjects (the issuer's subjectClaim); empty: any."),
                        "claims": {
                            "type": "object",
                            "maxProperties": 16,
                            "additionalProperties": {"type": "string", "maxLength": 253},
                            "description": "Claim -> required value; a list claim must contain it.",
                        },
                    },
                },
            },
            "team": _str("The callers' team (their limits and budget nest in the team's)."),
            "models": key["models"],
            "guardrails": key["guardrails"],
            "limits": _limits("Limits of each identity it covers (each has its own)."),
            "budget": {
                **key["budget"],
                "description": "A spend budget per period, for each identity it covers.",
            },
            "disabled": {"type": "boolean", "default": False, "description": "Refuse every caller."},
            "cache": key["cache"],
        },
    }


def identity_binding_status() -> Schema:
    from ._crds import _status

    return _status(
        {
            "identities": {
                "type": "integer",
                "description": "Identities it covers that made requests this period.",
            },
            "spend": {"type": "string", "description": "USD its identities spent this period."},
            "spendSummary": {"type": "string", "description": "spend this period, for kubectl get."},
            "usage": {
                "type": "array",
                "maxItems": 50,
                "x-kubernetes-list-type": "atomic",
                "description": "The identities that spent the most this period.",
                "items": {
                    "type": "object",
                    "properties": {
                        "identity": {
                            "type": "string",
                            "description": "sa:NAMESPACE/NAME or oidc:ISSUER/SUB.",
                        },
                        "spend": {"type": "string", "description": "USD spent this period."},
                        "requests": {"type": "integer", "description": "Successful requests this period."},
                    },
                },
            },
            "periodStart": {"type": "string", "format": "date-time", "description": "Start of the period."},
        }
    )


def identity_binding_crd() -> Schema:
    from ._crds import _REASON_COLUMN, _condition_column, _crd

    return _crd(
        "IdentityBinding",
        "identitybindings",
        "ib",
        identity_binding_spec(),
        identity_binding_status(),
        [
            {"name": "ServiceAccounts", "type": "string", "jsonPath": ".spec.serviceAccounts"},
            {"name": "Team", "type": "string", "jsonPath": ".spec.team"},
            {"name": "Identities", "type": "integer", "jsonPath": ".status.identities"},
            {"name": "Spend", "type": "string", "jsonPath": ".status.spendSummary"},
            _condition_column("Ready"),
            _REASON_COLUMN,
        ],
    )
