#!/usr/bin/env python
"""Benchmark the mergers on synthetic endpoints with real CLIP image-tower shapes.

Writes a random pretrained tower and T endpoints (pretrained + low-rank-plus-noise deltas) as safetensors files in
a temp dir, then runs each merger in its own subprocess (so peaks are isolated) and prints wall time for the factor
store (build or cache load) and for the merge, and the peak RSS (``ru_maxrss``) of that process.

    python scripts/bench_merge.py --backbone ViT-B-32 --tasks 8 --svd exact
    python scripts/bench_merge.py --backbone ViT-L-14 --tasks 20 --svd randomized --methods tsv_m mass_pass2

The first factor-based method builds the factor store in its own process (so its peak covers factors + merge);
later ones load it from the cache. ``mass_pass2`` times ``tsv_merge_from_factors`` on task subsets of size 1-3.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mass_exp.merging import (  # noqa: E402
    LazyStateDict,
    available_mergers,
    get_merger,
    load_or_build_factor_store,
    tsv_merge_from_factors,
)
from mass_exp.merging.task_vectors import StreamingSafetensorsWriter  # noqa: E402

# width, layers, patch, tokens (incl. CLS), output dim
BACKBONES = {
    "ViT-B-32": (768, 12, 32, 50, 512),
    "ViT-B-16": (768, 12, 16, 197, 512),
    "ViT-L-14": (1024, 24, 14, 257, 768),
}


def tower_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """Shapes of open_clip's ``model.visual.state_dict()`` in its order."""
    w, layers, patch, tokens, out = BACKBONES[backbone]
    shapes: dict[str, tuple[int, ...]] = {
        "class_embedding": (w,),
        "positional_embedding": (tokens, w),
        "proj": (w, out),
        "conv1.weight": (w, 3, patch, patch),
        "ln_pre.weight": (w,),
        "ln_pre.bias": (w,),
    }
    for b in range(layers):
        p = f"transformer.resblocks.{b}."
        shapes |= {
            p + "ln_1.weight": (w,),
            p + "ln_1.bias": (w,),
            p + "attn.in_proj_weight": (3 * w, w),
            p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w),
            p + "attn.out_proj.bias": (w,),
            p + "ln_2.weight": (w,),
            p + "ln_2.bias": (w,),
            p + "mlp.c_fc.weight": (4 * w, w),
            p + "mlp.c_fc.bias": (4 * w,),
            p + "mlp.c_proj.weight": (w, 4 * w),
            p + "mlp.c_proj.bias": (w,),
        }
    shapes |= {"ln_post.weight": (w,), "ln_post.bias": (w,)}
    return shapes


def _template(backbone: str):
    """A randomly initialised open_clip image tower of the backbone (SMILE copies it and loads the weights)."""
    import open_clip

    return open_clip.create_model(backbone, pretrained=None).visual.eval()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------ generation


def generate(workdir: Path, backbone: str, tasks: int, dtype: torch.dtype, lowrank: int, noise: float) -> None:
    """pretrained ~ N(0, 0.02²); τ_t = (A B)·scale + noise, A (m×r), B (r×n) Gaussian, per matrix; vectors: noise."""
    shapes = tower_shapes(backbone)
    entries = [(k, dtype, s) for k, s in shapes.items()]
    g = torch.Generator().manual_seed(0)
    pre = {k: (0.02 * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}
    with StreamingSafetensorsWriter(workdir / "pretrained.safetensors", entries) as w:
        for k in shapes:
            w.write(k, pre[k])
    for t in range(tasks):
        g = torch.Generator().manual_seed(1000 + t)
        with StreamingSafetensorsWriter(workdir / f"task{t:02d}.safetensors", entries) as w:
            for k, s in shapes.items():
                if len(s) == 2:
                    r = min(lowrank, *s)
                    d = (torch.randn(s[0], r, generator=g) @ torch.randn(r, s[1], generator=g)) * (1e-3 / math.sqrt(r))
                    d += noise * 1e-3 * torch.randn(s, generator=g)
                else:
                    d = 1e-3 * torch.randn(s, generator=g)
                w.write(k, (pre[k].float() + d).to(dtype))
        print(f"  wrote task{t:02d}.safetensors", flush=True)


# ------------------------------------------------------------------------------------------------ one measurement


def run_one(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: one method (or the factor store alone), returns the figures."""
    logging.basicConfig(level=logging.INFO, format="    [%(name)s] %(message)s", stream=sys.stderr)
    workdir = Path(args.workdir)
    pre_file = workdir / "pretrained.safetensors"
    ft_files = sorted(workdir.glob("task*.safetensors"))
    pre = LazyStateDict(pre_file)
    fts = [LazyStateDict(p) for p in ft_files]
    res: dict = {"method": args.one, "rss_start_mb": round(peak_rss_mb())}
    factors = None
    needs_factors = args.one in ("factors", "mass_pass2") or get_merger(args.one).uses_factors
    if needs_factors:
        t0 = time.perf_counter()
        cached = any((workdir / "cache").glob("factors-*.safetensors"))
        factors = load_or_build_factor_store(
            workdir / "cache", pre_file, ft_files, args.backbone, svd=args.svd, progress=False
        )
        res["factors_s"] = round(time.perf_counter() - t0, 2)
        res["factors_from_cache"] = cached
        res["factors_mb"] = round(factors.nbytes() / 2**20)
        if factors.info.get("svd_errors"):
            res["svd_errors"] = factors.info["svd_errors"]
    t0 = time.perf_counter()
    if args.one == "factors":
        pass
    elif args.one == "mass_pass2":
        times = {}
        for size in (1, 2, 3):
            subset = list(range(min(size, len(fts))))
            t1 = time.perf_counter()
            out = tsv_merge_from_factors(pre, factors, subset)  # type: ignore[arg-type]
            times[f"|omega|={len(subset)}"] = round(time.perf_counter() - t1, 2)
            del out
        res["pass2_s"] = times
    elif get_merger(args.one).builds_module:  # SMILE: a module, built over an open_clip tower of the same shapes
        from mass_exp.merging.smile import smile_visual

        template = _template(args.backbone)
        res["template_rss_mb"] = round(peak_rss_mb())
        t0 = time.perf_counter()
        stats: dict = {}
        gate_k, k, top_k = args.smile_config
        model = smile_visual(template, pre, fts, gate_k=gate_k, k=k, top_k=top_k, factors=factors, stats=stats)
        res["smile"] = {"gate_k": gate_k, "k": k, "top_k": top_k, "from_store": stats["from_store"],
                        "decomposed": stats["decomposed"], "experts_mb": round(stats["extra_bytes"] / 2**20)}
        del model
    else:
        spec = get_merger(args.one)
        kwargs: dict = {}
        if spec.per_task:
            kwargs["task"] = 0
        if spec.uses_factors:
            kwargs["factors"] = factors
        out = spec.fn(pre, fts, **kwargs)
        assert len(out) == len(pre)
        del out
    res["merge_s"] = round(time.perf_counter() - t0, 2)
    res["peak_rss_mb"] = round(peak_rss_mb())
    return res


# ------------------------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="ViT-B-32", choices=sorted(BACKBONES))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--svd", default="exact", choices=["exact", "randomized"])
    ap.add_argument("--methods", nargs="+", default=None, help="default: all registered mergers + mass_pass2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--lowrank", type=int, default=16, help="rank of the synthetic deltas' structured part")
    ap.add_argument("--noise", type=float, default=0.1, help="noise level relative to the low-rank part")
    ap.add_argument("--workdir", default=None, help="reuse/keep endpoints here (default: a temp dir, deleted)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the workers (0: torch default)")
    ap.add_argument("--smile-config", type=int, nargs=3, default=(16, 32, 2), metavar=("GATE_K", "K", "TOP_K"),
                    help="SMILE's gate rank, expert rank (-1: full) and experts per token (default: method=smile's)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.generate:
        generate(Path(args.workdir), args.backbone, args.tasks, getattr(torch, args.dtype), args.lowrank, args.noise)
        return
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    methods = args.methods or ["zeroshot", "finetuned", "weight_average", "task_arithmetic", "ties", "consensus",
                               "tsv_m", "tsv_c", "iso_c", "iso_cts", "mass_pass2", "smile"]
    for m in methods:
        if m not in ("factors", "mass_pass2") and m not in available_mergers():
            ap.error(f"unknown method {m!r}; valid: {available_mergers() + ['factors', 'mass_pass2']}")
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="bench_merge_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        n_existing = len(list(workdir.glob("task*.safetensors")))
        if not (workdir / "pretrained.safetensors").exists() or n_existing != args.tasks:
            for p in workdir.glob("*.safetensors"):
                p.unlink()
            shutil.rmtree(workdir / "cache", ignore_errors=True)
            print(f"generating {args.backbone} x {args.tasks} endpoints ({args.dtype}) in {workdir}", flush=True)
            t0 = time.perf_counter()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--generate", "--workdir", str(workdir),
                   "--backbone", args.backbone, "--tasks", str(args.tasks), "--dtype", args.dtype,
                   "--lowrank", str(args.lowrank), "--noise", str(args.noise)]
            subprocess.run(cmd, check=True, cwd=ROOT)
            size = sum(p.stat().st_size for p in workdir.glob("*.safetensors")) / 2**30
            print(f"generated in {time.perf_counter() - t0:.1f}s, {size:.2f} GiB on disk", flush=True)
        results = []
        for m in methods:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", m, "--workdir", str(workdir),
                   "--backbone", args.backbone, "--svd", args.svd,
                   "--smile-config", *[str(v) for v in args.smile_config]]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"running {m} ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            for line in proc.stderr.splitlines():
                if "factor store" in line or "randomized SVD" in line:
                    print(line, flush=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"  {m} FAILED (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            results.append(r)
            print(f"  {json.dumps(r)}", flush=True)
        print()
        print(f"== {args.backbone} x {args.tasks} tasks, svd={args.svd}, dtype={args.dtype}, "
              f"torch threads={torch.get_num_threads() if not args.threads else args.threads} ==")
        print(f"{'method':<16}{'factors_s':>10}{'cached':>8}{'merge_s':>9}{'peak_RSS_MB':>13}  notes")
        for r in results:
            notes = ""
            if "pass2_s" in r:
                notes = "pass2 " + ", ".join(f"{k}: {v}s" for k, v in r["pass2_s"].items())
            if "factors_mb" in r:
                notes += f" store {r['factors_mb']} MiB"
            if "smile" in r:
                sm = r["smile"]
                notes += (f" SMILE gate_k {sm['gate_k']} k {sm['k']} top_k {sm['top_k']}: {sm['from_store']} layers "
                          f"from the store, {sm['decomposed']} decomposed, experts {sm['experts_mb']} MiB "
                          f"(template tower RSS {r['template_rss_mb']} MB)")
            fs = f"{r['factors_s']:.2f}" if "factors_s" in r else "-"
            cached = ("yes" if r.get("factors_from_cache") else "no") if "factors_s" in r else "-"
            print(f"{r['method']:<16}{fs:>10}{cached:>8}{r['merge_s']:>9.2f}{r['peak_rss_mb']:>13}  {notes}")
        errs = next((r["svd_errors"] for r in results if r.get("svd_errors")), None)
        if errs:
            print("randomized SVD vs exact rank-k truncation (task 0, sampled matrices):")
            for e in errs:
                print(f"  {e['name']:<42} k={e['k']:<4} rel.err={e['rel_error']:.2e} "
                      f"max sv err/s1={e['sv_rel_error']:.2e} excess residual={e['excess_residual']:.2e}")
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
