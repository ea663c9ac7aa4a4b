"""Simple static mergers: zeroshot, finetuned, weight_average, task_arithmetic (MASS_SPEC "Static mergers")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mass_exp.merging.task_vectors import LazyStateDict, StateDict, check_endpoints, compose

__all__ = ["finetuned", "resolve_alpha", "task_arithmetic", "weight_average", "zeroshot"]


def resolve_alpha(alpha: float | None, default: float = 1.0) -> float:
    """``None`` (a YAML ``alpha: null``) means the method's default coefficient."""
    return default if alpha is None else float(alpha)


def check_task(task: int, num_tasks: int) -> int:
    """Validate a task index (per-task mergers)."""
    if not isinstance(task, int) or isinstance(task, bool) or not 0 <= task < num_tasks:
        raise ValueError(f"task must be an int in [0, {num_tasks}), got {task!r}")
    return task


def zeroshot(
    pretrained: StateDict, finetuned: Sequence[StateDict] = (), *, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """θ = θ_pre (the endpoints and α are ignored)."""
    del finetuned, alpha
    if isinstance(pretrained, LazyStateDict) and not pretrained.mmap:
        return {k: pretrained[k] for k in pretrained}  # already fresh copies
    return {k: pretrained[k].clone() for k in pretrained}


def finetuned(
    pretrained: StateDict, finetuned: Sequence[StateDict], *, task: int, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """θ = θ_task (the individual fine-tuned endpoint, evaluated on its own task); α ≠ 1 gives θ_pre + α·τ_task."""
    check_task(task, len(finetuned))
    check_endpoints(pretrained, [finetuned[task]])
    a = resolve_alpha(alpha)
    ft = finetuned[task]
    out: dict[str, torch.Tensor] = {}
    for k in pretrained:
        pre = pretrained[k]
        if a == 1.0:
            out[k] = ft[k].to(device=pre.device, dtype=pre.dtype).clone()
        else:
            out[k] = compose(pre, ft[k].to(device=pre.device, dtype=torch.float32) - pre.float(), a)
    return out


def _linear(
    pretrained: StateDict, endpoints: Sequence[StateDict], coeff: float, alpha: float
) -> dict[str, torch.Tensor]:
    """θ = θ_pre + α·coeff·Σ_t τ_t, one parameter at a time."""
    check_endpoints(pretrained, endpoints)
    if not endpoints:
        raise ValueError("at least one fine-tuned endpoint is required")
    out: dict[str, torch.Tensor] = {}
    for k in pretrained:
        pre = pretrained[k]
        pre32 = pre.to(torch.float32)
        acc = torch.zeros_like(pre32)
        for ft in endpoints:
            acc += ft[k].to(device=pre.device, dtype=torch.float32) - pre32
        out[k] = compose(pre, coeff * acc, alpha)
    return out


def weight_average(
    pretrained: StateDict, finetuned: Sequence[StateDict], *, alpha: float | None = 1.0
) -> dict[str, torch.Tensor]:
    """Weight averaging: M = (1/T)·Σ_t τ_t, θ = θ_pre + α·M (α = 1 gives the plain mean of the endpoints)."""
    return _linear(pretrained, finetuned, 1.0 / max(len(finetuned), 1), resolve_alpha(alpha))


def task_arithmetic(
    pretrained: StateDict, finetuned: Sequence[StateDict], *, alpha: float | None = 1.0
) -> dict[str, torch.Tensor]:
    """Task Arithmetic (Ilharco et al. 2023): M = Σ_t τ_t, θ = θ_pre + α·M."""
    return _linear(pretrained, finetuned, 1.0, resolve_alpha(alpha))

