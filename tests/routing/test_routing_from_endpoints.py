"""The router on factors of real endpoint files: deltas of the routing layer with orthogonal input subspaces."""

from __future__ import annotations

import torch

from mass_exp.merging.factors import load_or_build_factor_store
from mass_exp.merging.task_vectors import save_state_dict
from mass_exp.models.vit_hooks import routing_param_name
from mass_exp.routing import ProjectionRouter, RouterConfig


def test_router_picks_the_task_whose_input_subspace_holds_z(tiny_visual, tmp_path):
    block, num_tasks, k = 2, 3, 6
    pre = {n: t.detach().clone() for n, t in tiny_visual.state_dict().items()}
    name = routing_param_name(block)
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
    router = ProjectionRouter([store.V(t, name) for t in range(num_tasks)], RouterConfig(block=block, mode="top1"))
    for t, sub in enumerate(subspaces):
        z = torch.randn(16, k, generator=g) @ sub.T
        decision = router(z)
        assert decision.task_sets == [(t,)] * 16
        assert torch.all(decision.residuals[:, t] < 1e-4 * decision.residuals.max())
