"""Isotropic merging (Marczak et al., ICML 2025): Iso-C and Iso-CTS (MASS_SPEC "Static mergers")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mass_exp.merging.basic import resolve_alpha
from mass_exp.merging.task_vectors import StateDict, check_endpoints, compose, deltas, is_matrix_param, param_shape
from mass_exp.merging.tsv import orthogonalize

__all__ = ["iso_c", "iso_c_matrix", "iso_cts", "iso_cts_matrix", "iso_cts_split"]


def iso_c_matrix(total: torch.Tensor) -> torch.Tensor:
    """Iso-C of one matrix: SVD Σ_t τ_t = U Σ Vᵀ, then every singular value replaced by their mean: mean(σ)·U Vᵀ."""
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_split(r: int, num_tasks: int, common_space_fraction: float = 0.8) -> tuple[int, int]:
    """(common directions, directions per task) for Iso-CTS, as the reference code: common = int(r·f), then the
    task-specific total is rounded (Python ``round``) to a multiple of T and common takes the remainder.
    Always ``common + T·per_task == r``."""
    common = int(r * common_space_fraction)
    specific_total = round((r - common) / num_tasks) * num_tasks
    if specific_total > r:  # degenerate tiny matrices only (the reference code would slice with a negative index)
        specific_total = (r // num_tasks) * num_tasks
    common = r - specific_total
    per_task = int((r - common) / num_tasks)
    return common, per_task


def iso_cts_matrix(task_deltas: Sequence[torch.Tensor], common_space_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS of one matrix: top common directions of Σ τ_t plus, per task, the top directions of τ_t with the
    common part removed; U and V stacked and orthogonalized as in TSV-M; all singular values set to their mean."""
    total = torch.stack(list(task_deltas)).sum(0) if len(task_deltas) > 1 else task_deltas[0].clone()
    r = min(total.shape)
    common, per_task = iso_cts_split(r, len(task_deltas), common_space_fraction)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vh[:common].T
    us, ss, vs = [], [], []
    for d in task_deltas:
        d_ts = d - uc @ (uc.T @ d)
        ut, st, vht = torch.linalg.svd(d_ts, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vht[:per_task].T)
    U = orthogonalize(torch.cat([*us, uc], dim=1))
    V = orthogonalize(torch.cat([*vs, vc], dim=1))
    sigma = torch.cat([*ss, sc]).mean()
    return sigma * (U @ V.T)


def iso_c(
    pretrained: StateDict, finetuned: Sequence[StateDict], *, alpha: float | None = 1.0
) -> dict[str, torch.Tensor]:
    """Iso-C: θ = θ_pre + α·M, M = iso_c_matrix(Σ τ_t) per matrix parameter, the mean of the τ_t for vectors."""
    if not finetuned:
        raise ValueError("at least one fine-tuned endpoint is required")
    check_endpoints(pretrained, finetuned)
    a = resolve_alpha(alpha)
    out: dict[str, torch.Tensor] = {}
    for name in pretrained:
        ds = deltas(pretrained, finetuned, name)
        total = torch.stack(ds).sum(0)
        m = iso_c_matrix(total) if is_matrix_param(param_shape(pretrained, name)) else total / len(ds)
        out[name] = compose(pretrained[name], m, a)
    return out


def iso_cts(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    *,
    alpha: float | None = 1.0,
    common_space_fraction: float = 0.8,
) -> dict[str, torch.Tensor]:
    """Iso-CTS: θ = θ_pre + α·M, M = iso_cts_matrix(τ_1..τ_T) per matrix parameter, the mean of the τ_t for
    vectors. ``common_space_fraction`` is the share of min(m, n) kept as the common subspace (0.8)."""
    if not finetuned:
        raise ValueError("at least one fine-tuned endpoint is required")
    if not 0.0 <= common_space_fraction <= 1.0:
        raise ValueError(f"common_space_fraction must be in [0, 1], got {common_space_fraction}")
    check_endpoints(pretrained, finetuned)
    a = resolve_alpha(alpha)
    out: dict[str, torch.Tensor] = {}
    for name in pretrained:
        ds = deltas(pretrained, finetuned, name)
        if is_matrix_param(param_shape(pretrained, name)):
            m = iso_cts_matrix(ds, common_space_fraction)
        else:
            m = torch.stack(ds).sum(0) / len(ds)
        out[name] = compose(pretrained[name], m, a)
    return out
