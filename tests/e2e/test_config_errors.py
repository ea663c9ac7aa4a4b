"""A sweep with one invalid job: the bad job fails alone (one line, failed.json, no result), the valid edge values
(router.threshold=0, router.max_tasks=null) run, the sweep exits 2 and mass-exp-report lists the failed job."""

from __future__ import annotations

import json

from tests.e2e.conftest import SMOKE, find_results, run_cli


def test_bad_job_of_a_sweep_fails_alone_and_the_report_lists_it(first_run, smoke_root, capsys):
    out = smoke_root / "sweep_bad_job"
    proc = run_cli(["-m"] + SMOKE + ["router.threshold=0,1.5", "router.max_tasks=null", "logger=none",
                                     "eval.max_samples_per_task=30"], out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: router.threshold=")]
    assert len(errors) == 1 and errors[0].startswith("error: router.threshold=1.5: "), proc.stderr[-3000:]
    (res,) = find_results(out)  # the valid edge values ran to the end
    assert res["config"]["router"]["threshold"] == 0 and res["config"]["router"]["max_tasks"] is None
    (failed,) = list(out.rglob("failed.json"))
    assert not (failed.parent / "results.json").exists()
    assert json.loads(failed.read_text())["error"] == errors[0]

    from mass_exp.cli import report

    report([str(out), "--no-published"])
    captured = capsys.readouterr()
    assert f"failed: {failed.parent}: {errors[0]}" in captured.err
    assert "## Failed jobs" in captured.out and "router.threshold=1.5" in captured.out
