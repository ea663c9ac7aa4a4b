"""Zero-shot classification heads from the pretrained text tower (spec, "Heads and metrics")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from mass_exp.data.tasks import TaskSpec
from mass_exp.utils.io import load_tensors, save_tensors, stable_hash

log = logging.getLogger(__name__)


@torch.no_grad()
def build_zeroshot_head(model: torch.nn.Module, tokenizer: Callable, task: TaskSpec, device: str | torch.device = "cpu",
                        batch_size: int = 256) -> torch.Tensor:
    """(C, E) head: per class, the re-normalised mean of the L2-normalised template embeddings, times exp(logit_scale).

    A class given as a synonym list enters each template as `task.synonyms` says (TALL-masks: Python's str of the
    list, one prompt per template, no averaging over synonyms).

    Image embeddings are L2-normalised before the head, so logits = head @ z.
    """
    rows = []
    for cls in task.classnames:
        tokens = tokenizer(task.prompts(cls)).to(device)
        emb = torch.cat([model.encode_text(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)])
        emb = torch.nn.functional.normalize(emb.float(), dim=-1).mean(0)
        rows.append(torch.nn.functional.normalize(emb, dim=-1))
    scale = model.logit_scale.exp().float().cpu()
    return torch.stack(rows).cpu() * scale


def heads_cache_key(backbone: str, weights_id: str, task: TaskSpec) -> str:
    """Key of a cached head: backbone, the exact pretrained weights, and everything of the task that makes or uses
    the head: class names (synonym lists included), templates, synonym handling, label map and preprocessing."""
    return stable_hash({"backbone": backbone, "weights": weights_id,
                        "classnames": [list(c) if isinstance(c, tuple) else c for c in task.classnames],
                        "templates": list(task.templates), "synonyms": task.synonyms,
                        "label_map": None if task.label_map is None else list(task.label_map),
                        "preprocess": list(task.preprocess)})


def load_or_build_heads(model: torch.nn.Module, tokenizer: Callable, tasks: Sequence[TaskSpec], *, backbone: str,
                        weights_id: str, cache_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Heads for every task, built once with the text tower and cached on disk."""
    heads = {}
    model = model.to(device)
    for task in tqdm(tasks, desc="zero-shot heads", leave=False):
        path = Path(cache_dir) / f"{backbone}-{task.name}-{heads_cache_key(backbone, weights_id, task)}.safetensors"
        if path.exists():
            heads[task.name] = load_tensors(path)["head"]
            continue
        head = build_zeroshot_head(model, tokenizer, task, device)
        save_tensors(path, {"head": head})
        heads[task.name] = head
    return heads
