"""open_clip backbones: the real OpenAI ViTs and the project's own `mass-tiny-ViT` (registered from package data).

OpenAI weights are resolved here rather than inside open_clip, so that a run knows, before any work, whether the
file is in the local HF cache (offline clusters) and which exact snapshot it uses (cache keys).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from mass_exp.errors import ConfigError
from mass_exp.utils.io import file_sha256

log = logging.getLogger(__name__)

TINY_ARCH = "mass-tiny-ViT"
# open_clip's own file names in its HF hub repos, safest first
OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@lru_cache(maxsize=1)
def register_model_configs() -> None:
    """Make open_clip know the project's custom architectures (idempotent)."""
    import open_clip

    open_clip.add_model_config(Path(str(resources.files("mass_exp").joinpath("models/model_configs"))))


def create_clip(arch: str, pretrained: str | None = None, *, cache_dir: str | None = None,
                device: str | torch.device = "cpu", quick_gelu: bool = False) -> tuple[torch.nn.Module, Callable, Any]:
    """(model, eval transform, tokenizer) for an open_clip architecture.

    `pretrained` is an open_clip tag (e.g. "openai"), a weights file, or None for random initialisation (the tiny
    backbone is pretrained by the mini suite itself). `quick_gelu` must be True for OpenAI weights: open_clip's plain
    `ViT-B-32` config uses nn.GELU and only *warns* when OpenAI (QuickGELU) weights are loaded into it.
    Checkpoints are loaded with `weights_only=True` (open_clip's default), so no code from a file is executed.
    """
    import open_clip

    register_model_configs()
    if arch not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture {arch!r} (backbone.arch); valid: e.g. ViT-B-32, {TINY_ARCH}")
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=pretrained, cache_dir=cache_dir, device=device, force_quick_gelu=quick_gelu, weights_only=True)
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    return model, preprocess, tokenizer


@dataclass(frozen=True)
class BackboneWeights:
    """Where a backbone's pretrained weights are and what identifies them (for cache keys)."""

    path: Path
    weights_id: str  # "<repo>@<commit>/<file>" for hub files, "sha256:<hex>" for local files
    hub_file: tuple[str, str] | None = None  # (repo_id, filename) when it came from the hub


def hub_repo_for(arch: str, tag: str, override: str | None = None) -> str:
    """The HF hub repo that holds open_clip's weights for (arch, tag), e.g. timm/vit_base_patch32_clip_224.openai."""
    if override:
        return override
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub = (cfg or {}).get("hf_hub", "")
    if not hub:
        raise ConfigError(f"open_clip has no HF hub weights for backbone.arch={arch} backbone.pretrained={tag}; "
                          "give a local file with backbone.pretrained=<path>")
    return "/".join(hub.strip("/").split("/")[:2])  # "org/name/" or "org/name/file.bin" -> "org/name"


def _commit_of(path: Path) -> str:
    """The snapshot commit of a file inside an HF hub cache (…/snapshots/<commit>/<file>)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "unknown"


def resolve_backbone_weights(arch: str, pretrained: str, *, hub_repo: str | None = None, cache_dir: str | None = None,
                             download: bool = True) -> BackboneWeights:
    """A local file for `pretrained` (a path, or an open_clip tag looked up in the HF hub cache / downloaded).

    With `download=False` (offline), a missing file raises a one-line ConfigError naming it and `mass-exp-prefetch`.
    """
    if os.path.sep in pretrained or Path(pretrained).suffix in (".pt", ".bin", ".pth", ".safetensors"):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"backbone.pretrained file not found: {path}")
        return BackboneWeights(path, f"sha256:{file_sha256(path)}")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = hub_repo_for(arch, pretrained, hub_repo)
    for filename in OPEN_CLIP_HUB_FILES:
        cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            p = Path(cached)
            return BackboneWeights(p, f"{repo}@{_commit_of(p)}/{filename}", (repo, filename))
    if not download:
        raise ConfigError(f"backbone weights {repo}/{OPEN_CLIP_HUB_FILES[0]} (or .bin) are not in the HF cache "
                          f"({cache_dir or 'default HF cache'}) and the run is offline; run `mass-exp-prefetch` with the "
                          "same overrides on a machine with network")
    errors = []
    for filename in OPEN_CLIP_HUB_FILES:
        try:
            p = Path(hf_hub_download(repo, filename, cache_dir=cache_dir))
            return BackboneWeights(p, f"{repo}@{_commit_of(p)}/{filename}", (repo, filename))
        except Exception as e:  # noqa: BLE001 - try the next file name, report all at the end
            errors.append(f"{filename}: {type(e).__name__}")
    raise ConfigError(f"could not download backbone weights from {repo} ({'; '.join(errors)})")
