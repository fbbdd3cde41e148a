"""A rollout without a dropped request (issue 15, defect 1), on real router processes.

Two routers sit behind a loopback balancer that, like a Service, sends new connections only to
routers whose readiness answers 200. Keep-alive httpx clients without retries hammer it, streamed
and not, while one router gets SIGTERM: every request must succeed, the draining router must say
``Connection: close`` on every response it starts after the signal, and the clients must end up on
the other router.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from tests.support.balancer import Balancer
from tests.support.servers import RouterProcess

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: list[str] = field(default_factory=list)
    #: Requests answered, per client.
    answered: dict[int, int] = field(default_factory=dict)
    #: (monotonic time the request was sent, deployment that answered, Connection header)
    served: list[tuple[float, str, str]] = field(default_factory=list)

    def ok(self, client: int, sent: float, resp: httpx.Response) -> None:
        with self.lock:
            self.answered[client] = self.answered.get(client, 0) + 1
            self.served.append(
                (sent, resp.headers.get("x-kubellm-deployment", ""), resp.headers.get("connection", ""))
            )

    def fail(self, what: str) -> None:
        with self.lock:
            self.failed.append(what)


def _hammer(url: str, n: int, stop: threading.Event, tally: Tally, pause: float = 0.0) -> None:
    """One keep-alive client (one pooled connection, no retries) sending back to back, or with
    ``pause`` seconds of idling between requests (its connection then sits idle in the pool).
    Even clients stream, odd ones do not."""
    stream = n % 2 == 0
    transport = httpx.HTTPTransport(retries=0, limits=httpx.Limits(max_connections=1))
    headers = {"Authorization": "Bearer x"}
    with httpx.Client(base_url=url, transport=transport, headers=headers, timeout=10) as client:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                if stream:
                    with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as resp:
                        text = resp.read()
                    good = resp.status_code == 200 and text.rstrip().endswith(b"data: [DONE]")
                else:
                    resp = client.post("/v1/chat/completions", json=BODY)
                    text = resp.content
                    good = resp.status_code == 200 and b'"choices"' in text
            except httpx.HTTPError as exc:
                tally.fail(f"{'stream' if stream else 'plain'}: {type(exc).__name__}: {exc}")
                continue
            if good:
                tally.ok(n, sent, resp)
            else:
                tally.fail(f"{resp.status_code} {text[:200]!r}")
            time.sleep(pause)


def _router_config(name: str) -> dict[str, object]:
    return {
        "deployments": [{"name": name, "model": "m", "provider": "mock", "mock": {"chunkDelayMs": 3}}],
        "settings": {"drainDelaySeconds": 2},
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_rollout_under_keep_alive_load_drops_nothing(
    start_router: Callable[..., RouterProcess], workers: int
) -> None:
    """With ``--workers 2`` the SIGTERM reaches the supervisor, which passes it on to each worker."""
    old = start_router(_router_config("old"), workers=workers)
    new = start_router(_router_config("new"))
    tally = Tally()
    with Balancer([old.port, new.port]) as lb:
        deadline = time.monotonic() + 20
        while len(lb.ready) < 2:
            assert time.monotonic() < deadline, "the balancer never saw both routers ready"
            time.sleep(0.02)
        stop = threading.Event()
        # Busy clients, and idle ones whose pooled connection the SIGTERM finds between requests.
        clients = [
            threading.Thread(target=_hammer, args=(lb.url, i, stop, tally, 0.0 if i < 6 else 0.6))
            for i in range(10)
        ]
        for t in clients:
            t.start()
        # Every client in its stride (answered twice, so on a kept-alive connection) before the signal.
        while len(tally.answered) < len(clients) or min(tally.answered.values()) < 2:
            assert time.monotonic() < deadline and not tally.failed, (tally.answered, tally.failed[:5])
            time.sleep(0.05)
        time.sleep(0.3)
        sigterm_at = time.monotonic()
        assert old.proc is not None
        old.proc.send_signal(signal.SIGTERM)
        assert old.proc.wait(15) in (0, -signal.SIGTERM), old.logs()
        exited_at = time.monotonic()
        time.sleep(1.5)  # the clients go on, on the router that stays
        stop.set()
        for t in clients:
            t.join(20)
        assert lb.refused == 0
    assert tally.failed == [], tally.failed[:5]
    before = [s for s in tally.served if s[0] < sigterm_at]
    # Requests sent after the signal on a connection to the old router (kept alive from before).
    draining = [s for s in tally.served if sigterm_at + 0.05 < s[0] and s[1] == "old"]
    after = [s for s in tally.served if s[0] > exited_at]
    assert {d for _, d, _ in before} == {"old", "new"}
    assert draining, "no request reached the draining router: the test proves nothing"
    assert all(c.lower() == "close" for _, _, c in draining), draining
    # The drain delay (2 s) is longer than the time keep-alive clients need to move off.
    assert exited_at - sigterm_at >= 2
    assert after and {d for _, d, _ in after} == {"new"}
