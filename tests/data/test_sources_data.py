"""Each checkpoint source's heads, data, preprocessing and validation split, as packaged data with provenance
(resources/sources/<source>.json over resources/tasks.json), pinned against what the sources' code does
(issue 11's findings). Where the public repositories are mirrored beside this checkout, the facts are re-read there."""

from __future__ import annotations

import json
import re
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import torch

from mass_exp.data.datasets import carve_validation, load_split
from mass_exp.data.preprocess import task_transform
from mass_exp.data.tasks import (
    HEAD_SOURCES,
    check_label_names,
    get_task,
    label_mismatches,
    normalize_label,
    source_record,
    suite_task_names,
)
from mass_exp.errors import ConfigError
from mass_exp.models.heads import build_zeroshot_head, heads_cache_key

TASKS20 = suite_task_names("20")
MIRROR = Path("/work/.mirror")
PROV = re.compile(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}:\S+|torchvision@0\.29\.1:\S+|huggingface\.co/datasets/\S+")


# ------------------------------------------------------------------------------------------ 1. heads per source


def test_every_source_has_every_task_and_records_provenance():
    for hs in HEAD_SOURCES:
        rec = source_record(hs)
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", rec["code"]) and PROV.search(rec["validation"]["provenance"])
        for name, over in rec["tasks"].items():
            assert name in TASKS20 and PROV.search(over["provenance"]), (hs, name)
        for name in TASKS20:
            t = get_task(name, hs)
            assert t.head_source == hs and t.num_classes >= t.num_labels


def test_tall_masks_heads():
    kmnist = get_task("KMNIST", "tall_masks")
    assert kmnist.classnames == ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")  # torchvision romaji
    assert get_task("KMNIST").classnames[0] == "お"  # the dataset's (and FusionBench's) hiragana
    fer = get_task("FER2013", "tall_masks")
    assert [c[0] for c in fer.classnames] == ["angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"]
    assert fer.classnames[3] == ("happy", "smiling") and fer.synonyms == "python_list_str"
    # the whole list goes into each prompt (Python's str of it), one prompt per template: no averaging over synonyms
    assert fer.prompts(fer.classnames[3])[0] == "a photo of a ['happy', 'smiling'] looking face."
    assert len(fer.prompts(fer.classnames[5])) == len(fer.templates)
    flowers = get_task("Flowers102", "tall_masks").classnames
    assert (flowers[15], flowers[59], flowers[92]) == ("globe flower", "pink and yellow dahlia", "air plant")
    assert get_task("OxfordIIITPet", "tall_masks").classnames[2] == "American Pit Bull Terrier"
    assert get_task("FashionMNIST", "tall_masks").classnames[0] == "T-shirt/top"
    assert get_task("CIFAR100", "tall_masks").classnames[26] == "crab"
    food = get_task("Food101", "tall_masks").classnames
    assert food[0] == "apple_pie" and food[16:18] == ("cheese_plate", "cheesecake")  # torchvision: sorted folders


def test_retrained_heads_are_11_way_for_cifar10_and_stl10():
    canon = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "monkey", "ship", "truck")
    for name in ("CIFAR10", "STL10"):
        t = get_task(name, "retrained")
        assert t.classnames == canon and t.num_classes == 11 and t.num_labels == 10
        # every dataset label lands on the head row of the same class ("car" is the head's "automobile")
        for label, row in enumerate(t.label_map):
            ds_name = t.label_names[label]
            assert t.classnames[row] == ("automobile" if ds_name == "car" else ds_name), (name, label)
    assert get_task("STL10", "retrained").label_map[:3] == (0, 2, 1)
    assert get_task("CIFAR10", "retrained").label_map[8:] == (9, 10)


def test_retrained_resisc45_is_reordered_with_a_consistent_map():
    t = get_task("RESISC45", "retrained")
    assert t.classnames[:3] == ("airplane", "forest", "airport") and t.label_map[13] == 1
    assert sorted(t.label_map) == list(range(45))
    assert not label_mismatches(t, list(get_task("RESISC45").label_names))


def test_retrained_reads_other_heads_from_the_dataset():
    t = get_task("Cars", "retrained")
    assert t.classnames_from_dataset
    t2 = t.with_dataset_classnames(["a_b", "c"] + list(t.classnames[2:]))
    assert t2.classnames[0] == "a_b" and not t2.classnames_from_dataset
    assert heads_cache_key("b", "w", t) != heads_cache_key("b", "w", t2)
    assert not get_task("CIFAR10", "retrained").classnames_from_dataset
    # FER2013 alphabetical (clip-benchmark/wds_fer2013's cls order), no label map
    fer = get_task("FER2013", "retrained")
    assert fer.classnames == ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised")
    assert fer.label_map is None


def test_fusion_bench_keeps_its_own_strings():
    assert get_task("CIFAR100", "fusion_bench").classnames[26] == "cra"
    assert get_task("EMNIST", "fusion_bench").templates == ('a photo of the number: "{c}".',)
    assert get_task("EMNIST", "tall_masks").templates == ('a photo of the digit character: "{c}".',)


def test_head_cache_key_covers_everything_of_the_head():
    fer_t, fer_r = get_task("FER2013", "tall_masks"), get_task("FER2013", "retrained")
    keys = {heads_cache_key("b", "w", t) for t in (fer_t, fer_r, get_task("FER2013", "fusion_bench"))}
    assert len(keys) == 2  # retrained and fusion_bench agree on FER2013; tall_masks differs
    from dataclasses import replace

    base = get_task("EMNIST", "retrained")
    for changed in (replace(base, preprocess=()), replace(base, label_map=tuple(range(10))),
                    replace(base, templates=("x {c}",)), replace(base, synonyms="python_list_str")):
        assert heads_cache_key("b", "w", changed) != heads_cache_key("b", "w", base)


def test_heads_have_one_row_per_head_class(tiny_clip):
    model, tokenizer = tiny_clip
    assert build_zeroshot_head(model, tokenizer, get_task("CIFAR10", "retrained")).shape[0] == 11
    fer = build_zeroshot_head(model, tokenizer, get_task("FER2013", "tall_masks"))
    assert fer.shape[0] == 7


@pytest.fixture(scope="module")
def tiny_clip():
    from mass_exp.models.clip import create_clip

    torch.manual_seed(0)
    model, _, tokenizer = create_clip("mass-tiny-ViT", None)
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------ 2. labels: Food101


def test_food101_follows_the_hf_label_order():
    base = get_task("Food101")
    assert base.label_names[16:18] == ("cheesecake", "cheese plate")  # ethz/food101: cheesecake is 16
    fb = get_task("Food101", "fusion_bench")  # FusionBench's swapped names, kept: its endpoints learnt them
    assert fb.classnames[16:18] == ("cheese plate", "cheesecake") and fb.label_map is None
    assert label_mismatches(fb, list(base.label_names)) == []  # the two known differences are accepted
    tm = get_task("Food101", "tall_masks")  # torchvision rows, dataset labels remapped onto them
    assert tm.classnames[tm.label_map[16]] == "cheesecake" and tm.classnames[tm.label_map[17]] == "cheese_plate"


# ------------------------------------------------------------------------------------------ 3. data


def test_svhn_reads_the_cropped_digits_config(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or datasets.Dataset.from_dict(
        {"image": [], "label": []}))
    load_split(get_task("SVHN", "retrained"), "test")
    assert calls[0][0] == ("ufldl-stanford/svhn", "cropped_digits") and calls[0][1]["split"] == "test"


def test_fer2013_has_a_verified_hub_source():
    for hs in (None,) + HEAD_SOURCES:
        t = get_task("FER2013", hs)
        assert (t.hf_dataset, t.image_column, t.label_column) == ("clip-benchmark/wds_fer2013", "jpg", "cls")
    tm = get_task("FER2013", "tall_masks")  # wds cls (alphabetical) -> tall_masks' FER-order rows
    alpha = ["angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"]
    assert [tm.classnames[tm.label_map[i]][0] for i in range(7)] == alpha


def test_emnist_per_source():
    assert get_task("EMNIST", "retrained").hf_dataset == "tanganke/emnist_mnist"
    tm = get_task("EMNIST", "tall_masks")
    assert tm.hf_dataset is None and "digits" in tm.warning and "data.local_dirs.EMNIST" in tm.warning
    with pytest.raises(ConfigError, match="data.local_dirs.EMNIST"):
        load_split(tm, "test")


# ------------------------------------------------------------------------------------------ 4. preprocessing


def test_retrained_emnist_rotates_then_flips_the_normalised_tensor():
    import torchvision.transforms.functional as F
    from PIL import Image

    x = torch.randn(3, 6, 6)
    tf = task_transform(lambda img: x.clone(), get_task("EMNIST", "retrained").preprocess, "EMNIST")
    assert torch.equal(tf(Image.new("RGB", (6, 6))), F.hflip(F.rotate(x, -90)))
    assert get_task("EMNIST", "tall_masks").preprocess == () and get_task("EMNIST", "fusion_bench").preprocess == ()


def test_tall_masks_fer2013_is_grayscale():
    from PIL import Image

    img = Image.new("RGB", (2, 2), (200, 10, 10))
    tf = task_transform(lambda im: im, get_task("FER2013", "tall_masks").preprocess, "FER2013")
    r, g, b = tf(img).getpixel((0, 0))
    assert r == g == b
    assert get_task("FER2013", "retrained").preprocess == ()


# ------------------------------------------------------------------------------------------ 5. validation split


def test_validation_split_is_torch_random_split_with_the_official_parameters():
    from torch.utils.data import random_split

    rest, val = carve_validation(60000)
    assert rest[0] == 36044  # the official code asserts this for MNISTVal (tall_masks src/datasets/registry.py)
    assert len(val) == 5000 and len(rest) == 55000
    ref_rest, ref_val = random_split(range(60000), [55000, 5000], generator=torch.Generator().manual_seed(0))
    assert list(val) == list(ref_val.indices)
    assert len(carve_validation(1000)[1]) == 100
    for hs in HEAD_SOURCES:
        v = source_record(hs)["validation"]
        assert (v["algorithm"], v["fraction"], v["max_samples"], v["seed"]) == ("torch_random_split", 0.1, 5000, 0)


# ------------------------------------------------------------------------------------------ 6. paths and pins


def test_tall_masks_vit_b16_folder_is_capital_vit():
    from mass_exp.endpoints.sources import required_hub_files

    files = required_hub_files("tall_masks", backbone="ViT-B-16", tasks=["Cars"], download=False)
    assert files[1] == ("nik-dim/tall_masks", "single_task/VIT-B-16/CarsVal/nonlinear_finetuned.pt")
    files = required_hub_files("tall_masks", backbone="ViT-B-32", tasks=["Cars"], download=False)
    assert files[1][1] == "single_task/ViT-B-32/CarsVal/nonlinear_finetuned.pt"


def test_open_clip_pin():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert re.search(r'"open_clip_torch>=3\.0"', text)


# ------------------------------------------------------------------------------------------ label guard


def test_label_guard_normalises_and_names_the_first_difference():
    assert normalize_label("T - shirt / top") == normalize_label("T-shirt/top") == "tshirttop"
    t = get_task("DTD", "fusion_bench")
    names = list(t.label_names)
    assert check_label_names(t, [n.upper().replace(" ", "_") for n in names]) == []
    swapped = [names[1], names[0]] + names[2:]
    with pytest.raises(ConfigError) as e:
        check_label_names(t, swapped)
    msg = str(e.value)
    assert "\n" not in msg and "task DTD" in msg and "label 0" in msg and repr(names[1]) in msg
    assert repr(names[0]) in msg and "data.accept_label_mismatch=[DTD]" in msg
    assert len(check_label_names(t, swapped, accept=True)) == 2
    # known, intended differences are accepted as data: retrained STL10's "car" row is "automobile"
    assert check_label_names(get_task("STL10", "retrained"), list(get_task("STL10").label_names)) == []
    assert check_label_names(get_task("CIFAR100", "tall_masks"), list(get_task("CIFAR100").label_names)) == []


def test_every_source_agrees_with_the_packaged_dataset_names():
    for hs in HEAD_SOURCES:
        for name in TASKS20:
            assert label_mismatches(get_task(name, hs), list(get_task(name).label_names)) == [], (hs, name)


# ------------------------------------------------------------------------------------------ facts re-read at source


def _git_show(repo: str, path: str) -> str:
    d = MIRROR / repo.replace("/", "+") / "repo"
    if not d.exists():
        pytest.skip(f"{repo} is not mirrored beside this checkout")
    commit = source_record({"nik-dim/tall_masks": "tall_masks", "crisostomi/model-merging": "retrained"}[repo])[
        "code"].split("@")[1]
    return subprocess.run(["git", "-C", str(d), "show", f"{commit}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def test_model_merging_label_maps_match_the_source_code():
    import yaml

    for name in ("CIFAR10", "STL10", "RESISC45"):
        y = yaml.safe_load(_git_show("crisostomi/model-merging", f"conf/dataset/{name}.yaml"))
        t = get_task(name, "retrained")
        assert list(t.classnames) == y["classnames_override"]
        assert {i: r for i, r in enumerate(t.label_map)} == {int(k): v for k, v in y["label_map"].items()}


def test_tall_masks_fer2013_and_flowers_match_the_source_code():
    src = _git_show("nik-dim/tall_masks", "src/datasets/fer2013.py")
    assert '["happy", "smiling"]' in src and '["neutral", "bored"]' in src and '.convert("L")' in src
    src = _git_show("nik-dim/tall_masks", "src/datasets/flowers102.py")
    for name in ("globe flower", "pink and yellow dahlia", "air plant"):
        assert f'"{name}"' in src
    src = _git_show("nik-dim/tall_masks", "src/datasets/registry.py")
    assert "val_fraction=0.1" in src and "max_val_samples=5000" in src and "manual_seed(seed)" in src


def test_task_dataset_maps_labels_onto_head_rows_and_applies_preprocessing():
    import datasets
    from PIL import Image

    from mass_exp.data.datasets import task_dataset

    hf = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 3, "label": [0, 8, 9]})
    base = lambda img: torch.arange(16.0).reshape(1, 4, 4)  # noqa: E731
    for in_memory in (True, False):
        ds = task_dataset(get_task("CIFAR10", "retrained"), hf, base)
        ds._images = None if not in_memory else ds._images
        assert [ds[i][1] for i in range(3)] == [0, 9, 10]
    x, _ = task_dataset(get_task("EMNIST", "retrained"), hf, base)[0]
    assert torch.equal(x, torch.arange(16.0).reshape(1, 4, 4).rot90(-1, (-2, -1)).flip(-1))
