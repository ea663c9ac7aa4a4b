"""The Gram-matrix orthogonalisation of TSV-M (issue 14) against the thin-SVD route it replaces."""

from __future__ import annotations

import pytest
import torch
from merging_helpers import make_endpoints

from mass_exp.merging.factors import build_factor_store
from mass_exp.merging.tsv import (
    ORTHO_COUNTS,
    TSVExpertBuilder,
    inv_sqrt_psd,
    orthogonalize,
    tsv_lowrank,
    tsv_matrix,
    tsv_matrix_svd,
    tsv_merge_from_factors,
    two_block_inv_sqrt,
)


def _orthonormal(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return q.float()


def _task_factors(m: int, n: int, k: int, tasks: int, seed: int, shared: int = 0):
    """Per-task (U, σ, V) with orthonormal U, V; the first `shared` columns of every task's U and V coincide
    (tasks that share directions: the stack is rank-deficient)."""
    g = torch.Generator().manual_seed(seed)
    common_u, common_v = _orthonormal(m, max(shared, 1), g), _orthonormal(n, max(shared, 1), g)
    out = []
    for _ in range(tasks):
        u, v = _orthonormal(m, k, g), _orthonormal(n, k, g)
        if shared:
            u = torch.linalg.qr(torch.cat([common_u[:, :shared], u[:, shared:]], 1).double())[0].float()
            v = torch.linalg.qr(torch.cat([common_v[:, :shared], v[:, shared:]], 1).double())[0].float()
        s = torch.sort(torch.rand(k, generator=g) * 3 + 0.1, descending=True).values
        out.append((u, s, v))
    return out


@pytest.mark.parametrize("m,cols,seed", [(40, 12, 0), (300, 96, 1), (64, 64, 2), (7, 7, 3)])
def test_gram_orthogonalize_equals_svd_on_random_stacks(m, cols, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, cols, generator=g)
    before = ORTHO_COUNTS["gram"]
    q = orthogonalize(a)
    assert ORTHO_COUNTS["gram"] == before + 1  # the Gram route was taken
    ref = orthogonalize(a, "svd")
    assert torch.allclose(q, ref, atol=2e-5), (q - ref).abs().max()
    assert torch.allclose(q.T @ q, torch.eye(cols), atol=2e-5)


def test_rank_deficient_stack_falls_back_to_svd():
    """A stack with a repeated direction has a singular Gram matrix: the SVD route is taken, bit for bit."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(50, 10, generator=g)
    a[:, 7] = a[:, 2]  # rank 9
    assert inv_sqrt_psd(a.double().T @ a.double()) is None
    before = ORTHO_COUNTS["svd_fallback"]
    q = orthogonalize(a)
    assert ORTHO_COUNTS["svd_fallback"] == before + 1
    assert torch.equal(q, orthogonalize(a, "svd"))
    with pytest.raises(ValueError, match="ill-conditioned"):
        orthogonalize(a, "gram")
    # wide stacks (more columns than rows) cannot be whitened by their Gram matrix either
    wide = torch.randn(6, 9, generator=g)
    assert torch.equal(orthogonalize(wide), orthogonalize(wide, "svd"))


def test_two_block_closed_form_equals_eigendecomposition():
    g = torch.Generator().manual_seed(7)
    u1 = torch.linalg.qr(torch.randn(80, 12, generator=g, dtype=torch.float64))[0]
    u2 = torch.linalg.qr(torch.randn(80, 12, generator=g, dtype=torch.float64))[0]
    gram = torch.cat([u1, u2], 1).T @ torch.cat([u1, u2], 1)
    w = two_block_inv_sqrt(u1.T @ u2)
    assert torch.allclose(w, inv_sqrt_psd(gram), atol=1e-10)
    assert two_block_inv_sqrt(u1.T @ u1) is None  # identical blocks: singular


@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_tsv_matrix_gram_equals_svd_on_random_factors(tasks):
    fs = _task_factors(60, 40, 8, tasks, seed=tasks)
    ref = tsv_matrix_svd(fs)
    scale = ref.abs().max()
    for two_block in (True, False):
        a, b = tsv_lowrank(fs, two_block=two_block)
        assert torch.allclose(a @ b.T, ref, atol=1e-5 * scale), (a @ b.T - ref).abs().max()
    assert torch.allclose(tsv_matrix(fs), ref, atol=1e-5 * scale)


@pytest.mark.parametrize("tasks", [2, 3])
def test_tsv_matrix_on_rank_deficient_stacks_takes_the_svd_branch(tasks):
    """Tasks sharing a direction exactly: Û is rank-deficient; the result is the SVD route's, bit for bit."""
    fs = _task_factors(60, 40, 8, tasks, seed=10 + tasks, shared=2)
    before = ORTHO_COUNTS["svd_fallback"]
    got = tsv_matrix(fs)
    assert ORTHO_COUNTS["svd_fallback"] == before + 2  # both sides
    assert torch.equal(got, tsv_matrix_svd(fs))


def test_nearly_shared_direction_still_agrees(monkeypatch):
    """Just above the fallback threshold the Gram route still matches the SVD route."""
    g = torch.Generator().manual_seed(3)
    u1 = _orthonormal(60, 6, g)
    u2 = _orthonormal(60, 6, g)
    u2 = torch.linalg.qr(torch.cat([(u1[:, :1] + 1e-2 * u2[:, :1]), u2[:, 1:]], 1).double())[0].float()
    fs = [(u1, torch.ones(6), _orthonormal(30, 6, g)), (u2, torch.ones(6), _orthonormal(30, 6, g))]
    before, fast_before = ORTHO_COUNTS["gram2"], ORTHO_COUNTS["gram2_fast"]
    got = tsv_matrix(fs)
    assert ORTHO_COUNTS["gram2"] == before + 1  # U: float64 blocks (ill-conditioned for the float32 route)
    assert ORTHO_COUNTS["gram2_fast"] == fast_before + 1  # V: independent subspaces, float32
    assert torch.allclose(got, tsv_matrix_svd(fs), atol=2e-4)


def test_builder_in_place_equals_merge_and_svd_route():
    pre, fts = make_endpoints(3, seed=8)
    store = build_factor_store(pre, fts, progress=False)
    builder = TSVExpertBuilder(pre, store, alpha=0.7)
    out = {k: torch.empty_like(v) for k, v in pre.items()}
    ptrs = {k: v.data_ptr() for k, v in out.items()}
    for omega in ([1], [0, 2], [2, 1, 0], [0, 2]):  # [0, 2] again: from the cached Gram blocks
        got = builder.build(omega, out=out)
        assert all(got[k].data_ptr() == ptrs[k] for k in out)  # written in place
        ref = tsv_merge_from_factors(pre, store, omega, alpha=0.7)
        for name in pre:
            assert torch.allclose(out[name], ref[name], atol=1e-6), name
            if store.is_matrix(name):  # the thin-SVD route of today
                fs = [store.factors(t, name) for t in sorted(omega)]
                svd = pre[name] + 0.7 * tsv_matrix_svd(fs)
                assert torch.allclose(out[name], svd, atol=1e-5), name
    assert builder.nbytes() > 0
    # eps (redundancy filter) goes through the same builder
    a = TSVExpertBuilder(pre, store, eps=0.0).build([0, 1, 2])
    b = tsv_merge_from_factors(pre, store, [0, 1, 2], eps=0.0)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in pre)


def test_builder_rejects_bad_tasks_and_outputs():
    pre, fts = make_endpoints(2, seed=9)
    store = build_factor_store(pre, fts, progress=False)
    builder = TSVExpertBuilder(pre, store)
    with pytest.raises(ValueError, match="out of range"):
        builder.build([5])
    with pytest.raises(ValueError, match="at least one"):
        builder.build([])
    with pytest.raises(ValueError, match="no tensor for parameter"):
        builder.build([0], out={})


@pytest.mark.parametrize("tasks,route", [(2, "gram2_fast"), (3, "gram_fast"), (4, "gram_fast")])
def test_near_orthogonal_stacks_take_the_float32_route_and_agree_with_svd(tasks, route):
    """Tall stacks of near-orthogonal task subspaces (‖G − I‖_F small, as real task vectors give) are whitened in
    float32, both sides, and still equal the thin-SVD route within float32 tolerance."""
    fs = _task_factors(3000, 800, 8, tasks, seed=20 + tasks)
    before = ORTHO_COUNTS[route]
    a, b = tsv_lowrank(fs)
    assert ORTHO_COUNTS[route] == before + 2
    ref = tsv_matrix_svd(fs)
    assert torch.allclose(a @ b.T, ref, atol=1e-5 * ref.abs().max()), (a @ b.T - ref).abs().max()


@pytest.mark.parametrize("tasks,route", [(2, "gram2"), (3, "gram")])
def test_moderately_ill_conditioned_stacks_take_the_float64_route(tasks, route):
    """A nearly shared direction (λ_min/λ_max ≈ 1e-3: below FAST_GRAM_RCOND, above GRAM_RCOND): the float32 Gram
    matrix is refused and the blocks are recomputed in float64; the result still equals the thin-SVD route."""
    g = torch.Generator().manual_seed(40 + tasks)
    fs = _task_factors(3000, 800, 8, tasks, seed=40 + tasks)
    u1, u2 = fs[0][0], fs[1][0]
    col = u1[:, :1] + 3e-2 * u2[:, :1]
    u2 = torch.linalg.qr(torch.cat([col, u2[:, 1:]], 1).double())[0].float()
    fs[1] = (u2, fs[1][1], fs[1][2])
    before, fast_before = ORTHO_COUNTS[route], ORTHO_COUNTS[route + "_fast"]
    got = tsv_matrix(fs)
    assert ORTHO_COUNTS[route] == before + 1 and ORTHO_COUNTS[route + "_fast"] == fast_before + 1  # U: f64, V: f32
    ref = tsv_matrix_svd([tuple(x.double() for x in f) for f in fs]).float()  # float64 SVDs: κ(Û) ≈ 50 here
    assert torch.allclose(got, ref, atol=1e-5 * ref.abs().max()), (got - ref).abs().max()
