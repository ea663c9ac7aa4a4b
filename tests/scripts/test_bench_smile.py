"""Smoke test: scripts/bench_inference.py --smile on the tiny backbone builds SMILE and times it against static."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_inference.py"


def test_bench_inference_smile_tiny(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--tasks", "2", "--batch-size", "4", "--batches", "1",
           "--skip-warm", "--smile", "--smile-config", "4", "8", "2", "--workdir", str(tmp_path / "work"),
           "--json", str(out_json)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SMILE (gate_k 4, k 8, top_k 2): built in" in proc.stdout, proc.stdout
    res = json.loads(out_json.read_text())["smile"]
    # tiny tower, T=2: the store keeps min(m, n)/2 >= 8 components of out_proj / c_fc / c_proj (4 blocks x 3 layers)
    assert res["layers_from_store"] == 4 * 3 and res["layers_decomposed"] == 4 * 3  # q, k, v always decomposed
    assert res["ratio"] > 0 and res["expert_mb"] > 0


def test_bench_inference_smile_only_from_synthetic_factors(tmp_path):
    """--smile --synthetic-factors --skip-mass (how ViT-L-14 x 20 is measured): every SMILE layer, q/k/v included,
    takes its factors from the drawn store; nothing is decomposed and no MASS run happens."""
    out_json = tmp_path / "bench.json"
    base = [sys.executable, str(SCRIPT), "--tiny", "--tasks", "3", "--batch-size", "4", "--batches", "1", "--smile",
            "--smile-config", "4", "8", "2", "--synthetic-factors"]
    proc = subprocess.run(base + ["--skip-mass", "--json", str(out_json)], check=False, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out_json.read_text())
    assert "mass_cold" not in res and res["svd"] == "synthetic"
    assert res["smile"]["layers_from_store"] == 4 * 6 and res["smile"]["layers_decomposed"] == 0  # q,k,v,out,fc,proj
    assert res["smile"]["ratio"] > 0 and res["peak_rss_mb"] >= res["peak_rss_mb_before_smile"]
    refused = subprocess.run(base, check=False, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--skip-mass" in refused.stderr
