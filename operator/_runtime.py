"""Running the operator (``kubellm operator``) and rendering offline (``kubellm render``).

kopf (the ``operator`` extra) is imported only to run the operator: rendering needs none of it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import socket
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from kubellm.router.config import ConfigError, GuardrailConfig, RouterSettings, validation_message
from kubellm.router.kube import KubeClient, KubeConfig, KubeError, auto_config

from ._build import Body, BuildResult, build_config, is_kind
from ._crds import GROUP, VERSION

if TYPE_CHECKING:
    import kopf

log = logging.getLogger("kubellm.operator")

FINALIZER = "kubellm.io/finalizer"
KOPF_PREFIX = "operator.kubellm.io"
PLURALS = ("modeldeployments", "modelgroups", "apikeys", "identitybindings")


async def wait_for_crds(client: KubeClient, *, interval: float = 1.0) -> None:
    """Return once the API server serves the four kinds, i.e. their CRDs are Established.

    Installed together with its CRDs (one `helm install`), the operator can start before the API
    server serves them; reconciling then fails (404, or 429 "storage is (re)initializing" just after
    discovery lists them). Discovery and a one-item list of each kind need no permission on
    CustomResourceDefinitions; a 403 on the list (namespaced RBAC) still means the kind is served.
    """
    waiting_logged = False
    while True:
        missing = await _kinds_not_served(client)
        if not missing:
            if waiting_logged:
                log.info("the API server serves %s/%s: starting", GROUP, VERSION)
            return
        if not waiting_logged:
            log.info("waiting for the API server to serve %s.%s (CRDs not Established yet)",
                     ", ".join(missing), GROUP)  # fmt: skip
            waiting_logged = True
        await asyncio.sleep(interval)


async def _kinds_not_served(client: KubeClient) -> list[str]:
    base = f"/apis/{GROUP}/{VERSION}"
    try:
        doc = await client.get(base)
    except KubeError:
        return list(PLURALS)  # 404 until the group exists; unreachable: the same, try again
    served = {str(r.get("name")) for r in doc.get("resources") or []}
    missing = [p for p in PLURALS if p not in served]
    for plural in PLURALS:
        if plural in missing:
            continue
        try:
            await client.get(f"{base}/{plural}", limit="1")
        except KubeError as exc:
            if exc.status != 403:
                missing.append(plural)
    return missing


def operator_settings(*, namespaced: bool = False) -> kopf.OperatorSettings:
    import kopf

    """Our own names for everything kopf stores on objects, and no kopf status fields.

    ``namespaced`` (explicit ``--watch-namespace`` list): kopf's cluster scanning is off, so the
    operator needs no permission on Namespace objects (the CRDs must exist when it starts)."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = namespaced
    settings.persistence.finalizer = FINALIZER
    # Not the bare "kubellm.io/" prefix: kopf ignores every annotation under its storage prefix
    # when diffing, and users' kubellm.io/rotate must count as a change.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Kubernetes Events for problems only
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    return settings


def connection_info(config: KubeConfig) -> kopf.ConnectionInfo:
    """kopf talks to the API server with the same credentials as our own client."""
    import kopf

    token = config.token
    if config.token_file:
        token = Path(config.token_file).read_text().strip()
    return kopf.ConnectionInfo(
        server=config.server,
        token=token,
        scheme="Bearer" if token else None,
        ca_path=config.ca_file if config.ca_data is None else None,
        ca_data=config.ca_data,
        insecure=config.insecure or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        default_namespace=config.namespace,
    )  # after a 401, kopf logs in again and so re-reads a rotated service-account token


def load_settings(path: str | None) -> RouterSettings:
    """The router ``settings`` block the operator puts into every rendered config."""
    if not path:
        return RouterSettings()
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("settings"), dict):
        doc = doc["settings"]  # a whole router config file (or settings + guardrails): take its settings
    try:
        return RouterSettings.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_message(exc, doc)}") from None


def load_guardrails(path: str | None) -> list[GuardrailConfig]:
    """The platform's guardrails (a router config file's ``guardrails`` list) that ModelGroups and
    ApiKeys refer to by name."""
    if not path:
        return []
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    items = doc.get("guardrails") if isinstance(doc, dict) else None
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"{path}: guardrails must be a list")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(GuardrailConfig.model_validate(item))
        except ValidationError as exc:
            raise ConfigError(f"{path}: guardrails[{i}]: {validation_message(exc, item)}") from None
    return out


@dataclass
class RunOptions:
    namespace: str | None = None
    watch_namespaces: tuple[str, ...] = ()
    kubeconfig: str | None = None
    settings_file: str | None = None
    config_secret: str = "kubellm-router-config"
    leader_election: bool = True
    lease_name: str = "kubellm-operator"
    poll_interval: float = 10.0
    liveness_endpoint: str | None = None
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}")


async def run_operator(opts: RunOptions) -> int:
    """Run until stopped (0) or until leadership is lost (1: exit, and restart as a standby)."""
    import kopf

    from ._handlers import REGISTRY
    from ._lease import LeaseElector
    from ._reconcile import Options, Reconciler
    from ._usage import UsageReader

    kube = auto_config(opts.kubeconfig)
    namespace = opts.namespace or kube.namespace
    settings = load_settings(opts.settings_file)
    client = KubeClient(kube)
    options = Options(
        namespace=namespace,
        watch_namespaces=opts.watch_namespaces,
        config_secret=opts.config_secret,
        settings=settings,
        guardrails=tuple(load_guardrails(opts.settings_file)),
        poll_interval=opts.poll_interval,
    )
    reconciler = Reconciler(client, options, UsageReader.from_settings(settings.redis))
    stop = asyncio.Event()
    elector = None
    lost = False
    holder: asyncio.Task[None] | None = None
    try:
        if opts.leader_election:
            elector = LeaseElector(client, namespace, opts.lease_name, opts.identity)
            await elector.acquire()

            async def hold() -> None:
                nonlocal lost
                assert elector is not None
                await elector.hold()
                lost = True
                stop.set()

            holder = asyncio.get_running_loop().create_task(hold())
        where = ", ".join(opts.watch_namespaces) or "all namespaces"
        log.info("kubellm operator: rendering %s into Secret %s/%s", where, namespace, opts.config_secret)
        await kopf.operator(
            registry=REGISTRY,
            settings=operator_settings(namespaced=bool(opts.watch_namespaces)),
            standalone=True,
            clusterwide=not opts.watch_namespaces,
            namespaces=list(opts.watch_namespaces),
            memo=kopf.Memo(reconciler=reconciler),
            stop_flag=stop,
            liveness_endpoint=opts.liveness_endpoint,
        )
    finally:
        if holder is not None:
            holder.cancel()
        if elector is not None and not lost:
            await elector.release()
        await client.close()
    return 1 if lost else 0


# ---- offline rendering ----------------------------------------------------------------


def _documents(paths: Iterable[str]) -> Iterator[Any]:
    import sys

    for raw in paths:
        if raw == "-":
            yield from yaml.safe_load_all(sys.stdin.read())
            continue
        p = Path(raw)
        files = (
            sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml", ".json")) if p.is_dir() else [p]
        )
        for f in files:
            try:
                yield from yaml.safe_load_all(f.read_text())
            except yaml.YAMLError as exc:
                raise ConfigError(f"{f}: not valid YAML: {exc}") from None


def _flatten(docs: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            yield from _flatten(doc.get("items") or [])
        elif isinstance(doc, dict):
            yield doc


def _secret_values(doc: Body) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (doc.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(f"Secret {doc['metadata'].get('name')}: data.{key} is not base64") from None
    out.update({k: str(v) for k, v in (doc.get("stringData") or {}).items()})
    return out


def render_documents(
    docs: Iterable[Any],
    *,
    namespace: str = "default",
    settings: RouterSettings | None = None,
    now: datetime | None = None,
    guardrails: Iterable[GuardrailConfig] = (),
) -> BuildResult:
    """What the operator would publish for these documents (CRs and Secrets; others are ignored)."""
    kinds: dict[str, list[dict[str, Any]]] = {
        "ModelDeployment": [],
        "ModelGroup": [],
        "ApiKey": [],
        "IdentityBinding": [],
    }
    secrets: dict[tuple[str, str], dict[str, str]] = {}
    for doc in _flatten(docs):
        meta = doc.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        if doc.get("kind") == "Secret" and doc.get("apiVersion") == "v1":
            secrets[(meta["namespace"], str(meta.get("name")))] = _secret_values(doc)
        for kind, bucket in kinds.items():
            if is_kind(doc, kind):
                bucket.append(doc)
    return build_config(
        kinds["ModelDeployment"],
        kinds["ModelGroup"],
        kinds["ApiKey"],
        secrets,
        settings=settings,
        now=now,
        guardrails=guardrails,
        identity_bindings=kinds["IdentityBinding"],
    )


def redacted(document: dict[str, Any]) -> dict[str, Any]:
    """The rendered document with inline upstream credentials replaced by a short fingerprint."""
    import hashlib

    out = dict(document)
    deployments = []
    for dep in document.get("deployments") or []:
        if dep.get("apiKey"):
            digest = hashlib.sha256(str(dep["apiKey"]).encode()).hexdigest()[:12]
            dep = {**dep, "apiKey": f"<redacted sha256:{digest}>"}
        deployments.append(dep)
    out["deployments"] = deployments
    return out


def render_paths(paths: Iterable[str], namespace: str, settings_file: str | None) -> BuildResult:
    return render_documents(
        _documents(paths),
        namespace=namespace,
        settings=load_settings(settings_file),
        guardrails=load_guardrails(settings_file),
    )
