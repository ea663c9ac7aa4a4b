"""SMILE (merging/smile.py) on constructions with known answers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mass_exp.merging.smile import SmileLinear, SmileMultiheadAttention, smile_visual


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q


def _subspace_tasks(n_in=12, n_out=10, rank=3, tasks=3, seed=0):
    """Task t's delta acts only on input directions V[:, t*rank:(t+1)*rank] (disjoint, orthonormal)."""
    g = torch.Generator().manual_seed(seed)
    v = _orthonormal(n_in, seed)
    w_pre = torch.randn(n_out, n_in, generator=g)
    b_pre = torch.randn(n_out, generator=g)
    w_ft, b_ft, bases = [], [], []
    for t in range(tasks):
        vt = v[:, t * rank:(t + 1) * rank]
        ut = _orthonormal(n_out, seed + 10 + t)[:, :rank]
        s = torch.tensor([5.0, 3.0, 2.0])[:rank]
        w_ft.append(w_pre + (ut * s) @ vt.T)
        b_ft.append(b_pre + torch.randn(n_out, generator=g))
        bases.append(vt)
    return w_pre, b_pre, torch.stack(w_ft), torch.stack(b_ft), bases


def test_inputs_in_one_tasks_gate_subspace_go_to_that_tasks_expert():
    w_pre, b_pre, w_ft, b_ft, bases = _subspace_tasks()
    layer = SmileLinear.from_weights(w_pre, b_pre, w_ft, b_ft, gate_k=3, k=3, top_k=1)
    g = torch.Generator().manual_seed(1)
    for t, vt in enumerate(bases):
        x = (vt @ torch.randn(3, 7, generator=g)).T  # 7 inputs inside task t's subspace
        _, experts = layer.routing(x)
        assert experts[:, 0].tolist() == [t] * 7
        # top-1: the output is exactly the fine-tuned layer of that task
        torch.testing.assert_close(layer(x), x @ w_ft[t].T + b_ft[t], rtol=1e-4, atol=1e-4)


def test_one_task_reduces_to_pretrained_plus_rank_k_delta():
    g = torch.Generator().manual_seed(3)
    w_pre, b_pre = torch.randn(9, 11, generator=g), torch.randn(9, generator=g)
    w_ft, b_ft = w_pre + torch.randn(9, 11, generator=g), b_pre + torch.randn(9, generator=g)
    k = 4
    layer = SmileLinear.from_weights(w_pre, b_pre, w_ft[None], b_ft[None], gate_k=2, k=k, top_k=1)
    u, s, vh = torch.linalg.svd(w_ft - w_pre)
    w_k = w_pre + (u[:, :k] * s[:k]) @ vh[:k]
    x = torch.randn(2, 5, 11, generator=g)  # (..., in) -> (..., out)
    torch.testing.assert_close(layer(x), x @ w_k.T + b_ft, rtol=1e-4, atol=1e-4)
    full = SmileLinear.from_weights(w_pre, b_pre, w_ft[None], b_ft[None], gate_k=2, k=-1, top_k=1)
    torch.testing.assert_close(full(x), x @ w_ft.T + b_ft, rtol=1e-4, atol=1e-4)
    assert full.k == -1 and full.expert_w is not None


def test_top_k_mixes_with_renormalised_softmax_of_gate_norms():
    g = torch.Generator().manual_seed(5)
    w_pre, b_pre = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    w_ft = w_pre + torch.randn(3, 6, 8, generator=g)
    b_ft = b_pre + torch.randn(3, 6, generator=g)
    layer = SmileLinear.from_weights(w_pre, b_pre, w_ft, b_ft, gate_k=2, k=-1, top_k=2)
    x = torch.randn(4, 8, generator=g)
    # reference, written from the definition
    vs = [torch.linalg.svd(w_ft[t] - w_pre)[2][:2] for t in range(3)]
    logits = torch.stack([(x @ v.T).norm(dim=1) for v in vs], dim=1)
    p = torch.softmax(logits, dim=1)
    top = p.topk(2, dim=1)
    want = x @ w_pre.T + b_pre
    for i in range(4):
        wsum = top.values[i].sum()
        for val, t in zip(top.values[i], top.indices[i]):
            want[i] += val / wsum * (x[i] @ (w_ft[t] - w_pre).T + (b_ft[t] - b_pre))
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


def test_bad_ranks_rejected():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="k must be"):
        SmileLinear.from_weights(w, None, w[None] + 1, None, gate_k=1, k=0, top_k=1)
    with pytest.raises(ValueError, match="w_ft must be"):
        SmileLinear.from_weights(w, None, w + 1, None, gate_k=1, k=1, top_k=1)


def test_split_attention_matches_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    d = 16
    lins = []
    for j in range(3):
        lin = nn.Linear(d, d)
        lin.weight.data.copy_(mha.in_proj_weight[j * d:(j + 1) * d])
        lin.bias.data.copy_(mha.in_proj_bias[j * d:(j + 1) * d])
        lins.append(lin)
    smile_attn = SmileMultiheadAttention(*lins, copy.deepcopy(mha.out_proj), 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(smile_attn(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0],
                               rtol=1e-5, atol=1e-5)


def _tiny_vit():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0,
                             output_dim=8).eval()


def _perturbed(visual: nn.Module, seed: int, only_linear: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in visual.state_dict().items()}
    for k, v in sd.items():
        linear = any(s in k for s in ("in_proj", "out_proj", "c_fc", "c_proj"))
        if v.is_floating_point() and (linear or not only_linear):
            sd[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    return sd


def test_one_task_full_rank_smile_tower_is_the_finetuned_tower():
    visual = _tiny_vit()
    pre = visual.state_dict()
    ft = _perturbed(visual, 1, only_linear=True)  # SMILE keeps non-linear parameters pretrained
    model = smile_visual(visual, pre, [ft], gate_k=2, k=-1, top_k=1)
    ref = copy.deepcopy(visual)
    ref.load_state_dict(ft)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    assert isinstance(model.transformer.resblocks[0].attn, SmileMultiheadAttention)
    # average_experts=True also takes the endpoints' non-linear parameters
    ft2 = _perturbed(visual, 2, only_linear=False)
    model2 = smile_visual(visual, pre, [ft2], gate_k=2, k=-1, top_k=1, average_experts=True)
    ref.load_state_dict(ft2)
    with torch.no_grad():
        torch.testing.assert_close(model2(x), ref(x), rtol=1e-4, atol=1e-4)


def test_factor_store_supplies_svds_where_ranks_allow(tmp_path):
    from mass_exp.merging.factors import build_factor_store

    visual = _tiny_vit()
    pre = visual.state_dict()
    fts = [_perturbed(visual, s, only_linear=True) for s in (1, 2)]
    store = build_factor_store(pre, fts, progress=False)  # k = min(m, n) / 2 = 16 everywhere
    x = torch.randn(2, 3, 16, 16)
    stats_a: dict = {}
    a = smile_visual(visual, pre, fts, gate_k=2, k=4, top_k=1, factors=store, stats=stats_a)
    stats_b: dict = {}
    b = smile_visual(visual, pre, fts, gate_k=2, k=4, top_k=1, stats=stats_b)
    assert stats_a["from_store"] == 2 * 3 and stats_b["from_store"] == 0  # out_proj, c_fc, c_proj x 2 blocks
    assert stats_a["decomposed"] == 2 * 3  # q, k, v are always split and decomposed
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)
    stats_c: dict = {}
    smile_visual(visual, pre, fts, gate_k=2, k=31, top_k=1, factors=store, stats=stats_c)  # 31 > 16 stored
    assert stats_c["from_store"] == 0  # the store holds 16 components: everything is decomposed
