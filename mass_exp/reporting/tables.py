"""Gather results.json files into paper-style tables (rows = methods, columns = backbone x suite).

`load_results` is the only function here that reads files. Everything else is pure: results (dicts) in, a `Report`
(rows, cells, per-task tables, notes) out, and renderers from a `Report` to Markdown, LaTeX and CSV text.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from mass_exp.reporting.published import SOURCES, canonical_endpoints, find_published

BACKBONE_ORDER = ("tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14")
SUITE_ORDER = ("mini", "8", "14", "20")
METHOD_ORDER = ("zeroshot", "finetuned", "weight_average", "task_arithmetic", "ties", "consensus", "tsv_c", "tsv_m",
                "iso_c", "iso_cts", "smile")
ROUTER_ORDER = ("projection", "batched_projection", "oracle", "nearest_neighbour", "mlp")
TASK_AGNOSTIC = "task-agnostic"
#: The projection router's defaults (conf/router/projection.yaml); a row label names every knob that differs.
ROUTER_DEFAULTS: dict[str, Any] = {"mode": "topk", "oracle_head": False, "first_pass": "merged", "threshold": 0.2,
                                   "max_tasks": 3, "head_selection": "max", "redundancy_eps": None, "token": "cls",
                                   "norm": "l2", "temperature": 1.0}
PAPER_RULE = "paper scoring rule"
REQUIRED_KEYS = ("method", "router", "backbone", "suite", "tasks", "average")
DASH = "–"

Col = tuple[str, str]  # (backbone, suite)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------- loading

def check_result(res: Any) -> str | None:
    """Why `res` is not a usable complete result (None if it is)."""
    if not isinstance(res, dict):
        return "not a JSON object"
    if res.get("status") != "complete":
        return f"status is {res.get('status')!r}, not 'complete'"
    missing = [k for k in REQUIRED_KEYS if k not in res]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(res["tasks"], dict) or not res["tasks"] or "acc" not in res["average"]:
        return "no per-task or average accuracy"
    return None


def load_results(dirs: Iterable[str | Path], warn: Callable[[str], None] = _warn) -> list[dict[str, Any]]:
    """Every complete results.json under `dirs` (a file or a directory searched recursively).

    Unreadable (e.g. half-written), incomplete or malformed files are skipped with a warning on stderr. Each result
    gets `_path` and `_mtime` (used to pick the newest of duplicates)."""
    out = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            warn(f"{d} does not exist")
            continue
        files = [d] if d.is_file() else sorted(d.rglob("results.json"))
        for f in files:
            try:
                res = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                warn(f"skipping unreadable {f}: {e}")
                continue
            reason = check_result(res)
            if reason is not None:
                warn(f"skipping incomplete {f}: {reason}")
                continue
            res["_path"] = str(f)
            res["_mtime"] = f.stat().st_mtime
            out.append(res)
    return out


def find_failed(dirs: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(job directory, its one-line error) of every job under `dirs` that refused its config (`failed.json`, written
    by a multirun job whose configuration was invalid) and has no complete result beside it."""
    out = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for f in sorted(d.rglob("failed.json")):
            if (f.parent / "results.json").exists():
                continue
            try:
                err = json.loads(f.read_text()).get("error", "")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                err = "(unreadable failed.json)"
            out.append((str(f.parent), str(err)))
    return out


def failed_markdown(failed: Sequence[tuple[str, str]]) -> str:
    lines = ["## Failed jobs", "", "| job | error |", "|---|---|"]
    lines += [f"| {d} | {e.replace('|', '/')} |" for d, e in failed]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ row identity

def _router_name(res: Mapping[str, Any]) -> str:
    r = res["router"]
    return r["name"] if isinstance(r, dict) else str(r)


def _config(res: Mapping[str, Any]) -> Mapping[str, Any]:
    return res.get("config") or {}


def endpoints_source(res: Mapping[str, Any]) -> str | None:
    src = ((_config(res).get("endpoints") or {}).get("source"))
    if src is None:  # older results: "measured (mini endpoints, test split)"
        m = re.search(r"\((\S+) endpoints", str(res.get("finetuned_acc_source", "")))
        src = m.group(1) if m else None
    return canonical_endpoints(src)


def _fmt_num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def router_extras(res: Mapping[str, Any]) -> list[str]:
    """The router knobs of a routed run that differ from the paper's defaults, as short words."""
    knobs = _config(res).get("router") or {}
    extras = []
    if knobs.get("mode", "topk") != "topk" and not knobs.get("batched"):
        extras.append(str(knobs["mode"]))
    if knobs.get("oracle_head"):
        extras.append("oracle head")
    if knobs.get("first_pass", "merged") != "merged":
        extras.append(f"first pass {knobs['first_pass']}")
    names = {"threshold": "eta {}", "max_tasks": "max {} tasks", "head_selection": "head {}",
             "redundancy_eps": "eps {}", "token": "token {}", "norm": "{}", "temperature": "T {}"}
    for key, fmt in names.items():
        if key in knobs and knobs[key] != ROUTER_DEFAULTS[key]:
            extras.append(fmt.format(_fmt_num(knobs[key])))
    default_block = (_config(res).get("backbone") or {}).get("routing_block")
    if "block" in knobs and default_block is not None and knobs["block"] != default_block:
        extras.append(f"block {knobs['block']}")
    if knobs.get("batched") and res.get("eval_batch_size") is not None:
        extras.append(f"batch {res['eval_batch_size']}")
    if res.get("alpha_protocol") == "validation":
        extras.append("alpha by validation")
    elif res.get("alpha") is not None and float(res["alpha"]) != 1.0:
        extras.append(f"alpha {_fmt_num(float(res['alpha']))}")
    return extras


def row_label(res: Mapping[str, Any]) -> str:
    """The table row of a run: the method (with what validation chose), or `MASS (router, knobs) over method`."""
    router = _router_name(res)
    if router == "none":
        chosen = []
        if res.get("lambda_selection"):
            chosen.append("lambda_t")
        if res.get("alpha_protocol") == "validation":
            chosen.append("alpha")
        label = res["method"] + (f" ({' and '.join(chosen)} by validation)" if chosen else "")
        return label + (f" ({TASK_AGNOSTIC})" if task_agnostic(res) else "")
    return f"MASS ({', '.join([router] + router_extras(res))}) over {res['method']}"


def task_agnostic(res: Mapping[str, Any]) -> bool:
    """A static run scored without the task (`eval.task_known=false`)."""
    return _router_name(res) == "none" and res.get("task_known") is False


def row_kind(res: Mapping[str, Any]) -> str | None:
    """What a run is in the published tables' terms: a merger name, `mass`, `mass_first_pass_zeroshot`,
    `mass_nearest_neighbour`, `mass_mlp`, or None."""
    router = _router_name(res)
    if router == "none":
        return None if task_agnostic(res) else str(res["method"])
    if res["method"] != "tsv_m":
        return None
    if router == "nearest_neighbour":
        return "mass_nearest_neighbour" if router_extras(res) == ["top1"] else None
    if router == "mlp":
        return "mass_mlp" if not router_extras(res) else None
    if router != "projection":
        return None
    extras = router_extras(res)
    if not extras:
        return "mass"
    if extras == ["first pass zeroshot"]:
        return "mass_first_pass_zeroshot"
    return None


def run_protocol(res: Mapping[str, Any]) -> dict[str, Any]:
    """The facts a published number's protocol is checked against."""
    return {
        "backbone": str(res["backbone"]), "suite": str(res["suite"]), "endpoints": endpoints_source(res),
        "reference_acc": (_config(res).get("endpoints") or {}).get("reference_acc"),
        "alpha": None if res.get("alpha") is None else float(res["alpha"]),
        "alpha_protocol": res.get("alpha_protocol"),
        "lambda_protocol": "validation" if res.get("lambda_selection") else
        ((_config(res).get("method") or {}).get("lambda_protocol")),
    }


def _order(values: Iterable[str], canonical: Sequence[str]) -> list[str]:
    def key(v: str):
        if v in canonical:
            return (0, canonical.index(v), "")
        return (1, int(v), "") if v.isdigit() else (2, 0, v)

    return sorted(set(values), key=key)


def _row_sort_key(label: str, method: str, router: str) -> tuple:
    m = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    if router == "none":
        return (0, m, label != method, label)
    r = ROUTER_ORDER.index(router) if router in ROUTER_ORDER else len(ROUTER_ORDER)
    base = label.split(f", {PAPER_RULE}")[0]
    return (1, m, r, base.count(","), base, label != base)


# ------------------------------------------------------------------------------------------------------ the report

@dataclass
class Entry:
    """One run as one table row's cell (a routed run gives two: strict scoring and the paper's rule)."""

    label: str
    kind: str | None
    backbone: str
    suite: str
    scoring: str  # strict | paper_rule
    acc: float | None
    norm: float | None
    tasks: dict[str, float | None]  # task -> normalized accuracy
    result: dict[str, Any]

    @property
    def col(self) -> Col:
        return (self.backbone, self.suite)


@dataclass
class Cell:
    acc: float | None  # percent
    norm: float | None  # percent
    mark: str = ""  # e.g. "?" for a doubtful published number


@dataclass
class Row:
    label: str
    source: str  # "ours" or a published source key
    cells: dict[Col, Cell]
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class PerTaskTable:
    col: Col
    tasks: list[str]
    rows: list[tuple[str, dict[str, float | None], float | None]]  # label, task -> norm %, average norm %


@dataclass
class Report:
    cols: list[Col]
    rows: list[Row]
    per_task: list[PerTaskTable]
    router_rows: list[Row]  # cells: acc = task-id %, norm = survival %, extra mean |Omega| per col
    entries: list[Entry]
    notes: list[str]
    legend: list[str]
    n_runs: int
    extra_columns: tuple[str, ...] = ()
    n_duplicates: int = 0


def _pct(v: Any) -> float | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return 100.0 * float(v)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_IGNORED_CONFIG = ("paths.", "logger.", "run_name", "trainer.enable_progress_bar")


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted config keys (outside paths / logger / run name) whose values differ between two results."""
    fa, fb = _flatten(_config(a)), _flatten(_config(b))
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and not k.startswith(_IGNORED_CONFIG))
    return keys


def dedupe(results: Sequence[dict[str, Any]], label_of: Callable[[dict], str]) -> tuple[list[dict], list[str]]:
    """One result per (row, backbone, suite): the newest file (mtime, then path) wins; a note names the others."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((label_of(r), str(r["backbone"]), str(r["suite"])), []).append(r)
    kept, notes = [], []
    for (label, b, s), rs in groups.items():
        rs = sorted(rs, key=lambda r: (r.get("_mtime", 0.0), r.get("_path", "")))
        winner = rs[-1]
        kept.append(winner)
        for loser in rs[:-1]:
            diff = config_differences(winner, loser)
            what = f"configs differ in {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}" if diff else "same config"
            notes.append(f"duplicate run of `{label}` on {b} / {s}: kept the newest {winner.get('_path', '?')}, "
                         f"ignored {loser.get('_path', '?')} ({what})")
    return kept, notes


def _entries(res: dict[str, Any], label: str) -> list[Entry]:
    avg = res["average"]
    b, s = str(res["backbone"]), str(res["suite"])
    tasks = {t: e.get("normalized_acc") for t, e in res["tasks"].items()}
    out = [Entry(label, row_kind(res), b, s, "strict", avg.get("acc"), avg.get("normalized_acc"), tasks, res)]
    if (_router_name(res) != "none" or task_agnostic(res)) and "acc_paper_rule" in avg:
        rule_tasks = {t: (e["acc_paper_rule"] / e["finetuned_acc"] if e.get("acc_paper_rule") is not None
                          and e.get("finetuned_acc") else None) for t, e in res["tasks"].items()}
        out.append(Entry(f"{label}, {PAPER_RULE}", row_kind(res), b, s, "paper_rule", avg.get("acc_paper_rule"),
                         avg.get("normalized_acc_paper_rule"), rule_tasks, res))
    return out


def build_report(results: Sequence[dict[str, Any]], published: Mapping[str, Any] | None = None,
                 extra_columns: Sequence[str] = ()) -> Report:
    """The whole report from complete results (pure). `published`: paper_results.json's content (None = none)."""
    # a row whose runs in one column come from different endpoint sources is split by source
    sources: dict[tuple, set] = {}
    for r in results:
        sources.setdefault((row_label(r), str(r["backbone"]), str(r["suite"])), set()).add(endpoints_source(r))
    split = {label for (label, _, _), srcs in sources.items() if len(srcs) > 1}

    def label_of(r: dict) -> str:
        label = row_label(r)
        return f"{label} [{endpoints_source(r)} endpoints]" if label in split else label

    kept, notes = dedupe(results, label_of)
    entries = [e for r in kept for e in _entries(r, label_of(r))]
    cols = [(b, s) for b in _order({e.backbone for e in entries}, BACKBONE_ORDER)
            for s in _order({e.suite for e in entries}, SUITE_ORDER)]
    cols = [c for c in cols if any(e.col == c for e in entries)]
    by_label: dict[str, list[Entry]] = {}
    for e in entries:
        by_label.setdefault(e.label, []).append(e)
    labels = sorted(by_label, key=lambda lb: _row_sort_key(lb, by_label[lb][0].result["method"],
                                                            _router_name(by_label[lb][0].result)))
    rows: list[Row] = []
    used_sources: set[str] = set()
    for label in labels:
        es = by_label[label]
        row = Row(label, "ours", {e.col: Cell(_pct(e.acc), _pct(e.norm)) for e in es})
        for key in extra_columns:
            vals = [(e.col, e.result["average"].get(key)) for e in sorted(es, key=lambda e: cols.index(e.col))
                    if e.scoring == "strict"]
            row.extra[key] = " / ".join(
                (f"{v:.2f}" if key == "router_mean_tasks" else f"{100 * v:.1f}") for _, v in vals if v is not None) or DASH
        rows.append(row)
        if published is None:
            continue
        paper_rows: dict[str, Row] = {}
        for e in es:
            proto = {**run_protocol(e.result), "scoring": e.scoring}
            for src, a, n, suspect in find_published(published, e.kind, proto):
                pr = paper_rows.setdefault(src.key, Row(f"{label} — published [{src.tag}]", src.key, {}))
                pr.cells[e.col] = Cell(a, n, "?" if suspect else "")
                used_sources.add(src.key)
        rows.extend(paper_rows.values())

    legend = [f"[{s.tag}] `{s.key}`: {s.description}" for s in SOURCES if s.key in used_sources]
    if published is not None and not used_sources:
        legend.append("No published number is shown: none of these runs matches the endpoints and protocol of a "
                      "published table (the mini suite has none; real suites need endpoints=retrained or tall_masks).")
    if any(c.mark == "?" for r in rows for c in r.cells.values()):
        legend.append("? = flagged in paper_results.json as a likely transcription error.")
    if any(e.scoring == "paper_rule" for e in entries):
        legend.append(f"MASS rows score a routed prediction strictly (a wrong task's head is wrong); `{PAPER_RULE}` "
                      "rows use the official code's rule, the one the published MASS numbers used.")

    per_task = []
    for c in cols:
        es = [e for label in labels for e in by_label[label] if e.col == c]
        tasks: list[str] = []
        for e in es:
            tasks += [t for t in e.tasks if t not in tasks]
        per_task.append(PerTaskTable(c, tasks, [(e.label, {t: _pct(v) for t, v in e.tasks.items()}, _pct(e.norm))
                                                for e in es]))

    router_rows = []
    for label in labels:
        es = [e for e in by_label[label] if e.scoring == "strict" and _router_name(e.result) != "none"]
        if not es:
            continue
        cells, extra = {}, {}
        for e in es:
            avg = e.result["average"]
            cells[e.col] = Cell(_pct(avg.get("router_task_id_acc")), _pct(avg.get("router_survival")))
            extra[f"{e.backbone}/{e.suite}"] = (f"{avg['router_mean_tasks']:.2f}"
                                                if avg.get("router_mean_tasks") is not None else DASH)
        router_rows.append(Row(label, "ours", cells, extra))
    return Report(cols, rows, per_task, router_rows, entries, notes, legend, len(kept), tuple(extra_columns),
                  len(results) - len(kept))


# --------------------------------------------------------------------------------------------------------- renderers

def _num(v: float | None, digits: int = 1) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def _cell_text(c: Cell | None) -> str:
    if c is None:
        return DASH
    return f"{_num(c.acc)}{c.mark} / {_num(c.norm)}"


def _col_name(c: Col) -> str:
    return f"{c[0]} / {c[1]}"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return lines


def main_table_markdown(report: Report) -> str:
    header = ["method"] + [f"{_col_name(c)}: acc / norm" for c in report.cols] + list(report.extra_columns)
    body = [[r.label] + [_cell_text(r.cells.get(c)) for c in report.cols] + [r.extra.get(k, DASH)
                                                                            for k in report.extra_columns]
            for r in report.rows]
    return "\n".join(_md_table(header, body))


def per_task_markdown(t: PerTaskTable) -> str:
    header = ["method"] + t.tasks + ["avg"]
    body = [[label] + [_num(v.get(task)) for task in t.tasks] + [_num(avg)] for label, v, avg in t.rows]
    return "\n".join(_md_table(header, body))


def router_markdown(report: Report) -> str:
    header = ["router"] + [f"{_col_name(c)}: task id / survival / mean Ω" for c in report.cols]
    body = []
    for r in report.router_rows:
        cells = []
        for c in report.cols:
            cell = r.cells.get(c)
            cells.append(DASH if cell is None else
                         f"{_num(cell.acc)} / {_num(cell.norm)} / {r.extra.get(f'{c[0]}/{c[1]}', DASH)}")
        body.append([r.label] + cells)
    return "\n".join(_md_table(header, body))


def report_markdown(report: Report, sources: Sequence[str] = (), plots: Sequence[str] = ()) -> str:
    """The full Markdown report: main table, legend, router diagnostics, per-task tables, plots, notes."""
    out = ["# mass-exp report", ""]
    where = f" from {', '.join(f'`{s}`' for s in sources)}" if sources else ""
    dup = f" ({report.n_duplicates} duplicate runs ignored, see Notes)" if report.n_duplicates else ""
    out += [f"{report.n_runs} runs{where}{dup}.", ""]
    out += ["## Average accuracy / normalized accuracy (%)", "", main_table_markdown(report), ""]
    out += [f"- {line}" for line in report.legend] + ([""] if report.legend else [])
    if report.router_rows:
        out += ["## Router diagnostics (task identification % / survival of the true task in Ω % / mean |Ω|)", "",
                router_markdown(report), ""]
    out += ["## Per-task normalized accuracy (%)", ""]
    for t in report.per_task:
        out += [f"### {_col_name(t.col)}", "", per_task_markdown(t), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    if report.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(out).rstrip() + "\n"


def markdown_table(results: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """One row per (method, router), one column per backbone / suite: avg acc / normalized acc (percent)."""
    return main_table_markdown(build_report(results, None, extra))


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "Ω": r"$\Omega$", "—": "---", "–": "--"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in s)


def main_table_latex(report: Report) -> str:
    """A booktabs table: backbones as column groups, suites below, "acc / norm" cells, published rows in italics."""
    backbones = [b for b in dict.fromkeys(c[0] for c in report.cols)]
    lines = [r"% requires \usepackage{booktabs}", r"\begin{tabular}{l" + "c" * len(report.cols) + "}", r"\toprule"]
    lines.append("method & " + " & ".join(
        rf"\multicolumn{{{sum(c[0] == b for c in report.cols)}}}{{c}}{{{latex_escape(b)}}}" for b in backbones) + r" \\")
    start, rules = 2, []
    for b in backbones:
        n = sum(c[0] == b for c in report.cols)
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append("".join(rules))
    lines.append(" & " + " & ".join(latex_escape(f"{c[1]} tasks" if c[1].isdigit() else c[1])
                                    for c in report.cols) + r" \\")
    lines.append(r"\midrule")
    for r in report.rows:
        cells = [latex_escape(_cell_text(r.cells.get(c))).replace(" / ", r"\,/\,") for c in report.cols]
        label = latex_escape(r.label)
        if r.source != "ours":
            label, cells = rf"\textit{{{label}}}", [rf"\textit{{{x}}}" for x in cells]
        lines.append(" & ".join([label] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def per_task_latex(t: PerTaskTable) -> str:
    lines = [r"\begin{tabular}{l" + "c" * (len(t.tasks) + 1) + "}", r"\toprule",
             " & ".join(["method"] + [latex_escape(x) for x in t.tasks] + ["avg"]) + r" \\", r"\midrule"]
    for label, v, avg in t.rows:
        lines.append(" & ".join([latex_escape(label)] + [latex_escape(_num(v.get(x))) for x in t.tasks]
                                + [latex_escape(_num(avg))]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def _csv(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for v in r])
    return buf.getvalue()


def main_table_csv(report: Report) -> str:
    """Wide CSV: one line per row (ours and published), `<backbone>/<suite> acc` and `... norm` columns (percent)."""
    header = ["method", "source"] + [f"{b}/{s} {k}" for b, s in report.cols for k in ("acc", "norm")]
    body = []
    for r in report.rows:
        vals: list[Any] = [r.label, r.source]
        for c in report.cols:
            cell = r.cells.get(c)
            vals += [None, None] if cell is None else [cell.acc, cell.norm]
        body.append(vals)
    return _csv([header] + body)


def runs_csv(report: Report, published: Mapping[str, Any] | None = None) -> str:
    """Long CSV: one line per (row, backbone, suite) of our runs, with the matching published numbers."""
    header = ["method", "scoring", "backbone", "suite", "endpoints", "alpha", "alpha_protocol", "acc", "normalized_acc",
              "published_source", "published_acc", "published_normalized_acc", "router_task_id_acc",
              "router_mean_tasks", "path"]
    body = []
    for e in report.entries:
        res = e.result
        proto = {**run_protocol(res), "scoring": e.scoring}
        pubs = find_published(published, e.kind, proto) if published is not None else []
        src, pa, pn = (pubs[0][0].key, pubs[0][1], pubs[0][2]) if pubs else (None, None, None)
        avg = res["average"]
        body.append([e.label, e.scoring, e.backbone, e.suite, proto["endpoints"], res.get("alpha"),
                     res.get("alpha_protocol"), _pct(e.acc), _pct(e.norm), src, pa, pn,
                     _pct(avg.get("router_task_id_acc")), avg.get("router_mean_tasks"), res.get("_path")])
    return _csv([header] + body)


def per_task_csv(t: PerTaskTable) -> str:
    return _csv([["method"] + t.tasks + ["avg"]] + [[label] + [v.get(x) for x in t.tasks] + [avg]
                                                     for label, v, avg in t.rows])
