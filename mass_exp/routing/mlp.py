"""The trained MLP router of the MASS paper's router ablation (the supervised reference): the network and the
router around it (pure; training lives in `mass_exp.finetune.router`).

Official code (crisostomi/mass@583b35e): src/mass/modules/linear_router.py `LinearRouter` = Linear(E, 1024) - ReLU -
Dropout(0.5) - Linear(1024, 1024) - ReLU - Dropout(0.5) - Linear(1024, T) on the first-pass (TSV-M-merged) encoder's
image embedding; conf/nn/module/router/linear.yaml: `routing_mode: topk`, threshold 0.2, temperature 1, at most 3
tasks. The logits are routed like the projection router's scores (standardise, softmax, threshold, cap).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mass_exp.routing.config import RouterConfig
from mass_exp.routing.projection import routing_probabilities
from mass_exp.routing.router import RoutingDecision
from mass_exp.routing.selection import select_tasks


def router_mlp(embed_dim: int, num_tasks: int, hidden_dim: int = 1024, dropout: float = 0.5) -> nn.Sequential:
    """The official router network (two hidden layers with ReLU and dropout)."""
    return nn.Sequential(
        nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden_dim, num_tasks),
    )


class MLPRouter:
    """Routes features z (B, E) by a trained network's task logits (B, T)."""

    def __init__(self, mlp: nn.Module, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self.mlp = mlp.eval()

    def to(self, device: torch.device | str) -> "MLPRouter":
        self.mlp = self.mlp.to(device)
        return self

    def logits(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            return self.mlp(z.float())

    def __call__(self, z: Tensor) -> RoutingDecision:
        cfg = self.config
        scores = -self.logits(z)  # as residuals: smaller = better
        probs = routing_probabilities(scores, mode=cfg.mode, temperature=cfg.temperature)
        return RoutingDecision(select_tasks(probs, mode=cfg.mode, threshold=cfg.threshold, max_tasks=cfg.max_tasks),
                               probs, scores)
