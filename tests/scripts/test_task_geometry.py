"""scripts/task_geometry.py: its figures on hand-made endpoints (seconds), and the script on the e2e mini assets."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "task_geometry.py"


def _module():
    spec = importlib.util.spec_from_file_location("task_geometry", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _linear_endpoints():
    """A 4 -> 2 linear 'tower'; task 0 moves output 0's weights, task 1 output 1's, task 2 task 0's again."""
    torch.manual_seed(0)
    visual = torch.nn.Linear(4, 2, bias=False)
    pre = {"weight": torch.eye(2, 4)}
    t0 = {"weight": pre["weight"] + torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])}
    t1 = {"weight": pre["weight"] + torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])}
    t2 = {"weight": pre["weight"] + torch.tensor([[0.0, 0.0, -6.0, 0.0], [0.0, 0.0, 0.0, 0.0]])}
    return visual, pre, [t0, t1, t2]


def test_geometry_figures_on_linear_endpoints():
    tg = _module()
    visual, pre, fts = _linear_endpoints()
    head = torch.eye(2)  # class c = output c (after L2 normalisation)
    x = torch.randn(200, 4)
    tests = [(x, torch.zeros(200, dtype=torch.long))] * 3
    g = tg.task_geometry(["a", "b", "c"], pre, fts, None, visual, [head] * 3, tests)
    cos = g["cosine"]
    assert math.isclose(cos[0][0], 1.0, abs_tol=1e-6) and math.isclose(cos[0][1], 0.0, abs_tol=1e-6)
    assert math.isclose(cos[0][2], -1.0, abs_tol=1e-6) and cos[0][2] == cos[2][0]
    assert math.isclose(g["mean_abs_cosine"], 1 / 3, rel_tol=1e-6)  # pairs: 0, 1, 0
    assert math.isclose(g["norm_ratio"]["a"], 3 / math.sqrt(2), rel_tol=1e-6)
    # orthogonal vectors that touch different outputs still change each other's argmax sometimes; opposite ones
    # (a + c = -tau_a) flip predictions where tau_a decided them: the error is a disagreement rate in percent
    d = g["disentanglement_error"]
    assert set(d) == {"a+b", "a+c", "b+c"} and all(0 <= v <= 100 for v in d.values())
    assert d["a+c"] > d["a+b"]
    assert g["pair_tsv_m_normalized"] == {} and g["mean_pair_tsv_m_normalized"] is None


def test_disentanglement_error_averages_both_directions():
    """With tau_z = 0: direction a (adding tau_z to theta_a) disagrees nowhere; direction z (adding tau_a to
    theta_pre) disagrees wherever tau_a changes the pretrained model's prediction. The error is their mean."""
    tg = _module()
    visual, pre, fts = _linear_endpoints()
    x = torch.randn(100, 4)
    tests = [(x, torch.zeros(100, dtype=torch.long))] * 2
    g = tg.task_geometry(["a", "z"], pre, [fts[0], dict(pre)], None, visual, [torch.eye(2)] * 2, tests)
    changed = ((x @ pre["weight"].T).argmax(-1) != (x @ fts[0]["weight"].T).argmax(-1)).float().mean()
    assert 0 < changed < 1
    assert math.isclose(g["disentanglement_error"]["a+z"], 100 * float(changed) / 2, rel_tol=1e-5)


def test_json_keys_are_the_issue_s():
    tg = _module()
    assert tg.JSON_KEYS == ("tasks", "cosine", "norm_ratio", "pair_tsv_m_normalized", "mean_pair_tsv_m_normalized",
                            "mean_abs_cosine", "disentanglement_error")
