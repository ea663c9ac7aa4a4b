"""Fine-tuning the mini endpoints in worker processes (`endpoints.build_workers`) builds the same endpoints."""

from __future__ import annotations

import shutil

import pytest

from mass_exp.utils.io import load_tensors

from .conftest import SMOKE, find_results, run_cli

pytestmark = pytest.mark.slow


def test_parallel_fine_tunes_build_the_endpoints_of_the_sequential_build(first_run, smoke_root, tmp_path):
    src = smoke_root / "cache"
    cache = tmp_path / "cache"  # run_cli's cache for out=tmp_path/"out": the smoke data and pretrained CLIP only
    shutil.copytree(src / "data", cache / "data")
    (cache / "mini").mkdir(parents=True)
    for p in (src / "mini").glob("pretrained-*.safetensors"):
        if not p.stem.endswith("-visual"):
            shutil.copy(p, cache / "mini" / p.name)
    out = tmp_path / "out"
    proc = run_cli(SMOKE + ["method=task_arithmetic", "router=none", "logger=none", "endpoints.build_workers=2"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "fine-tuning 3 endpoints in 2 processes of 1 thread(s) each" in log
    assert "pretraining the tiny CLIP" not in log and log.count("fine-tuned ") >= 3
    sequential = sorted((src / "mini").glob("finetuned-*.safetensors"))
    assert [p.name for p in sorted((cache / "mini").glob("finetuned-*.safetensors"))] == [p.name for p in sequential]
    (pre_file,) = (src / "mini").glob("pretrained-*-visual.safetensors")
    pre = load_tensors(pre_file)
    for p in sequential:
        # the same fine-tune: one thread per worker only reorders floating-point sums, which Adam's normalised steps
        # carry into the weights (here 0.2% of the task vector); another seed or recipe moves them by ~100%
        a, b = load_tensors(p), load_tensors(cache / "mini" / p.name)
        assert a.keys() == b.keys()
        diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
        tau = sum(float(((a[k] - pre[k]) ** 2).sum()) for k in a) ** 0.5
        assert diff <= 0.02 * tau, (p.name, diff / tau)
    (res,) = find_results(out)
    (ref,) = find_results(first_run[1])
    for t, e in res["tasks"].items():
        assert abs(e["finetuned_acc"] - ref["tasks"][t]["finetuned_acc"]) <= 1 / e["samples"] + 1e-9, t
        assert abs(e["acc"] - ref["tasks"][t]["acc"]) <= 1 / e["samples"] + 1e-9, t
