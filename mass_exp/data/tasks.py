"""Tasks as data: class names, prompt templates and where the images come from.

The real benchmark's 20 tasks are read from the packaged `resources/tasks.json` (one entry per task); the generated
`mini` tasks come from `mass_exp.data.mini`. Both end up as a `TaskSpec`, so everything downstream is the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Sequence

from mass_exp.data.mini import MINI_TASKS
from mass_exp.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    """One image-classification task of a suite."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]  # with "{c}" where the class name goes
    source: str  # "mini" (generated) or "hf" (a HF hub dataset)
    hf_dataset: str | None = None
    hf_config: str | None = None
    test_split: str = "test"
    val_split: str | None = None  # a dedicated validation split; None = carve one from train
    image_column: str = "image"
    label_column: str = "label"
    note: str | None = None
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        return [t.replace("{c}", classname) for t in self.templates]


@lru_cache(maxsize=1)
def _registry_json() -> dict:
    return json.loads(resources.files("mass_exp").joinpath("resources/tasks.json").read_text())


def suite_task_names(suite: str) -> list[str]:
    """Task names of a published suite ("8", "14", "20"), in the benchmark's order."""
    suites = _registry_json()["suites"]
    if suite not in suites:
        raise ConfigError(f"unknown suite {suite!r}; valid: {sorted(suites)} or a list of task names")
    return list(suites[suite])


def get_task(name: str) -> TaskSpec:
    """TaskSpec by name: a mini task or one of the 20 real tasks."""
    if name in MINI_TASKS:
        t = MINI_TASKS[name]
        return TaskSpec(name=name, classnames=t.classnames, templates=t.templates, source="mini", val_split="validation")
    tasks = _registry_json()["tasks"]
    if name not in tasks:
        raise ConfigError(f"unknown task {name!r}; valid: {sorted(tasks) + sorted(MINI_TASKS)}")
    e = tasks[name]
    return TaskSpec(
        name=name,
        classnames=tuple(e["classnames"]),
        templates=tuple(e["templates"]),
        source="hf",
        hf_dataset=e.get("hf_dataset"),
        hf_config=e.get("hf_config"),
        test_split=e.get("test_split", "test"),
        val_split=e.get("val_split"),
        image_column=e.get("image_column", "image"),
        label_column=e.get("label_column", "label"),
        note=e.get("note"),
    )


def get_tasks(names: Sequence[str]) -> list[TaskSpec]:
    if len(set(names)) != len(names):
        raise ConfigError(f"suite.tasks lists a task twice: {list(names)}")
    if not names:
        raise ConfigError("suite.tasks is empty: list at least one task")
    return [get_task(n) for n in names]
