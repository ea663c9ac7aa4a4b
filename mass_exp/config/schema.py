"""Typed schemas of every config group, registered in Hydra's ConfigStore as the schema of each group's YAML.

Each YAML of `conf/<group>/` starts with `defaults: [/schema/<group>/<kind>@_here_, _self_]`, so Hydra rejects a
wrong type or an unknown key before anything runs. Every field carries its range rule (`key(default, rule)`), which
`mass_exp.config.validate` checks at composition time.

Adding a key: one line in its dataclass below, `name: type = key(default, rule)`, next to its range rule; then one
invalid case for it in `tests/config/test_validation.py` (INVALID), which fails until the key has one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mass_exp.config.rules import (either, finite_coefficients, integer, key, number, number_list, one_of, text,
                                   unique_nonempty)

POS_INT = integer(1)
POS_INT_OR_NULL = integer(1, nullable=True)
COUNT = integer(0)
UNIT = number(0, 1)                              # [0, 1]
FRACTION = number(0, 1, lo_open=True)            # (0, 1]
FRACTION_OR_NULL = number(0, 1, lo_open=True, nullable=True)
POSITIVE = number(0, None, lo_open=True)         # > 0
NON_NEGATIVE = number(0)                         # >= 0
COEFF = number(nullable=True)                    # any finite number or null
COEFF_GRID = number_list(number(), nullable=True)
PROTOCOL = one_of("fixed", "validation")
SEED = integer(0, 2**32 - 1)


# ------------------------------------------------------------------------------------------------------- backbone

@dataclass
class Backbone:
    name: str = key(MISSING, text())
    arch: str = key(MISSING, text())                     # an open_clip architecture (checked in validate)
    pretrained: Optional[str] = key(None, text(nullable=True))
    hf_hub: Optional[str] = key(None, text(nullable=True))
    quick_gelu: bool = key(False)
    routing_block: int = key(MISSING, COUNT)            # inside the backbone: checked in validate


# ---------------------------------------------------------------------------------------------------------- suite

@dataclass
class SuiteBase:
    name: str = key(MISSING, text())
    tasks: List[str] = key(MISSING, unique_nonempty)     # every task must exist: checked in validate
    fixed_alpha: Dict[str, Any] = key({}, finite_coefficients)


@dataclass
class Suite(SuiteBase):
    num_workers: int = key(0, COUNT)


@dataclass
class MiniGenerator:
    seed: int = key(0, SEED)
    image_size: int = key(32, integer(8))
    train_size: int = key(2000, POS_INT)
    validation_size: int = key(300, POS_INT)
    test_size: int = key(500, POS_INT)
    pretrain_size: int = key(2000, POS_INT)
    pretrain_signed_share: float = key(0.01, UNIT)


@dataclass
class MiniSuite(SuiteBase):
    generator: MiniGenerator = field(default_factory=MiniGenerator)


# ------------------------------------------------------------------------------------------------------ endpoints

@dataclass
class EndpointsBase:
    source: str = key(MISSING, one_of("mini", "tall_masks", "retrained", "fusion_bench", "local"))


@dataclass
class HubEndpoints(EndpointsBase):
    model_names: Dict[str, str] = key({})
    task_names: Dict[str, str] = key({})
    reference_acc: str = key("measured", one_of("packaged", "measured"))
    allow_unsafe_pickle: bool = key(False)
    # whose heads, data, preprocessing and validation split go with the checkpoints (resources/sources/<name>.json)
    head_source: str = key(MISSING, one_of("tall_masks", "retrained", "fusion_bench"))


@dataclass
class TallMasksEndpoints(HubEndpoints):
    repo_id: str = key(MISSING, text())
    finetuned_file: str = key(MISSING, text())
    pretrained_file: str = key(MISSING, text())
    revision: Optional[str] = key(None, text(nullable=True))


@dataclass
class RetrainedEndpoints(HubEndpoints):
    repo_template: str = key(MISSING, text())
    pretrained_repo: Optional[str] = key(None, text(nullable=True))
    filename: Optional[str] = key(None, text(nullable=True))
    filenames: Dict[str, str] = key({})
    revision: Optional[str] = key(None, text(nullable=True))


@dataclass
class FusionBenchEndpoints(HubEndpoints):
    repo_template: str = key(MISSING, text())
    filename: str = key("model.safetensors", text())
    pretrained_repo: Optional[str] = key(None, text(nullable=True))
    pretrained_filename: str = key("model.safetensors", text())
    revision: Optional[str] = key(None, text(nullable=True))


@dataclass
class LocalEndpoints(HubEndpoints):
    pattern: str = key(MISSING, text())
    pretrained: Optional[str] = key(None, text(nullable=True))
    kind: str = key("open_clip", one_of("open_clip", "hf_clip_vision"))


@dataclass
class MiniPretrain:
    steps: int = key(250, POS_INT)
    batch_size: int = key(256, POS_INT)
    lr: float = key(5.0e-4, POSITIVE)
    weight_decay: float = key(0.1, NON_NEGATIVE)
    warmup_steps: int = key(30, COUNT)
    class_caption_share: float = key(1.0, UNIT)
    domain_captions: str = key("caption", one_of("caption", "templates"))
    # share of each image's patches dropped at random in every pretraining step (FLIP; open_clip's patch_dropout);
    # fine-tuning and evaluation see every patch
    patch_dropout: float = key(0.0, number(0, 1, hi_open=True))


@dataclass
class MiniFinetune:
    epochs: int = key(6, POS_INT)
    batch_size: int = key(64, POS_INT)
    lr: float = key(1.0e-4, POSITIVE)
    weight_decay: float = key(0.0, NON_NEGATIVE)
    warmup_steps: int = key(10, COUNT)
    trainable: str = key("all", one_of("all", "attention", "attention_mlp_in"))
    # train the tower's first-order Taylor expansion around θ_pre in the trainable parameters (linearised,
    # tangent-space fine-tuning, Ortiz-Jimenez et al. 2023); the endpoint is θ_pre + the trained offset
    linearized: bool = key(False)


@dataclass
class MiniEndpoints(EndpointsBase):
    # the routing block's input the projection router reads on these endpoints (router.routing_param's default)
    routing_param: str = key("mlp_in", one_of("mlp_in", "attn_in"))
    # processes that fine-tune missing endpoints side by side (auto: one per CPU thread on CPU, 1 on a GPU); not
    # part of any cache key
    build_workers: Any = key("auto", either(POS_INT, one_of("auto"), why="must be an integer >= 1 or auto",
                                            todo="set e.g. endpoints.build_workers=1 or auto"))
    pretrain: MiniPretrain = field(default_factory=MiniPretrain)
    finetune: MiniFinetune = field(default_factory=MiniFinetune)


# --------------------------------------------------------------------------------------------------------- method

@dataclass
class Method:
    """Keys every merger has; `alpha_protocol=validation` needs a non-empty `alpha_grid` (checked in validate)."""
    name: str = key(MISSING, text())                     # a registered merger: checked in validate
    alpha: Optional[float] = key(None, COEFF)
    alpha_protocol: str = key("fixed", PROTOCOL)
    alpha_grid: Optional[List[float]] = key(None, COEFF_GRID)


@dataclass
class TiesMethod(Method):
    k: Any = key(20, number(0, 100, lo_open=True))      # percent of entries kept (int or float: 20 stays 20)
    merge_fn: str = key("mean", one_of("mean", "sum"))


@dataclass
class ConsensusMethod(Method):
    lambdas: Any = key(0.4, either(NON_NEGATIVE, number_list(NON_NEGATIVE), why="must be a number >= 0 or a list "
                                   "of them (one per task)", todo="set e.g. 0.4 or [0.4,0.5,...]"))
    lambda_protocol: str = key("fixed", PROTOCOL)
    lambda_grid: Optional[List[float]] = key(None, number_list(NON_NEGATIVE, nullable=True))
    k: int = key(2, POS_INT)


@dataclass
class TsvCMethod(Method):
    rank: Optional[int] = key(None, POS_INT_OR_NULL)
    rank_fraction: Optional[float] = key(None, FRACTION_OR_NULL)
    svd: str = key("exact", one_of("exact", "randomized"))


@dataclass
class TsvMMethod(TsvCMethod):
    eps: Optional[float] = key(None, number(0, None, lo_open=True, nullable=True))


@dataclass
class IsoCtsMethod(Method):
    common_space_fraction: float = key(0.8, FRACTION)


@dataclass
class SmileMethod(Method):
    gate_k: int = key(16, POS_INT)
    k: int = key(32, either(POS_INT, one_of(-1), why="must be an integer >= 1 or -1 (full-rank experts)",
                            todo="set e.g. method.k=32"))
    top_k: int = key(2, POS_INT)
    average_experts: bool = key(False)


# --------------------------------------------------------------------------------------------------------- router

@dataclass
class Router:
    name: str = key(MISSING, text())


@dataclass
class ProjectionRouter(Router):
    block: int = key(MISSING, COUNT)                    # inside the backbone: checked in validate
    routing_param: str = key("mlp_in", one_of("mlp_in", "attn_in"))   # mlp.c_fc (ln_2 in) | attn.in_proj (ln_1 in)
    token: str = key("cls", one_of("cls", "mean"))
    norm: str = key("l2", one_of("l2", "mahalanobis"))
    mode: str = key("topk", one_of("topk", "top1", "weighted"))
    threshold: float = key(0.2, number(0, 1, hi_open=True, hint="set eta in [0, 1), e.g. 0.2 (the paper's)"))
    temperature: float = key(1.0, POSITIVE)
    max_tasks: Optional[int] = key(3, POS_INT_OR_NULL)
    batched: bool = key(False)
    head_selection: str = key("max", one_of("max", "avg"))
    oracle_head: bool = key(False)
    oracle_routing: bool = key(False)
    redundancy_eps: Optional[float] = key(None, number(0, None, lo_open=True, nullable=True))  # method=tsv_m only
    first_pass: str = key("merged", one_of("merged", "zeroshot"))
    # expert cache: a byte budget (GiB; null = expert_cache_free_fraction of the device's free memory), and an optional
    # cap on the number of experts (null = none)
    expert_cache_gb: Optional[float] = key(None, number(0, None, lo_open=True, nullable=True))
    expert_cache_free_fraction: float = key(0.25, FRACTION)
    expert_cache_size: Optional[int] = key(None, POS_INT_OR_NULL)


@dataclass
class NearestNeighbourRouter(ProjectionRouter):
    """Routers built from a few samples per task (never the test split)."""
    split: str = key("train", either(one_of("train", "validation"), why="routers built from samples must never see "
                                     "test images", todo="pick train (the paper's) or validation"))
    samples_per_task: Optional[int] = key(32, POS_INT_OR_NULL)
    sample_seed: int = key(0, SEED)


@dataclass
class MlpRouterTrain:
    batch_size: int = key(32, POS_INT)
    lr: float = key(1e-5, POSITIVE)
    weight_decay: float = key(0.1, NON_NEGATIVE)
    t_max: int = key(10, POS_INT)
    max_epochs: int = key(80, POS_INT)
    batches_per_task: Optional[int] = key(400, POS_INT_OR_NULL)
    gradient_clip_val: Optional[float] = key(10.0, number(0, None, lo_open=True, nullable=True))


@dataclass
class MlpRouter(NearestNeighbourRouter):
    samples_per_task: Optional[int] = key(None, POS_INT_OR_NULL)
    hidden_dim: int = key(1024, POS_INT)
    dropout: float = key(0.5, number(0, 1, hi_open=True))
    train: MlpRouterTrain = field(default_factory=MlpRouterTrain)


# ------------------------------------------------------------------------------------------ logger, trainer, paths

@dataclass
class Logger:
    name: str = key(MISSING, one_of("wandb", "csv", "none"))
    group: Optional[str] = key(None, text(nullable=True))
    tags: List[str] = key([])


@dataclass
class WandbLogger(Logger):
    mode: str = key("offline", one_of("offline", "online", "disabled"))
    project: str = key("mass-exp", text())
    entity: Optional[str] = key(None, text(nullable=True))


@dataclass
class Trainer:
    accelerator: str = key("auto", one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu"))
    devices: Any = key(1, either(integer(1), one_of("auto", -1), why="must be an integer >= 1, -1 or auto",
                                 todo="set e.g. trainer.devices=1 or auto"))
    num_nodes: int = key(1, POS_INT)
    strategy: str = key("auto", text())
    precision: str = key("32-true", one_of("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"))
    enable_progress_bar: bool = key(True)


@dataclass
class Paths:
    root_dir: str = key(".", text())
    output_dir: str = key(MISSING, text())
    cache_dir: str = key(MISSING, text())
    hub_cache_dir: Optional[str] = key(None, text(nullable=True))
    hf_cache_dir: Optional[str] = key(None, text(nullable=True))
    results_store: str = key(MISSING, text())


# ------------------------------------------------------------------------------------------------ top-level keys

@dataclass
class Eval:
    batch_size: int = key(256, POS_INT)
    num_workers: int = key(0, COUNT)
    max_samples_per_task: Optional[int] = key(None, POS_INT_OR_NULL)
    task_known: bool = key(True)
    precision: str = key("32", one_of("32", "bf16", "16-mixed"))


@dataclass
class Data:
    local_dirs: Dict[str, str] = key({})
    local_pattern: Optional[str] = key(None, text(nullable=True))
    # tasks whose dataset label names may differ from the head's class list (the label guard warns instead)
    accept_label_mismatch: List[str] = key([], number_list(text(), nonempty=False))


@dataclass
class Config:
    """The top-level keys (`conf/config.yaml`); the groups carry their own schemas (above)."""
    backbone: Any = MISSING
    suite: Any = MISSING
    endpoints: Any = MISSING
    method: Any = MISSING
    router: Any = MISSING
    logger: Any = MISSING
    trainer: Any = MISSING
    paths: Any = MISSING
    seed: int = key(0, SEED)
    resume: bool = key(True)
    run_name: str = key(MISSING, text())
    eval: Eval = field(default_factory=Eval)
    data: Data = field(default_factory=Data)
    prefetch_splits: List[str] = key(["test", "validation"], number_list(one_of("train", "validation", "test")))


#: group -> {kind: schema}; a group YAML names its kind in `defaults: [/schema/<group>/<kind>@_here_, _self_]`
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "backbone": {"backbone": Backbone},
    "suite": {"suite": Suite, "mini": MiniSuite},
    "endpoints": {"mini": MiniEndpoints, "tall_masks": TallMasksEndpoints, "retrained": RetrainedEndpoints,
                  "fusion_bench": FusionBenchEndpoints, "local": LocalEndpoints},
    "method": {"method": Method, "ties": TiesMethod, "consensus": ConsensusMethod, "tsv_c": TsvCMethod,
               "tsv_m": TsvMMethod, "iso_cts": IsoCtsMethod,
               "smile": SmileMethod},
    "router": {"none": Router, "projection": ProjectionRouter, "nearest_neighbour": NearestNeighbourRouter,
               "mlp": MlpRouter},
    "logger": {"logger": Logger, "wandb": WandbLogger},
    "trainer": {"trainer": Trainer},
    "paths": {"paths": Paths},
}
ROOT_SCHEMA = "schema_config"


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name=ROOT_SCHEMA, node=Config)
    for group, kinds in GROUP_SCHEMAS.items():
        for kind, node in kinds.items():
            cs.store(group=f"schema/{group}", name=kind, node=node)


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every leaf key of a schema (nested dataclasses flattened: `generator.seed`); `Any` group slots left out."""
    out = []
    for f in fields(schema):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if is_dataclass(sub):
            out += schema_keys(type(sub), f"{prefix}{f.name}.")
        elif "rule" in f.metadata:
            out.append(prefix + f.name)
    return out
