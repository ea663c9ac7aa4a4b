"""scripts/task_geometry.py on the e2e fixture's reduced mini suite (reuses its cached endpoints)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SMOKE

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "task_geometry.py"


def test_task_geometry_script(first_run, smoke_root, tmp_path):
    env = dict(os.environ, MASS_EXP_OUTPUT_DIR=str(smoke_root / "first"), MASS_EXP_CACHE_DIR=str(smoke_root / "cache"),
               WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = tmp_path / "geometry.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMOKE, "--json", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "pairwise cosine" in proc.stdout and "mean |cosine|" in proc.stdout
    g = json.loads(out.read_text())
    assert list(g) == ["tasks", "cosine", "norm_ratio", "pair_tsv_m_normalized", "mean_pair_tsv_m_normalized",
                       "mean_abs_cosine", "disentanglement_error"]
    assert g["tasks"] == ["angles", "ramps", "locations"]
    assert set(g["pair_tsv_m_normalized"]) == set(g["disentanglement_error"]) == {
        "angles+ramps", "angles+locations", "ramps+locations"}
    assert all(0 < v <= 150 for v in g["pair_tsv_m_normalized"].values())
    assert all(0 <= v <= 100 for v in g["disentanglement_error"].values())
    assert all(abs(g["cosine"][i][i] - 1) < 1e-5 for i in range(3))
    assert all(0 < r < 1 for r in g["norm_ratio"].values())
    # a bad override is one line, not a traceback
    bad = subprocess.run([sys.executable, str(SCRIPT), *SMOKE, "suite.tasks=[angles]"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: task_geometry needs"), \
        bad.stderr[-2000:]
