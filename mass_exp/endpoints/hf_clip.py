"""Map transformers CLIP vision weights onto open_clip visual parameter names, and back.

Why: FusionBench (`tanganke/clip-vit-*_<task>`) ships its fine-tuned CLIP image encoders as transformers
`CLIPVisionModel` safetensors, while every merger and the evaluation here work on open_clip's visual state dict
(`model.visual.state_dict()`). The two implementations compute the same function; only the parameter names and
the attention packing differ:

=====================================================  =============================================
transformers (``vision_model.`` prefix, optional)       open_clip visual
=====================================================  =============================================
embeddings.class_embedding                             class_embedding
embeddings.patch_embedding.weight                      conv1.weight
embeddings.position_embedding.weight                   positional_embedding
pre_layrnorm.{weight,bias}                             ln_pre.{weight,bias}
encoder.layers.{i}.layer_norm1.*                       transformer.resblocks.{i}.ln_1.*
encoder.layers.{i}.self_attn.{q,k,v}_proj.*            transformer.resblocks.{i}.attn.in_proj_{weight,bias}
                                                       (q, k, v concatenated along dim 0, in that order)
encoder.layers.{i}.self_attn.out_proj.*                transformer.resblocks.{i}.attn.out_proj.*
encoder.layers.{i}.layer_norm2.*                       transformer.resblocks.{i}.ln_2.*
encoder.layers.{i}.mlp.fc1.*                           transformer.resblocks.{i}.mlp.c_fc.*
encoder.layers.{i}.mlp.fc2.*                           transformer.resblocks.{i}.mlp.c_proj.*
post_layernorm.*                                       ln_post.*
visual_projection.weight  (outside vision_model)       proj = visual_projection.weight.T
=====================================================  =============================================

transformers' pooled output is ``post_layernorm(hidden[:, 0])`` and its image embedding ``visual_projection`` of it;
open_clip's visual output is ``ln_post(x[:, 0]) @ proj``. A plain ``CLIPVisionModel`` (FusionBench) has no
projection: the converted dict then lacks ``proj``, which `loading.materialize_endpoint` takes from the pretrained
visual (the projection was not fine-tuned). Keys of a full ``CLIPModel`` outside the vision tower (``text_model.*``,
``text_projection.weight``, ``logit_scale``) are dropped; the buffer ``embeddings.position_ids`` is dropped; any
other key raises `ConfigError` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from mass_exp.errors import ConfigError

HF_VISION_PREFIX = "vision_model."
HF_PROJECTION_KEY = "visual_projection.weight"
_HF_MARKER = "embeddings.patch_embedding.weight"
# keys of a full transformers CLIPModel that are not part of the image tower
_HF_NON_VISION = ("text_model.", "text_projection.weight", "logit_scale")
_DROPPED_BUFFERS = ("embeddings.position_ids",)

_HF_TO_OC_SIMPLE = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_HF_TO_OC_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OC_TO_HF_SIMPLE = {v: k for k, v in _HF_TO_OC_SIMPLE.items()}
_OC_TO_HF_LAYER = {v: k for k, v in _HF_TO_OC_LAYER.items()}

_HF_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OC_LAYER_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def _where(source: str | None) -> str:
    return f"endpoint {source}" if source else "transformers CLIP vision state dict"


def find_hf_vision_prefix(keys) -> str | None:
    """The prefix in front of transformers' vision-tower names (``"vision_model."``, ``""``, ...), None if none."""
    found = sorted({k[: -len(_HF_MARKER)] for k in keys if k == _HF_MARKER or k.endswith("." + _HF_MARKER)})
    if not found:
        return None
    return found[0] if len(found) == 1 else min(found, key=len)


def is_hf_clip_vision(sd: Mapping[str, object]) -> bool:
    """True when `sd` holds transformers CLIP vision weights (``[...]embeddings.patch_embedding.weight``)."""
    return find_hf_vision_prefix(sd.keys()) is not None


def hf_clip_vision_to_open_clip(sd: Mapping[str, torch.Tensor], *, source: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a transformers CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel state dict to open_clip
    visual names (see the module docstring). `source` (a file name) only goes into error messages.

    ``proj`` is present only when ``visual_projection.weight`` is. Raises `ConfigError` on an unknown key or an
    attention layer missing one of q/k/v.
    """
    prefix = find_hf_vision_prefix(sd.keys())
    if prefix is None:
        raise ConfigError(f"{_where(source)}: no '{_HF_MARKER}' key, so this is not a transformers CLIP vision "
                          f"checkpoint; check the endpoint source (endpoints.source) and the file")
    # the container of vision_model (where visual_projection / text_model live), e.g. "" for "vision_model."
    outer = prefix.removesuffix(HF_VISION_PREFIX)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
        elif outer != prefix and key.startswith(outer):
            rest = key[len(outer):]
            if rest == HF_PROJECTION_KEY:
                out["proj"] = value.t().contiguous()
                continue
            if rest.startswith(_HF_NON_VISION):
                continue
            raise ConfigError(f"{_where(source)}: unknown key {key!r} outside the transformers vision tower; "
                              f"only {outer}{HF_PROJECTION_KEY} and a CLIPModel's text tower are expected there")
        else:
            raise ConfigError(f"{_where(source)}: unknown key {key!r} (the vision tower is under {prefix!r}); "
                              f"is this a transformers CLIPVisionModel checkpoint?")
        if name in _DROPPED_BUFFERS:
            continue
        if prefix == outer:  # un-prefixed vision keys: the projection / text tower sit beside them
            if name == HF_PROJECTION_KEY:
                out["proj"] = value.t().contiguous()
                continue
            if name.startswith(_HF_NON_VISION):
                continue
        if name in _HF_TO_OC_SIMPLE:
            out[_HF_TO_OC_SIMPLE[name]] = value
            continue
        m = _HF_LAYER_RE.match(name)
        if m:
            i, module, kind = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, kind), {})[module[len("self_attn."):][0]] = value
                continue
            if module in _HF_TO_OC_LAYER:
                out[f"transformer.resblocks.{i}.{_HF_TO_OC_LAYER[module]}.{kind}"] = value
                continue
        raise ConfigError(f"{_where(source)}: unknown transformers CLIP vision key {key!r}; "
                          f"it has no open_clip counterpart (is this a CLIP ViT checkpoint?)")
    for (i, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ConfigError(f"{_where(source)}: key '{prefix}encoder.layers.{i}.self_attn.{missing[0]}_proj.{kind}' "
                              f"is missing (q, k and v are needed to build open_clip's in_proj_{kind}); "
                              f"the checkpoint is incomplete")
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def open_clip_to_hf_clip_vision(sd: Mapping[str, torch.Tensor], *, prefix: str = HF_VISION_PREFIX,
                                with_projection: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of `hf_clip_vision_to_open_clip`: open_clip visual names -> transformers names.

    Vision keys get `prefix` (``"vision_model."`` as in CLIPVisionModel files saved by transformers 4);
    ``proj`` becomes ``visual_projection.weight`` (= proj.T) when `with_projection`, otherwise it is dropped (a
    plain CLIPVisionModel, like FusionBench's files). Raises `ConfigError` on a key it cannot map.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "proj":
            if with_projection:
                out[HF_PROJECTION_KEY] = value.t().contiguous()
            continue
        if key in _OC_TO_HF_SIMPLE:
            out[prefix + _OC_TO_HF_SIMPLE[key]] = value
            continue
        m = _OC_LAYER_RE.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                q, k, v = value.chunk(3, dim=0)
                for name, part in (("q", q), ("k", k), ("v", v)):
                    out[f"{prefix}encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            module, _, kind = rest.rpartition(".")
            if module in _OC_TO_HF_LAYER and kind in ("weight", "bias"):
                out[f"{prefix}encoder.layers.{i}.{_OC_TO_HF_LAYER[module]}.{kind}"] = value
                continue
        raise ConfigError(f"open_clip visual key {key!r} has no transformers CLIPVisionModel counterpart "
                          f"(only plain CLIP ViTs convert)")
    return out
