"""Task Singular Vectors (Gargiulo et al., CVPR 2025): TSV-C (compression) and TSV-M (merging).

MASS_SPEC "Static mergers" (tsv_c, tsv_m) and "MASS" steps 1-2 and 6: per matrix parameter the rank-k factors of
the tasks are stacked, Û = [U_1 … U_T] and V̂ likewise, replaced by their nearest matrices with orthonormal columns
(SVD Û = P D Qᵀ → P Qᵀ), and M = Û_⊥ diag(σ̂) V̂_⊥ᵀ. Vector parameters: the mean of the task deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mass_exp.merging.basic import check_task, resolve_alpha
from mass_exp.merging.factors import FactorStore, rank_rule, resolve_rank, truncated_svd
from mass_exp.merging.task_vectors import StateDict, check_endpoints, compose, deltas, is_matrix_param, param_shape

__all__ = [
    "factor_cosine",
    "orthogonalize",
    "select_non_redundant",
    "tsv_c",
    "tsv_m",
    "tsv_matrix",
    "tsv_merge_from_factors",
]

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def orthogonalize(a: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (orthogonal Procrustes): SVD a = P D Qᵀ → P Qᵀ.

    Costs one thin SVD of the m×(|Ω|k) stacked factors, never of an m×m matrix.
    """
    if a.shape[0] < a.shape[1]:
        q, _, ph = torch.linalg.svd(a.T, full_matrices=False)  # tall SVDs are faster; (P Qᵀ)ᵀ = Q Pᵀ
        return (q @ ph).T
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_matrix(factors: Sequence[Factors]) -> torch.Tensor:
    """TSV-M of one matrix parameter from per-task factors (U_t m×k, σ_t, V_t n×k): Û_⊥ diag(σ̂) V̂_⊥ᵀ.

    With one task the (already orthonormal) factors are used as they are, so the result is exactly the rank-k
    truncation (TSV-C).
    """
    if not factors:
        raise ValueError("tsv_matrix needs the factors of at least one task")
    u = torch.cat([f[0] for f in factors], dim=1)
    s = torch.cat([f[1] for f in factors])
    v = torch.cat([f[2] for f in factors], dim=1)
    if len(factors) > 1:
        u = orthogonalize(u)
        v = orthogonalize(v)
    return (u * s) @ v.T


def factor_cosine(a: Factors, b: Factors) -> float:
    """Cosine similarity of two rank-k reconstructions U_a diag(σ_a) V_aᵀ and U_b diag(σ_b) V_bᵀ (Frobenius),
    computed from the factors: ⟨A, B⟩ = Σ (diag(σ_a) U_aᵀ U_b diag(σ_b)) ∘ (V_aᵀ V_b), ‖A‖ = ‖σ_a‖ (U, V
    orthonormal). Near-zero deltas count as dissimilar (0), as in the MASS code."""
    ua, sa, va = a
    ub, sb, vb = b
    inner = ((sa[:, None] * (ua.T @ ub) * sb[None, :]) * (va.T @ vb)).sum()
    na, nb = torch.linalg.norm(sa), torch.linalg.norm(sb)
    if float(na) < 1e-9 or float(nb) < 1e-9:
        return 0.0
    return float(inner / (na * nb))


def select_non_redundant(factors: Sequence[Factors], eps: float) -> list[int]:
    """MASS step 2 redundancy filter for one matrix parameter: walk the tasks in order and skip a task whose
    rank-k reconstruction has cosine similarity > eps with that of an already accepted task."""
    accepted: list[int] = []
    for t, f in enumerate(factors):
        if all(factor_cosine(factors[a], f) <= eps for a in accepted):
            accepted.append(t)
    return accepted


def _check_store_args(
    factors: FactorStore, finetuned: Sequence[StateDict], rank: int | None, rank_fraction: float | None
) -> None:
    if finetuned and len(finetuned) != factors.num_tasks:
        raise ValueError(f"{len(finetuned)} endpoints given but the factor store holds {factors.num_tasks} tasks")
    if (rank is not None or rank_fraction is not None) and rank_rule(rank, rank_fraction) != factors.info["rank_rule"]:
        raise ValueError(
            f"rank rule {rank_rule(rank, rank_fraction)} differs from the factor store's {factors.info['rank_rule']}"
        )


def _check_store(pretrained: StateDict, factors: FactorStore) -> None:
    for name in pretrained:
        if name not in factors.info["shapes"]:
            raise ValueError(f"factor store is missing parameter {name!r}")
        if tuple(param_shape(pretrained, name)) != factors.shape(name):
            raise ValueError(
                f"factor store parameter {name!r} has shape {list(factors.shape(name))}, "
                f"pretrained has {list(param_shape(pretrained, name))}"
            )
    extra = sorted(set(factors.names) - set(pretrained))
    if extra:
        raise ValueError(f"factor store has parameter {extra[0]!r} that is not in the pretrained state dict")


def tsv_merge_from_factors(
    pretrained: StateDict,
    factors: FactorStore,
    tasks: Sequence[int],
    alpha: float | None = 1.0,
    *,
    eps: float | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """θ_Ω = θ_pre + α·TSV-M(tasks in Ω) from stored factors (MASS step 6); vector parameters are the mean of
    the subset's deltas. With one task this is TSV-C for that task. Tasks are deduplicated and sorted (ascending
    task index, spec step 5). ``eps`` enables the step-2 redundancy filter on matrix parameters. Returns full
    weights in the pretrained dtype, on ``device`` (default: where the pretrained tensors are).
    """
    a = resolve_alpha(alpha)
    omega = sorted({int(t) for t in tasks})
    if not omega:
        raise ValueError("tasks must name at least one task")
    for t in omega:
        if not 0 <= t < factors.num_tasks:
            raise ValueError(f"task {t} out of range: the factor store holds {factors.num_tasks} tasks")
    _check_store(pretrained, factors)
    out: dict[str, torch.Tensor] = {}
    for name in pretrained:
        pre = pretrained[name]
        if device is not None:
            pre = pre.to(device)
        if factors.is_matrix(name):
            fs: list[Factors] = []
            for t in omega:
                u, s, v = factors.factors(t, name)
                fs.append((u.to(pre.device), s.to(pre.device), v.to(pre.device)))
            if eps is not None and len(fs) > 1:
                fs = [fs[i] for i in select_non_redundant(fs, eps)]
            m = tsv_matrix(fs)
        else:
            m = torch.stack([factors.vector(t, name).to(pre.device) for t in omega]).mean(0)
        out[name] = compose(pre, m, a)
    return out


def tsv_c(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    *,
    task: int,
    alpha: float | None = 1.0,
    factors: FactorStore | None = None,
    rank: int | None = None,
    rank_fraction: float | None = None,
    svd: str = "exact",
) -> dict[str, torch.Tensor]:
    """TSV-C for a known task t: θ_pre + α·(rank-k truncation of every matrix of τ_t, full vector deltas of τ_t).

    k = max(1, floor(min(m, n)/T)) unless ``rank``/``rank_fraction`` say otherwise; with ``factors`` the stored
    truncation is used (and the endpoints are not read).
    """
    if factors is not None:
        _check_store_args(factors, finetuned, rank, rank_fraction)
        check_task(task, factors.num_tasks)
        return tsv_merge_from_factors(pretrained, factors, [task], alpha)
    num_tasks = len(finetuned)
    check_task(task, num_tasks)
    check_endpoints(pretrained, [finetuned[task]])
    a = resolve_alpha(alpha)
    ft = finetuned[task]
    out: dict[str, torch.Tensor] = {}
    for name in pretrained:
        pre = pretrained[name]
        d = ft[name].to(device=pre.device, dtype=torch.float32) - pre.to(torch.float32)
        if is_matrix_param(d):
            k = resolve_rank(d.shape, num_tasks, rank, rank_fraction)
            d = tsv_matrix([truncated_svd(d, k, svd)])
        out[name] = compose(pre, d, a)
    return out


def tsv_m(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    *,
    alpha: float | None = 1.0,
    factors: FactorStore | None = None,
    eps: float | None = None,
    rank: int | None = None,
    rank_fraction: float | None = None,
    svd: str = "exact",
) -> dict[str, torch.Tensor]:
    """TSV-M: θ = θ_pre + α·M, per matrix M = Û_⊥ diag(σ̂) V̂_⊥ᵀ of the stacked rank-k factors of all tasks,
    vector parameters the mean of the τ_t (α = 1 in MASS).

    ``eps`` (None = off, 0.3 in MASS when on) enables the MASS step-2 filter: per matrix parameter, tasks in suite
    order whose rank-k reconstruction has cosine > eps with an accepted task's are skipped (they still count in
    the vector mean). Without ``factors`` the truncations are computed here, one parameter at a time.
    """
    if factors is not None:
        _check_store_args(factors, finetuned, rank, rank_fraction)
        return tsv_merge_from_factors(pretrained, factors, range(factors.num_tasks), alpha, eps=eps)
    if not finetuned:
        raise ValueError("at least one fine-tuned endpoint is required")
    check_endpoints(pretrained, finetuned)
    a = resolve_alpha(alpha)
    num_tasks = len(finetuned)
    out: dict[str, torch.Tensor] = {}
    for name in pretrained:
        pre = pretrained[name]
        if is_matrix_param(param_shape(pretrained, name)):
            k = resolve_rank(param_shape(pretrained, name), num_tasks, rank, rank_fraction)
            fs: list[Factors] = []
            pre32 = pre.to(torch.float32)
            for ft in finetuned:  # one delta alive at a time
                fs.append(truncated_svd(ft[name].to(device=pre.device, dtype=torch.float32) - pre32, k, svd))
            if eps is not None and len(fs) > 1:
                fs = [fs[i] for i in select_non_redundant(fs, eps)]
            m = tsv_matrix(fs)
        else:
            m = torch.stack(deltas(pretrained, finetuned, name)).mean(0)
        out[name] = compose(pre, m, a)
    return out
