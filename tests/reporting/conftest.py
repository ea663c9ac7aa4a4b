"""Synthetic but schema-true results.json files for the report tests: configs composed from conf/, averages from
the pipeline's own `_averages`, task accuracies chosen so every average is a round number."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mass_exp.pipeline import _averages

CONF = Path(__file__).resolve().parents[2] / "conf"


@lru_cache(maxsize=None)
def _config(backbone: str, suite: str, variant: str, extra: tuple[str, ...] = ()) -> str:
    suite_choice = suite if suite == "mini" else f"'{suite}'"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"backbone={backbone}", f"suite={suite_choice}",
                                                        f"+experiment/variant={variant}", *extra])
    return json.dumps(OmegaConf.to_container(cfg, resolve=True))


def _make_result(variant: str, backbone: str, suite: str, acc: float, *, endpoints: str = "mini",
                paper_rule: float | None = None, extra: tuple[str, ...] = (), finetuned: float = 0.8,
                status: str = "complete", group: str | None = None) -> dict:
    """A results.json as `run_evaluation` writes it. Task accuracies alternate acc -/+ 0.02 (mean = acc);
    every endpoint's fine-tuned accuracy is `finetuned`, so average normalized accuracy = acc / finetuned."""
    cfg = json.loads(_config(backbone, suite, variant, extra))
    cfg["endpoints"]["source"] = endpoints
    if group:
        cfg["logger"]["group"] = group
    tasks = cfg["suite"]["tasks"]
    routed = cfg["router"]["name"] != "none"
    agnostic = not routed and cfg["eval"].get("task_known") is False  # a static run scored without the task
    per_task = {}
    for i, t in enumerate(tasks):
        a = acc + (0.02 if i % 2 else -0.02)
        e = {"acc": a, "correct": int(a * 1000), "samples": 1000, "finetuned_acc": finetuned,
             "normalized_acc": a / finetuned}
        if routed:
            e.update({"acc_paper_rule": (paper_rule if paper_rule is not None else acc) + (0.02 if i % 2 else -0.02),
                      "router_mean_tasks": 1.5, "router_survival": 0.99, "router_task_id_acc": 0.9})
        if agnostic:
            e.update({"acc_paper_rule": (paper_rule if paper_rule is not None else acc) + (0.02 if i % 2 else -0.02),
                      "router_task_id_acc": 0.9})
        per_task[t] = e
    alpha = cfg["method"].get("alpha")
    res = {
        "status": status, "method": cfg["method"]["name"], "router": {"name": cfg["router"]["name"]},
        "backbone": cfg["backbone"]["name"], "suite": cfg["suite"]["name"], "alpha": alpha,
        "alpha_protocol": cfg["method"].get("alpha_protocol", "fixed") if alpha is not None else None,
        "alpha_sweep": [], "lambda_selection": None,
        "finetuned_acc_source": f"measured ({endpoints} endpoints, test split)", "tasks": per_task,
        "average": _averages(per_task), "eval_batch_size": cfg["eval"]["batch_size"], "seconds": 1.0, "config": cfg,
        "task_known": not agnostic and not routed,
    }
    if res["alpha_protocol"] == "validation":
        res["alpha_sweep"] = [{"alpha": alpha, "acc": acc, "normalized_acc": acc / finetuned}]
    if routed:
        n = len(tasks)
        res["router"].update({"confusion_matrix": [[90 if i == j else 10 // max(n - 1, 1) for j in range(n)]
                                                   for i in range(n)], "timings_s": {}, "expert_cache": {}})
    return res


def _write(root: Path, name: str, res: dict | str, mtime: float | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    f = d / "results.json"
    f.write_text(res if isinstance(res, str) else json.dumps(res))
    if mtime is not None:
        os.utime(f, (mtime, mtime))
    return f


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Mini runs, ViT-B-32/8 on the retrained endpoints, ViT-L-14/14 on the TALL-masks endpoints, an incomplete
    run, a half-written file and a duplicate."""
    root = tmp_path_factory.mktemp("sweep")
    runs = [
        ("mini/0", _make_result("zeroshot", "tiny", "mini", 0.40, group="main_table_mini")),
        ("mini/1", _make_result("tsv_m", "tiny", "mini", 0.48, group="main_table_mini")),
        ("mini/2", _make_result("mass", "tiny", "mini", 0.56, paper_rule=0.60, group="main_table_mini")),
        ("b32/0", _make_result("tsv_m", "ViT-B-32", "8", 0.70, endpoints="retrained")),
        ("b32/1", _make_result("mass", "ViT-B-32", "8", 0.72, paper_rule=0.76, endpoints="retrained")),
        ("b32/2", _make_result("task_arithmetic", "ViT-B-32", "8", 0.60, endpoints="retrained")),
        ("b32/3", _make_result("ties", "ViT-B-32", "8", 0.62, endpoints="retrained")),
        ("l14/0", _make_result("tsv_m", "ViT-L-14", "14", 0.84, endpoints="tall_masks",
                              extra=("method.alpha_protocol=validation", "method.alpha=1.5"))),
        ("l14/1", _make_result("task_arithmetic", "ViT-L-14", "14", 0.76, endpoints="tall_masks")),
    ]
    for i, (name, res) in enumerate(runs):
        _write(root, name, res, mtime=1_000_000 + i)
    _write(root, "bad/running", _make_result("iso_c", "ViT-B-32", "8", 0.99, status="running"))
    _write(root, "bad/half", json.dumps(_make_result("iso_c", "ViT-B-32", "8", 0.99))[:500])
    # the same config as b32/3 run again later, with another result: the later one must win
    _write(root, "b32-again/3", _make_result("ties", "ViT-B-32", "8", 0.64, endpoints="retrained"), mtime=2_000_000)
    # an older duplicate: must lose whatever its path
    _write(root, "zz-old/0", _make_result("zeroshot", "tiny", "mini", 0.10, group="main_table_mini"), mtime=10)
    return root




@pytest.fixture(scope="session")
def make_result():
    return _make_result


@pytest.fixture(scope="session")
def write_result():
    return _write
