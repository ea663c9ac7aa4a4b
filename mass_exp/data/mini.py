"""The `mini` suite: small image-classification tasks generated from a seed, with no download.

Why it looks like this (see README, "The mini benchmark"): MASS only helps when a single image reveals its task, as
MNIST digits vs satellite photos vs textures do in the real benchmark. So every task here carries its own *visual
domain* (a narrow hue window and a noise type of its own) on top of a class signal carried by global image statistics
(orientation, spatial frequency, ramp direction, texture family, position, count; shape and ring size for the two
tasks appended for an 8-task suite), which a patch-8 ViT learns from a few thousand images. Class names and prompt
templates share no word across tasks, so a wrong task's head cannot win on a shared token. Pretraining images are *plain* (random colours, no noise); only a small share carry the task
signature, which keeps zero-shot accuracy well below the fine-tuned endpoints.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Callable

import numpy as np

Renderer = Callable[[np.random.Generator, np.ndarray, int], np.ndarray]

GENERATOR_VERSION = 2  # bump when rendering changes, so cached datasets are rebuilt


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1], shape (size, size), y downwards."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


def _grating(x, y, angle, cycles, phase):
    """Sinusoidal grating with `cycles` periods across the image width, wave vector at `angle`."""
    return 0.5 + 0.5 * np.sin(np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + phase)


def render_orientation(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    x, y = _grid(size)
    n = len(labels)
    angle = np.deg2rad(labels * 36.0 + rng.uniform(-5, 5, n))[:, None, None]
    cycles = rng.uniform(2.5, 3.5, n)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    return _grating(x, y, angle, cycles, phase)


_FREQUENCIES = np.array([1.0, 2.0, 3.5, 5.5, 8.0])


def render_frequency(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    x, y = _grid(size)
    n = len(labels)
    angle = rng.uniform(0, np.pi, n)[:, None, None]
    cycles = (_FREQUENCIES[labels] * rng.uniform(0.92, 1.08, n))[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    return _grating(x, y, angle, cycles, phase)


def render_ramp(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    x, y = _grid(size)
    n = len(labels)
    angle = np.deg2rad(labels * 72.0 + rng.uniform(-8, 8, n))[:, None, None]
    # y grows downwards in pixel space: "north" = towards the top = -y
    ramp = x * np.cos(angle) - y * np.sin(angle)
    contrast = rng.uniform(0.7, 1.0, n)[:, None, None]
    return np.clip(0.5 + 0.5 * contrast * ramp / np.sqrt(2), 0, 1)


def render_texture(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    x, y = _grid(size)
    out = np.empty((len(labels), size, size))
    for i, lab in enumerate(labels):
        rot = rng.uniform(0, np.pi)
        xr, yr = x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)
        if lab == 0:  # checkerboard
            cells = rng.uniform(3, 5)
            g = (np.floor((xr + 1) * cells) + np.floor((yr + 1) * cells)) % 2
        elif lab == 1:  # regular dots
            cells = rng.uniform(3, 4.5)
            fx, fy = ((xr + 1) * cells) % 1 - 0.5, ((yr + 1) * cells) % 1 - 0.5
            g = (fx**2 + fy**2 < rng.uniform(0.05, 0.09)).astype(float)
        elif lab == 2:  # concentric rings
            cx, cy = rng.uniform(-0.5, 0.5, 2)
            g = 0.5 + 0.5 * np.sin(np.pi * rng.uniform(3, 4.5) * np.hypot(x - cx, y - cy) + rng.uniform(0, 6.3))
        elif lab == 3:  # low-pass random blotches
            coarse = rng.normal(size=(5, 5))
            g = np.kron(coarse, np.ones((size // 4, size // 4)))[:size, :size]
            g = (g - g.min()) / (np.ptp(g) + 1e-8)
            g = _box_blur(g, 3)
        else:  # cross-hatch: two perpendicular gratings
            cycles = rng.uniform(3, 4.5)
            g = np.maximum(_grating(xr, yr, 0.0, cycles, 0.0), _grating(xr, yr, np.pi / 2, cycles, 0.0)) ** 3
        out[i] = g
    return out


def _box_blur(g: np.ndarray, k: int) -> np.ndarray:
    pad = np.pad(g, k // 2, mode="edge")
    acc = np.zeros_like(g)
    for dy in range(k):
        for dx in range(k):
            acc += pad[dy : dy + g.shape[0], dx : dx + g.shape[1]]
    return acc / (k * k)


_POSITIONS = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5], [0.0, 0.0]])


def render_position(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    x, y = _grid(size)
    n = len(labels)
    centre = _POSITIONS[labels] + rng.uniform(-0.15, 0.15, (n, 2))
    radius = rng.uniform(0.28, 0.38, n)[:, None, None]
    d = np.hypot(x - centre[:, 0, None, None], y - centre[:, 1, None, None])
    return np.clip((radius - d) * 12 + 0.5, 0, 1)


def render_count(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((len(labels), size, size))
    cell = size // 4  # objects sit in distinct cells of a 4x4 grid, jittered inside it
    for i, lab in enumerate(labels):
        cells = rng.choice(16, size=lab + 1, replace=False)
        for c in cells:
            side = int(rng.integers(3, 6))
            oy = (c // 4) * cell + int(rng.integers(0, cell - side + 1))
            ox = (c % 4) * cell + int(rng.integers(0, cell - side + 1))
            out[i, oy : oy + side, ox : ox + side] = 1.0
    return out


def render_shape(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """One filled shape near the centre: circle, box, triangle (apex up), cross, diamond."""
    x, y = _grid(size)
    out = np.empty((len(labels), size, size))
    for i, lab in enumerate(labels):
        cx, cy = rng.uniform(-0.12, 0.12, 2)
        r = rng.uniform(0.45, 0.6)
        dx, dy = x - cx, y - cy
        if lab == 0:
            g = np.hypot(dx, dy) < r
        elif lab == 1:
            g = np.maximum(np.abs(dx), np.abs(dy)) < 0.85 * r
        elif lab == 2:  # apex at the top (y grows downwards)
            g = (dy < 0.7 * r) & (np.abs(dx) < 0.6 * (dy + r))
        elif lab == 3:
            g = ((np.abs(dx) < 0.3 * r) & (np.abs(dy) < r)) | ((np.abs(dy) < 0.3 * r) & (np.abs(dx) < r))
        else:
            g = np.abs(dx) + np.abs(dy) < 1.1 * r
        out[i] = g
    return out


_RING_RADII = np.array([0.15, 0.3, 0.45, 0.62, 0.8])


def render_size(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """One ring near the centre whose radius is the class (thickness fixed)."""
    x, y = _grid(size)
    n = len(labels)
    centre = rng.uniform(-0.08, 0.08, (n, 2))
    radius = (_RING_RADII[labels] * rng.uniform(0.94, 1.06, n))[:, None, None]
    d = np.hypot(x - centre[:, 0, None, None], y - centre[:, 1, None, None])
    return np.clip(1.0 - np.abs(d - radius) / 0.09, 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Visual domains: each task's signature (hue window + noise type). Pretraining images are plain (no signature).


# Strength of the domain signatures. Strong enough that a model pretrained on plain images does not transfer
# (zero-shot falls well below the fine-tuned endpoints), weak enough that fine-tuning still learns the classes.
NOISE_LEVEL = {"salt_pepper": 0.2, "block": 0.25, "channel_gaussian": 0.2, "speckle": 0.6,
               "column_scanlines": 0.3, "row_scanlines": 0.3, "vignette": 0.8, "diagonal_scanlines": 0.35}
# signed images also have less contrast than plain ones (brightness ranges of foreground and background colours)
DOMAIN_VALUE = {"fg": (0.55, 0.85), "bg": (0.15, 0.45)}


def _noise(kind: str, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Apply a task's noise signature to float images (N, S, S, 3) in [0, 1]."""
    n, s = img.shape[0], img.shape[1]
    level = NOISE_LEVEL[kind]
    if kind == "salt_pepper":
        mask = rng.random((n, s, s)) < level
        vals = rng.integers(0, 2, (n, s, s)).astype(float)
        img = np.where(mask[..., None], vals[..., None], img)
    elif kind == "block":
        blocks = rng.normal(0, level, (n, s // 4, s // 4))
        img = img + np.kron(blocks, np.ones((4, 4)))[..., None]
    elif kind == "channel_gaussian":
        img = img + rng.normal(0, level, img.shape)
    elif kind == "speckle":
        img = img * (1 + rng.normal(0, level, (n, s, s)))[..., None]
    elif kind == "column_scanlines":
        img = img.copy()
        img[:, :, ::2, :] *= level
    elif kind == "row_scanlines":
        img = img.copy()
        img[:, ::2, :, :] *= level
    elif kind == "vignette":  # corners darkened: brightness falls with the squared distance from the centre
        xg, yg = _grid(s)
        img = img * (1 - level * (xg**2 + yg**2) / 2)[None, :, :, None]
    elif kind == "diagonal_scanlines":  # every third anti-diagonal darkened
        rows, cols = np.indices((s, s))
        img = img * np.where((rows + cols) % 3 == 0, level, 1.0)[None, :, :, None]
    else:
        raise ValueError(f"unknown noise type {kind!r}")
    return np.clip(img, 0, 1)


def _colours(rng: np.random.Generator, n: int, hue: tuple[float, float] | None, value: tuple[float, float]) -> np.ndarray:
    """RGB colours (n, 3); hue drawn from a window, or from the whole circle when `hue` is None."""
    h = rng.uniform(0, 1, n) if hue is None else rng.uniform(*hue, n) % 1.0
    sat = rng.uniform(0.5, 1.0, n)
    val = rng.uniform(*value, n)
    return np.array([colorsys.hsv_to_rgb(a, b, c) for a, b, c in zip(h, sat, val)])


@dataclass(frozen=True)
class MiniTask:
    """One generated task: class names, prompt templates, a renderer and a visual domain."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    render: Renderer
    hue: tuple[float, float]
    noise: str
    # a caption of the task's visual domain that names no class (pretraining captions of signed images may use it)
    domain_caption: str = ""

    def images(self, rng: np.random.Generator, labels: np.ndarray, size: int, signed: np.ndarray) -> np.ndarray:
        """Render uint8 RGB images (N, S, S, 3); `signed[i]` adds the task's domain signature to image i."""
        g = self.render(rng, labels, size)[..., None]
        n = len(labels)
        fg_plain, bg_plain = _colours(rng, n, None, (0.75, 1.0)), _colours(rng, n, None, (0.05, 0.4))
        fg_dom, bg_dom = _colours(rng, n, self.hue, DOMAIN_VALUE["fg"]), _colours(rng, n, self.hue, DOMAIN_VALUE["bg"])
        fg = np.where(signed[:, None], fg_dom, fg_plain)[:, None, None, :]
        bg = np.where(signed[:, None], bg_dom, bg_plain)[:, None, None, :]
        img = bg + (fg - bg) * g
        noisy = _noise(self.noise, rng, img)
        img = np.where(signed[:, None, None, None], noisy, img)
        return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


MINI_TASKS: dict[str, MiniTask] = {
    t.name: t
    for t in [
        MiniTask(
            "angles",
            ("horizontal", "rising", "steep", "upright", "falling"),
            ("a photo of {c} stripes.", "{c} stripes.", "stripes running {c}."),
            render_orientation, (0.96, 1.04), "salt_pepper", "stripes.",
        ),
        MiniTask(
            "gratings",
            ("coarse", "wide", "medium", "fine", "dense"),
            ("a {c} grating.", "a photo of a {c} grating.", "a grating with {c} spacing."),
            render_frequency, (0.13, 0.21), "block", "a grating.",
        ),
        MiniTask(
            "ramps",
            ("east", "northeast", "northwest", "southwest", "southeast"),
            ("light toward the {c}.", "a ramp brightening to the {c}.", "a photo of a ramp toward the {c}."),
            render_ramp, (0.29, 0.37), "channel_gaussian", "a ramp of light.",
        ),
        MiniTask(
            "textures",
            ("checkered", "dotted", "ringed", "blotchy", "hatched"),
            ("a {c} texture.", "a photo of a {c} surface.", "{c} fabric."),
            render_texture, (0.46, 0.54), "speckle", "a textured surface.",
        ),
        MiniTask(
            "locations",
            ("topleft", "topright", "bottomleft", "bottomright", "middle"),
            ("a spot at the {c}.", "a photo of a spot in the {c}.", "one disk placed {c}."),
            render_position, (0.63, 0.71), "column_scanlines", "one disk.",
        ),
        MiniTask(
            "counts",
            ("single", "pair", "triple", "quadruple", "quintuple"),
            ("a {c} of squares.", "{c} squares.", "a photo showing a {c} of squares."),
            render_count, (0.79, 0.87), "row_scanlines", "some squares.",
        ),
        # the two tasks after the first six (8 like the paper's smallest suite: suite.tasks=[..., shapes, sizes]);
        # appended, so the first six keep their random streams and cached datasets
        MiniTask(
            "shapes",
            ("circle", "box", "triangle", "cross", "diamond"),
            ("a {c} shape.", "a photo of a {c} shape.", "a {c} silhouette."),
            render_shape, (0.065, 0.105), "vignette", "a shape.",
        ),
        MiniTask(
            "sizes",
            ("tiny", "small", "midsize", "big", "huge"),
            ("a {c} ring.", "a photo of a {c} ring.", "one {c} hoop."),
            render_size, (0.565, 0.605), "diagonal_scanlines", "a hoop.",
        ),
    ]
}


def get_mini_task(name: str) -> MiniTask:
    try:
        return MINI_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown mini task {name!r}; valid: {sorted(MINI_TASKS)}") from None


SPLITS = ("train", "validation", "test", "pretrain")


def generate_split(task: MiniTask, split: str, n: int, seed: int, size: int, signed_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic images and balanced labels for one split. Only `pretrain` mixes plain and signed images."""
    task_idx = list(MINI_TASKS).index(task.name)
    rng = np.random.default_rng([seed, task_idx, SPLITS.index(split), GENERATOR_VERSION])
    labels = rng.permutation(np.arange(n) % len(task.classnames))
    signed = rng.random(n) < signed_share if split == "pretrain" else np.ones(n, dtype=bool)  # = signed_mask(...)
    return task.images(rng, labels, size, signed), labels


def signed_mask(task: MiniTask, split: str, n: int, seed: int, signed_share: float) -> np.ndarray:
    """Which images of a split carry the task's domain signature: all of them, except in `pretrain` (a share).

    The same draws as `generate_split` (so the pretraining captions can be told which images are signed).
    """
    if split != "pretrain":
        return np.ones(n, dtype=bool)
    rng = np.random.default_rng([seed, list(MINI_TASKS).index(task.name), SPLITS.index(split), GENERATOR_VERSION])
    rng.permutation(np.arange(n) % len(task.classnames))
    return rng.random(n) < signed_share
