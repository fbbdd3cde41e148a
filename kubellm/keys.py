"""`kubellm keys`: create, rotate, revoke and list API keys as ApiKey resources.

A team manages its keys with its own Kubernetes credentials (kubeconfig or in-cluster, found the
way the operator finds them), under a namespaced Role: no master key, no admin API.

The key value lives in the Secret the ApiKey names (``spec.secretName``, default ``NAME-apikey``,
data key ``key``), where the operator looks for it. The CLI generates the key itself and writes
it there, so it can print a new key exactly once without ever reading a Secret: the Role needs
``create``, ``patch`` and ``delete`` on Secrets, not ``get``/``list``/``watch``.

* create: the Secret first (so the operator, seeing the ApiKey, adopts this key instead of
  generating its own), then the ApiKey, then the Secret's ownerReference to it.
* rotate: one JSON patch of the Secret that first *tests* its ``kubellm.io/apikey`` label (so a
  Secret of something else is never overwritten), writes the new key, and sets
  ``kubellm.io/rotated-for`` to the ApiKey's ``kubellm.io/rotate``: the operator then sees no
  rotation left to do, so it never replaces the key just printed (one atomic write, no window).
* revoke: delete the ApiKey (the key leaves the routers' config at once), then wipe and delete
  its Secret (garbage collection would too, but not before the key value is gone).
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

# The shared Kubernetes helper of the router and the operator (public as kubellm.router.kube
# once the router's modules move into packages).
from kubellm.router.kube import KubeClient, KubeError

# The ApiKey contract with the operator (operator/_crds.py, _build.py, _keys.py; a test checks
# these match, since the CLI must not import the operator's private modules).
API_VERSION = "kubellm.io/v1alpha1"
KEY_DATA = "key"
ROTATE_ANNOTATION = "kubellm.io/rotate"
ROTATED_FOR_ANNOTATION = "kubellm.io/rotated-for"
APIKEY_LABEL = "kubellm.io/apikey"
PREFIX_LENGTH = 8

# Exit codes (documented in docs/keys-and-metering.md).
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FORBIDDEN = 4
EXIT_EXISTS = 5

_DURATION = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class KeysError(Exception):
    """A failure to report on stderr, with the exit code it maps to."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def generate_key() -> str:
    """``sk-`` and 48 URL-safe characters (288 random bits), like the operator's keys."""
    return "sk-" + secrets.token_urlsafe(36)


def key_prefix(key: str) -> str:
    return key[:PREFIX_LENGTH]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _q(part: str) -> str:
    return quote(part, safe="")


def apikeys_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/{API_VERSION}/namespaces/{_q(namespace)}/apikeys"
    return f"{base}/{_q(name)}" if name else base


def secrets_path(namespace: str, name: str | None = None) -> str:
    base = f"/api/v1/namespaces/{_q(namespace)}/secrets"
    return f"{base}/{_q(name)}" if name else base


def _pointer(key: str) -> str:
    """A JSON-pointer token (RFC 6901) for a label or annotation key."""
    return key.replace("~", "~0").replace("/", "~1")


def _server_message(err: KubeError) -> str:
    """The API server's own message, without the client's ``METHOD PATH: STATUS`` prefix."""
    text = str(err)
    marker = f": {err.status} "
    return text.split(marker, 1)[1] if err.status and marker in text else text


def explain(err: KubeError, namespace: str, what: str) -> KeysError:
    """A KubeError as a message a team admin can act on, with its exit code."""
    message = _server_message(err)
    if err.status == 0:
        return KeysError(f"cannot reach the Kubernetes API server: {message}")
    if err.status == 401:
        return KeysError(
            f"the API server rejected the credentials (401 Unauthorized): {message}", EXIT_FORBIDDEN
        )
    if err.status == 403:
        return KeysError(
            f"permission denied: {message}\n"
            f"(managing keys in namespace {namespace!r} needs a RoleBinding there to the team key-admin "
            "Role; see docs/kubernetes.md, Team key admins)",
            EXIT_FORBIDDEN,
        )
    if err.status == 404:
        if 'namespaces "' in message:
            return KeysError(f"namespace {namespace!r} not found", EXIT_NOT_FOUND)
        if "could not find the requested resource" in message:
            return KeysError(
                "the ApiKey resource type is not installed in this cluster (kubectl apply -f crds/)",
                EXIT_NOT_FOUND,
            )
        return KeysError(f"{what} not found in namespace {namespace!r}", EXIT_NOT_FOUND)
    if err.status == 409:
        return KeysError(f"{what} already exists in namespace {namespace!r}: {message}", EXIT_EXISTS)
    if err.status in (400, 422):
        return KeysError(f"invalid {what}: {message}", EXIT_USAGE)
    return KeysError(f"{what}: {message}")


def parse_expiry(value: str, now: datetime | None = None) -> str:
    """RFC 3339 as given, or a duration from now (``30d``, ``12h``) rendered as RFC 3339."""
    match = _DURATION.match(value)
    if match:
        when = (now or datetime.now(UTC)) + timedelta(seconds=int(match[1]) * _UNITS[match[2]])
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise KeysError(
            f"--expires: {value!r} is neither RFC 3339 (2026-12-31T00:00:00Z) nor a duration like 30d",
            EXIT_USAGE,
        ) from None
    return value


def secret_name_of(api_key: Mapping[str, Any]) -> str:
    spec = api_key.get("spec") or {}
    return str(spec.get("secretName") or f"{api_key['metadata']['name']}-apikey")


def _owner_reference(api_key: Mapping[str, Any]) -> dict[str, Any]:
    meta = api_key["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": "ApiKey",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


@dataclass(frozen=True, slots=True)
class Issued:
    """A key just written: shown once to the caller, never again."""

    key: str
    api_key: dict[str, Any]
    secret_name: str

    @property
    def prefix(self) -> str:
        return key_prefix(self.key)


class Keys:
    """The operations, on one namespace, over a :class:`KubeClient`; failures raise KeysError."""

    def __init__(self, client: KubeClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    async def _call(self, what: str, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        try:
            return await call
        except KubeError as err:
            raise explain(err, self.namespace, what) from None

    async def get(self, name: str) -> dict[str, Any]:
        try:
            return await self._call(f"ApiKey {name!r}", self.client.get(apikeys_path(self.namespace, name)))
        except KeysError as err:
            if err.code == EXIT_NOT_FOUND:
                await self._check_namespace()  # "no such namespace" says more than "no such key"
            raise

    async def list(self) -> list[dict[str, Any]]:
        doc = await self._call("ApiKeys", self.client.get(apikeys_path(self.namespace)))
        items: list[dict[str, Any]] = doc.get("items") or []
        if not items:
            await self._check_namespace()
        return sorted(items, key=lambda i: str(i["metadata"]["name"]))

    async def _check_namespace(self) -> None:
        """An empty list in a namespace that does not exist is an error, not "no keys"."""
        try:
            await self.client.get(f"/api/v1/namespaces/{_q(self.namespace)}")
        except KubeError as err:
            if err.status == 404:
                raise KeysError(f"namespace {self.namespace!r} not found", EXIT_NOT_FOUND) from None
            # 403: team admins usually may not read Namespace objects; the list answered, so it exists.

    async def create(self, name: str, spec: dict[str, Any]) -> Issued:
        try:
            await self.client.get(apikeys_path(self.namespace, name))
        except KubeError as err:
            if err.status != 404 or "could not find the requested resource" in str(err):
                raise explain(err, self.namespace, f"ApiKey {name!r}") from None
        else:
            raise KeysError(f"ApiKey {name!r} already exists in namespace {self.namespace!r}", EXIT_EXISTS)
        key = generate_key()
        secret_name = str(spec.get("secretName") or f"{name}-apikey")
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": secret_name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/name": "kubellm", APIKEY_LABEL: name},
                # Marks the key as generated (rotatable by the operator), not a user's own key.
                "annotations": {ROTATED_FOR_ANNOTATION: ""},
            },
            "data": {KEY_DATA: _b64(key)},
        }
        await self._call(f"Secret {secret_name!r}", self.client.create(secrets_path(self.namespace), secret))
        body = {
            "apiVersion": API_VERSION,
            "kind": "ApiKey",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        }
        try:
            api_key = await self._call(
                f"ApiKey {name!r}", self.client.create(apikeys_path(self.namespace), body)
            )
        except KeysError:
            await self._discard_secret(secret_name)
            raise
        try:  # garbage-collected with its ApiKey, like the Secrets the operator generates
            await self.client.patch(
                secrets_path(self.namespace, secret_name),
                {"metadata": {"ownerReferences": [_owner_reference(api_key)]}},
            )
        except KubeError as err:
            warn(
                f"could not make ApiKey {name!r} the owner of Secret {secret_name!r}: {_server_message(err)}"
            )
        return Issued(key, api_key, secret_name)

    async def _discard_secret(self, secret_name: str) -> None:
        try:
            await self.client.delete(secrets_path(self.namespace, secret_name))
        except KubeError as err:
            warn(f"could not delete Secret {secret_name!r} again: {_server_message(err)}")

    async def rotate(self, name: str) -> Issued:
        api_key = await self.get(name)
        secret_name = secret_name_of(api_key)
        key = generate_key()
        # The rotation the ApiKey asks for (kubellm.io/rotate), recorded as done in the same write
        # as the new key: the operator, comparing the two, has nothing left to rotate.
        wanted = str(((api_key["metadata"].get("annotations") or {}).get(ROTATE_ANNOTATION)) or "")
        ops = [
            {"op": "test", "path": f"/metadata/labels/{_pointer(APIKEY_LABEL)}", "value": name},
            {"op": "add", "path": f"/data/{KEY_DATA}", "value": _b64(key)},
            {
                "op": "add",
                "path": f"/metadata/annotations/{_pointer(ROTATED_FOR_ANNOTATION)}",
                "value": wanted,
            },
        ]
        what = f"Secret {secret_name!r} of ApiKey {name!r}"
        for attempt in range(2):
            try:
                await self.client.request(
                    "PATCH",
                    secrets_path(self.namespace, secret_name),
                    ops,
                    content_type="application/json-patch+json",
                )
                return Issued(key, api_key, secret_name)
            except KubeError as err:
                if err.status in (400, 422):
                    raise KeysError(
                        f"{what} is not labelled {APIKEY_LABEL}={name} (not, or not yet, managed as this "
                        f"ApiKey's key); refusing to overwrite it: {_server_message(err)}"
                    ) from None
                if err.status != 404 or 'namespaces "' in str(err):
                    raise explain(err, self.namespace, what) from None
            try:
                return await self._recreate(api_key, secret_name, key, wanted)
            except KeysError as err:
                # 409: the operator wrote the missing Secret meanwhile; replace its key instead.
                if err.code != EXIT_EXISTS or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _recreate(self, api_key: dict[str, Any], secret_name: str, key: str, wanted: str) -> Issued:
        """The ApiKey's Secret is missing (deleted, or the operator has not run yet): write it anew."""
        name = str(api_key["metadata"]["name"])
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": secret_name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/name": "kubellm", APIKEY_LABEL: name},
                "annotations": {ROTATED_FOR_ANNOTATION: wanted},
                "ownerReferences": [_owner_reference(api_key)],
            },
            "data": {KEY_DATA: _b64(key)},
        }
        await self._call(f"Secret {secret_name!r}", self.client.create(secrets_path(self.namespace), secret))
        return Issued(key, api_key, secret_name)

    async def revoke(self, name: str) -> str | None:
        """Delete the ApiKey and its Secret; returns the Secret left in place (not this key's), if any."""
        api_key = await self.get(name)
        secret_name = secret_name_of(api_key)
        uid = api_key["metadata"]["uid"]
        await self._call(
            f"ApiKey {name!r}",
            self.client.request(
                "DELETE", apikeys_path(self.namespace, name), {"preconditions": {"uid": uid}}
            ),
        )
        path = secrets_path(self.namespace, secret_name)
        ops = [
            {"op": "test", "path": f"/metadata/labels/{_pointer(APIKEY_LABEL)}", "value": name},
            {"op": "remove", "path": f"/data/{KEY_DATA}"},
        ]
        try:  # the key value goes first: a Secret that then fails to delete holds nothing usable
            wiped = await self.client.request("PATCH", path, ops, content_type="application/json-patch+json")
            secret_uid = wiped["metadata"]["uid"]
            await self.client.request("DELETE", path, {"preconditions": {"uid": secret_uid}})
        except KubeError as err:
            if err.status == 404:
                return None  # already gone (garbage-collected, or never written)
            if err.status in (400, 422):
                return secret_name
            raise explain(err, self.namespace, f"Secret {secret_name!r}") from None
        return None

    async def wait_rendered(self, name: str, prefix: str, seconds: float) -> bool:
        """Until the operator reports the key with this prefix Ready (in the routers' config)."""
        deadline = time.monotonic() + seconds
        while True:
            doc = await self.get(name)
            status = doc.get("status") or {}
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
            )
            if ready and status.get("keyPrefix") == prefix:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)


def warn(message: str) -> None:
    print(f"kubellm keys: warning: {message}", file=sys.stderr)
