#!/usr/bin/env python3
"""kubellm under fire: sustained load while upstreams fail, a router is SIGKILLed and Redis restarts.

The long version of ``tests/test_chaos.py`` (same harness, ``tests/support/chaos.py``): it repeats
the fault cycle ``--cycles`` times (36 s each) and prints the measurements, the bounds and
whether each held. Everything runs on 127.0.0.1: ``redis-server`` and ``nginx`` must be installed.

    python bench/chaos.py                      # 5 cycles, 3 minutes of load
    python bench/chaos.py --cycles 1 --json out.json
    python bench/chaos.py --routers 3 --workers 48 --keys 50

The exit code is 1 when a bound did not hold. docs/RELIABILITY.md explains each number.
"""

from __future__ import annotations

import argparse
import sys
import time
from decimal import Decimal
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.chaos import ChaosOptions, chaos_run, check_bounds, render


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=5, help="fault cycles of 36 s each (default 5)")
    parser.add_argument("--routers", type=int, default=2, help="router processes behind nginx (>= 2)")
    parser.add_argument("--workers", type=int, default=24, help="concurrent load workers")
    parser.add_argument("--keys", type=int, default=20, help="virtual keys the load spreads over")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streamed calls")
    parser.add_argument("--rpm", type=int, default=40, help="rpm limit of the rate-limited key")
    parser.add_argument("--budget", default="0.03", help="USD budget of the budget-limited key")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the full report here")
    args = parser.parse_args()
    if args.routers < 2:
        parser.error("--routers must be at least 2 (one of them is killed)")
    options = ChaosOptions(
        cycles=args.cycles,
        routers=args.routers,
        load_workers=args.workers,
        load_keys=args.keys,
        stream_share=args.stream_share,
        rpm=args.rpm,
        budget_usd=Decimal(args.budget),
        seed=args.seed,
    )
    started = time.monotonic()
    with chaos_run(options, log=lambda line: print(f"[{time.monotonic() - started:6.1f}s] {line}")) as report:
        failures = check_bounds(report, options)
    print()
    print(render(report))
    print()
    if args.json:
        options_doc = {**vars(args), "json": str(args.json)}
        doc = {"options": options_doc, "report": report.to_dict(), "failures": failures}
        args.json.write_bytes(
            orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)
        )
        print(f"report written to {args.json}")
    if failures:
        print("BOUNDS NOT HELD:")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print("every bound held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
