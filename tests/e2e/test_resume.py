"""Resume: a sweep killed partway and rerun redoes only what did not finish, and ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mass_exp.resume import identity, is_complete, run_hash

from .conftest import SMOKE

METHODS = ["zeroshot", "weight_average", "task_arithmetic", "ties"]


def _sweep_cmd(sweep_dir: Path) -> list[str]:
    code = "import sys; from mass_exp.cli import evaluate; sys.argv = ['mass-exp'] + sys.argv[1:]; evaluate()"
    return [sys.executable, "-c", code, "-m", *SMOKE, f"method={','.join(METHODS)}", "router=none", "logger=none",
            f"hydra.sweep.dir={sweep_dir}"]


def _env(out: Path, cache: Path) -> dict[str, str]:
    return dict(os.environ, MASS_EXP_OUTPUT_DIR=str(out), MASS_EXP_CACHE_DIR=str(cache), WANDB_MODE="offline",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _stored(out: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in (out / "results_store").glob("*/results.json")}


def _per_method(sweep_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sweep_dir.rglob("results.json"):
        r = json.loads(p.read_text())
        out[r["method"]] = {t: (e["correct"], e["samples"], e["acc"]) for t, e in r["tasks"].items()}
    return out


@pytest.fixture(scope="module")
def assets_built(first_run):
    """The smoke assets (data, pretrained CLIP, endpoints) exist in the shared cache after the first e2e run."""
    return first_run[1].parent / "cache"


def test_killed_sweep_resumes_without_recomputing(assets_built, tmp_path):
    cache = assets_built
    # the reference: one uninterrupted sweep
    ref_out = tmp_path / "ref"
    proc = subprocess.run(_sweep_cmd(ref_out / "sweep"), env=_env(ref_out, cache), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _per_method(ref_out / "sweep")
    assert sorted(reference) == sorted(METHODS)

    # the same sweep, killed (SIGKILL to its whole process group) once two runs have finished
    out = tmp_path / "killed"
    p = subprocess.Popen(_sweep_cmd(out / "sweep"), env=_env(out, cache), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while len(_stored(out)) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    finished = _stored(out)
    assert 2 <= len(finished) < len(METHODS), f"the kill came too late to test anything: {len(finished)} finished"
    before = {h: (path.stat().st_mtime_ns, path.read_bytes()) for h, path in finished.items()}

    # rerun the identical command: finished runs are found, not recomputed; the rest are done
    proc = subprocess.run(_sweep_cmd(out / "sweep"), env=_env(out, cache), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("is already complete; not recomputed") == len(finished)
    for h, (mtime, blob) in before.items():
        path = _stored(out)[h]
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == blob
    assert len(_stored(out)) == len(METHODS)
    assert _per_method(out / "sweep") == reference


def test_run_hash_ignores_paths_logging_and_devices_but_not_the_method():
    base = {"method": {"name": "tsv_m", "alpha": 1.0}, "paths": {"output_dir": "/a"}, "logger": {"name": "wandb"},
            "trainer": {"devices": 1, "precision": "32-true"}, "eval": {"batch_size": 8, "num_workers": 0}}
    moved = json.loads(json.dumps(base))
    moved["paths"]["output_dir"] = "/b"
    moved["logger"]["name"] = "none"
    moved["trainer"]["devices"] = 4
    moved["eval"]["num_workers"] = 8
    assert run_hash(base) == run_hash(moved)
    other = json.loads(json.dumps(base))
    other["method"]["alpha"] = 0.5
    assert run_hash(other) != run_hash(base)
    other = json.loads(json.dumps(base))
    other["trainer"]["precision"] = "16-mixed"
    assert run_hash(other) != run_hash(base)
    assert "paths" not in identity(base)


def test_run_hash_leaves_out_newer_keys_at_their_neutral_value():
    base = {"method": {"name": "tsv_m"}, "router": {"name": "projection", "block": 4},
            "endpoints": {"source": "mini"}}
    paper = json.loads(json.dumps(base))
    paper["router"]["routing_param"] = "mlp_in"
    paper["endpoints"]["routing_param"] = "mlp_in"
    assert run_hash(paper) == run_hash(base)  # results filed before router.routing_param existed still count
    attn = json.loads(json.dumps(paper))
    attn["router"]["routing_param"] = "attn_in"
    assert run_hash(attn) != run_hash(base)
    attn = json.loads(json.dumps(paper))
    attn["endpoints"]["routing_param"] = "attn_in"
    assert run_hash(attn) != run_hash(base)


def test_only_complete_results_of_the_same_config_count():
    h = "abc"
    good = {"status": "complete", "run_hash": h, "tasks": {"a": {"samples": 3}, "b": {"samples": 1}}}
    assert is_complete(good, h, ["a", "b"])
    assert not is_complete({**good, "status": "running"}, h, ["a", "b"])
    assert not is_complete(good, "other", ["a", "b"])
    assert not is_complete(good, h, ["a", "b", "c"])  # a task missing
    assert not is_complete({**good, "tasks": {"a": {"samples": 3}, "b": {"samples": 0}}}, h, ["a", "b"])


def test_a_half_written_or_foreign_result_is_redone(tmp_path):
    from mass_exp.resume import find_finished, load_complete

    h = "abc"
    path = tmp_path / "results.json"
    full = json.dumps({"status": "complete", "run_hash": h, "tasks": {"a": {"samples": 3}}})
    path.write_text(full[: len(full) // 2])  # truncated: what a non-atomic writer could leave behind
    assert load_complete(path, h, ["a"]) is None
    path.write_text(full)
    assert load_complete(path, h, ["a"])["run_hash"] == h
    assert find_finished(tmp_path / "store", tmp_path, h, ["a"]) is not None
    assert find_finished(tmp_path / "store", tmp_path / "elsewhere", h, ["a"]) is None
