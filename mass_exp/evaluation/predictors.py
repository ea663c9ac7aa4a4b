"""Predictors: how a model (or a set of models) turns one task's images into (predicted task, predicted class).

The evaluation module is the same for every method; only the predictor changes:
- `StaticPredictor`: one merged image tower for all tasks, scored with the true task's head (router `none`).
- `PerTaskPredictor`: a different tower per task (the fine-tuned endpoints, tsv_c), swapped in when the task changes.
"""

from __future__ import annotations

import inspect
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
            with no_autocast(images.device):
                self.visual.load_state_dict(dict(self.weights_for(task)))
            self._loaded = task
        logits = embed(self.visual, images) @ self.head(task).T
        return {"pred_task": torch.full((len(images),), task, device=images.device),
                "pred_class": logits.argmax(-1)}


def no_autocast(device: torch.device):
    """Merges and expert builds run in float32 even inside Lightning's mixed-precision evaluation."""
    return torch.autocast(device_type=device.type, enabled=False)


def _takes_out(fn: Callable) -> bool:
    """Whether an expert builder has the in-place signature ``fn(task_set, out)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


# default expert-cache budget: this share of the evaluation device's free memory, measured at the first build
DEFAULT_CACHE_FREE_FRACTION = 0.25


class RoutedPredictor(Predictor):
    """MASS's two-pass inference (spec, MASS steps 3-7) over any merger.

    Pass 1 runs `first_pass` (the merge of all tasks) only up to the routing block; the router picks a task set Ω
    per sample; samples are grouped by Ω and each group's expert (the merge of Ω's tasks, from `build_expert`) runs
    once; the heads of Ω's tasks then vote by max logit.

    Experts live in an LRU cache bounded by bytes: `cache_gb` GiB, or by default `cache_free_fraction` of the
    device's free memory when the first expert is built; `cache_size` optionally caps their number too. An expert
    module is allocated once per cache slot (uninitialised, on the evaluation device) and rebuilt in place when its
    slot is recycled: `build_expert(task_set, out)` writes the weights into `out` (the module's state dict) in
    place; a one-argument `build_expert(task_set)` returns a state dict, which is copied in.
    """

    def __init__(self, first_pass: nn.Module, heads: Sequence[torch.Tensor], router: "ProjectionRouter",
                 build_expert: Callable[..., Mapping[str, torch.Tensor] | None], expert_template: nn.Module,
                 config: "RouterConfig", cache_size: int | None = None, cache_gb: float | None = None,
                 cache_free_fraction: float = DEFAULT_CACHE_FREE_FRACTION,
                 features: Callable[[torch.Tensor], torch.Tensor] | None = None):
        from mass_exp.models.vit_hooks import first_pass_fn
        from mass_exp.routing import ExpertCache
        from mass_exp.routing.two_pass import module_nbytes

        super().__init__(heads)
        if cache_gb is not None and cache_gb < 0:
            raise ValueError(f"cache_gb must be >= 0 (or None for the default share of free memory), got {cache_gb}")
        if not 0 < cache_free_fraction <= 1:
            raise ValueError(f"cache_free_fraction must be in (0, 1], got {cache_free_fraction}")
        self.first_pass = first_pass
        self.router = router
        self.config = config
        self._template = [expert_template]  # not a submodule: expert slots are allocated from it on the right device
        self._meta: list[nn.Module] = []  # the template's structure on the meta device (not a submodule)
        self._build_weights = build_expert
        self._inplace = _takes_out(build_expert)
        self.cache_gb = cache_gb
        self.cache_free_fraction = float(cache_free_fraction)
        self.experts = ExpertCache(self._build, max_size=cache_size, max_bytes=self._budget_bytes,
                                   expert_bytes=module_nbytes(expert_template))
        # pass-1 features: the routing block's token (projection router), or e.g. the final embedding (`features`)
        self._features = features or first_pass_fn(self.first_pass, config.block, config.token, config.routing_param)
        self.router_info = None
        self.routing_layer: str | None = None  # the matrix whose task subspaces a projection router reads
        self.timings = {"pass1_s": 0.0, "routing_s": 0.0, "expert_build_s": 0.0, "pass2_s": 0.0}

    def _device(self) -> torch.device:
        return self.head(0).device

    def _budget_bytes(self) -> int:
        if self.cache_gb is not None:
            return int(self.cache_gb * 2**30)
        from mass_exp.utils.memory import free_memory_bytes

        return int(self.cache_free_fraction * free_memory_bytes(self._device()))

    def _new_slot(self, device: torch.device) -> nn.Module:
        """An expert module on `device` with uninitialised parameters (no copy of the template's weights)."""
        import copy

        if not self._meta:
            self._meta.append(copy.deepcopy(self._template[0]).to("meta"))
        slot = copy.deepcopy(self._meta[0]).to_empty(device=device)
        template_buffers = dict(self._template[0].named_buffers())
        for name, buf in slot.named_buffers():  # buffers (incl. non-persistent ones) are not rebuilt: copy them
            buf.copy_(template_buffers[name])
        return slot.eval()

    def _build(self, task_set: tuple[int, ...], reuse: nn.Module | None) -> nn.Module:
        device = self._device()
        fresh = reuse is None
        expert = self._new_slot(device) if fresh else reuse
        with torch.no_grad(), no_autocast(device):
            state = expert.state_dict()  # tensors sharing the module's storage
            if self._inplace:
                written = self._build_weights(task_set, state)
                if fresh:
                    missing = [k for k in state if written is None or k not in written]
                    if missing:
                        raise ValueError(f"expert builder left {missing[0]!r} unwritten for task set {task_set}")
            else:
                expert.load_state_dict(dict(self._build_weights(task_set)))
        return expert.eval()

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
        with no_autocast(out.embeddings.device):  # head scoring in float32 (tiny next to the passes)
            scored = score_predictions(out.embeddings.float(), heads, out.task_sets, true, labels_cpu,
                                       head_selection=self.config.head_selection,
                                       oracle_head=self.config.oracle_head)
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
