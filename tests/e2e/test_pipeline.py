"""The whole mini pipeline through the real entry point, on a reduced configuration."""

from __future__ import annotations


import pytest

from .conftest import SMOKE, find_results, run_cli

pytestmark = pytest.mark.slow


def test_first_run_writes_complete_results(first_run):
    proc, out = first_run
    (res,) = find_results(out)
    assert res["status"] == "complete"
    assert res["method"] == "task_arithmetic" and res["alpha"] == pytest.approx(0.3)  # suite.fixed_alpha of mini
    assert list(res["tasks"]) == ["angles", "ramps", "locations"]
    for name, e in res["tasks"].items():
        assert e["samples"] == 101
        assert e["acc"] == pytest.approx(e["correct"] / 101)
        assert e["normalized_acc"] == pytest.approx(e["acc"] / e["finetuned_acc"])
    avg = res["average"]
    assert avg["acc"] == pytest.approx(sum(e["acc"] for e in res["tasks"].values()) / 3)
    assert res["config"]["suite"]["tasks"] == ["angles", "ramps", "locations"]
    # the printed table and an offline W&B run directory
    assert "average" in proc.stdout and "normalized" in proc.stdout
    runs = list(out.rglob("wandb/offline-run-*"))
    assert runs, "no offline W&B run directory"
    records = list(out.rglob("offline-run-*/run-*.wandb"))  # the offline run's record log (protobuf)
    assert records
    blob = records[0].read_bytes()
    for key in (b"acc/test/angles", b"normalized_acc/test/avg", b"results"):
        assert key in blob, key


def test_second_run_reuses_cached_assets(first_run, smoke_root):
    out = smoke_root / "second"
    proc = run_cli(SMOKE + ["method=task_arithmetic", "router=none", "logger=none"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "pretraining the tiny CLIP" not in log and "fine-tuned" not in log
    (res,) = find_results(out)
    (ref,) = find_results(first_run[1])
    assert res["tasks"] == ref["tasks"]


def test_multirun_over_methods(first_run, smoke_root):
    out = smoke_root / "multi"
    proc = run_cli(["-m"] + SMOKE + ["method=zeroshot,finetuned,task_arithmetic", "router=none", "logger=csv"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["method"]: r for r in find_results(out)}
    assert set(results) == {"zeroshot", "finetuned", "task_arithmetic"}
    ft, zs = results["finetuned"], results["zeroshot"]
    assert ft["average"]["normalized_acc"] == pytest.approx(1.0)
    assert ft["average"]["acc"] > zs["average"]["acc"]
    assert zs["alpha"] is None and ft["alpha"] is None


def test_default_run_is_mass(first_run, smoke_root):
    out = smoke_root / "default"
    proc = run_cli(SMOKE + ["logger=none"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = find_results(out)
    assert res["method"] == "tsv_m" and res["router"]["name"] == "projection"


def test_bad_task_gives_one_line_error(smoke_root):
    proc = run_cli(SMOKE + ["suite.tasks=[angles,nope]"], smoke_root / "bad")
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "'nope'" in lines[0]


def test_finetune_entry_point_lists_endpoints(first_run, smoke_root):
    proc = run_cli(SMOKE, smoke_root / "ft", entry="finetune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = [l.split() for l in proc.stdout.splitlines() if l.strip()]
    assert [l[0] for l in listed[-3:]] == ["angles", "ramps", "locations"]
    assert all(l[1].endswith(".safetensors") for l in listed[-3:])


def test_validation_protocols_record_their_choice(first_run, smoke_root):
    out = smoke_root / "protocols"
    proc = run_cli(SMOKE + ["method=consensus", "router=none", "logger=none", "method.lambda_protocol=validation",
                            "method.alpha_protocol=validation", "method.alpha_grid=[0.1,0.3]"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = find_results(out)
    sel = res["lambda_selection"]
    assert len(sel["lambdas"]) == 3
    for lam, (name, curve) in zip(sel["lambdas"], sel["curve"].items()):
        assert lam == max(curve, key=lambda c: c["acc"])["lambda"]
        assert [c["lambda"] for c in curve] == [0.2, 0.3, 0.4, 0.5, 0.6]
    assert res["config"]["method"]["lambdas"] == sel["lambdas"]
    assert res["alpha_protocol"] == "validation" and res["alpha"] in (0.1, 0.3)
    best = max(res["alpha_sweep"], key=lambda c: c["normalized_acc"])
    assert res["alpha"] == best["alpha"] and len(res["alpha_sweep"]) == 2
