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
    from kubellm.router import ENV_BASE_URL, ENV_CONFIG, ENV_MODEL, source_from_env
    from kubellm.router.config import ConfigError
    from kubellm.router.core import build_state

    if sum(map(bool, (args.config, args.model, args.kube_secret))) > 1:
        print("kubellm router: give one of --config, --model, --kube-secret", file=sys.stderr)
        return 2
    if args.kube_secret:
        return _router_from_kube(args)
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

    print(
        f"kubellm router serving {len(state.groups)} model group(s), config {state.version}, "
        f"on http{'s' if args.ssl_certfile else ''}://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    return _serve(args)


def _router_from_kube(args: argparse.Namespace) -> int:
    from kubellm.router import ENV_KUBE_SECRET, ENV_KUBECONFIG, ENV_REQUIRE_AUTH

    namespace, _, name = args.kube_secret.partition("/")
    if not namespace or not name or "/" in name:
        print("kubellm router: --kube-secret takes NAMESPACE/NAME", file=sys.stderr)
        return 2
    os.environ[ENV_KUBE_SECRET] = args.kube_secret
    if args.kubeconfig:
        os.environ[ENV_KUBECONFIG] = os.path.abspath(args.kubeconfig)
    if not _is_loopback(args.host) and not args.insecure_no_auth:
        # The config arrives later: a config with no keys is refused at load time instead.
        os.environ[ENV_REQUIRE_AUTH] = "1"
    problem = _port_free(args.host, args.port)
    if problem:
        print(f"kubellm router: {problem}", file=sys.stderr)
        return 1
    print(
        f"kubellm router: config from Secret {args.kube_secret} (not ready until it loads), "
        f"on http{'s' if args.ssl_certfile else ''}://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kubellm.router import (
        ENV_HEADER_TIMEOUT,
        ENV_MAX_HEADER_BYTES,
        GuardedHttpToolsProtocol,
    )
    from kubellm.router import configure_logging as configure

    configure(args.log_level)
    # Read by each worker's protocol: slow or oversized request heads are cut off (slowloris).
    os.environ[ENV_HEADER_TIMEOUT] = str(args.header_timeout)
    os.environ[ENV_MAX_HEADER_BYTES] = str(args.max_header_bytes)
    common = {
        "host": args.host,
        "port": args.port,
        "loop": "uvloop",
        "http": GuardedHttpToolsProtocol,
        "access_log": False,
        "log_level": args.log_level,
        "timeout_graceful_shutdown": args.grace_period,
        "ssl_certfile": args.ssl_certfile,
        "ssl_keyfile": args.ssl_keyfile,
    }
    if args.workers > 1:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="kubellm-metrics-"))
        from kubellm.router import run_workers as run

        run(uvicorn.Config("kubellm.router:app_from_env", factory=True, workers=args.workers, **common))
    else:
        from kubellm.router import app_from_env

        uvicorn.run(app_from_env(), **common)
    return 0


def _config_docs(args: argparse.Namespace) -> int:
    from kubellm.router.config import config_reference

    text = config_reference()
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from kubellm.operator._runtime import RunOptions, run_operator
    from kubellm.router.config import ConfigError
    from kubellm.router.kube import KubeError

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    options = RunOptions(
        namespace=args.namespace,
        watch_namespaces=tuple(args.watch_namespace or ()),
        kubeconfig=args.kubeconfig,
        settings_file=args.router_settings,
        config_secret=args.config_secret,
        leader_election=not args.no_leader_election,
        lease_name=args.lease_name,
        poll_interval=args.poll_interval,
        liveness_endpoint=args.liveness,
    )
    try:
        return asyncio.run(run_operator(options))
    except (ConfigError, KubeError) as err:
        print(f"kubellm operator: {err}", file=sys.stderr)
        return 2


def _render(args: argparse.Namespace) -> int:
    import orjson

    from kubellm.operator._runtime import redacted, render_paths
    from kubellm.router.config import ConfigError

    try:
        result = render_paths(args.filename, args.namespace, args.router_settings)
    except ConfigError as err:
        print(f"kubellm render: {err.message}", file=sys.stderr)
        return 2
    doc = result.document() if args.show_secrets else redacted(result.document())
    text = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode() + "\n"
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    failed = 0
    for ref, verdict in result.verdicts.items():
        mark = "ok  " if verdict.ok else "LEFT OUT"
        print(f"{mark} {ref}: {verdict.reason}: {verdict.message}", file=sys.stderr)
        # Keys are generated in the cluster: a key Secret missing offline is expected.
        failed += not verdict.ok and verdict.reason != "KeySecretMissing"
    print(f"config version {result.version} (as the operator would publish it)", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubellm", description="A Kubernetes-native LLM router.")
    sub = parser.add_subparsers(dest="command", required=True)

    router = sub.add_parser("router", help="run the OpenAI-compatible router")
    router.add_argument("--config", help="YAML config file (watched and hot-reloaded)")
    router.add_argument("--model", help="single-model quick start, e.g. openai/gpt-4o-mini")
    router.add_argument("--base-url", help="upstream base URL for --model")
    router.add_argument(
        "--kube-secret",
        metavar="NAMESPACE/NAME",
        help="follow the config the operator renders into this Secret (watched through the API)",
    )
    router.add_argument("--kubeconfig", help="with --kube-secret: kubeconfig file (default: in-cluster)")
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
    router.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client gets to send a request's head, and the longest pause within its body (408)",
    )
    router.add_argument(
        "--max-header-bytes", type=int, default=64 * 1024, help="largest request head accepted (431)"
    )
    router.add_argument("--ssl-certfile")
    router.add_argument("--ssl-keyfile")
    router.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    router.set_defaults(func=_router)

    op = sub.add_parser("operator", help="run the Kubernetes operator (CRs -> the router config Secret)")
    op.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    op.add_argument("--namespace", help="where the config Secret and the leader Lease live (default: own)")
    op.add_argument(
        "--watch-namespace",
        action="append",
        metavar="NS",
        help="render resources of this namespace (repeatable; default: all namespaces)",
    )
    op.add_argument("--router-settings", metavar="FILE", help="YAML of the router `settings` block to render")
    op.add_argument("--config-secret", default="kubellm-router-config", help="name of the rendered Secret")
    op.add_argument("--lease-name", default="kubellm-operator")
    op.add_argument("--no-leader-election", action="store_true", help="no Lease (one replica only)")
    op.add_argument("--poll-interval", type=float, default=10.0, help="seconds between status updates")
    op.add_argument(
        "--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    op.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    op.set_defaults(func=_operator)

    render = sub.add_parser("render", help="render CR YAML (and Secrets) to router config JSON, offline")
    render.add_argument("-f", "--filename", action="append", required=True, help="file, dir or -")
    render.add_argument("-n", "--namespace", default="default", help="namespace of documents that name none")
    render.add_argument("--router-settings", metavar="FILE", help="YAML of the router `settings` block")
    render.add_argument("-o", "--output", help="write the JSON here instead of stdout")
    render.add_argument(
        "--show-secrets", action="store_true", help="keep upstream credentials inline (default: redacted)"
    )
    render.set_defaults(func=_render)

    docs = sub.add_parser("config-docs", help="print the config reference generated from the schema")
    docs.add_argument("-o", "--output")
    docs.set_defaults(func=_config_docs)

    from kubellm.keys_cli import add_parser as add_keys_parser

    add_keys_parser(sub)
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
