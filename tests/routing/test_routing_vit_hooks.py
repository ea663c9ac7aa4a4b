"""Pass-1 routing features equal the hook-captured ln_2 (mlp_in) / ln_1 (attn_in) output and stop at the routing
block (step 3)."""

from __future__ import annotations

import pytest
import torch

from mass_exp.models.vit_hooks import (
    first_pass_fn,
    layer_norm_output_via_hook,
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


# layer scale and open_clip's custom blocks (qk norm): the block variants routing_tokens must reproduce
BLOCK_VARIANTS = [{"ls_init_value": 0.3}, {"block_type": "custom", "qk_norm": True}]


def _small_visual(**kwargs):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        image_size=16, patch_size=4, width=32, layers=3, heads=2, mlp_ratio=2.0, output_dim=16, **kwargs
    ).eval()


@pytest.mark.parametrize("kwargs", BLOCK_VARIANTS)
def test_layer_scale_and_custom_blocks(kwargs):
    visual = _small_visual(**kwargs)
    with torch.no_grad():  # make layer scale non-trivial
        for p in visual.parameters():
            if p.dim() == 1 and p.shape[0] == 32:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(routing_tokens(visual, x, 1), ln2_output_via_hook(visual, x, 1), rtol=0, atol=1e-6)


def test_block_out_of_range(tiny_visual, images):
    with pytest.raises(IndexError):
        routing_features(tiny_visual, images, 4)


# ----------------------------------------------------------------------------------- attn_in: the attention input


def _block_input(visual, images, block):
    """Known answer, computed here step by step: the residual stream entering resblock ``block`` (batch-first)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    for blk in visual.transformer.resblocks[:block]:
        x = blk(x)
    return x


@pytest.fixture()
def distinct_norms_visual(tiny_visual):
    """The tiny tower with random, different affine parameters in every ln_1 and ln_2 (a fresh model's are all 1 and
    0, which would make ln_1(x) and ln_2(x) of the same tensor indistinguishable)."""
    import copy

    visual = copy.deepcopy(tiny_visual)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk in visual.transformer.resblocks:
            for ln in (blk.ln_1, blk.ln_2):
                ln.weight.copy_(1 + 0.5 * torch.randn(ln.weight.shape, generator=g))
                ln.bias.copy_(0.5 * torch.randn(ln.bias.shape, generator=g))
    return visual


@pytest.mark.parametrize("block", [0, 2, 3])
def test_attn_in_feature_is_ln1_of_the_block_input(distinct_norms_visual, images, block):
    tiny_visual = distinct_norms_visual
    blk = tiny_visual.transformer.resblocks[block]
    with torch.no_grad():
        expected = blk.ln_1(_block_input(tiny_visual, images, block))
    tokens = routing_tokens(tiny_visual, images, block, "attn_in")
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens, layer_norm_output_via_hook(tiny_visual, images, block, "ln_1"), rtol=0, atol=1e-5)
    torch.testing.assert_close(routing_features(tiny_visual, images, block, "cls", "attn_in"), expected[:, 0],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(routing_features(tiny_visual, images, block, "mean", "attn_in"), expected.mean(dim=1),
                               rtol=0, atol=1e-5)
    # and it is neither ln_2 of the same input nor the MLP input of the same block
    with torch.no_grad():
        assert not torch.allclose(tokens, blk.ln_2(_block_input(tiny_visual, images, block)), atol=1e-2)
    assert not torch.allclose(tokens, routing_tokens(tiny_visual, images, block), atol=1e-2)


def test_attn_in_feature_is_the_input_of_in_proj_weight(distinct_norms_visual, images):
    """The attention's own input (what in_proj_weight multiplies) is the feature routed on."""
    tiny_visual = distinct_norms_visual
    block = 2
    attn = tiny_visual.transformer.resblocks[block].attn
    seen = []
    handle = attn.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs.get("query", args[0] if args
                                                                                             else None)),
                                            with_kwargs=True)
    try:
        with torch.no_grad():
            tiny_visual(images)
    finally:
        handle.remove()
    torch.testing.assert_close(routing_tokens(tiny_visual, images, block, "attn_in"), seen[0], rtol=0, atol=1e-5)


def test_attn_in_runs_nothing_of_the_routing_block_after_ln_1(tiny_visual, images):
    block = 1
    calls: dict[str, int] = {}
    handles = []
    for i, blk in enumerate(tiny_visual.transformer.resblocks):
        for name, mod in (("attn", blk.attn), ("ln2_", blk.ln_2), ("ln1_", blk.ln_1), ("mlp", blk.mlp)):
            handles.append(mod.register_forward_hook(lambda *_, n=f"{name}{i}": calls.__setitem__(n, calls.get(n, 0) + 1)))
    try:
        routing_features(tiny_visual, images, block, routing_param="attn_in")
    finally:
        for h in handles:
            h.remove()
    assert calls == {"ln1_0": 1, "attn0": 1, "ln2_0": 1, "mlp0": 1, "ln1_1": 1}


def test_attn_in_param_name_and_first_pass_fn(tiny_visual, images):
    name = routing_param_name(3, routing_param="attn_in")
    assert name == "transformer.resblocks.3.attn.in_proj_weight"
    assert dict(tiny_visual.named_parameters())[name].shape == (3 * 64, 64)  # right singular vectors in R^width
    assert routing_param_name(3, prefix="visual.") == "visual.transformer.resblocks.3.mlp.c_fc.weight"
    fn = first_pass_fn(tiny_visual, block=3, token="cls", routing_param="attn_in")
    torch.testing.assert_close(fn(images), routing_features(tiny_visual, images, 3, "cls", "attn_in"))
    with pytest.raises(ValueError, match="routing_param"):
        routing_param_name(3, routing_param="mlp_out")
    with pytest.raises(ValueError, match="routing_param"):
        routing_tokens(tiny_visual, images, 3, "mlp_out")


@pytest.mark.parametrize("kwargs", BLOCK_VARIANTS)
def test_attn_in_layer_scale_and_custom_blocks(kwargs):
    visual = _small_visual(**kwargs)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(routing_tokens(visual, x, 1, "attn_in"), layer_norm_output_via_hook(visual, x, 1, "ln_1"),
                               rtol=0, atol=1e-5)
    assert routing_param_name(1, routing_param="attn_in") in dict(visual.named_parameters())
