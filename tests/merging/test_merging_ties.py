from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mass_exp.merging.ties import (
    consensus,
    consensus_mask,
    tall_mask_merge,
    tall_masks,
    ties,
    ties_elect_and_merge,
    ties_thresholds,
)


def _sd(flat: list[float]) -> dict[str, torch.Tensor]:
    """A 10-entry 'state dict': a vector parameter v (4) and a matrix parameter m (2x3), flattened in that order."""
    t = torch.tensor(flat)
    return {"v": t[:4].clone(), "m": t[4:].reshape(2, 3).clone()}


def _flat(sd) -> torch.Tensor:
    return torch.cat([sd["v"].reshape(-1), sd["m"].reshape(-1)])


ZERO = _sd([0.0] * 10)
# worked by hand; k = 20 % of d = 10 -> floor(2.0) = 2 -> cut at the 8th smallest magnitude -> 3 entries kept each
T0 = [5.0, -4.0, 3.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  # keeps 5, -4, 3
T1 = [1.0, 4.0, 0.1, 0.2, 0.3, 0.4, 0.5, 2.0, 0.6, 0.7]  # keeps 1, 4, 2 (8th smallest = 1)
T2 = [-3.0, 0.1, -3.0, 0.2, 0.3, 0.4, 0.5, -2.0, 0.6, 0.7]  # keeps -3, -3, -2
# sums of trimmed: e0 = 5+1-3 = 3 (+); e1 = -4+4 = 0; e2 = 3-3 = 0; e7 = 2-2 = 0; sign vector sums to +1
# -> the zero sums take +: e1 -> 4, e2 -> 3, e7 -> 2; e0: disjoint mean of {5, 1} = 3, disjoint sum 6


def test_ties_hand_case_mean_and_sum():
    fts = [_sd(T0), _sd(T1), _sd(T2)]
    assert ties_thresholds(ZERO, fts, k=20) == [3.0, 1.0, 2.0]
    out = ties(ZERO, fts, k=20)
    assert torch.allclose(_flat(out), torch.tensor([3.0, 4.0, 3.0, 0, 0, 0, 0, 2.0, 0, 0]))
    out = ties(ZERO, fts, k=20, merge_fn="sum", alpha=0.5)
    assert torch.allclose(_flat(out), 0.5 * torch.tensor([6.0, 4.0, 3.0, 0, 0, 0, 0, 2.0, 0, 0]))


def test_ties_negative_majority():
    fts = [_sd([-x for x in T]) for T in (T0, T1, T2)]
    out = ties(ZERO, fts, k=20)
    assert torch.allclose(_flat(out), -torch.tensor([3.0, 4.0, 3.0, 0, 0, 0, 0, 2.0, 0, 0]))


def test_ties_zero_majority_keeps_negatives():
    """Reference code: where the elected sign stays 0 (sum 0 and majority 0), the negative values are kept."""
    trimmed = torch.tensor([[2.0, -1.0, 3.0], [-1.0, 1.0, -3.0]])  # sums: 1, 0, 0 -> signs +, 0, 0
    assert torch.equal(ties_elect_and_merge(trimmed, 0.0), torch.tensor([2.0, -1.0, -3.0]))
    assert torch.equal(ties_elect_and_merge(trimmed, 1.0), torch.tensor([2.0, 1.0, 3.0]))


def test_ties_cut_keeps_floor_plus_one_with_distinct_magnitudes():
    g = torch.Generator().manual_seed(0)
    d = 50
    vals = torch.randperm(d, generator=g).float() + 1.0
    sd = {"a": vals[:20].clone(), "b": vals[20:].reshape(5, 6).clone()}
    zero = {k: torch.zeros_like(v) for k, v in sd.items()}
    out = ties(zero, [sd], k=20)
    kept = int(sum((v != 0).sum() for v in out.values()))
    assert kept == int(d * 0.2) + 1  # |tau| >= the (d - floor(0.2 d))-th smallest
    assert ties(zero, [sd], k=100)["a"].count_nonzero() == 20
    with pytest.raises(ValueError, match="percentage"):
        ties(zero, [sd], k=0)
    with pytest.raises(ValueError, match="merge_fn"):
        ties(zero, [sd], merge_fn="max")


def _reference_ties(pre, fts, k, merge_fn):
    """Straight from the spec, on fully flattened vectors (all tasks materialised)."""
    keys = list(pre)
    flat_pre = torch.cat([pre[key].float().reshape(-1) for key in keys])
    tv = torch.stack([torch.cat([ft[key].float().reshape(-1) for key in keys]) - flat_pre for ft in fts])
    n, d = tv.shape
    kk = d - int(d * (k / 100))
    kth = tv.abs().kthvalue(kk, dim=1, keepdim=True).values
    trimmed = tv * (tv.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    sel = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    m = sel.sum(0) if merge_fn == "sum" else sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    out, pos = {}, 0
    for key in keys:
        nel = pre[key].numel()
        out[key] = flat_pre[pos : pos + nel].reshape(pre[key].shape) + m[pos : pos + nel].reshape(pre[key].shape)
        pos += nel
    return out


@settings(max_examples=30, deadline=None)
@given(
    num_tasks=st.integers(1, 4),
    k=st.sampled_from([5, 20, 37.5, 60, 99]),
    merge_fn=st.sampled_from(["mean", "sum"]),
    integer=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_ties_matches_flattened_reference(num_tasks, k, merge_fn, integer, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (7,), "w": (3, 4), "c": (2, 1, 2)}

    def rnd(shape):
        x = torch.randn(shape, generator=g)
        return torch.round(x * 2) if integer else x  # integers: many magnitude ties and zero sums

    pre = {key: rnd(s) for key, s in shapes.items()}
    fts = [{key: pre[key] + rnd(s) for key, s in shapes.items()} for _ in range(num_tasks)]
    got = ties(pre, fts, k=k, merge_fn=merge_fn)
    ref = _reference_ties(pre, fts, k, merge_fn)
    for key in shapes:
        assert torch.allclose(got[key], ref[key], atol=1e-6), key


# ---------------------------------------------------------------------------------------------------------- consensus
# one parameter, 3 tasks, lambda = 0.5, worked by hand:
#   tau_1 = [1, 0, 2, 1], tau_2 = [1, 1, -2, 0], tau_3 = [0, 1, 0, 0.1] -> tau_MTL = [2, 2, 0, 1.1]
#   e0: 1>=0.5 on, 1>=0.5 on, 0>=1 off          -> 2 masks -> keep 2
#   e1: 0>=1 off, 1>=0.5 on, 1>=0.5 on          -> 2 masks -> keep 2
#   e2: 2>=1 on, 2>=1 on, 0>=0 on (>= rule)     -> 3 masks -> keep 0
#   e3: 1>=0.05 on, 0>=0.55 off, 0.1>=0.5 off   -> 1 mask  -> drop
TAUS = [torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([1.0, 1.0, -2.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.1])]


def test_consensus_hand_case():
    expected_masks = torch.tensor(
        [[True, False, True, True], [True, True, True, False], [False, True, True, False]]  # e2 of task 3: 0 >= 0
    )
    assert torch.equal(tall_masks(TAUS, 0.5), expected_masks)
    assert torch.equal(consensus_mask(TAUS, 0.5, k=2), torch.tensor([True, True, True, False]))
    pre = {"p": torch.zeros(4)}
    fts = [{"p": t} for t in TAUS]
    assert torch.allclose(consensus(pre, fts, lambdas=0.5, k=2)["p"], torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert torch.allclose(consensus(pre, fts, lambdas=0.5, k=1)["p"], torch.tensor([2.0, 2.0, 0.0, 1.1]))
    # per-task lambdas: task 3 with lambda 0.05 now claims e3 (0.1 >= 0.05) -> 2 masks
    out = consensus(pre, fts, lambdas=[0.5, 0.5, 0.05], k=2, alpha=0.5)
    assert torch.allclose(out["p"], 0.5 * torch.tensor([2.0, 2.0, 0.0, 1.1]))
    # k > T removes everything (zero-shot), k = 0 keeps everything (task arithmetic)
    assert torch.equal(consensus(pre, fts, lambdas=0.5, k=4)["p"], torch.zeros(4))
    assert torch.allclose(consensus(pre, fts, lambdas=0.5, k=0)["p"], sum(TAUS))
    with pytest.raises(ValueError, match="lambdas has 2 values for 3 tasks"):
        consensus(pre, fts, lambdas=[0.5, 0.5])


def test_tall_mask_model():
    pre = {"p": torch.ones(4)}
    fts = [{"p": 1 + t} for t in TAUS]
    out = tall_mask_merge(pre, fts, task=0, lam=0.5)
    assert torch.allclose(out["p"], 1 + torch.tensor([2.0, 0.0, 0.0, 1.1]))
