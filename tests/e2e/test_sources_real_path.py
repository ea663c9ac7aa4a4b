"""The real-checkpoint path for each checkpoint source, offline, on fake snapshots in the source's own layout:
tall_masks (nik-dim/tall_masks single_task/<model>/<Task>Val/*.pt), retrained (crisostomi/<model>-<Task> with
pytorch_model.bin) and fusion_bench (tanganke/<model>_<task> transformers safetensors), each in a hub-layout cache,
with local copies of the tasks' data laid out as the hub datasets are (ClassLabel names in label order; FER2013 as
clip-benchmark/wds_fer2013's jpg / cls columns). A tiny backbone and a few images per task keep it cheap."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from mass_exp.data.tasks import get_task, suite_task_names
from mass_exp.endpoints.hf_clip import open_clip_to_hf_clip_vision
from mass_exp.endpoints.sources import FUSION_BENCH_TASK_NAMES
from mass_exp.models.clip import create_clip

from .conftest import SMALL_ARCH, SMALL_TOWER

ARCH = SMALL_ARCH  # the checkpoints written here must be the tower SMALL_TOWER selects
HUB_REPO = "fake-org/tiny-clip.openai"
TASKS20 = suite_task_names("20")


def put_hub_file(cache: Path, repo_id: str, filename: str, data: bytes) -> None:
    """One file as huggingface_hub caches it: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(os.path.relpath(blob, link.parent))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _st_bytes(sd) -> bytes:
    return st_save({k: v.contiguous() for k, v in sd.items()})


def _write_task_data(path: Path, task: str, seed: int, label_names: list[str] | None = None) -> None:
    """A local copy of a task's dataset, laid out like its hub dataset, with 3 test and 10 train images (1 carved
    for validation)."""
    import datasets
    import numpy as np
    from PIL import Image

    spec = get_task(task)
    names = label_names or list(spec.label_names)
    rng = np.random.default_rng(seed)
    img_col, lab_col = spec.image_column, spec.label_column
    label_feat = datasets.Value("int64") if task == "FER2013" else datasets.ClassLabel(names=names)
    feats = datasets.Features({img_col: datasets.Image(), lab_col: label_feat})

    def split(n):
        return datasets.Dataset.from_dict(
            {img_col: [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)],
             lab_col: rng.integers(0, len(names), n).tolist()}, features=feats)

    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": split(10), spec.test_split: split(3)}).save_to_disk(str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sources_real_path")
    torch.manual_seed(0)
    model, _, _ = create_clip(ARCH, None)
    hub = root / "hub"
    put_hub_file(hub, HUB_REPO, "open_clip_model.safetensors", _st_bytes(model.state_dict()))
    visual = model.visual.state_dict()
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}

    def ft(i):
        g = torch.Generator().manual_seed(100 + i)
        return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in visual.items()}

    # tall_masks: one repo, single_task/<model>/<Task>Val/nonlinear_finetuned.pt (+ the zero-shot full CLIP)
    put_hub_file(hub, "nik-dim/tall_masks", f"single_task/{ARCH}/MNISTVal/nonlinear_zeroshot.pt",
                 _torch_bytes({f"model.{k}": v for k, v in {**{f"visual.{k}": v for k, v in visual.items()},
                                                             **rest}.items()}))
    for i, t in enumerate(TASKS20):
        sd = ft(i)
        put_hub_file(hub, "nik-dim/tall_masks", f"single_task/{ARCH}/{t}Val/nonlinear_finetuned.pt",
                     _torch_bytes({f"model.visual.{k}": v for k, v in sd.items()}))
        # retrained: crisostomi/<model>-<Task>/pytorch_model.bin
        put_hub_file(hub, f"crisostomi/{ARCH}-{t}", "pytorch_model.bin",
                     _torch_bytes({f"visual.{k}": v for k, v in sd.items()}))
        # fusion_bench: tanganke/<model>_<task>/model.safetensors, transformers CLIPVisionModel weights
        fb_name = FUSION_BENCH_TASK_NAMES.get(t, "emnist_mnist")
        put_hub_file(hub, f"tanganke/clip-tiny_{fb_name}", "model.safetensors",
                     _st_bytes(open_clip_to_hf_clip_vision(sd, with_projection=False)))
        _write_task_data(root / "data" / t, t, seed=i)
    put_hub_file(hub, f"crisostomi/{ARCH}-base", "pytorch_model.bin",
                 _torch_bytes({**{f"visual.{k}": v for k, v in visual.items()}, **rest}))
    # a copy of DTD whose ClassLabel names are out of order (first two swapped), for the label guard
    dtd = list(get_task("DTD").label_names)
    _write_task_data(root / "bad" / "DTD", "DTD", seed=99, label_names=[dtd[1], dtd[0]] + dtd[2:])
    return {"root": root, "hub": hub}


def _overrides(root: Path, source: str, suite: str, data: str = "data") -> list[str]:
    return ["backbone=tiny", *SMALL_TOWER, "backbone.pretrained=openai",
            f"backbone.hf_hub={HUB_REPO}", f"suite={suite}",
            f"endpoints={source}", f"data.local_pattern='{root}/{data}/{{task}}'", "method=task_arithmetic",
            "router=none", "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "eval.num_workers=0", "resume=false"]


def _run(entry: str, args: list[str], w: dict, cache: str) -> subprocess.CompletedProcess:
    root = w["root"]
    env = dict(os.environ, MASS_EXP_OUTPUT_DIR=str(root / "out"), MASS_EXP_CACHE_DIR=str(root / cache),
               HF_HUB_CACHE=str(w["hub"]), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    code = f"import sys; from mass_exp.cli import {entry}; sys.argv = ['mass-exp'] + sys.argv[1:]; {entry}()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)


def _head_rows(cache: Path, task: str) -> set[int]:
    """Row counts of the cached heads of `task` (the runs share one cache: a head built for one source is reused by
    another only when class names, templates, synonyms, label map and preprocessing all agree)."""
    return {load_file(str(f))["head"].shape[0] for f in (cache / "heads").glob(f"tiny-{task}-*.safetensors")}


def _evaluate(w: dict, source: str, suite: str, extra: list[str] = ()) -> dict:
    run_dir = w["root"] / "out" / f"{source}-{suite}"
    cache = "cache"
    proc = _run("evaluate", _overrides(w["root"], source, suite) + list(extra) + [f"hydra.run.dir={run_dir}"],
                w, cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "complete" and res["head_source"] == source
    assert all(e["samples"] == 3 and 0 <= e["acc"] <= 1 for e in res["tasks"].values())
    return {"res": res, "cache": w["root"] / cache}


def test_suite8_retrained(world):
    out = _evaluate(world, "retrained", "8")
    assert list(out["res"]["tasks"]) == suite_task_names("8")  # SVHN included
    assert _head_rows(out["cache"], "RESISC45") == {45}


def test_suite20_tall_masks(world):
    out = _evaluate(world, "tall_masks", "20")
    res = out["res"]
    assert list(res["tasks"]) == TASKS20
    assert "EMNIST" in res["task_warnings"] and "digits" in res["task_warnings"]["EMNIST"]
    assert 7 in _head_rows(out["cache"], "FER2013")


def test_suite20_fusion_bench(world):
    out = _evaluate(world, "fusion_bench", "20", ["+endpoints.model_names.mass-tiny-ViT=clip-tiny",
                                                  "+endpoints.task_names.EMNIST=emnist_mnist"])
    assert list(out["res"]["tasks"]) == TASKS20
    assert _head_rows(out["cache"], "Food101") == {101}
    # tall_masks (torchvision order, label map) and fusion_bench (FusionBench's swapped names) heads are different
    assert len(list((out["cache"] / "heads").glob("tiny-Food101-*.safetensors"))) == 2 if (
        world["root"] / "out" / "tall_masks-20" / "results.json").exists() else True


@pytest.mark.parametrize("entry", ["evaluate", "prefetch"])
def test_label_names_that_disagree_with_the_head_stop_with_one_line(world, entry):
    root = world["root"]
    args = _overrides(root, "retrained", "8") + [f"+data.local_dirs.DTD={root}/bad/DTD"]
    proc = _run(entry, args, world, f"cache-bad-{entry}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    assert "task DTD" in lines[0] and "label 0" in lines[0] and "data.accept_label_mismatch" in lines[0]
    assert not (root / f"cache-bad-{entry}" / "heads").exists()  # it stopped before any work


@pytest.mark.parametrize("source", ["tall_masks", "retrained", "fusion_bench"])
def test_mass_exp_tasks_json_offline(source, capsys, monkeypatch, tmp_path):
    from mass_exp.cli import tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    tasks(["suite=20", f"endpoints={source}", "backbone=ViT-B-32", "--json"])  # in-process: no weights, no data
    out, err = capsys.readouterr()
    table = json.loads(out)
    assert list(table) == TASKS20
    keys = {"hf_dataset", "hf_config", "test_split", "val_split", "num_classes", "head_source", "classnames",
            "templates", "label_map", "preprocess", "reference_acc"}
    assert all(set(e) == keys for e in table.values())
    assert all(e["head_source"] == source for e in table.values())
    assert table["SVHN"]["hf_config"] == "cropped_digits"
    assert table["FER2013"]["hf_dataset"] == "clip-benchmark/wds_fer2013"
    if source == "tall_masks":
        assert table["FER2013"]["classnames"][3] == ["happy", "smiling"]  # synonym lists stay lists
        assert table["EMNIST"]["hf_dataset"] is None and "WARNING: task EMNIST" in err  # said loudly
        assert table["Cars"]["reference_acc"] is not None
    if source == "retrained":
        assert table["CIFAR10"]["num_classes"] == 11 and table["CIFAR10"]["label_map"]["8"] == 9
        assert table["EMNIST"]["preprocess"] == ["rotate_-90", "hflip"]
    if source == "fusion_bench":
        assert table["Food101"]["classnames"][16] == "cheese plate" and table["Cars"]["reference_acc"] is None


def test_mass_exp_tasks_readable_table(capsys):
    from mass_exp.cli import tasks

    tasks(["suite=20", "endpoints=tall_masks", "backbone=ViT-B-16"])
    out = capsys.readouterr().out
    assert "FER2013" in out and "['happy', 'smiling']" in out and "preprocess   grayscale" in out
    assert "WARNING      tall_masks fine-tuned EMNIST" in out and "label map    {'16': 17, '17': 16}" in out
    with pytest.raises(SystemExit) as e:
        tasks(["suite=20", "endpoints=nope"])
    assert e.value.code == 2
