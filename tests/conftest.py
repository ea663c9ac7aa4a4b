"""Session-wide test settings: everything offline; W&B writes offline run directories only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """Root of the e2e smoke runs; its cache/ holds the assets every smoke-config run shares."""
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture(scope="session")
def first_run(smoke_root):
    """The first run builds every asset (data, pretrained CLIP, endpoints, heads) and evaluates task arithmetic."""
    try:
        from e2e.conftest import SMOKE, run_cli
    except ImportError:  # pragma: no cover - run from the repository root with `python -m pytest`
        from tests.e2e.conftest import SMOKE, run_cli

    out = smoke_root / "first"
    proc = run_cli(SMOKE + ["method=task_arithmetic", "router=none"], out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, out
