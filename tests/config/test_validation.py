"""Every bad configuration stops before any work with one line `error: <key>=<value>: <why>; <what to do>`.

INVALID holds at least one invalid value for every key of every schema (`test_every_key_has_an_invalid_case`
fails for a key without one: a new key needs its case here). Most cases run in-process on a composed config
(Hydra's compose once per group selection, then the overrides applied with OmegaConf's typed update, as Hydra
does); the issue's ten settings go through the full compose, and a handful through the real commands.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mass_exp.config import check_overrides, validate
from mass_exp.config.schema import GROUP_SCHEMAS, Config, schema_keys
from mass_exp.config.validate import composition_error
from mass_exp.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
LOCAL = ["endpoints=local", "endpoints.pattern='/ckpt/{task}.safetensors'"]
TALL = ["endpoints=tall_masks"]
SMILE = ["method=smile", "router=none"]

# key -> invalid settings (each a list of overrides: group choices first, then the bad value). One line per key.
INVALID: dict[str, list[list[str]]] = {
    # top-level keys
    "seed": [["seed=abc"], ["seed=-1"], ["seed=0.5"]],
    "resume": [["resume=maybe"]],
    "run_name": [["run_name=''"]],
    "eval.batch_size": [["eval.batch_size=0"], ["eval.batch_size=abc"]],
    "eval.num_workers": [["eval.num_workers=-1"]],
    "eval.max_samples_per_task": [["eval.max_samples_per_task=-3"], ["eval.max_samples_per_task=0"]],
    "eval.precision": [["eval.precision=64"], ["eval.precision=fp8"]],
    "eval.task_known": [["eval.task_known=maybe"], ["method=tsv_c", "router=none", "eval.task_known=false"]],
    "data.local_dirs": [["data.local_dirs=[a]"]],
    "data.local_pattern": [["data.local_pattern=[a]"]],
    "data.accept_label_mismatch": [["data.accept_label_mismatch=['']"], ["data.accept_label_mismatch=MNIST"]],
    "prefetch_splits": [["prefetch_splits=[tests]"], ["prefetch_splits=[]"]],
    # backbone
    "backbone.name": [["backbone.name=''"]],
    "backbone.arch": [["backbone.arch=ViT-X-99"]],
    "backbone.pretrained": [["backbone.pretrained=[a]"]],
    "backbone.hf_hub": [["backbone.hf_hub=[a]"]],
    "backbone.quick_gelu": [["backbone.quick_gelu=maybe"]],
    "backbone.routing_block": [["backbone.routing_block=6"], ["backbone.routing_block=-1"],
                               ["backbone.routing_block=4"]],  # the default tiny tower has 4 blocks (0-3)
    # suite
    "suite.name": [["suite.name=''"]],
    "suite.tasks": [["suite.tasks=[angles,angles]"], ["suite.tasks=[]"], ["suite.tasks=[nosuchtask]"],
                    ["suite.tasks=[angles,MNIST]"]],
    "suite.fixed_alpha": [["suite.fixed_alpha.tsv_m=inf"], ["suite.fixed_alpha.iso_c.tiny=nan"]],
    "suite.num_workers": [["suite='8'", *TALL, "suite.num_workers=-1"]],
    "suite.generator.seed": [["suite.generator.seed=-1"]],
    "suite.generator.image_size": [["suite.generator.image_size=4"]],
    "suite.generator.train_size": [["suite.generator.train_size=0"]],
    "suite.generator.validation_size": [["suite.generator.validation_size=0"]],
    "suite.generator.test_size": [["suite.generator.test_size=0"]],
    "suite.generator.pretrain_size": [["suite.generator.pretrain_size=0"]],
    "suite.generator.pretrain_signed_share": [["suite.generator.pretrain_signed_share=1.5"]],
    # endpoints
    "endpoints.source": [["endpoints.source=foo"]],
    "endpoints.pretrain.steps": [["endpoints.pretrain.steps=0"]],
    "endpoints.pretrain.class_caption_share": [["endpoints.pretrain.class_caption_share=1.5"]],
    "endpoints.pretrain.domain_captions": [["endpoints.pretrain.domain_captions=words"]],
    "endpoints.pretrain.patch_dropout": [["endpoints.pretrain.patch_dropout=1.0"], ["endpoints.pretrain.patch_dropout=-0.1"]],
    "endpoints.finetune.trainable": [["endpoints.finetune.trainable=mlp"]],
    "endpoints.finetune.linearized": [["endpoints.finetune.linearized=maybe"]],
    "endpoints.routing_param": [["endpoints.routing_param=mlp"]],
    "endpoints.build_workers": [["endpoints.build_workers=0"], ["endpoints.build_workers=many"]],
    "endpoints.pretrain.batch_size": [["endpoints.pretrain.batch_size=0"]],
    "endpoints.pretrain.lr": [["endpoints.pretrain.lr=0"]],
    "endpoints.pretrain.weight_decay": [["endpoints.pretrain.weight_decay=-1"]],
    "endpoints.pretrain.warmup_steps": [["endpoints.pretrain.warmup_steps=-1"]],
    "endpoints.finetune.epochs": [["endpoints.finetune.epochs=0"]],
    "endpoints.finetune.batch_size": [["endpoints.finetune.batch_size=0"]],
    "endpoints.finetune.lr": [["endpoints.finetune.lr=-1"]],
    "endpoints.finetune.weight_decay": [["endpoints.finetune.weight_decay=-0.1"]],
    "endpoints.finetune.warmup_steps": [["endpoints.finetune.warmup_steps=-1"]],
    "endpoints.model_names": [[*TALL, "endpoints.model_names=[a]"]],
    "endpoints.task_names": [[*TALL, "endpoints.task_names=[a]"]],
    "endpoints.reference_acc": [[*TALL, "endpoints.reference_acc=foo"]],
    "endpoints.allow_unsafe_pickle": [[*TALL, "endpoints.allow_unsafe_pickle=maybe"]],
    "endpoints.head_source": [[*TALL, "endpoints.head_source=openai"]],
    "endpoints.repo_id": [[*TALL, "endpoints.repo_id=''"]],
    "endpoints.finetuned_file": [[*TALL, "endpoints.finetuned_file=''"]],
    "endpoints.pretrained_file": [[*TALL, "endpoints.pretrained_file=''"]],
    "endpoints.revision": [[*TALL, "endpoints.revision=[a]"]],
    "endpoints.repo_template": [["endpoints=retrained", "endpoints.repo_template=''"]],
    "endpoints.pretrained_repo": [["endpoints=retrained", "endpoints.pretrained_repo=[a]"]],
    "endpoints.filename": [["endpoints=retrained", "endpoints.filename=[a]"], ["endpoints=fusion_bench", "endpoints.filename=''"]],
    "endpoints.filenames": [["endpoints=retrained", "endpoints.filenames=[a]"]],
    "endpoints.pretrained_filename": [["endpoints=fusion_bench", "endpoints.pretrained_filename=''"]],
    "endpoints.pattern": [["endpoints=local"], [*LOCAL, "endpoints.pattern=''"]],
    "endpoints.pretrained": [[*LOCAL, "endpoints.pretrained=[a]"]],
    "endpoints.kind": [[*LOCAL, "endpoints.kind=foo"]],
    # method (every merger's keys)
    "method.name": [["method.name=foo"]],
    "method.alpha": [["method.alpha=inf"], ["method=task_arithmetic", "method.alpha=null"], ["method.alpha=abc"]],
    "method.alpha_protocol": [["method.alpha_protocol=foo"]],
    "method.alpha_grid": [["method.alpha_protocol=validation", "method.alpha_grid=[]"],
                          ["method.alpha_grid=[0.1,nan]"]],
    "method.k": [["method=ties", "method.k=0"], ["method=consensus", "method.k=0"], [*SMILE, "method.k=0"],
                 [*SMILE, "method.k=-2"]],
    "method.merge_fn": [["method=ties", "method.merge_fn=foo"]],
    "method.lambdas": [["method=consensus", "method.lambdas=-1"], ["method=consensus", "method.lambdas=[0.4,0.4]"]],
    "method.lambda_protocol": [["method=consensus", "method.lambda_protocol=foo"]],
    "method.lambda_grid": [["method=consensus", "method.lambda_protocol=validation", "method.lambda_grid=[]"]],
    "method.rank": [["method=tsv_c", "method.rank=0"], ["method.rank=0"]],
    "method.rank_fraction": [["method.rank_fraction=1.5"], ["method.rank_fraction=0"]],
    "method.svd": [["method.svd=foo"]],
    "method.eps": [["method.eps=0"]],
    "method.common_space_fraction": [["method=iso_cts", "method.common_space_fraction=0"]],
    "method.gate_k": [[*SMILE, "method.gate_k=0"]],
    "method.top_k": [[*SMILE, "method.top_k=0"]],
    "method.average_experts": [[*SMILE, "method.average_experts=maybe"]],
    # router
    "router": [["method=finetuned"], ["method=smile", "router=projection"]],  # per-task / self-routing mergers cannot be routed
    "router.name": [["router.name=''"]],
    "router.block": [["router.block=99"], ["router.block=-1"]],
    # the router's input layer; mlp_in on attention-only endpoints leaves it no task subspace (a cross-key rule)
    "router.routing_param": [["router.routing_param=mlp"], ["endpoints.routing_param=mlp_in"],
                             ["endpoints.routing_param=attn_in", "endpoints.finetune.trainable=attention",
                              "router.routing_param=mlp_in"]],
    "router.token": [["router.token=foo"]],
    "router.norm": [["router.norm=foo"]],
    "router.mode": [["router.mode=foo"]],
    "router.threshold": [["router.threshold=-1"], ["router.threshold=1.5"], ["router.threshold=1"]],
    "router.temperature": [["router.temperature=0"], ["router.temperature=-1"]],
    "router.max_tasks": [["router.max_tasks=0"]],
    "router.batched": [["router.batched=maybe"]],
    "router.head_selection": [["router.head_selection=foo"]],
    "router.oracle_head": [["router.oracle_head=maybe"]],
    "router.oracle_routing": [["router.oracle_routing=maybe"]],
    "router.redundancy_eps": [["router.redundancy_eps=0"], ["method=ties", "router.redundancy_eps=0.3"]],
    "router.first_pass": [["router.first_pass=foo"]],
    "router.expert_cache_size": [["router.expert_cache_size=0"]],
    "router.expert_cache_gb": [["router.expert_cache_gb=0"], ["router.expert_cache_gb=-1"]],
    "router.expert_cache_free_fraction": [["router.expert_cache_free_fraction=0"],
                                          ["router.expert_cache_free_fraction=1.5"]],
    "router.split": [["router=nearest_neighbour", "router.split=test"], ["router=mlp", "router.split=test"]],
    "router.samples_per_task": [["router=nearest_neighbour", "router.samples_per_task=0"]],
    "router.sample_seed": [["router=mlp", "router.sample_seed=-1"]],
    "router.hidden_dim": [["router=mlp", "router.hidden_dim=0"]],
    "router.dropout": [["router=mlp", "router.dropout=1"]],
    "router.train.batch_size": [["router=mlp", "router.train.batch_size=0"]],
    "router.train.lr": [["router=mlp", "router.train.lr=0"]],
    "router.train.weight_decay": [["router=mlp", "router.train.weight_decay=-0.1"]],
    "router.train.t_max": [["router=mlp", "router.train.t_max=0"]],
    "router.train.max_epochs": [["router=mlp", "router.train.max_epochs=0"]],
    "router.train.batches_per_task": [["router=mlp", "router.train.batches_per_task=0"]],
    "router.train.gradient_clip_val": [["router=mlp", "router.train.gradient_clip_val=0"]],
    "router.foo": [["router.foo=1"], ["router=none", "router.threshold=0.2"]],  # unknown keys
    # logger
    "logger.name": [["logger.name=foo"]],
    "logger.group": [["logger.group=[a]"]],
    "logger.tags": [["logger.tags=abc"]],
    "logger.mode": [["logger.mode=foo"]],
    "logger.project": [["logger.project=''"]],
    "logger.entity": [["logger.entity=[a]"]],
    # trainer
    "trainer.accelerator": [["trainer.accelerator=foo"]],
    "trainer.devices": [["trainer.devices=0"], ["trainer.devices=many"]],
    "trainer.num_nodes": [["trainer.num_nodes=0"], ["trainer.num_nodes=2"]],
    "trainer.strategy": [["trainer.strategy=''"]],
    "trainer.precision": [["trainer.precision=foo"]],
    "trainer.enable_progress_bar": [["trainer.enable_progress_bar=maybe"]],
    # paths
    "paths.root_dir": [["paths.root_dir=''"]],
    "paths.output_dir": [["paths.output_dir=''"]],
    "paths.cache_dir": [["paths.cache_dir=''"]],
    "paths.hub_cache_dir": [["paths.hub_cache_dir=[a]"]],
    "paths.hf_cache_dir": [["paths.hf_cache_dir=[a]"]],
    "paths.results_store": [["paths.results_store=''"]],
}
# keys whose error names another key (the message names the key that must change)
NAMED = {"router.foo": None, "router": "router", "trainer.num_nodes": "trainer.num_nodes"}

# the issue's ten settings, against the default run
ISSUE_TABLE = ["eval.batch_size=0", "router.temperature=0", "router.max_tasks=0", "method.rank=0", "seed=abc",
               "router.block=99", "suite.tasks=[angles,angles]", "router.threshold=-1", "router.threshold=1.5",
               "eval.max_samples_per_task=-3"]

VALID_EDGES = [["router.threshold=0"], ["router.max_tasks=null"], ["router.threshold=0.999"], ["router.block=0"],
               ["router.block=3"], ["method.rank=1"], ["eval.max_samples_per_task=1"], ["seed=4294967295"],
               ["method=tsv_c", "router=none", "method.rank_fraction=1"], ["trainer.devices=auto"], ["router=none", "method=finetuned"],
               ["method=consensus", "method.lambdas=[0.1,0.2,0.3,0.4,0.5,0.6]"], [*LOCAL], ["suite='8'", *TALL],
               ["endpoints.finetune.trainable=attention", "endpoints.routing_param=attn_in"],
               ["endpoints.finetune.trainable=attention", "router.routing_param=attn_in"],
               ["endpoints.finetune.trainable=attention", "router=oracle"],
               ["endpoints.finetune.trainable=attention", "router=none"],
               ["backbone.arch=mass-tiny-ViT", "backbone.routing_block=5"],
               ["endpoints.finetune.trainable=all", "endpoints.routing_param=mlp_in"],
               ["endpoints.build_workers=1"], ["endpoints.build_workers=4"]]


def _all_keys() -> set[str]:
    keys = set(schema_keys(Config))
    for group, kinds in GROUP_SCHEMAS.items():
        for schema in kinds.values():
            keys |= {f"{group}.{k}" for k in schema_keys(schema)}
    return keys


def test_every_key_has_an_invalid_case():
    missing = sorted(_all_keys() - set(INVALID))
    assert not missing, f"schema keys without an invalid case in INVALID: {missing}"


# ------------------------------------------------------------------------------------------- in-process checks

_PARSER = OverridesParser.create()


GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()}


def _is_choice(o: str) -> bool:
    return o.split("=", 1)[0].lstrip("+~") in GROUPS


@lru_cache(maxsize=None)
def _base(choices: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(choices))


def fast_check(overrides: list[str]):
    """Compose the group choices (cached), apply the value overrides with OmegaConf's typed update, validate."""
    choices = tuple(o for o in overrides if _is_choice(o))
    values = [o for o in overrides if o not in choices]
    cfg = copy.deepcopy(_base(choices))
    for o in values:
        parsed = _PARSER.parse_override(o)
        try:
            OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), merge=True)
        except OmegaConfBaseException as e:
            raise composition_error(e, overrides) from None
    return validate(cfg)


CASES = [(k, ov) for k, cases in INVALID.items() for ov in cases]


@pytest.mark.parametrize("key,overrides", CASES, ids=[" ".join(ov) for _, ov in CASES])
def test_invalid_value_gives_one_line_naming_the_key(key, overrides):
    with pytest.raises(ConfigError) as e:
        fast_check(overrides)
    msg = str(e.value)
    assert "\n" not in msg
    named = NAMED.get(key, key)
    bad = overrides[-1].split("=", 1)[0]
    assert msg.startswith(f"{named or bad}="), msg
    assert ": " in msg and "; " in msg, msg  # <key>=<value>: <why>; <what to do>


@pytest.mark.parametrize("setting", ISSUE_TABLE)
def test_issue_settings_refused_by_the_full_composition(setting):
    with pytest.raises(ConfigError) as e:
        check_overrides([setting], config_dir=str(CONF))
    assert str(e.value).startswith(setting.split("=")[0] + "="), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", VALID_EDGES, ids=[" ".join(v) for v in VALID_EDGES])
def test_valid_edge_values_pass(overrides):
    fast_check(overrides)


def test_fast_check_agrees_with_full_composition():
    """The in-process shortcut gives the same lines as Hydra's own compose for a type error and a range error."""
    for ov in (["seed=abc"], ["router.threshold=1.5"], ["method=ties", "method.k=0"], ["router.foo=1"]):
        with pytest.raises(ConfigError) as full:
            check_overrides(ov, config_dir=str(CONF))
        with pytest.raises(ConfigError) as fast:
            fast_check(ov)
        assert str(full.value).split(":")[0] == str(fast.value).split(":")[0], (full.value, fast.value)


# ----------------------------------------------------------------------------------------- the real commands

def _cli(entry: str, args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASS_EXP_OUTPUT_DIR=str(out), MASS_EXP_CACHE_DIR=str(out / "cache"), WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    code = f"import sys; from mass_exp.cli import {entry}; sys.argv = ['mass-exp'] + sys.argv[1:]; {entry}()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("entry,args,key", [
    ("evaluate", ["router.threshold=1.5"], "router.threshold"),
    ("evaluate", ["seed=abc"], "seed"),
    ("evaluate", ["suite=9"], "suite"),
    ("prefetch", ["eval.batch_size=0"], "eval.batch_size"),
    ("finetune", ["method=tsv_c", "method.rank=0"], "method.rank"),
])
def test_commands_exit_2_with_one_line_and_write_nothing(tmp_path, entry, args, key):
    out = tmp_path / "out"
    proc = _cli(entry, args, out)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "HYDRA_FULL_ERROR" not in proc.stderr
    assert not out.exists(), list(out.rglob("*"))  # no run dir, no results.json, no W&B run, no cache entry


def test_a_sweep_value_hydra_cannot_compose_is_refused_before_the_sweep(tmp_path):
    """Hydra composes each job only when it launches it: a wrong type would abort the sweep there. It is refused
    up front instead, one line per bad value, before any job runs."""
    out = tmp_path / "out"
    proc = _cli("evaluate", ["-m", "router.threshold=0.1,abc", "method=tsv_m,nosuch"], out)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert sorted(l.split(":")[1].strip() for l in lines) == ["method=nosuch", "router.threshold=abc"], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("overrides,why", [
    (["method=smile", "router=projection"], "use router=none"),  # SMILE routes per token itself
    (["router=nearest_neighbour", "router.split=test"], "never see test images"),  # sample routers: train/validation
])
def test_refusals_say_why_and_what_to_do(overrides, why):
    with pytest.raises(ConfigError) as e:
        check_overrides(overrides, config_dir=str(CONF))
    assert why in str(e.value)
