"""The paper's code path without the downloads: suite=8 with an `openai` backbone found in a hub-layout cache,
local fine-tuned endpoints and local copies of the 8 datasets (a few generated images each), fully offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mass_exp.data.tasks import get_tasks, suite_task_names
from mass_exp.models.clip import create_clip
from mass_exp.utils.io import save_tensors

from .conftest import SMALL_ARCH, SMALL_TOWER

HUB_REPO = "fake-org/tiny-clip.openai"  # stands in for timm/vit_base_patch32_clip_224.openai
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _write_hub_snapshot(hub: Path, repo: str, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """A HF hub cache entry laid out as huggingface_hub writes it: refs/main -> snapshots/<commit>/<file>."""
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, tensors in files.items():
        save_tensors(root / "snapshots" / COMMIT / name, tensors)


def _write_dataset(path: Path, classnames: list[str], n_train: int, n_test: int, seed: int) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classnames)})

    def split(n):
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)],
             "label": rng.integers(0, len(classnames), n).tolist()}, features=feats)

    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": split(n_train), "test": split(n_test)}).save_to_disk(str(path))


@pytest.fixture(scope="module")
def fake_world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real_path")
    torch.manual_seed(0)
    model, _, _ = create_clip(SMALL_ARCH, None)
    _write_hub_snapshot(root / "hub", HUB_REPO, {"open_clip_model.safetensors": model.state_dict()})
    visual = model.visual.state_dict()
    tasks = get_tasks(suite_task_names("8"))
    for i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(100 + i)
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in visual.items()}
        d = root / "endpoints" / task.name
        d.mkdir(parents=True)
        if i % 2:  # half as pickled (weights-only) state dicts with the TALL-masks prefix, half as safetensors
            torch.save({f"model.visual.{k}": v for k, v in ft.items()}, d / "finetuned.pt")
        else:
            save_tensors(d / "finetuned.safetensors", ft)
        _write_dataset(root / "data" / task.name, list(task.classnames), n_train=12, n_test=5 + i, seed=i)
    return {"root": root, "tasks": [t.name for t in tasks]}


def _overrides(root: Path) -> list[str]:
    return ["backbone=tiny", *SMALL_TOWER, "backbone.pretrained=openai",
            f"backbone.hf_hub={HUB_REPO}", "suite=8", "endpoints=local",
            f"endpoints.pattern='{root}/endpoints/{{task}}/finetuned.*'", f"data.local_pattern='{root}/data/{{task}}'",
            "logger=csv", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


def _run(entry: str, args: list[str], root: Path, hub: Path, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASS_EXP_OUTPUT_DIR=str(root / "out"), MASS_EXP_CACHE_DIR=str(cache or root / "cache"),
               HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    code = f"import sys; from mass_exp.cli import {entry}; sys.argv = ['mass-exp'] + sys.argv[1:]; {entry}()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)


def test_suite8_mass_runs_end_to_end_offline_on_local_assets(fake_world):
    root = fake_world["root"]
    proc = _run("evaluate", _overrides(root) + ["hydra.run.dir=" + str(root / "out" / "mass")], root, root / "hub")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((root / "out" / "mass" / "results.json").read_text())
    assert res["status"] == "complete" and res["method"] == "tsv_m" and res["router"]["name"] == "projection"
    assert list(res["tasks"]) == fake_world["tasks"]
    assert [e["samples"] for e in res["tasks"].values()] == [5 + i for i in range(8)]
    assert all(0 <= e["acc"] <= 1 and 1 <= e["router_mean_tasks"] <= 8 for e in res["tasks"].values())
    assert res["config"]["backbone"]["pretrained"] == "openai"


def test_prefetch_verifies_everything_offline(fake_world):
    root = fake_world["root"]
    proc = _run("prefetch", _overrides(root), root, root / "hub")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "prefetched" in proc.stdout


def test_offline_run_with_missing_backbone_weights_stops_with_one_line(fake_world, tmp_path):
    root = fake_world["root"]
    proc = _run("evaluate", _overrides(root) + ["resume=false"], root, tmp_path / "empty_hub", cache=tmp_path / "cache")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    assert HUB_REPO in lines[0] and "mass-exp-prefetch" in lines[0]
    # it stopped before any work: nothing was converted, no head was built
    assert not (tmp_path / "cache" / "endpoints").exists() and not (tmp_path / "cache" / "heads").exists()


def test_method_finetuned_measures_and_stores_the_reference_for_any_source(fake_world):
    root = fake_world["root"]
    run_dir = root / "out" / "finetuned"
    proc = _run("evaluate", _overrides(root) + ["method=finetuned", "router=none", f"hydra.run.dir={run_dir}"],
                root, root / "hub")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((run_dir / "results.json").read_text())
    stored = json.loads((run_dir / "finetuned_acc.json").read_text())
    assert stored == {"tiny": {t: e["acc"] for t, e in res["tasks"].items()}}
    assert res["finetuned_acc_source"].startswith("measured (local")
    assert all(e["normalized_acc"] == pytest.approx(1.0) for e in res["tasks"].values() if e["acc"] > 0)
