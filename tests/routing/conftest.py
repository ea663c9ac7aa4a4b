"""Fixtures for routing tests: a tiny random open_clip model registered from a temp JSON config."""

from __future__ import annotations

import json

import pytest
import torch

TINY_NAME = "mass-exp-routing-tiny-vit"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    cfg_dir = tmp_path_factory.mktemp("routing_open_clip_cfg")
    (cfg_dir / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir / f"{TINY_NAME}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_NAME, pretrained=None)
    model.eval()
    return model


@pytest.fixture()
def tiny_visual(tiny_clip):
    return tiny_clip.visual


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g)
