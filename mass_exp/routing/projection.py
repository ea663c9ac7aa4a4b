"""Projection residuals and routing probabilities (MASS_SPEC "MASS" steps 4, 5 and 8). Pure torch."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

STD_EPS: float = 1e-6  # added to the sample std in the standardisation (step 5)


def stack_bases(bases: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """Stack per-task bases V_t [D, k_t] into one zero-padded tensor [T, D, k_max].

    Zero columns project onto nothing, so residuals computed from the padded stack equal the
    per-task ones (step 4). Precompute once and pass to :func:`projection_residuals`.
    """
    if len(bases) == 0:
        raise ValueError("need at least one task basis")
    dims = {int(b.shape[0]) for b in bases}
    if any(b.dim() != 2 for b in bases) or len(dims) != 1:
        raise ValueError(
            "bases must all be 2-D [D, k_t] with the same D (right singular vectors as columns); "
            f"got shapes {[tuple(b.shape) for b in bases]}"
        )
    d = dims.pop()
    k_max = max(int(b.shape[1]) for b in bases)
    device = bases[0].device
    out = torch.zeros(len(bases), d, k_max, dtype=dtype, device=device)
    for t, b in enumerate(bases):
        out[t, :, : b.shape[1]] = b.to(device=device, dtype=dtype)
    return out


def projection_residuals(
    z: Tensor,
    bases: Sequence[Tensor] | Tensor,
    norm: str = "l2",
    mahalanobis_eps: float = 1e-3,
) -> Tensor:
    """r_t = ||z - V_t V_t^T z||_2 for every sample and task (step 4): [B, D] -> [B, T].

    ``bases`` is a sequence of V_t [D, k_t] (k_t may differ) or a pre-stacked [T, D, k_max] tensor
    from :func:`stack_bases`. Computed in float32 (float64 if z is float64) with two batched matmuls.
    ``norm="mahalanobis"``: the official covariance (k basis rows of V_t, + eps*I) acts as eps*I on the
    residual, which is orthogonal to span(V_t), so the distance is r_t / sqrt(eps) (step 8).
    """
    if z.dim() != 2:
        raise ValueError(f"z must be [B, D], got shape {tuple(z.shape)}")
    work_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    stacked = bases if isinstance(bases, Tensor) else stack_bases(bases, dtype=work_dtype)
    if stacked.dim() != 3 or stacked.shape[1] != z.shape[1]:
        raise ValueError(
            f"bases must be [T, D, k] with D={z.shape[1]} (columns = basis vectors); got {tuple(stacked.shape)}"
        )
    zf = z.to(work_dtype)
    v = stacked.to(device=z.device, dtype=work_dtype)
    coeffs = torch.einsum("bd,tdk->btk", zf, v)  # V_t^T z
    proj = torch.einsum("btk,tdk->btd", coeffs, v)  # V_t V_t^T z
    residuals = torch.linalg.vector_norm(zf.unsqueeze(1) - proj, dim=-1)
    if norm == "l2":
        return residuals
    if norm == "mahalanobis":
        return residuals / math.sqrt(mahalanobis_eps)
    raise ValueError(f"unknown norm {norm!r}; expected 'l2' or 'mahalanobis'")


def standardize_scores(scores: Tensor) -> Tensor:
    """(s - mean) / (sample std (N-1) + 1e-6) across tasks, per row (step 5). T=1 gives zeros."""
    if scores.shape[-1] < 2:
        return torch.zeros_like(scores)
    mean = scores.mean(dim=-1, keepdim=True)
    std = scores.std(dim=-1, keepdim=True, correction=1)
    return (scores - mean) / (std + STD_EPS)


def routing_probabilities(residuals: Tensor, mode: str = "topk", temperature: float = 1.0) -> Tensor:
    """Router probabilities p [B, T] from residuals r [B, T] (step 5).

    ``topk`` / ``top1``: p = softmax(standardise(-r) / temperature).
    ``weighted``: p = softmax(-r / temperature), no standardisation.
    """
    if residuals.dim() != 2:
        raise ValueError(f"residuals must be [B, T], got shape {tuple(residuals.shape)}")
    scores = -residuals.to(torch.float64 if residuals.dtype == torch.float64 else torch.float32)
    if mode in ("topk", "top1"):
        scores = standardize_scores(scores)
    elif mode != "weighted":
        raise ValueError(f"unknown router mode {mode!r}; expected 'topk', 'top1' or 'weighted'")
    return torch.softmax(scores / temperature, dim=-1)
