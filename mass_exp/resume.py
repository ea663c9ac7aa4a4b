"""Resuming sweeps: a run is identified by a hash of its resolved config; finished runs are found and not redone.

Finished results are also filed in a content-addressed store (`paths.results_store/<run hash>/results.json`), so a
rerun of a sweep finds them whatever its Hydra output directories are called (they carry a timestamp by default).
A stored result counts as finished only if it parses, says `status: complete`, carries the same run hash and has
every task of the suite with at least one sample; anything else (a killed run never writes one: writes are atomic)
is redone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from mass_exp.utils.io import atomic_write_json, stable_hash

log = logging.getLogger(__name__)

# config parts that do not change a run's numbers: where things go, how they are logged, how many devices compute
IGNORED_TOP_LEVEL = ("paths", "logger", "hydra", "run_name", "resume", "prefetch_splits")
IGNORED_TRAINER = ("devices", "num_nodes", "strategy", "enable_progress_bar", "accelerator")
IGNORED_EVAL = ("num_workers",)
# keys added after results were filed, at the value that means "as before they existed": left out of the run hash
# so those results still count (issue 12: the router's input layer, the paper's mlp_in)
NEUTRAL_KEYS: dict[tuple[str, str], Any] = {("router", "routing_param"): "mlp_in",
                                             ("endpoints", "routing_param"): "mlp_in"}


def identity(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines a run's results."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    for key in IGNORED_TOP_LEVEL:
        c.pop(key, None)
    for key in IGNORED_TRAINER:
        (c.get("trainer") or {}).pop(key, None)
    for key in IGNORED_EVAL:
        (c.get("eval") or {}).pop(key, None)
    for (group, key), neutral in NEUTRAL_KEYS.items():
        node = c.get(group)
        if isinstance(node, dict) and key in node and node[key] == neutral:
            node.pop(key)
    return c


def run_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    return stable_hash(identity(cfg))


def is_complete(results: Mapping[str, Any], expected_hash: str, tasks: list[str]) -> bool:
    """True if `results` is a finished run of the config with hash `expected_hash` over exactly `tasks`."""
    if results.get("status") != "complete" or results.get("run_hash") != expected_hash:
        return False
    per_task = results.get("tasks") or {}
    return list(per_task) == list(tasks) and all(int(e.get("samples", 0)) > 0 for e in per_task.values())


def load_complete(path: Path, expected_hash: str, tasks: list[str]) -> dict[str, Any] | None:
    """The results at `path` if they are a finished run of this config, else None (with the reason logged)."""
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable %s (%s); the run will be redone", path, type(e).__name__)
        return None
    if not is_complete(results, expected_hash, tasks):
        log.warning("ignoring %s: not a complete result of this config; the run will be redone", path)
        return None
    return results


def store_path(store_dir: str | Path, h: str) -> Path:
    return Path(store_dir) / h / "results.json"


def find_finished(store_dir: str | Path, output_dir: Path, h: str, tasks: list[str]) -> dict[str, Any] | None:
    """A finished result of this run: in the job's own output dir (rerun in place) or in the store."""
    for path in (output_dir / "results.json", store_path(store_dir, h)):
        found = load_complete(path, h, tasks)
        if found is not None:
            return found
    return None


def file_result(store_dir: str | Path, results: Mapping[str, Any]) -> Path:
    """File a finished result in the store (atomically)."""
    path = store_path(store_dir, results["run_hash"])
    atomic_write_json(path, results)
    return path
