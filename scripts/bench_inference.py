#!/usr/bin/env python
"""Benchmark MASS two-pass inference against one static (tsv_m) pass, with the project's real inference code.

Synthetic endpoints with real CLIP image-tower shapes: a randomly initialised open_clip tower is θ_pre, and T
endpoints are θ_pre + low-rank-plus-noise deltas (relative size ``--delta-scale``), written as safetensors files in
``--workdir`` (kept and reused across runs, as is the factor store built there with
``load_or_build_factor_store``). Inputs are real-size images (224x224 for the ViTs); each batch mixes all tasks.

Measured, on the same batches:
- static: the tsv_m merge of all tasks in a copy of ``model.visual``; embed (L2-normalised) + head matmul.
- MASS cold: a ``RoutedPredictor`` built as ``mass_exp.pipeline.build_routed_predictor`` builds it (experts written in
  place by a ``TSVExpertBuilder``), starting with an empty expert cache bounded by ``--cache-gb`` (default: the
  pipeline's default share of free memory) and optionally ``--cache-size``; expert builds are inside the timing.
- MASS warm: the same, but every expert a batch needs is built (untimed) before that batch: steady state.
- expert build seconds per |Omega| (1, 2, 3): ``--build-samples`` task sets of each size rebuilt in place into one
  expert module (the steady state of a full cache), mean per build; ``--legacy-build`` also times the route this
  replaced (thin SVDs of the stacked factors, a deep copy of the template, load_state_dict).

Runs are entries of ``RUNS`` (name -> function of the shared context returning its figures); add a method there.
``--smile`` also builds SMILE over the same endpoints and times it against the static pass; ``--smile
--synthetic-factors --skip-mass`` draws SMILE's q/k/v factors into the store too and times only SMILE (the static pass
then runs the pretrained tower, the same cost as a merged one): how ViT-L-14 x 20 is measured on a small machine.

``--synthetic-factors`` skips the endpoint files and draws the factor store directly (random orthonormal factors of
the real shapes and rank rule): the cost of inference does not depend on where the factors came from, and it makes
``--backbone ViT-L-14 --tasks 20`` fit on a small machine.

    python scripts/bench_inference.py --backbone ViT-B-32 --tasks 8 --batch-size 64
    python scripts/bench_inference.py --tiny --tasks 3 --batch-size 8 --batches 2   # seconds, for a smoke test
    python scripts/bench_inference.py --backbone ViT-L-14 --tasks 20 --synthetic-factors --cache-gb 3 --batch-size 4
    python scripts/bench_inference.py --backbone ViT-L-14 --tasks 20 --synthetic-factors --smile --skip-mass --batch-size 4

Inputs: ``--inputs noise`` (every sample independent noise: the router's task sets are essentially random, the
worst case for grouping) or ``--inputs clustered`` (task t's samples are a fixed random image per task plus
noise, so samples of one task tend to route alike, as real data does). The router is driven by random weights
either way, so the task sets say nothing about routing accuracy, only about cost.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_ARCH = "bench-tiny-ViT"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_ROUTING_BLOCK = 2
BACKBONES = ("ViT-B-32", "ViT-B-16", "ViT-L-14")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B-32", choices=BACKBONES)
    p.add_argument("--tiny", action="store_true", help=f"use a tiny registered config ({TINY_ARCH}) instead")
    p.add_argument("--tasks", type=int, default=8, help="number of synthetic endpoints T")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=5, help="measured batches (after one warmup batch)")
    p.add_argument("--classes", type=int, default=10, help="classes per task head")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    p.add_argument("--svd", default="exact", choices=("exact", "randomized"), help="factor store SVD")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mass-exp-bench-inference",
                   help="endpoints and factor store live here and are reused across runs")
    p.add_argument("--inputs", default="noise", choices=("noise", "clustered"))
    p.add_argument("--cache-gb", type=float, default=None,
                   help="expert cache budget in GiB (default: the pipeline's share of free memory)")
    p.add_argument("--cache-size", type=int, default=None, help="optional cap on the number of cached experts")
    p.add_argument("--build-samples", type=int, default=3, help="task sets timed per |Omega| for the build figures")
    p.add_argument("--legacy-build", action="store_true",
                   help="also time the replaced expert build (thin SVDs + deep copy + load_state_dict)")
    p.add_argument("--synthetic-factors", action="store_true",
                   help="draw the factor store directly instead of writing endpoint files and factoring them")
    p.add_argument("--warm-mem-gb", type=float, default=8.0,
                   help="memory guard: the warm run keeps at most this many GiB of experts (each is a full tower)")
    p.add_argument("--factors-in-memory", action="store_true",
                   help="read the whole factor store into memory (the pipeline memory-maps it)")
    p.add_argument("--delta-scale", type=float, default=1e-3, help="task-vector size relative to the weights")
    p.add_argument("--delta-rank", type=int, default=16, help="rank of the low-rank part of each matrix delta")
    p.add_argument("--block", type=int, default=None, help="routing block (default: the backbone's)")
    p.add_argument("--routing-param", choices=("mlp_in", "attn_in"), default="mlp_in",
                   help="the routing block's input the router projects (router.routing_param; default mlp_in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-warm", action="store_true", help="measure only the cold-cache MASS run")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this json file")
    p.add_argument("--smile", action="store_true",
                   help="also build SMILE over the same endpoints and time one SMILE pass against the static pass")
    p.add_argument("--smile-config", type=int, nargs=3, default=(16, 32, 2), metavar=("GATE_K", "K", "TOP_K"),
                   help="SMILE's gate rank, expert rank (-1: full) and experts per token (default: method=smile's)")
    p.add_argument("--skip-mass", action="store_true",
                   help="with --smile: time only SMILE against the static pass (run on the pretrained weights, the "
                        "same cost as a merged tower); no tsv_m merge, MASS runs or expert builds")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# model and synthetic endpoints


def create_visual(arch: str, tiny: bool):
    import open_clip

    if tiny:
        cfg_dir = Path(tempfile.mkdtemp(prefix="bench-tiny-cfg-"))
        (cfg_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(cfg_dir)
    model = open_clip.create_model(arch, pretrained=None)
    return model.visual.eval()


def synthetic_delta(w, rel: float, rank: int, gen):
    """rel·‖w‖-sized delta: a rank-`rank` part plus dense noise for matrices, noise for vectors."""
    import torch

    w = w.float()
    rms = float(w.pow(2).mean().sqrt()) if w.numel() else 0.0
    rms = rms if rms > 0 else 1e-2  # zero-initialised biases
    if w.dim() == 2:
        m, n = w.shape
        r = max(1, min(rank, m, n))
        d = (torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)) / math.sqrt(r)
        d = d + 0.3 * torch.randn(m, n, generator=gen)
    else:
        d = torch.randn(w.shape, generator=gen)
    d = d * (rel * rms / float(d.pow(2).mean().sqrt().clamp_min(1e-12)))
    return d.to(w.dtype)


def prepare_endpoints(args, arch: str, visual) -> tuple[Path, list[Path], Path]:
    """(pretrained file, endpoint files, factor cache dir) in the work dir; generated once, then reused."""
    import torch

    from mass_exp.merging.task_vectors import LazyStateDict, save_state_dict

    meta = {"arch": arch, "tasks": args.tasks, "delta_scale": args.delta_scale, "delta_rank": args.delta_rank,
            "seed": args.seed, "format": 1}
    tag = f"{arch}-T{args.tasks}-s{args.seed}-r{args.delta_rank}-d{args.delta_scale:g}"
    d = args.workdir / tag
    d.mkdir(parents=True, exist_ok=True)
    pre_file = d / "pretrained-visual.safetensors"
    files = [d / f"endpoint-{t:02d}.safetensors" for t in range(args.tasks)]
    meta_file = d / "meta.json"
    complete = meta_file.is_file() and json.loads(meta_file.read_text()) == meta
    if complete and pre_file.is_file() and all(f.is_file() for f in files):
        visual.load_state_dict(dict(LazyStateDict(pre_file)))
        print(f"endpoints: reusing {len(files)} endpoints in {d}")
        return pre_file, files, d / "factors"
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    pre = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    save_state_dict(pre, pre_file, metadata={"kind": "pretrained-visual"})
    for t, f in enumerate(files):
        gen = torch.Generator().manual_seed(args.seed * 1000 + t + 1)
        ft = {k: v + synthetic_delta(v, args.delta_scale, args.delta_rank, gen) for k, v in pre.items()}
        save_state_dict(ft, f, metadata={"kind": "synthetic-endpoint", "task": str(t)})
        del ft
    meta_file.write_text(json.dumps(meta))
    print(f"endpoints: wrote {len(files)} synthetic endpoints to {d} in {time.perf_counter() - t0:.1f}s")
    return pre_file, files, d / "factors"


def qkv_slices(visual) -> dict:
    """SMILE's names of the q, k, v parts of each packed attention input projection (as `smile_visual` looks them up
    in a factor store) -> (packed weight name, row slice)."""
    import torch

    out = {}
    for mname, mod in visual.named_modules():
        if isinstance(mod, torch.nn.MultiheadAttention):
            d = mod.embed_dim
            for j, part in enumerate("qkv"):
                out[f"{mname}.in_proj_weight[{part}]"] = (f"{mname}.in_proj_weight", slice(j * d, (j + 1) * d))
    return out


def synthetic_store(args, visual, smile_parts: bool = False):
    """A factor store drawn directly: per task and matrix, orthonormal U, V (QR of Gaussians) with the rank rule's
    k and decaying σ of the size `--delta-scale` gives; vector deltas are Gaussian. Held in memory. With
    `smile_parts` it also holds SMILE's q, k, v parts of the packed attention projections (:func:`qkv_slices`), so
    a SMILE tower can be built from it alone."""
    import torch

    from mass_exp.merging.factors import FORMAT, FactorStore, _key, rank_rule, resolve_rank
    from mass_exp.merging.task_vectors import is_matrix_param

    sd = dict(visual.state_dict())
    if smile_parts:
        sd.update({n: sd[w][sl] for n, (w, sl) in qkv_slices(visual).items()})
    names = list(sd)
    shapes = {n: list(sd[n].shape) for n in names}
    matrix_names = [n for n in names if is_matrix_param(shapes[n])]
    ranks = {n: resolve_rank(shapes[n], args.tasks, None, None) for n in matrix_names}
    info = {"format": FORMAT, "num_tasks": args.tasks, "names": names, "matrix_names": matrix_names, "ranks": ranks,
            "shapes": shapes, "dtypes": {n: str(sd[n].dtype).removeprefix("torch.") for n in names},
            "rank_rule": rank_rule(None, None), "svd": "synthetic", "svd_params": {}, "svd_errors": []}
    gen = torch.Generator().manual_seed(args.seed + 99)
    tensors = {}
    for n in names:
        w = sd[n].float()
        rms = float(w.pow(2).mean().sqrt()) if w.numel() else 0.0
        size = args.delta_scale * (rms if rms > 0 else 1e-2)
        for t in range(args.tasks):
            if n in ranks:
                (m, c), k = shapes[n], ranks[n]
                u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
                v, _ = torch.linalg.qr(torch.randn(c, k, generator=gen))
                s = size * math.sqrt(m * c / k) * torch.linspace(1.0, 0.1, k)
                tensors[_key("U", t, n)], tensors[_key("S", t, n)], tensors[_key("V", t, n)] = u, s, v
            else:
                tensors[_key("vec", t, n)] = size * torch.randn(shapes[n], generator=gen)
    return FactorStore(tensors, info)


class SyntheticEndpoint(dict):
    """Endpoint t of a synthetic SMILE bench: the pretrained tensors with the store's vector deltas added (matrix
    weights are never read: their factors come from the store, and the bench checks that nothing was decomposed)."""

    def __init__(self, pretrained, store, t: int):
        super().__init__({n: (v + store.vector(t, n).to(v.dtype)) if n in store.names and not store.is_matrix(n)
                          else v for n, v in pretrained.items()})


def legacy_build(template, pretrained, store, task_set):
    """The expert build this project used before issue 14: per matrix, thin SVDs of the stacked factors; then a deep
    copy of the template and load_state_dict."""
    import copy

    import torch

    from mass_exp.merging.task_vectors import compose
    from mass_exp.merging.tsv import tsv_matrix_svd

    out = {}
    for name in pretrained:
        pre = pretrained[name]
        if store.is_matrix(name):
            m = tsv_matrix_svd([store.factors(t, name) for t in task_set])
        else:
            m = torch.stack([store.vector(t, name) for t in task_set]).mean(0)
        out[name] = compose(pre, m, 1.0)
    expert = copy.deepcopy(template)
    expert.load_state_dict(out)
    return expert.eval()


def sample_task_sets(tasks: int, size: int, n: int) -> list[tuple[int, ...]]:
    """n distinct task sets of `size` tasks, spread over the tasks (deterministic)."""
    import itertools

    combos = list(itertools.combinations(range(tasks), size))
    if not combos:
        return []
    step = max(1, len(combos) // n)
    return combos[::step][:n]


def make_batches(args, image_size: int, n: int):
    """n mixed-task batches: (images, true task per sample, labels)."""
    import torch

    gen = torch.Generator().manual_seed(args.seed + 12345)
    protos = torch.randn(args.tasks, 3, image_size, image_size, generator=gen)
    out = []
    for _ in range(n):
        task = torch.arange(args.batch_size) % args.tasks  # every task in every batch (when B >= T)
        task = task[torch.randperm(args.batch_size, generator=gen)]
        noise = torch.randn(args.batch_size, 3, image_size, image_size, generator=gen)
        images = noise if args.inputs == "noise" else protos[task] + 0.3 * noise
        labels = torch.randint(0, args.classes, (args.batch_size,), generator=gen)
        out.append((images.contiguous(), task, labels))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the predictors, built as mass_exp.pipeline.build_routed_predictor builds them


def build_routed(first, heads, router, builder, template, cfg, cache_gb=None, cache_size=None):
    from mass_exp.evaluation.predictors import RoutedPredictor

    def build_expert(task_set, out):
        return builder.build(task_set, out=out)

    return RoutedPredictor(first, heads, router, build_expert, template, cfg, cache_size=cache_size,
                           cache_gb=cache_gb).eval()


def fmt_counts(counter: Counter) -> str:
    total = sum(counter.values())
    return ", ".join(f"{k}: {v} ({100 * v / total:.0f}%)" for k, v in sorted(counter.items()))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.skip_mass and not args.smile:
        raise SystemExit("--skip-mass leaves nothing to time without --smile")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mass_exp.merging.factors").setLevel(logging.INFO)

    from mass_exp.evaluation.predictors import embed
    from mass_exp.merging.factors import load_or_build_factor_store
    from mass_exp.merging.task_vectors import LazyStateDict
    from mass_exp.merging.tsv import ORTHO_COUNTS, TSVExpertBuilder, tsv_merge_from_factors
    from mass_exp.routing.two_pass import module_nbytes
    from mass_exp.models.vit_hooks import routing_features, routing_param_name
    from mass_exp.routing import DEFAULT_ROUTING_BLOCK, ProjectionRouter, RouterConfig

    arch = TINY_ARCH if args.tiny else args.backbone
    block = args.block if args.block is not None else (TINY_ROUTING_BLOCK if args.tiny else DEFAULT_ROUTING_BLOCK[arch])
    visual = create_visual(arch, args.tiny)
    n_blocks = len(visual.transformer.resblocks)
    if not 0 <= block < n_blocks:
        raise SystemExit(f"--block {block} out of range for {n_blocks} blocks")
    image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    n_params = sum(p.numel() for p in visual.parameters())
    print(f"backbone {arch}: {n_blocks} blocks, {n_params / 1e6:.1f}M params, {image_size}x{image_size} inputs, "
          f"routing block {block}; T={args.tasks}, batch {args.batch_size} x {args.batches} (+1 warmup), "
          f"inputs={args.inputs}, threads={torch.get_num_threads()}")

    if args.synthetic_factors:
        t0 = time.perf_counter()
        store = synthetic_store(args, visual, smile_parts=args.smile)
        pretrained = {k: v.detach().clone() for k, v in visual.state_dict().items()}
        finetuned = [SyntheticEndpoint(pretrained, store, t) for t in range(args.tasks)] if args.smile else None
        print(f"factor store: {store!r} drawn in {time.perf_counter() - t0:.1f}s (synthetic factors)")
    else:
        pre_file, files, factor_dir = prepare_endpoints(args, arch, visual)
        t0 = time.perf_counter()
        store = load_or_build_factor_store(factor_dir, pre_file, files, arch, svd=args.svd, progress=False,
                                           in_memory=args.factors_in_memory)
        print(f"factor store: {store!r} ready in {time.perf_counter() - t0:.1f}s (svd={args.svd})")
        pretrained = LazyStateDict(pre_file)
        finetuned = [LazyStateDict(f) for f in files]
    if args.skip_mass:
        return smile_only(args, visual, pretrained, finetuned, store, image_size)
    if args.smile and args.synthetic_factors:
        raise SystemExit("--smile --synthetic-factors draws SMILE's q/k/v factors into the store, which the MASS runs "
                         "cannot use: add --skip-mass")
    t0 = time.perf_counter()
    merged = tsv_merge_from_factors(pretrained, store, range(args.tasks), alpha=1.0)
    merge_s = time.perf_counter() - t0
    import copy

    # one model holds tsv_m(all tasks): the static pass runs it whole, MASS's pass 1 up to the routing block
    first = copy.deepcopy(visual).eval()
    first.load_state_dict(merged)
    static_model = first
    del merged
    template = visual.eval()  # holds theta_pre; expert slots are allocated from its structure
    print(f"tsv_m merge of all {args.tasks} tasks (static model and pass-1 model): {merge_s:.2f}s")

    heads = random_heads(args, visual)
    router_cfg = RouterConfig(block=block, routing_param=args.routing_param)
    param = routing_param_name(block, routing_param=router_cfg.routing_param)
    router = ProjectionRouter([store.V(t, param) for t in range(args.tasks)], router_cfg)
    expert_bytes = module_nbytes(template)

    batches = make_batches(args, image_size, args.batches + 1)
    warm_batch, batches = batches[0], batches[1:]
    n_images = args.batch_size * args.batches

    # routing of each measured batch (deterministic: the same pass-1 model and router the predictor uses)
    with torch.no_grad():
        plan = [router(routing_features(first, images, block, router_cfg.token,
                                                     router_cfg.routing_param)).task_sets for images, _, _ in batches]
    set_sizes = Counter(len(s) for sets in plan for s in sets)
    distinct = [len(set(sets)) for sets in plan]
    all_distinct = len({s for sets in plan for s in sets})
    group_sizes = [sorted(Counter(sets).values(), reverse=True) for sets in plan]

    def new_builder():
        return TSVExpertBuilder(pretrained, store, alpha=1.0)

    # ---- warmup (untimed): static pass on the warmup batch, a throwaway predictor on a slice of it
    with torch.no_grad():
        embed(static_model, warm_batch[0])
    throwaway = build_routed(first, heads, router, new_builder(), template, router_cfg, cache_gb=2 * expert_bytes / 2**30)
    throwaway.predict(warm_batch[0][: min(4, args.batch_size)], task=0, labels=warm_batch[2][: min(4, args.batch_size)])
    del throwaway

    counted = ("hits", "misses", "builds", "evictions", "build_time_s")

    static_pass = static_timer(static_model, heads)

    def run_mass(predictor, prebuild: bool):
        """Per batch: one static pass, then predictor.predict, both timed, back to back (so the machine's load is
        the same for the pair). With `prebuild` the batch's experts are built first (untimed) and the cache
        counters report only what happened inside the timed calls."""
        static_t, times, inside = [], [], dict.fromkeys(counted, 0)
        for (images, task, labels), sets in zip(batches, plan):
            if prebuild:
                for key in sorted(set(sets)):
                    predictor.experts.get(key)
            static_t.append(static_pass(images))
            before = predictor.experts.stats()
            t0 = time.perf_counter()
            predictor.predict(images, task=0, labels=labels)
            times.append(time.perf_counter() - t0)
            after = predictor.experts.stats()
            for k in counted:
                inside[k] += after[k] - before[k]
        stats = {**predictor.experts.stats(), **inside}
        return {"s": sum(times), "img_per_s": n_images / sum(times), "per_batch_s": times,
                "static_s": sum(static_t), "static_per_batch_s": static_t, "ratio": sum(times) / sum(static_t),
                "timings": dict(predictor.timings), "expert_cache": stats,
                "cache_capacity": predictor.experts.capacity()}

    def run_mass_cold():
        """Empty cache at the first measured batch, a fresh builder: expert builds inside the timing."""
        pred = build_routed(first, heads, router, new_builder(), template, router_cfg, args.cache_gb, args.cache_size)
        return run_mass(pred, prebuild=False)

    def run_mass_warm():
        """Each batch's experts built before it, outside the timing: the steady state of a large enough cache."""
        need = max(distinct)
        max_warm = max(1, int(args.warm_mem_gb * 2**30 // expert_bytes))
        if need > max_warm:
            print(f"warm run skipped: a batch needs {need} experts, more than --warm-mem-gb {args.warm_mem_gb:g} "
                  f"holds ({max_warm} x {expert_bytes / 2**20:.0f} MiB)")
            return None
        pred = build_routed(first, heads, router, new_builder(), template, router_cfg,
                            cache_gb=need * expert_bytes / 2**30)
        return run_mass(pred, prebuild=True)

    # name -> run; each returns its figures (or None when skipped). Add another method here.
    RUNS = {"mass_cold": run_mass_cold}
    if not args.skip_warm:
        RUNS["mass_warm"] = run_mass_warm

    results = {
        "backbone": arch, "tasks": args.tasks, "batch_size": args.batch_size, "batches": args.batches,
        "inputs": args.inputs, "threads": args.threads, "routing_block": block,
        "svd": "synthetic" if args.synthetic_factors else args.svd,
        "set_size_counts": dict(set_sizes), "distinct_per_batch": distinct, "distinct_total": all_distinct,
        "group_sizes": group_sizes, "merge_all_s": merge_s, "expert_bytes": expert_bytes,
    }
    for name, run in RUNS.items():
        r = run()
        if r is not None:
            results[name] = r
            gc.collect()

    # ---- expert build seconds per |Omega|: in place into one module (steady state), a prepared fresh builder

    slot_owner = build_routed(first, heads, router, new_builder(), template, router_cfg,
                              cache_gb=expert_bytes / 2**30)
    slot = slot_owner._new_slot(torch.device("cpu"))
    slot_state = slot.state_dict()
    by_size, legacy_by_size = {}, {}
    for size in (1, 2, 3):
        sets = sample_task_sets(args.tasks, size, args.build_samples)
        if not sets:
            continue
        builder = new_builder()
        builder.prepare()
        times = []
        for key in sets:
            t0 = time.perf_counter()
            builder.build(key, out=slot_state)
            times.append(time.perf_counter() - t0)
        by_size[str(size)] = sum(times) / len(times)
        if args.legacy_build:
            times = []
            for key in sets:
                t0 = time.perf_counter()
                legacy_build(template, pretrained, store, key)
                times.append(time.perf_counter() - t0)
            legacy_by_size[str(size)] = sum(times) / len(times)
        del builder
        gc.collect()
    del slot_owner, slot, slot_state
    results["expert_build_s_by_size"] = by_size
    if legacy_by_size:
        results["legacy_expert_build_s_by_size"] = legacy_by_size
    results["orthogonalisation_routes"] = dict(ORTHO_COUNTS)

    if args.smile:
        results["smile"] = bench_smile(args, visual, pretrained, finetuned, store, batches, static_pass)

    runs = [results[k] for k in RUNS if k in results]
    static_s = sum(r["static_s"] for r in runs)
    static_n = n_images * len(runs)
    results["static"] = {"s": static_s, "images": static_n, "img_per_s": static_n / static_s,
                         "per_batch_s": [t for r in runs for t in r["static_per_batch_s"]]}
    results["peak_rss_mb"] = peak_rss_mb()

    # ---- report
    print(f"|Omega| over {n_images} samples: {fmt_counts(set_sizes)}")
    by_sz = Counter(len(o) for o in {s for sets in plan for s in sets})
    print(f"distinct Omega per batch: {distinct} (mean {sum(distinct) / len(distinct):.1f}; "
          f"{all_distinct} distinct over all batches, by |Omega|: {dict(sorted(by_sz.items()))})")
    print(f"largest groups per batch: {[g[:5] for g in group_sizes]}")
    print(f"static: {static_s:.2f}s for {static_n} images, {static_n / static_s:.1f} img/s "
          f"(per batch {static_s / (args.batches * len(runs)):.2f}s)")
    for name in RUNS:
        if name not in results:
            continue
        r = results[name]
        t = r["timings"]
        st = r["static_s"]
        other = r["s"] - sum(t.values())
        label = {"mass_cold": "MASS cold cache", "mass_warm": "MASS warm cache"}.get(name, name)
        print(f"{label}: {r['s']:.2f}s, {r['img_per_s']:.1f} img/s, MASS/static = {r['ratio']:.2f}x "
              f"(paired static {st:.2f}s; cache capacity {r['cache_capacity']} experts)")
        print(f"  breakdown: pass1_s {t['pass1_s']:.2f} ({t['pass1_s'] / st:.2f} x static), "
              f"routing_s {t['routing_s']:.3f}, expert_build_s {t['expert_build_s']:.2f}, "
              f"pass2_s {t['pass2_s']:.2f} ({t['pass2_s'] / st:.2f} x static), "
              f"other (scoring, diagnostics) {other:.3f}")
        s = r["expert_cache"]
        per_build = s["build_time_s"] / s["builds"] if s["builds"] else float("nan")
        print(f"  expert cache: {json.dumps(s)} ({per_build:.2f}s per build)")
    if "smile" in results:
        r = results["smile"]
        print(f"SMILE (gate_k {r['gate_k']}, k {r['k']}, top_k {r['top_k']}): built in {r['build_s']:.2f}s "
              f"({r['layers_from_store']} layers from the factor store, {r['layers_decomposed']} decomposed), "
              f"gates + experts {r['expert_mb']:.0f} MiB; {r['s']:.2f}s, SMILE/static = {r['ratio']:.2f}x "
              f"(paired static {r['static_s']:.2f}s)")
    print("expert build (in place, s per build) by |Omega|: "
          + ", ".join(f"{k}: {v:.2f}" for k, v in by_size.items())
          + (" | replaced route (SVD + deep copy): " + ", ".join(f"{k}: {v:.2f}" for k, v in legacy_by_size.items())
             if legacy_by_size else ""))
    print(f"orthogonalisation routes: {dict(ORTHO_COUNTS)}; expert {expert_bytes / 2**20:.0f} MiB; "
          f"peak RSS {results.get('peak_rss_mb', float('nan')):.0f} MB")
    if "mass_warm" in results:
        ok = results["mass_warm"]["ratio"] <= 1.85
        print(f"target MASS <= 1.85x static (warm cache): {results['mass_warm']['ratio']:.2f}x -> "
              f"{'met' if ok else 'NOT met'}")
    ok = results["mass_cold"]["ratio"] <= 2.2
    print(f"target MASS <= 2.2x static (cold cache, worst case = --inputs noise): "
          f"{results['mass_cold']['ratio']:.2f}x -> {'met' if ok else 'NOT met'}")
    if "2" in by_size:
        print(f"target expert build |Omega|=2 <= 1 s: {by_size['2']:.2f}s -> {'met' if by_size['2'] <= 1 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def random_heads(args, visual) -> list:
    """One random (classes, E) head per task, L2-normalised rows scaled by 100 as CLIP's logit scale does."""
    import torch

    gen = torch.Generator().manual_seed(args.seed + 7)
    out_dim = int(visual.output_dim)
    return [100.0 * torch.nn.functional.normalize(torch.randn(args.classes, out_dim, generator=gen), dim=-1)
            for _ in range(args.tasks)]


def static_timer(static_model, heads):
    """images -> seconds of one static pass: embed (L2-normalised), score against every head, argmax."""
    import torch

    from mass_exp.evaluation.predictors import embed

    all_heads = torch.cat(list(heads))

    def static_pass(images) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            (embed(static_model, images) @ all_heads.T).argmax(-1)
            return time.perf_counter() - t0

    return static_pass


def peak_rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # not on POSIX
        return float("nan")


def smile_only(args, visual, pretrained, finetuned, store, image_size: int) -> dict:
    """--skip-mass: SMILE against the static pass, which runs the pretrained tower (a merged tower costs the same)."""
    import torch

    from mass_exp.evaluation.predictors import embed

    batches = make_batches(args, image_size, args.batches + 1)[1:]
    static_model = visual.eval()
    rss_before = peak_rss_mb()
    static_pass = static_timer(static_model, random_heads(args, visual))

    with torch.no_grad():
        embed(static_model, batches[0][0][:2])  # warmup
    r = bench_smile(args, visual, pretrained, finetuned, store, batches, static_pass)
    results = {"backbone": args.backbone if not args.tiny else TINY_ARCH, "tasks": args.tasks,
               "batch_size": args.batch_size, "batches": args.batches, "threads": args.threads,
               "svd": "synthetic" if args.synthetic_factors else args.svd, "smile": r,
               "peak_rss_mb_before_smile": rss_before, "peak_rss_mb": peak_rss_mb()}
    if args.synthetic_factors and r["layers_decomposed"]:
        raise SystemExit(f"{r['layers_decomposed']} SMILE layers were decomposed from synthetic endpoints (their "
                         "weights are not the deltas): the synthetic store must hold every layer's factors")
    print(f"SMILE (gate_k {r['gate_k']}, k {r['k']}, top_k {r['top_k']}): built in {r['build_s']:.2f}s "
          f"({r['layers_from_store']} layers from the factor store, {r['layers_decomposed']} decomposed), "
          f"gates + experts {r['expert_mb']:.0f} MiB; {r['s']:.2f}s for {args.batches} batches of {args.batch_size}, "
          f"SMILE/static = {r['ratio']:.2f}x (paired static {r['static_s']:.2f}s)")
    print(f"peak RSS {results['peak_rss_mb']:.0f} MB ({results['peak_rss_mb_before_smile']:.0f} MB before SMILE was "
          "built: tower, factor store, endpoints)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def bench_smile(args, visual, pretrained, finetuned, store, batches, static_pass) -> dict:
    """Build SMILE (factors from the store where its ranks allow) and time one SMILE pass per batch, each paired
    with a static pass on the same batch."""
    import torch

    from mass_exp.evaluation.predictors import embed
    from mass_exp.merging.smile import smile_visual

    gate_k, k, top_k = args.smile_config
    stats: dict = {}
    model = smile_visual(visual, pretrained, finetuned, gate_k=gate_k, k=k, top_k=top_k, factors=store, stats=stats)
    with torch.no_grad():
        embed(model, batches[0][0][:2])  # warmup
    static_t, times = [], []
    for images, _, _ in batches:
        static_t.append(static_pass(images))
        with torch.no_grad():
            t0 = time.perf_counter()
            embed(model, images)
            times.append(time.perf_counter() - t0)
    return {"gate_k": gate_k, "k": k, "top_k": top_k, "build_s": stats["build_s"],
            "layers_from_store": stats["from_store"], "layers_decomposed": stats["decomposed"],
            "expert_mb": stats["extra_bytes"] / 2**20, "s": sum(times), "per_batch_s": times,
            "static_s": sum(static_t), "ratio": sum(times) / sum(static_t)}


if __name__ == "__main__":
    main()
