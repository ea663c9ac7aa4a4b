"""Every endpoint source resolves through a fake Hugging Face cache (the layout huggingface_hub writes) or local
files, and loads through the real code to exactly the weights written."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from mass_exp.endpoints.hf_clip import open_clip_to_hf_clip_vision
from mass_exp.endpoints.sources import (
    ResolvedEndpoints,
    materialize_endpoints,
    pick_weight_file,
    required_hub_files,
    resolve_endpoints,
)
from mass_exp.errors import ConfigError
from mass_exp.merging.task_vectors import LazyStateDict

from .conftest import perturbed

ARCH = "mass-tiny-ViT"
TASKS = ["Cars", "DTD"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")




def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _st_bytes(sd) -> bytes:
    return st_save({k: v.contiguous() for k, v in sd.items()})


def put_hub_file(cache: Path, repo_id: str, filename: str, data: bytes, commit: str | None = None) -> Path:
    """Write one file as huggingface_hub caches it: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def _materialized(resolved: ResolvedEndpoints, tmp_path, ref, **kw):
    pre, fts = materialize_endpoints(resolved, tmp_path / "materialized", ref, backbone=ARCH, **kw)
    load = lambda p: dict(LazyStateDict(p).items())
    return (load(pre) if pre else None), {t: load(p) for t, p in fts.items()}


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in b:
        assert torch.equal(a[k], b[k]), k


def _full_clip_sd(clip, visual):
    rest = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    return {**{f"visual.{k}": v for k, v in visual.items()}, **rest}


# -------------------------------------------------------------------------------------------- tall_masks


def _fill_tall_masks(cache, clip, ref):
    weights = {"pretrained": perturbed(ref, 10), "Cars": perturbed(ref, 11), "DTD": perturbed(ref, 12)}
    base = f"single_task/{ARCH}"
    put_hub_file(cache, "nik-dim/tall_masks", f"{base}/MNISTVal/nonlinear_zeroshot.pt",
                 _torch_bytes({f"model.{k}": v for k, v in _full_clip_sd(clip, weights["pretrained"]).items()}))
    for task in TASKS:
        put_hub_file(cache, "nik-dim/tall_masks", f"{base}/{task}Val/nonlinear_finetuned.pt",
                     _torch_bytes({f"model.visual.{k}": v for k, v in weights[task].items()}))
    return weights


def test_fake_cache_is_what_huggingface_hub_reads(tmp_path, clip, ref):
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    _fill_tall_masks(tmp_path / "hub", clip, ref)
    name = f"single_task/{ARCH}/CarsVal/nonlinear_finetuned.pt"
    got = hf_hub_download("nik-dim/tall_masks", name, cache_dir=tmp_path / "hub", local_files_only=True)
    assert Path(got).is_file()
    assert try_to_load_from_cache("nik-dim/tall_masks", name, cache_dir=tmp_path / "hub") == got


@pytest.mark.parametrize("download", [False, True])
def test_tall_masks(tmp_path, clip, ref, download):
    cache = tmp_path / "hub"
    weights = _fill_tall_masks(cache, clip, ref)
    resolved = resolve_endpoints("tall_masks", backbone=ARCH, tasks=TASKS, options={}, hub_cache_dir=str(cache),
                                 download=download)
    assert resolved.pretrained.filename == f"single_task/{ARCH}/MNISTVal/nonlinear_zeroshot.pt"
    assert resolved.finetuned["DTD"].repo_id == "nik-dim/tall_masks"
    assert resolved.finetuned["DTD"].kind == "open_clip"
    assert list(resolved.finetuned) == TASKS
    pre, fts = _materialized(resolved, tmp_path, ref)
    _assert_same(pre, weights["pretrained"])
    for task in TASKS:
        _assert_same(fts[task], weights[task])
    assert required_hub_files("tall_masks", backbone=ARCH, tasks=TASKS, hub_cache_dir=str(cache)) == [
        ("nik-dim/tall_masks", f"single_task/{ARCH}/MNISTVal/nonlinear_zeroshot.pt"),
        ("nik-dim/tall_masks", f"single_task/{ARCH}/CarsVal/nonlinear_finetuned.pt"),
        ("nik-dim/tall_masks", f"single_task/{ARCH}/DTDVal/nonlinear_finetuned.pt"),
    ]


class TallImageEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model


def test_tall_masks_pickled_module_needs_the_opt_in(tmp_path, clip, ref):
    import copy

    cache = tmp_path / "hub"
    weights = _fill_tall_masks(cache, clip, ref)
    full = copy.deepcopy(clip)
    full.visual.load_state_dict(weights["Cars"])
    # overwrite Cars with a whole pickled module (a newer commit of the repo)
    folder = cache / "models--nik-dim--tall_masks"
    commit = (folder / "refs" / "main").read_text()
    link = folder / "snapshots" / commit / f"single_task/{ARCH}/CarsVal/nonlinear_finetuned.pt"
    link.unlink()
    put_hub_file(cache, "nik-dim/tall_masks", f"single_task/{ARCH}/CarsVal/nonlinear_finetuned.pt",
                 _torch_bytes(TallImageEncoder(full)), commit=commit)
    resolved = resolve_endpoints("tall_masks", backbone=ARCH, tasks=TASKS, options={}, hub_cache_dir=str(cache),
                                 download=False)
    with pytest.raises(ConfigError) as e:
        _materialized(resolved, tmp_path, ref)
    assert "CarsVal/nonlinear_finetuned.pt" in str(e.value) and "endpoints.allow_unsafe_pickle=true" in str(e.value)
    _, fts = _materialized(resolved, tmp_path, ref, allow_unsafe_pickle=True)
    _assert_same(fts["Cars"], weights["Cars"])


def test_offline_missing_cache_file(tmp_path, clip, ref):
    cache = tmp_path / "hub"
    _fill_tall_masks(cache, clip, ref)
    with pytest.raises(ConfigError) as e:
        resolve_endpoints("tall_masks", backbone=ARCH, tasks=["Cars", "SVHN"], options={},
                          hub_cache_dir=str(cache), download=False)
    assert str(e.value) == (f"missing nik-dim/tall_masks/single_task/{ARCH}/SVHNVal/nonlinear_finetuned.pt in the "
                            f"HF cache ({cache}); run mass-exp-prefetch <same overrides> on a machine with network")
    # HF_HUB_OFFLINE=1 wins over download=True
    with pytest.raises(ConfigError, match=r"missing nik-dim/tall_masks/.*SVHNVal.* in the HF cache"):
        resolve_endpoints("tall_masks", backbone=ARCH, tasks=["SVHN"], options={}, hub_cache_dir=str(cache),
                          download=True)


# --------------------------------------------------------------------------------------------- retrained


def _fill_retrained(cache, clip, ref):
    weights = {"pretrained": perturbed(ref, 20), "Cars": perturbed(ref, 21), "DTD": perturbed(ref, 22)}
    # the file name differs across repos, as it changed over time
    put_hub_file(cache, f"crisostomi/{ARCH}-base", "pytorch_model.bin",
                 _torch_bytes(_full_clip_sd(clip, weights["pretrained"])))
    put_hub_file(cache, f"crisostomi/{ARCH}-base", "README.md", b"# base\n")
    put_hub_file(cache, f"crisostomi/{ARCH}-Cars", "pytorch_model.bin",
                 _torch_bytes({f"visual.{k}": v for k, v in weights["Cars"].items()}))
    put_hub_file(cache, f"crisostomi/{ARCH}-Cars", "training_args.bin", _torch_bytes({"lr": torch.tensor(1e-5)}))
    put_hub_file(cache, f"crisostomi/{ARCH}-DTD", "model.safetensors", _st_bytes(weights["DTD"]))
    put_hub_file(cache, f"crisostomi/{ARCH}-DTD", "pytorch_model.bin", _torch_bytes({"stale": torch.zeros(1)}))
    put_hub_file(cache, f"crisostomi/{ARCH}-DTD", "config.json", b"{}")
    return weights


def test_retrained_resolves_the_file_name_per_repo(tmp_path, clip, ref):
    cache = tmp_path / "hub"
    weights = _fill_retrained(cache, clip, ref)
    resolved = resolve_endpoints("retrained", backbone=ARCH, tasks=TASKS, options={}, hub_cache_dir=str(cache),
                                 download=False)
    assert resolved.hub_files() == [(f"crisostomi/{ARCH}-base", "pytorch_model.bin"),
                                    (f"crisostomi/{ARCH}-Cars", "pytorch_model.bin"),
                                    (f"crisostomi/{ARCH}-DTD", "model.safetensors")]
    assert required_hub_files("retrained", backbone=ARCH, tasks=TASKS, hub_cache_dir=str(cache),
                              download=False) == resolved.hub_files()
    pre, fts = _materialized(resolved, tmp_path, ref)
    _assert_same(pre, weights["pretrained"])
    for task in TASKS:
        _assert_same(fts[task], weights[task])


def test_retrained_ambiguous_or_missing_weights_file(tmp_path, clip, ref):
    cache = tmp_path / "hub"
    _fill_retrained(cache, clip, ref)
    put_hub_file(cache, f"crisostomi/{ARCH}-SVHN", "model.safetensors", _st_bytes(ref))
    put_hub_file(cache, f"crisostomi/{ARCH}-SVHN", "ema/model.safetensors", _st_bytes(ref))
    put_hub_file(cache, f"crisostomi/{ARCH}-MNIST", "README.md", b"# nothing here\n")
    with pytest.raises(ConfigError) as e:
        resolve_endpoints("retrained", backbone=ARCH, tasks=["SVHN"], options={}, hub_cache_dir=str(cache),
                          download=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"crisostomi/{ARCH}-SVHN" in msg and "ambiguous" in msg
    assert "ema/model.safetensors" in msg and "endpoints.filename" in msg
    with pytest.raises(ConfigError) as e:
        resolve_endpoints("retrained", backbone=ARCH, tasks=["MNIST"], options={}, hub_cache_dir=str(cache),
                          download=False)
    assert f"crisostomi/{ARCH}-MNIST: no weights file" in str(e.value) and "README.md" in str(e.value)
    # a per-task override settles it
    resolved = resolve_endpoints("retrained", backbone=ARCH, tasks=["SVHN"], hub_cache_dir=str(cache),
                                 options={"filenames": {"SVHN": "ema/model.safetensors"}}, download=False)
    assert resolved.finetuned["SVHN"].filename == "ema/model.safetensors"
    # a repo that is not cached at all, offline
    with pytest.raises(ConfigError, match=rf"missing crisostomi/{ARCH}-GTSRB .*in the HF cache .*mass-exp-prefetch"):
        resolve_endpoints("retrained", backbone=ARCH, tasks=["GTSRB"], options={}, hub_cache_dir=str(cache),
                          download=False)


def test_pick_weight_file_priority():
    assert pick_weight_file("r", ["README.md", "pytorch_model.bin", "model.safetensors"]) == "model.safetensors"
    assert pick_weight_file("r", ["pytorch_model.bin", "training_args.bin"]) == "pytorch_model.bin"
    assert pick_weight_file("r", ["ckpt/finetuned.pt", "config.json"]) == "ckpt/finetuned.pt"
    with pytest.raises(ConfigError, match="ambiguous"):
        pick_weight_file("r", ["a.pt", "b.pth"])


# ------------------------------------------------------------------------------------------ fusion_bench


def test_fusion_bench_transformers_weights(tmp_path, ref):
    cache = tmp_path / "hub"
    weights = {"Cars": perturbed(ref, 31), "DTD": perturbed(ref, 32)}
    opts = {"model_names": {ARCH: "clip-tiny"}}
    for task, hub_task in (("Cars", "stanford-cars"), ("DTD", "dtd")):
        hf = open_clip_to_hf_clip_vision(weights[task], with_projection=False)  # CLIPVisionModel: no projection
        put_hub_file(cache, f"tanganke/clip-tiny_{hub_task}", "model.safetensors", _st_bytes(hf))
        put_hub_file(cache, f"tanganke/clip-tiny_{hub_task}", "config.json", b"{}")
    resolved = resolve_endpoints("fusion_bench", backbone=ARCH, tasks=TASKS, options=opts, hub_cache_dir=str(cache),
                                 download=False)
    assert resolved.pretrained is None
    assert resolved.hub_files() == [("tanganke/clip-tiny_stanford-cars", "model.safetensors"),
                                    ("tanganke/clip-tiny_dtd", "model.safetensors")]
    assert {f.kind for f in resolved.finetuned.values()} == {"hf_clip_vision"}
    pretrained_visual = perturbed(ref, 30)
    pre, fts = _materialized(resolved, tmp_path, ref, pretrained_visual_sd=pretrained_visual)
    assert pre is None
    for task in TASKS:  # every parameter as written, the projection from the pretrained visual
        _assert_same(fts[task], {**weights[task], "proj": pretrained_visual["proj"]})


def test_fusion_bench_names_for_the_real_backbones():
    from mass_exp.endpoints.sources import _hub_plan, merged_options

    opts = merged_options("fusion_bench", None)
    _, specs = _hub_plan("fusion_bench", opts, "ViT-B-16", ["Cars", "OxfordIIITPet", "Flowers102"])
    assert [s.repo_id for s in specs] == ["tanganke/clip-vit-base-patch16_stanford-cars",
                                          "tanganke/clip-vit-base-patch16_oxford-iiit-pet",
                                          "tanganke/clip-vit-base-patch16_oxford_flowers102"]
    with pytest.raises(ConfigError, match=r"task 'EMNIST' \(FusionBench's 20-task pool has emnist_letters"):
        resolve_endpoints("fusion_bench", backbone="ViT-B-32", tasks=["EMNIST"], options={}, download=False)
    with pytest.raises(ConfigError, match=r"endpoints\.model_names\.mass-tiny-ViT="):
        resolve_endpoints("fusion_bench", backbone=ARCH, tasks=["Cars"], options={}, download=False)


# ------------------------------------------------------------------------------------------------ local


def test_local_pattern(tmp_path, clip, ref):
    weights = {"pretrained": perturbed(ref, 40), "Cars": perturbed(ref, 41), "DTD": perturbed(ref, 42)}
    for task in TASKS:
        p = tmp_path / "ckpts" / ARCH / task.lower() / "finetuned.pt"
        p.parent.mkdir(parents=True)
        torch.save({"state_dict": {f"model.visual.{k}": v for k, v in weights[task].items()}}, p)
    (tmp_path / "zs.pt").write_bytes(_torch_bytes(_full_clip_sd(clip, weights["pretrained"])))
    opts = {"pattern": str(tmp_path / "ckpts/{model}/{task_lower}/finetuned.pt"), "pretrained": str(tmp_path / "zs.pt")}
    resolved = resolve_endpoints("local", backbone=ARCH, tasks=TASKS, options=opts, hub_cache_dir=None, download=False)
    assert resolved.hub_files() == []
    assert required_hub_files("local", backbone=ARCH, tasks=TASKS, options=opts) == []
    pre, fts = _materialized(resolved, tmp_path, ref)
    _assert_same(pre, weights["pretrained"])
    for task in TASKS:
        _assert_same(fts[task], weights[task])
    # without `pretrained`: the backbone's own visual
    assert resolve_endpoints("local", backbone=ARCH, tasks=TASKS, options={**opts, "pretrained": None},
                             download=False).pretrained is None


def test_local_missing_file_and_bad_pattern(tmp_path):
    (tmp_path / "Cars.pt").write_bytes(b"x")
    opts = {"pattern": str(tmp_path / "{task}.pt")}
    with pytest.raises(ConfigError) as e:
        resolve_endpoints("local", backbone=ARCH, tasks=["Cars", "DTD", "SVHN"], options=opts, download=False)
    assert str(e.value) == (f"endpoint file {tmp_path / 'DTD.pt'} not found (2 of 3 missing); set endpoints.pattern "
                            f"(now {opts['pattern']!r}) to where the fine-tuned checkpoints are")
    with pytest.raises(ConfigError, match=r"endpoints\.pattern is not set"):
        resolve_endpoints("local", backbone=ARCH, tasks=["Cars"], options={}, download=False)
    with pytest.raises(ConfigError, match=r"endpoints\.pattern=.*bad placeholder 'dataset'"):
        resolve_endpoints("local", backbone=ARCH, tasks=["Cars"], options={"pattern": "/x/{dataset}.pt"},
                          download=False)
    with pytest.raises(ConfigError, match=r"endpoints\.source='mini2' is not a real endpoint source"):
        resolve_endpoints("mini2", backbone=ARCH, tasks=["Cars"], options={}, download=False)


def test_options_may_be_omegaconf(tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / "Cars.pt").write_bytes(b"x")
    cfg = OmegaConf.create({"source": "local", "pattern": str(tmp_path / "{task}.pt"), "task_names": {}})
    resolved = resolve_endpoints("local", backbone=ARCH, tasks=["Cars"], options=cfg, download=False)
    assert resolved.finetuned["Cars"].path == tmp_path / "Cars.pt"
