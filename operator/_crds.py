"""The CustomResourceDefinitions, as data; ``crds/*.yaml`` are generated from here.

    python -m kubellm.operator._crds            # rewrite crds/ and charts/kubellm/files/crds/
    python -m kubellm.operator._crds --check    # exit 1 if either is stale (CI)

The provider enum comes from the router's provider registry, so a new provider
reaches the CRD by regenerating. CEL rules carry the messages users see when
``kubectl apply`` rejects a resource.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

GROUP = "kubellm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Schema = dict[str, Any]

#: Providers whose requests need these spec fields, with the message CEL answers when one is missing.
PROVIDER_RULES: tuple[tuple[str, str], ...] = (
    (
        "self.provider != 'azure' || (has(self.apiVersion) && has(self.baseUrl))",
        "provider azure needs apiVersion and baseUrl "
        "(e.g. apiVersion: 2024-10-21, baseUrl: https://RESOURCE.openai.azure.com)",
    ),
    ("self.provider != 'bedrock' || has(self.region)", "provider bedrock needs region (e.g. us-east-1)"),
    (
        "self.provider != 'vertex' || (has(self.project) && has(self.location))",
        "provider vertex needs project and location (e.g. project: my-project, location: us-central1)",
    ),
    (
        "!(self.provider in ['openai-compatible', 'huggingface-endpoint']) || has(self.baseUrl)",
        "provider openai-compatible (and huggingface-endpoint) needs baseUrl, the server's "
        "OpenAI-style root (e.g. http://vllm.models:8000/v1)",
    ),
)
WEIGHT_MESSAGE = "weight must be 0 or more (0 takes the deployment out of rotation within its tier)"
CREDENTIALS_MESSAGE = "credentials: set exactly one of secretKeyRef, env, file"
PRICE_MESSAGE = 'prices are decimal strings of USD, like "2.50"'
AMOUNT_MESSAGE = 'budget.amountUsd must be a decimal string of USD, like "25" or "12.50"'
PERIOD_MESSAGE = (
    "budget.period must be daily, weekly, monthly or a duration like 30m, 12h, 7d "
    "(a positive integer and one of s, m, h, d)"
)
PERIOD_RULE = (
    "self.period in ['daily', 'weekly', 'monthly'] || self.period.matches('^[1-9][0-9]{0,5}[smhd]$')"
)
SELF_FALLBACK_MESSAGE = "a model group cannot fall back to itself"
STRATEGIES = ("weighted-random", "least-busy", "lowest-latency", "usage-based", "lowest-cost")
KEY_STATES = ("Active", "Expired", "BudgetExceeded", "Disabled")


def _providers() -> list[str]:
    from kubellm.router.providers import provider_names

    return sorted(provider_names())


def _modes() -> list[str]:
    from kubellm.router.config import MODES

    return list(MODES)


def _str(
    description: str, max_length: int = 253, *, rule: tuple[str, str] | None = None, **extra: Any
) -> Schema:
    out: Schema = {"type": "string", "maxLength": max_length, "description": description, **extra}
    if rule is not None:
        out["x-kubernetes-validations"] = _rule(*rule)
    return out


def _rule(rule: str, message: str) -> list[dict[str, str]]:
    return [{"rule": rule, "message": message}]


def _limits(what: str) -> Schema:
    return {
        "type": "object",
        "description": f"{what} Unset means unlimited.",
        "properties": {
            "rpm": {"type": "integer", "minimum": 1, "description": "Requests per minute."},
            "tpm": {
                "type": "integer",
                "minimum": 1,
                "description": "Tokens (prompt + completion) per minute.",
            },
            "maxParallelRequests": {"type": "integer", "minimum": 1, "description": "Concurrent requests."},
        },
    }


def _price(description: str) -> Schema:
    rule = "self.matches('^[0-9]{1,9}([.][0-9]{1,12})?$')"
    return _str(description, 32, rule=(rule, PRICE_MESSAGE))


def _seconds(description: str, default: float | None = None) -> Schema:
    out: Schema = {"type": "number", "minimum": 0, "exclusiveMinimum": True, "description": description}
    if default is not None:
        out["default"] = default
    return out


def _names(description: str) -> Schema:
    return {
        "type": "array",
        "maxItems": 64,
        "x-kubernetes-list-type": "atomic",
        "items": {"type": "string", "minLength": 1, "maxLength": 253},
        "description": description,
    }


CONDITIONS: Schema = {
    "type": "array",
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "description": "Ready: rendered into the router config (False: left out, see reason and message).",
    "items": {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {
                "type": "string",
                "maxLength": 64,
                "description": "Ready, or Healthy (ModelDeployment).",
            },
            "status": {
                "type": "string",
                "enum": ["True", "False", "Unknown"],
                "description": "The condition's state.",
            },
            "reason": {
                "type": "string",
                "maxLength": 1024,
                "description": "A CamelCase reason, e.g. SecretNotFound.",
            },
            "message": {"type": "string", "maxLength": 32768, "description": "What happened, for people."},
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "minimum": 0,
                "description": "The metadata.generation this condition describes.",
            },
            "lastTransitionTime": {
                "type": "string",
                "format": "date-time",
                "description": "When status last changed.",
            },
        },
    },
}


def _status(extra: Schema) -> Schema:
    return {
        "type": "object",
        "properties": {
            "observedGeneration": {
                "type": "integer",
                "format": "int64",
                "description": "The metadata.generation last reconciled.",
            },
            "conditions": CONDITIONS,
            **extra,
        },
    }


def _condition_column(name: str, kind: str = "Ready", priority: int = 0) -> Schema:
    col: Schema = {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{kind}")].status',
    }
    if priority:
        col["priority"] = priority
    return col


_REASON_COLUMN = {
    "name": "Reason",
    "type": "string",
    "priority": 1,
    "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
}
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def model_deployment_spec() -> Schema:
    credentials: Schema = {
        "type": "object",
        "description": "Where the upstream credential comes from: exactly one source. Omit it for "
        "providers that need none (mock, ollama, lmstudio) or that use the router pods' ambient "
        "identity (bedrock, vertex).",
        "x-kubernetes-validations": _rule(
            "[has(self.secretKeyRef), has(self.env), has(self.file)].filter(x, x).size() == 1",
            CREDENTIALS_MESSAGE,
        ),
        "properties": {
            "secretKeyRef": {
                "type": "object",
                "description": "A key of a Secret in this namespace; the operator copies the value into "
                "the router config Secret.",
                "required": ["name", "key"],
                "properties": {
                    "name": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 253,
                        "description": "The Secret's name.",
                    },
                    "key": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 253,
                        "description": "The data key.",
                    },
                },
            },
            "env": _str("An environment variable of the router pods that holds the credential."),
            "file": _str("A file on the router pods that holds the credential.", 4096),
        },
    }
    return {
        "type": "object",
        "required": ["model", "provider"],
        "x-kubernetes-validations": [
            *({"rule": rule, "message": message} for rule, message in PROVIDER_RULES),
            {"rule": "self.weight >= 0.0", "message": WEIGHT_MESSAGE},
        ],
        "properties": {
            "model": _str(
                "The public model name clients send; deployments sharing it form a model group.",
                minLength=1,
            ),
            "provider": {"type": "string", "enum": _providers(), "description": "The provider adapter."},
            "mode": {
                "type": "array",
                "minItems": 1,
                "x-kubernetes-list-type": "set",
                "items": {"type": "string", "enum": _modes()},
                "description": "What it serves (chat, embedding, image, audio, rerank, moderation); requests "
                "of other kinds skip it. Default: derived from the upstream model's name, and chat and "
                "embedding requests still reach it.",
            },
            "upstreamModel": _str("Model (or Azure deployment) id sent upstream. Default: spec.model.", 512),
            "baseUrl": _str(
                "Upstream base URL. Default: the provider's own.",
                2048,
                rule=(
                    "self.startsWith('http://') || self.startsWith('https://')",
                    "baseUrl must start with http:// or https://",
                ),
            ),
            "apiVersion": _str("Azure OpenAI api-version, e.g. 2024-10-21.", 64),
            "region": _str("Cloud region (Bedrock), e.g. us-east-1.", 64),
            "project": _str("Cloud project (Vertex AI).", 128),
            "location": _str("Cloud location (Vertex AI), e.g. us-central1 or global.", 64),
            "credentials": credentials,
            "weight": {
                "type": "number",
                "default": 1,
                "description": "Relative share of traffic within its priority tier (0 or more).",
            },
            "priority": {
                "type": "integer",
                "minimum": 0,
                "default": 0,
                "description": "Priority tier; a higher one gets traffic only when lower tiers cannot serve.",
            },
            "limits": _limits("Per-deployment limits; a saturated deployment is skipped."),
            "contextWindow": {"type": "integer", "minimum": 1, "description": "Largest prompt + completion."},
            "pricing": {
                "type": "object",
                "description": "USD per one million tokens (or per image, per search unit) as decimal "
                'strings (exact: "2.50", not 2.5). Unset fields use the shipped price table.',
                "properties": {
                    "inputPerMillion": _price("Prompt tokens."),
                    "outputPerMillion": _price("Completion tokens."),
                    "cachedInputPerMillion": _price(
                        "Cached prompt tokens, read from the provider's prompt cache (default: the input "
                        "price)."
                    ),
                    "cacheWriteInputPerMillion": _price(
                        "Prompt tokens written to the provider's prompt cache, such as Anthropic's "
                        "cache_creation_input_tokens (default: the input price)."
                    ),
                    "perImage": _price("USD per generated image (image models)."),
                    "perSearchUnit": _price(
                        "USD per rerank search unit (Cohere's billed search units; Bedrock's queries of "
                        "up to 100 documents)."
                    ),
                    "perMillionCharacters": _price(
                        "USD per one million characters of text turned into speech (/v1/audio/speech)."
                    ),
                    "perSecond": _price("USD per second of audio transcribed or translated."),
                },
            },
            "timeouts": {
                "type": "object",
                "default": {},
                "description": "Upstream timeouts in seconds.",
                "properties": {
                    "connect": _seconds("TCP and TLS connect.", 5),
                    "firstToken": _seconds("Time to the first streamed byte (or the response headers)."),
                    "idle": _seconds("Longest gap between two streamed chunks."),
                    "total": _seconds("The whole request.", 600),
                },
            },
            "cache": {"type": "boolean", "default": False, "description": "Opt into the response cache."},
            "logPayloads": {"type": "boolean", "default": False, "description": "Log prompts and responses."},
            "dropUnsupportedParams": {
                "type": "boolean",
                "default": False,
                "description": "Drop parameters the provider cannot honour instead of answering 400.",
            },
            "headers": {
                "type": "object",
                "maxProperties": 32,
                "additionalProperties": {"type": "string", "maxLength": 4096},
                "description": "Extra headers sent upstream (not secret: use credentials for secrets).",
            },
            "mock": {
                "type": "object",
                "description": "Options of the built-in mock provider.",
                "properties": {
                    "latencyMs": {"type": "number", "minimum": 0, "description": "Delay before answering."},
                    "chunkDelayMs": {
                        "type": "number",
                        "minimum": 0,
                        "description": "Delay between stream chunks.",
                    },
                    "reply": {"type": "string", "maxLength": 65536, "description": "Fixed reply text."},
                },
            },
        },
    }


def api_key_spec() -> Schema:
    return {
        "type": "object",
        "properties": {
            "owner": _str("Who the key belongs to (a person or a service)."),
            "team": _str("The owner's team."),
            "models": _names("Model groups the key may use; empty means all."),
            "guardrails": _names(
                "Guardrails (by name, from the operator's settings file) this key's requests pass, "
                "after the model group's; see docs/guardrails.md."
            ),
            "limits": _limits("Per-key limits."),
            "budget": {
                "type": "object",
                "required": ["amountUsd"],
                "description": "A spend budget per period; the key stops working once it is spent.",
                "x-kubernetes-validations": _rule(PERIOD_RULE, PERIOD_MESSAGE),
                "properties": {
                    "amountUsd": _str(
                        'USD per period, a decimal string like "25" or "12.50".',
                        32,
                        rule=("self.matches('^[0-9]{1,9}([.][0-9]{1,12})?$')", AMOUNT_MESSAGE),
                    ),
                    "period": _str(
                        "daily, weekly (ISO, from Monday 00:00 UTC), monthly (calendar, UTC) or a "
                        "duration aligned to the Unix epoch: 30m, 12h, 7d.",
                        16,
                        default="monthly",
                    ),
                },
            },
            "expiresAt": {
                "type": "string",
                "format": "date-time",
                "description": "When the key stops working (RFC 3339, e.g. 2026-12-31T00:00:00Z).",
            },
            "disabled": {"type": "boolean", "default": False, "description": "Reject every request."},
            "cache": {"type": "boolean", "default": False, "description": "Opt into the response cache."},
            "secretName": _str(
                "The Secret (in this namespace, data key `key`) holding the key. The operator generates "
                "a key there unless one is present. Default: NAME-apikey.",
                rule=(
                    "self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')",
                    "secretName must be a valid Secret name (lowercase letters, digits, '-', '.')",
                ),
            ),
        },
    }


def api_key_status() -> Schema:
    return _status(
        {
            "state": {
                "type": "string",
                "enum": list(KEY_STATES),
                "description": "Whether the key works, and why not.",
            },
            "keyPrefix": {"type": "string", "description": "The first characters of the key (not secret)."},
            "secretName": {"type": "string", "description": "The Secret that holds the key."},
            "rotatedAt": {
                "type": "string",
                "format": "date-time",
                "description": "When the key last changed.",
            },
            "spend": {"type": "string", "description": "USD spent in the current period."},
            "remainingBudget": {"type": "string", "description": "USD left in the current period."},
            "spendSummary": {"type": "string", "description": "spend / budget, for kubectl get."},
            "periodStart": {
                "type": "string",
                "format": "date-time",
                "description": "Start of the budget period.",
            },
            "nextReset": {
                "type": "string",
                "format": "date-time",
                "description": "When the budget period resets.",
            },
            "usage": {
                "type": "object",
                "description": (
                    "Usage in the current period. Each request counts once: as a success, a rejection"
                    " or a failure. Tokens and spend cover every request billed, successful or not."
                ),
                "properties": {
                    "requests": {
                        "type": "integer",
                        "description": "Successful requests this period (status below 400).",
                    },
                    "rejected": {
                        "type": "integer",
                        "description": (
                            "Requests refused with 429 this period: the key's rate limits or budget."
                        ),
                    },
                    "failed": {
                        "type": "integer",
                        "description": "Requests that ended in any other error this period.",
                    },
                    "promptTokens": {"type": "integer", "description": "Prompt tokens this period."},
                    "completionTokens": {"type": "integer", "description": "Completion tokens this period."},
                },
            },
        }
    )


def model_group_spec() -> Schema:
    return {
        "type": "object",
        "properties": {
            "model": _str("The public model name this configures. Default: metadata.name.", minLength=1),
            "strategy": {
                "type": "string",
                "enum": list(STRATEGIES),
                "default": "weighted-random",
                "description": "How requests are spread over the group's deployments.",
            },
            "fallbacks": _names("Model groups to try, in order, when this group cannot answer."),
            "contextWindowFallbacks": _names("Model groups to try when the prompt is too long here."),
            "contentPolicyFallbacks": _names(
                "Model groups to try when a deployment refuses on content policy."
            ),
            "aliases": _names("Other names clients may send for this group."),
            "guardrails": _names(
                "Guardrails (by name, from the operator's settings file) every request to this group "
                "passes; see docs/guardrails.md."
            ),
            "latencyTolerance": {
                "type": "number",
                "minimum": 0,
                "default": 0.1,
                "description": "lowest-latency: deployments within this fraction of the best share load.",
            },
        },
    }


def _crd(kind: str, plural: str, short: str, spec: Schema, status: Schema, columns: list[Schema]) -> Schema:
    root: Schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if kind == "ModelGroup":
        name = "(has(self.spec.model) ? self.spec.model : self.metadata.name)"
        fields = ("fallbacks", "contextWindowFallbacks", "contentPolicyFallbacks")
        rule = " && ".join(f"(!has(self.spec.{f}) || self.spec.{f}.all(x, x != {name}))" for f in fields)
        root["x-kubernetes-validations"] = [
            {"rule": rule, "message": SELF_FALLBACK_MESSAGE, "fieldPath": ".spec"}
        ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubellm", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": plural,
                "singular": kind.lower(),
                "kind": kind,
                "listKind": f"{kind}List",
                "shortNames": [short],
                "categories": ["kubellm"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [*columns, _AGE],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def crds() -> dict[str, Schema]:
    """File name -> CRD document."""
    md = _crd(
        "ModelDeployment",
        "modeldeployments",
        "md",
        model_deployment_spec(),
        _status(
            {
                "deploymentName": {
                    "type": "string",
                    "description": "The name in the router config and x-kubellm-deployment: NAMESPACE/NAME.",
                },
                "openUntil": {
                    "type": "string",
                    "format": "date-time",
                    "description": "While the circuit breaker is open: when it may close.",
                },
            }
        ),
        [
            {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
            {"name": "Provider", "type": "string", "jsonPath": ".spec.provider"},
            {"name": "Weight", "type": "number", "jsonPath": ".spec.weight"},
            _condition_column("Ready"),
            _condition_column("Healthy", "Healthy"),
            _REASON_COLUMN,
        ],
    )
    ak = _crd(
        "ApiKey",
        "apikeys",
        "ak",
        api_key_spec(),
        api_key_status(),
        [
            {"name": "Owner", "type": "string", "jsonPath": ".spec.owner"},
            {"name": "Models", "type": "string", "jsonPath": ".spec.models"},
            {"name": "Spend/Budget", "type": "string", "jsonPath": ".status.spendSummary"},
            {"name": "Requests", "type": "integer", "priority": 1, "jsonPath": ".status.usage.requests"},
            {"name": "Rejected", "type": "integer", "priority": 1, "jsonPath": ".status.usage.rejected"},
            {"name": "Expires", "type": "string", "jsonPath": ".spec.expiresAt"},
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            _condition_column("Ready"),
            {"name": "Key", "type": "string", "priority": 1, "jsonPath": ".status.keyPrefix"},
            _REASON_COLUMN,
        ],
    )
    mg = _crd(
        "ModelGroup",
        "modelgroups",
        "mg",
        model_group_spec(),
        _status({"deployments": {"type": "integer", "description": "Ready deployments serving it."}}),
        [
            {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy"},
            {"name": "Fallbacks", "type": "string", "jsonPath": ".spec.fallbacks"},
            {"name": "Deployments", "type": "integer", "jsonPath": ".status.deployments"},
            _condition_column("Ready"),
            _REASON_COLUMN,
        ],
    )
    from ._identity_crd import identity_binding_crd

    return {
        "modeldeployments.yaml": md,
        "apikeys.yaml": ak,
        "modelgroups.yaml": mg,
        "identitybindings.yaml": identity_binding_crd(),
    }


def render_yaml(doc: Schema) -> str:
    header = "# Generated by `python -m kubellm.operator._crds` from operator/_crds.py: do not edit.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


_ROOT = Path(__file__).resolve().parent.parent
#: Where the CRDs are written: the top-level folder, and the copy the Helm chart ships.
OUTPUT_DIRS = (_ROOT / "crds", _ROOT / "charts" / "kubellm" / "files" / "crds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write or check crds/*.yaml and the chart's copy")
    parser.add_argument(
        "--dir", action="append", help="output folder (repeatable; default: crds/ and the chart)"
    )
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for out in [Path(d) for d in args.dir] if args.dir else OUTPUT_DIRS:
        for name, doc in crds().items():
            path, text = out / name, render_yaml(doc)
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path))
            else:
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print("stale (run python -m kubellm.operator._crds):", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
