"""TIES-Merging (Yadav et al., NeurIPS 2023) and Consensus / TALL masks (Wang et al., ICML 2024).

Both work on the task vectors flattened over all parameters (MASS_SPEC "Static mergers"). The flattened vectors
are never materialised for all tasks at once: the per-task TIES cut is found on one task's flattened magnitudes
at a time, everything else is entrywise and runs parameter by parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mass_exp.merging.basic import check_task, resolve_alpha
from mass_exp.merging.task_vectors import StateDict, check_endpoints, compose, deltas, param_shape

__all__ = [
    "consensus",
    "consensus_mask",
    "tall_masks",
    "tall_mask_merge",
    "ties",
    "ties_elect_and_merge",
    "ties_thresholds",
]

MERGE_FNS = ("mean", "sum")


# --------------------------------------------------------------------------------------------------------------
# TIES


def ties_thresholds(pretrained: StateDict, finetuned: Sequence[StateDict], k: float = 20) -> list[float]:
    """Per-task magnitude cut of TIES' trim step over the flattened task vector (reference code's rule): with d
    entries, keep |τ| ≥ the (d − floor(k/100·d))-th smallest |τ|. Returns -inf when everything is kept."""
    if not 0 < k <= 100:
        raise ValueError(f"TIES k is a percentage in (0, 100], got {k}")
    keys = list(pretrained)
    sizes = [math.prod(param_shape(pretrained, key)) for key in keys]
    d = sum(sizes)
    kth = d - int(d * (k / 100))
    if kth <= 0:
        return [float("-inf")] * len(finetuned)
    out: list[float] = []
    for ft in finetuned:
        # one task's flattened magnitudes at a time, selected in place (no sort, no index array)
        flat = torch.empty(d, dtype=torch.float32)
        pos = 0
        for key, n in zip(keys, sizes, strict=True):
            flat[pos : pos + n] = (ft[key].float() - pretrained[key].float()).abs().reshape(-1)
            pos += n
        arr = flat.numpy()
        arr.partition(kth - 1)
        out.append(float(arr[kth - 1]))
        del flat, arr
    return out


def _trim(task_deltas: Sequence[torch.Tensor], thresholds: Sequence[float]) -> torch.Tensor:
    """Stack the task deltas (T × ...) keeping entries with |τ_t| ≥ cut_t, zeroing the rest."""
    return torch.stack([d * (d.abs() >= c) for d, c in zip(task_deltas, thresholds, strict=True)])


def ties_elect_and_merge(trimmed: torch.Tensor, majority_sign: float, merge_fn: str = "mean") -> torch.Tensor:
    """Elect and disjoint-merge one block of trimmed values (T × ...): sign = sign(Σ_t trimmed); entries with sum
    exactly 0 take ``majority_sign``; then the mean (or sum) of the trimmed values agreeing with the sign, dividing
    by the count of agreeing non-zero values (at least 1). As in the reference code, an entry whose elected sign is
    still 0 (majority 0) keeps the negative values."""
    if merge_fn not in MERGE_FNS:
        raise ValueError(f"merge_fn must be one of {MERGE_FNS}, got {merge_fn!r}")
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = majority_sign
    agree = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    total = selected.sum(0)
    if merge_fn == "sum":
        return total
    return total / (selected != 0).sum(0).clamp(min=1).to(total.dtype)


def ties(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    *,
    alpha: float | None = 1.0,
    k: float = 20,
    merge_fn: str = "mean",
) -> dict[str, torch.Tensor]:
    """TIES-Merging: trim each task vector to its top-k% entries by magnitude over all parameters together, elect
    a sign per entry (zero sums take the sign of the sum of all elected signs), disjoint mean (or sum) of the
    agreeing values; θ = θ_pre + α·M."""
    if merge_fn not in MERGE_FNS:
        raise ValueError(f"merge_fn must be one of {MERGE_FNS}, got {merge_fn!r}")
    if not finetuned:
        raise ValueError("at least one fine-tuned endpoint is required")
    check_endpoints(pretrained, finetuned)
    a = resolve_alpha(alpha)
    cuts = ties_thresholds(pretrained, finetuned, k)
    # majority sign = sign of the sum of the elected signs over ALL entries (needs a full pass first)
    sign_sum = 0
    for name in pretrained:
        trimmed = _trim(deltas(pretrained, finetuned, name), cuts)
        sign_sum += int(torch.sign(trimmed.sum(0)).sum())
    majority = float((sign_sum > 0) - (sign_sum < 0))
    out: dict[str, torch.Tensor] = {}
    for name in pretrained:
        trimmed = _trim(deltas(pretrained, finetuned, name), cuts)
        out[name] = compose(pretrained[name], ties_elect_and_merge(trimmed, majority, merge_fn), a)
    return out


# --------------------------------------------------------------------------------------------------------------
# TALL masks / Consensus


def _lambdas(lambdas: float | Sequence[float], num_tasks: int) -> list[float]:
    if isinstance(lambdas, (int, float)):
        return [float(lambdas)] * num_tasks
    lam = [float(x) for x in lambdas]
    if len(lam) != num_tasks:
        raise ValueError(f"lambdas has {len(lam)} values for {num_tasks} tasks")
    return lam


def tall_masks(task_deltas: Sequence[torch.Tensor], lambdas: float | Sequence[float]) -> torch.Tensor:
    """TALL masks of one parameter (T × ...): m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t| with τ_MTL = Σ_t τ_t.

    (The reference code uses a strict >; the two differ only where τ_t = 0 and τ_MTL = 0, so consensus and the
    TALL-mask models come out the same.)"""
    lam = _lambdas(lambdas, len(task_deltas))
    stacked = torch.stack(list(task_deltas))
    mtl = stacked.sum(0)
    lam_t = torch.tensor(lam, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    return stacked.abs() >= lam_t * (mtl.unsqueeze(0) - stacked).abs()


def consensus_mask(task_deltas: Sequence[torch.Tensor], lambdas: float | Sequence[float], k: int = 2) -> torch.Tensor:
    """Consensus mask of one parameter: entries where at least ``k`` TALL masks are on."""
    return tall_masks(task_deltas, lambdas).sum(0) >= k


def consensus(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    *,
    alpha: float | None = 1.0,
    lambdas: float | Sequence[float] = 0.4,
    k: int = 2,
) -> dict[str, torch.Tensor]:
    """Consensus merging (TALL masks): M = τ_MTL restricted to the entries where at least k of the task masks
    m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t| are on; θ = θ_pre + α·M. ``lambdas`` is one λ or one per task (the paper
    picks λ_t on validation from {0.2, ..., 0.6}, see :func:`tall_mask_merge`)."""
    if not finetuned:
        raise ValueError("at least one fine-tuned endpoint is required")
    check_endpoints(pretrained, finetuned)
    lam = _lambdas(lambdas, len(finetuned))
    a = resolve_alpha(alpha)
    out: dict[str, torch.Tensor] = {}
    for name in pretrained:
        ds = deltas(pretrained, finetuned, name)
        mtl = torch.stack(ds).sum(0)
        out[name] = compose(pretrained[name], mtl * consensus_mask(ds, lam, k), a)
    return out


def tall_mask_merge(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    *,
    task: int,
    lam: float,
    alpha: float | None = 1.0,
) -> dict[str, torch.Tensor]:
    """The TALL-mask model of one task, θ_pre + α·(τ_MTL ⊙ m_task) — what λ_t is selected on (per task, on
    validation) before consensus merging. Not a registered merger."""
    check_task(task, len(finetuned))
    check_endpoints(pretrained, finetuned)
    a = resolve_alpha(alpha)
    out: dict[str, torch.Tensor] = {}
    for name in pretrained:
        ds = deltas(pretrained, finetuned, name)
        mtl = torch.stack(ds).sum(0)
        mask = ds[task].abs() >= lam * (mtl - ds[task]).abs()
        out[name] = compose(pretrained[name], mtl * mask, a)
    return out
