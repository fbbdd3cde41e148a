"""Observability sinks: where finished requests go besides metrics and the access log.

``settings.otel`` (OpenTelemetry traces over OTLP) and ``settings.sinks`` (a
generic webhook, Langfuse, PostHog, Mixpanel, Lunary, Helicone, Sentry, Supabase,
Traceloop, more OTLP endpoints) are started once, when the router starts, and run on one daemon
thread with its own event loop, so nothing they do (encoding, HTTP, retries)
competes with the loop that serves requests.

The request path pays for this only when a sink is configured, and then only
:meth:`Hub.submit`: one small object and a bounded-queue append per sink. With
no sink configured :attr:`Hub.active` is false and ``finish_request`` skips the
call; the OpenTelemetry tracing SDK is then never even imported.

Metrics: ``kubellm_sink_events_total{sink}`` (delivered), ``kubellm_sink_dropped_total{sink}``
(queue full, or given up after retries) and ``kubellm_sink_errors_total{sink}`` (failed attempts).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp

from .sinks._base import Sink, SinkSetupError, env_headers, env_secret
from .sinks._record import Record
from .sinks._sentry import SentrySink
from .sinks._supabase import SupabaseSink
from .sinks._vendors import VENDORS

#: The sink types built by ``from_config``; ``otlp`` and ``traceloop`` are the OTel exporter.
FACTORIES: dict[str, Callable[[str, SinkConfig], Sink]] = {
    **{kind: cls.from_config for kind, cls in VENDORS.items()},
    "sentry": SentrySink.from_config,
    "supabase": SupabaseSink.from_config,
}
#: Traceloop (OpenLLMetry) takes OTLP/HTTP protobuf traces with a bearer API key.
TRACELOOP_URL = "https://api.traceloop.com"

if TYPE_CHECKING:
    from ..config._schema import RouterSettings, SinkConfig

log = logging.getLogger("kubellm.sinks")


def _otlp(name: str, cfg: SinkConfig) -> Sink:
    try:
        from ._otel import OtlpSink
    except ImportError:
        raise SinkSetupError("the OpenTelemetry SDK is not installed; install kubellm[otel]") from None
    headers = env_headers(cfg.headers_env)
    url = cfg.url
    if cfg.type == "traceloop":
        key = env_secret(cfg.api_key_env, "apiKeyEnv (Traceloop API key)")
        headers["Authorization"] = f"Bearer {key}"
        url = url or TRACELOOP_URL
    assert url is not None
    return OtlpSink(
        name,
        endpoint=url,
        headers=headers,
        openllmetry=cfg.type == "traceloop",
        include_payloads=cfg.type != "traceloop" or cfg.include_payloads,
        service_name=cfg.service_name,
        sample_ratio=cfg.sample_ratio,
        batch_size=cfg.batch_size,
        flush_interval=cfg.flush_interval_seconds,
        max_queue=cfg.max_queue,
        max_retries=cfg.max_retries,
        timeout=cfg.timeout_seconds,
    )


def sink_configs(settings: RouterSettings) -> list[tuple[str, SinkConfig]]:
    """Every configured sink with its metric label: ``settings.otel`` is the sink named ``otel``."""
    from ..config._schema import SinkConfig

    configs: list[SinkConfig] = []
    if settings.otel is not None:
        o = settings.otel
        configs.append(
            SinkConfig(
                type="otlp",
                name="otel",
                url=o.endpoint,
                headers_env=o.headers_env,
                service_name=o.service_name,
                sample_ratio=o.sample_ratio,
                batch_size=o.batch_size,
                flush_interval_seconds=o.flush_interval_seconds,
                max_queue=o.max_queue,
                timeout_seconds=o.timeout_seconds,
            )
        )
    configs += settings.sinks
    named: list[tuple[str, SinkConfig]] = []
    taken: set[str] = set()
    for cfg in configs:
        base = cfg.name or cfg.type
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        named.append((name, cfg))
    return named


def build_sinks(settings: RouterSettings) -> list[Sink]:
    """The sinks that can run; one that cannot (credential unset, SDK missing) is logged and skipped."""
    sinks: list[Sink] = []
    for name, cfg in sink_configs(settings):
        try:
            otel = cfg.type in ("otlp", "traceloop")
            sinks.append(_otlp(name, cfg) if otel else FACTORIES[cfg.type](name, cfg))
        except SinkSetupError as err:
            log.error("sink %s (%s) is disabled: %s", name, cfg.type, err)
    return sinks


class Hub:
    """The sinks of this process and the thread that runs them."""

    def __init__(self) -> None:
        #: Read by ``finish_request`` before calling :meth:`submit`.
        self.active = False
        self.sinks: list[Sink] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the request path -----------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Hand a finished request to every sink: O(1) per sink, never blocks."""
        for sink in self.sinks:
            sink.offer(record)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, settings: RouterSettings) -> None:
        """Start the configured sinks (once; later config reloads do not change them)."""
        if self._thread is not None:
            return
        sinks = build_sinks(settings)
        if not sinks:
            return
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(self._loop, sinks, ready), name="kubellm-sinks", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            log.error("observability sinks did not start")
            return
        self.sinks = sinks
        self.active = True
        log.info("observability sinks: %s", ", ".join(f"{s.name} ({s.kind})" for s in sinks))

    def _run(self, loop: asyncio.AbstractEventLoop, sinks: list[Sink], ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(sinks, ready))
        finally:
            loop.close()

    async def _main(self, sinks: list[Sink], ready: threading.Event) -> None:
        async with aiohttp.ClientSession() as session:
            for sink in sinks:
                await sink.open(session)
            runs = [asyncio.create_task(sink.run()) for sink in sinks]
            ready.set()
            for sink, result in zip(sinks, await asyncio.gather(*runs, return_exceptions=True), strict=True):
                if isinstance(result, BaseException):
                    log.error("sink %s stopped: %s", sink.name, type(result).__name__)
            for sink in sinks:
                try:
                    await sink.close()
                except Exception as exc:
                    log.warning("sink %s did not close cleanly: %s", sink.name, type(exc).__name__)

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued (one attempt per batch) and stop; blocks up to ``timeout`` seconds."""
        thread, loop = self._thread, self._loop
        self.active = False
        if thread is None or loop is None:
            return
        sinks = self.sinks

        def stop_all() -> None:
            for sink in sinks:
                sink.stop()

        try:
            loop.call_soon_threadsafe(stop_all)
        except RuntimeError:  # the loop already ended
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("observability sinks did not flush within %.0fs", timeout)
        self._thread = self._loop = None
        self.sinks = []


#: This process's sinks; ``finish_request`` submits to it, the app lifespan starts and closes it.
hub = Hub()
