"""Task Singular Vectors (Gargiulo et al., CVPR 2025): TSV-C (compression) and TSV-M (merging).

MASS_SPEC "Static mergers" (tsv_c, tsv_m) and "MASS" steps 1-2 and 6: per matrix parameter the rank-k factors of
the tasks are stacked, Û = [U_1 … U_T] and V̂ likewise, replaced by their nearest matrices with orthonormal columns
(SVD Û = P D Qᵀ → P Qᵀ), and M = Û_⊥ diag(σ̂) V̂_⊥ᵀ. Vector parameters: the mean of the task deltas.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch

from mass_exp.merging.basic import check_task, resolve_alpha
from mass_exp.merging.factors import FactorStore, rank_rule, resolve_rank, truncated_svd
from mass_exp.merging.task_vectors import (
    StateDict,
    check_endpoints,
    compose,
    deltas,
    is_matrix_param,
    param_dtype,
    param_shape,
)

__all__ = [
    "factor_cosine",
    "orthogonalize",
    "select_non_redundant",
    "tsv_c",
    "tsv_m",
    "tsv_matrix",
    "tsv_matrix_svd",
    "tsv_lowrank",
    "TSVExpertBuilder",
    "inv_sqrt_psd",
    "two_block_inv_sqrt",
    "tsv_merge_from_factors",
]

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# Orthogonalisation of the stacked factors goes through the small (|Ω|k)×(|Ω|k) Gram matrix G = ÛᵀÛ: the nearest
# matrix with orthonormal columns (the polar factor) is Û G^(-1/2) = P Qᵀ for Û = P D Qᵀ. G and its inverse square
# root are computed in float64; the SVD of the tall matrix is kept for stacks whose G is ill-conditioned
# (λ_min ≤ GRAM_RCOND·λ_max, i.e. κ(Û) ≥ 10³: nearly shared directions, where the polar factor is ill-determined
# and both routes lose accuracy) and for wide stacks (more columns than rows: G is singular).
GRAM_RCOND = 1e-6
# Fast route: a float32 Gram matrix (blocks from the float32 factors, no conversion of the m×k factors) and a
# float32 eigendecomposition, half the cost of float64, used when G is well-conditioned, λ_min > FAST_GRAM_RCOND·λ_max
# (κ(Û) < 10). Measured on stacks of three 768×96 orthonormal blocks: the polar factor then differs from the float64
# one by 1.6e-6 relative at λ_min/λ_max = 0.013 and 1.3e-6 at 0.09 (random subspaces), the float32 result's own
# accuracy. Otherwise the blocks are recomputed in float64 and the route above is taken.
FAST_GRAM_RCOND = 1e-2
# which route each orthogonalisation took ("gram", "gram2" = the two-block closed form, "gram_fast", "gram2_fast" =
# the same in float32 for well-conditioned stacks, "svd" = requested, "svd_fallback" = ill-conditioned Gram matrix);
# for tests and benchmarks
ORTHO_COUNTS: Counter[str] = Counter()


def _orthogonalize_svd(a: torch.Tensor) -> torch.Tensor:
    """P Qᵀ from one thin SVD a = P D Qᵀ of the m×(|Ω|k) stacked factors (never of an m×m matrix)."""
    if a.shape[0] < a.shape[1]:
        q, _, ph = torch.linalg.svd(a.T, full_matrices=False)  # tall SVDs are faster; (P Qᵀ)ᵀ = Q Pᵀ
        return (q @ ph).T
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def inv_sqrt_psd(g: torch.Tensor, rcond: float = GRAM_RCOND,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """G^(-1/2) of a symmetric positive semi-definite matrix, from its eigendecomposition in ``dtype`` (float64 by
    default; float32 only for well-conditioned G, see FAST_GRAM_RCOND); None when G is ill-conditioned
    (λ_min ≤ rcond·λ_max) or not finite."""
    g64 = g.to(dtype)
    evals, evecs = torch.linalg.eigh(g64)
    lo, hi = float(evals[0]), float(evals[-1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= 0.0 or lo <= rcond * hi:
        return None
    return (evecs * evals.rsqrt()) @ evecs.T


def two_block_inv_sqrt(b: torch.Tensor, rcond: float = GRAM_RCOND,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """G^(-1/2) for G = [[I, B], [Bᵀ, I]] (two stacked k-column blocks with orthonormal columns, B = U₁ᵀU₂ k×k),
    in closed form from the k×k SVD B = X S Yᵀ (float64): in the bases X, Y, G splits into 2×2 blocks
    [[1, s], [s, 1]] with eigenvalues 1 ± s, so G^(-1/2) = [[X a Xᵀ, X b Yᵀ], [Y b Xᵀ, Y a Yᵀ]] with
    a, b = ((1+s)^(-1/2) ± (1-s)^(-1/2)) / 2. None when ill-conditioned ((1 - s_max) ≤ rcond·(1 + s_max)).
    ``dtype``: of the computation (float32 only for well-conditioned blocks, see FAST_GRAM_RCOND)."""
    b64 = b.to(dtype)
    if b64.shape[0] != b64.shape[1]:
        raise ValueError(f"two_block_inv_sqrt needs a square cross-Gram block, got {tuple(b64.shape)}")
    x, s, yh = torch.linalg.svd(b64)
    smax = float(s[0]) if s.numel() else 0.0
    if not math.isfinite(smax) or (1.0 - smax) <= rcond * (1.0 + smax):
        return None
    fp, fm = (1.0 + s).rsqrt(), (1.0 - s).rsqrt()
    a_, b_ = 0.5 * (fp + fm), 0.5 * (fp - fm)
    y = yh.T
    top = torch.cat([(x * a_) @ x.T, (x * b_) @ y.T], dim=1)
    bottom = torch.cat([(y * b_) @ x.T, (y * a_) @ y.T], dim=1)
    return torch.cat([top, bottom], dim=0)


def orthogonalize(a: torch.Tensor, method: str = "auto", rcond: float = GRAM_RCOND) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (orthogonal Procrustes, the polar factor): a (aᵀa)^(-1/2) = P Qᵀ.

    ``method="auto"``: from the float64 Gram matrix aᵀa when it is well-conditioned, else (or for wide ``a``) from
    the thin SVD a = P D Qᵀ; ``"gram"`` raises instead of falling back; ``"svd"``: the SVD route only.
    """
    if method not in ("auto", "gram", "svd"):
        raise ValueError(f"method must be auto, gram or svd, got {method!r}")
    if method == "svd":
        ORTHO_COUNTS["svd"] += 1
        return _orthogonalize_svd(a)
    w = None
    if a.shape[0] >= a.shape[1]:
        a64 = a.to(torch.float64)
        w = inv_sqrt_psd(a64.T @ a64, rcond)
    if w is None:
        if method == "gram":
            raise ValueError(f"Gram matrix of the {tuple(a.shape)} stack is ill-conditioned (rcond {rcond:g})")
        ORTHO_COUNTS["svd_fallback"] += 1
        return _orthogonalize_svd(a)
    ORTHO_COUNTS["gram"] += 1
    return a @ w.to(a.dtype)


CrossGram = Callable[[str, int, int], torch.Tensor]


def _side(blocks: Sequence[torch.Tensor], side: str, gram: CrossGram | None, rcond: float,
          two_block: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One side (U or V) of TSV-M: (basis, W) with the orthonormalised stack = basis @ W, W = G^(-1/2), or (the
    SVD-orthogonalised stack, None) when G is ill-conditioned. W is float32 on the fast route (float32 factors and
    λ_min > FAST_GRAM_RCOND·λ_max), else float64 (blocks recomputed in float64)."""
    stack = torch.cat(list(blocks), dim=1)
    n = len(blocks)

    def fast_block(i: int, j: int) -> torch.Tensor:
        if gram is not None:
            return gram(side, i, j)
        return blocks[i].T @ blocks[j]

    def exact_block(i: int, j: int) -> torch.Tensor:
        return blocks[i].to(torch.float64).T @ blocks[j].to(torch.float64)

    def assemble(block: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        rows = [torch.cat([block(i, j) if i <= j else block(j, i).T for j in range(n)], dim=1) for i in range(n)]
        return torch.cat(rows, dim=0)

    if stack.shape[0] >= stack.shape[1]:
        pair = two_block and n == 2 and blocks[0].shape[1] == blocks[1].shape[1]
        w = None
        if pair:
            b = fast_block(0, 1)
            if b.dtype == torch.float32:
                w, route = two_block_inv_sqrt(b, FAST_GRAM_RCOND, dtype=torch.float32), "gram2_fast"
            if w is None:
                w, route = two_block_inv_sqrt(exact_block(0, 1), rcond), "gram2"
        else:
            g = assemble(fast_block)
            if g.dtype == torch.float32:
                w, route = inv_sqrt_psd(g, FAST_GRAM_RCOND, dtype=torch.float32), "gram_fast"
            if w is None:
                w, route = inv_sqrt_psd(assemble(exact_block), rcond), "gram"
        if w is not None:
            ORTHO_COUNTS[route] += 1
            return stack, w
    ORTHO_COUNTS["svd_fallback"] += 1
    return _orthogonalize_svd(stack), None


def tsv_lowrank(factors: Sequence[Factors], *, gram: Callable[[str, int, int], torch.Tensor] | None = None,
                rcond: float = GRAM_RCOND, two_block: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-M of one matrix parameter as a product M = A Bᵀ (A m×r, B n×r, r = Σ k_t), from per-task factors.

    M = Û_⊥ diag(σ̂) V̂_⊥ᵀ = Û (W_U diag(σ̂) W_Vᵀ) V̂ᵀ with W = G^(-1/2) of each side's Gram matrix, so the
    orthonormalised m×r and n×r stacks are never formed: the r×r core is folded into the shorter side.
    ``gram(side, i, j)`` may supply the blocks U_iᵀU_j / V_iᵀV_j (i ≤ j, in the factors' dtype; e.g. cached across
    experts);
    by default they are computed here. With two tasks of orthonormal factors the closed form
    :func:`two_block_inv_sqrt` is used (``two_block=False``: the general eigendecomposition). With one task the
    factors are used as they are (the rank-k truncation, TSV-C).
    """
    if not factors:
        raise ValueError("tsv_matrix needs the factors of at least one task")
    us, ss, vs = [f[0] for f in factors], [f[1] for f in factors], [f[2] for f in factors]
    s = torch.cat(ss)
    if len(factors) == 1:
        return us[0] * s, vs[0]
    bu, wu = _side(us, "U", gram, rcond, two_block)
    bv, wv = _side(vs, "V", gram, rcond, two_block)
    if wu is None and wv is None:
        return bu * s, bv
    # the r×r core in float64 unless both sides took the float32 route
    cdt = torch.float32 if all(w is None or w.dtype == torch.float32 for w in (wu, wv)) else torch.float64
    sc = s.to(cdt)
    left = (wu.to(cdt) * sc) if wu is not None else torch.diag(sc)  # W_U diag(σ)
    core = left @ wv.to(cdt).T if wv is not None else left  # W_U diag(σ) W_Vᵀ, r×r
    core = core.to(bu.dtype)
    if bu.shape[0] <= bv.shape[0]:
        return bu @ core, bv
    return bu, bv @ core.T


def tsv_matrix(factors: Sequence[Factors]) -> torch.Tensor:
    """TSV-M of one matrix parameter from per-task factors (U_t m×k, σ_t, V_t n×k): Û_⊥ diag(σ̂) V̂_⊥ᵀ.

    With one task the (already orthonormal) factors are used as they are, so the result is exactly the rank-k
    truncation (TSV-C). Orthogonalisation as in :func:`tsv_lowrank` (Gram route, SVD where ill-conditioned).
    """
    a, b = tsv_lowrank(factors)
    return a @ b.T


def tsv_matrix_svd(factors: Sequence[Factors]) -> torch.Tensor:
    """TSV-M of one matrix parameter with both stacks orthogonalised by thin SVDs (the reference route)."""
    if not factors:
        raise ValueError("tsv_matrix needs the factors of at least one task")
    u = torch.cat([f[0] for f in factors], dim=1)
    s = torch.cat([f[1] for f in factors])
    v = torch.cat([f[2] for f in factors], dim=1)
    if len(factors) > 1:
        u = orthogonalize(u, "svd")
        v = orthogonalize(v, "svd")
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


class TSVExpertBuilder:
    """θ_Ω = θ_pre + α·TSV-M(Ω) from a factor store, for many task sets Ω (MASS step 6), built in place.

    With ``cache=True`` what does not depend on Ω is prepared once, on the build device: the pretrained weights
    (float32), each task's factors and vector deltas (on first use), and the Gram blocks U_iᵀU_i, U_iᵀU_j, V_iᵀV_j
    of tasks and pairs of tasks (float32, on first use, up to ``gram_cache_mb``). With ``cache=False`` nothing is
    kept (one parameter at a time is read, as for a one-off merge). ``build(tasks, out)`` writes into ``out`` (a
    mapping name -> preallocated tensor, e.g. an expert module's state dict) in place; without ``out`` it returns
    new tensors. The device is ``device``, else that of ``out`` at the first build, else the pretrained tensors'.
    ``eps`` enables the step-2 redundancy filter on matrix parameters.
    """

    def __init__(self, pretrained: StateDict, factors: FactorStore, alpha: float | None = 1.0, *,
                 eps: float | None = None, device: torch.device | str | None = None, cache: bool = True,
                 gram_cache_mb: float = 512.0, rcond: float = GRAM_RCOND) -> None:
        _check_store(pretrained, factors)
        self.pretrained = pretrained
        self.factors = factors
        self.alpha = resolve_alpha(alpha)
        self.eps = eps
        self.device = torch.device(device) if device is not None else None
        self.cache = bool(cache)
        self.rcond = float(rcond)
        self.gram_cache_bytes = int(gram_cache_mb * 2**20)
        self.names = list(pretrained)
        self._dtypes = {n: param_dtype(pretrained, n) for n in self.names}
        self._pre: dict[str, torch.Tensor] = {}
        self._task: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
        self._gram: dict[tuple[str, str, int, int], torch.Tensor] = {}
        self._gram_bytes = 0

    # -- per-task (Ω-independent) pieces -----------------------------------------------------------------------
    def _pre32(self, name: str, device: torch.device) -> torch.Tensor:
        if name in self._pre:
            return self._pre[name]
        t = self.pretrained[name].to(device=device, dtype=torch.float32).contiguous()
        if self.cache:
            self._pre[name] = t
        return t

    def _task_part(self, t: int, name: str, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (t, name)
        if key in self._task:
            return self._task[key]
        if self.factors.is_matrix(name):
            part = tuple(x.to(device=device, dtype=torch.float32).contiguous() for x in self.factors.factors(t, name))
        else:
            part = (self.factors.vector(t, name).to(device=device, dtype=torch.float32),)
        if self.cache:
            self._task[key] = part
        return part

    def _gram_block(self, name: str, side: str, i: int, j: int, device: torch.device) -> torch.Tensor:
        """X_iᵀX_j of side X (U or V) of tasks i, j (task indices of the store), in the factors' float32: the
        fast route's blocks (``_side`` recomputes them in float64 where G is not near the identity)."""
        if i > j:
            return self._gram_block(name, side, j, i, device).T
        key = (name, side, i, j)
        g = self._gram.get(key)
        if g is not None:
            return g
        pos = 0 if side == "U" else 2
        xi = self._task_part(i, name, device)[pos]
        xj = xi if i == j else self._task_part(j, name, device)[pos]
        g = xi.T @ xj
        nbytes = g.numel() * g.element_size()
        if self.cache and self._gram_bytes + nbytes <= self.gram_cache_bytes:
            self._gram[key] = g
            self._gram_bytes += nbytes
        return g

    def prepare(self, tasks: Sequence[int] | None = None, device: torch.device | str | None = None) -> None:
        """Load now what no Ω changes (pretrained weights, the tasks' factors and their own Gram blocks), instead
        of on first use. Needs ``cache=True``."""
        if not self.cache:
            raise ValueError("prepare() needs a caching builder (cache=True)")
        if device is not None and self.device is None:
            self.device = torch.device(device)
        dev = self._resolve_device(None)
        for name in self.names:
            self._pre32(name, dev)
            for t in range(self.factors.num_tasks) if tasks is None else tasks:
                self._task_part(int(t), name, dev)
                if self.factors.is_matrix(name):
                    self._gram_block(name, "U", int(t), int(t), dev)
                    self._gram_block(name, "V", int(t), int(t), dev)

    def nbytes(self) -> int:
        """Bytes held by the prepared pieces (pretrained weights, task factors, Gram blocks)."""
        held = [*self._pre.values(), *(x for part in self._task.values() for x in part), *self._gram.values()]
        return sum(x.numel() * x.element_size() for x in held)

    # -- building ------------------------------------------------------------------------------------------------
    def _resolve_device(self, out: Mapping[str, torch.Tensor] | None) -> torch.device:
        if self.device is None:
            if out is not None and len(out):
                self.device = next(iter(out.values())).device
            elif self.cache:
                self.device = self.pretrained[self.names[0]].device
            else:
                return self.pretrained[self.names[0]].device
        return self.device

    def build(self, tasks: Sequence[int], out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """θ_pre + α·TSV-M(tasks) (deduplicated, ascending); written into ``out`` when given (and returned)."""
        omega = sorted({int(t) for t in tasks})
        if not omega:
            raise ValueError("tasks must name at least one task")
        for t in omega:
            if not 0 <= t < self.factors.num_tasks:
                raise ValueError(f"task {t} out of range: the factor store holds {self.factors.num_tasks} tasks")
        if out is not None:
            missing = [n for n in self.names if n not in out]
            if missing:
                raise ValueError(f"output has no tensor for parameter {missing[0]!r}")
        device = self._resolve_device(out)
        a = self.alpha
        result: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in self.names:
                pre = self._pre32(name, device)
                dst = out[name] if out is not None else None
                inplace = (dst is not None and dst.dtype == torch.float32 and dst.device == pre.device
                           and dst.shape == pre.shape and dst.is_contiguous())
                if self.factors.is_matrix(name):
                    fs = [self._task_part(t, name, device) for t in omega]
                    sub = omega
                    if self.eps is not None and len(fs) > 1:
                        keep = select_non_redundant(fs, self.eps)  # type: ignore[arg-type]
                        fs, sub = [fs[i] for i in keep], [omega[i] for i in keep]
                    gram = None
                    if self.cache:
                        def gram(side: str, i: int, j: int, _n=name, _s=sub) -> torch.Tensor:
                            return self._gram_block(_n, side, _s[i], _s[j], device)
                    lhs, rhs = tsv_lowrank(fs, gram=gram, rcond=self.rcond)  # type: ignore[arg-type]
                    if inplace:
                        torch.addmm(pre, lhs, rhs.T, alpha=a, out=dst)
                        value = dst
                    else:
                        value = torch.addmm(pre, lhs, rhs.T, alpha=a)
                else:
                    vs = [self._task_part(t, name, device)[0] for t in omega]
                    w = a / len(vs)  # θ_pre + α·mean(deltas), accumulated without stacking
                    value = torch.add(pre, vs[0], alpha=w, out=dst) if inplace else torch.add(pre, vs[0], alpha=w)
                    for v in vs[1:]:
                        value.add_(v, alpha=w)
                if dst is not None and value is not dst:
                    dst.copy_(value)
                    value = dst
                elif dst is None and self._dtypes[name] != torch.float32:
                    value = value.to(self._dtypes[name])
                result[name] = value
        return result


def tsv_merge_from_factors(
    pretrained: StateDict,
    factors: FactorStore,
    tasks: Sequence[int],
    alpha: float | None = 1.0,
    *,
    eps: float | None = None,
    device: torch.device | str | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """θ_Ω = θ_pre + α·TSV-M(tasks in Ω) from stored factors (MASS step 6); vector parameters are the mean of
    the subset's deltas. With one task this is TSV-C for that task. Tasks are deduplicated and sorted (ascending
    task index, spec step 5). ``eps`` enables the step-2 redundancy filter on matrix parameters. Returns full
    weights in the pretrained dtype, on ``device`` (default: where the pretrained tensors are), or writes them
    into ``out`` in place. For many Ω use one :class:`TSVExpertBuilder`, which keeps what Ω does not change.
    """
    return TSVExpertBuilder(pretrained, factors, alpha, eps=eps, device=device, cache=False).build(tasks, out)


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
