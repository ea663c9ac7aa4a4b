"""Smoke test of scripts/bench_build_workers.py on the small tower: it runs both ways and prints every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_build_workers.py"


@pytest.mark.slow
def test_bench_build_workers_small(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--arch", "mass-tiny-ViT", "--trainable", "all", "--batch", "8",
           "--steps", "2", "--threads", "2", "--json", str(out_json)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for line in ("one process, 2 threads:", "2 processes, 1 thread each:", "side by side / one process:"):
        assert line in proc.stdout, (line, proc.stdout)
    res = json.loads(out_json.read_text())
    assert len(res["side_by_side_s_per_step"]) == 2 and all(s > 0 for s in res["side_by_side_s_per_step"])
    assert res["speedup"] == pytest.approx(res["side_by_side_steps_per_s"] / res["one_process_steps_per_s"])
