"""Gather results.json files into paper-style tables (rows = methods, columns = backbone x suite)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence


def load_results(dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every complete results.json under `dirs` (incomplete or unreadable files are skipped with a warning)."""
    out = []
    for d in dirs:
        d = Path(d)
        files = [d] if d.is_file() else sorted(d.rglob("results.json"))
        for f in files:
            try:
                res = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                print(f"warning: skipping unreadable {f}: {e}")
                continue
            if res.get("status") != "complete":
                print(f"warning: skipping incomplete {f}")
                continue
            res["_path"] = str(f)
            out.append(res)
    return out


def row_label(res: dict[str, Any]) -> str:
    router = res["router"]["name"] if isinstance(res["router"], dict) else res["router"]
    if router == "none":
        chosen = []
        if res.get("lambda_selection"):
            chosen.append("lambda_t")
        if res.get("alpha_protocol") == "validation":
            chosen.append("alpha")
        return res["method"] + (f" ({' and '.join(chosen)} by validation)" if chosen else "")
    knobs = (res.get("config") or {}).get("router") or {}
    extras = []
    if knobs.get("mode", "topk") != "topk" and not knobs.get("batched"):
        extras.append(knobs["mode"])
    if knobs.get("oracle_head"):
        extras.append("oracle head")
    if knobs.get("first_pass", "merged") != "merged":
        extras.append(f"first pass {knobs['first_pass']}")
    return f"MASS ({', '.join([router] + extras)}) over {res['method']}"


def markdown_table(results: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    """One row per (method, router), one column group per backbone/suite: avg acc and normalized acc (percent)."""
    cols = sorted({(r["backbone"], r["suite"]) for r in results})
    rows: dict[str, dict] = {}
    for r in results:
        rows.setdefault(row_label(r), {})[(r["backbone"], r["suite"])] = r  # later files win
    header = "| method | " + " | ".join(f"{b} / {s}: acc / norm" for b, s in cols)
    for key in extra:
        header += f" | {key}"
    lines = [header + " |", "|---" * (1 + len(cols) + len(extra)) + "|"]

    def pct(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    for label, by_col in rows.items():
        cells = []
        for c in cols:
            r = by_col.get(c)
            cells.append("–" if r is None else f"{pct(r['average'].get('acc'))} / {pct(r['average'].get('normalized_acc'))}")
        for key in extra:
            vals = [r["average"].get(key) for r in by_col.values()]
            v = vals[0] if vals else None
            cells.append(("–" if v is None else f"{v:.2f}") if key == "router_mean_tasks" else pct(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
