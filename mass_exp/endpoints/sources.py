"""Where real fine-tuned endpoints come from: Hugging Face Hub repositories (through `huggingface_hub` and its cache)
or local files. Pure functions, no Hydra; `options` is the ``endpoints`` config group (``conf/endpoints/<source>.yaml``).

Sources (`SOURCES`) and their options (defaults in `DEFAULT_OPTIONS`; every template and map is overridable):

- ``tall_masks``: one repo ``repo_id`` (``nik-dim/tall_masks``), files ``finetuned_file``
  (``single_task/{model}/{task}Val/nonlinear_finetuned.pt``; ``{model}`` defaults to the repo's folder per backbone,
  `tall_masks_model_folders`: ViT-B-16 is stored as ``VIT-B-16``), pretrained ``pretrained_file``
  (``single_task/{model}/MNISTVal/nonlinear_zeroshot.pt``); open_clip format (pickles: see
  `loading.load_checkpoint_tensors` and ``endpoints.allow_unsafe_pickle``).
- ``retrained``: one repo per task, ``repo_template`` (``crisostomi/{model}-{task}``), pretrained repo
  ``pretrained_repo`` (``crisostomi/{model}-base``). The weights file inside each repo is resolved (names have
  changed over time) from the repo's file list (online: the Hub's; offline: the cached snapshot's) by
  `WEIGHT_FILE_PRIORITY`: ``*.safetensors``, then ``pytorch_model.bin``, then any other ``*.bin``/``*.pt``/``*.pth``/
  ``*.ckpt``; the first non-empty tier must hold exactly one file, otherwise `ConfigError` naming the repo and the
  files seen. ``filename`` forces one name for every repo, ``filenames`` per task (key ``pretrained`` for the base).
- ``fusion_bench``: ``repo_template`` (``tanganke/{model}_{task}``), ``filename`` (``model.safetensors``),
  transformers CLIPVisionModel weights (kind ``hf_clip_vision``: converted by `hf_clip`, ``proj`` filled from the
  pretrained visual). ``{model}`` comes from ``model_names`` (ViT-B-32 -> clip-vit-base-patch32, ...), ``{task}``
  from ``task_names`` (FusionBench's names: Cars -> stanford-cars, ...; EMNIST has no digits model there).
  Pretrained: None (the backbone's own open_clip visual) unless ``pretrained_repo`` is set.
- ``local``: ``pattern`` (e.g. ``/ckpts/{model}/{task}/finetuned.safetensors``), optional ``pretrained`` path,
  ``kind`` (``open_clip``; transformers files are detected and converted either way).

Placeholders in templates: ``{model}`` (``model_names[backbone]``, default the open_clip name, e.g. ViT-B-32),
``{task}`` (``task_names[task]``, default the task name, e.g. Cars), ``{task_lower}`` (``{task}`` lower-cased).
``revision`` (default ``main``) pins every Hub repo.

Public API:

- `EndpointFile`: one resolved file (task, kind, local path, Hub repo/file/revision when it came from the Hub).
- `ResolvedEndpoints`: a source's pretrained file (None = use the backbone's own pretrained visual) and one
  fine-tuned file per task.
- `resolve_endpoints(source, *, backbone, tasks, options, hub_cache_dir, download)`: every file as a local path,
  downloading into the Hub cache when `download` and not offline; offline (``download=False`` or
  ``HF_HUB_OFFLINE=1``) from the cache only, a missing file raising ``missing <repo>/<file> in the HF cache (<dir>);
  run mass-exp-prefetch ...``.
- `required_hub_files(...)`: the ``(repo_id, filename)`` pairs a source needs (for prefetch / offline checks).
- `materialize_endpoints(resolved, out_dir, reference_visual_sd, *, backbone, ...)`: `loading.materialize_endpoint`
  for every file of a `ResolvedEndpoints` (passing the pretrained visual to fill ``proj`` for transformers files).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mass_exp.endpoints.loading import materialize_endpoint
from mass_exp.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("tall_masks", "retrained", "fusion_bench", "local")
KIND_OPEN_CLIP = "open_clip"
KIND_HF_CLIP_VISION = "hf_clip_vision"
KINDS: tuple[str, ...] = (KIND_OPEN_CLIP, KIND_HF_CLIP_VISION)
PRETRAINED = "pretrained"  # the `task` of a pretrained EndpointFile, and its key in `filenames`
PREFETCH_HINT = "run mass-exp-prefetch <same overrides> on a machine with network"

# weight-file tiers for repos whose file name is resolved (retrained): the first non-empty tier must hold one file
WEIGHT_FILE_PRIORITY: tuple[tuple[str, ...], ...] = (
    ("*.safetensors",),
    ("pytorch_model.bin",),
    ("*.bin", "*.pt", "*.pth", "*.ckpt"),
)

FUSION_BENCH_TASK_NAMES: dict[str, str] = {
    "Cars": "stanford-cars", "DTD": "dtd", "EuroSAT": "eurosat", "GTSRB": "gtsrb", "MNIST": "mnist",
    "RESISC45": "resisc45", "SUN397": "sun397", "SVHN": "svhn", "CIFAR100": "cifar100", "STL10": "stl10",
    "Flowers102": "oxford_flowers102", "OxfordIIITPet": "oxford-iiit-pet", "PCAM": "pcam", "FER2013": "fer2013",
    "CIFAR10": "cifar10", "Food101": "food101", "FashionMNIST": "fashion_mnist", "RenderedSST2": "rendered-sst2",
    "KMNIST": "kmnist",
    # EMNIST: FusionBench's 20-task pool has emnist_letters (26 classes), not the EMNIST digits of this suite
}
FUSION_BENCH_MODEL_NAMES: dict[str, str] = {
    "ViT-B-32": "clip-vit-base-patch32", "ViT-B-16": "clip-vit-base-patch16", "ViT-L-14": "clip-vit-large-patch14",
}



def tall_masks_model_folders() -> dict[str, str]:
    """Backbone -> folder name in nik-dim/tall_masks (``single_task/<folder>/...``), packaged as data with its
    provenance in `resources/sources/tall_masks.json` (``model_folders``; ViT-B-16 is ``VIT-B-16``)."""
    from mass_exp.data.tasks import source_record

    return {k: str(v) for k, v in source_record("tall_masks")["model_folders"].items() if not k.startswith("_")}


DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "tall_masks": {
        "repo_id": "nik-dim/tall_masks",
        "finetuned_file": "single_task/{model}/{task}Val/nonlinear_finetuned.pt",
        "pretrained_file": "single_task/{model}/MNISTVal/nonlinear_zeroshot.pt",
        "revision": None, "model_names": tall_masks_model_folders(), "task_names": {},
    },
    "retrained": {
        "repo_template": "crisostomi/{model}-{task}",
        "pretrained_repo": "crisostomi/{model}-base",
        "filename": None, "filenames": {},
        "revision": None, "model_names": {}, "task_names": {},
    },
    "fusion_bench": {
        "repo_template": "tanganke/{model}_{task}",
        "filename": "model.safetensors",
        "pretrained_repo": None, "pretrained_filename": "model.safetensors",
        "revision": None, "model_names": dict(FUSION_BENCH_MODEL_NAMES), "task_names": dict(FUSION_BENCH_TASK_NAMES),
    },
    "local": {
        "pattern": None, "pretrained": None, "kind": KIND_OPEN_CLIP, "model_names": {}, "task_names": {},
    },
}


@dataclass(frozen=True)
class EndpointFile:
    """One endpoint checkpoint. `path` is the local file; `repo_id` / `filename` / `revision` say where on the Hub
    it came from (None for local files). `kind`: ``open_clip`` or ``hf_clip_vision`` (transformers weights)."""

    task: str
    kind: str
    path: Path | None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class ResolvedEndpoints:
    """A source's files: `pretrained` None means "use the backbone's own pretrained visual"."""

    source: str
    backbone: str
    pretrained: EndpointFile | None
    finetuned: dict[str, EndpointFile] = field(default_factory=dict)

    def hub_files(self) -> list[tuple[str, str]]:
        files = ([self.pretrained] if self.pretrained else []) + list(self.finetuned.values())
        return [(f.repo_id, f.filename) for f in files if f.repo_id is not None and f.filename is not None]


# ---------------------------------------------------------------------------------------------- options


def _plain(obj: Any) -> Any:
    """OmegaConf containers -> plain dicts / lists (without importing omegaconf when not needed)."""
    if hasattr(obj, "_content") or type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(obj, resolve=True)
    return obj


def merged_options(source: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """`DEFAULT_OPTIONS[source]` updated by `options` (maps such as ``task_names`` are merged key by key)."""
    if source not in SOURCES:
        raise ConfigError(f"endpoints.source={source!r} is not a real endpoint source; use one of {list(SOURCES)}")
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_OPTIONS[source].items()}
    for key, value in (_plain(options) or {}).items():
        if isinstance(merged.get(key), dict) and isinstance(value, Mapping):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def _model_name(source: str, opts: Mapping[str, Any], backbone: str) -> str:
    names = opts.get("model_names") or {}
    if backbone in names:
        return str(names[backbone])
    if source == "fusion_bench":
        raise ConfigError(f"endpoints.model_names has no FusionBench model name for backbone {backbone!r} "
                          f"(known: {sorted(names)}); set endpoints.model_names.{backbone}=<e.g. clip-vit-base-patch32>")
    return backbone


def _task_name(source: str, opts: Mapping[str, Any], task: str) -> str:
    names = opts.get("task_names") or {}
    if task in names:
        return str(names[task])
    if source == "fusion_bench":
        hint = (" (FusionBench's 20-task pool has emnist_letters, 26 classes, not EMNIST digits)"
                if task == "EMNIST" else "")
        raise ConfigError(f"endpoints.task_names has no FusionBench name for task {task!r}{hint}; "
                          f"set endpoints.task_names.{task}=<suffix of the tanganke/<model>_<suffix> repo>")
    return task


def _fill(template: Any, key: str, **values: str) -> str:
    if not isinstance(template, str) or not template:
        raise ConfigError(f"endpoints.{key} must be a non-empty string template, got {template!r}")
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"endpoints.{key}={template!r}: bad placeholder {err}; use only "
                          f"{', '.join('{' + v + '}' for v in values)}") from None


def _values(source: str, opts: Mapping[str, Any], backbone: str, task: str | None) -> dict[str, str]:
    values = {"model": _model_name(source, opts, backbone)}
    if task is not None:
        name = _task_name(source, opts, task)
        values.update(task=name, task_lower=name.lower())
    return values


# ------------------------------------------------------------------------------------------ hub helpers


def hub_cache_path(hub_cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hub cache in use: `hub_cache_dir`, else huggingface_hub's (``HF_HUB_CACHE`` / ``HF_HOME/hub``)."""
    if hub_cache_dir:
        return Path(hub_cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline(download: bool) -> bool:
    """True when nothing may be fetched: ``download=False`` or ``HF_HUB_OFFLINE`` set (now or at import)."""
    if not download:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _missing_in_cache(repo_id: str, filename: str, cache: Path) -> ConfigError:
    return ConfigError(f"missing {repo_id}/{filename} in the HF cache ({cache}); {PREFETCH_HINT}")


def _repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def cached_repo_files(repo_id: str, *, revision: str | None = None,
                      hub_cache_dir: str | os.PathLike[str] | None = None) -> list[str] | None:
    """Files of a model repo's cached snapshot (relative paths, sorted), or None when that revision is not cached.

    Walks ``<cache>/models--org--name/snapshots/<commit>/`` where ``<commit>`` is ``refs/<revision>`` (or
    `revision` itself when it is a commit hash), the layout `huggingface_hub` writes.
    """
    folder = _repo_folder(hub_cache_path(hub_cache_dir), repo_id)
    revision = revision or "main"
    ref = folder / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    elif re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:
        return None
    snap = folder / "snapshots" / commit
    if not snap.is_dir():
        return None
    files = []
    for root, dirs, names in os.walk(snap, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            full = Path(root) / name
            if full.is_file():  # a dangling symlink (blob removed) does not count
                files.append(full.relative_to(snap).as_posix())
    return sorted(files)


def _hub_errors():
    from huggingface_hub import errors

    remote = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    return errors.LocalEntryNotFoundError, (remote, errors.RepositoryNotFoundError, errors.RevisionNotFoundError)


def _list_repo_files(repo_id: str, revision: str | None, cache: Path, offline: bool, option_key: str) -> list[str]:
    if offline:
        files = cached_repo_files(repo_id, revision=revision, hub_cache_dir=cache)
        if files is None:
            raise ConfigError(f"missing {repo_id} (revision {revision or 'main'}) in the HF cache ({cache}): its "
                              f"weights file cannot be resolved offline; {PREFETCH_HINT}")
        return files
    from huggingface_hub import HfApi

    _, remote_errors = _hub_errors()
    try:
        return sorted(HfApi().list_repo_files(repo_id, revision=revision))
    except remote_errors as err:
        raise ConfigError(f"Hub repo {repo_id} (revision {revision or 'main'}) not found "
                          f"({type(err).__name__}); check endpoints.{option_key} and endpoints.revision") from err


def _match(name: str, pattern: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if pattern.startswith("*"):
        return base.endswith(pattern[1:])
    return base == pattern


def pick_weight_file(repo_id: str, files: Sequence[str]) -> str:
    """The weights file of a repo by `WEIGHT_FILE_PRIORITY`; `ConfigError` when none or ambiguous."""
    candidates = [f for f in files if not f.rsplit("/", 1)[-1].startswith(".")]
    taken: set[str] = set()
    for tier in WEIGHT_FILE_PRIORITY:
        hits = [f for f in candidates if f not in taken and any(_match(f, p) for p in tier)]
        taken.update(hits)
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ConfigError(f"Hub repo {repo_id}: ambiguous weights file, several {'/'.join(tier)} files "
                              f"({', '.join(hits)}); choose one with endpoints.filename (or endpoints.filenames.<task>)")
    raise ConfigError(f"Hub repo {repo_id}: no weights file (*.safetensors, pytorch_model.bin, *.bin, *.pt, *.pth, "
                      f"*.ckpt) among its files ({', '.join(files) or 'none'}); set endpoints.filename or check "
                      f"endpoints.repo_template")


def _download(repo_id: str, filename: str, revision: str | None, cache: Path, offline: bool, option_key: str) -> Path:
    from huggingface_hub import hf_hub_download

    local_missing, remote_errors = _hub_errors()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=str(cache),
                                    local_files_only=offline))
    except local_missing as err:
        if offline:
            raise _missing_in_cache(repo_id, filename, cache) from None
        raise ConfigError(f"could not download {repo_id}/{filename} and it is not in the HF cache ({cache}): "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; check the network "
                          f"or {PREFETCH_HINT}") from err
    except remote_errors as err:
        raise ConfigError(f"{repo_id}/{filename} (revision {revision or 'main'}) not found on the Hub "
                          f"({type(err).__name__}); check endpoints.{option_key} and endpoints.revision") from err


# --------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _HubSpec:
    task: str
    kind: str
    repo_id: str
    filename: str | None  # None: resolve from the repo's files
    option_key: str  # the option that produced repo_id / filename, for messages


def _hub_plan(source: str, opts: Mapping[str, Any], backbone: str, tasks: Sequence[str]
              ) -> tuple[_HubSpec | None, list[_HubSpec]]:
    if source == "tall_masks":
        repo = str(opts["repo_id"])
        pre = _HubSpec(PRETRAINED, KIND_OPEN_CLIP, repo,
                       _fill(opts["pretrained_file"], "pretrained_file", **_values(source, opts, backbone, None)),
                       "pretrained_file")
        fts = [_HubSpec(t, KIND_OPEN_CLIP, repo,
                        _fill(opts["finetuned_file"], "finetuned_file", **_values(source, opts, backbone, t)),
                        "finetuned_file") for t in tasks]
        return pre, fts
    if source == "retrained":
        per_file = opts.get("filenames") or {}
        default_file = opts.get("filename")

        def fname(key: str) -> str | None:
            f = per_file.get(key, default_file)
            return str(f) if f else None

        pre = _HubSpec(PRETRAINED, KIND_OPEN_CLIP,
                       _fill(opts["pretrained_repo"], "pretrained_repo", **_values(source, opts, backbone, None)),
                       fname(PRETRAINED), "pretrained_repo")
        fts = [_HubSpec(t, KIND_OPEN_CLIP,
                        _fill(opts["repo_template"], "repo_template", **_values(source, opts, backbone, t)),
                        fname(t), "repo_template") for t in tasks]
        return pre, fts
    if source == "fusion_bench":
        fts = [_HubSpec(t, KIND_HF_CLIP_VISION,
                        _fill(opts["repo_template"], "repo_template", **_values(source, opts, backbone, t)),
                        str(opts["filename"]), "repo_template") for t in tasks]
        pre = None
        if opts.get("pretrained_repo"):
            pre = _HubSpec(PRETRAINED, KIND_HF_CLIP_VISION,
                           _fill(opts["pretrained_repo"], "pretrained_repo", **_values(source, opts, backbone, None)),
                           str(opts["pretrained_filename"]), "pretrained_repo")
        return pre, fts
    raise AssertionError(source)


def _resolve_names(specs: Sequence[_HubSpec], revision: str | None, cache: Path, offline: bool) -> list[_HubSpec]:
    out = []
    for s in specs:
        if s.filename is None:
            files = _list_repo_files(s.repo_id, revision, cache, offline, s.option_key)
            s = _HubSpec(s.task, s.kind, s.repo_id, pick_weight_file(s.repo_id, files), s.option_key)
        out.append(s)
    return out


def _check_tasks(tasks: Sequence[str]) -> None:
    if not tasks:
        raise ConfigError("no tasks to resolve endpoints for; check suite.tasks")
    dup = next((t for t in tasks if list(tasks).count(t) > 1), None)
    if dup is not None:
        raise ConfigError(f"task {dup!r} is listed twice; check suite.tasks")


def _one_match(path: Path) -> Path:
    """`path` itself, or the single file its glob (e.g. `finetuned.*`) matches; several matches are an error."""
    if not any(c in str(path) for c in "*?["):
        return path
    import glob

    hits = sorted(glob.glob(str(path)))
    if len(hits) > 1:
        raise ConfigError(f"endpoints.pattern matches {len(hits)} files for one task ({hits[0]}, {hits[1]}, ...); "
                          "make it match exactly one")
    return Path(hits[0]) if hits else path


def _resolve_local(opts: Mapping[str, Any], backbone: str, tasks: Sequence[str]) -> ResolvedEndpoints:
    kind = str(opts.get("kind") or KIND_OPEN_CLIP)
    if kind not in KINDS:
        raise ConfigError(f"endpoints.kind={kind!r} is not one of {list(KINDS)}")
    pattern = opts.get("pattern")
    if not pattern:
        raise ConfigError("endpoints.pattern is not set; give the fine-tuned checkpoints' path with {task} "
                          "(and {model}, {task_lower}) placeholders, e.g. endpoints.pattern=/ckpts/{model}/{task}.pt")
    paths = {t: _one_match(Path(_fill(pattern, "pattern", **_values("local", opts, backbone, t))).expanduser())
             for t in tasks}
    missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        more = f" ({len(missing)} of {len(paths)} missing)" if len(missing) > 1 else ""
        raise ConfigError(f"endpoint file {missing[0]} not found{more}; set endpoints.pattern (now {pattern!r}) "
                          f"to where the fine-tuned checkpoints are")
    pre = None
    if opts.get("pretrained"):
        p = Path(_fill(str(opts["pretrained"]), "pretrained",
                       **_values("local", opts, backbone, None))).expanduser()
        if not p.is_file():
            raise ConfigError(f"pretrained endpoint file {p} not found; fix endpoints.pretrained or set it to null "
                              f"to use the backbone's own pretrained weights")
        pre = EndpointFile(PRETRAINED, kind, p)
    return ResolvedEndpoints("local", backbone, pre, {t: EndpointFile(t, kind, p) for t, p in paths.items()})


def required_hub_files(source: str, *, backbone: str, tasks: Sequence[str], options: Mapping[str, Any] | None = None,
                       hub_cache_dir: str | os.PathLike[str] | None = None, download: bool = True
                       ) -> list[tuple[str, str]]:
    """The ``(repo_id, filename)`` pairs `source` needs for `tasks` (pretrained first), without fetching weights.

    File names that must be resolved (``retrained``) are looked up in the repo's file list: on the Hub when
    `download` and online, else in the cached snapshot. ``local`` needs none.
    """
    _check_tasks(tasks)
    opts = merged_options(source, options)
    if source == "local":
        return []
    cache = hub_cache_path(hub_cache_dir)
    pre, fts = _hub_plan(source, opts, backbone, tasks)
    specs = _resolve_names(([pre] if pre else []) + fts, opts.get("revision"), cache, hub_offline(download))
    return [(s.repo_id, s.filename) for s in specs]  # type: ignore[misc]


def resolve_endpoints(source: str, *, backbone: str, tasks: Sequence[str], options: Mapping[str, Any] | None = None,
                      hub_cache_dir: str | os.PathLike[str] | None = None, download: bool = True) -> ResolvedEndpoints:
    """Every endpoint file of `source` for `backbone` and `tasks`, as local paths (see the module docstring).

    `download`: fetch missing files into the Hub cache (unless ``HF_HUB_OFFLINE=1``); False: cache only.
    """
    _check_tasks(tasks)
    opts = merged_options(source, options)
    if source == "local":
        return _resolve_local(opts, backbone, tasks)
    cache = hub_cache_path(hub_cache_dir)
    offline = hub_offline(download)
    revision = opts.get("revision")
    pre, fts = _hub_plan(source, opts, backbone, tasks)
    specs = _resolve_names(([pre] if pre else []) + fts, revision, cache, offline)
    files = []
    for s in specs:
        assert s.filename is not None
        path = _download(s.repo_id, s.filename, revision, cache, offline, s.option_key)
        files.append(EndpointFile(s.task, s.kind, path, s.repo_id, s.filename, revision))
    pretrained = files.pop(0) if pre else None
    return ResolvedEndpoints(source, backbone, pretrained, {f.task: f for f in files})


def materialize_endpoints(resolved: ResolvedEndpoints, out_dir: str | os.PathLike[str],
                          reference_visual_sd: Mapping[str, torch.Tensor], *, backbone: str | None = None,
                          allow_unsafe_pickle: bool = False,
                          pretrained_visual_sd: Mapping[str, torch.Tensor] | None = None
                          ) -> tuple[Path | None, dict[str, Path]]:
    """`loading.materialize_endpoint` for each file: (pretrained path or None, {task: path}).

    `reference_visual_sd`: the backbone's visual state dict (names + shapes to check against).
    `pretrained_visual_sd` (default: `reference_visual_sd`) fills ``proj`` of ``hf_clip_vision`` files.
    """
    backbone = backbone or resolved.backbone
    fill_src = pretrained_visual_sd if pretrained_visual_sd is not None else reference_visual_sd

    def one(f: EndpointFile, fill: Mapping[str, torch.Tensor] | None) -> Path:
        assert f.path is not None
        return materialize_endpoint(f.path, out_dir, reference_visual_sd, backbone=backbone,
                                    allow_unsafe_pickle=allow_unsafe_pickle,
                                    fill_missing_from=fill if f.kind == KIND_HF_CLIP_VISION else None)

    pre_path = one(resolved.pretrained, fill_src) if resolved.pretrained else None
    if pre_path is not None and pretrained_visual_sd is None:
        from mass_exp.utils.io import load_tensors

        fill_src = load_tensors(pre_path)  # fill from the source's own pretrained visual
    return pre_path, {t: one(f, fill_src) for t, f in resolved.finetuned.items()}


__all__ = [
    "DEFAULT_OPTIONS",
    "FUSION_BENCH_MODEL_NAMES",
    "FUSION_BENCH_TASK_NAMES",
    "KINDS",
    "PRETRAINED",
    "SOURCES",
    "WEIGHT_FILE_PRIORITY",
    "EndpointFile",
    "ResolvedEndpoints",
    "cached_repo_files",
    "hub_cache_path",
    "hub_offline",
    "materialize_endpoints",
    "merged_options",
    "pick_weight_file",
    "required_hub_files",
    "resolve_endpoints",
]
