"""Loading any task's splits the same way: HF `datasets` for the real tasks and for the generated mini suite."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mass_exp.data.mini import GENERATOR_VERSION, SPLITS, generate_split, get_mini_task
from mass_exp.data.tasks import TaskSpec
from mass_exp.errors import ConfigError
from mass_exp.utils.io import stable_hash

log = logging.getLogger(__name__)


def mini_dataset_key(task: str, gen: dict) -> str:
    """Cache key of one generated task: everything that determines its images."""
    return stable_hash({"task": task, "version": GENERATOR_VERSION, **gen})


def build_mini_task(task: str, gen: dict, data_dir: str | os.PathLike) -> Path:
    """Generate (or reuse) one mini task as a HF DatasetDict on disk; returns its directory.

    `gen` holds seed, image_size, the split sizes (train/validation/test/pretrain) and pretrain_signed_share.
    Written to a temporary directory and renamed, so a killed run never leaves a half-written dataset behind.
    """
    import datasets

    spec = get_mini_task(task)
    out = Path(data_dir) / f"mini-{task}-{mini_dataset_key(task, gen)}"
    if (out / "dataset_dict.json").exists():
        return out
    t0 = time.time()
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(spec.classnames))}
    )
    splits = {}
    for split in SPLITS:
        n = int(gen[f"{split}_size"])
        images, labels = generate_split(spec, split, n, int(gen["seed"]), int(gen["image_size"]),
                                        float(gen["pretrain_signed_share"]))
        from PIL import Image

        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(im) for im in images], "label": labels.tolist()}, features=features
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        try:
            os.replace(tmp, out)
        except OSError:  # another process (e.g. a DDP rank) finished the same dataset first: keep its copy
            if not (out / "dataset_dict.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated mini task %s (%s) in %.1fs -> %s", task,
             ", ".join(f"{s}={len(d)}" for s, d in splits.items()), time.time() - t0, out)
    return out


def carve_validation(n_train: int, fraction: float = 0.1, max_samples: int | None = 5000, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train_rest, validation) of the official protocol (TALL-masks' `split_train_into_train_val`): the
    validation size is int(n_train * fraction) capped at `max_samples`, and the split is
    `torch.utils.data.random_split` of the train set into (rest, validation) with `torch.Generator().manual_seed(seed)`.
    Indices are in random_split's order. Membership matches the official code when the train rows are in the same
    order as its torchvision dataset (HF row order can differ; see README)."""
    from torch.utils.data import random_split

    n_val = int(n_train * fraction)
    if max_samples is not None:
        n_val = min(n_val, int(max_samples))
    if n_train > 0 and not 0 < n_val < n_train:
        raise ConfigError(f"cannot carve a validation split of {n_val} from {n_train} training samples "
                          f"(fraction {fraction}); the train split is too small")
    rest, val = random_split(range(n_train), [n_train - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return np.asarray(rest.indices, dtype=np.int64), np.asarray(val.indices, dtype=np.int64)


def hub_offline() -> bool:
    """True when the HF hub must not be contacted (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_split(task: TaskSpec, split: str, *, mini_dirs: dict[str, Path] | None = None,
               local_dirs: dict[str, str] | None = None, cache_dir: str | None = None):
    """A task's split as a HF `datasets.Dataset` with columns image / label.

    `split` is "train", "validation" or "test"; the task's own names are resolved here (e.g. Food101's test split is
    called "validation"). Validation without a dedicated split is carved from train (see `carve_validation`), and
    "train" then excludes the carved samples. A real task is read from a local directory when `local_dirs` (or
    `mini_dirs`) names one for it (`save_to_disk` output or an image folder), else from the HF hub / its cache.
    """
    import datasets

    if task.source == "mini":
        mini_dirs = {**(local_dirs or {}), **(mini_dirs or {})}
        if task.name not in mini_dirs:
            raise ConfigError(f"mini task {task.name!r} has not been generated; run with endpoints=mini")
        dd = datasets.load_from_disk(str(mini_dirs[task.name]))
        return dd[split]
    local = (local_dirs or {}).get(task.name) or (mini_dirs or {}).get(task.name)
    if split == "test":
        real_split = task.test_split
    elif task.val_split is not None:
        real_split = "train" if split == "train" else task.val_split
    else:
        real_split = "train"
    if local:
        path = Path(local)
        if not path.exists():
            raise ConfigError(f"local dataset directory for task {task.name!r} does not exist: {path}")
        if (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))[real_split]
        elif (path / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=real_split)
    else:
        if task.hf_dataset is None:
            raise ConfigError(f"task {task.name!r} has no HF dataset id; give a local copy with data.local_dirs.{task.name}=<dir>")
        try:
            ds = datasets.load_dataset(task.hf_dataset, task.hf_config, split=real_split, cache_dir=cache_dir)
        except (ConnectionError, FileNotFoundError, ValueError) as e:
            if not hub_offline():
                raise
            raise ConfigError(f"dataset {task.hf_dataset} ({task.name}, split {real_split}) is not in the HF datasets "
                              f"cache and the run is offline ({type(e).__name__}); run `mass-exp-prefetch` with the same "
                              "overrides on a machine with network") from None
    if task.image_column != "image":
        ds = ds.rename_column(task.image_column, "image")
    if task.label_column != "label":
        ds = ds.rename_column(task.label_column, "label")
    if split in ("train", "validation") and task.val_split is None:
        try:
            rest, val = carve_validation(len(ds), task.val_fraction, task.val_max_samples, task.val_seed)
        except ConfigError as e:
            raise ConfigError(f"task {task.name}: {e}") from None
        ds = ds.select(val if split == "validation" else rest)
    return ds


IN_MEMORY_BYTES = 1 << 30


class ImageClassificationDataset(Dataset):
    """(image tensor, label) pairs from a HF dataset through the backbone's transform.

    Small datasets (the mini suite) are decoded and transformed once and kept in memory, so fine-tuning epochs and
    repeated evaluations do not pay for PNG decoding again.
    """

    def __init__(self, hf_dataset: Any, transform: Callable, limit: int | None = None, in_memory: bool | None = None,
                 label_map: Sequence[int] | None = None):
        self.label_map = None if label_map is None else torch.as_tensor(list(label_map), dtype=torch.long)
        if limit is not None and limit < len(hf_dataset):
            hf_dataset = hf_dataset.select(range(limit))
        self.ds = hf_dataset
        self.transform = transform
        if in_memory is None:  # keep decoded tensors only when they are small (the mini suite: 32x32 images)
            in_memory = len(hf_dataset) > 0 and len(hf_dataset) * transform(hf_dataset[0]["image"].convert("RGB")).numel() * 4 <= IN_MEMORY_BYTES
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        if in_memory:
            cols = hf_dataset[:]
            self._images = torch.stack([transform(im.convert("RGB")) for im in cols["image"]])
            self._labels = self._map(torch.as_tensor(cols["label"], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._images is not None:
            return self._images[i], int(self._labels[i])
        row = self.ds[int(i)]
        return self.transform(row["image"].convert("RGB")), int(self._map(torch.tensor(int(row["label"]))))

    def _map(self, labels: torch.Tensor) -> torch.Tensor:
        return labels if self.label_map is None else self.label_map[labels]


def task_dataset(task: TaskSpec, hf_dataset: Any, backbone_transform: Callable, limit: int | None = None
                 ) -> ImageClassificationDataset:
    """A task's split as model inputs: the backbone transform with the task's preprocessing steps, and labels mapped
    onto head rows (`task.label_map`)."""
    from mass_exp.data.preprocess import task_transform

    return ImageClassificationDataset(hf_dataset, task_transform(backbone_transform, task.preprocess, task.name),
                                      limit=limit, label_map=task.label_map)

