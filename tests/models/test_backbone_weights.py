"""Backbone weights: open_clip tags resolved through the HF hub cache (as the hub lays it out), local files, offline."""

from __future__ import annotations

import pytest
import torch

from mass_exp.errors import ConfigError
from mass_exp.models.clip import create_clip, hub_repo_for, resolve_backbone_weights
from mass_exp.utils.io import save_tensors

COMMIT = "a" * 40


def _snapshot(hub, repo, filename, tensors):
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    save_tensors(root / "snapshots" / COMMIT / filename, tensors)
    return root / "snapshots" / COMMIT / filename


def test_openai_tags_map_to_open_clips_hub_repos():
    assert hub_repo_for("ViT-B-32", "openai") == "timm/vit_base_patch32_clip_224.openai"
    assert hub_repo_for("ViT-L-14", "openai") == "timm/vit_large_patch14_clip_224.openai"
    assert hub_repo_for("ViT-B-32", "openai", "me/copy") == "me/copy"
    with pytest.raises(ConfigError, match="backbone.pretrained=<path>"):
        hub_repo_for("mass-tiny-ViT", "openai")


def test_tag_found_in_the_hub_cache_offline_with_its_snapshot_identity(tmp_path):
    path = _snapshot(tmp_path, "org/tiny.openai", "open_clip_model.safetensors", {"x": torch.ones(2)})
    w = resolve_backbone_weights("mass-tiny-ViT", "openai", hub_repo="org/tiny.openai", cache_dir=str(tmp_path),
                                 download=False)
    assert w.path == path and w.weights_id == f"org/tiny.openai@{COMMIT}/open_clip_model.safetensors"
    assert w.hub_file == ("org/tiny.openai", "open_clip_model.safetensors")


def test_pickled_bin_is_the_fallback_when_no_safetensors_is_cached(tmp_path):
    root = tmp_path / "models--org--tiny.openai"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    (root / "snapshots" / COMMIT).mkdir(parents=True)
    torch.save({"x": torch.ones(2)}, root / "snapshots" / COMMIT / "open_clip_pytorch_model.bin")
    w = resolve_backbone_weights("mass-tiny-ViT", "openai", hub_repo="org/tiny.openai", cache_dir=str(tmp_path),
                                 download=False)
    assert w.path.name == "open_clip_pytorch_model.bin"


def test_missing_weights_offline_name_the_file_and_the_prefetch_command(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve_backbone_weights("ViT-B-32", "openai", cache_dir=str(tmp_path), download=False)
    msg = str(e.value)
    assert "timm/vit_base_patch32_clip_224.openai" in msg and "mass-exp-prefetch" in msg and "\n" not in msg


def test_local_file_is_identified_by_its_content(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_tensors(a, {"x": torch.ones(2)})
    save_tensors(b, {"x": torch.zeros(2)})
    wa, wb = resolve_backbone_weights("x", str(a)), resolve_backbone_weights("x", str(b))
    assert wa.weights_id.startswith("sha256:") and wa.weights_id != wb.weights_id
    with pytest.raises(ConfigError, match="not found"):
        resolve_backbone_weights("x", str(tmp_path / "missing.pt"))


def test_quick_gelu_reaches_the_model():
    """OpenAI weights need QuickGELU; open_clip's plain configs use nn.GELU and only warn."""
    from open_clip.transformer import QuickGELU

    quick, _, _ = create_clip("mass-tiny-ViT", None, quick_gelu=True)
    plain, _, _ = create_clip("mass-tiny-ViT", None, quick_gelu=False)
    assert isinstance(quick.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not isinstance(plain.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_real_backbone_configs_ask_for_quick_gelu():
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[2] / "conf" / "backbone"
    for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14"):
        cfg = yaml.safe_load((conf / f"{name}.yaml").read_text())
        assert cfg["pretrained"] == "openai" and cfg["quick_gelu"] is True, name
