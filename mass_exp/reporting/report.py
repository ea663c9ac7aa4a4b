"""Report I/O: write a `Report` (see tables.py) as files, draw its plots, log it to W&B. No table logic lives here."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from mass_exp.reporting.tables import (PAPER_RULE, Report, main_table_csv, main_table_latex, per_task_csv, per_task_latex,
                                       report_markdown, runs_csv)
from mass_exp.utils.io import atomic_write_text


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """plots/per_task_<backbone>_<suite>.png for every column and plots/confusion_<row>_<backbone>_<suite>.png for
    every routed run with a confusion matrix."""
    from mass_exp.reporting.plots import plot_confusion, plot_per_task

    paths = []
    for t in report.per_task:
        # strict scoring only: the paper-rule twin of every MASS row would double the bars
        values = {label: v for label, v, _ in t.rows if not label.endswith(PAPER_RULE)}
        paths.append(plot_per_task(values, t.tasks, out_dir / "plots" / f"per_task_{slug(t.col[0])}_{slug(t.col[1])}.png",
                                   title=f"{t.col[0]} / {t.col[1]}: normalized accuracy per task"))
    for e in report.entries:
        matrix = (e.result.get("router") or {}).get("confusion_matrix") if isinstance(e.result.get("router"), dict) else None
        if e.scoring != "strict" or not matrix:
            continue
        name = f"confusion_{slug(e.label)}_{slug(e.backbone)}_{slug(e.suite)}.png"
        paths.append(plot_confusion(matrix, list(e.result["tasks"]), out_dir / "plots" / name,
                                    title=f"{e.label}\n{e.backbone} / {e.suite}"))
    return paths


def write_report(report: Report, out_dir: str | Path, sources: Sequence[str] = (),
                 published: Mapping[str, Any] | None = None) -> list[Path]:
    """report.md, main_table.{md,tex,csv}, runs.csv, per_task_<b>_<s>.{csv,tex} and plots/*.png, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, out)
    files: dict[str, str] = {
        "main_table.tex": main_table_latex(report),
        "main_table.csv": main_table_csv(report),
        "runs.csv": runs_csv(report, published),
    }
    for t in report.per_task:
        stem = f"per_task_{slug(t.col[0])}_{slug(t.col[1])}"
        files[f"{stem}.csv"] = per_task_csv(t)
        files[f"{stem}.tex"] = per_task_latex(t)
    files["report.md"] = report_markdown(report, sources, [str(p.relative_to(out)) for p in plots])
    written = []
    for name, text in files.items():
        atomic_write_text(out / name, text)
        written.append(out / name)
    return written + plots


def log_to_wandb(report: Report, out_dir: str | Path | None = None) -> str:
    """Log the main table (one line per run and scoring) as a W&B Table to a `report` run in the runs' group.

    Offline unless WANDB_MODE says otherwise; project and group come from the runs' logger config when they agree.
    Returns the run's directory."""
    import wandb

    loggers = [(e.result.get("config") or {}).get("logger") or {} for e in report.entries]
    groups = {lg.get("group") for lg in loggers if lg.get("group")}
    projects = {lg.get("project") for lg in loggers if lg.get("project")}
    group = groups.pop() if len(groups) == 1 else None
    project = projects.pop() if len(projects) == 1 else "mass-exp"
    wandb_dir = Path(out_dir) if out_dir is not None else Path.cwd()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group, job_type="report", name=f"report-{group or 'all'}",
                     mode=os.environ.get("WANDB_MODE", "offline"), dir=str(wandb_dir), tags=["report"])
    columns = ["method", "scoring", "backbone", "suite", "acc", "normalized_acc"]
    data = [[e.label, e.scoring, e.backbone, e.suite, None if e.acc is None else 100 * e.acc,
             None if e.norm is None else 100 * e.norm] for e in report.entries]
    run.log({"report/main_table": wandb.Table(columns=columns, data=data)})
    for e in report.entries:
        if e.scoring == "strict" and e.norm is not None:
            run.summary[f"normalized_acc/{e.backbone}/{e.suite}/{e.label}"] = 100 * e.norm
    path = run.dir
    run.finish()
    return str(Path(path).parent)
