"""Report rows of SMILE, the sample-based routers and task-agnostic static runs."""

from __future__ import annotations

from mass_exp.reporting.published import load_published
from mass_exp.reporting.tables import build_report, main_table_markdown, row_kind, row_label


def _md_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_static_rows_show_task_known_and_task_agnostic(make_result):
    runs = [make_result("tsv_m", "tiny", "mini", 0.48),
            make_result("tsv_m_task_agnostic", "tiny", "mini", 0.40, paper_rule=0.44)]
    assert row_label(runs[1]) == "tsv_m (task-agnostic)" and row_kind(runs[1]) is None
    rows = _md_rows(main_table_markdown(build_report(runs)))
    assert rows["tsv_m"] == ["48.0 / 60.0"]
    assert rows["tsv_m (task-agnostic)"] == ["40.0 / 50.0"]
    assert rows["tsv_m (task-agnostic), paper scoring rule"] == ["44.0 / 55.0"]


def test_smile_and_router_ablation_rows_next_to_published_numbers(make_result):
    pub = load_published()
    runs = [make_result("smile", "ViT-B-32", "8", 0.80, endpoints="retrained"),
            make_result("smile_task_agnostic", "ViT-B-32", "8", 0.70, endpoints="retrained"),
            make_result("mass_nearest_neighbour", "ViT-L-14", "20", 0.85, paper_rule=0.9, endpoints="retrained"),
            make_result("mass_mlp", "ViT-L-14", "20", 0.85, paper_rule=0.9, endpoints="retrained")]
    rows = _md_rows(main_table_markdown(build_report(runs, pub)))
    assert rows["smile — published [M]"][0] == "84.4 / –"
    assert not any(k.startswith("smile (task-agnostic)") and "published" in k for k in rows)
    assert rows["MASS (nearest_neighbour, top1) over tsv_m, paper scoring rule — published [M]"][-1] == "– / 92.0"
    assert rows["MASS (mlp) over tsv_m, paper scoring rule — published [M]"][-1] == "– / 98.3"
