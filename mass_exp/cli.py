"""Hydra entry points. They only wire the config to `mass_exp.pipeline`; errors in user input exit with one line."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mass_exp.config import check_overrides, validate
from mass_exp.config.validate import sweep_composition_errors
from mass_exp.errors import ConfigError

log = logging.getLogger("mass_exp")


def _config_dir() -> str:
    """The `conf/` directory: $MASS_EXP_CONF, else the one beside the package (editable install / checkout)."""
    env = os.environ.get("MASS_EXP_CONF")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parent.parent / "conf")


def _third_party_filter(record: logging.LogRecord) -> bool:
    """Drop open_clip's chatter (it logs on the root logger) and its expected random-init warning for `tiny`."""
    if record.name != "root":
        return True
    return record.levelno >= logging.WARNING and "No pretrained weights loaded" not in record.getMessage()


def _quiet_third_party() -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_third_party_filter)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


_FAILED_JOBS: list[str] = []  # multirun: the jobs that refused their config (the sweep goes on; exit 2 at the end)


def _guarded(fn):
    """Validate the config, then run `fn`; a ConfigError (bad user input) prints one line `error: ...` and exits
    with status 2. In a multirun the bad job fails alone: it writes `failed.json` (status, error) in its directory,
    which mass-exp-report lists, and the sweep goes on."""

    def wrapper(cfg: DictConfig):
        _quiet_third_party()
        try:
            validate(cfg)
            return fn(cfg)
        except ConfigError as e:
            line = f"error: {e}"
            print(line, file=sys.stderr)
            if not _in_multirun():
                sys.exit(2)
            _record_failed_job(line)
            return None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _in_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failed_job(line: str) -> None:
    from mass_exp.utils.io import atomic_write_json

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    _FAILED_JOBS.append(str(out))
    atomic_write_json(out / FAILED_FILE, {"status": "failed", "error": line, "overrides": list(hc.overrides.task)})


FAILED_FILE = "failed.json"


@_guarded
def _evaluate(cfg: DictConfig) -> float:
    from mass_exp import resume
    from mass_exp.pipeline import format_table, run_evaluation
    from mass_exp.utils.io import atomic_write_json

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    h = resume.run_hash(cfg)
    store = cfg.paths.results_store
    if cfg.get("resume", True):
        done = resume.find_finished(store, output_dir, h, list(cfg.suite.tasks))
        if done is not None:
            log.info("run %s (%s) is already complete; not recomputed (resume=false redoes it)", h, cfg.run_name)
            if not (output_dir / "results.json").exists() and _is_rank_zero():
                atomic_write_json(output_dir / "results.json", done)
            print(format_table(done))
            return done["average"].get("normalized_acc", done["average"]["acc"])
    results = run_evaluation(cfg, output_dir, run_hash=h)
    if _is_rank_zero():
        resume.file_result(store, results)
    return results["average"].get("normalized_acc", results["average"]["acc"])


def _is_rank_zero() -> bool:
    from mass_exp.evaluation.sampling import is_rank_zero

    return is_rank_zero()


@_guarded
def _finetune(cfg: DictConfig) -> None:
    from mass_exp.assets import prepare_assets

    assets = prepare_assets(cfg)
    for task, path in zip(assets.tasks, assets.endpoint_files):
        print(f"{task.name:<16}{path}")


@_guarded
def _prefetch(cfg: DictConfig) -> None:
    """Download and verify every asset the run described by `cfg` needs, so it can later run offline."""
    from mass_exp.assets import prepare_assets

    import datasets

    datasets.enable_progress_bars()  # downloads are long: show them (the run commands keep datasets quiet)
    splits = tuple(cfg.get("prefetch_splits") or ("test", "validation"))
    assets = prepare_assets(cfg, download=True, splits=splits)  # runs the label guard on every split it opens
    print(f"prefetched {cfg.backbone.name} ({assets.weights_id}), {len(assets.tasks)} endpoints "
          f"({cfg.endpoints.source}) and the {'/'.join(splits)} splits of {', '.join(t.name for t in assets.tasks)}")
    print("the run can now go offline: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 mass-exp <the same overrides>")


_NUMERIC = re.compile(r"^\d+(\.\d+)?$")


def quote_numeric_group_choices(argv: list[str], groups: set[str]) -> list[str]:
    """Quote numeric config-group choices (`suite=8` -> `suite='8'`, sweeps too).

    Hydra parses `8` as an int and refuses it as a group choice; the suites are named after their task counts.
    """
    out = []
    for arg in argv:
        m = re.match(r"^([~+]{0,2})([\w/]+)=(.+)$", arg)
        if m and m.group(2) in groups:
            items = m.group(3).split(",")
            if all(_NUMERIC.match(i) for i in items):
                arg = f"{m.group(1)}{m.group(2)}=" + ",".join(f"'{i}'" for i in items)
        out.append(arg)
    return out


def _precheck(args: list[str], conf: str) -> None:
    """A single run's config is composed and validated before Hydra creates anything: a bad one exits with one line
    and status 2, having written nothing. A multirun's swept values are composed up front (types, keys, options);
    each job validates its ranges as it starts, and a bad job fails alone."""
    multirun = [a for a in args if a in ("-m", "--multirun")]
    rest = [a for a in args if a not in multirun]
    if any(a.startswith("-") for a in rest):  # --cfg, --help, -cn ...: Hydra handles them (jobs still validate)
        return
    if multirun:  # a value Hydra could not compose would abort the sweep when its job comes: refuse it now
        try:
            errors = sweep_composition_errors(rest, conf)
        except ConfigError as e:
            errors = [e]
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        if errors:
            sys.exit(2)
        return
    try:
        check_overrides(args, config_dir=conf)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _run(task) -> None:
    conf = _config_dir()
    groups = {p.name for p in Path(conf).iterdir() if p.is_dir()}
    args = quote_numeric_group_choices(sys.argv[1:], groups)
    sys.argv = [sys.argv[0]] + args
    _precheck(args, conf)
    hydra.main(config_path=conf, config_name="config", version_base="1.3")(task)()
    if _FAILED_JOBS:
        print(f"error: {len(_FAILED_JOBS)} job(s) of the sweep refused their config (see {FAILED_FILE} in "
              f"{', '.join(_FAILED_JOBS)})", file=sys.stderr)
        sys.exit(2)


def evaluate() -> None:
    """`mass-exp`: evaluate `method` (with `router`) on `suite`; writes results.json in the run directory."""
    _run(_evaluate)


def finetune() -> None:
    """`mass-exp-finetune`: build (or find in the cache) the fine-tuned endpoints the config names, and list them."""
    _run(_finetune)


def prefetch() -> None:
    """`mass-exp-prefetch`: same config as `mass-exp`; download + verify backbone, endpoints and datasets into the caches."""
    _run(_prefetch)


def task_table(cfg: DictConfig) -> dict[str, dict]:
    """Per task of the composed suite, what a run with `cfg` uses: `TaskSpec.describe` plus the reference accuracy
    (the head source's packaged number when endpoints.reference_acc=packaged, else None = measured by the run)."""
    from mass_exp.assets import head_source, packaged_reference, run_tasks

    tasks = run_tasks(cfg)
    ref = None
    if cfg.endpoints.get("reference_acc", "measured") == "packaged":
        ref = packaged_reference(head_source(cfg), str(cfg.backbone.name), tasks)
    out = {}
    for t in tasks:
        d = t.describe()
        d["reference_acc"] = None if ref is None else ref.get(t.name)
        out[t.name] = d
    return out


def _format_tasks(cfg: DictConfig, table: dict[str, dict]) -> str:
    from mass_exp.assets import run_tasks

    specs = {t.name: t for t in run_tasks(cfg)}
    lines = [f"suite {cfg.suite.name}, endpoints {cfg.endpoints.source}, backbone {cfg.backbone.name}"]
    for name, d in table.items():
        t = specs[name]
        ref = "measured by the run" if d["reference_acc"] is None else f"{100 * d['reference_acc']:.2f} (packaged)"
        names = "; ".join(str(c) for c in d["classnames"])
        if t.classnames_from_dataset:
            names = "[the dataset's ClassLabel names at run time; packaged copy:] " + names
        lm = d["label_map"]
        moved = None if lm is None else {k: v for k, v in lm.items() if int(k) != v}
        lines += [
            "",
            f"{name}",
            f"  dataset      {d['hf_dataset'] or '(none on the HF hub: give data.local_dirs.' + name + ')'}"
            + (f" [{d['hf_config']}]" if d["hf_config"] else "") + f", test split {d['test_split']!r}",
            f"  validation   {d['val_split']}",
            f"  head         {d['head_source']}, {d['num_classes']} rows, synonyms {t.synonyms}",
            f"  classnames   {names}",
            f"  templates    {' | '.join(d['templates'])}",
            f"  label map    {'identity' if lm is None else moved or 'identity'}",
            f"  preprocess   {', '.join(d['preprocess']) or 'backbone transform only'}",
            f"  reference    {ref}",
        ]
        if t.warning:
            lines.append(f"  WARNING      {t.warning}")
    return "\n".join(lines)


def tasks(argv: list[str] | None = None) -> None:
    """`mass-exp-tasks [--json] <mass-exp overrides>`: per task of the composed suite and endpoint source, the dataset,
    splits, head (class names, templates, label map), preprocessing and reference accuracy a run would use; reads
    no dataset and no weights, so it works offline."""
    import json

    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    if any(a in ("-h", "--help") for a in argv):
        print(tasks.__doc__)
        return
    conf = _config_dir()
    groups = {p.name for p in Path(conf).iterdir() if p.is_dir()}
    try:
        # the same composition and validation as every other entry point (one `error:` line, exit 2)
        cfg = check_overrides(quote_numeric_group_choices(argv, groups), config_dir=conf)
        table = task_table(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from mass_exp.assets import run_tasks

    for t in run_tasks(cfg):
        if t.warning:
            print(f"WARNING: task {t.name}: {t.warning}", file=sys.stderr)
    if as_json:
        print(json.dumps(table, indent=1, ensure_ascii=False))
    else:
        print(_format_tasks(cfg, table))


def report(argv: list[str] | None = None) -> None:
    """`mass-exp-report <dirs...>`: gather complete results.json files into paper-style tables (rows = methods,
    columns = backbone x suite, avg accuracy / normalized accuracy), with the published numbers whose protocol
    matches, per-task tables and plots."""
    import argparse

    parser = argparse.ArgumentParser(prog="mass-exp-report", description=report.__doc__)
    parser.add_argument("dirs", nargs="+", help="run or sweep directories (searched for results.json) or files")
    parser.add_argument("--out", metavar="DIR", help="write report.md, tables (.tex, .csv) and plots/*.png to DIR "
                                                     "instead of printing Markdown")
    parser.add_argument("--router-columns", action="store_true",
                        help="add router task-identification accuracy and mean |Omega| columns to the main table")
    parser.add_argument("--no-published", action="store_true", help="leave the published numbers out")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table to a W&B run in the runs' group (offline unless WANDB_MODE is set)")
    args = parser.parse_args(argv)

    from mass_exp.reporting.published import load_published
    from mass_exp.reporting.tables import (build_report, failed_markdown, find_failed, load_results,
                                          report_markdown)

    results = load_results(args.dirs)
    failed = find_failed(args.dirs)
    for job, err in failed:
        print(f"failed: {job}: {err}", file=sys.stderr)
    if not results:
        print(f"error: no complete results.json under {' '.join(args.dirs)}", file=sys.stderr)
        sys.exit(2)
    published = None if args.no_published else load_published()
    extra = ("router_task_id_acc", "router_mean_tasks") if args.router_columns else ()
    rep = build_report(results, published, extra)
    if args.out:
        from mass_exp.reporting.report import write_report

        written = write_report(rep, args.out, args.dirs, published)
        if failed:
            with open(Path(args.out) / "report.md", "a") as f:
                f.write("\n" + failed_markdown(failed))
        print(f"wrote {len(written)} files to {args.out} ({Path(args.out) / 'report.md'})")
    else:
        print(report_markdown(rep, args.dirs), end="")
        if failed:
            print("\n" + failed_markdown(failed), end="")
    if args.wandb:
        from mass_exp.reporting.report import log_to_wandb

        print(f"W&B run: {log_to_wandb(rep, args.out)}", file=sys.stderr)
