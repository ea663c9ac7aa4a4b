"""Task-set selection, batched and oracle routing, the router object (MASS_SPEC steps 5, 8)."""

from __future__ import annotations

import pytest
import torch

from mass_exp.routing import (
    ProjectionRouter,
    RouterConfig,
    batched_route,
    oracle_task_sets,
    router_diagnostics,
    routing_probabilities,
    select_tasks,
)


def P(*rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize(
    "probs, expected",
    [
        ([0.5, 0.3, 0.15, 0.05], (0, 1)),  # two pass
        ([0.19, 0.19, 0.19, 0.19, 0.24], (4,)),  # one passes
        ([0.05, 0.3, 0.4, 0.25], (1, 2, 3)),  # ascending order, not by p
        ([0.22, 0.21, 0.30, 0.27], (0, 2, 3)),  # four pass -> cap 3 drops the smallest
        ([0.25, 0.25, 0.25, 0.25], (0, 1, 2)),  # cap with ties: lower index kept
        ([0.1, 0.1, 0.1, 0.1, 0.15, 0.15, 0.1, 0.1, 0.1], (4,)),  # none pass: argmax fallback
        ([0.2, 0.2, 0.2, 0.2, 0.2], (0,)),  # exactly 0.2 fails the strict '>', tie -> lower index
        ([0.6, 0.4], (0, 1)),  # cap is min(3, T)
    ],
)
def test_topk(probs, expected):
    assert select_tasks(P(probs), mode="topk", threshold=0.2, max_tasks=3) == [expected]


def test_topk_exact_threshold_after_softmax():
    # five equal residuals -> p = float32(0.2) each -> strict '>' passes none -> fallback {0}
    probs = routing_probabilities(torch.full((1, 5), 1.0))
    assert select_tasks(probs, mode="topk") == [(0,)]
    # four equal residuals -> 0.25 each -> all pass, capped at 3
    assert select_tasks(routing_probabilities(torch.full((1, 4), 1.0))) == [(0, 1, 2)]


def test_top1_and_weighted():
    p = P([0.22, 0.21, 0.30, 0.27], [0.3, 0.3, 0.2, 0.2])
    assert select_tasks(p, mode="top1") == [(2,), (0,)]
    assert select_tasks(p, mode="weighted") == [(0, 1, 2, 3), (0, 1)]  # no cap
    assert select_tasks(P([0.1] * 10), mode="weighted") == [(0,)]  # fallback


def test_max_tasks_knob():
    p = P([0.5, 0.3, 0.15, 0.05])
    assert select_tasks(p, mode="topk", max_tasks=1) == [(0,)]
    assert select_tasks(p, mode="topk", max_tasks=None) == [(0, 1)]
    assert select_tasks(P([0.22, 0.21, 0.30, 0.27]), max_tasks=None) == [(0, 1, 2, 3)]


def test_rows_are_independent():
    p = P([0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8], [0.25, 0.25, 0.25, 0.25])
    assert select_tasks(p) == [(0, 1), (3,), (0, 1, 2)]


def test_batched_route_uses_mean_residual():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.5, 3.0], [1.0, 1.0, 1.0]])
    # mean r = [2.333, 1.167, 2.333] -> top1 = task 1, though sample 0 alone prefers task 0
    assert batched_route(r) == (1,)
    assert batched_route(r[:1]) == (0,)


def test_oracle_task_sets():
    assert oracle_task_sets(torch.tensor([2, 0, 2])) == [(2,), (0,), (2,)]


def test_router_config_defaults_and_validation():
    cfg = RouterConfig()
    assert (cfg.block, cfg.token, cfg.norm, cfg.mode) == (9, "cls", "l2", "topk")
    assert (cfg.threshold, cfg.temperature, cfg.max_tasks) == (0.2, 1.0, 3)
    assert (cfg.batched, cfg.head_selection, cfg.oracle_head) == (False, "max", False)
    assert RouterConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"mode": "top2"}, {"token": "avg"}, {"norm": "l1"}, {"head_selection": "min"},
                {"temperature": 0.0}, {"max_tasks": 0}):
        with pytest.raises(ValueError):
            RouterConfig(**bad)
    with pytest.raises(ValueError):
        RouterConfig.from_dict({"blok": 3})


def _bases(d=16, k=4, t=3):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    return [q[:, i * k : (i + 1) * k] for i in range(t)]


def test_projection_router_per_sample_and_batched():
    bases = _bases()
    z = torch.stack([bases[0][:, 0], bases[2][:, 1], bases[1][:, 3] + 0.01 * bases[0][:, 0]])
    dec = ProjectionRouter(bases, RouterConfig(mode="top1"))(z)
    assert dec.task_sets == [(0,), (2,), (1,)]
    assert dec.probs.shape == dec.residuals.shape == (3, 3)
    batched = ProjectionRouter(bases, RouterConfig(batched=True))(z[:2] * torch.tensor([[1.0], [0.5]]))
    assert len(set(batched.task_sets)) == 1 and len(batched.task_sets) == 2
    # mahalanobis gives the same top1 decisions
    dec_m = ProjectionRouter(bases, RouterConfig(mode="top1", norm="mahalanobis"))(z)
    assert dec_m.task_sets == dec.task_sets


def test_router_diagnostics():
    probs = P([0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4])
    sets = [(0, 1), (2,), (2,)]
    d = router_diagnostics(probs, sets, torch.tensor([1, 2, 0]), threshold=0.2)
    assert d["task_id_correct"].tolist() == [False, True, False]
    assert d["survival"].tolist() == [True, True, False]
    assert d["set_size"].tolist() == [2, 1, 1]
    assert d["official_survival"].tolist() == [True, True, True]
    assert d["official_active"].tolist() == [2, 1, 3]
