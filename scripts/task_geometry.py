#!/usr/bin/env python
"""How far a suite's endpoints are from the regime where merging works: task-vector geometry and disentanglement.

Takes the same overrides as `mass-exp` (default: the offline mini benchmark) and, for the composed suite's
endpoints, prints
- the pairwise cosine similarity of the task vectors tau_t = theta_t - theta_pre (all image-tower parameters);
- ||tau_t|| / ||theta_pre||;
- for every pair of tasks, the 2-task TSV-M merge (alpha = 1, from the suite's factor store, as MASS builds its
  experts) evaluated on both tasks' test sets, as mean normalized accuracy (reference: each endpoint on its task);
- for every pair, the weight-disentanglement error (Ortiz-Jimenez et al., 2023): how often
  f(theta_pre + tau_a + tau_b) disagrees with f(theta_pre + tau_a) on task a's test images (task a's head),
  averaged over both directions.

    python scripts/task_geometry.py                                # the mini benchmark
    python scripts/task_geometry.py suite=8 endpoints=tall_masks backbone=ViT-B-32 --json geometry.json
    python scripts/task_geometry.py eval.max_samples_per_task=200  # fewer test images per task

`--json FILE` writes {"tasks", "cosine", "norm_ratio", "pair_tsv_m_normalized", "mean_pair_tsv_m_normalized",
"mean_abs_cosine", "disentanglement_error"}; accuracies and error rates in percent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("task_geometry")

Tensors = Mapping[str, torch.Tensor]
# what --json writes (issue #12); accuracies and the disentanglement error in percent
JSON_KEYS = ("tasks", "cosine", "norm_ratio", "pair_tsv_m_normalized", "mean_pair_tsv_m_normalized",
             "mean_abs_cosine", "disentanglement_error")


def flat_task_vector(pretrained: Tensors, finetuned: Tensors) -> torch.Tensor:
    """tau over every floating-point parameter of the tower, flattened in the pretrained state dict's order."""
    return torch.cat([(finetuned[k].float() - pretrained[k].float()).flatten()
                      for k in pretrained if pretrained[k].is_floating_point()])


def flat_norm(sd: Tensors) -> float:
    return float(torch.sqrt(sum((v.float() ** 2).sum() for v in sd.values() if v.is_floating_point())))


def add_vectors(pretrained: Tensors, finetuned: Sequence[Tensors]) -> dict[str, torch.Tensor]:
    """theta_pre + sum_t tau_t (plain task arithmetic at alpha = 1)."""
    out = {}
    for k, pre in pretrained.items():
        if not pre.is_floating_point():
            out[k] = pre
            continue
        acc = pre.float().clone()
        for ft in finetuned:
            acc += ft[k].float() - pre.float()
        out[k] = acc.to(pre.dtype)
    return out


@torch.no_grad()
def predict(visual: torch.nn.Module, state: Tensors, head: torch.Tensor, images: torch.Tensor,
            batch_size: int = 512) -> torch.Tensor:
    """Class predictions of the image tower `visual` loaded with `state`, scored with a (C, E) zero-shot head."""
    visual.load_state_dict(state)
    visual.eval()
    preds = []
    for i in range(0, len(images), batch_size):
        z = torch.nn.functional.normalize(visual(images[i : i + batch_size]).float(), dim=-1)
        preds.append((z @ head.T.float()).argmax(-1))
    return torch.cat(preds)


def task_geometry(names: Sequence[str], pretrained: Tensors, finetuned: Sequence[Tensors], factors,
                  visual: torch.nn.Module, heads: Sequence[torch.Tensor],
                  tests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Every figure of the table for tasks `names` (endpoints, heads and (images, labels) test sets in that order).

    `factors`: the suite's FactorStore (2-task TSV-M from it); None skips the pair merges.
    """
    from mass_exp.merging.tsv import tsv_merge_from_factors

    n = len(names)
    taus = [flat_task_vector(pretrained, ft) for ft in finetuned]
    pre_norm = flat_norm(pretrained)
    unit = [t.double() / t.double().norm().clamp_min(1e-12) for t in taus]  # float64: 1M-term dot products
    cosine = [[float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    pairs = list(itertools.combinations(range(n), 2))
    mean_abs_cos = sum(abs(cosine[i][j]) for i, j in pairs) / max(1, len(pairs))

    ft_pred = [predict(visual, finetuned[t], heads[t], tests[t][0]) for t in range(n)]
    ft_acc = [float((ft_pred[t] == tests[t][1]).float().mean()) for t in range(n)]

    pair_norm, dis_err = {}, {}
    for a, b in pairs:
        key = f"{names[a]}+{names[b]}"
        both = add_vectors(pretrained, [finetuned[a], finetuned[b]])
        errs = []
        for x, y in ((a, b), (b, a)):  # f(pre + tau_x + tau_y) vs f(pre + tau_x) on task x's images
            errs.append(float((predict(visual, both, heads[x], tests[x][0]) != ft_pred[x]).float().mean()))
        dis_err[key] = 100 * sum(errs) / 2
        if factors is not None:
            merged = tsv_merge_from_factors(pretrained, factors, [a, b], alpha=1.0)
            norms = []
            for t in (a, b):
                acc = float((predict(visual, merged, heads[t], tests[t][0]) == tests[t][1]).float().mean())
                norms.append(100 * acc / max(ft_acc[t], 1e-12))
            pair_norm[key] = sum(norms) / 2
    out = {
        "tasks": list(names),
        "cosine": cosine,
        "norm_ratio": {names[t]: float(taus[t].norm()) / pre_norm for t in range(n)},
        "pair_tsv_m_normalized": pair_norm,
        "mean_pair_tsv_m_normalized": sum(pair_norm.values()) / len(pair_norm) if pair_norm else None,
        "mean_abs_cosine": mean_abs_cos,
        "disentanglement_error": dis_err,
        "mean_disentanglement_error": sum(dis_err.values()) / max(1, len(dis_err)),
        "finetuned_acc": {names[t]: 100 * ft_acc[t] for t in range(n)},
    }
    return out


def format_geometry(g: Mapping) -> str:
    names = g["tasks"]
    w = max(10, max(len(n) for n in names) + 1)
    lines = ["pairwise cosine of task vectors", " " * w + "".join(f"{n[:w - 1]:>{w}}" for n in names)]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w}}" + "".join(f"{c:>{w}.3f}" for c in g["cosine"][i]))
    lines.append("")
    lines.append(f"{'task':<{w}}{'|tau|/|pre|':>12}{'ft acc':>9}")
    for n in names:
        lines.append(f"{n:<{w}}{g['norm_ratio'][n]:>12.4f}{g['finetuned_acc'][n]:>9.1f}")
    lines.append("")
    lines.append(f"{'pair':<{2 * w}}{'TSV-M(a=1) norm':>16}{'disent. err %':>15}")
    for key, err in g["disentanglement_error"].items():
        norm = g["pair_tsv_m_normalized"].get(key)
        lines.append(f"{key:<{2 * w}}{'-' if norm is None else f'{norm:.1f}':>16}{err:>15.1f}")
    mean_norm = g["mean_pair_tsv_m_normalized"]
    lines.append(f"{'mean':<{2 * w}}{'-' if mean_norm is None else f'{mean_norm:.1f}':>16}"
                 f"{g['mean_disentanglement_error']:>15.1f}")
    lines.append(f"mean |cosine| over pairs: {g['mean_abs_cosine']:.4f}")
    return "\n".join(lines)


def load_test_tensors(cfg, assets, split: str = "test") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each task's split as (images, labels) tensors, capped at eval.max_samples_per_task."""
    from mass_exp.pipeline import make_loaders

    out = []
    for loader in make_loaders(cfg, assets, split):
        xs, ys = zip(*loader)
        out.append((torch.cat(xs), torch.cat(ys)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="mass-exp overrides (key=value)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")

    from hydra import compose, initialize_config_dir

    from mass_exp.assets import prepare_assets
    from mass_exp.cli import _config_dir, _quiet_third_party
    from mass_exp.errors import ConfigError
    from mass_exp.merging.task_vectors import LazyStateDict
    from mass_exp.pipeline import _fresh_visual, factor_store
    from mass_exp.utils.io import atomic_write_json

    _quiet_third_party()
    try:
        with initialize_config_dir(config_dir=_config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(args.overrides) + ["method=tsv_m", "router=none"])
        if len(cfg.suite.tasks) < 2:
            raise ConfigError(f"task_geometry needs a suite of at least 2 tasks; suite.tasks={list(cfg.suite.tasks)}")
        t0 = time.time()
        assets = prepare_assets(cfg, splits=("test",))
        names = [t.name for t in assets.tasks]
        pretrained = LazyStateDict(assets.pretrained_visual_file)
        pre = {k: pretrained[k] for k in pretrained}
        finetuned = [{k: v for k, v in LazyStateDict(p).items()} for p in assets.endpoint_files]
        factors = factor_store(cfg, assets)
        tests = load_test_tensors(cfg, assets)
        g = task_geometry(names, pre, finetuned, factors, _fresh_visual(assets), [assets.heads[n] for n in names], tests)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_geometry(g))
    log.info("task geometry of %d tasks in %.1fs", len(names), time.time() - t0)
    if args.json is not None:
        atomic_write_json(args.json, {k: g[k] for k in JSON_KEYS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
