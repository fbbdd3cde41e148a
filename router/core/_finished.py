"""The record of one finished request, built once and handed to everything that reports it.

:func:`~._observe.finish_request` builds exactly one :class:`Finished` per request, whichever
way it ended (answered, failed, refused at admission, cancelled, replayed from the cache); the
metrics recorder, the access log and the sinks read that record and nothing else. It holds
references only: everything derived from it for the sinks (parsed answers, prices, the payload
opt-in) is worked out once, on the sink thread, through :attr:`Finished.facts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..providers import Usage

if TYPE_CHECKING:
    from ..observability.sinks._record import Facts
    from ._dispatch import Call
    from ._state import Deployment

__all__ = ["Finished"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Finished:
    call: Call
    #: The deployment that answered or last failed; None when none was tried, or for a cache hit.
    dep: Deployment | None
    status: int
    usage: Usage | None
    #: Seconds from the request's arrival to its first streamed byte (streams only).
    ttft: float | None
    #: The answer's payloads (JSON bodies or stream event data), for token estimates and the sinks.
    payloads: list[bytes] | None
    latency: float
    cached: bool
    #: What the request cost, in USD, at the deployment's price.
    spend: float
    #: Wall clock at the end, in nanoseconds since the epoch.
    end_ns: int
    _facts: list[Facts] = field(default_factory=list, repr=False, compare=False)

    @property
    def deployment(self) -> str:
        """The deployment as metrics and logs name it: ``cache`` for a cache hit, "" for none."""
        return "cache" if self.cached else self.dep.name if self.dep is not None else ""

    @property
    def facts(self) -> Facts:
        """What the sinks report, derived on first use (on the sink thread, off the request path)."""
        if not self._facts:
            from ..observability.sinks._record import derive  # the sinks' view, loaded only where sinks run

            self._facts.append(derive(self))
        return self._facts[0]
