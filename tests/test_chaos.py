"""Load with faults, end to end: routers behind nginx, a real Redis, fake upstreams, SIGKILLs.

The short version of ``bench/chaos.py`` (one fault cycle, about 36 s of load); what each number
means and why each bound holds is in ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

from tests.support.chaos import ChaosOptions, chaos_run, check_bounds, render


def test_faults_under_load_keep_every_bound() -> None:
    options = ChaosOptions()
    with chaos_run(options, log=lambda line: print(f"[chaos] {line}")) as report:
        print(render(report))
        failures = check_bounds(report, options)
        assert not failures, "\n".join(failures) + "\n\n" + render(report)
        # The run was a real load: most calls succeeded, and every fault happened under it.
        assert report.succeeded >= 0.8 * report.calls and report.throughput >= 20
        assert {f["fault"] for f in report.faults} >= {"kill -9 router", "redis restart", "config swap"}
