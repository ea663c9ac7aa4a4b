"""End-to-end fixtures: a reduced mini configuration run through the real `mass-exp` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# the width-128 6-block tiny tower (the default before issue 12), for tests that build their own checkpoints of it
SMALL_ARCH = "mass-tiny-ViT"
SMALL_TOWER = [f"backbone.arch={SMALL_ARCH}", "backbone.routing_block=4"]
SMOKE_RECIPE = [
    *SMALL_TOWER,
    "endpoints.finetune.trainable=all", "endpoints.routing_param=mlp_in", "endpoints.finetune.lr=1e-4",
    "endpoints.pretrain.class_caption_share=1.0", "endpoints.pretrain.domain_captions=caption",
    "suite.generator.pretrain_signed_share=0.01",
]
# 3 tasks, a few hundred images, a short pretraining: the whole pipeline (generate -> pretrain -> heads ->
# fine-tune -> merge -> evaluate -> log) in about a minute on 2 CPU cores.
SMOKE = [
    "suite.tasks=[angles,ramps,locations]",
    "suite.generator.train_size=320", "suite.generator.validation_size=60", "suite.generator.test_size=101",
    "suite.generator.pretrain_size=400",
    "endpoints.pretrain.steps=40", "endpoints.pretrain.batch_size=64", "endpoints.pretrain.warmup_steps=5",
    "endpoints.finetune.epochs=2", "endpoints.finetune.batch_size=32",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    # the previous default recipe (width-128 6-block tower, ordinary fine-tuning, the paper's mlp_in router, plain
    # pretraining): a quarter of the new default's compute, and it keeps the paper's routing path under test
    *SMOKE_RECIPE,
]


def run_cli(args: list[str], out_dir: Path, entry: str = "evaluate", timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASS_EXP_OUTPUT_DIR=str(out_dir), MASS_EXP_CACHE_DIR=str(out_dir.parent / "cache"),
               WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_SILENT="true")
    code = f"import sys; from mass_exp.cli import {entry}; sys.argv = ['mass-exp'] + sys.argv[1:]; {entry}()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout)


def find_results(out_dir: Path) -> list[dict]:
    """The results.json of each run directory under `out_dir` (not the copies filed in the results store)."""
    return [json.loads(p.read_text()) for p in sorted(out_dir.rglob("results.json")) if "results_store" not in p.parts]


def run_smoke(args: list[str], out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """One smoke run that must succeed (no logger) and its one results.json."""
    proc = run_cli(SMOKE + ["logger=none"] + args, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (res,) = find_results(out)
    return proc, res


# smoke_root / first_run live in tests/conftest.py: the DDP tests reuse the smoke run's asset cache.
