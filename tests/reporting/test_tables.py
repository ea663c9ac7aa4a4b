"""Report tables from results.json files."""

from __future__ import annotations

import json

from mass_exp.reporting.tables import load_results, markdown_table


def _res(method, router, acc, norm, status="complete"):
    return {"status": status, "method": method, "router": {"name": router}, "backbone": "tiny", "suite": "mini",
            "average": {"acc": acc, "normalized_acc": norm}}


def test_markdown_table_rows_and_skips_incomplete(tmp_path):
    for i, r in enumerate([_res("tsv_m", "none", 0.5, 0.6), _res("tsv_m", "projection", 0.8, 0.9),
                           _res("ties", "none", 0.1, 0.2, status="running")]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "results.json").write_text("{half-written")
    results = load_results([tmp_path])
    assert len(results) == 2
    table = markdown_table(results).splitlines()
    assert table[0] == "| method | tiny / mini: acc / norm |"
    assert "| tsv_m | 50.0 / 60.0 |" in table
    assert "| MASS (projection) over tsv_m | 80.0 / 90.0 |" in table
