#!/usr/bin/env python
"""What `endpoints.build_workers` buys: fine-tuning steps per second of one process on all threads against that
many one-thread processes side by side, on the mini endpoints' shapes.

Each process runs the mini fine-tune's step (the tiny CLIP's image tower, attention-only trainable as in the default
recipe, AdamW, cross-entropy against a frozen head) on random 32x32 images. Both ways run in the same invocation, so
their ratio holds on a machine whose speed drifts.

    python scripts/bench_build_workers.py                        # the default tower, batch 64, all threads
    python scripts/bench_build_workers.py --threads 2 --steps 40 --trainable all --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _steps(arch: str, trainable: str, batch: int, steps: int, threads: int, warmup: int = 3) -> float:
    """Seconds per step of the mini fine-tune's step, after `warmup` steps, on `threads` intra-op threads."""
    import torch
    import torch.nn.functional as F

    from mass_exp.endpoints.mini import TRAINABLE
    from mass_exp.finetune.modules import FinetuneModule
    from mass_exp.models.clip import create_clip

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _, _ = create_clip(arch, None)
    visual = model.visual.train()
    for name, p in visual.named_parameters():
        p.requires_grad_(TRAINABLE[trainable](name))
    # the fine-tune's own module: logits against a frozen head, its optimizer (AdamW at the recipe's lr)
    head = 100 * F.normalize(torch.randn(5, model.text_projection.shape[1]), dim=-1)
    module = FinetuneModule(visual, head, lr=3e-5, weight_decay=0.0, warmup_steps=0, max_steps=warmup + steps)
    opt = module.configure_optimizers()["optimizer"]
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 5, (batch,))

    def step() -> None:
        loss = F.cross_entropy(module.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def _worker(args: tuple) -> float:
    return _steps(*args)


def main(argv: list[str] | None = None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mass-tiny-ViT-w256-d4")
    parser.add_argument("--trainable", default="attention", choices=["all", "attention", "attention_mlp_in"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of the one process, and the number of one-thread processes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    n = args.threads
    job = (args.arch, args.trainable, args.batch, args.steps)
    one = _steps(*job, threads=n)
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        side = pool.map(_worker, [(*job, 1)] * n)
    out = {
        "arch": args.arch, "trainable": args.trainable, "batch": args.batch, "threads": n,
        "one_process_s_per_step": one, "side_by_side_s_per_step": side,
        "one_process_steps_per_s": 1 / one, "side_by_side_steps_per_s": sum(1 / s for s in side),
    }
    out["speedup"] = out["side_by_side_steps_per_s"] / out["one_process_steps_per_s"]
    print(f"{args.arch}, trainable={args.trainable}, batch {args.batch}, {args.steps} steps")
    print(f"  one process, {n} threads:          {one:.3f} s/step = {1 / one:.2f} steps/s")
    print(f"  {n} processes, 1 thread each:       {', '.join(f'{s:.3f}' for s in side)} s/step = "
          f"{out['side_by_side_steps_per_s']:.2f} steps/s")
    print(f"  side by side / one process: {out['speedup']:.2f}x the steps per second")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
