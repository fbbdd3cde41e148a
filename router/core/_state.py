"""A loaded config, compiled into what the request path reads.

A :class:`RouterState` is immutable once built. Hot reload builds a new one
and swaps a single reference, so a request that started on the old state
finishes on it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import _redact as redact
from ..config._modes import deployment_modes, ordered
from ..config._modes import serves as serves_modes
from ..config._schema import (
    ConfigError,
    DeploymentConfig,
    KeyConfig,
    ModelGroupConfig,
    RouterConfig,
    TeamConfig,
)
from ..guardrails import Guard, compile_guardrails
from ..metering._limits import LimitRule, rule
from ..providers import Operation, Provider, get_provider


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(slots=True)
class Deployment:
    config: DeploymentConfig
    provider: Provider
    api_key: str | None
    #: ``config.name``, read on every request.
    name: str = field(init=False)
    #: The deployment's limits, or None when it has none.
    limit_rule: LimitRule | None = field(init=False)
    #: What it serves (see :mod:`._modes`), and whether its config said so.
    modes: frozenset[str] = field(init=False)
    explicit_mode: bool = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.config.name
        self.limit_rule = rule(f"deployment:{self.name}", self.config.limits)
        self.modes, self.explicit_mode = deployment_modes(self.config)

    def serves_mode(self, operation: Operation) -> bool:
        return serves_modes(self.modes, self.explicit_mode, operation)


@dataclass(slots=True)
class ModelGroup:
    name: str
    deployments: list[Deployment]
    settings: ModelGroupConfig

    #: The deployments by priority tier, the lowest ``priority`` first; computed once.
    tiers: list[list[Deployment]] = field(init=False)
    #: Some deployment opted in to the response cache.
    caches: bool = field(init=False)

    def __post_init__(self) -> None:
        by_tier: dict[int, list[Deployment]] = {}
        for dep in self.deployments:
            by_tier.setdefault(dep.config.priority, []).append(dep)
        self.tiers = [by_tier[t] for t in sorted(by_tier)]
        self.caches = any(dep.config.cache for dep in self.deployments)

    def speaks(self, operation: Operation) -> bool:
        """Some deployment that takes ``operation`` (its mode) serves it natively: an audio-only
        OpenAI deployment beside a chat one does not make the group speak Responses."""
        return any(
            dep.serves_mode(operation) and dep.provider.speaks(operation, dep.config)
            for dep in self.deployments
        )

    @property
    def modes(self) -> list[str]:
        """What the group's deployments serve, as ``/v1/models`` lists it."""
        return ordered(m for dep in self.deployments for m in dep.modes)


@dataclass(slots=True)
class Team:
    """A ``teams`` entry: limits, budget and models its keys share (they nest in the key's own)."""

    config: TeamConfig
    limit_rule: LimitRule | None = field(init=False)

    def __post_init__(self) -> None:
        self.limit_rule = rule(self.scope, self.config.limits)

    @property
    def scope(self) -> str:
        """Its limits' and budget's scope in the shared store (one Redis Cluster slot of its own)."""
        return f"team:{self.config.name}"

    def may_use(self, group: str) -> bool:
        return not self.config.models or group in self.config.models


@dataclass(slots=True)
class VirtualKey:
    config: KeyConfig
    key_hash: bytes
    #: The team its ``team`` names, when the config has one of that name (else only a label).
    team: Team | None = None
    #: The key's limits, or None when it has none.
    limit_rule: LimitRule | None = field(init=False)

    def __post_init__(self) -> None:
        self.limit_rule = rule(f"key:{self.config.name}", self.config.limits)

    def may_use(self, group: str) -> bool:
        return self.refuses(group) is None

    def refuses(self, group: str) -> str | None:
        """Who forbids this key ``group`` (the key or its team), or None when both allow it."""
        if self.config.models and group not in self.config.models:
            return f"API key {self.config.name!r}"
        if self.team is not None and not self.team.may_use(group):
            return f"team {self.team.config.name!r} of API key {self.config.name!r}"
        return None


@dataclass(slots=True)
class RouterState:
    config: RouterConfig
    version: str
    groups: dict[str, ModelGroup]
    master_key_hash: bytes | None
    keys: dict[bytes, VirtualKey] = field(default_factory=dict)
    #: The config's guardrails, compiled, by name.
    guardrails: dict[str, Guard] = field(default_factory=dict)
    #: Teams by name.
    teams: dict[str, Team] = field(default_factory=dict)
    #: Bearer JWTs are accepted: with identities configured nobody is anonymous, keys or not.
    identities: bool = field(init=False)

    def __post_init__(self) -> None:
        self.identities = self.config.settings.identity.enabled or bool(self.config.identity_bindings)

    @property
    def auth_required(self) -> bool:
        return self.master_key_hash is not None or bool(self.keys) or self.identities

    def find_key(self, presented: str) -> tuple[bool, VirtualKey | None]:
        """(is_master, virtual_key) for a presented bearer token, comparing hashes in constant time."""
        digest = hashlib.sha256(presented.encode()).digest()
        if self.master_key_hash is not None and hmac.compare_digest(digest, self.master_key_hash):
            return True, None
        # The dict lookup is on a SHA-256 of the secret, which leaks nothing useful through timing.
        return False, self.keys.get(digest)


def changed_deployments(old: RouterState, new: RouterState) -> list[str]:
    """Deployments of ``new`` whose credential or settings differ from ``old``'s: what the health
    tracker learnt about them (a rejected credential) no longer holds."""
    before = {d.name: d for g in old.groups.values() for d in g.deployments}
    return [
        d.name
        for g in new.groups.values()
        for d in g.deployments
        if d.name in before and (before[d.name].api_key != d.api_key or before[d.name].config != d.config)
    ]


def _credential(dep: DeploymentConfig, where: str) -> str | None:
    if dep.api_key is not None:
        return dep.api_key
    if dep.api_key_env is not None:
        value = os.environ.get(dep.api_key_env)
        if not value:
            raise ConfigError(f"{where}.apiKeyEnv: environment variable {dep.api_key_env} is not set")
        return value
    if dep.api_key_file is not None:
        try:
            return Path(dep.api_key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.apiKeyFile: cannot read {dep.api_key_file}: {exc.strerror}") from None
    return None


def build_state(config: RouterConfig) -> RouterState:
    """Compile a validated config; raises :class:`ConfigError` naming the field on failure."""
    members: dict[str, list[Deployment]] = {}
    for i, dep in enumerate(config.deployments):
        provider = get_provider(dep.provider)
        credential = _credential(dep, f"deployments[{i}]")
        problem = provider.check_deployment(dep, credential)
        if problem:
            raise ConfigError(f"deployments[{i}].{problem}")
        # Registered before the first request, so no error or log line can ever carry them.
        redact.remember(provider.credentials(dep, credential))
        members.setdefault(dep.model, []).append(Deployment(dep, provider, credential))
    settings = {g.name: g for g in config.model_groups}
    groups = {
        name: ModelGroup(name, deps, settings.get(name) or ModelGroupConfig(name=name))
        for name, deps in members.items()
    }
    for group_settings in config.model_groups:
        for alias in group_settings.aliases:
            if alias in groups:
                raise ConfigError(f"modelGroups[{group_settings.name}].aliases: {alias!r} is already a model")
            if group_settings.name in groups:
                groups[alias] = groups[group_settings.name]

    master: bytes | None = None
    if config.settings.master_key_hash:
        master = bytes.fromhex(config.settings.master_key_hash)
    elif os.environ.get(config.settings.master_key_env):
        master = hashlib.sha256(os.environ[config.settings.master_key_env].encode()).digest()

    teams = {t.name: Team(t) for t in config.teams}
    keys: dict[bytes, VirtualKey] = {}
    for i, key in enumerate(config.keys):
        if key.key_hash is not None:
            digest = bytes.fromhex(key.key_hash)
        else:
            assert key.key_env is not None
            secret = os.environ.get(key.key_env)
            if not secret:
                raise ConfigError(f"keys[{i}].keyEnv: environment variable {key.key_env} is not set")
            digest = hashlib.sha256(secret.encode()).digest()
        keys[digest] = VirtualKey(key, digest, teams.get(key.team or ""))
    guards = compile_guardrails(config)
    return RouterState(config, config.version, groups, master, keys, guards, teams=teams)
