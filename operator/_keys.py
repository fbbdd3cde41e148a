"""ApiKey secrets: generate, adopt and rotate the key in the Secret an ApiKey names.

Level-based and safe to run concurrently: every write is a create (409 when
someone else won) or a patch conditioned on the resourceVersion read. The
rotation request (the ApiKey's ``kubellm.io/rotate`` annotation) is recorded
on the Secret in the same write as the new key, so a rotation happens exactly
once per new annotation value, however often this runs.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubellm.router.kube import KubeClient, KubeError, secret_data, secret_path

from ._build import KEY_DATA, MIN_KEY_LENGTH, Body, key_prefix, key_secret_name, ref_of
from ._crds import API_VERSION

ROTATE_ANNOTATION = "kubellm.io/rotate"
ROTATED_FOR_ANNOTATION = "kubellm.io/rotated-for"
APIKEY_LABEL = "kubellm.io/apikey"
MANAGED_LABELS = {"app.kubernetes.io/managed-by": "kubellm-operator", "app.kubernetes.io/name": "kubellm"}


class KeySecretConflict(Exception):
    """The named Secret belongs to something else; retrying cannot help."""


@dataclass(frozen=True, slots=True)
class KeyOutcome:
    prefix: str | None
    created: bool = False
    rotated: bool = False
    adopted: bool = False


def generate_key() -> str:
    """``sk-`` and 48 URL-safe characters (288 random bits)."""
    return "sk-" + secrets.token_urlsafe(36)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def owner_reference(body: Body) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": API_VERSION,
        "kind": "ApiKey",
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "controller": True,
    }


def _foreign_owner(secret: Mapping[str, Any], body: Body) -> str | None:
    uid = (body.get("metadata") or {}).get("uid")
    for ref in (secret.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("uid") != uid:
            return f"{ref.get('kind')} {ref.get('name')}"
    return None


async def ensure_key_secret(client: KubeClient, body: Body) -> KeyOutcome:
    """Make the ApiKey's Secret hold a usable key; raises :class:`KubeError` (retry) or
    :class:`KeySecretConflict` (do not)."""
    ref = ref_of("ApiKey", body)
    name = key_secret_name(body)
    path = secret_path(ref.namespace, name)
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    wanted = str(annotations.get(ROTATE_ANNOTATION, ""))
    try:
        secret = await client.get(path)
    except KubeError as err:
        if err.status != 404:
            raise
        key = generate_key()
        doc = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": ref.namespace,
                "labels": {**MANAGED_LABELS, APIKEY_LABEL: ref.name},
                "annotations": {ROTATED_FOR_ANNOTATION: wanted},
                "ownerReferences": [owner_reference(body)],
            },
            "data": {KEY_DATA: _b64(key)},
        }
        await client.create(secret_path(ref.namespace), doc)  # 409: someone else created it; retry
        return KeyOutcome(key_prefix(key), created=True)

    owner = _foreign_owner(secret, body)
    if owner is not None:
        raise KeySecretConflict(f"Secret {ref.namespace}/{name} is controlled by {owner}, not by this ApiKey")
    meta = secret.get("metadata") or {}
    current = secret_data(secret).get(KEY_DATA, "").strip()
    secret_annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    patch_meta: dict[str, Any] = {"resourceVersion": meta.get("resourceVersion")}
    outcome = KeyOutcome(key_prefix(current) if current else None)
    new_key: str | None = None
    if len(current) < MIN_KEY_LENGTH:
        new_key = generate_key()  # an empty (or placeholder) Secret the user made for us
        outcome = KeyOutcome(key_prefix(new_key), adopted=True)
    elif ROTATED_FOR_ANNOTATION not in secret_annotations:
        outcome = KeyOutcome(outcome.prefix, adopted=True)  # the user's own key: keep it
    elif wanted and wanted != secret_annotations.get(ROTATED_FOR_ANNOTATION):
        new_key = generate_key()
        outcome = KeyOutcome(key_prefix(new_key), rotated=True)
    if secret_annotations.get(ROTATED_FOR_ANNOTATION) != wanted:
        patch_meta["annotations"] = {ROTATED_FOR_ANNOTATION: wanted}
    if labels.get(APIKEY_LABEL) != ref.name:
        patch_meta["labels"] = {APIKEY_LABEL: ref.name}
    if len(patch_meta) == 1 and new_key is None:
        return outcome
    patch: dict[str, Any] = {"metadata": patch_meta}
    if new_key is not None:
        patch["data"] = {KEY_DATA: _b64(new_key)}
    await client.patch(path, patch)  # 409 when the Secret changed since we read it: retry
    return outcome


async def api_key_for_secret(client: KubeClient, secret: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ApiKey a key Secret belongs to (by its label), or None."""
    meta = secret.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(APIKEY_LABEL)
    if not owner:
        return None
    path = f"/apis/{API_VERSION}/namespaces/{meta.get('namespace')}/apikeys/{owner}"
    try:
        return await client.get(path)
    except KubeError as err:
        if err.status == 404:
            return None
        raise
