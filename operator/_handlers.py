"""The kopf registration module: decorators only, each handler a thin call into plain functions.

The :class:`~._reconcile.Reconciler` travels in kopf's ``memo`` (``memo.reconciler``);
:func:`._runtime.run_operator` creates it and passes this module's :data:`REGISTRY`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from ._crds import GROUP, VERSION
from ._keys import APIKEY_LABEL, KeySecretConflict, api_key_for_secret, ensure_key_secret
from ._reconcile import Reconciler
from ._runtime import connection_info, wait_for_crds
from ._status import rfc3339

REGISTRY = kopf.OperatorRegistry()


def _reconciler(memo: Any) -> Reconciler:
    return cast(Reconciler, memo["reconciler"])


# ---- activities ----------------------------------------------------------------


@kopf.on.login(registry=REGISTRY)
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return connection_info(_reconciler(memo).client.config)


@kopf.on.startup(registry=REGISTRY)
async def startup(memo: kopf.Memo, **_: Any) -> None:
    # kopf starts watching and the reconciler its first pass only after startup handlers return.
    await wait_for_crds(_reconciler(memo).client)
    _reconciler(memo).start()  # kopf's settings come from _runtime.operator_settings()


@kopf.on.cleanup(registry=REGISTRY)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await _reconciler(memo).stop()


# ---- watches: any change wakes the (single, level-triggered) reconciler ---------------


@kopf.on.event(GROUP, VERSION, "modeldeployments", registry=REGISTRY)
def model_deployment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconciler(memo).observe("ModelDeployment", type, body)


@kopf.on.event(GROUP, VERSION, "modelgroups", registry=REGISTRY)
def model_group_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconciler(memo).observe("ModelGroup", type, body)


@kopf.on.event(GROUP, VERSION, "apikeys", registry=REGISTRY)
def api_key_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconciler(memo).observe("ApiKey", type, body)


@kopf.on.event(GROUP, VERSION, "identitybindings", registry=REGISTRY)
def identity_binding_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconciler(memo).observe("IdentityBinding", type, body)


@kopf.on.event("", "v1", "secrets", registry=REGISTRY)
async def secret_event(
    type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    reconciler = _reconciler(memo)
    reconciler.observe_secret(type, body)
    if type == "DELETED" and APIKEY_LABEL in body.metadata.labels:
        # A deleted key Secret means "rotate": write a new key (the old one leaves the config).
        api_key = await api_key_for_secret(reconciler.client, body)
        if api_key is not None and not api_key.get("metadata", {}).get("deletionTimestamp"):
            try:
                outcome = await ensure_key_secret(reconciler.client, api_key)
            except Exception as exc:  # the ApiKey's own handlers retry on their next run
                logger.warning(f"could not recreate the key Secret: {exc}")
            else:
                logger.info(f"key Secret was deleted; generated a new key {outcome.prefix}…")


# ---- ApiKey: the key itself ------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "apikeys", registry=REGISTRY)
@kopf.on.create(GROUP, VERSION, "apikeys", registry=REGISTRY)
@kopf.on.update(GROUP, VERSION, "apikeys", registry=REGISTRY)
async def api_key_secret(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Generate, adopt or rotate the key (the reconciler repairs a key Secret that goes missing)."""
    reconciler = _reconciler(memo)
    try:
        outcome = await ensure_key_secret(reconciler.client, body)
    except KeySecretConflict as exc:
        raise kopf.PermanentError(str(exc)) from None
    except Exception as exc:  # the API server was unreachable or the Secret changed under us
        raise kopf.TemporaryError(f"key Secret not ready: {exc}", delay=2) from None
    if outcome.rotated:
        patch.status["rotatedAt"] = rfc3339(datetime.now(UTC))
        logger.info(f"rotated the key; new key {outcome.prefix}…")
    elif outcome.created:
        logger.info(f"generated a new key {outcome.prefix}…")
    if outcome.created or outcome.rotated or outcome.adopted:
        reconciler.trigger()


logging.getLogger("kopf.objects").setLevel(logging.WARNING)
