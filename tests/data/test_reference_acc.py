"""Normalized-accuracy references: the packaged published accuracies of each endpoint source, with provenance."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mass_exp.assets import packaged_reference
from mass_exp.data.tasks import get_tasks, suite_task_names
from mass_exp.pipeline import packaged_accuracies

SHARED = Path(__file__).resolve().parents[3] / "shared" / "reference"


def test_packaged_files_equal_the_reference_copies():
    from importlib import resources

    if not SHARED.exists():
        pytest.skip("../shared/reference is not beside this checkout")
    for name in ("finetuned_acc_tall_masks.json", "finetuned_acc_retrained.json", "paper_results.json"):
        packaged = json.loads(resources.files("mass_exp").joinpath(f"resources/{name}").read_text())
        assert packaged == json.loads((SHARED / name).read_text()), name


def test_each_source_brings_its_own_reference():
    tasks = get_tasks(suite_task_names("8"))
    tall = packaged_reference("tall_masks", "ViT-B-32", tasks)
    retrained = packaged_reference("retrained", "ViT-B-32", tasks)
    assert tall is not None and retrained is not None
    assert tall["DTD"] != retrained["DTD"]  # the old DTD endpoint was trained on a wrong split
    assert packaged_reference("fusion_bench", "ViT-B-32", tasks) is None
    assert packaged_reference("tall_masks", "tiny", tasks) is None


def test_validation_reference_uses_val_keys_and_falls_back_to_measuring_when_absent():
    tasks = get_tasks(suite_task_names("20"))
    tall = SimpleNamespace(tasks=tasks, packaged_reference=packaged_reference("tall_masks", "ViT-L-14", tasks))
    test = packaged_accuracies(tall, "test")
    val = packaged_accuracies(tall, "validation")
    assert list(test) == [t.name for t in tasks] and test["Cars"] == tall.packaged_reference["Cars"]
    assert val["Cars"] == tall.packaged_reference["CarsVal"]
    retrained = SimpleNamespace(tasks=tasks, packaged_reference=packaged_reference("retrained", "ViT-L-14", tasks))
    assert packaged_accuracies(retrained, "test") is not None
    assert packaged_accuracies(retrained, "validation") is None  # no <Task>Val keys: measured instead
    assert packaged_accuracies(SimpleNamespace(tasks=tasks, packaged_reference=None), "test") is None
