"""Tasks as data: class names, prompt templates, label maps, preprocessing and where the images come from.

The real benchmark's 20 tasks are read from the packaged `resources/tasks.json` (dataset facts shared by every
checkpoint source) and, for a *head source* (``tall_masks``, ``retrained``, ``fusion_bench``), from
`resources/sources/<source>.json`, whose per-task records override the shared facts with what that source's code
fine-tuned against: class names in head-row order, templates, synonym handling, a label map (dataset label -> head
row), image preprocessing, the dataset itself and the validation split. A source selects a data record; nothing
downstream branches on its name. The generated `mini` tasks come from `mass_exp.data.mini`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence, Union

from mass_exp.data.mini import MINI_TASKS
from mass_exp.errors import ConfigError

HEAD_SOURCES: tuple[str, ...] = ("tall_masks", "retrained", "fusion_bench")
# how a class given as a list of synonyms enters a template
SYNONYMS = ("none", "python_list_str")  # python_list_str: the template gets Python's str() of the list (TALL-masks)

ClassName = Union[str, tuple[str, ...]]


@dataclass(frozen=True)
class TaskSpec:
    """One image-classification task of a suite, as one head source sees it."""

    name: str
    classnames: tuple[ClassName, ...]  # head rows; a tuple of synonyms where `synonyms` says how to use it
    templates: tuple[str, ...]  # with "{c}" where the class name goes
    source: str  # "mini" (generated) or "hf" (a HF hub dataset or a local copy)
    hf_dataset: str | None = None
    hf_config: str | None = None
    test_split: str = "test"
    val_split: str | None = None  # a dedicated validation split; None = carve one from train
    image_column: str = "image"
    label_column: str = "label"
    note: str | None = None
    head_source: str | None = None  # the checkpoint source whose heads/data these are (None: the shared facts)
    synonyms: str = "none"
    label_map: tuple[int, ...] | None = None  # label_map[dataset label] = head row; None = identity
    label_names: tuple[str, ...] = ()  # the dataset's label names in label order (resources/tasks.json)
    guard_names: tuple[str, ...] | None = None  # what the label guard expects instead of the head rows, when set
    label_guard_accept: tuple[tuple[int, str], ...] = ()  # known, intended (dataset label, dataset name) differences
    classnames_from_dataset: bool = False  # head rows = the dataset's ClassLabel names verbatim (at run time)
    preprocess: tuple[str, ...] = ()  # named steps, see mass_exp.data.preprocess
    val_fraction: float = 0.1
    val_max_samples: int = 5000
    val_seed: int = 0
    warning: str | None = None  # a known gap (e.g. no hub copy of the data); shown by mass-exp-tasks and results.json
    provenance: dict = field(default_factory=dict, hash=False, compare=False)
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def num_classes(self) -> int:
        """Number of head rows (may exceed the dataset's labels, e.g. retrained CIFAR10's 11-way head)."""
        return len(self.classnames)

    @property
    def num_labels(self) -> int:
        """Number of labels the dataset has."""
        return len(self.label_names) if self.label_names else self.num_classes

    def class_text(self, classname: ClassName) -> str:
        if isinstance(classname, (tuple, list)):
            if self.synonyms == "python_list_str":
                return str(list(classname))
            raise ConfigError(f"task {self.name}: class {list(classname)} is a synonym list but synonyms={self.synonyms!r}")
        return classname

    def prompts(self, classname: ClassName) -> list[str]:
        c = self.class_text(classname)
        return [t.replace("{c}", c) for t in self.templates]

    def head_row_name(self, row: int) -> str:
        c = self.classnames[row]
        return c[0] if isinstance(c, (tuple, list)) else c

    def expected_label_names(self) -> list[str]:
        """What dataset label i should be called: `guard_names` (a source's head text that differs from the dataset's
        names on purpose, or the packaged copy of names read at run time), else the head row it maps to."""
        if self.guard_names is not None:
            return list(self.guard_names)
        rows = self.label_map or tuple(range(self.num_labels))
        return [self.head_row_name(r) for r in rows]

    def with_dataset_classnames(self, names: Sequence[str]) -> "TaskSpec":
        """This task with its head rows taken from the dataset's ClassLabel names (model-merging's rule)."""
        return replace(self, classnames=tuple(names), classnames_from_dataset=False,
                       provenance={**self.provenance, "classnames": "the dataset's ClassLabel names (read at run time)"})

    def describe(self) -> dict[str, Any]:
        """The record `mass-exp-tasks --json` prints for this task."""
        return {
            "hf_dataset": self.hf_dataset, "hf_config": self.hf_config, "test_split": self.test_split,
            "val_split": self.val_split or (f"carved from train: torch random_split, {self.val_fraction:g} of train, "
                                            f"at most {self.val_max_samples}, seed {self.val_seed}"),
            "num_classes": self.num_classes, "head_source": self.head_source or "shared",
            "classnames": [list(c) if isinstance(c, tuple) else c for c in self.classnames],
            "templates": list(self.templates),
            "label_map": None if self.label_map is None else {str(i): r for i, r in enumerate(self.label_map)},
            "preprocess": list(self.preprocess), "reference_acc": None,
        }


@lru_cache(maxsize=1)
def _registry_json() -> dict:
    return json.loads(resources.files("mass_exp").joinpath("resources/tasks.json").read_text())


@lru_cache(maxsize=None)
def source_record(head_source: str) -> dict:
    """The packaged record of a head source (`resources/sources/<source>.json`)."""
    if head_source not in HEAD_SOURCES:
        raise ConfigError(f"endpoints.head_source={head_source!r} is not one of {list(HEAD_SOURCES)}")
    return json.loads(resources.files("mass_exp").joinpath(f"resources/sources/{head_source}.json").read_text())


def suite_task_names(suite: str) -> list[str]:
    """Task names of a published suite ("8", "14", "20"), in the benchmark's order."""
    suites = _registry_json()["suites"]
    if suite not in suites:
        raise ConfigError(f"unknown suite {suite!r}; valid: {sorted(suites)} or a list of task names")
    return list(suites[suite])


def _classname(c: Any) -> ClassName:
    return tuple(c) if isinstance(c, list) else c


def _label_map(raw: dict | None, n_labels: int, n_rows: int, where: str) -> tuple[int, ...] | None:
    if raw is None:
        return None
    m = tuple(int(raw.get(str(i), i)) for i in range(n_labels))
    if any(not 0 <= r < n_rows for r in m) or len(set(m)) != len(m):
        raise ConfigError(f"{where}: label_map {raw} does not map {n_labels} labels onto distinct rows of {n_rows}")
    return m


def get_task(name: str, head_source: str | None = None) -> TaskSpec:
    """TaskSpec by name: a mini task, or one of the 20 real tasks as `head_source` (None: the shared facts) sees it."""
    if name in MINI_TASKS:
        t = MINI_TASKS[name]
        return TaskSpec(name=name, classnames=t.classnames, templates=t.templates, source="mini", val_split="validation")
    tasks = _registry_json()["tasks"]
    if name not in tasks:
        raise ConfigError(f"unknown task {name!r}; valid: {sorted(tasks) + sorted(MINI_TASKS)}")
    e = dict(tasks[name])
    label_names = tuple(e["classnames"])
    provenance = dict(e.get("provenance") or {})
    val: dict = {}
    if head_source is not None:
        rec = source_record(head_source)
        val = rec.get("validation") or {}
        over = {**(rec.get("defaults") or {}), **(rec.get("tasks", {}).get(name) or {})}
        if "provenance" in over:
            provenance["source"] = over["provenance"]
        explicit_names = "label_names" in over
        e.update({k: v for k, v in over.items() if k not in ("provenance",)})
        label_names = tuple(over.get("label_names") or label_names)
    else:
        explicit_names = False
    classnames = tuple(_classname(c) for c in e["classnames"])
    where = f"resources/sources/{head_source}.json:{name}" if head_source else f"resources/tasks.json:{name}"
    synonyms = e.get("synonyms", "none")
    if synonyms not in SYNONYMS:
        raise ConfigError(f"{where}: synonyms={synonyms!r} is not one of {list(SYNONYMS)}")
    return TaskSpec(
        name=name,
        classnames=classnames,
        templates=tuple(e["templates"]),
        source="hf",
        hf_dataset=e.get("hf_dataset"),
        hf_config=e.get("hf_config"),
        test_split=e.get("test_split", "test"),
        val_split=e.get("val_split"),
        image_column=e.get("image_column", "image"),
        label_column=e.get("label_column", "label"),
        note=e.get("note"),
        head_source=head_source,
        synonyms=synonyms,
        label_map=_label_map(e.get("label_map"), len(label_names), len(classnames), where),
        label_names=label_names,
        label_guard_accept=tuple(sorted((int(k), str(v)) for k, v in (e.get("label_guard_accept") or {}).items())),
        classnames_from_dataset=bool(e.get("classnames_from_dataset", False)),
        preprocess=tuple(e.get("preprocess") or ()),
        val_fraction=float(val.get("fraction", 0.1)),
        val_max_samples=int(val.get("max_samples", 5000)),
        val_seed=int(val.get("seed", 0)),
        warning=e.get("warning"),
        provenance=provenance,
        guard_names=label_names if (explicit_names or e.get("classnames_from_dataset")) else None,
    )


def get_tasks(names: Sequence[str], head_source: str | None = None) -> list[TaskSpec]:
    if len(set(names)) != len(names):
        raise ConfigError(f"suite.tasks lists a task twice: {list(names)}")
    if not names:
        raise ConfigError("suite.tasks is empty: list at least one task")
    return [get_task(n, head_source) for n in names]


# ------------------------------------------------------------------------------------------- label guard

_NON_ALNUM = re.compile(r"[\W_]+", re.UNICODE)


def normalize_label(name: str) -> str:
    """Case, `_`, spaces and punctuation removed: 'T-shirt/top' == 't shirt top' == 'T_shirt_top'."""
    return _NON_ALNUM.sub("", str(name)).casefold()


def label_mismatches(task: TaskSpec, dataset_names: Sequence[str]) -> list[tuple[int, str, str]]:
    """(dataset label, dataset name, expected name) for every label whose name differs after `normalize_label`,
    leaving out the task's known, intended differences (`label_guard_accept`)."""
    expected = task.expected_label_names()
    accepted = {(i, normalize_label(n)) for i, n in task.label_guard_accept}
    out = []
    for i in range(max(len(expected), len(dataset_names))):
        got = dataset_names[i] if i < len(dataset_names) else "<none>"
        want = expected[i] if i < len(expected) else "<none>"
        if normalize_label(got) != normalize_label(want) and (i, normalize_label(got)) not in accepted:
            out.append((i, got, want))
    return out


def check_label_names(task: TaskSpec, dataset_names: Sequence[str], *, accept: bool = False) -> list[tuple[int, str, str]]:
    """The label guard: raise `ConfigError` (one line: task, first differing index, both names) when the dataset's
    ClassLabel names disagree with the class list in use; with `accept` (data.accept_label_mismatch) return them."""
    bad = label_mismatches(task, dataset_names)
    if bad and not accept:
        i, got, want = bad[0]
        more = f" ({len(bad)} labels differ)" if len(bad) > 1 else ""
        src = task.head_source or "shared"
        raise ConfigError(f"task {task.name}: the dataset's label {i} is {got!r} but the {src} class list expects "
                          f"{want!r}{more}; wrong dataset, config or label order? If the difference is intended, "
                          f"accept it with data.accept_label_mismatch=[{task.name}]")
    return bad
