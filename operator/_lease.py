"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

Only the leader runs kopf (standalone, no kopf peering CRDs); standbys wait. A
Lease someone else holds counts as expired when its record has not changed for
``lease_duration`` seconds *as observed locally*, so clock skew between nodes
does not matter. The leader renews every ``retry_period``; if it cannot renew
for ``renew_deadline`` it stops leading (the process exits and restarts as a
standby), which is before any standby may take over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubellm.router.kube import KubeClient, KubeError

log = logging.getLogger("kubellm.operator")


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaseElector:
    client: KubeClient
    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    _observed: tuple[str, float] = field(default=("", 0.0), init=False)  # (resourceVersion, when seen)

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    def _spec(self, transitions: int, acquire: bool, previous: dict[str, Any]) -> dict[str, Any]:
        now = _micro_time()
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration),
            "acquireTime": now if acquire else previous.get("acquireTime", now),
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the Lease afterwards."""
        try:
            lease = await self.client.get(self.path)
        except KubeError as err:
            if err.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(0, True, {}),
            }
            try:
                await self.client.create(self.path.rsplit("/", 1)[0], body)
            except KubeError as exc:
                if exc.status == 409:
                    return False
                raise
            return True
        meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
        rv = str(meta.get("resourceVersion", ""))
        now = time.monotonic()
        if rv != self._observed[0]:
            self._observed = (rv, now)
        holder = spec.get("holderIdentity") or ""
        mine = holder == self.identity
        expired = not holder or now - self._observed[1] > float(spec.get("leaseDurationSeconds") or 15)
        if not mine and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        lease["spec"] = self._spec(transitions, not mine, spec)
        try:
            updated = await self.client.replace(self.path, lease)  # resourceVersion: optimistic lock
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        self._observed = (str((updated.get("metadata") or {}).get("resourceVersion", "")), time.monotonic())
        return True

    async def acquire(self) -> None:
        """Wait until we are the leader."""
        logged = False
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info(
                        "leader election: %s now holds Lease %s/%s", self.identity, self.namespace, self.name
                    )
                    return
            except KubeError as err:
                log.warning("leader election: %s", err)
            if not logged:
                log.info("leader election: waiting for Lease %s/%s", self.namespace, self.name)
                logged = True
            await asyncio.sleep(self.retry_period)

    async def hold(self) -> None:
        """Renew until renewing fails for ``renew_deadline``; then return (leadership lost)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_period)
            try:
                if await self.try_acquire_or_renew():
                    last = time.monotonic()
                    continue
                log.error("leader election: Lease %s/%s was taken over", self.namespace, self.name)
                return
            except KubeError as err:
                log.warning("leader election: renew failed: %s", err)
            if time.monotonic() - last > self.renew_deadline:
                log.error("leader election: could not renew for %.0fs; stepping down", self.renew_deadline)
                return

    async def release(self) -> None:
        """Give the Lease up at shutdown so a standby takes over at once."""
        try:
            lease = await self.client.get(self.path)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
            await self.client.replace(self.path, lease)
        except KubeError as err:
            log.warning("leader election: release failed: %s", err)
