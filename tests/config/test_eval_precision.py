"""eval.precision -> Lightning precision (issue 14)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mass_exp.errors import ConfigError
from mass_exp.pipeline import eval_precision, expert_cache_options


@pytest.mark.parametrize("value,expected", [(32, "32-true"), ("32", "32-true"), ("bf16", "bf16-mixed"),
                                            ("16-mixed", "16-mixed"), (None, "32-true")])
def test_eval_precision_maps_to_lightning(value, expected):
    cfg = OmegaConf.create({"eval": {"precision": value}, "trainer": {"precision": "32-true"}})
    assert eval_precision(cfg) == expected


def test_bad_eval_precision_is_a_config_error():
    cfg = OmegaConf.create({"eval": {"precision": "fp8"}, "trainer": {"precision": "32-true"}})
    with pytest.raises(ConfigError, match="eval.precision"):
        eval_precision(cfg)


def test_expert_cache_options():
    r = OmegaConf.create({"expert_cache_gb": None, "expert_cache_free_fraction": 0.25, "expert_cache_size": None})
    assert expert_cache_options(r) == {"cache_size": None, "cache_gb": None, "cache_free_fraction": 0.25}
    r = OmegaConf.create({"expert_cache_gb": 2, "expert_cache_size": 4})
    assert expert_cache_options(r) == {"cache_size": 4, "cache_gb": 2.0, "cache_free_fraction": 0.25}
    # out-of-range values are refused by the schema (tests/config/test_validation.py, INVALID)
