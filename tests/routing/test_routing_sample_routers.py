"""The router ablation's sample-based routers (nearest_neighbour, mlp) and task-agnostic static scoring, on
constructions with known answers."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from mass_exp.evaluation.predictors import StaticPredictor, TaskAgnosticPredictor
from mass_exp.finetune.router import RouterTrainingModule
from mass_exp.routing import RouterConfig
from mass_exp.routing.mlp import MLPRouter, router_mlp
from mass_exp.routing.nearest_neighbour import NearestNeighbourRouter, set_distances


def _bank(num_tasks=4, n=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:num_tasks] * 3
    return centres, torch.stack([c + 0.1 * torch.randn(n, dim, generator=g) for c in centres])


def test_nearest_neighbour_routes_to_the_task_of_the_nearest_stored_sample():
    centres, bank = _bank()
    router = NearestNeighbourRouter(bank, RouterConfig(mode="top1"))
    g = torch.Generator().manual_seed(1)
    z = torch.cat([c + 0.1 * torch.randn(3, 8, generator=g) for c in centres])
    dec = router(z)
    assert dec.task_sets == [(t,) for t in range(4) for _ in range(3)]
    # the set distance is the minimum over the stored samples (normalised): a stored sample itself is at 0
    d = set_distances(bank[2, :2], bank)
    assert torch.allclose(d[:, 2], torch.zeros(2), atol=1e-5) and (d[:, [0, 1, 3]] > 0.5).all()
    # scale does not matter (both sides are L2-normalised)
    assert router(10 * z).task_sets == dec.task_sets


def test_mlp_router_routes_by_logits_with_the_topk_rule():
    ident = nn.Identity()  # logits = z
    router = MLPRouter(ident, RouterConfig(mode="topk", threshold=0.2, max_tasks=3))
    z = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 4.0, 4.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    assert router(z).task_sets == [(0,), (1, 2), (3,)]
    assert MLPRouter(ident, RouterConfig(mode="top1"))(z).task_sets == [(0,), (1,), (3,)]


def test_router_training_learns_separable_tasks():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(3).repeat_interleave(64)
    x = centres[y] + torch.randn(len(y), 16, generator=g)
    torch.manual_seed(0)
    module = RouterTrainingModule(router_mlp(16, 3, hidden_dim=32, dropout=0.5), lr=1e-2, weight_decay=0.1, t_max=10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, gradient_clip_val=10.0).fit(module, loader)
    mlp = module.best_mlp()
    assert len(module.history) == 5 and module.best_loss == min(h["loss"] for h in module.history)
    assert not mlp.training
    router = MLPRouter(mlp, RouterConfig(mode="top1"))
    got = torch.tensor([s[0] for s in router(x).task_sets])
    assert (got == y).float().mean() > 0.95


class _Fixed(nn.Module):
    """A 'visual' that returns the embedding stored at each input's index (inputs are indices)."""

    def __init__(self, emb):
        super().__init__()
        self.register_buffer("emb", emb)

    def forward(self, idx):
        return self.emb[idx.long()]


def test_task_agnostic_static_scoring_picks_task_and_class_by_max_logit():
    # task 0 has 2 classes along e0/e1, task 1 has 3 classes along e2/e3/e0 (its class 2 overlaps task 0's class 0)
    heads = [torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]) * 10,
             torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, 1.0], [0.9, 0, 0, 0.1]]) * 10]
    emb = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0.2, 0, 1.0]])
    visual = _Fixed(emb)
    known = StaticPredictor(visual, heads)
    agnostic = TaskAgnosticPredictor(visual, heads)
    idx = torch.arange(3)
    out = agnostic.predict(idx, task=0, labels=torch.tensor([0, 0, 1]))
    assert out["pred_task"].tolist() == [0, 1, 1] and out["pred_class"].tolist() == [0, 0, 1]
    assert out["task_id_correct"].tolist() == [True, False, False]
    # paper rule: the winning head's argmax compared with the label whatever the head: sample 1 -> class 0 == 0
    assert out["correct_paper_rule"].tolist() == [True, True, True]
    assert known.predict(idx, task=0)["pred_task"].tolist() == [0, 0, 0]
