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


def test_signed_mask_marks_the_signed_pretraining_images():
    """`signed_mask` is the mask `generate_split` rendered with: signed pretraining images show their noise."""
    from mass_exp.data.mini import signed_mask

    task = MINI_TASKS["counts"]  # row scanlines: every other row darkened
    imgs, _ = generate_split(task, "pretrain", 200, 0, 32, 0.5)
    mask = signed_mask(task, "pretrain", 200, 0, 0.5)
    assert 60 < mask.sum() < 140
    rows = np.abs(imgs[:, ::2].astype(float).mean((1, 2, 3)) - imgs[:, 1::2].astype(float).mean((1, 2, 3)))
    assert rows[mask].min() > rows[~mask].max()
    assert signed_mask(task, "test", 10, 0, 0.5).all()


def test_domain_captions_name_no_class_and_share_no_word():
    words = lambda text: set(re.findall(r"[a-z]+", text.lower())) - {"a", "of", "some", "one"}
    caps = {name: words(t.domain_caption) for name, t in MINI_TASKS.items()}
    assert all(caps.values())
    for name, t in MINI_TASKS.items():
        classes = {w for c in t.classnames for w in words(c)}
        assert not caps[name] & classes, name
        for other, o in MINI_TASKS.items():
            if other != name:
                assert not caps[name] & {w for c in o.classnames for w in words(c)}, (name, other)
                assert not caps[name] & caps[other], (name, other)


def test_pretraining_captions_name_the_class_only_for_a_share_of_signed_images():
    import torch

    from mass_exp.endpoints.mini import _CaptionedImages

    class Images:
        def __len__(self):
            return 400

        def __getitem__(self, i):
            return torch.zeros(1), i % 5

    signed = np.arange(400) < 200
    tokens = torch.arange(5 * 3 * 2).reshape(5, 3, 2)
    data = _CaptionedImages([(Images(), 0, 0, signed)], tokens, [torch.full((1, 2), -1)], 0.25, seed=0)
    ids = np.array([data[i][2] for i in range(400)])
    assert (ids[200:] < 5).all()  # plain images: always their class
    domain = ids[:200] == 5  # the one domain caption's id comes after the 5 class ids
    assert 0.6 < domain.mean() < 0.9
    samples = [data[i] for i in range(0, 200, 7)]
    assert all(bool((tok == -1).all()) == (pid == 5) for _, tok, pid in samples)


def test_template_domain_captions_are_the_task_prompts_with_classes_drawn_uniformly():
    import torch

    from mass_exp.data.tasks import get_task
    from mass_exp.endpoints.mini import _CaptionedImages, domain_caption_tokens

    tasks = [get_task("angles"), get_task("gratings")]
    tokens = torch.arange(10 * 3 * 2).reshape(10, 3, 2)  # 10 global classes x 3 templates x context 2
    cands = domain_caption_tokens(tasks, tokens, None, "templates")
    assert [c.shape for c in cands] == [(15, 2), (15, 2)]
    assert torch.equal(cands[1], tokens[5:10].flatten(0, 1))  # the second task's own prompts, every class

    class Images:
        def __len__(self):
            return 3000

        def __getitem__(self, i):
            return torch.zeros(1), 2  # every image shows class 2

    data = _CaptionedImages([(Images(), 5, 1, np.ones(3000, bool))], tokens, cands, 0.0, seed=0)
    drawn = [data[i] for i in range(3000)]
    assert {pid for _, _, pid in drawn} == {10 + 1}  # the domain's id, never a class's
    classes = np.array([int(tok[0]) // 6 for _, tok, _ in drawn])  # the global class a caption names
    counts = np.bincount(classes, minlength=10)
    assert counts[:5].sum() == 0 and (counts[5:] > 450).all()  # the task's 5 classes, about 600 each, class 2 not favoured


# sha256 of (images, labels) of generate_split(task, "test", 20, seed 0, 32 px), before `shapes` and `sizes` were
# appended: the first six tasks (and so the default benchmark's cached datasets and weights) must not change
FIRST_SIX_TEST_SPLIT = {"angles": "45a2c0e56555489c", "gratings": "e74ba2cbda411ae3", "ramps": "1a6310dbf75018ec",
                        "textures": "ceca67d11397d57e", "locations": "25ac0fc8c9a04fe2", "counts": "cde0f3c810df991b"}


def test_appended_tasks_leave_the_first_six_unchanged():
    import hashlib

    assert list(MINI_TASKS)[:6] == list(FIRST_SIX_TEST_SPLIT) and len(MINI_TASKS) == 8
    for name, digest in FIRST_SIX_TEST_SPLIT.items():
        im, lab = generate_split(MINI_TASKS[name], "test", 20, 0, 32, 0.0)
        assert hashlib.sha256(im.tobytes() + lab.tobytes()).hexdigest()[:16] == digest, name


def test_shapes_and_sizes_render_their_class():
    from mass_exp.data.mini import render_shape, render_size

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 40)
    # sizes: the ring's mean distance from the centre grows with the class
    g = render_size(rng, labels, 32)
    c = (np.arange(32) + 0.5) / 16 - 1
    d = np.hypot(*np.meshgrid(c, c, indexing="ij"))
    radius = (g * d).sum((1, 2)) / g.sum((1, 2))
    means = [radius[labels == k].mean() for k in range(5)]
    assert all(a + 0.08 < b for a, b in zip(means, means[1:])), means
    for k in range(4):  # and the classes do not overlap
        assert radius[labels == k].max() < radius[labels == k + 1].min(), k
    # shapes: the class-mean masks differ pairwise by more than two halves of one class differ (each class draws
    # its own figure at a jittered place and size)
    s = render_shape(rng, np.repeat(np.arange(5), 200), 32)
    assert set(np.unique(s)) <= {0.0, 1.0}
    per_class = s.reshape(5, 200, 32, 32)
    mean = per_class.mean(1)
    noise = max(np.abs(one[:100].mean(0) - one[100:].mean(0)).mean() for one in per_class)
    for a in range(5):
        for b in range(a + 1, 5):
            assert np.abs(mean[a] - mean[b]).mean() > 2 * noise, (a, b, noise)
