"""The projection router as a callable object (MASS_SPEC "MASS" steps 4, 5, 8) and router diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mass_exp.routing.config import RouterConfig
from mass_exp.routing.projection import projection_residuals, routing_probabilities, stack_bases
from mass_exp.routing.selection import TaskSet, batched_route, select_tasks


@dataclass
class RoutingDecision:
    """Router output for one batch: Omega per sample plus the numbers behind it."""

    task_sets: list[TaskSet]
    probs: Tensor | None = None  # [B, T] (per-sample probabilities; in batched mode, per-sample too)
    residuals: Tensor | None = None  # [B, T]


class ProjectionRouter:
    """Routes pass-1 features z [B, D] by projection residuals onto each task's basis V_t [D, k_t].

    ``bases[t]`` are task t's kept right singular vectors of the routing block's ``mlp.c_fc`` weight
    delta, as columns. Calling the router returns a :class:`RoutingDecision`.
    """

    def __init__(self, bases: Sequence[Tensor], config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self.num_tasks = len(bases)
        self._stacked = stack_bases(bases)

    def to(self, device: torch.device | str) -> "ProjectionRouter":
        """Move the stacked bases (e.g. to the GPU that runs pass 1)."""
        self._stacked = self._stacked.to(device)
        return self

    def residuals(self, z: Tensor) -> Tensor:
        """r [B, T] (step 4)."""
        cfg = self.config
        return projection_residuals(z, self._stacked, norm=cfg.norm, mahalanobis_eps=cfg.mahalanobis_eps)

    def __call__(self, z: Tensor) -> RoutingDecision:
        cfg = self.config
        r = self.residuals(z)
        if cfg.batched:
            omega = batched_route(
                r, mode=cfg.batched_mode, threshold=cfg.threshold,
                temperature=cfg.temperature, max_tasks=cfg.max_tasks,
            )
            probs = routing_probabilities(r, mode=cfg.batched_mode, temperature=cfg.temperature)
            return RoutingDecision([omega] * z.shape[0], probs, r)
        probs = routing_probabilities(r, mode=cfg.mode, temperature=cfg.temperature)
        sets = select_tasks(probs, mode=cfg.mode, threshold=cfg.threshold, max_tasks=cfg.max_tasks)
        return RoutingDecision(sets, probs, r)


def router_diagnostics(
    probs: Tensor,
    task_sets: Sequence[TaskSet],
    task_ids_true: Tensor,
    threshold: float = 0.2,
) -> dict[str, Tensor]:
    """Per-sample router diagnostics (MASS_SPEC "Router diagnostics"); average them per task.

    - ``task_id_correct``: argmax p == true task (lower index on ties).
    - ``survival``: true task in Omega.  ``set_size``: |Omega|.
    - ``official_survival``: p_true > threshold (the official code's "survival").
    - ``official_active``: count of p > threshold before cap and fallback (0 or 4 can occur).
    """
    true = task_ids_true.to("cpu", torch.long)
    p = probs.detach().to("cpu")
    argmax = torch.tensor([max(range(len(row)), key=lambda t: (row[t], -t)) for row in p.tolist()],
                          dtype=torch.long)
    survival = torch.tensor([int(t) in s for t, s in zip(true.tolist(), task_sets)], dtype=torch.bool)
    return {
        "task_id_correct": argmax == true,
        "survival": survival,
        "set_size": torch.tensor([len(s) for s in task_sets], dtype=torch.long),
        "official_survival": p.gather(1, true.unsqueeze(1)).squeeze(1) > threshold,
        "official_active": (p > threshold).sum(dim=1),
    }
