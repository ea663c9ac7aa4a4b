"""`suite=mini8`: the mini suite on 8 tasks is the six of `suite=mini` plus the two appended generated tasks, with
the same generator (so the six datasets are shared) and a fixed coefficient for every merger mini has."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mass_exp.data.datasets import mini_dataset_key
from mass_exp.data.mini import MINI_TASKS

CONF = Path(__file__).resolve().parents[2] / "conf"


def _suite(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"suite={name}"])
    return OmegaConf.to_container(cfg.suite, resolve=True)


def test_mini8_is_mini_plus_the_appended_tasks():
    mini, mini8 = _suite("mini"), _suite("mini8")
    assert mini8["name"] == "mini8"
    assert mini8["tasks"] == mini["tasks"] + ["shapes", "sizes"]
    # the generator draws each task's stream from its index in MINI_TASKS: the six come first, so appending two
    # tasks leaves their images unchanged
    assert list(MINI_TASKS)[:6] == mini["tasks"] and list(MINI_TASKS)[6:8] == ["shapes", "sizes"]
    assert mini8["generator"] == mini["generator"]
    for task in mini["tasks"]:
        assert mini_dataset_key(task, mini8["generator"]) == mini_dataset_key(task, mini["generator"])
    assert {k: v for k, v in mini8.items() if k not in ("name", "tasks", "fixed_alpha")} == \
        {k: v for k, v in mini.items() if k not in ("name", "tasks", "fixed_alpha")}


def test_mini8_has_a_fixed_coefficient_for_every_merger_of_mini():
    mini, mini8 = _suite("mini"), _suite("mini8")
    assert set(mini8["fixed_alpha"]) == set(mini["fixed_alpha"])
    assert mini8["fixed_alpha"]["tsv_m"] == 1.0  # the paper's fixed alpha, not validated
    for method, alpha in mini8["fixed_alpha"].items():
        assert isinstance(alpha, (int, float)) or set(alpha) == {"tiny"}, method
