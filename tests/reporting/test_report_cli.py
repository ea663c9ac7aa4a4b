"""`mass-exp-report`: stdout Markdown, --out files (tables, valid PNG plots), --wandb, and the error exit."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import pytest
from PIL import Image

from mass_exp.cli import report


def _png_ok(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_nothing_found_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        report([str(tmp_path / "empty")])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().count("\n") == 0
    assert captured.err.startswith("error: no complete results.json under ")


def test_only_incomplete_runs_exit_2(tmp_path, make_result, write_result, capsys):
    write_result(tmp_path, "a", make_result("tsv_m", "tiny", "mini", 0.5, status="running"))
    with pytest.raises(SystemExit) as e:
        report([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: skipping incomplete") and err[-1].startswith("error: no complete results.json")


def test_console_script_exit_code(tmp_path):
    """The installed entry point: exit status 2 and a single stderr line."""
    proc = subprocess.run([sys.executable, "-c", "from mass_exp.cli import report; report()", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: no complete results.json under {tmp_path}"]


def test_prints_markdown_to_stdout(sweep, capsys):
    report([str(sweep)])
    out = capsys.readouterr().out
    assert out.startswith("# mass-exp report")
    assert "| tsv_m | 48.0 / 60.0 | 70.0 / 87.5 | – |" in out
    assert "| tsv_m — published [M] | – | 83.2 / – | – |" in out
    assert "### ViT-L-14 / 14" in out
    assert "warning" not in out  # warnings go to stderr


def test_no_published_flag(sweep, capsys):
    report([str(sweep), "--no-published"])
    out = capsys.readouterr().out
    assert "| tsv_m | 48.0 / 60.0 | 70.0 / 87.5 | – |" in out and "— published [" not in out


def test_out_dir_writes_tables_and_valid_plots(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    report([str(sweep), "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "| tsv_m | 48.0 / 60.0 | 70.0 / 87.5 | – |" in md
    assert "![per_task_ViT-B-32_8](plots/per_task_ViT-B-32_8.png)" in md
    tex = (out / "main_table.tex").read_text()
    assert r"\begin{tabular}" in tex and r"tsv\_m & 48.0\,/\,60.0" in tex
    rows = list(csv.DictReader(io.StringIO((out / "main_table.csv").read_text())))
    assert next(r for r in rows if r["method"] == "tsv_m")["ViT-B-32/8 norm"] == "87.5000"
    per_task = list(csv.reader(io.StringIO((out / "per_task_ViT-B-32_8.csv").read_text())))
    assert per_task[0] == ["method", "Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN", "avg"]
    assert next(r for r in per_task if r[0] == "tsv_m")[1:3] == ["85.0000", "90.0000"]
    assert (out / "per_task_ViT-B-32_8.tex").exists() and (out / "runs.csv").exists()
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == [
        "confusion_MASS_projection_over_tsv_m_ViT-B-32_8.png",
        "confusion_MASS_projection_over_tsv_m_tiny_mini.png",
        "per_task_ViT-B-32_8.png", "per_task_ViT-L-14_14.png", "per_task_tiny_mini.png",
    ]
    for p in (out / "plots").glob("*.png"):
        w, h = _png_ok(p)
        assert w > 200 and h > 200
    assert not list(out.rglob("*.tmp"))  # atomic writes left nothing behind


def test_wandb_summary_offline(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "report"
    report([str(sweep / "mini"), "--out", str(out), "--wandb"])
    err = capsys.readouterr().err
    assert "W&B run:" in err
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))
