"""Pass-1 routing features equal the hook-captured ln_2 output and stop at the routing block (step 3)."""

from __future__ import annotations

import pytest
import torch

from mass_exp.models.vit_hooks import (
    first_pass_fn,
    ln2_output_via_hook,
    routing_features,
    routing_param_name,
    routing_tokens,
)


@pytest.mark.parametrize("block", [0, 2, 3])
def test_equals_hook_captured_ln2_output(tiny_visual, images, block):
    expected = ln2_output_via_hook(tiny_visual, images, block)
    tokens = routing_tokens(tiny_visual, images, block)
    assert tokens.shape == (6, 1 + (32 // 8) ** 2, 64)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(routing_features(tiny_visual, images, block, "cls"), expected[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        routing_features(tiny_visual, images, block, "mean"), expected.mean(dim=1), rtol=0, atol=1e-6
    )


def test_later_blocks_and_mlp_are_not_run(tiny_visual, images):
    block = 1
    calls: dict[str, int] = {}
    handles = []

    def counter(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1
        return hook

    blocks = tiny_visual.transformer.resblocks
    for i, blk in enumerate(blocks):
        handles.append(blk.register_forward_hook(counter(f"block{i}")))
        handles.append(blk.mlp.register_forward_hook(counter(f"mlp{i}")))
        handles.append(blk.ln_2.register_forward_hook(counter(f"ln2_{i}")))
    handles.append(tiny_visual.ln_post.register_forward_hook(counter("ln_post")))
    try:
        routing_features(tiny_visual, images, block)
    finally:
        for h in handles:
            h.remove()
    assert calls == {"block0": 1, "mlp0": 1, "ln2_0": 1, "ln2_1": 1}


def test_cls_token_is_per_sample_not_sample_zero(tiny_visual, images):
    batch = routing_features(tiny_visual, images, 2)
    singles = torch.cat([routing_features(tiny_visual, images[i : i + 1], 2) for i in range(images.shape[0])])
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_first_pass_fn_and_param_name(tiny_visual, images):
    fn = first_pass_fn(tiny_visual, block=3, token="cls")
    torch.testing.assert_close(fn(images), routing_features(tiny_visual, images, 3))
    name = routing_param_name(3)
    assert dict(tiny_visual.named_parameters())[name].shape == (256, 64)


@pytest.mark.parametrize("kwargs", [{"ls_init_value": 0.3}, {"block_type": "custom", "qk_norm": True}])
def test_layer_scale_and_custom_blocks(kwargs):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(
        image_size=16, patch_size=4, width=32, layers=3, heads=2, mlp_ratio=2.0, output_dim=16, **kwargs
    ).eval()
    with torch.no_grad():  # make layer scale non-trivial
        for p in visual.parameters():
            if p.dim() == 1 and p.shape[0] == 32:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(routing_tokens(visual, x, 1), ln2_output_via_hook(visual, x, 1), rtol=0, atol=1e-6)


def test_block_out_of_range(tiny_visual, images):
    with pytest.raises(IndexError):
        routing_features(tiny_visual, images, 4)
