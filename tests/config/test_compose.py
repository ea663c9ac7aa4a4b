"""Every option of every config group composes, alone with the defaults, and resolves; so a broken config cannot ship."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mass_exp.cli import quote_numeric_group_choices
from mass_exp.config.schema import GROUP_SCHEMAS
from mass_exp.merging.registry import available_mergers

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "experiment")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _resolve(cfg) -> dict:
    # hydra-specific interpolations (${now:...}, ${hydra:...}) are not needed outside a run
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    return OmegaConf.to_container(cfg, resolve=True)


def test_defaults_compose_and_resolve():
    cfg = _resolve(_compose([]))
    assert cfg["suite"]["name"] == "mini" and cfg["backbone"]["name"] == "tiny"
    assert cfg["logger"]["mode"] in {"offline", "online", "disabled"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    composed = _compose([f"{group}={quote_numeric_group_choices([f'{group}={option}'], {group})[0].split('=', 1)[1]}"])
    cfg = _resolve(composed)
    assert cfg[group] is not None
    if group in GROUP_SCHEMAS:  # typed by its schema (conf/<group>/*.yaml: defaults [/schema/<group>/<kind>@_here_])
        assert OmegaConf.get_type(composed[group]) in GROUP_SCHEMAS[group].values(), (group, option)


@pytest.mark.parametrize("backbone,suite", [("tiny", "mini"), ("tiny", "mini8"), ("ViT-B-32", "8"), ("ViT-B-16", "14"), ("ViT-L-14", "20")])
@pytest.mark.parametrize("method", _options("method"))
def test_method_alphas_resolve_for_every_backbone_and_suite(backbone, suite, method):
    cfg = _resolve(_compose([f"backbone={backbone}", f"suite='{suite}'", f"method={method}"]))
    alpha = cfg["method"]["alpha"]
    assert alpha is None or isinstance(alpha, (int, float))
    assert cfg["router"]["block"] == cfg["backbone"]["routing_block"]


def test_every_method_config_names_a_registered_merger():
    for option in _options("method"):
        cfg = _resolve(_compose([f"method={option}"]))
        assert cfg["method"]["name"] in available_mergers(), option


def test_real_suites_follow_reference_order():
    import json

    ref = json.loads((Path(__file__).resolve().parents[3] / "shared/reference/tasks.json").read_text()) \
        if (Path(__file__).resolve().parents[3] / "shared/reference/tasks.json").exists() else None
    if ref is None:
        pytest.skip("shared reference not present")
    for suite in ("8", "14", "20"):
        cfg = _resolve(_compose([f"suite='{suite}'"]))
        assert cfg["suite"]["tasks"] == ref["suites"][suite]


def test_quote_numeric_group_choices():
    groups = {"suite", "backbone"}
    assert quote_numeric_group_choices(["suite=8"], groups) == ["suite='8'"]
    assert quote_numeric_group_choices(["suite=8,14,20"], groups) == ["suite='8','14','20'"]
    assert quote_numeric_group_choices(["suite=mini", "seed=3", "backbone=ViT-B-32"], groups) == \
        ["suite=mini", "seed=3", "backbone=ViT-B-32"]
