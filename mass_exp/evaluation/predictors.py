"""Predictors: how a model (or a set of models) turns one task's images into (predicted task, predicted class).

The evaluation module is the same for every method; only the predictor changes:
- `StaticPredictor`: one merged image tower for all tasks, scored with the true task's head (router `none`).
- `PerTaskPredictor`: a different tower per task (the fine-tuned endpoints, tsv_c), swapped in when the task changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mass_exp.routing import ProjectionRouter, RouterConfig


class Predictor(nn.Module):
    """Base class: `heads[t]` is task t's (C_t, E) zero-shot head (already scaled by exp(logit_scale))."""

    def __init__(self, heads: Sequence[torch.Tensor]):
        super().__init__()
        for i, h in enumerate(heads):
            self.register_buffer(f"head_{i}", h.float().clone(), persistent=False)
        self.num_tasks = len(heads)

    def head(self, task: int) -> torch.Tensor:
        return getattr(self, f"head_{task}")

    def predict(self, images: torch.Tensor, task: int, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
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

    def predict(self, images: torch.Tensor, task: int, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
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

    def predict(self, images: torch.Tensor, task: int, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self._loaded != task:
            self.visual.load_state_dict(dict(self.weights_for(task)))
            self._loaded = task
        logits = embed(self.visual, images) @ self.head(task).T
        return {"pred_task": torch.full((len(images),), task, device=images.device),
                "pred_class": logits.argmax(-1)}


class RoutedPredictor(Predictor):
    """MASS's two-pass inference (spec, MASS steps 3-7) over any merger.

    Pass 1 runs `first_pass` (the merge of all tasks) only up to the routing block; the router picks a task set Ω
    per sample; samples are grouped by Ω and each group's expert (the merge of Ω's tasks, from `build_expert`) runs
    once, from a bounded cache; the heads of Ω's tasks then vote by max logit.
    """

    def __init__(self, first_pass: nn.Module, heads: Sequence[torch.Tensor], router: "ProjectionRouter",
                 build_expert: Callable[[tuple[int, ...]], Mapping[str, torch.Tensor]], expert_template: nn.Module,
                 config: "RouterConfig", cache_size: int = 16,
                 features: Callable[[torch.Tensor], torch.Tensor] | None = None):
        from mass_exp.routing import ExpertCache
        from mass_exp.models.vit_hooks import first_pass_fn

        super().__init__(heads)
        self.first_pass = first_pass
        self.router = router
        self.config = config
        self._template = [expert_template]  # not a submodule: experts are built from it on the right device
        self._build_weights = build_expert
        self.experts = ExpertCache(self._build, max_size=cache_size)
        # pass-1 features: the routing block's token (projection router), or e.g. the final embedding (`features`)
        self._features = features or first_pass_fn(self.first_pass, config.block, config.token)
        self.router_info = None
        self.timings = {"pass1_s": 0.0, "routing_s": 0.0, "expert_build_s": 0.0, "pass2_s": 0.0}

    def _build(self, task_set: tuple[int, ...]) -> nn.Module:
        import copy

        device = self.head(0).device
        expert = copy.deepcopy(self._template[0])
        expert.load_state_dict(dict(self._build_weights(task_set)))
        return expert.to(device).eval()

    def predict(self, images: torch.Tensor, task: int, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        from mass_exp.routing import router_diagnostics, score_predictions, two_pass_forward

        self.router.to(images.device)
        true = torch.full((len(images),), task, dtype=torch.long)
        out = two_pass_forward(images, true, self._features, self.router, self.experts, embed,
                               oracle_routing=self.config.oracle_routing)
        for k in self.timings:
            self.timings[k] += getattr(out.timings, k)
        heads = [self.head(t) for t in range(self.num_tasks)]
        labels_cpu = labels.cpu() if labels is not None else torch.zeros(len(images), dtype=torch.long)
        scored = score_predictions(out.embeddings, heads, out.task_sets, true, labels_cpu,
                                   head_selection=self.config.head_selection, oracle_head=self.config.oracle_head)
        result = {"pred_task": scored["pred_task"].to(images.device), "pred_class": scored["pred_class"].to(images.device),
                  "correct_paper_rule": scored["correct_paper_rule"].to(images.device),
                  "set_size": torch.tensor([len(s) for s in out.task_sets], device=images.device),
                  "survival": torch.tensor([task in s for s in out.task_sets], device=images.device)}
        if out.probs is not None:
            diag = router_diagnostics(out.probs, out.task_sets, true, self.config.threshold)
            result["task_id_correct"] = diag["task_id_correct"].to(images.device)
            result["routed_task"] = out.probs.argmax(-1).to(images.device)
        return result


class TaskAgnosticPredictor(StaticPredictor):
    """A static model scored without the task (`eval.task_known=false`): its embedding meets every head of the
    suite and task and class are picked by MASS's rule (spec, MASS step 7) with Ω = all tasks: the largest logit
    over every (task, class) pair (`head_selection=max`, or the best mean logit with `avg`). Strict accuracy needs
    the right head and class; `correct_paper_rule` is the official code's looser rule, as for MASS rows."""

    def __init__(self, visual: nn.Module, heads: Sequence[torch.Tensor], head_selection: str = "max"):
        super().__init__(visual, heads)
        self.head_selection = head_selection

    def predict(self, images: torch.Tensor, task: int, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        from mass_exp.routing import score_predictions

        emb = embed(self.visual, images)
        n = len(images)
        true = torch.full((n,), task, dtype=torch.long)
        labels_cpu = labels.cpu() if labels is not None else torch.zeros(n, dtype=torch.long)
        heads = [self.head(t) for t in range(self.num_tasks)]
        scored = score_predictions(emb, heads, [tuple(range(self.num_tasks))] * n, true, labels_cpu,
                                   head_selection=self.head_selection)
        dev = images.device
        pred_task = scored["pred_task"].to(dev)
        return {"pred_task": pred_task, "pred_class": scored["pred_class"].to(dev),
                "correct_paper_rule": scored["correct_paper_rule"].to(dev),
                "task_id_correct": pred_task == task, "routed_task": pred_task}
