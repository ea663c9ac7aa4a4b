"""MASS through the real entry point: routed two-pass inference, its diagnostics, and the oracle = tsv_c identity."""

from __future__ import annotations

import pytest

from .conftest import SMOKE, run_cli, run_smoke as _run

pytestmark = pytest.mark.slow


def test_mass_projection_router_reports_diagnostics(first_run, smoke_root):
    proc, res = _run(["method=tsv_m", "router=projection", "router.block=4"], smoke_root / "mass")
    assert res["router"]["name"] == "projection"
    assert res["router"]["routing_layer"] == "transformer.resblocks.4.mlp.c_fc.weight"  # the paper's (mlp_in)
    for name, e in res["tasks"].items():
        for key in ("acc_paper_rule", "router_task_id_acc", "router_survival"):
            assert 0.0 <= e[key] <= 1.0, (name, key)
        assert 1.0 <= e["router_mean_tasks"] <= 3.0
        # strict scoring can only lose against the paper's looser rule
        assert e["acc"] <= e["acc_paper_rule"] + 1e-9
    cm = res["router"]["confusion_matrix"]
    assert [sum(row) for row in cm] == [e["samples"] for e in res["tasks"].values()]
    cache = res["router"]["expert_cache"]
    assert cache["builds"] >= 1 and cache["misses"] == cache["builds"]
    assert {"hits", "evictions", "build_time_s", "peak_bytes", "max_bytes"} <= set(cache)
    assert cache["expert_bytes"] <= cache["peak_bytes"] <= cache["max_bytes"]
    assert res["eval_precision"] == "32-true"
    assert (next(iter((smoke_root / "mass").rglob("router_confusion.png")))).stat().st_size > 0
    assert "router id" in proc.stdout


def test_attn_in_router_projects_on_the_attention_input(first_run, smoke_root):
    """router.routing_param=attn_in: the router's bases are the subspaces of attn.in_proj_weight (the feature, ln_1's
    output, is checked in tests/routing)."""
    _, res = _run(["method=tsv_m", "router=projection", "router.block=4", "router.routing_param=attn_in"],
                  smoke_root / "mass_attn_in")
    assert res["router"]["routing_layer"] == "transformer.resblocks.4.attn.in_proj_weight"
    assert res["config"]["router"]["routing_param"] == "attn_in"
    for e in res["tasks"].values():
        assert 0.0 <= e["router_task_id_acc"] <= 1.0 and 1.0 <= e["router_mean_tasks"] <= 3.0


def test_oracle_router_equals_tsv_c(first_run, smoke_root):
    _, oracle = _run(["method=tsv_m", "router=oracle"], smoke_root / "oracle")
    _, tsv_c = _run(["method=tsv_c", "router=none"], smoke_root / "tsv_c")
    assert {n: e["correct"] for n, e in oracle["tasks"].items()} == {n: e["correct"] for n, e in tsv_c["tasks"].items()}
    assert all(e["router_survival"] == 1.0 and e["router_mean_tasks"] == 1.0 for e in oracle["tasks"].values())


def test_batched_router_selects_one_task_per_batch(first_run, smoke_root):
    _, res = _run(["method=tsv_m", "router=batched_projection", "eval.batch_size=32"], smoke_root / "batched")
    assert res["eval_batch_size"] == 32
    assert all(e["router_mean_tasks"] == 1.0 for e in res["tasks"].values())


def test_router_with_per_task_method_is_refused(first_run, smoke_root):
    proc = run_cli(SMOKE + ["method=finetuned", "router=projection"], smoke_root / "refused")
    assert proc.returncode == 2
    assert "per-task" in proc.stderr and proc.stderr.count("error:") == 1
