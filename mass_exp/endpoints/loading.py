"""Safe, checked loading of endpoint checkpoints into open_clip visual state dicts.

Public functions:

- `load_checkpoint_tensors(path, *, allow_unsafe_pickle=False)`: the tensors of a checkpoint file, never executing
  code by default: ``.safetensors`` through safetensors, anything else through ``torch.load(weights_only=True)``.
  A pickle that needs arbitrary objects (a whole pickled ``nn.Module``, as TALL-masks' ``nonlinear_finetuned.pt``
  may be) raises `ConfigError` unless ``endpoints.allow_unsafe_pickle=true``; with the opt-in the file is unpickled
  in full (it can run code: only for files you trust), a warning is logged, and classes that no longer exist (the
  training repo's ``src.modeling.ImageEncoder``, renamed open_clip classes) are replaced by plain ``nn.Module``
  stand-ins so their parameters can still be read. Common containers are unwrapped (``state_dict``, ``model``,
  ``model_state_dict``, ``module``, ``image_encoder`` holding a dict of tensors or a module).
- `to_open_clip_visual(sd, *, source=None)`: keys -> open_clip visual names (no ``visual.`` prefix): strips the
  prefix in front of the visual tower (``visual.``, ``model.visual.``, ``module.``, ``image_encoder.model.visual.``
  ...), drops the rest of a full CLIP (text tower, logit scale), converts transformers CLIP vision weights
  (`hf_clip.hf_clip_vision_to_open_clip`).
- `check_visual_state_dict(sd, reference, path, *, backbone=None)`: one-line `ConfigError` for a missing or
  unexpected parameter, a shape mismatch or a non-finite value.
- `materialize_endpoint(path, out_dir, reference_visual_sd, *, backbone, ...)`: load + convert + check, then write
  the visual state dict as safetensors in `out_dir` (atomically), named by the sha256 of the source file plus the
  backbone (and the filled-in tensors, if any); an existing file is reused without reading the source again.
  Read the result with `mass_exp.merging.task_vectors.LazyStateDict`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mass_exp.endpoints.hf_clip import (
    find_hf_vision_prefix,
    hf_clip_vision_to_open_clip,
)
from mass_exp.errors import ConfigError
from mass_exp.utils.io import file_sha256, load_tensors, save_tensors, stable_hash

log = logging.getLogger(__name__)

UNSAFE_PICKLE_KEY = "endpoints.allow_unsafe_pickle"
# parameters a checkpoint may lack and that are then taken from the pretrained visual (`fill_missing_from`):
# transformers' CLIPVisionModel keeps the projection outside the vision tower, and it is not fine-tuned.
FILLABLE_PARAMETERS: tuple[str, ...] = ("proj",)
# container keys unwrapped by `load_checkpoint_tensors`, in this order
CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "module", "image_encoder", "visual")
# bump when the conversion changes, so materialized files are rebuilt
MATERIALIZE_VERSION = 1

_OPEN_CLIP_MARKER = "conv1.weight"


# --------------------------------------------------------------------------------------------------- loading


class _StandInModule(torch.nn.Module):
    """Stand-in for a pickled nn.Module subclass that cannot be imported any more: keeps its parameters."""


def _stand_in(module: str, name: str) -> type:
    return type(name, (_StandInModule,), {"__module__": f"mass_exp_stand_in.{module}", "__qualname__": name})


class _LenientUnpickler(pickle.Unpickler):
    """Full unpickler (opt-in only) that replaces classes it cannot import by `_StandInModule` subclasses."""

    missing: list[str]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if not hasattr(self, "missing"):
                self.missing = []
            self.missing.append(f"{module}.{name}")
            log.warning("unpickling: %s.%s cannot be imported; using a plain nn.Module in its place", module, name)
            return _stand_in(module, name)


def _lenient_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("mass_exp_lenient_pickle")
    for attr in ("Pickler", "UnpicklingError", "PickleError", "dump", "dumps", "HIGHEST_PROTOCOL",
                 "DEFAULT_PROTOCOL"):
        setattr(mod, attr, getattr(pickle, attr))
    mod.Unpickler = _LenientUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.loads = lambda b, **kw: pickle.loads(b, **kw)  # type: ignore[attr-defined]
    return mod


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path, depth: int = 0) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if _is_tensor_dict(obj):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, Mapping) and depth < 3:
        for key in CONTAINER_KEYS:
            if key in obj and (isinstance(obj[key], (Mapping, torch.nn.Module))):
                return _unwrap(obj[key], path, depth + 1)
        bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        raise ConfigError(f"endpoint {path}: holds a dict whose entry {bad!r} is a {type(obj.get(bad)).__name__}, "
                          f"not a tensor, and none of the container keys {list(CONTAINER_KEYS)}; "
                          f"save the image encoder's state_dict() instead")
    raise ConfigError(f"endpoint {path}: holds a {type(obj).__name__}, not a state dict or an nn.Module; "
                      f"save the image encoder's state_dict() instead")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:  # a safetensors file: 8-byte header length, then a JSON header
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def load_checkpoint_tensors(path: str | os.PathLike[str], *, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, as a flat ``name -> tensor`` dict on the CPU (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"endpoint {path}: file not found; check the endpoint source settings (endpoints.*)")
    if _is_safetensors(path):
        return load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_unsafe_pickle:
            m = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" (it references {m.group(1)})" if m else ""
            raise ConfigError(
                f"endpoint {path}: the file is a pickle that needs arbitrary objects{what}, and unpickling it can "
                f"execute code; if you trust this file, set {UNSAFE_PICKLE_KEY}=true to load it in full") from None
        log.warning("endpoint %s: unpickling in full (%s=true); this can execute code from the file", path,
                    UNSAFE_PICKLE_KEY)
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle_module())
    return _unwrap(obj, path)


# --------------------------------------------------------------------------------------------- conversion


def to_open_clip_visual(sd: Mapping[str, torch.Tensor], *, source: str | os.PathLike[str] | None = None
                        ) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's keys to open_clip visual names (see the module docstring).

    The visual tower is found by its ``conv1.weight`` key: what precedes it is stripped. When that prefix ends in
    ``visual.`` (a full CLIP, possibly wrapped: ``model.visual.``), every other key under the CLIP's own prefix is the
    text tower / logit scale and is dropped; keys outside it are kept (and then reported as unexpected by
    `check_visual_state_dict`). transformers CLIP vision weights are converted with `hf_clip`.
    """
    src = str(source) if source is not None else None
    if find_hf_vision_prefix(sd.keys()) is not None:
        return hf_clip_vision_to_open_clip(sd, source=src)
    prefixes = sorted({k[: -len(_OPEN_CLIP_MARKER)] for k in sd
                       if k == _OPEN_CLIP_MARKER or k.endswith("." + _OPEN_CLIP_MARKER)})
    if not prefixes:
        return dict(sd)  # nothing recognisable: let the check name what is missing
    if len(prefixes) > 1:
        where = f"endpoint {src}" if src else "state dict"
        raise ConfigError(f"{where}: holds several image towers ({', '.join(repr(p + _OPEN_CLIP_MARKER) for p in prefixes)}); "
                          f"save one image encoder per file")
    prefix = prefixes[0]
    clip_prefix = prefix[: -len("visual.")] if prefix.endswith("visual.") else None
    out: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, value in sd.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
        elif clip_prefix is not None and key.startswith(clip_prefix):
            dropped += 1
        else:
            out[key] = value
    if dropped:
        log.debug("endpoint %s: dropped %d non-visual CLIP keys", src, dropped)
    return out


# ------------------------------------------------------------------------------------------------- checks


def _shape_of(ref: Any) -> tuple[int, ...]:
    if isinstance(ref, torch.Tensor):
        return tuple(ref.shape)
    return tuple(int(d) for d in ref)


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def check_visual_state_dict(sd: Mapping[str, torch.Tensor], reference: Mapping[str, Any],
                            path: str | os.PathLike[str], *, backbone: str | None = None,
                            check_values: bool = True) -> None:
    """Raise a one-line `ConfigError` naming `path` and the first offending parameter when `sd` does not match
    `reference` (tensors or shapes): missing, unexpected, wrong shape, or (when `check_values`) non-finite values."""
    bb = f"the backbone {backbone}" if backbone else "the backbone"
    missing = [k for k in reference if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"endpoint {path}: parameter {missing[0]!r}{more} is missing, {bb} needs it; "
                          f"is this an image-encoder checkpoint for this backbone?")
    unexpected = [k for k in sd if k not in reference]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConfigError(f"endpoint {path}: unexpected parameter {unexpected[0]!r}{more}, not part of {bb}'s "
                          f"image encoder; is this checkpoint for another backbone or model?")
    for key, ref in reference.items():
        got, want = tuple(sd[key].shape), _shape_of(ref)
        if got != want:
            raise ConfigError(f"endpoint {path}: parameter {key!r} has shape {_fmt(got)}, {bb} expects "
                              f"{_fmt(want)}; is this checkpoint for another backbone?")
    if check_values:
        for key in reference:
            t = sd[key]
            if t.is_floating_point() or t.is_complex():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise ConfigError(f"endpoint {path}: parameter {key!r} has {bad} non-finite value(s) (NaN/Inf); "
                                      f"the checkpoint is corrupt or its training diverged: re-download or re-train it")


# -------------------------------------------------------------------------------------------- materialize


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cached_is_valid(path: Path, reference: Mapping[str, Any]) -> bool:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(reference):
                return False
            return all(tuple(f.get_slice(k).get_shape()) == _shape_of(reference[k]) for k in keys)
    except (OSError, SafetensorError):  # a damaged cache file is rebuilt
        return False


def materialize_endpoint(path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                         reference_visual_sd: Mapping[str, Any], *, backbone: str,
                         allow_unsafe_pickle: bool = False,
                         fill_missing_from: Mapping[str, torch.Tensor] | None = None,
                         dtype: torch.dtype | None = None) -> Path:
    """Load, convert and check one endpoint, write its open_clip visual state dict to `out_dir`; return that path.

    The file name is a hash of the source file's sha256, `backbone`, `dtype`, the conversion version and (when
    `fill_missing_from` is given) the fillable tensors; when it exists and matches `reference_visual_sd`'s keys and
    shapes it is returned without reading the source again. `fill_missing_from` (the pretrained visual state dict):
    parameters in `FILLABLE_PARAMETERS` that the checkpoint lacks are copied from it (INFO log); anything else
    missing is an error. `dtype` None keeps the checkpoint's dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"endpoint {path}: file not found; check the endpoint source settings (endpoints.*)")
    fill = {k: fill_missing_from[k] for k in FILLABLE_PARAMETERS
            if fill_missing_from is not None and k in fill_missing_from}
    key = stable_hash({
        "sha256": file_sha256(path), "backbone": backbone, "dtype": str(dtype), "version": MATERIALIZE_VERSION,
        "fill": _tensor_digest(fill) if fill else None,
    })
    out = Path(out_dir) / f"visual-{key}.safetensors"
    if out.is_file() and _cached_is_valid(out, reference_visual_sd):
        log.debug("endpoint %s: cached as %s", path, out)
        return out
    sd = to_open_clip_visual(load_checkpoint_tensors(path, allow_unsafe_pickle=allow_unsafe_pickle), source=path)
    for name, tensor in fill.items():
        if name not in sd and name in reference_visual_sd:
            log.info("endpoint %s: no %r parameter (transformers keeps the projection outside the vision model); "
                     "taking it from the pretrained visual", path, name)
            sd[name] = tensor.detach().to("cpu", copy=True)
    check_visual_state_dict(sd, reference_visual_sd, path, backbone=backbone)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    ordered = {k: sd[k] for k in reference_visual_sd}
    save_tensors(out, ordered, metadata={"source": str(path), "backbone": backbone, "format": "open_clip_visual"})
    log.info("endpoint %s -> %s", path, out)
    return out


__all__ = [
    "FILLABLE_PARAMETERS", "UNSAFE_PICKLE_KEY", "check_visual_state_dict", "file_sha256", "load_checkpoint_tensors",
    "materialize_endpoint", "to_open_clip_visual",
]
