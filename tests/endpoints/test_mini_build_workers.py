"""How many processes fine-tune the mini endpoints (`endpoints.build_workers`), and that a worker's error reaches
the caller."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mass_exp.endpoints.mini import PARALLEL_MIN_IMAGES, _finetune_all, _FinetuneJob, build_workers
from mass_exp.data.tasks import get_task

CPU = {"accelerator": "cpu"}


def test_explicit_setting_is_capped_by_the_missing_endpoints():
    assert build_workers(4, 6, CPU) == 4
    assert build_workers(4, 2, CPU) == 2
    assert build_workers(1, 6, CPU) == 1
    assert build_workers(3, 0, CPU) == 1


def test_auto_uses_one_process_per_thread_on_cpu(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert build_workers("auto", 6, CPU, images=72_000) == 2
    assert build_workers("auto", 1, CPU, images=72_000) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert build_workers("auto", 6, CPU, images=72_000) == 6
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # OMP_NUM_THREADS=1: the user's budget is one core
    assert build_workers("auto", 6, CPU, images=72_000) == 1


def test_auto_stays_in_process_for_small_builds_and_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert build_workers("auto", 3, CPU, images=PARALLEL_MIN_IMAGES - 1) == 1
    assert build_workers("auto", 3, CPU, images=PARALLEL_MIN_IMAGES) == 3
    assert build_workers("auto", 6, {"accelerator": "gpu"}, images=72_000) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_workers("auto", 6, {"accelerator": "auto"}, images=72_000) == 1
    assert build_workers("auto", 6, CPU, images=72_000) == 6


@pytest.mark.slow
def test_a_worker_error_reaches_the_caller(tmp_path: Path):
    """A fine-tune that fails in a worker process fails the build, with the worker's error, and writes nothing."""
    missing = tmp_path / "pretrained-missing.safetensors"
    job = _FinetuneJob("mass-tiny-ViT", missing, get_task("angles"), tmp_path / "data", {}, dict(CPU), 1,
                       tmp_path / "finetuned-angles.safetensors", "k")
    with pytest.raises(FileNotFoundError, match="pretrained-missing.safetensors"):
        _finetune_all([job, job], workers=2)
    assert not (tmp_path / "finetuned-angles.safetensors").exists()
