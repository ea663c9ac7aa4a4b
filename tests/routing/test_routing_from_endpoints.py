"""The router on factors of real endpoint files: deltas of the routing layer with orthogonal input subspaces."""

from __future__ import annotations

import pytest
import torch

from mass_exp.merging.factors import load_or_build_factor_store
from mass_exp.merging.task_vectors import save_state_dict
from mass_exp.models.vit_hooks import routing_param_name
from mass_exp.routing import ProjectionRouter, RouterConfig


@pytest.mark.parametrize("routing_param", ["mlp_in", "attn_in"])
def test_router_picks_the_task_whose_input_subspace_holds_z(tiny_visual, tmp_path, routing_param):
    block, num_tasks, k = 2, 3, 6
    pre = {n: t.detach().clone() for n, t in tiny_visual.state_dict().items()}
    name = routing_param_name(block, routing_param=routing_param)
    out_dim, in_dim = pre[name].shape
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=g))
    subspaces = [q[:, t * k:(t + 1) * k] for t in range(num_tasks)]
    files = []
    for t, sub in enumerate(subspaces):
        ft = {n: v.clone() for n, v in pre.items()}
        ft[name] = pre[name] + torch.randn(out_dim, k, generator=g) @ sub.T  # right singular vectors span `sub`
        files.append(save_state_dict(ft, tmp_path / f"task{t}.safetensors"))
    pre_file = save_state_dict(pre, tmp_path / "pre.safetensors")
    store = load_or_build_factor_store(tmp_path / "cache", pre_file, files, "test", rank=k, progress=False)
    router = ProjectionRouter([store.V(t, name) for t in range(num_tasks)], RouterConfig(block=block, mode="top1",
                                                                                   routing_param=routing_param))
    for t, sub in enumerate(subspaces):
        z = torch.randn(16, k, generator=g) @ sub.T
        decision = router(z)
        assert decision.task_sets == [(t,)] * 16
        assert torch.all(decision.residuals[:, t] < 1e-4 * decision.residuals.max())


def test_routed_predictor_reads_the_layer_norm_matching_routing_param(tiny_visual):
    """RoutedPredictor's pass-1 feature: ln_1 output of the routing block for attn_in, ln_2 output for mlp_in."""
    import copy

    from mass_exp.evaluation.predictors import RoutedPredictor
    from mass_exp.models.vit_hooks import layer_norm_output_via_hook

    visual = copy.deepcopy(tiny_visual).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # distinct ln_1 / ln_2 affine parameters, so the two features differ
        for blk in visual.transformer.resblocks:
            for ln in (blk.ln_1, blk.ln_2):
                ln.weight.copy_(1 + 0.5 * torch.randn(ln.weight.shape, generator=g))
    images = torch.randn(4, 3, 32, 32, generator=g)
    heads = [torch.randn(3, 32, generator=g) for _ in range(2)]
    for routing_param, ln in (("attn_in", "ln_1"), ("mlp_in", "ln_2")):
        cfg = RouterConfig(block=2, routing_param=routing_param)
        pred = RoutedPredictor(visual, heads, None, lambda s: {}, visual, cfg, cache_gb=1.0)
        expected = layer_norm_output_via_hook(visual, images, 2, ln)[:, 0]
        torch.testing.assert_close(pred._features(images), expected, rtol=0, atol=1e-5)


def test_router_config_rejects_an_unknown_routing_param():
    with pytest.raises(ValueError, match="routing_param"):
        RouterConfig(routing_param="mlp_out")
