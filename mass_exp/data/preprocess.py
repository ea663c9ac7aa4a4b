"""Per-source image preprocessing as named steps (the names are data in `resources/sources/<source>.json`).

Each step runs either on the PIL image before the backbone's transform (``pil``) or on the normalised tensor after it
(``tensor``), the places where the source's own code applied it:

- ``grayscale`` (pil): ``convert("L")`` then back to RGB, as TALL-masks loads FER2013.
- ``rotate_-90`` (tensor): rotate by -90 degrees (clockwise), as model-merging's `emnist_preprocess_fn` does first.
- ``hflip`` (tensor): mirror left-right, model-merging's second EMNIST step.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from mass_exp.errors import ConfigError


def _grayscale(img: Any) -> Any:
    return img.convert("L").convert("RGB")


def _rotate_minus_90(t: torch.Tensor) -> torch.Tensor:
    return torch.rot90(t, k=-1, dims=(-2, -1))


def _hflip(t: torch.Tensor) -> torch.Tensor:
    return t.flip(-1)


STEPS: dict[str, tuple[str, Callable]] = {
    "grayscale": ("pil", _grayscale),
    "rotate_-90": ("tensor", _rotate_minus_90),
    "hflip": ("tensor", _hflip),
}


class TaskTransform:
    """The backbone's transform wrapped with a task's preprocessing steps (picklable for DataLoader workers)."""

    def __init__(self, base: Callable, steps: Sequence[str], task: str = "?"):
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise ConfigError(f"task {task}: unknown preprocessing step {unknown[0]!r}; known: {sorted(STEPS)}")
        self.base = base
        self.steps = tuple(steps)

    def __call__(self, img: Any) -> torch.Tensor:
        for s in self.steps:
            stage, fn = STEPS[s]
            if stage == "pil":
                img = fn(img)
        x = self.base(img)
        for s in self.steps:
            stage, fn = STEPS[s]
            if stage == "tensor":
                x = fn(x)
        return x


def task_transform(base: Callable, steps: Sequence[str], task: str = "?") -> Callable:
    """`base` itself when there are no steps, else a `TaskTransform`."""
    return TaskTransform(base, steps, task) if steps else base
