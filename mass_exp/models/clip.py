"""open_clip backbones: the real OpenAI ViTs and the project's own `mass-tiny-ViT` (registered from package data)."""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

TINY_ARCH = "mass-tiny-ViT"


@lru_cache(maxsize=1)
def register_model_configs() -> None:
    """Make open_clip know the project's custom architectures (idempotent)."""
    import open_clip

    open_clip.add_model_config(Path(str(resources.files("mass_exp").joinpath("models/model_configs"))))


def create_clip(arch: str, pretrained: str | None = None, *, cache_dir: str | None = None,
                device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Callable, Any]:
    """(model, eval transform, tokenizer) for an open_clip architecture.

    `pretrained` is an open_clip tag (e.g. "openai"), a weights file, or None for random initialisation (the tiny
    backbone is pretrained by the mini suite itself, then loaded with `load_clip_weights`).
    """
    import open_clip

    register_model_configs()
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} (backbone.arch)")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, cache_dir=cache_dir,
                                                                 device=device)
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    return model, preprocess, tokenizer

