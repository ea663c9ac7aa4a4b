from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mass_exp.merging import available_mergers, get_merger
from mass_exp.merging.registry import MergerSpec
from mass_exp.pipeline import RESERVED_METHOD_KEYS  # keys the pipeline reads itself; the rest are merger kwargs

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"

RESERVED = {"name", "alpha", "alpha_protocol", "alpha_grid"}  # every method YAML has these
EXPECTED = {
    "zeroshot", "finetuned", "weight_average", "task_arithmetic", "ties", "consensus",
    "tsv_c", "tsv_m", "iso_c", "iso_cts", "smile",
}


def test_all_expected_mergers_registered():
    assert set(available_mergers()) == EXPECTED
    assert available_mergers() == sorted(available_mergers())


def test_unknown_merger_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown merger 'tsvm'.*task_arithmetic.*tsv_m"):
        get_merger("tsvm")


def test_flags():
    assert {n for n in EXPECTED if get_merger(n).per_task} == {"finetuned", "tsv_c"}
    assert {n for n in EXPECTED if get_merger(n).uses_factors} == {"tsv_c", "tsv_m", "smile"}
    assert {n for n in EXPECTED if get_merger(n).builds_module} == {"smile"}
    assert {n for n in EXPECTED if not get_merger(n).coefficient} == {"zeroshot", "finetuned", "smile"}
    spec = get_merger("tsv_m")
    assert isinstance(spec, MergerSpec) and spec.name == "tsv_m"
    with pytest.raises(AttributeError):
        spec.name = "x"  # frozen


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_signature_convention(name):
    spec = get_merger(name)
    params = inspect.signature(spec.fn).parameters
    first, second = list(params)[:2]
    assert (first, second) == ("pretrained", "finetuned")
    assert params["alpha"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ("task" in params) == spec.per_task
    assert ("factors" in params) == spec.uses_factors


def _method_yamls():
    return sorted(CONF.glob("*.yaml"))


def test_every_merger_has_a_yaml():
    assert {p.stem for p in _method_yamls()} >= EXPECTED


@pytest.mark.parametrize("path", _method_yamls(), ids=lambda p: p.stem)
def test_method_yaml_names_registered_merger(path):
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)  # the schema line (mass_exp/config/schema.py), not a merger key
    assert raw.name == path.stem
    spec = get_merger(raw.name)
    assert RESERVED <= set(raw.keys()), f"{path.name} lacks a reserved key"
    assert raw.alpha_protocol in ("fixed", "validation")
    cfg = OmegaConf.create(
        {"suite": {"fixed_alpha": {}}, "backbone": {"name": "ViT-B-32"}, "method": raw}
    )
    method = OmegaConf.to_container(cfg.method, resolve=True)
    params = inspect.signature(spec.fn).parameters
    for key in set(method) - RESERVED_METHOD_KEYS:
        assert key in params, f"{path.name}: {key!r} is not a kwarg of {spec.fn.__name__}"
    if method["alpha"] is None:
        assert not spec.coefficient
    else:
        assert isinstance(method["alpha"], float)
        assert method["alpha_grid"] and all(g > 0 for g in method["alpha_grid"])


def test_fixed_alpha_lookup_from_suite():
    raw = OmegaConf.load(CONF / "iso_c.yaml")
    cfg = OmegaConf.create(
        {"suite": {"fixed_alpha": {"iso_c": {"ViT-L-14": 1.5}}}, "backbone": {"name": "ViT-L-14"}, "method": raw}
    )
    assert cfg.method.alpha == 1.5
    raw = OmegaConf.load(CONF / "task_arithmetic.yaml")
    cfg = OmegaConf.create({"suite": {"fixed_alpha": {"task_arithmetic": 0.1}}, "method": raw})
    assert cfg.method.alpha == 0.1
