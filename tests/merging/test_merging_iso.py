from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from merging_helpers import make_endpoints

from mass_exp.merging.iso import iso_c, iso_cts, iso_cts_split
from mass_exp.merging.task_vectors import matrix_keys, vector_keys


def _delta(out, pre, k, alpha=1.0):
    return (out[k].double() - pre[k].double()) / alpha


def test_iso_c_has_equal_singular_values():
    pre, fts = make_endpoints(3, seed=7)
    out = iso_c(pre, fts, alpha=1.3)
    for name in matrix_keys(pre):
        sv = torch.linalg.svdvals(_delta(out, pre, name, 1.3))
        total = sum(ft[name] - pre[name] for ft in fts)
        expected = torch.linalg.svdvals(total.double()).mean()
        assert torch.allclose(sv, torch.full_like(sv, float(expected)), rtol=1e-4), name
    for name in vector_keys(pre):
        mean = sum(ft[name] - pre[name] for ft in fts) / 3
        assert torch.allclose(_delta(out, pre, name, 1.3).float(), mean, atol=1e-5)


def test_iso_c_keeps_singular_vectors_of_the_sum():
    pre, fts = make_endpoints(2, seed=8)
    out = iso_c(pre, fts)
    name = "proj"
    total = sum(ft[name] - pre[name] for ft in fts)
    u, s, vh = torch.linalg.svd(total)
    assert torch.allclose((out[name] - pre[name]), s.mean() * u[:, : s.numel()] @ vh, atol=1e-5)


def test_iso_cts_equal_singular_values_and_split():
    pre, fts = make_endpoints(3, seed=9)
    out = iso_cts(pre, fts)
    for name in matrix_keys(pre):
        sv = torch.linalg.svdvals(_delta(out, pre, name))
        assert torch.allclose(sv, sv.mean().expand_as(sv), rtol=1e-4), name
    # r = 8, T = 3: common = int(6.4) = 6 -> round(2/3) * 3 = 3 specific -> common 5, 1 per task
    assert iso_cts_split(8, 3) == (5, 1)
    assert iso_cts_split(768, 8) == (616, 19)
    assert iso_cts_split(50, 20) == (50, 0)


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 1024), t=st.integers(1, 20), f=st.sampled_from([0.0, 0.5, 0.8, 1.0]))
def test_iso_cts_split_adds_up(r, t, f):
    common, per_task = iso_cts_split(r, t, f)
    assert common + per_task * t == r
    assert 0 <= common <= r and per_task >= 0


def test_iso_cts_with_full_common_space_is_iso_c():
    pre, fts = make_endpoints(3, seed=10)
    a = iso_cts(pre, fts, common_space_fraction=1.0, alpha=0.8)
    b = iso_c(pre, fts, alpha=0.8)
    for name in pre:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    with pytest.raises(ValueError, match="common_space_fraction"):
        iso_cts(pre, fts, common_space_fraction=1.5)


def test_iso_cts_differs_from_iso_c_by_default():
    pre, fts = make_endpoints(3, seed=11)
    a, b = iso_cts(pre, fts), iso_c(pre, fts)
    name = "transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.allclose(a[name], b[name], atol=1e-3)


def _reference_iso_cts_matrix(task_deltas, fraction=0.8):
    """Iso-CTS transcribed from the reference implementation's layout: r-wide buffers, task blocks first, then the
    common block; P Qᵀ orthogonalisation of both; isotropic spectrum."""
    total = sum(task_deltas)
    r, t = min(total.shape), len(task_deltas)
    common = int(r * fraction)
    common = r - round((r - common) / t) * t
    per = int((r - common) / t)
    u, s, vh = torch.linalg.svd(total.double(), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], vh[:common]
    bu, bs, bv = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
    for i, d in enumerate(task_deltas):
        rest = d.double() - cu @ cu.T @ d.double()
        ut, st_, vt = torch.linalg.svd(rest, full_matrices=False)
        sl = slice(i * per, (i + 1) * per)
        bu[:, sl], bs[sl], bv[sl] = ut[:, :per], st_[:per], vt[:per]
    bu[:, t * per :], bs[t * per :], bv[t * per :] = cu, cs, cv
    pu, _, qu = torch.linalg.svd(bu, full_matrices=False)
    pv, _, qv = torch.linalg.svd(bv, full_matrices=False)
    return bs.mean() * (pu @ qu) @ (pv @ qv)


def test_iso_cts_matches_reference_layout():
    pre, fts = make_endpoints(3, seed=12)
    out = iso_cts(pre, fts)
    for name in matrix_keys(pre):
        ref = _reference_iso_cts_matrix([ft[name] - pre[name] for ft in fts])
        assert torch.allclose(_delta(out, pre, name), ref, atol=1e-4), name
