"""Shared fixtures: a tiny open_clip CLIP and its image tower's state dict (the backbone endpoints are checked against)."""

from __future__ import annotations

import pytest
import torch

from mass_exp.models.clip import create_clip


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model, _, _ = create_clip("mass-tiny-ViT", None)
    return model


@pytest.fixture(scope="module")
def ref(clip):
    return {k: v.clone() for k, v in clip.visual.state_dict().items()}


def perturbed(ref, seed):
    """A fake fine-tuned endpoint: `ref` plus small seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in ref.items()}
