"""Predictors: how a model (or a set of models) turns one task's images into (predicted task, predicted class).

The evaluation module is the same for every method; only the predictor changes:
- `StaticPredictor`: one merged image tower for all tasks, scored with the true task's head (router `none`).
- `PerTaskPredictor`: a different tower per task (the fine-tuned endpoints, tsv_c), swapped in when the task changes.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Predictor(nn.Module):
    """Base class: `heads[t]` is task t's (C_t, E) zero-shot head (already scaled by exp(logit_scale))."""

    def __init__(self, heads: Sequence[torch.Tensor]):
        super().__init__()
        for i, h in enumerate(heads):
            self.register_buffer(f"head_{i}", h.float().clone(), persistent=False)
        self.num_tasks = len(heads)

    def head(self, task: int) -> torch.Tensor:
        return getattr(self, f"head_{task}")

    def predict(self, images: torch.Tensor, task: int) -> dict[str, torch.Tensor]:
        """Returns at least `pred_task` and `pred_class` (B,) for a batch of task `task`'s images."""
        raise NotImplementedError


def embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = visual(images)
    if isinstance(out, tuple):
        out = out[0]
    return F.normalize(out.float(), dim=-1)


class StaticPredictor(Predictor):
    """One model for every task, each task scored with its own head."""

    def __init__(self, visual: nn.Module, heads: Sequence[torch.Tensor]):
        super().__init__(heads)
        self.visual = visual

    def predict(self, images: torch.Tensor, task: int) -> dict[str, torch.Tensor]:
        logits = embed(self.visual, images) @ self.head(task).T
        return {"pred_task": torch.full((len(images),), task, device=images.device),
                "pred_class": logits.argmax(-1)}


class PerTaskPredictor(Predictor):
    """A model per task. `weights_for(task)` gives its image-tower state dict; it is loaded when the task changes."""

    def __init__(self, visual: nn.Module, heads: Sequence[torch.Tensor],
                 weights_for: Callable[[int], Mapping[str, torch.Tensor]]):
        super().__init__(heads)
        self.visual = visual
        self.weights_for = weights_for
        self._loaded: int | None = None

    def predict(self, images: torch.Tensor, task: int) -> dict[str, torch.Tensor]:
        if self._loaded != task:
            self.visual.load_state_dict(dict(self.weights_for(task)))
            self._loaded = task
        logits = embed(self.visual, images) @ self.head(task).T
        return {"pred_task": torch.full((len(images),), task, device=images.device),
                "pred_class": logits.argmax(-1)}
