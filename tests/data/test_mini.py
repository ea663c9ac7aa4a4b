"""The generated mini suite: deterministic, balanced, distinct domains, no shared words between tasks."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mass_exp.data.datasets import carve_validation
from mass_exp.data.mini import MINI_TASKS, generate_split
from mass_exp.data.tasks import get_task, get_tasks, suite_task_names
from mass_exp.errors import ConfigError


def test_generation_is_deterministic_and_balanced():
    task = MINI_TASKS["angles"]
    a, la = generate_split(task, "test", 50, seed=0, size=32, signed_share=0.0)
    b, lb = generate_split(task, "test", 50, seed=0, size=32, signed_share=0.0)
    c, _ = generate_split(task, "test", 50, seed=1, size=32, signed_share=0.0)
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert np.bincount(la).tolist() == [10] * 5


def test_splits_differ():
    task = MINI_TASKS["counts"]
    train, _ = generate_split(task, "train", 20, 0, 32, 0.0)
    test, _ = generate_split(task, "test", 20, 0, 32, 0.0)
    assert not np.array_equal(train, test)


def test_at_least_five_tasks_with_five_classes():
    assert len(MINI_TASKS) >= 5
    assert all(len(t.classnames) >= 5 for t in MINI_TASKS.values())


def test_class_names_share_no_word_across_tasks():
    words = {name: {w for c in t.classnames for w in re.findall(r"[a-z]+", c.lower())} for name, t in MINI_TASKS.items()}
    names = list(words)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not (words[a] & words[b]), (a, b, words[a] & words[b])


def test_domains_are_distinct():
    """Mean hue of signed test images separates the tasks (each task has its own hue window)."""
    import colorsys

    hues = {}
    for name, task in MINI_TASKS.items():
        imgs, _ = generate_split(task, "test", 40, 0, 32, 0.0)
        rgb = imgs.reshape(-1, 3).astype(float) / 255
        bright = rgb[rgb.max(1) > 0.5][:2000]
        hues[name] = np.median([colorsys.rgb_to_hsv(*p)[0] for p in bright])
    centres = {n: (t.hue[0] + t.hue[1]) / 2 % 1 for n, t in MINI_TASKS.items()}
    for n in MINI_TASKS:
        d = min(abs(hues[n] - centres[n]), 1 - abs(hues[n] - centres[n]))
        assert d < 0.06, (n, hues[n], centres[n])


def test_pretrain_split_mixes_plain_and_signed():
    task = MINI_TASKS["locations"]
    plain, _ = generate_split(task, "pretrain", 30, 0, 32, 0.0)
    # column scanlines darken every other column: signed images show a strong even/odd column contrast
    def stripe(x):
        x = x.astype(float)
        return np.abs(x[:, :, ::2].mean() - x[:, :, 1::2].mean())
    signed, _ = generate_split(task, "test", 30, 0, 32, 0.0)
    assert stripe(signed) > 5 * stripe(plain)


def test_task_registry():
    assert [t.name for t in get_tasks(suite_task_names("8"))][:2] == ["Cars", "DTD"]
    svhn = get_task("SVHN")
    assert svhn.num_classes == 10 and svhn.source == "hf"
    assert get_task("angles").prompts("steep")[0] == "a photo of steep stripes."
    with pytest.raises(ConfigError, match="unknown task 'Nope'"):
        get_task("Nope")
    with pytest.raises(ConfigError, match="twice"):
        get_tasks(["angles", "angles"])


def test_carve_validation_protocol():
    rest, val = carve_validation(1000)
    assert len(val) == 100 and len(rest) == 900 and not set(rest) & set(val)
    rest2, val2 = carve_validation(1000)
    assert np.array_equal(val, val2)
    _, big = carve_validation(100_000)
    assert len(big) == 5000
