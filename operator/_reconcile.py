"""The reconciler: one level-triggered loop that renders the whole router config.

Any relevant change (a resource, a referenced Secret, a key expiring, a poll of
the usage ledger) wakes the loop. Each pass lists the three kinds from the API
server, reads the referenced Secrets (cached, kept fresh by the Secret watch),
builds the config with :func:`._build.build_config`, applies it to the config
Secret only when its content hash changed, and patches each resource's status
only where it differs. Passes are serialized and bursts of events coalesce into
one pass, so the outcome depends on the cluster's state, never on event order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from kubellm.router.config import GuardrailConfig, RouterSettings
from kubellm.router.kube import CONFIG_KEY, KubeClient, KubeError, secret_data, secret_path

from ._build import (
    KEY_DATA,
    Body,
    BuildError,
    BuildResult,
    Ref,
    budget_period,
    build_config,
    key_secret_name,
    ref_of,
    referenced_secrets,
)
from ._crds import API_VERSION
from ._identities import IdentityUsage, binding_status
from ._keys import MANAGED_LABELS, KeySecretConflict, ensure_key_secret
from ._status import Health, KeyUsage, api_key_status, deployment_status, group_status, status_patch
from ._usage import UsageReader

log = logging.getLogger("kubellm.operator")

PLURALS = {
    "ModelDeployment": "modeldeployments",
    "ModelGroup": "modelgroups",
    "ApiKey": "apikeys",
    "IdentityBinding": "identitybindings",
}
VERSION_ANNOTATION = "kubellm.io/config-version"
#: Metadata that changes without changing what a resource asks for.
_IGNORED_ANNOTATIONS = ("kopf.zalando.org/", "operator.kubellm.io/", "kubectl.kubernetes.io/")
SecretKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Options:
    #: The operator's namespace: the config Secret (and the leader Lease) live there.
    namespace: str
    #: Namespaces whose resources are rendered; empty means all.
    watch_namespaces: tuple[str, ...] = ()
    config_secret: str = "kubellm-router-config"
    settings: RouterSettings = field(default_factory=RouterSettings)
    #: The platform's guardrails (the settings file's ``guardrails``), named by groups and keys.
    guardrails: tuple[GuardrailConfig, ...] = ()
    #: How often usage and breaker state are read and statuses refreshed.
    poll_interval: float = 10.0
    #: Events within this window are coalesced into one pass.
    debounce: float = 0.02


class SecretCache:
    """Decoded data of the Secrets the resources reference (None: known not to exist).

    The Secret watch keeps entries fresh; a GET fills an entry that is missing. A GET's
    answer is dropped if an event for the same Secret arrived while it was in flight."""

    def __init__(self) -> None:
        self._data: dict[SecretKey, dict[str, str] | None] = {}
        self._epoch: dict[SecretKey, int] = {}
        self._pending: set[SecretKey] = set()

    def event(self, key: SecretKey, body: Mapping[str, Any] | None) -> bool:
        """Apply a watch event; True when the Secret is one we follow."""
        self._epoch[key] = self._epoch.get(key, 0) + 1
        if key not in self._data and key not in self._pending:
            return False
        self._data[key] = secret_data(body) if body is not None else None
        return True

    async def get_many(self, client: KubeClient, keys: set[SecretKey]) -> dict[SecretKey, dict[str, str]]:
        for key in set(self._data) - keys:
            del self._data[key]  # no longer referenced
        missing = [k for k in keys if k not in self._data]

        async def fetch(key: SecretKey) -> None:
            epoch = self._epoch.get(key, 0)
            self._pending.add(key)
            try:
                body: Mapping[str, Any] | None = await client.get(secret_path(*key))
            except KubeError as err:
                if err.status != 404:
                    raise
                body = None
            finally:
                self._pending.discard(key)
            if self._epoch.get(key, 0) == epoch:  # else a newer watch event already stored it
                self._data[key] = secret_data(body) if body is not None else None

        await asyncio.gather(*(fetch(k) for k in missing))
        return {k: v for k in keys if (v := self._data.get(k)) is not None}


def fingerprint(body: Body) -> tuple[Any, ...]:
    """What a resource asks for; status and bookkeeping annotations excluded."""
    meta = body.get("metadata") or {}
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith(_IGNORED_ANNOTATIONS)
    }
    return (
        meta.get("uid"),
        meta.get("generation"),
        orjson.dumps(body.get("spec"), option=orjson.OPT_SORT_KEYS),
        orjson.dumps(annotations, option=orjson.OPT_SORT_KEYS),
        meta.get("deletionTimestamp"),
    )


class Reconciler:
    def __init__(self, client: KubeClient, options: Options, usage: UsageReader | None = None) -> None:
        self.client = client
        self.options = options
        self.usage_reader = usage
        self.secrets = SecretCache()
        self.published: str | None = None
        self.last: BuildResult | None = None
        self.usage: dict[str, KeyUsage] = {}
        self.identity_usage = IdentityUsage()
        self.health: dict[str, Health] | None = None if usage is None else {}
        self.passes = 0
        self._wake = asyncio.Event()
        self._seen: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self._task: asyncio.Task[None] | None = None
        self._next_poll = 0.0

    # ---- triggers -----------------------------------------------------------

    def trigger(self) -> None:
        self._wake.set()

    def observe(self, kind: str, event_type: str | None, body: Body) -> None:
        """A watch event of one of our kinds: wake the loop if what it asks for changed."""
        ref = ref_of(kind, body)
        key = (kind, ref.namespace, ref.name)
        if event_type == "DELETED":
            self._seen.pop(key, None)
            self.trigger()
            return
        fp = fingerprint(body)
        if self._seen.get(key) != fp:
            self._seen[key] = fp
            self.trigger()

    def observe_secret(self, event_type: str | None, body: Body) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if self.secrets.event(key, None if event_type == "DELETED" else body):
            self.trigger()

    # ---- the loop -----------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="kubellm-reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.usage_reader is not None:
            await self.usage_reader.close()

    def _timeout(self) -> float:
        now = time.time()
        wake = self._next_poll
        change = self.last.next_change if self.last is not None else None
        if change is not None and change + 0.001 > now:  # a key expiring; never a past instant
            wake = min(wake, change + 0.001)
        return max(0.0, wake - now)

    async def run(self) -> None:
        backoff = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._timeout())
            await asyncio.sleep(self.options.debounce)
            self._wake.clear()
            poll = time.time() >= self._next_poll
            try:
                await self.reconcile_once(poll=poll)
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the loop die; the next pass starts from scratch
                backoff = min(10.0, max(0.2, backoff * 2))
                log.error("reconcile failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                self.trigger()
            if poll:
                self._next_poll = time.time() + self.options.poll_interval

    async def list_kind(self, kind: str) -> list[dict[str, Any]]:
        plural = PLURALS[kind]
        if not self.options.watch_namespaces:
            paths = [f"/apis/{API_VERSION}/{plural}"]
        else:
            paths = [f"/apis/{API_VERSION}/namespaces/{ns}/{plural}" for ns in self.options.watch_namespaces]
        lists = await asyncio.gather(*(self.client.get(p) for p in paths))
        items: list[dict[str, Any]] = []
        for doc in lists:
            items += doc.get("items") or []
        return items

    async def reconcile_once(self, *, poll: bool = False) -> BuildResult | None:
        """One full pass; returns what was built (None when the build failed)."""
        deployments, groups, api_keys, bindings = await asyncio.gather(
            self.list_kind("ModelDeployment"),
            self.list_kind("ModelGroup"),
            self.list_kind("ApiKey"),
            self.list_kind("IdentityBinding"),
        )
        secrets = await self.secrets.get_many(self.client, referenced_secrets(deployments, api_keys))
        if poll:
            await self.refresh_facts(deployments, api_keys)
            await self.identity_usage.refresh(self.usage_reader, bindings)
        spend: dict[str, Decimal] = {name: u.spend for name, u in self.usage.items()}
        try:
            result = build_config(
                deployments,
                groups,
                api_keys,
                secrets,
                settings=self.options.settings,
                spend=spend,
                guardrails=self.options.guardrails,
                identity_bindings=bindings,
            )
        except BuildError as err:
            log.error("rendered config is invalid, still serving %s: %s", self.published, err.message)
            return None
        self.passes += 1
        self.last = result
        await self.publish(result)
        await self.write_statuses(deployments, groups, api_keys, secrets, result, bindings)
        await self.repair_key_secrets(api_keys, result)
        return result

    async def repair_key_secrets(self, api_keys: list[dict[str, Any]], result: BuildResult) -> None:
        """Write a key for every ApiKey whose Secret has none (deleted, or never created because the
        kopf handler failed); the Secret's watch event then triggers the next pass."""
        for body in api_keys:
            verdict = result.verdicts[ref_of("ApiKey", body)]
            if verdict.reason != "KeySecretMissing" or (body.get("metadata") or {}).get("deletionTimestamp"):
                continue
            try:
                await ensure_key_secret(self.client, body)
            except KubeError as err:
                if err.status != 409:  # 409: someone (the kopf handler) wrote it meanwhile
                    log.warning("cannot write the key of %s: %s", ref_of("ApiKey", body), err)
            except KeySecretConflict as err:
                log.warning("%s", err)

    async def refresh_facts(self, deployments: list[dict[str, Any]], api_keys: list[dict[str, Any]]) -> None:
        if self.usage_reader is None:
            return
        keys = [(ref_of("ApiKey", b).config_name, budget_period(b)) for b in api_keys]
        names = [ref_of("ModelDeployment", b).config_name for b in deployments]
        try:
            self.usage = await self.usage_reader.key_usage(keys)
            self.health = await self.usage_reader.breakers(names)
        except Exception as exc:  # Redis down: keep the last facts
            log.warning("cannot read usage and health from Redis: %s: %s", type(exc).__name__, exc)

    # ---- writes -------------------------------------------------------------

    async def publish(self, result: BuildResult) -> bool:
        """Apply the config to the config Secret if it differs; True when written."""
        if result.version == self.published:
            return False
        ns, name = self.options.namespace, self.options.config_secret
        payload = orjson.dumps(result.document(), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
        encoded = base64.b64encode(payload).decode()
        meta: dict[str, Any] = {
            "annotations": {VERSION_ANNOTATION: result.version},
            "labels": dict(MANAGED_LABELS),
        }
        try:
            current = await self.client.get(secret_path(ns, name))
        except KubeError as err:
            if err.status != 404:
                raise
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": name, "namespace": ns, **meta},
                "data": {CONFIG_KEY: encoded},
            }
            await self.client.create(secret_path(ns), body)
        else:
            cmeta = current.get("metadata") or {}
            same = (cmeta.get("annotations") or {}).get(VERSION_ANNOTATION) == result.version
            if same and (current.get("data") or {}).get(CONFIG_KEY) == encoded:
                self.published = result.version
                return False
            meta["resourceVersion"] = cmeta.get("resourceVersion")
            await self.client.patch(secret_path(ns, name), {"metadata": meta, "data": {CONFIG_KEY: encoded}})
        log.info(
            "published config %s -> %s (%d deployments, %d groups, %d keys; %d resources left out)",
            self.published,
            result.version,
            len(result.config.deployments),
            len(result.config.model_groups),
            len(result.config.keys),
            len(result.rejected()),
        )
        self.published = result.version
        return True

    async def write_statuses(
        self,
        deployments: list[dict[str, Any]],
        groups: list[dict[str, Any]],
        api_keys: list[dict[str, Any]],
        secrets: Mapping[SecretKey, Mapping[str, str]],
        result: BuildResult,
        bindings: list[dict[str, Any]] | None = None,
    ) -> int:
        now = datetime.now(UTC)
        patches: list[tuple[Ref, dict[str, Any]]] = []

        def add(ref: Ref, body: Body, desired: dict[str, Any]) -> None:
            patch = status_patch(body.get("status"), desired)
            if patch is not None:
                patches.append((ref, patch))

        for body in deployments:
            ref = ref_of("ModelDeployment", body)
            verdict = result.verdicts[ref]
            health = None if self.health is None else self.health.get(ref.config_name, Health())
            add(ref, body, deployment_status(body, verdict, ref.config_name, health, now))
        for body in groups:
            ref = ref_of("ModelGroup", body)
            add(ref, body, group_status(body, result.verdicts[ref], now))
        for body in api_keys:
            ref = ref_of("ApiKey", body)
            key = (secrets.get((ref.namespace, key_secret_name(body))) or {}).get(KEY_DATA)
            usage = self.usage.get(ref.config_name) if self.usage_reader is not None else None
            add(ref, body, api_key_status(body, result.verdicts[ref], key, usage, now))
        rendered = {b.name: b for b in result.config.identity_bindings}
        for body in bindings or ():
            ref = ref_of("IdentityBinding", body)
            spent = self.identity_usage.of(ref.config_name, rendered) if self.usage_reader else None
            spends, start = spent if spent is not None else (None, None)
            add(ref, body, binding_status(body, result.verdicts[ref], spends, start, now))

        limit = asyncio.Semaphore(8)

        async def send(ref: Ref, patch: dict[str, Any]) -> None:
            path = f"/apis/{API_VERSION}/namespaces/{ref.namespace}/{PLURALS[ref.kind]}/{ref.name}/status"
            async with limit:
                try:
                    await self.client.patch(path, {"status": patch})
                except KubeError as err:
                    if err.status != 404:  # deleted meanwhile: nothing to report
                        log.warning("status of %s not written: %s", ref, err)

        await asyncio.gather(*(send(ref, patch) for ref, patch in patches))
        return len(patches)
