"""Observability: metrics, logs, traces and the sinks, fed by one finished-request record."""
