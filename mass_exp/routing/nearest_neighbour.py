"""The nearest-neighbour router of the MASS paper's router ablation (pure: tensors in, a routing decision out).

What the official code does (crisostomi/mass@583b35e, src/mass/modules/nn_router.py `NNRouter`/`NNhead`, router
config conf/nn/module/router/nn.yaml): for every task it stores the image embeddings (the first-pass encoder's
output) of one training batch (batch size 32, conf/nn/data/default.yaml), L2-normalised; an input's embedding,
L2-normalised, gets the logit -min_j ||z - e_{t,j}||_2 per task t (the `set_distance` method, the default), and the
router keeps the top-1 task (`routing_mode: top1`). Here that distance plays the part of the projection
router's residual, so every routing mode of `select_tasks` is available (`top1` is the paper's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mass_exp.routing.config import RouterConfig
from mass_exp.routing.projection import routing_probabilities
from mass_exp.routing.router import RoutingDecision
from mass_exp.routing.selection import select_tasks


def set_distances(z: Tensor, bank: Tensor) -> Tensor:
    """(B, E) embeddings and a (T, n, E) bank of stored embeddings -> (B, T) distance of each L2-normalised
    embedding to the nearest L2-normalised stored embedding of each task."""
    if bank.dim() != 3:
        raise ValueError(f"bank must be (T, n, E), got {tuple(bank.shape)}")
    t, n, e = bank.shape
    zn = F.normalize(z.float(), dim=-1)
    bn = F.normalize(bank.float(), dim=-1).reshape(t * n, e).to(zn.device)
    return torch.cdist(zn, bn).view(z.shape[0], t, n).min(dim=-1).values


class NearestNeighbourRouter:
    """Routes final-embedding features z (B, E) by the distance to each task's stored sample embeddings."""

    def __init__(self, bank: Tensor, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig(mode="top1")
        self.bank = bank.float()
        self.num_tasks = int(bank.shape[0])

    def to(self, device: torch.device | str) -> "NearestNeighbourRouter":
        self.bank = self.bank.to(device)
        return self

    def __call__(self, z: Tensor) -> RoutingDecision:
        cfg = self.config
        d = set_distances(z, self.bank)
        probs = routing_probabilities(d, mode=cfg.mode, temperature=cfg.temperature)
        return RoutingDecision(select_tasks(probs, mode=cfg.mode, threshold=cfg.threshold, max_tasks=cfg.max_tasks),
                               probs, d)
