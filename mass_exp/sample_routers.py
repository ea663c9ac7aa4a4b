"""Pipeline stage for the routers that need a few labelled samples per task (the MASS paper's router ablation):
`nearest_neighbour` (stored embeddings) and `mlp` (a trained network). Reads training images (never test images),
embeds them with the first-pass model, and builds (and for `mlp` trains, with Lightning) the router. The trained
router is cached by a hash of everything that determines it.

What the paper's code uses, and what this does (recorded in results.json under `router.samples`):
- split: the tasks' *train* split (the official NN router takes one shuffled training batch per task; the MLP router
  trains on the union of the train splits). Here `router.split` (default train; `test` is refused); for tasks whose
  validation split is carved from train, "train" excludes the carved samples.
- samples: NN 32 per task (one batch of size 32); MLP all of them (epochs of at most 400·T batches of 32).
- features: the first-pass model's image embedding (the TSV-M merge of all tasks; `router.first_pass=zeroshot`
  gives the pretrained one), NN L2-normalised.
- deviation: the official code draws the samples through open_clip's *training* transform (random crops) and the MLP
  sees fresh augmentations every step; here every sample is embedded once through the evaluation transform.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mass_exp.errors import ConfigError
from mass_exp.routing.config import SAMPLE_ROUTERS
from mass_exp.utils.io import atomic_path, stable_hash

log = logging.getLogger(__name__)

FORMAT = "mass-exp-router/1"


def _device(cfg: DictConfig) -> torch.device:
    want = str(cfg.trainer.accelerator)
    return torch.device("cuda" if want in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")


def embedding_fn(visual: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's image embedding (unnormalised), the features these routers read."""

    def features(images: torch.Tensor) -> torch.Tensor:
        out = visual(images)
        return (out[0] if isinstance(out, tuple) else out).float()

    return features


def sample_indices(n: int, per_task: int | None, seed: int) -> np.ndarray:
    """A seeded random subset (all of them, shuffled, when per_task is None)."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm if per_task is None else perm[: min(int(per_task), n)]


@torch.no_grad()
def embed_samples(cfg: DictConfig, assets: Any, visual: nn.Module, split: str, per_task: int | None,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(embeddings (N, E), task index (N,), samples per task) of `per_task` samples of each task's `split`."""
    from mass_exp.data.datasets import ImageClassificationDataset, load_split

    if split == "test":
        raise ConfigError("router.split=test: the routers must never see test images; use train or validation")
    device = _device(cfg)
    visual = visual.to(device).eval()
    feats, labels, counts = [], [], []
    for t, task in enumerate(assets.tasks):
        hf = load_split(task, split, local_dirs=assets.data_dirs, cache_dir=cfg.paths.hf_cache_dir)
        idx = sample_indices(len(hf), per_task, seed + t)
        ds = ImageClassificationDataset(hf.select(idx.tolist()), assets.preprocess)
        loader = DataLoader(ds, batch_size=int(cfg.eval.batch_size), num_workers=int(cfg.eval.num_workers))
        n0 = sum(len(f) for f in feats)
        for images, _ in loader:
            feats.append(embedding_fn(visual)(images.to(device)).cpu())
        counts.append(sum(len(f) for f in feats) - n0)
        labels.append(torch.full((counts[-1],), t, dtype=torch.long))
        log.info("router samples: %d %s images of %s embedded", counts[-1], split, task.name)
    return torch.cat(feats), torch.cat(labels), counts


def _cache_key(cfg: DictConfig, assets: Any, kind: str, recipe: dict) -> str:
    m = OmegaConf.to_container(cfg.method, resolve=True)
    return stable_hash({"format": FORMAT, "kind": kind, "endpoints": assets.endpoints_id, "weights": assets.weights_id,
                        "tasks": [t.name for t in assets.tasks], "method": m, "first_pass": cfg.router.first_pass,
                        "redundancy_eps": cfg.router.get("redundancy_eps"), "data": {k: str(v) for k, v in
                                                                                     sorted(assets.data_dirs.items())},
                        "recipe": recipe})


def build_nearest_neighbour(cfg: DictConfig, assets: Any, first: nn.Module, router_cfg: Any):
    from mass_exp.routing.nearest_neighbour import NearestNeighbourRouter

    r = cfg.router
    per_task = int(r.samples_per_task)
    x, y, counts = embed_samples(cfg, assets, first, str(r.split), per_task, int(r.sample_seed))
    if min(counts) == 0:
        raise ConfigError(f"router=nearest_neighbour: a task has no {r.split} samples")
    n = min(counts)
    bank = torch.stack([x[y == t][:n] for t in range(len(assets.tasks))])
    info = {"split": str(r.split), "samples_per_task": n, "features": "first-pass image embedding (L2-normalised)",
            "distance": "min euclidean distance to the task's stored embeddings", "mode": router_cfg.mode,
            "seed": int(r.sample_seed), "transform": "evaluation transform"}
    return NearestNeighbourRouter(bank, router_cfg), info


def build_mlp(cfg: DictConfig, assets: Any, first: nn.Module, router_cfg: Any):
    from mass_exp.finetune.router import RouterTrainingModule
    from mass_exp.routing.mlp import MLPRouter, router_mlp
    from mass_exp.utils.io import load_tensors, save_tensors

    r = cfg.router
    tr = OmegaConf.to_container(r.train, resolve=True)
    per_task = None if r.samples_per_task is None else int(r.samples_per_task)
    recipe = {"split": str(r.split), "samples_per_task": per_task, "seed": int(r.sample_seed),
              "hidden_dim": int(r.hidden_dim), "dropout": float(r.dropout), "train": tr, "trainer_seed": int(cfg.seed)}
    key = _cache_key(cfg, assets, "mlp", recipe)
    path = __import__("pathlib").Path(cfg.paths.cache_dir) / "routers" / f"mlp-{key}.safetensors"
    num_tasks = len(assets.tasks)
    info = {"split": str(r.split), "samples_per_task": per_task if per_task is not None else "all",
            "features": "first-pass image embedding", "network": f"MLP E-{r.hidden_dim}-{r.hidden_dim}-T, ReLU, "
            f"dropout {r.dropout}", "train": tr, "mode": router_cfg.mode, "transform": "evaluation transform",
            "cache": str(path)}
    if path.exists():
        sd = load_tensors(path)
        embed_dim = int(sd["0.weight"].shape[1])
        mlp = router_mlp(embed_dim, num_tasks, int(r.hidden_dim), float(r.dropout))
        mlp.load_state_dict(sd)
        log.info("router=mlp: trained router loaded from %s", path)
        info["cached"] = True
        return MLPRouter(mlp, router_cfg), info
    t0 = time.time()
    x, y, counts = embed_samples(cfg, assets, first, str(r.split), per_task, int(r.sample_seed))
    torch.manual_seed(int(cfg.seed))
    mlp = router_mlp(int(x.shape[1]), num_tasks, int(r.hidden_dim), float(r.dropout))
    module = RouterTrainingModule(mlp, lr=tr["lr"], weight_decay=tr["weight_decay"], t_max=tr["t_max"])
    bs = int(tr["batch_size"])
    loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True,
                        generator=torch.Generator().manual_seed(int(cfg.seed)))
    limit = min(len(loader), int(tr["batches_per_task"]) * num_tasks)
    trainer = L.Trainer(accelerator="gpu" if _device(cfg).type == "cuda" else "cpu", devices=1,
                        max_epochs=int(tr["max_epochs"]), limit_train_batches=limit,
                        gradient_clip_val=float(tr["gradient_clip_val"]), logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=bool(cfg.trainer.enable_progress_bar))
    threads = torch.get_num_threads()
    if _device(cfg).type == "cpu":  # a tiny MLP: one thread avoids OpenMP oversubscription on a shared CPU
        torch.set_num_threads(1)
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        torch.set_num_threads(threads)
    best = module.best_mlp()
    with torch.no_grad():
        acc = float((best(x).argmax(-1) == y).float().mean())
    save_tensors(path, best.state_dict(), metadata={"format": FORMAT, "key": key})
    info.update({"cached": False, "samples": int(len(y)), "samples_by_task": counts, "batches_per_epoch": limit,
                 "best_train_loss": module.best_loss, "train_task_acc": acc, "train_seconds": time.time() - t0,
                 "epochs_run": len(module.history)})
    log.info("router=mlp trained on %d samples in %.1fs: loss %.4f, training task accuracy %.2f%%; cached at %s",
             len(y), time.time() - t0, module.best_loss, 100 * acc, path)
    return MLPRouter(best, router_cfg), info


def build_sample_router(cfg: DictConfig, assets: Any, first: nn.Module, router_cfg: Any):
    """(router, features callable, info for results.json) for router=nearest_neighbour / mlp."""
    name = cfg.router.name
    if name == "nearest_neighbour":
        router, info = build_nearest_neighbour(cfg, assets, first, router_cfg)
    elif name == "mlp":
        router, info = build_mlp(cfg, assets, first, router_cfg)
    else:
        raise ConfigError(f"router={name} is not a sample-based router ({', '.join(SAMPLE_ROUTERS)})")
    return router, embedding_fn(first), info
