"""transformers CLIP vision <-> open_clip visual: names, packing, and the same image features."""

from __future__ import annotations

import pytest
import torch

from mass_exp.endpoints.hf_clip import (
    hf_clip_vision_to_open_clip,
    open_clip_to_hf_clip_vision,
)
from mass_exp.endpoints.loading import to_open_clip_visual
from mass_exp.errors import ConfigError


def _open_clip_vit(width=64, layers=2, head_width=16, patch=8, image=32, mlp_ratio=4.0, embed_dim=48,
                   quick_gelu=True):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(layers=layers, width=width, head_width=head_width, mlp_ratio=mlp_ratio, patch_size=patch,
                        image_size=image)
    return _build_vision_tower(embed_dim, cfg, quick_gelu=quick_gelu).eval()


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter (layer norms too), so a swapped or transposed tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() < 2 else 0.1) + (1.0 if p.dim() == 1 else 0.0))


def _hf_config(width=64, layers=2, heads=4, patch=8, image=32, mlp_ratio=4.0, embed_dim=48, act="quick_gelu"):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * mlp_ratio), num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image, patch_size=patch, projection_dim=embed_dim, hidden_act=act,
        layer_norm_eps=1e-5, num_channels=3)


def test_round_trip_open_clip_hf_open_clip_is_exact():
    visual = _open_clip_vit()
    _randomize(visual, 0)
    sd = visual.state_dict()
    hf = open_clip_to_hf_clip_vision(sd)
    assert "vision_model.encoder.layers.1.self_attn.k_proj.weight" in hf
    assert hf["visual_projection.weight"].shape == (48, 64)
    back = hf_clip_vision_to_open_clip(hf)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # a plain CLIPVisionModel has no projection
    no_proj = hf_clip_vision_to_open_clip(open_clip_to_hf_clip_vision(sd, with_projection=False))
    assert set(no_proj) == set(sd) - {"proj"}


def test_qkv_are_concatenated_in_q_k_v_order():
    visual = _open_clip_vit(layers=1)
    _randomize(visual, 1)
    hf = open_clip_to_hf_clip_vision(visual.state_dict())
    w = visual.state_dict()["transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(hf["vision_model.encoder.layers.0.self_attn.q_proj.weight"], w[:64])
    assert torch.equal(hf["vision_model.encoder.layers.0.self_attn.k_proj.weight"], w[64:128])
    assert torch.equal(hf["vision_model.encoder.layers.0.self_attn.v_proj.weight"], w[128:])


def test_unknown_and_incomplete_keys_raise_naming_the_key():
    hf = open_clip_to_hf_clip_vision(_open_clip_vit(layers=1).state_dict())
    bad = dict(hf, **{"vision_model.encoder.layers.0.adapter.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"'vision_model\.encoder\.layers\.0\.adapter\.weight'"):
        hf_clip_vision_to_open_clip(bad, source="/x/model.safetensors")
    incomplete = {k: v for k, v in hf.items() if "layers.0.self_attn.v_proj.bias" not in k}
    with pytest.raises(ConfigError, match=r"v_proj\.bias' is missing"):
        hf_clip_vision_to_open_clip(incomplete)
    with pytest.raises(ConfigError, match=r"'transformer\.resblocks\.0\.ls_1\.gamma'"):
        open_clip_to_hf_clip_vision({"transformer.resblocks.0.ls_1.gamma": torch.zeros(2)})


def test_full_clipmodel_keys_and_position_ids_are_dropped():
    sd = _open_clip_vit(layers=1).state_dict()
    hf = open_clip_to_hf_clip_vision(sd)
    hf["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    hf["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    hf["text_projection.weight"] = torch.zeros(8, 8)
    hf["logit_scale"] = torch.tensor(1.0)
    out = to_open_clip_visual(hf, source="clip.safetensors")
    assert set(out) == set(sd)


@pytest.mark.parametrize("act,quick", [("quick_gelu", True), ("gelu", False)])
def test_transformers_and_open_clip_give_the_same_image_features(act, quick):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_model = transformers.CLIPVisionModelWithProjection(_hf_config(act=act)).eval()
    _randomize(hf_model, 2)
    converted = to_open_clip_visual(hf_model.state_dict(), source="hf")
    visual = _open_clip_vit(quick_gelu=quick)
    visual.load_state_dict(converted, strict=True)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf_model(pixel_values=images).image_embeds
        got = visual(images)
    assert got.shape == want.shape == (4, 48)
    assert want.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tiny_backbone_from_clipvisionmodel_plus_separate_projection():
    """The project's tiny arch (GELU) from a plain CLIPVisionModel (no projection, as FusionBench ships) + proj."""
    transformers = pytest.importorskip("transformers")
    from mass_exp.models.clip import create_clip

    model, _, _ = create_clip("mass-tiny-ViT", None)
    visual = model.visual.eval()
    cfg = _hf_config(width=128, layers=6, heads=4, patch=8, image=32, embed_dim=128, act="gelu")
    hf_model = transformers.CLIPVisionModel(cfg).eval()
    _randomize(hf_model, 4)
    proj = torch.randn(128, 128, generator=torch.Generator().manual_seed(5)) * 0.1
    converted = to_open_clip_visual(hf_model.state_dict(), source="hf")
    assert "proj" not in converted
    converted["proj"] = proj
    visual.load_state_dict(converted, strict=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = hf_model(pixel_values=images).pooler_output @ proj
        got = visual(images)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
