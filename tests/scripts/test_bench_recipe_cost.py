"""Smoke test of scripts/bench_recipe_cost.py on the small tower: every variant runs and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_recipe_cost.py"


@pytest.mark.slow
def test_bench_recipe_cost_small(tmp_path):
    out_json = tmp_path / "cost.json"
    cmd = [sys.executable, str(SCRIPT), "--pretrain", "mass-tiny-ViT:0", "mass-tiny-ViT:0.5",
           "--finetune", "mass-tiny-ViT:plain", "mass-tiny-ViT:linearized", "--pretrain-batch", "16",
           "--finetune-batch", "8", "--steps", "1", "--rounds", "2", "--json", str(out_json)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out_json.read_text())["variants"]
    names = ["pretrain mass-tiny-ViT patch_dropout=0", "pretrain mass-tiny-ViT patch_dropout=0.5",
             "finetune mass-tiny-ViT plain", "finetune mass-tiny-ViT linearized"]
    assert list(res) == names
    for name in names:
        assert name in proc.stdout
        v = res[name]
        assert len(v["rounds_s_per_step"]) == 2 and all(t > 0 for t in v["rounds_s_per_step"])
    assert res[names[0]]["speedup_vs_first"] == 1.0 and res[names[2]]["speedup_vs_first"] == 1.0
    assert res[names[3]]["speedup_vs_first"] == pytest.approx(res[names[2]]["s_per_step"] / res[names[3]]["s_per_step"])


def test_bench_recipe_cost_rejects_a_bad_variant():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--finetune", "mass-tiny-ViT:tangent"], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--finetune 'mass-tiny-ViT:tangent': give ARCH:plain or ARCH:linearized" in proc.stderr
