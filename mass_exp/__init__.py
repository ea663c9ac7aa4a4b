"""mass-exp: Hydra-configured experiments for merging fine-tuned CLIP image encoders (MASS and baselines)."""

import os as _os

# OpenMP threads that spin while waiting make torch 5-15x slower on CPU whenever another process shares the cores
# (measured here: a 25 s fine-tune took 371 s beside one other job). Passive waiting costs little when alone.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# the typed schemas of conf/ live in Hydra's ConfigStore: register them for every user of the config (CLI, compose API)
from mass_exp.config import register as _register_schemas  # noqa: E402

_register_schemas()
