#!/usr/bin/env python
"""What the mini endpoints' recipe levers cost: seconds per pretraining step (tiny CLIP, both towers, with or without
patch dropout) and per fine-tuning step (image tower, ordinary or linearised), for each architecture asked for.

Every variant runs the project's own step: the pretraining module's multi-positive CLIP loss and AdamW, with
`endpoints.pretrain.patch_dropout` applied as pretraining applies it; the fine-tuning module's logits against a frozen
head and AdamW, the tower wrapped in `LinearizedModel` for `linearized`. Random batches of the default shapes.
The variants take turns over several rounds and each reports its median, so their ratios hold on a machine whose
speed drifts.

    python scripts/bench_recipe_cost.py                       # the default levers, all threads
    python scripts/bench_recipe_cost.py --pretrain mass-tiny-ViT-w256-d4:0 mass-tiny-ViT-w256-d4:0.5 \\
        --finetune mass-tiny-ViT-w256-d4:plain mass-tiny-ViT-w256-d4:linearized --rounds 5 --json cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = "mass-tiny-ViT-w256-d4"


def _pretrain_step(arch: str, prob: float, batch: int) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    from mass_exp.endpoints.mini import patch_dropout
    from mass_exp.finetune.modules import ContrastivePretrainModule, multi_positive_clip_loss
    from mass_exp.models.clip import create_clip

    torch.manual_seed(0)
    model = create_clip(arch, None)[0].train()
    module = ContrastivePretrainModule(model, lr=5e-4, weight_decay=0.1, warmup_steps=0, max_steps=10**6)
    opt = module.configure_optimizers()["optimizer"]
    images, tokens = torch.randn(batch, 3, 32, 32), torch.randint(1, 1000, (batch, model.context_length))
    labels = torch.randint(0, 30, (batch,))

    def step() -> None:
        with patch_dropout(model, prob):  # as pretraining applies it
            img = F.normalize(model.encode_image(images), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            loss = multi_positive_clip_loss(img, txt, labels, model.logit_scale.exp())
            opt.zero_grad()
            loss.backward()
            opt.step()

    return step


def _finetune_step(arch: str, mode: str, batch: int) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    from mass_exp.endpoints.mini import TRAINABLE
    from mass_exp.finetune.linearized import LinearizedModel
    from mass_exp.finetune.modules import FinetuneModule
    from mass_exp.models.clip import create_clip

    torch.manual_seed(0)
    model = create_clip(arch, None)[0]
    visual = model.visual.train()
    if mode == "linearized":
        trained = LinearizedModel(visual, TRAINABLE["attention"])
    else:
        trained = visual
        for name, p in visual.named_parameters():
            p.requires_grad_(TRAINABLE["attention"](name))
    head = 100 * F.normalize(torch.randn(5, model.text_projection.shape[1]), dim=-1)
    module = FinetuneModule(trained, head, lr=3e-5, weight_decay=0.0, warmup_steps=0, max_steps=10**6)
    opt = module.configure_optimizers()["optimizer"]
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 5, (batch,))

    def step() -> None:
        loss = F.cross_entropy(module.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _time(step: Callable[[], None], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", nargs="*", default=[f"{DEFAULT}:0", f"{DEFAULT}:0.5"],
                        help="ARCH:PATCH_DROPOUT pretraining variants; the first is the reference")
    parser.add_argument("--finetune", nargs="*", default=[f"{DEFAULT}:plain", f"{DEFAULT}:linearized"],
                        help="ARCH:plain|linearized fine-tuning variants (attention-only); the first is the reference")
    parser.add_argument("--pretrain-batch", type=int, default=256)
    parser.add_argument("--finetune-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pretrain, finetune = [], []
    for spec in args.pretrain:
        arch, _, prob = spec.rpartition(":")
        try:
            ok = bool(arch) and 0 <= float(prob) < 1
        except ValueError:
            ok = False
        if not ok:
            parser.error(f"--pretrain {spec!r}: give ARCH:PATCH_DROPOUT with 0 <= PATCH_DROPOUT < 1")
        pretrain.append((arch, float(prob)))
    for spec in args.finetune:
        arch, _, mode = spec.rpartition(":")
        if not arch or mode not in ("plain", "linearized"):
            parser.error(f"--finetune {spec!r}: give ARCH:plain or ARCH:linearized")
        finetune.append((arch, mode))

    variants: dict[str, tuple[str, Callable[[], None]]] = {}
    for arch, prob in pretrain:
        variants[f"pretrain {arch} patch_dropout={prob:g}"] = ("pretrain", _pretrain_step(arch, prob, args.pretrain_batch))
    for arch, mode in finetune:
        variants[f"finetune {arch} {mode}"] = ("finetune", _finetune_step(arch, mode, args.finetune_batch))

    for _, step in variants.values():  # warm-up: allocator, thread pools, first-call dispatch
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (_, step) in variants.items():
            times[name].append(_time(step, args.steps))

    out: dict = {"threads": args.threads, "steps": args.steps, "rounds": args.rounds,
                 "pretrain_batch": args.pretrain_batch, "finetune_batch": args.finetune_batch, "variants": {}}
    reference: dict[str, float] = {}
    print(f"{args.threads} threads, {args.rounds} rounds of {args.steps} steps, median s/step "
          f"(pretraining batch {args.pretrain_batch}, fine-tuning batch {args.finetune_batch})")
    for name, (stage, _) in variants.items():
        median = statistics.median(times[name])
        reference.setdefault(stage, median)
        speedup = reference[stage] / median
        out["variants"][name] = {"stage": stage, "s_per_step": median, "rounds_s_per_step": times[name],
                                 "speedup_vs_first": speedup}
        print(f"  {name:<58} {median:.3f} s/step  {speedup:.2f}x the first {stage} variant")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
