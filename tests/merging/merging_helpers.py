"""Tiny hand-made CLIP-image-tower-shaped state dicts for the merging tests (imported by the tests)."""

from __future__ import annotations

import torch

WIDTH = 8


def tiny_shapes(width: int = WIDTH, layers: int = 2, tokens: int = 5, out_dim: int = 6) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "class_embedding": (width,),
        "positional_embedding": (tokens, width),
        "proj": (width, out_dim),
        "conv1.weight": (width, 3, 2, 2),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for b in range(layers):
        p = f"transformer.resblocks.{b}."
        shapes.update(
            {
                p + "ln_1.weight": (width,),
                p + "ln_1.bias": (width,),
                p + "attn.in_proj_weight": (3 * width, width),
                p + "attn.in_proj_bias": (3 * width,),
                p + "attn.out_proj.weight": (width, width),
                p + "attn.out_proj.bias": (width,),
                p + "ln_2.weight": (width,),
                p + "ln_2.bias": (width,),
                p + "mlp.c_fc.weight": (4 * width, width),
                p + "mlp.c_fc.bias": (4 * width,),
                p + "mlp.c_proj.weight": (width, 4 * width),
                p + "mlp.c_proj.bias": (width,),
            }
        )
    shapes.update({"ln_post.weight": (width,), "ln_post.bias": (width,)})
    return shapes


def make_endpoints(num_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    g = torch.Generator().manual_seed(seed)
    shapes = tiny_shapes(**kw)
    pre = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    fts = [
        {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in pre.items()}
        for _ in range(num_tasks)
    ]
    return pre, fts


