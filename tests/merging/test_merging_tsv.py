from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from merging_helpers import make_endpoints

from mass_exp.merging.factors import build_factor_store, truncated_svd
from mass_exp.merging.task_vectors import matrix_keys, vector_keys
from mass_exp.merging.tsv import (
    factor_cosine,
    orthogonalize,
    select_non_redundant,
    tsv_c,
    tsv_m,
    tsv_matrix,
    tsv_merge_from_factors,
)


def _delta(out, pre, k, alpha=1.0):
    return (out[k].double() - pre[k].double()) / alpha


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.float()


def test_tsv_m_with_orthogonal_subspaces_is_sum_of_truncations():
    """Tasks whose kept singular subspaces are mutually orthogonal: Û, V̂ are already orthonormal, so TSV-M is the
    plain sum of the rank-k truncations (the tails, which are dropped, live in the other task's subspace)."""
    m, n = 12, 8  # T = 2 -> k = floor(8 / 2) = 4
    qm, qn = _orthogonal(m, 1), _orthogonal(n, 2)
    s1, s2 = torch.tensor([9.0, 7.0, 5.0, 3.0]), torch.tensor([8.0, 6.0, 4.0, 2.5])
    top1 = (qm[:, 0:4] * s1) @ qn[:, 0:4].T
    top2 = (qm[:, 4:8] * s2) @ qn[:, 4:8].T
    tail1 = (qm[:, 8:10] * torch.tensor([0.5, 0.2])) @ qn[:, 4:6].T
    tail2 = (qm[:, 10:12] * torch.tensor([0.4, 0.1])) @ qn[:, 0:2].T
    pre = {"w": torch.randn(m, n), "b": torch.zeros(3)}
    fts = [
        {"w": pre["w"] + top1 + tail1, "b": torch.tensor([1.0, 2.0, 3.0])},
        {"w": pre["w"] + top2 + tail2, "b": torch.tensor([3.0, 2.0, 1.0])},
    ]
    out = tsv_m(pre, fts)
    assert torch.allclose(out["w"] - pre["w"], top1 + top2, atol=1e-4)
    assert torch.allclose(out["b"], torch.tensor([2.0, 2.0, 2.0]))
    # not the same as task arithmetic (the tails are dropped)
    assert not torch.allclose(out["w"] - pre["w"], top1 + top2 + tail1 + tail2, atol=1e-2)
    # alpha scales everything
    half = tsv_m(pre, fts, alpha=0.5)
    assert torch.allclose(half["w"] - pre["w"], 0.5 * (top1 + top2), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 24), cols=st.integers(1, 24), seed=st.integers(0, 10_000))
def test_orthogonalize_has_orthonormal_columns(m, cols, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, cols, generator=g, dtype=torch.float64)
    q = orthogonalize(a)
    assert q.shape == a.shape
    r = min(m, cols)
    gram = q.T @ q if cols <= m else q @ q.T
    assert torch.allclose(gram, torch.eye(r, dtype=q.dtype), atol=1e-8)
    # nearest such matrix: no worse than the Q of a QR factorisation
    if cols <= m:
        qr_q, _ = torch.linalg.qr(a)
        assert torch.linalg.norm(a - q) <= torch.linalg.norm(a - qr_q) + 1e-9


def test_tsv_m_stacked_factors_orthonormal_and_spectrum():
    """The merged matrix Û_⊥ diag(σ̂) V̂_⊥ᵀ has exactly the stacked σ̂ as singular values."""
    pre, fts = make_endpoints(3)
    store = build_factor_store(pre, fts, progress=False)
    name = "transformer.resblocks.0.mlp.c_fc.weight"
    u = orthogonalize(torch.cat([store.U(t, name) for t in range(3)], 1))
    v = orthogonalize(torch.cat([store.V(t, name) for t in range(3)], 1))
    tk = u.shape[1]
    assert tk == 3 * store.rank(name)
    assert torch.allclose(u.T @ u, torch.eye(tk), atol=1e-5)
    assert torch.allclose(v.T @ v, torch.eye(tk), atol=1e-5)
    out = tsv_m(pre, fts, factors=store)
    sv = torch.linalg.svdvals(_delta(out, pre, name).float())[:tk]
    sigma = torch.cat([store.S(t, name) for t in range(3)]).sort(descending=True).values
    assert torch.allclose(sv, sigma, rtol=1e-4, atol=1e-4)


def test_tsv_c_has_rank_k_and_full_vectors():
    pre, fts = make_endpoints(3, seed=3)
    out = tsv_c(pre, fts, task=1)
    for name in matrix_keys(pre):
        k = max(1, min(pre[name].shape) // 3)
        assert torch.linalg.matrix_rank(_delta(out, pre, name), atol=1e-4) == k, name
        u, s, v = truncated_svd(fts[1][name] - pre[name], k)
        assert torch.allclose(out[name] - pre[name], (u * s) @ v.T, atol=1e-5)
    for name in vector_keys(pre):
        assert torch.allclose(out[name], fts[1][name], atol=1e-6)
    assert torch.linalg.matrix_rank(_delta(tsv_c(pre, fts, task=1, rank=1), pre, "proj"), atol=1e-4) == 1


def test_merge_from_factors_one_task_equals_tsv_c():
    pre, fts = make_endpoints(3, seed=4)
    store = build_factor_store(pre, fts, progress=False)
    for t in range(3):
        a = tsv_merge_from_factors(pre, store, [t])
        b = tsv_c(pre, fts, task=t)
        c = tsv_c(pre, fts, task=t, factors=store)
        for name in pre:
            assert torch.equal(a[name], c[name])
            assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_merge_from_factors_all_tasks_equals_tsv_m_and_subsets():
    pre, fts = make_endpoints(3, seed=5)
    store = build_factor_store(pre, fts, progress=False)
    a = tsv_merge_from_factors(pre, store, [0, 1, 2])
    b = tsv_m(pre, fts)
    c = tsv_m(pre, fts, factors=store)
    for name in pre:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
        assert torch.equal(a[name], c[name])
    # subset = TSV-M of those endpoints at the same k; order and duplicates do not matter
    store2 = build_factor_store(pre, fts, rank=2, progress=False)
    sub = tsv_merge_from_factors(pre, store2, [2, 0, 2], alpha=0.7)
    ref = tsv_m(pre, [fts[0], fts[2]], rank=2, alpha=0.7)
    for name in pre:
        assert torch.allclose(sub[name], ref[name], atol=1e-5), name
    assert set(sub) == set(pre)


def test_merge_from_factors_errors():
    pre, fts = make_endpoints(2)
    store = build_factor_store(pre, fts, progress=False)
    with pytest.raises(ValueError, match="at least one task"):
        tsv_merge_from_factors(pre, store, [])
    with pytest.raises(ValueError, match="task 2 out of range"):
        tsv_merge_from_factors(pre, store, [0, 2])
    bad = dict(pre)
    bad["extra"] = torch.zeros(2)
    with pytest.raises(ValueError, match="missing parameter 'extra'"):
        tsv_merge_from_factors(bad, store, [0])
    with pytest.raises(ValueError, match="rank rule"):
        tsv_m(pre, fts, factors=store, rank=3)
    with pytest.raises(ValueError, match="3 endpoints"):
        tsv_m(pre, [*fts, fts[0]], factors=store)


def test_preserves_dtype():
    pre, fts = make_endpoints(2, dtype=torch.float16)
    for out in (tsv_m(pre, fts), tsv_c(pre, fts, task=0)):
        assert all(out[k].dtype == torch.float16 for k in pre)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 10), n=st.integers(2, 10), k=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_factor_cosine_matches_flattened_cosine(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = truncated_svd(torch.randn(m, n, generator=g, dtype=torch.float64), k)
    b = truncated_svd(torch.randn(m, n, generator=g, dtype=torch.float64), k)
    ra, rb = (a[0] * a[1]) @ a[2].T, (b[0] * b[1]) @ b[2].T
    expected = float(torch.nn.functional.cosine_similarity(ra.reshape(1, -1), rb.reshape(1, -1)))
    assert factor_cosine(a, b) == pytest.approx(expected, abs=1e-5)
    assert factor_cosine(a, a) == pytest.approx(1.0, abs=1e-5)


def test_redundancy_filter_skips_near_duplicate_task():
    """MASS step 2 (eps): a duplicate of task 0 is skipped for matrices but still counts in the vector mean."""
    pre, fts = make_endpoints(2, seed=6)
    dup = {k: v + 1e-3 * torch.randn_like(v) for k, v in fts[0].items()}
    endpoints = [fts[0], dup, fts[1]]
    store = build_factor_store(pre, endpoints, progress=False)
    name = "transformer.resblocks.0.attn.in_proj_weight"
    fs = [store.factors(t, name) for t in range(3)]
    assert select_non_redundant(fs, 0.3) == [0, 2]
    assert select_non_redundant(fs, 1.0) == [0, 1, 2]
    with_filter = tsv_m(pre, endpoints, factors=store, eps=0.3)
    without = tsv_m(pre, endpoints, factors=store)
    assert torch.allclose(with_filter[name] - pre[name], tsv_matrix([fs[0], fs[2]]), atol=1e-5)
    assert not torch.allclose(with_filter[name], without[name], atol=1e-3)
    vec = "ln_post.bias"
    assert torch.allclose(with_filter[vec], without[vec])
    assert torch.allclose(with_filter[vec] - pre[vec], sum(e[vec] - pre[vec] for e in endpoints) / 3, atol=1e-6)
    # the on-the-fly path agrees with the factor-store path
    direct = tsv_m(pre, endpoints, eps=0.3)
    assert torch.allclose(direct[name], with_filter[name], atol=1e-5)
