"""Distributed evaluation is exact: 2 CPU processes (DDP, gloo) through the real CLI give the one-process numbers.

The mini suite of the e2e smoke config has 101 test images per task (odd: rank 0 gets 51, rank 1 gets 50; at batch
size 25 that is 3 vs 2 batches, so the ranks also run different numbers of steps). The one-process runs start from
the e2e smoke run's assets (tiny CLIP, endpoints) and add the factor store; the DDP runs use a copy of that cache
without the fine-tuned reference accuracies, so those are measured (test split) and validated (validation split,
after the process group exists) under DDP too, and written by rank 0 alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from e2e.conftest import SMOKE, find_results, run_cli
except ImportError:  # pragma: no cover - run from the repository root with `python -m pytest`
    from tests.e2e.conftest import SMOKE, find_results, run_cli

from .ddp_toy import run as run_toy

pytestmark = pytest.mark.slow

TEST_SIZE = 101  # SMOKE's suite.generator.test_size
COMMON = SMOKE + ["eval.batch_size=25"]
STATIC = ["method=task_arithmetic", "router=none", "method.alpha_protocol=validation",
          "method.alpha_grid=[0.1,0.5,1.0]", "logger=csv"]
MASS = ["method=tsv_m", "router=projection", "logger=wandb"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def run_ddp(args: list[str], out_dir: Path, cache_dir: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m mass_exp` (Lightning re-launches rank 1 with the same command; `python -c` cannot be re-run)."""
    env = dict(os.environ, MASS_EXP_OUTPUT_DIR=str(out_dir), MASS_EXP_CACHE_DIR=str(cache_dir), WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mass_exp", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def run_results(out_dir: Path) -> list[dict]:
    """The results.json files of the Hydra run directories (the results store keeps its own copy)."""
    return find_results(out_dir)


@pytest.fixture(scope="session")
def ddp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="session")
def single(ddp_root, first_run, smoke_root):
    """One-process runs, on a copy of the e2e smoke runs' asset cache (the same SMOKE assets: data, tiny CLIP,
    endpoints, heads) without its fine-tuned references (other e2e runs filed some), which these runs measure."""
    shutil.copytree(smoke_root / "cache", ddp_root / "cache", ignore=shutil.ignore_patterns("reference"))
    out = {}
    for name, args in (("static", STATIC), ("mass", MASS)):
        t0 = time.time()
        proc = run_cli(COMMON + args, ddp_root / f"single_{name}")
        assert proc.returncode == 0, proc.stderr[-4000:]
        (res,) = run_results(ddp_root / f"single_{name}")
        out[name] = res
        print(f"one process, {name}: {time.time() - t0:.1f}s")
    return out


@pytest.fixture(scope="session")
def ddp(ddp_root, single):
    cache = ddp_root / "ddp_cache"
    shutil.copytree(ddp_root / "cache", cache, ignore=shutil.ignore_patterns("reference"))
    out = {}
    for name, args in (("static", STATIC), ("mass", MASS)):
        t0 = time.time()
        proc = run_ddp(COMMON + args + DDP, ddp_root / f"ddp_{name}", cache)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[name] = (proc, ddp_root / f"ddp_{name}")
        print(f"DDP 2 x CPU, {name}: {time.time() - t0:.1f}s")
    return out


def _per_task_equal(one: dict, two: dict) -> None:
    assert list(one["tasks"]) == list(two["tasks"])
    for name, e in one["tasks"].items():
        assert two["tasks"][name] == e, name  # every figure, exactly (counts, accuracies, diagnostics)
        assert e["samples"] == TEST_SIZE
    assert two["average"] == one["average"]


def test_static_merger_equals_one_process(single, ddp):
    proc, out = ddp["static"]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # rank 1 did run
    (res,) = run_results(out)
    assert res["config"]["trainer"]["strategy"] == "ddp" and res["config"]["trainer"]["devices"] == 2
    assert TEST_SIZE % 2 == 1
    _per_task_equal(single["static"], res)
    # the validation sweep (run after the process group exists) and the coefficient it chose
    assert res["alpha_sweep"] == single["static"]["alpha_sweep"] and len(res["alpha_sweep"]) == 3
    assert res["alpha"] == single["static"]["alpha"] and res["alpha_protocol"] == "validation"


def test_reference_cache_written_by_rank_zero_equals_one_process(ddp_root, ddp):
    one = sorted((ddp_root / "cache" / "reference").glob("*.json"))
    two = sorted((ddp_root / "ddp_cache" / "reference").glob("*.json"))
    assert [p.name for p in one] == [p.name for p in two] and len(two) == 2  # test and validation splits
    for a, b in zip(one, two):
        assert json.loads(a.read_text()) == json.loads(b.read_text())
    assert not list((ddp_root / "ddp_cache" / "reference").glob(".*.tmp"))


def test_mass_router_equals_one_process(single, ddp):
    _, out = ddp["mass"]
    (res,) = run_results(out)
    one = single["mass"]
    _per_task_equal(one, res)
    for e in res["tasks"].values():
        assert {"acc_paper_rule", "router_task_id_acc", "router_survival", "router_mean_tasks"} <= set(e)
    cm = res["router"]["confusion_matrix"]
    assert cm == one["router"]["confusion_matrix"]
    assert [sum(row) for row in cm] == [TEST_SIZE] * len(res["tasks"])


@pytest.mark.parametrize("name", ["static", "mass"])
def test_rank_zero_alone_writes(ddp, name):
    proc, out = ddp[name]
    runs = [p for p in out.rglob("results.json") if "results_store" not in p.parts]
    assert len(runs) == 1
    assert proc.stdout.count(" / router ") == 1  # the table, printed once
    assert (proc.stdout + proc.stderr).count("results written to") == 1
    if name == "mass":
        assert len(list(out.rglob("router_confusion.png"))) == 1
        assert len(list(out.rglob("offline-run-*"))) == 1  # one W&B run
    else:
        assert len(list(out.rglob("metrics.csv"))) == 1


def test_ranks_without_data_take_part_in_every_sync(tmp_path):
    """Toy predictor with router diagnostics, 3 ranks, tasks of 1, 2 and 1 samples: rank 2 sees no sample at all,
    rank 1 only one of task 1. Every rank finishes with the same results, equal to one device's; no sample twice."""
    sizes = [1, 2, 1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("ddp_toy.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ddp"), "3", *map(str, sizes)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(3)]
    one = run_toy(tmp_path / "one", 0, sizes)
    assert one["world_size"] == 1
    assert ranks[1]["seen"] == [[], [1001], []] and ranks[2]["seen"] == [[], [], []]
    for r in ranks:
        assert r["world_size"] == 3
        assert r["results"] == one["results"] and r["confusion_matrix"] == one["confusion_matrix"]
    assert [e["samples"] for e in one["results"].values()] == sizes
    assert all("router_task_id_acc" in e for e in one["results"].values())
    for t, n in enumerate(sizes):
        seen = [i for r in ranks for i in r["seen"][t]]
        assert sorted(seen) == [1000 * t + i for i in range(n)]
