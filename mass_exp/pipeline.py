"""Wiring: a resolved config in, a finished evaluation (results.json, logs, table) out. No math lives here."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from mass_exp.data.datasets import load_split, task_dataset
from mass_exp.assets import Assets, prepare_assets  # noqa: F401 - prepare_assets is part of the pipeline API
from mass_exp.errors import ConfigError
from mass_exp.evaluation.module import EvaluationModule
from mass_exp.evaluation.predictors import PerTaskPredictor, Predictor, RoutedPredictor, StaticPredictor
from mass_exp.merging.registry import get_merger
from mass_exp.merging.task_vectors import LazyStateDict
from mass_exp.utils.io import atomic_write_json, stable_hash

log = logging.getLogger(__name__)

RESERVED_METHOD_KEYS = {"name", "alpha", "alpha_protocol", "alpha_grid", "lambda_protocol", "lambda_grid"}


def _cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.cache_dir)


def make_loaders(cfg: DictConfig, assets: Assets, split: str) -> list[DataLoader]:
    """One loader per task over the whole split; `evaluate_predictor` shards them per rank (no padding)."""
    limit = cfg.eval.max_samples_per_task
    loaders = []
    for task in assets.tasks:
        hf = load_split(task, split, local_dirs=assets.data_dirs, cache_dir=cfg.paths.hf_cache_dir)
        ds = task_dataset(task, hf, assets.preprocess, limit=limit)
        loaders.append(DataLoader(ds, batch_size=int(cfg.eval.batch_size), num_workers=int(cfg.eval.num_workers),
                                  shuffle=False))
    return loaders


def method_kwargs(method_cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(method_cfg, resolve=True).items() if k not in RESERVED_METHOD_KEYS}


def build_predictor(cfg: DictConfig, assets: Assets, alpha: float | None) -> Predictor:
    """The method's model(s) as a predictor. Static mergers merge once; per-task ones merge when the task changes."""
    spec = get_merger(cfg.method.name)
    kwargs = method_kwargs(cfg.method)
    if alpha is not None:
        kwargs["alpha"] = alpha
    pretrained = LazyStateDict(assets.pretrained_visual_file)
    finetuned = [LazyStateDict(p) for p in assets.endpoint_files]
    if spec.uses_factors:
        kwargs["factors"] = factor_store(cfg, assets)
    heads = [assets.heads[t.name] for t in assets.tasks]
    visual = _fresh_visual(assets)
    if spec.builds_module:  # SMILE: the method is its own (per-token) router (router=none: checked in validate)
        visual = spec.fn(pretrained, finetuned, template=visual, **kwargs)
        return static_predictor(cfg, visual, heads)
    if cfg.router.name != "none":
        return build_routed_predictor(cfg, assets, spec, pretrained, finetuned, kwargs, heads, visual)
    if spec.per_task:  # needs eval.task_known (checked in validate)
        return PerTaskPredictor(visual, heads, lambda t: spec.fn(pretrained, finetuned, task=t, **kwargs))
    t0 = time.time()
    merged = spec.fn(pretrained, finetuned, **kwargs)
    visual.load_state_dict(merged)
    log.info("merged %d endpoints with %s (alpha=%s) in %.2fs", len(finetuned), spec.name, alpha, time.time() - t0)
    return static_predictor(cfg, visual, heads)


def task_known(cfg: DictConfig) -> bool:
    """`eval.task_known` (default true): score a static model with the true task's head, or (false) against every
    head of the suite by MASS's head rule."""
    return bool(cfg.eval.get("task_known", True))


def static_predictor(cfg: DictConfig, visual: torch.nn.Module, heads: list[torch.Tensor]) -> Predictor:
    if task_known(cfg):
        return StaticPredictor(visual, heads)
    from mass_exp.evaluation.predictors import TaskAgnosticPredictor

    return TaskAgnosticPredictor(visual, heads)


def factor_store(cfg: DictConfig, assets: Assets):
    """The truncated-SVD factors of every endpoint (cached by content hash, backbone and rank rule)."""
    from mass_exp.merging.factors import load_or_build_factor_store

    m = cfg.method
    return load_or_build_factor_store(
        _cache_dir(cfg) / "factors", assets.pretrained_visual_file, assets.endpoint_files, cfg.backbone.name,
        rank=m.get("rank"), svd=m.get("svd", "exact"), rank_fraction=m.get("rank_fraction"))


ROUTER_KEYS = {"block", "routing_param", "token", "norm", "mode", "threshold", "temperature", "max_tasks", "batched",
               "head_selection", "oracle_head", "oracle_routing"}


def build_routed_predictor(cfg: DictConfig, assets: Assets, spec: Any, pretrained: Mapping, finetuned: Sequence[Mapping],
                           kwargs: dict[str, Any], heads: list[torch.Tensor], visual: torch.nn.Module) -> Predictor:
    """MASS over `method`: pass 1 = method(all tasks), pass 2 = method(selected tasks); router bases from the factors."""
    from mass_exp.merging.tsv import TSVExpertBuilder
    from mass_exp.models.vit_hooks import routing_param_name
    from mass_exp.routing import ProjectionRouter, RouterConfig

    r = cfg.router  # validated by mass_exp.config.validate (per-task merger, block inside the backbone, ...)
    router_cfg = RouterConfig(**{k: v for k, v in OmegaConf.to_container(r, resolve=True).items() if k in ROUTER_KEYS})
    factors = kwargs.get("factors") or factor_store(cfg, assets)
    first_kwargs = dict(kwargs)
    if r.redundancy_eps is not None:
        first_kwargs["eps"] = float(r.redundancy_eps)
    first = _fresh_visual(assets)
    if r.first_pass == "merged":
        first.load_state_dict(spec.fn(pretrained, finetuned, **first_kwargs))
    features, router_info, routing_layer = None, None, None
    from mass_exp.sample_routers import SAMPLE_ROUTERS

    if r.name in SAMPLE_ROUTERS:  # routers built from a few training samples per task (the paper's ablation)
        from mass_exp.sample_routers import build_sample_router

        router, features, router_info = build_sample_router(cfg, assets, first, router_cfg)
    else:
        # the task subspaces of mlp.c_fc (mlp_in) or attn.in_proj_weight (attn_in); RoutedPredictor reads the matching
        # layer norm's output (ln_2 / ln_1) of the same block from config.routing_param
        routing_layer = routing_param_name(router_cfg.block, routing_param=router_cfg.routing_param)
        router = ProjectionRouter([factors.V(t, routing_layer) for t in range(len(finetuned))], router_cfg)
    alpha = kwargs.get("alpha", 1.0)
    cache = expert_cache_options(r)
    if spec.name == "tsv_m":  # the stored factors: no SVD at test time; experts written in place
        builder = TSVExpertBuilder(pretrained, factors, alpha=alpha)

        def build_tsv(task_set: tuple[int, ...], out: dict[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
            return builder.build(task_set, out=out)

        build_expert = build_tsv
    else:
        def build_expert(task_set: tuple[int, ...]) -> Mapping[str, torch.Tensor]:
            sub_kwargs = {k: v for k, v in kwargs.items() if k != "factors"}
            return spec.fn(pretrained, [finetuned[t] for t in task_set], **sub_kwargs)

    predictor = RoutedPredictor(first, heads, router, build_expert, visual, router_cfg, features=features, **cache)
    predictor.router_info = router_info
    predictor.routing_layer = routing_layer
    return predictor


def expert_cache_options(r: DictConfig) -> dict[str, Any]:
    """RoutedPredictor's cache keyword arguments from the router config (bytes first, count as an extra cap; ranges
    are checked by mass_exp.config.validate)."""
    from mass_exp.evaluation.predictors import DEFAULT_CACHE_FREE_FRACTION

    size = r.get("expert_cache_size")
    gb = r.get("expert_cache_gb")
    frac = r.get("expert_cache_free_fraction")
    return {"cache_size": None if size is None else int(size), "cache_gb": None if gb is None else float(gb),
            "cache_free_fraction": DEFAULT_CACHE_FREE_FRACTION if frac is None else float(frac)}


def _fresh_visual(assets: Assets) -> torch.nn.Module:
    import copy

    return copy.deepcopy(assets.model.visual).eval()


# eval.precision -> Lightning's precision plugin: merges, expert builds and routing stay float32 (see predictors)
EVAL_PRECISION = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
                  "16-mixed": "16-mixed", "16": "16-mixed"}


def eval_precision(cfg: DictConfig) -> str:
    """Lightning precision of the evaluation from `eval.precision` (32 | bf16 | 16-mixed); null: trainer.precision."""
    value = cfg.eval.get("precision")
    if value is None:
        return str(cfg.trainer.precision)
    key = str(value)
    if key not in EVAL_PRECISION:
        raise ConfigError(f"eval.precision must be one of 32, bf16, 16-mixed; got {value!r}")
    return EVAL_PRECISION[key]


def _trainer(cfg: DictConfig, logger: Any = False) -> L.Trainer:
    t = cfg.trainer
    # use_distributed_sampler=False: Lightning's DistributedSampler repeats samples to even out the ranks; the
    # loaders are sharded exactly by ShardedTestData instead (mass_exp.evaluation.sampling)
    return L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                     precision=eval_precision(cfg), logger=logger, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=bool(t.enable_progress_bar), use_distributed_sampler=False)


def evaluate_predictor(cfg: DictConfig, assets: Assets, predictor: Predictor, loaders: Sequence[DataLoader],
                       reference: Mapping[str, float] | None, split: str, logger: Any = False) -> dict[str, dict]:
    """One `Trainer.test` over every task; under DDP each rank gets its shard and all get the reduced results."""
    from mass_exp.evaluation.sampling import ShardedTestData

    module = EvaluationModule(predictor, [t.name for t in assets.tasks], reference, split=split)
    _trainer(cfg, logger).test(module, datamodule=ShardedTestData(loaders), verbose=False)
    if module.confusion_matrix is not None:
        predictor.confusion_matrix = module.confusion_matrix
    return module.results


def packaged_accuracies(assets: Assets, split: str) -> dict[str, float] | None:
    """The endpoint source's published fine-tuned accuracies for every task ('<Task>Val' keys for validation), or
    None when the source ships none or misses a task (the accuracies are then measured)."""
    table = assets.packaged_reference
    if not table:
        return None
    keys = {t.name: t.name if split == "test" else f"{t.name}Val" for t in assets.tasks}
    missing = [k for k in keys.values() if k not in table]
    if missing:
        log.info("no published fine-tuned %s accuracy for %s: measuring them instead", split, ", ".join(missing))
        return None
    return {name: float(table[k]) for name, k in keys.items()}


def finetuned_accuracies(cfg: DictConfig, assets: Assets, split: str, loaders: Sequence[DataLoader]) -> dict[str, float]:
    """Each endpoint's accuracy on its own task (the normalized-accuracy reference), measured once and cached.

    Distributed: all ranks measure it together (the same reduced numbers), rank 0 writes the cache. Whether the
    cache exists is rank 0's view, broadcast once a process group exists; before that (the first evaluation of a
    process) the ranks agree because rank 0 writes the file only after an evaluation every rank takes part in.
    """
    import json

    from mass_exp.evaluation.sampling import distributed, from_rank_zero, is_rank_zero

    from mass_exp.models.heads import heads_cache_key

    ident = {"endpoints": assets.endpoints_id, "split": split, "limit": cfg.eval.max_samples_per_task,
             "heads": assets.weights_id, "tasks": [t.name for t in assets.tasks],
             "task_heads": [heads_cache_key(cfg.backbone.name, assets.weights_id, t) for t in assets.tasks],
             "val": [(t.val_fraction, t.val_max_samples, t.val_seed) for t in assets.tasks]}
    if eval_precision(cfg) != "32-true":  # measured at the run's precision (fp32 keys unchanged)
        ident["precision"] = eval_precision(cfg)
    key = stable_hash(ident)
    path = _cache_dir(cfg) / "reference" / f"finetuned-acc-{split}-{key}.json"

    def read() -> dict[str, float] | None:
        return json.loads(path.read_text()) if path.exists() else None

    packaged = packaged_accuracies(assets, split)
    if packaged is not None:
        assets.reference_sources[split] = f"published ({cfg.endpoints.source}, packaged)"
        return packaged
    assets.reference_sources[split] = f"measured ({cfg.endpoints.source} endpoints, {split} split)"
    cached = from_rank_zero(read() if is_rank_zero() else None) if distributed() else read()
    if cached is not None:
        return cached
    finetuned = [LazyStateDict(p) for p in assets.endpoint_files]
    predictor = PerTaskPredictor(_fresh_visual(assets), [assets.heads[t.name] for t in assets.tasks],
                                 lambda t: finetuned[t])
    log.info("measuring the fine-tuned endpoints' %s accuracy (reference for normalized accuracy)", split)
    res = evaluate_predictor(cfg, assets, predictor, loaders, None, split)
    acc = {name: e["acc"] for name, e in res.items()}
    if is_rank_zero():
        atomic_write_json(path, acc)
    return acc


AVERAGED_KEYS = ("acc", "finetuned_acc", "normalized_acc", "acc_paper_rule", "router_task_id_acc", "router_survival", "router_mean_tasks")


def _averages(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Plain means over tasks of every per-task figure that all tasks have."""
    out = {}
    for key in AVERAGED_KEYS:
        vals = [e.get(key) for e in per_task.values()]
        if vals and all(v is not None for v in vals):
            out[key] = sum(vals) / len(vals)
    if "acc_paper_rule" in out and "normalized_acc" in out:
        out["normalized_acc_paper_rule"] = sum(  # a task whose endpoint scores 0 has no normalized accuracy (nan)
            e["acc_paper_rule"] / e["finetuned_acc"] if e["finetuned_acc"] > 0 else math.nan
            for e in per_task.values()) / len(per_task)
    return out


def choose_alpha(cfg: DictConfig, assets: Assets) -> tuple[float | None, list[dict]]:
    """The coefficient and, under the validation protocol, the whole sweep curve.

    Validation protocol (spec, "Coefficient protocol"): evaluate every alpha of the grid on the validation splits
    and keep the best average normalized validation accuracy; the test set is then evaluated once.
    """
    m = cfg.method
    protocol = m.get("alpha_protocol", "fixed")
    if m.alpha is None and protocol == "fixed":
        return None, []
    if protocol == "fixed":
        return float(m.alpha), []
    grid = list(m.alpha_grid)  # validation protocol: a non-empty grid (mass_exp.config.validate)
    loaders = make_loaders(cfg, assets, "validation")
    reference = finetuned_accuracies(cfg, assets, "validation", loaders)
    curve = []
    for a in grid:
        res = evaluate_predictor(cfg, assets, build_predictor(cfg, assets, float(a)), loaders, reference, "validation")
        avg = _averages(res)
        curve.append({"alpha": float(a), **avg})
        log.info("alpha %.3g: validation acc %.2f, normalized %.2f", a, 100 * avg["acc"], 100 * avg["normalized_acc"])
    best = max(curve, key=lambda c: c["normalized_acc"])
    log.info("chose alpha=%.3g (validation normalized acc %.2f)", best["alpha"], 100 * best["normalized_acc"])
    return best["alpha"], curve


def choose_consensus_lambdas(cfg: DictConfig, assets: Assets) -> dict[str, Any] | None:
    """TALL masks' per-task lambda_t (spec, consensus): for each lambda of the grid, evaluate task t's TALL-mask model
    theta_pre + (tau_MTL masked by m_t) on task t's validation split; keep the best lambda per task."""
    m = cfg.method
    if m.get("lambda_protocol", "fixed") == "fixed":
        return None
    from mass_exp.merging.ties import tall_mask_merge

    grid = [float(x) for x in m.lambda_grid]  # non-empty (mass_exp.config.validate)
    pretrained = LazyStateDict(assets.pretrained_visual_file)
    finetuned = [LazyStateDict(p) for p in assets.endpoint_files]
    loaders = make_loaders(cfg, assets, "validation")
    heads = [assets.heads[t.name] for t in assets.tasks]
    curve = {t.name: [] for t in assets.tasks}
    for lam in grid:
        predictor = PerTaskPredictor(_fresh_visual(assets), heads,
                                     lambda t, lam=lam: tall_mask_merge(pretrained, finetuned, task=t, lam=lam))
        res = evaluate_predictor(cfg, assets, predictor, loaders, None, "validation")
        for name, e in res.items():
            curve[name].append({"lambda": lam, "acc": e["acc"]})
    chosen = [max(curve[t.name], key=lambda c: c["acc"])["lambda"] for t in assets.tasks]
    log.info("TALL-mask lambdas chosen on validation: %s", dict(zip([t.name for t in assets.tasks], chosen)))
    return {"lambdas": chosen, "curve": curve}


def make_logger(cfg: DictConfig, output_dir: Path) -> Any:
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(output_dir), name="csv")
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                           tags=list(cfg.logger.tags or []), name=cfg.run_name, save_dir=str(output_dir),
                           mode=cfg.logger.mode, config=OmegaConf.to_container(cfg, resolve=True))
    raise ConfigError(f"unknown logger.name {name!r}; valid: wandb, csv, none")


def run_evaluation(cfg: DictConfig, output_dir: Path, run_hash: str | None = None) -> dict[str, Any]:
    """The `mass-exp` job: assets -> coefficient -> test evaluation -> results.json, logs and table.

    `run_hash` identifies the config (see `mass_exp.resume`); it is recorded so a rerun can recognise the result.
    """
    t0 = time.time()
    L.seed_everything(int(cfg.seed), verbose=False)
    assets = prepare_assets(cfg)
    test_loaders = make_loaders(cfg, assets, "test")
    reference = finetuned_accuracies(cfg, assets, "test", test_loaders)
    lambda_selection = choose_consensus_lambdas(cfg, assets)
    if lambda_selection is not None:
        with open_dict(cfg):
            cfg.method.lambdas = lambda_selection["lambdas"]
    alpha, curve = choose_alpha(cfg, assets)
    predictor = build_predictor(cfg, assets, alpha)
    logger = make_logger(cfg, output_dir)
    per_task = evaluate_predictor(cfg, assets, predictor, test_loaders, reference, "test", logger)
    results = {
        "status": "complete",
        "run_hash": run_hash,
        "method": cfg.method.name,
        "router": {"name": cfg.router.name},
        "task_known": task_known(cfg) if cfg.router.name == "none" else False,
        "backbone": cfg.backbone.name,
        "suite": cfg.suite.name,
        "alpha": alpha,
        "alpha_protocol": cfg.method.get("alpha_protocol", "fixed") if alpha is not None else None,
        "alpha_sweep": curve,
        "lambda_selection": lambda_selection,
        "finetuned_acc_source": assets.reference_sources.get("test"),
        "head_source": assets.tasks[0].head_source if assets.tasks else None,
        "task_warnings": {t.name: t.warning for t in assets.tasks if t.warning},
        "tasks": per_task,
        "average": _averages(per_task),
        "eval_batch_size": int(cfg.eval.batch_size),
        "eval_precision": eval_precision(cfg),
        "seconds": time.time() - t0,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if isinstance(predictor, RoutedPredictor):
        results["router"] = {"name": cfg.router.name, "confusion_matrix": getattr(predictor, "confusion_matrix", None),
                             "timings_s": predictor.timings, "expert_cache": predictor.experts.stats()}
        if getattr(predictor, "router_info", None) is not None:
            results["router"]["samples"] = predictor.router_info
        if getattr(predictor, "routing_layer", None) is not None:  # projection routers: the subspaces' matrix
            results["router"]["routing_layer"] = predictor.routing_layer
        c = results["router"]["expert_cache"]
        log.info("expert cache: %d hits, %d misses, %d evictions, peak %.2f GiB of %.2f GiB, %.1fs building",
                 c["hits"], c["misses"], c["evictions"], c["peak_bytes"] / 2**30, (c["max_bytes"] or 0) / 2**30,
                 c["build_time_s"])
    from mass_exp.evaluation.sampling import is_rank_zero

    if not is_rank_zero():  # distributed: every rank holds the same reduced results; rank 0 alone writes them
        return results
    if results["router"].get("confusion_matrix") is not None:
        from mass_exp.reporting.plots import plot_confusion

        plot_confusion(results["router"]["confusion_matrix"], [t.name for t in assets.tasks],
                       output_dir / "router_confusion.png", title=cfg.run_name)
    if logger:
        _log_summary(logger, results, output_dir)
    if cfg.method.name == "finetuned":  # the measured fine-tuned accuracies, in the packaged files' format
        atomic_write_json(output_dir / "finetuned_acc.json",
                          {cfg.backbone.name: {n: e["acc"] for n, e in per_task.items()}})
    atomic_write_json(output_dir / "results.json", results)
    print(format_table(results))
    log.info("results written to %s", output_dir / "results.json")
    return results


def _log_summary(logger: Any, results: Mapping[str, Any], output_dir: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        png = output_dir / "router_confusion.png"
        if png.exists():
            logger.experiment.log({"router/confusion_matrix": wandb.Image(str(png))})
        rows = [[n, 100 * e["acc"], 100 * e.get("normalized_acc", math.nan), e["samples"]] for n, e in results["tasks"].items()]
        logger.experiment.log({"results": wandb.Table(columns=["task", "acc", "normalized_acc", "samples"], data=rows)})
        logger.experiment.summary["alpha"] = results["alpha"]
        logger.experiment.finish()


def format_table(results: Mapping[str, Any]) -> str:
    """A readable per-task table of absolute and normalized accuracy."""
    head = f"{results['method']} / router {results['router']['name']} / {results['backbone']} / suite {results['suite']}"
    if results.get("alpha") is not None:
        head += f" / alpha {results['alpha']:g} ({results['alpha_protocol']})"
    routed = "router_mean_tasks" in results["average"]
    cols = f"{'task':<16}{'acc':>8}{'finetuned':>11}{'normalized':>12}"
    if routed:
        cols += f"{'paper rule':>12}{'router id':>11}{'|Omega|':>9}"
    lines = [head, cols + f"{'samples':>9}"]

    def pct(v):
        return 100 * v if v is not None else math.nan

    for name, e in list(results["tasks"].items()) + [("average", results["average"])]:
        row = f"{name:<16}{pct(e.get('acc')):>8.2f}{pct(e.get('finetuned_acc')):>11.2f}"
        row += f"{pct(e.get('normalized_acc')):>12.2f}"
        if routed:
            row += f"{pct(e.get('acc_paper_rule')):>12.2f}{pct(e.get('router_task_id_acc')):>11.2f}"
            row += f"{e.get('router_mean_tasks', math.nan):>9.2f}"
        row += f"{e['samples']:>9d}" if "samples" in e else ""
        lines.append(row)
    return "\n".join(lines)
