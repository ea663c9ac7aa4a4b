"""A run's assets for every endpoint source: backbone (weights, transform, heads), endpoint files and data locations.

`prepare_assets` resolves everything a run needs *before* any work (weights in the HF cache, endpoint files,
dataset splits), so an offline run with a missing asset stops at once with one line naming it and the prefetch
command. Endpoints of every source end up as safetensors visual state dicts in the cache, checked against the
backbone, so the merging code reads them all the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from mass_exp.data.datasets import hub_offline, load_split
from mass_exp.data.tasks import HEAD_SOURCES, TaskSpec, check_label_names, get_tasks, source_record
from mass_exp.errors import ConfigError
from mass_exp.models.clip import BackboneWeights, create_clip, resolve_backbone_weights
from mass_exp.models.heads import load_or_build_heads
from mass_exp.utils.io import load_tensors, save_tensors, stable_hash

log = logging.getLogger(__name__)


def head_source(cfg: DictConfig) -> str | None:
    """The checkpoint source whose heads, data, preprocessing, validation split and reference accuracies a run uses:
    ``endpoints.head_source`` (each conf/endpoints/<source>.yaml sets its own; ``local`` documents its default),
    else the endpoint source itself when it is one of `HEAD_SOURCES`; None for the generated mini suite."""
    e = cfg.endpoints
    if e.source == "mini":
        return None
    hs = e.get("head_source") or (e.source if e.source in HEAD_SOURCES else None)
    if hs is not None and hs not in HEAD_SOURCES:
        raise ConfigError(f"endpoints.head_source={hs!r} is not one of {list(HEAD_SOURCES)}")
    return hs


def run_tasks(cfg: DictConfig) -> list[TaskSpec]:
    """The suite's tasks as the run's head source sees them."""
    return get_tasks(list(cfg.suite.tasks), head_source(cfg))


@dataclass
class Assets:
    """Everything a run evaluates: the backbone with its heads, the endpoint files and the data of each task."""

    tasks: list[TaskSpec]
    model: torch.nn.Module  # the pretrained CLIP (both towers)
    preprocess: Any
    heads: dict[str, torch.Tensor]
    pretrained_visual_file: Path
    endpoint_files: list[Path]
    weights_id: str  # identifies the pretrained weights (for cache keys)
    endpoints_id: str  # identifies the set of endpoints (for cache keys)
    data_dirs: dict[str, Path] = field(default_factory=dict)  # task -> local dataset directory (mini or local copies)
    packaged_reference: dict[str, float] | None = None  # published fine-tuned accuracies of the source, if any
    reference_sources: dict[str, str] = field(default_factory=dict)  # split -> where its reference accuracies came from


def _cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.cache_dir)


def prepare_assets(cfg: DictConfig, *, download: bool | None = None, splits: tuple[str, ...] | None = None) -> Assets:
    """Build or load the backbone, heads and endpoints that `cfg` asks for (building mini ones when missing).

    `download=None` downloads missing hub files unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set. `splits` are
    the dataset splits opened (downloaded) up front; default: those the run's method reads.
    """
    tasks = run_tasks(cfg)
    if cfg.endpoints.source == "mini":
        return _mini_assets(cfg, tasks)
    return _hub_assets(cfg, tasks, download=(not hub_offline()) if download is None else download,
                       splits=splits or splits_needed(cfg))


def _mini_assets(cfg: DictConfig, tasks: list[TaskSpec]) -> Assets:
    from mass_exp.endpoints.mini import prepare_mini_assets

    if any(t.source != "mini" for t in tasks):
        bad = next(t.name for t in tasks if t.source != "mini")
        raise ConfigError(f"endpoints=mini has endpoints for the generated mini tasks only, not {bad!r}; "
                          "pick endpoints=tall_masks|retrained|fusion_bench|local for the real suites")
    if cfg.backbone.pretrained is not None:
        raise ConfigError("endpoints=mini builds its own pretrained tiny CLIP: set backbone=tiny (backbone.pretrained=null)")
    cache = _cache_dir(cfg)
    mini = prepare_mini_assets(
        cfg.backbone.arch, tasks, OmegaConf.to_container(cfg.suite.generator), OmegaConf.to_container(cfg.endpoints.pretrain),
        OmegaConf.to_container(cfg.endpoints.finetune), OmegaConf.to_container(cfg.trainer), cache, seed=int(cfg.seed),
        workers=cfg.endpoints.build_workers,
    )
    model, preprocess, tokenizer = create_clip(cfg.backbone.arch, None)
    model.load_state_dict(load_tensors(mini.pretrained_file))
    visual_file = mini.pretrained_file.with_name(mini.pretrained_file.stem + "-visual.safetensors")
    if not visual_file.exists():
        save_tensors(visual_file, model.visual.state_dict(), metadata={"kind": "pretrained-visual"})
    heads = load_or_build_heads(model, tokenizer, tasks, backbone=cfg.backbone.name, weights_id=mini.pretrained_key,
                                cache_dir=cache / "heads")
    return Assets(tasks, model, preprocess, heads, visual_file, [mini.endpoint_files[t.name] for t in tasks],
                  weights_id=mini.pretrained_key, endpoints_id=stable_hash(mini.endpoint_keys),
                  data_dirs=dict(mini.data_dirs))


def local_data_dirs(cfg: DictConfig, tasks: list[TaskSpec]) -> dict[str, Path]:
    """Task -> local dataset directory, from `data.local_dirs.<Task>` or the pattern `data.local_pattern` ({task})."""
    data = cfg.get("data") or {}
    explicit = dict(data.get("local_dirs") or {})
    pattern = data.get("local_pattern")
    out = {}
    for t in tasks:
        if t.name in explicit:
            out[t.name] = Path(str(explicit[t.name])).expanduser()
        elif pattern:
            out[t.name] = Path(str(pattern).format(task=t.name, task_lower=t.name.lower())).expanduser()
        else:
            continue
        if not out[t.name].exists():
            key = f"data.local_dirs.{t.name}" if t.name in explicit else "data.local_pattern"
            raise ConfigError(f"local dataset directory for task {t.name!r} does not exist: {out[t.name]} (from {key})")
    return out


def check_task_data(cfg: DictConfig, tasks: list[TaskSpec], data_dirs: dict[str, Path], splits: tuple[str, ...]
                    ) -> list[TaskSpec]:
    """Open every split a run will read (memory-mapped, cheap) and check its labels against the task (the label
    guard, `data.tasks.check_label_names`); returns the tasks, with head rows read from the dataset's ClassLabel
    where the head source builds its heads that way (`classnames_from_dataset`)."""
    data = cfg.get("data") or {}
    accept = set(data.get("accept_label_mismatch") or [])
    unknown = accept - {t.name for t in tasks}
    if unknown:
        raise ConfigError(f"data.accept_label_mismatch names {sorted(unknown)[0]!r}, which is not a task of this suite")
    out = []
    for t in tasks:
        names = None
        for split in splits:
            ds = load_split(t, split, local_dirs=data_dirs, cache_dir=cfg.paths.hf_cache_dir)
            if len(ds) == 0:
                raise ConfigError(f"task {t.name}: the {split} split is empty ({data_dirs.get(t.name) or t.hf_dataset})")
            feat = ds.features.get("label")
            n = getattr(feat, "num_classes", None)
            if n is not None and n != t.num_labels:
                raise ConfigError(f"task {t.name}: the dataset's label feature has {n} classes but the task lists "
                                  f"{t.num_labels} labels (resources/tasks.json); wrong dataset or config?")
            if getattr(feat, "names", None):
                names = list(feat.names)
                bad = check_label_names(t, names, accept=t.name in accept)
                if bad:
                    i, got, want = bad[0]
                    log.warning("task %s: %d dataset label names differ from the %s class list (first: label %d %r vs "
                                "%r); accepted by data.accept_label_mismatch", t.name, len(bad), t.head_source, i, got, want)
        if t.classnames_from_dataset:
            if names is None:
                log.warning("task %s: the dataset has no ClassLabel names; its %s head uses the packaged copy",
                            t.name, t.head_source)
            else:
                t = t.with_dataset_classnames(names)
        out.append(t)
    return out


def splits_needed(cfg: DictConfig) -> tuple[str, ...]:
    m = cfg.method
    needs_val = m.get("alpha_protocol", "fixed") == "validation" or m.get("lambda_protocol", "fixed") == "validation"
    splits = ("test", "validation") if needs_val else ("test",)
    from mass_exp.routing.config import SAMPLE_ROUTERS

    router_split = cfg.router.get("split") if cfg.router.name in SAMPLE_ROUTERS else None
    if router_split and router_split not in splits:  # the sample-based routers read training images
        splits += (str(router_split),)
    return splits


def packaged_reference(source: str | None, backbone: str, tasks: list[TaskSpec]) -> dict[str, float] | None:
    """The head source's published fine-tuned accuracies (test split; '<Task>Val' keys for validation) for
    `backbone`: the file its `resources/sources/<source>.json` names under ``reference_acc``, or None."""
    if source not in HEAD_SOURCES:
        return None
    name = source_record(source).get("reference_acc")
    if not name:
        return None
    table = json.loads(resources.files("mass_exp").joinpath(f"resources/{name}").read_text()).get(backbone)
    if not table:
        return None
    return {k: float(v) for k, v in table.items() if not k.startswith("_")}


def _hub_assets(cfg: DictConfig, tasks: list[TaskSpec], download: bool, splits: tuple[str, ...]) -> Assets:
    from mass_exp.endpoints.sources import materialize_endpoints, resolve_endpoints

    b, e = cfg.backbone, cfg.endpoints
    if b.pretrained is None:
        raise ConfigError(f"endpoints={e.source} needs pretrained backbone weights: set backbone.pretrained=openai "
                          "or a local weights file")
    cache = _cache_dir(cfg)
    hub_cache = cfg.paths.get("hub_cache_dir")
    # 1. resolve everything first: an offline run with a missing asset stops here, before any work
    weights = resolve_backbone_weights(b.arch, str(b.pretrained), hub_repo=b.get("hf_hub"), cache_dir=hub_cache,
                                       download=download)
    options = OmegaConf.to_container(e, resolve=True)
    resolved = resolve_endpoints(e.source, backbone=b.arch, tasks=[t.name for t in tasks], options=options,
                                 hub_cache_dir=hub_cache, download=download)
    data_dirs = local_data_dirs(cfg, tasks)
    tasks = check_task_data(cfg, tasks, data_dirs, splits)
    # 2. the backbone, its pretrained image tower as the merging base, the endpoints checked against it
    model, preprocess, tokenizer = _load_backbone(cfg, weights)
    reference = {k: v.detach() for k, v in model.visual.state_dict().items()}
    pre_file, ft_files = materialize_endpoints(resolved, cache / "endpoints" / b.name, reference, backbone=b.name,
                                               allow_unsafe_pickle=bool(e.get("allow_unsafe_pickle", False)))
    if pre_file is not None:  # the source's own pretrained encoder is the base of its task vectors
        visual_file = pre_file
    else:
        visual_file = cache / "backbones" / f"{b.name}-{stable_hash(weights.weights_id)}-visual.safetensors"
        if not visual_file.exists():
            save_tensors(visual_file, reference, metadata={"kind": "pretrained-visual", "weights": weights.weights_id})
    files = [ft_files[t.name] for t in tasks]
    for t in tasks:
        ep = resolved.finetuned[t.name]
        log.info("endpoint %-14s %s", t.name, f"{ep.repo_id}/{ep.filename}" if ep.repo_id else ep.path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    heads = load_or_build_heads(model, tokenizer, tasks, backbone=b.name, weights_id=weights.weights_id,
                                cache_dir=cache / "heads", device=device)
    model.cpu()
    reference_acc = (packaged_reference(head_source(cfg), b.name, tasks)
                     if e.get("reference_acc", "measured") == "packaged" else None)
    return Assets(tasks, model, preprocess, heads, visual_file, files, weights_id=weights.weights_id,
                  endpoints_id=stable_hash([p.name for p in files] + [visual_file.name]), data_dirs=data_dirs,
                  packaged_reference=reference_acc)


def _load_backbone(cfg: DictConfig, weights: BackboneWeights) -> tuple[torch.nn.Module, Callable, Any]:
    b = cfg.backbone
    try:
        return create_clip(b.arch, str(weights.path), quick_gelu=bool(b.get("quick_gelu", False)))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - open_clip raises many types; name the file and the cause in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"backbone weights {weights.path} could not be loaded into {b.arch}: {first[:300]}") from None
