"""SMILE, task-agnostic static scoring and the sample-based routers through the real entry point."""

from __future__ import annotations

import pytest

from .conftest import find_results, run_smoke as _run

pytestmark = pytest.mark.slow


def test_task_agnostic_static_scoring_can_only_lose(first_run, smoke_root):
    known = find_results(first_run[1])[0]  # task_arithmetic, task known
    _, res = _run(["method=task_arithmetic", "router=none", "eval.task_known=false"], smoke_root / "agnostic")
    assert known["task_known"] is True and res["task_known"] is False
    for name, e in res["tasks"].items():
        # right head and right class is a subset of right class with the right head given
        assert e["correct"] <= known["tasks"][name]["correct"], name
        assert 0.0 <= e["router_task_id_acc"] <= 1.0 and e["acc"] <= e["acc_paper_rule"] + 1e-9


def test_smile_runs_and_refuses_a_router(first_run, smoke_root):
    proc, res = _run(["method=smile", "router=none", "method.gate_k=4", "method.k=8"], smoke_root / "smile")
    assert res["method"] == "smile" and res["alpha"] is None
    assert (res["config"]["method"]["gate_k"], res["config"]["method"]["k"], res["config"]["method"]["top_k"]) == (4, 8, 2)
    logs = "".join(p.read_text() for p in (smoke_root / "smile").rglob("*.log"))
    assert "SMILE (gate_k=4, k=8, top_k=2) over 3 tasks" in logs
    # its refusal of a router: tests/config/test_validation.py (exit 2 through the CLI: test_config_errors.py)


def test_sample_routers_record_their_samples_and_cache_the_mlp(first_run, smoke_root):
    _, nn = _run(["router=nearest_neighbour", "router.samples_per_task=8"], smoke_root / "nn")
    assert nn["router"]["samples"]["split"] == "train" and nn["router"]["samples"]["samples_per_task"] == 8
    assert all(e["router_mean_tasks"] == 1.0 for e in nn["tasks"].values())  # top-1
    mlp_args = ["router=mlp", "router.samples_per_task=32", "router.train.max_epochs=2"]
    _, mlp = _run(mlp_args, smoke_root / "mlp")
    assert mlp["router"]["samples"]["cached"] is False and mlp["router"]["samples"]["samples"] == 3 * 32
    _, again = _run(mlp_args + ["resume=false"], smoke_root / "mlp_again")
    assert again["router"]["samples"]["cached"] is True
    assert {n: e["correct"] for n, e in again["tasks"].items()} == {n: e["correct"] for n, e in mlp["tasks"].items()}
    # router.split=test is refused: tests/config/test_validation.py
