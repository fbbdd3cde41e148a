"""The `kubellm keys` command line: flags to ApiKey specs, the output, exit codes (kubellm.keys
does the work). A new key goes to stdout alone, once; everything else goes to stderr."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson

from kubellm.keys import (
    APIKEY_LABEL,
    EXIT_ERROR,
    EXIT_USAGE,
    Issued,
    Keys,
    KeysError,
    parse_expiry,
    secret_name_of,
    warn,
)
from kubellm.router.kube import KubeClient, KubeError, auto_config


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if args.owner:
        spec["owner"] = args.owner
    if args.team:
        spec["team"] = args.team
    models = [m.strip() for item in args.model or () for m in item.split(",") if m.strip()]
    if models:
        spec["models"] = models
    limits = {
        k: v for k, v in (("rpm", args.rpm), ("tpm", args.tpm), ("maxParallelRequests", args.max_parallel))
        if v is not None
    }  # fmt: skip
    if limits:
        spec["limits"] = limits
    if args.budget is not None:
        spec["budget"] = {"amountUsd": args.budget, "period": args.period}
    elif args.period != "monthly":
        raise KeysError("--period needs --budget", EXIT_USAGE)
    if args.expires:
        spec["expiresAt"] = parse_expiry(args.expires)
    if args.cache:
        spec["cache"] = True
    if args.secret_name:
        spec["secretName"] = args.secret_name
    return spec


# ---- output -----------------------------------------------------------------------------


def _ready(item: Mapping[str, Any]) -> str:
    for cond in (item.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("status", ""))
    return "Unknown"


def _age(created: str, now: datetime) -> str:
    try:
        seconds = int((now - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds())
    except ValueError:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def summary(item: Mapping[str, Any]) -> dict[str, Any]:
    """What `list` shows of an ApiKey: its spec and status, never a key value (ApiKeys hold none)."""
    meta, spec, status = item.get("metadata") or {}, item.get("spec") or {}, item.get("status") or {}
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "owner": spec.get("owner"),
        "team": spec.get("team"),
        "models": spec.get("models") or [],
        "keyPrefix": status.get("keyPrefix"),
        "state": status.get("state"),
        "ready": _ready(item),
        "spend": status.get("spendSummary"),
        "expiresAt": spec.get("expiresAt"),
        "disabled": bool(spec.get("disabled")),
        "secretName": secret_name_of(item),
        "created": meta.get("creationTimestamp"),
    }


def table(items: list[dict[str, Any]], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    header = ["NAME", "OWNER", "TEAM", "MODELS", "KEY", "STATE", "READY", "SPEND/BUDGET", "EXPIRES", "AGE"]
    rows = [header]
    for item in items:
        s = summary(item)
        rows.append([
            str(s["name"]), s["owner"] or "-", s["team"] or "-", ",".join(s["models"]) or "*",
            f"{s['keyPrefix']}…" if s["keyPrefix"] else "-", s["state"] or "-", s["ready"],
            s["spend"] or "-", s["expiresAt"] or "-", _age(str(s["created"] or ""), now),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return (
        "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
        + "\n"
    )


# ---- the command ------------------------------------------------------------------------


def _die(message: str, code: int) -> NoReturn:
    raise KeysError(message, code)


async def _run(args: argparse.Namespace) -> int:
    try:
        config = auto_config(args.kubeconfig)
    except KubeError as err:
        _die(f"no Kubernetes credentials: {err}", EXIT_ERROR)
    namespace = args.namespace or config.namespace
    async with KubeClient(config) as client:
        keys = Keys(client, namespace)
        command: Callable[[Keys, argparse.Namespace], Awaitable[int]] = args.keys_func
        return await command(keys, args)


def _show_issued(issued: Issued, verb: str, namespace: str) -> None:
    print(
        f"ApiKey {namespace}/{issued.api_key['metadata']['name']} {verb}; key {issued.prefix}… in Secret "
        f"{issued.secret_name}. The key is printed once, below; `kubellm keys` will not show it again.",
        file=sys.stderr,
    )
    sys.stdout.write(issued.key + "\n")
    sys.stdout.flush()


async def _await_rendered(keys: Keys, issued: Issued, seconds: float) -> int:
    if seconds <= 0:
        return 0
    name = str(issued.api_key["metadata"]["name"])
    if await keys.wait_rendered(name, issued.prefix, seconds):
        print(f"ApiKey {keys.namespace}/{name}: the key is live on the routers", file=sys.stderr)
        return 0
    print(
        f"kubellm keys: ApiKey {keys.namespace}/{name} not Ready with key {issued.prefix}… "
        f"after {seconds:g}s (is the operator running? `kubectl describe apikey {name} -n {keys.namespace}`)",
        file=sys.stderr,
    )
    return EXIT_ERROR


async def _create(keys: Keys, args: argparse.Namespace) -> int:
    issued = await keys.create(args.name, spec_from_args(args))
    _show_issued(issued, "created", keys.namespace)
    return await _await_rendered(keys, issued, args.wait)


async def _rotate(keys: Keys, args: argparse.Namespace) -> int:
    issued = await keys.rotate(args.name)
    _show_issued(issued, "rotated (the old key stops working once the routers reload)", keys.namespace)
    return await _await_rendered(keys, issued, args.wait)


async def _revoke(keys: Keys, args: argparse.Namespace) -> int:
    left = await keys.revoke(args.name)
    print(f"ApiKey {keys.namespace}/{args.name} revoked", file=sys.stderr)
    if left:
        warn(f"Secret {left!r} is not labelled {APIKEY_LABEL}={args.name}; left it in place")
    return 0


async def _list(keys: Keys, args: argparse.Namespace) -> int:
    items = await keys.list()
    if args.output == "json":
        sys.stdout.write(
            orjson.dumps([summary(i) for i in items], option=orjson.OPT_INDENT_2).decode() + "\n"
        )
    elif items:
        sys.stdout.write(table(items))
    else:
        print(f"No ApiKeys in namespace {keys.namespace}.", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeysError as err:
        print(f"kubellm keys {args.keys_command}: {err.message}", file=sys.stderr)
        return err.code


def add_parser(sub: Any) -> None:
    """``kubellm keys ...`` on the top-level subparsers of kubellm.cli."""
    keys = sub.add_parser("keys", help="create, rotate, revoke and list API keys (ApiKey resources)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace of the keys (default: the kubeconfig context's)")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")

    create = keys_sub.add_parser("create", parents=[common], help="create an ApiKey; prints the new key once")
    create.add_argument("name", help="the ApiKey's name")
    create.add_argument("--owner", help="who the key belongs to")
    create.add_argument("--team", help="the owner's team")
    create.add_argument(
        "--model", action="append", help="model group the key may use (repeatable; default all)"
    )
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--max-parallel", type=int, help="concurrent requests")
    create.add_argument(
        "--budget", metavar="USD", help='spend budget per period, a decimal like "25" or "12.50"'
    )
    create.add_argument(
        "--period", default="monthly", help="budget period: daily, weekly, monthly or e.g. 12h"
    )
    create.add_argument("--expires", help="RFC 3339 time, or a duration from now like 30d")
    create.add_argument("--cache", action="store_true", help="opt the key into the response cache")
    create.add_argument("--secret-name", help="the Secret for the key (default NAME-apikey)")
    _wait_arg(create)
    create.set_defaults(keys_func=_create)

    rotate = keys_sub.add_parser("rotate", parents=[common], help="replace a key; prints the new key once")
    rotate.add_argument("name")
    _wait_arg(rotate)
    rotate.set_defaults(keys_func=_rotate)

    revoke = keys_sub.add_parser("revoke", parents=[common], help="delete an ApiKey and its key Secret")
    revoke.add_argument("name")
    revoke.set_defaults(keys_func=_revoke)

    lst = keys_sub.add_parser("list", parents=[common], help="list ApiKeys (prefixes only, never keys)")
    lst.add_argument("-o", "--output", choices=["table", "json"], default="table")
    lst.set_defaults(keys_func=_list)
    keys.set_defaults(func=run)


def _wait_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then wait up to this long for the operator to put the key on the routers",
    )
