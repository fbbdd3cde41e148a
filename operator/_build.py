"""Pure builders: custom resources (+ the Secrets they reference) -> a validated RouterConfig.

Nothing here talks to the cluster, so ``kubellm render`` and the tests run the
exact code the operator runs. Every resource gets a :class:`Verdict`. An unusable
one (missing Secret, provider field missing, a fallback to a model nobody serves,
an expired key…) is left out of the config with a readable reason, and the rest
keeps serving. The result is validated as a whole by the router's own schema; a
document that fails that is never returned (:class:`BuildError`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError

from kubellm.router.config import (
    ConfigError,
    DeploymentConfig,
    GuardrailConfig,
    KeyConfig,
    ModelGroupConfig,
    RouterConfig,
    RouterSettings,
    find_cycle,
    parse_config,
    validation_message,
)

from ._crds import API_VERSION, PROVIDER_RULES

#: (namespace, name) of a Secret -> its decoded data. A Secret that is absent does not exist.
Secrets = Mapping[tuple[str, str], Mapping[str, str]]
Body = Mapping[str, Any]

KEY_DATA = "key"
MIN_KEY_LENGTH = 16

_PROVIDER_FIELDS: dict[str, tuple[str, ...]] = {
    "azure": ("apiVersion", "baseUrl"),
    "bedrock": ("region",),
    "vertex": ("project", "location"),
    "openai-compatible": ("baseUrl",),
    "huggingface-endpoint": ("baseUrl",),
}
_PROVIDER_MESSAGES = dict(zip(_PROVIDER_FIELDS, (m for _, m in PROVIDER_RULES), strict=False))
_PROVIDER_MESSAGES["huggingface-endpoint"] = _PROVIDER_MESSAGES["openai-compatible"]


class BuildError(ConfigError):
    """The assembled document failed the router schema: never published."""


class Invalid(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass(frozen=True, slots=True, order=True)
class Ref:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    @property
    def config_name(self) -> str:
        """The name in the router config (deployment name, key name): NAMESPACE/NAME."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one resource: ``ok`` means it is in the rendered config."""

    ok: bool
    reason: str
    message: str
    #: ApiKey only: Active, Expired, BudgetExceeded or Disabled.
    state: str | None = None
    #: ModelGroup only: deployments serving it.
    deployments: int | None = None


@dataclass(frozen=True, slots=True)
class BuildResult:
    config: RouterConfig
    verdicts: dict[Ref, Verdict]
    #: Earliest future time (Unix seconds) at which the output changes by itself (a key expiring).
    next_change: float | None = None
    #: ApiKey name -> the hex SHA-256 of its key (to compare with the ledger and status).
    key_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.config.version

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.config.model_dump(mode="json", by_alias=True)
        return doc

    def rejected(self) -> dict[Ref, Verdict]:
        return {ref: v for ref, v in self.verdicts.items() if not v.ok}


def ref_of(kind: str, body: Body) -> Ref:
    meta = body.get("metadata") or {}
    return Ref(kind, str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def _sort_key(body: Body) -> tuple[str, str, str]:
    """Oldest first (the first resource to claim a name keeps it), then by namespace/name."""
    meta = body.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("namespace") or ""), str(meta.get("name")))


def _spec(body: Body) -> dict[str, Any]:
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise Invalid("InvalidSpec", "spec is missing or not an object")
    return spec


def _pydantic(model: type[Any], doc: dict[str, Any]) -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise Invalid("InvalidSpec", f"spec: {validation_message(exc, doc)}") from None


def _decimal(value: Any, where: str) -> Decimal:
    try:
        out = Decimal(str(value))
    except InvalidOperation:
        raise Invalid("InvalidSpec", f'{where}: {value!r} is not a decimal number (write "2.50")') from None
    if not out.is_finite() or out < 0:
        raise Invalid("InvalidSpec", f"{where}: must be a number of 0 or more, got {value!r}")
    return out


def _secret_value(secrets: Secrets, namespace: str, name: str, key: str, where: str) -> str:
    data = secrets.get((namespace, name))
    if data is None:
        raise Invalid("SecretNotFound", f"{where}: Secret {namespace}/{name} does not exist")
    if key not in data:
        keys = ", ".join(sorted(data)) or "none"
        raise Invalid(
            "SecretKeyNotFound", f"{where}: Secret {namespace}/{name} has no key {key!r} (has: {keys})"
        )
    value = data[key].strip()
    if not value:
        raise Invalid("SecretKeyNotFound", f"{where}: key {key!r} of Secret {namespace}/{name} is empty")
    return value


def referenced_secrets(
    deployments: Iterable[Body] = (), api_keys: Iterable[Body] = ()
) -> set[tuple[str, str]]:
    """(namespace, name) of every Secret the resources read."""
    out: set[tuple[str, str]] = set()
    for body in deployments:
        ref = ((body.get("spec") or {}).get("credentials") or {}).get("secretKeyRef") or {}
        if ref.get("name"):
            out.add((ref_of("ModelDeployment", body).namespace, str(ref["name"])))
    for body in api_keys:
        out.add((ref_of("ApiKey", body).namespace, key_secret_name(body)))
    return out


# --------------------------------------------------------------------------- deployments


def deployment_config(body: Body, secrets: Secrets) -> DeploymentConfig:
    """One ModelDeployment as a router deployment; raises :class:`Invalid`."""
    ref = ref_of("ModelDeployment", body)
    spec = _spec(body)
    provider = spec.get("provider")
    missing = [f for f in _PROVIDER_FIELDS.get(str(provider), ()) if not spec.get(f)]
    if missing:
        raise Invalid("ProviderFieldMissing", _PROVIDER_MESSAGES[str(provider)])
    weight = spec.get("weight", 1)
    if isinstance(weight, int | float) and weight < 0:
        raise Invalid("InvalidSpec", "weight must be 0 or more")
    doc: dict[str, Any] = {"name": ref.config_name}
    copied = (
        "model", "provider", "mode", "upstreamModel", "baseUrl", "apiVersion", "region", "project",
        "location", "weight", "priority", "limits", "contextWindow", "timeouts", "cache", "logPayloads",
        "dropUnsupportedParams", "headers", "mock",
    )  # fmt: skip
    for key in copied:
        if spec.get(key) is not None:
            doc[key] = spec[key]
    pricing = spec.get("pricing") or {}
    if not isinstance(pricing, dict):
        raise Invalid("InvalidSpec", "pricing must be an object")
    doc["pricing"] = {k: _decimal(v, f"pricing.{k}") for k, v in pricing.items() if v is not None}
    creds = spec.get("credentials")
    if creds is not None:
        sources = [k for k in ("secretKeyRef", "env", "file") if isinstance(creds, dict) and creds.get(k)]
        if len(sources) != 1:
            raise Invalid("InvalidSpec", "credentials: set exactly one of secretKeyRef, env, file")
        if sources[0] == "secretKeyRef":
            sk = creds["secretKeyRef"]
            if not isinstance(sk, dict) or not sk.get("name") or not sk.get("key"):
                raise Invalid("InvalidSpec", "credentials.secretKeyRef needs name and key")
            where = "credentials.secretKeyRef"
            doc["apiKey"] = _secret_value(secrets, ref.namespace, str(sk["name"]), str(sk["key"]), where)
        elif sources[0] == "env":
            doc["apiKeyEnv"] = creds["env"]
        else:
            doc["apiKeyFile"] = creds["file"]
    config: DeploymentConfig = _pydantic(DeploymentConfig, doc)
    from kubellm.router.providers import get_provider

    check = getattr(get_provider(config.provider), "check_deployment", None)
    problem = check(config) if check is not None else None
    if problem:
        # "provider: ..." is an optional dependency missing from the image, not a missing field.
        reason = "ProviderExtraMissing" if problem.startswith("provider:") else "ProviderFieldMissing"
        raise Invalid(reason, f"spec.{problem}")
    return config


# --------------------------------------------------------------------------- keys


def key_secret_name(body: Body) -> str:
    """The Secret holding an ApiKey's key: spec.secretName, default NAME-apikey."""
    spec = body.get("spec") or {}
    return str(spec.get("secretName") or f"{ref_of('ApiKey', body).name}-apikey")


def parse_time(value: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise Invalid("InvalidSpec", f"expiresAt: {value!r} is not an RFC 3339 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    """The non-secret start of a key shown in status and logs (``sk-`` and five characters)."""
    return key[:8]


def budget_amount(body: Body) -> Decimal | None:
    budget = (body.get("spec") or {}).get("budget")
    if not isinstance(budget, dict) or budget.get("amountUsd") is None:
        return None
    return _decimal(budget["amountUsd"], "budget.amountUsd")


def budget_period(body: Body) -> str:
    budget = (body.get("spec") or {}).get("budget") or {}
    return str(budget.get("period") or "monthly")


def _key_config(
    body: Body, secrets: Secrets, now: datetime, spend: Mapping[str, Decimal]
) -> tuple[KeyConfig, str, datetime | None]:
    """(config, state, expiry) for one ApiKey; raises :class:`Invalid`."""
    from kubellm.router.metering import validate_period

    ref = ref_of("ApiKey", body)
    spec = _spec(body)
    expires = parse_time(spec["expiresAt"]) if spec.get("expiresAt") else None
    if expires is not None and now >= expires:
        raise Invalid("Expired", f"the key expired at {expires.isoformat()}; it was removed from the routers")
    amount = budget_amount(body)
    if amount is not None:
        try:
            validate_period(budget_period(body))
        except ValueError as exc:
            raise Invalid("InvalidSpec", f"budget.period: {exc}") from None
    secret = key_secret_name(body)
    data = secrets.get((ref.namespace, secret))
    if data is None or not data.get(KEY_DATA, "").strip():
        raise Invalid(
            "KeySecretMissing",
            f"Secret {ref.namespace}/{secret} holds no key {KEY_DATA!r} yet (the operator generates one)",
        )
    key = data[KEY_DATA].strip()
    if len(key) < MIN_KEY_LENGTH:
        raise Invalid(
            "KeyTooShort", f"the key in Secret {ref.namespace}/{secret} is shorter than {MIN_KEY_LENGTH}"
        )
    state = "Active"
    if spec.get("disabled"):
        state = "Disabled"
    elif amount is not None and spend.get(ref.config_name, Decimal(0)) >= amount:
        state = "BudgetExceeded"
    doc: dict[str, Any] = {
        "name": ref.config_name,
        "keyHash": key_hash(key),
        "keyPrefix": key_prefix(key),
        "models": spec.get("models") or [],
        "limits": spec.get("limits") or {},
        "disabled": state == "Disabled",
        "cache": bool(spec.get("cache")),
    }
    # The routers enforce the budget themselves (exactly, across replicas, with a budget_exceeded
    # error), so a spent key stays enabled here and only its state says so. Expired keys are
    # dropped by the operator at expiresAt; the field is rendered too for routers that enforce it.
    if expires is not None:
        doc["expiresAt"] = expires.isoformat()
    if amount is not None:
        doc["budget"] = {"amountUsd": str(amount), "period": budget_period(body)}
    for meta in ("owner", "team"):
        if spec.get(meta):
            doc[meta] = str(spec[meta])
    if spec.get("guardrails"):
        doc["guardrails"] = spec["guardrails"]
    config: KeyConfig = _pydantic(KeyConfig, doc)
    return config, state, expires


# --------------------------------------------------------------------------- groups


def group_name(body: Body) -> str:
    return str((body.get("spec") or {}).get("model") or ref_of("ModelGroup", body).name)


def _group_config(body: Body) -> ModelGroupConfig:
    spec = _spec(body)
    doc = {"name": group_name(body)}
    copied = (
        "strategy", "fallbacks", "contextWindowFallbacks", "contentPolicyFallbacks", "aliases", "guardrails",
    )  # fmt: skip
    for key in copied:
        if spec.get(key) is not None:
            doc[key] = spec[key]
    if spec.get("latencyTolerance") is not None:
        doc["latencyTolerance"] = spec["latencyTolerance"]
    config: ModelGroupConfig = _pydantic(ModelGroupConfig, doc)
    targets = [*config.fallbacks, *config.context_window_fallbacks, *config.content_policy_fallbacks]
    if config.name in targets:
        raise Invalid("InvalidSpec", "a model group cannot fall back to itself")
    return config


def _targets(group: ModelGroupConfig) -> list[str]:
    return [*group.fallbacks, *group.context_window_fallbacks, *group.content_policy_fallbacks]


def _check_guardrails(names: list[str], known: set[str]) -> None:
    missing = [n for n in names if n not in known]
    if missing:
        raise Invalid(
            "GuardrailNotFound",
            f"no guardrail named {', '.join(repr(n) for n in missing)} in the operator's settings file",
        )


def _groups(
    bodies: list[Body], served: dict[str, int], verdicts: dict[Ref, Verdict], known: set[str]
) -> list[ModelGroupConfig]:
    kept: dict[str, tuple[Ref, ModelGroupConfig]] = {}
    claimed: dict[str, Ref] = {}  # alias -> group that has it
    for body in sorted(bodies, key=_sort_key):
        ref = ref_of("ModelGroup", body)
        try:
            group = _group_config(body)
            _check_guardrails(group.guardrails, known)
            if group.name in kept:
                raise Invalid(
                    "Conflict", f"model group {group.name!r} is already configured by {kept[group.name][0]}"
                )
            if not served.get(group.name):
                raise Invalid("NoDeployments", f"no ready ModelDeployment serves {group.name!r}")
            unserved = [t for t in _targets(group) if not served.get(t)]
            if unserved:
                names = ", ".join(repr(t) for t in dict.fromkeys(unserved))
                raise Invalid("FallbackNotServed", f"no ready ModelDeployment serves the fallback {names}")
            for alias in group.aliases:
                if alias in served:
                    raise Invalid(
                        "AliasConflict", f"alias {alias!r} is already a model served by deployments"
                    )
                if alias in claimed:
                    raise Invalid("AliasConflict", f"alias {alias!r} is already used by {claimed[alias]}")
        except Invalid as bad:
            verdicts[ref] = Verdict(False, bad.reason, bad.message)
            continue
        kept[group.name] = (ref, group)
        claimed.update(dict.fromkeys(group.aliases, ref))
    # Break fallback loops: leave out the newest group on each loop until none is left.
    order = {name: i for i, name in enumerate(kept)}
    while True:
        cycle = find_cycle({name: _targets(g) for name, (_, g) in kept.items()})
        if not cycle:
            break
        victim = max(set(cycle), key=order.__getitem__)
        ref, _ = kept.pop(victim)
        verdicts[ref] = Verdict(
            False, "FallbackLoop", f"fallback loop {' -> '.join(cycle)}; left out to break it"
        )
    out = []
    for name, (ref, group) in sorted(kept.items()):
        count = served[name]
        verdicts[ref] = Verdict(
            True, "Rendered", f"configures {name!r} ({count} deployment(s))", deployments=count
        )
        out.append(group)
    return out


# --------------------------------------------------------------------------- the whole config


def build_config(
    deployments: Iterable[Body] = (),
    groups: Iterable[Body] = (),
    api_keys: Iterable[Body] = (),
    secrets: Secrets | None = None,
    *,
    settings: RouterSettings | Mapping[str, Any] | None = None,
    now: datetime | None = None,
    spend: Mapping[str, Decimal] | None = None,
    guardrails: Iterable[GuardrailConfig] = (),
    identity_bindings: Iterable[Body] = (),
) -> BuildResult:
    """Render the router config. ``spend`` maps key names (NAMESPACE/NAME) to the current period's
    spend; it only decides the BudgetExceeded state (the config does not depend on it).
    ``guardrails``: the platform's guardrail definitions (from the operator's settings file), which
    ModelGroups and ApiKeys name; a resource naming one that is not there is left out.
    ``identity_bindings``: IdentityBinding resources (see ``_identities``)."""
    from ._identities import identity_bindings as bindings_of

    guardrail_list = list(guardrails)
    known = {g.name for g in guardrail_list}
    secrets = secrets or {}
    now = now or datetime.now(UTC)
    spend = spend or {}
    verdicts: dict[Ref, Verdict] = {}

    rendered: list[DeploymentConfig] = []
    for body in sorted(deployments, key=lambda b: ref_of("ModelDeployment", b)):
        ref = ref_of("ModelDeployment", body)
        try:
            dep = deployment_config(body, secrets)
        except Invalid as bad:
            verdicts[ref] = Verdict(False, bad.reason, bad.message)
            continue
        rendered.append(dep)
        verdicts[ref] = Verdict(True, "Rendered", f"serves {dep.model!r} as deployment {dep.name!r}")
    served: dict[str, int] = {}
    for dep in rendered:
        served[dep.model] = served.get(dep.model, 0) + 1

    group_configs = _groups(list(groups), served, verdicts, known)

    keys: list[KeyConfig] = []
    hashes: dict[str, str] = {}
    owner_of_hash: dict[str, Ref] = {}
    next_change: float | None = None
    for body in sorted(api_keys, key=_sort_key):
        ref = ref_of("ApiKey", body)
        try:
            key, state, expires = _key_config(body, secrets, now, spend)
            _check_guardrails(key.guardrails, known)
            assert key.key_hash is not None
            if key.key_hash in owner_of_hash:
                raise Invalid(
                    "DuplicateKey", f"the same key is already used by {owner_of_hash[key.key_hash]}"
                )
        except Invalid as bad:
            expired = "Expired" if bad.reason == "Expired" else None
            verdicts[ref] = Verdict(False, bad.reason, bad.message, state=expired)
            continue
        owner_of_hash[key.key_hash] = ref
        hashes[key.name] = key.key_hash
        keys.append(key)
        if expires is not None:
            at = expires.timestamp()
            next_change = at if next_change is None else min(next_change, at)
        messages = {
            "Active": "the key is accepted by the routers",
            "Disabled": "disabled: every request with this key is rejected",
            "BudgetExceeded": "this period's budget is spent: the routers reject it until nextReset",
        }
        verdicts[ref] = Verdict(True, "Rendered", messages[state], state=state)
    keys.sort(key=lambda k: k.name)

    if isinstance(settings, RouterSettings):
        settings_doc: Any = settings.model_dump(mode="json", by_alias=True)
    else:
        settings_doc = dict(settings or {})
    try:
        parsed_settings = RouterSettings.model_validate(settings_doc)
    except ValidationError as exc:
        raise BuildError(f"settings: {validation_message(exc, settings_doc)}") from None
    bindings = bindings_of(identity_bindings, parsed_settings, known, verdicts)
    doc = {
        "deployments": [d.model_dump(mode="json", by_alias=True) for d in rendered],
        "modelGroups": [g.model_dump(mode="json", by_alias=True) for g in group_configs],
        "keys": [k.model_dump(mode="json", by_alias=True) for k in keys],
        "identityBindings": [b.model_dump(mode="json", by_alias=True) for b in bindings],
        "guardrails": [g.model_dump(mode="json", by_alias=True, exclude_none=True) for g in guardrail_list],
        "settings": settings_doc,
    }
    try:
        config = parse_config(doc, source="rendered config")
    except ConfigError as err:
        raise BuildError(err.message) from None
    return BuildResult(config, dict(sorted(verdicts.items())), next_change, hashes)


def is_kind(doc: Any, kind: str) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == kind and doc.get("apiVersion") == API_VERSION
