"""Config schemas (`schema.py`), their range rules (`rules.py`) and the one validation of every entry point
(`validate.py`): `validate(cfg)` for a composed config, `check_overrides(overrides)` for command-line overrides."""

from mass_exp.config.schema import register
from mass_exp.config.validate import check_overrides, problem, validate

register()

__all__ = ["check_overrides", "problem", "register", "validate"]
