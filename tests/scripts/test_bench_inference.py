"""Smoke test of scripts/bench_inference.py on the tiny backbone (seconds): it runs and prints every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_inference.py"


def test_bench_inference_tiny(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--tasks", "3", "--batch-size", "8", "--batches", "2",
           "--workdir", str(tmp_path / "work"), "--json", str(out_json)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for line in ("static:", "MASS cold cache:", "MASS warm cache:", "MASS/static =", "breakdown: pass1_s",
                 "expert cache:", "|Omega| over 16 samples:", "distinct Omega per batch:", "target MASS <= 1.85x",
                 "target MASS <= 2.2x", "expert build (in place, s per build) by |Omega|:"):
        assert line in out, (line, out)
    res = json.loads(out_json.read_text())
    assert sum(res["set_size_counts"].values()) == 16
    assert res["mass_warm"]["expert_cache"]["builds"] == 0  # warm: every expert was built before the timing
    assert res["mass_cold"]["expert_cache"]["builds"] >= 1
    assert res["mass_cold"]["ratio"] > 0 and res["mass_warm"]["ratio"] > 0  # the keys other tools read
    assert set(res["expert_build_s_by_size"]) == {"1", "2", "3"}
    cache = res["mass_cold"]["expert_cache"]
    assert cache["peak_bytes"] <= cache["max_bytes"] and cache["peak_bytes"] >= cache["expert_bytes"]
    # second run reuses the endpoints and the factor store
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "endpoints: reusing 3 endpoints" in proc.stdout
    assert "factor store loaded from cache" in proc.stderr
