"""The `kubellm` command."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys
import tempfile
from collections.abc import Sequence


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_free(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def _router(args: argparse.Namespace) -> int:
    from kubellm.router._config import ConfigError
    from kubellm.router._quickstart import ENV_BASE_URL, ENV_CONFIG, ENV_MODEL, source_from_env
    from kubellm.router._state import build_state

    if args.config and args.model:
        print("kubellm router: give --config or --model, not both", file=sys.stderr)
        return 2
    if args.config:
        os.environ[ENV_CONFIG] = os.path.abspath(args.config)
    if args.model:
        os.environ[ENV_MODEL] = args.model
    if args.base_url:
        os.environ[ENV_BASE_URL] = args.base_url
    try:
        state = build_state(source_from_env(os.environ).load())
    except ConfigError as err:
        print(f"kubellm router: invalid config: {err.message}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and not state.auth_required and not args.insecure_no_auth:
        print(
            f"kubellm router: refusing to listen on {args.host} with no master key or API keys configured; "
            f"set {state.config.settings.master_key_env} or pass --insecure-no-auth",
            file=sys.stderr,
        )
        return 2
    problem = _port_free(args.host, args.port)
    if problem:
        print(f"kubellm router: {problem}", file=sys.stderr)
        return 1

    import uvicorn

    from kubellm.router._logging import configure

    configure(args.log_level)
    common = {
        "host": args.host,
        "port": args.port,
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "log_level": args.log_level,
        "timeout_graceful_shutdown": args.grace_period,
        "ssl_certfile": args.ssl_certfile,
        "ssl_keyfile": args.ssl_keyfile,
    }
    print(
        f"kubellm router serving {len(state.groups)} model group(s), config {state.version}, "
        f"on http{'s' if args.ssl_certfile else ''}://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    if args.workers > 1:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="kubellm-metrics-"))
        uvicorn.run("kubellm.router._app:app_from_env", factory=True, workers=args.workers, **common)
    else:
        from kubellm.router._app import app_from_env

        uvicorn.run(app_from_env(), **common)
    return 0


def _config_docs(args: argparse.Namespace) -> int:
    from kubellm.router._docs import config_reference

    text = config_reference()
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubellm", description="A Kubernetes-native LLM router.")
    sub = parser.add_subparsers(dest="command", required=True)

    router = sub.add_parser("router", help="run the OpenAI-compatible router")
    router.add_argument("--config", help="YAML config file (watched and hot-reloaded)")
    router.add_argument("--model", help="single-model quick start, e.g. openai/gpt-4o-mini")
    router.add_argument("--base-url", help="upstream base URL for --model")
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=8000)
    router.add_argument("--workers", type=int, default=1)
    router.add_argument(
        "--insecure-no-auth", action="store_true", help="allow a non-loopback address with no keys configured"
    )
    router.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on shutdown",
    )
    router.add_argument("--ssl-certfile")
    router.add_argument("--ssl-keyfile")
    router.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    router.set_defaults(func=_router)

    docs = sub.add_parser("config-docs", help="print the config reference generated from the schema")
    docs.add_argument("-o", "--output")
    docs.set_defaults(func=_config_docs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
