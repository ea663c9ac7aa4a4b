"""Report tables from results.json files (synthetic, schema-true results from conftest.py), checked value by value."""

from __future__ import annotations

import csv
import io

import pytest

from mass_exp.reporting.published import load_published
from mass_exp.reporting.tables import (build_report, load_results, main_table_csv, main_table_latex,
                                       main_table_markdown, markdown_table, per_task_markdown, report_markdown,
                                       row_label, runs_csv)


@pytest.fixture(scope="module")
def report(sweep):
    return build_report(load_results([sweep], warn=lambda m: None), load_published())


def _md_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_load_results_skips_incomplete_and_half_written(sweep, capsys):
    results = load_results([sweep])
    err = capsys.readouterr().err
    assert len(results) == 11  # 9 + 2 duplicates; not the running one nor the half-written one
    assert "skipping incomplete" in err and "bad/running" in err and "'running'" in err
    assert "skipping unreadable" in err and "bad/half" in err
    assert all(r["status"] == "complete" for r in results)


def test_main_table_rows_columns_and_values(report):
    md = main_table_markdown(report)
    lines = md.splitlines()
    assert lines[0] == ("| method | tiny / mini: acc / norm | ViT-B-32 / 8: acc / norm | ViT-L-14 / 14: acc / norm |")
    rows = _md_rows(md)
    assert rows["zeroshot"] == ["40.0 / 50.0", "–", "–"]  # the newer zeroshot run won over the old 10.0
    assert rows["tsv_m"] == ["48.0 / 60.0", "70.0 / 87.5", "–"]
    assert rows["tsv_m (alpha by validation)"] == ["–", "–", "84.0 / 105.0"]
    assert rows["task_arithmetic"] == ["–", "60.0 / 75.0", "76.0 / 95.0"]
    assert rows["ties"] == ["–", "64.0 / 80.0", "–"]  # the later duplicate
    assert rows["MASS (projection) over tsv_m"] == ["56.0 / 70.0", "72.0 / 90.0", "–"]
    assert rows["MASS (projection) over tsv_m, paper scoring rule"] == ["60.0 / 75.0", "76.0 / 95.0", "–"]
    assert "iso_c" not in rows  # only in the incomplete and half-written files
    labels = [r.label for r in report.rows]
    # paper order: static mergers, then MASS; each published row right after the row it compares with
    assert labels.index("zeroshot") < labels.index("task_arithmetic") < labels.index("ties") < labels.index("tsv_m") \
        < labels.index("MASS (projection) over tsv_m")


def test_published_numbers_only_where_the_protocol_matches(report):
    rows = _md_rows(main_table_markdown(report))
    labels = [r.label for r in report.rows]
    # retrained endpoints on ViT-B-32/8: the MASS paper's numbers, absolute only for the baselines
    assert rows["tsv_m — published [M]"] == ["–", "83.2 / –", "–"]
    assert rows["task_arithmetic — published [M]"] == ["–", "68.8 / –", "–"]
    assert labels.index("tsv_m — published [M]") == labels.index("tsv_m") + 1
    # MASS: beside the paper-rule row only (the published numbers were scored that way), with normalized accuracy
    assert rows["MASS (projection) over tsv_m, paper scoring rule — published [M]"] == ["–", "87.0 / 96.5", "–"]
    assert "MASS (projection) over tsv_m — published [M]" not in rows
    # TALL-masks endpoints, ViT-L-14/14: the TSV paper's tsv_m (alpha by validation) matches, the fixed-alpha task
    # arithmetic does not (the TSV paper chose alpha on validation)
    assert rows["tsv_m (alpha by validation) — published [T]"] == ["–", "–", "89.2 / –"]
    assert not any(k.startswith("task_arithmetic — published [T]") for k in rows)
    # published ties / zeroshot numbers do not exist for these sources / endpoints; the mini suite has none
    assert not any(k.startswith(("ties —", "zeroshot —")) for k in rows)
    assert all(r.cells.get(("tiny", "mini")) is None for r in report.rows if r.source != "ours")
    legend = "\n".join(report.legend)
    assert "[M] `mass_iclr2026`" in legend and "retrained" in legend
    assert "[T] `tsv_cvpr2025`" in legend and "TALL-masks" in legend


def test_mini_only_report_has_no_published_numbers(sweep):
    rep = build_report(load_results([sweep / "mini"], warn=lambda m: None), load_published())
    assert all(r.source == "ours" for r in rep.rows)
    assert any("No published number is shown" in line for line in rep.legend)


def test_duplicates_latest_wins_with_a_note(report):
    notes = [n for n in report.notes if n.startswith("duplicate")]
    assert len(notes) == 2
    ties = next(n for n in notes if "`ties`" in n)
    assert "b32-again/3/results.json" in ties.split("ignored")[0] and "b32/3/results.json" in ties.split("ignored")[1]
    zs = next(n for n in notes if "`zeroshot`" in n)
    assert "zz-old/0" in zs.split("ignored")[1] and "(same config)" in zs


def test_per_task_table(report):
    by_col = {t.col: t for t in report.per_task}
    assert list(by_col) == [("tiny", "mini"), ("ViT-B-32", "8"), ("ViT-L-14", "14")]
    t = by_col[("ViT-B-32", "8")]
    assert t.tasks == ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN"]
    rows = _md_rows(per_task_markdown(t))
    assert rows["method"] == t.tasks + ["avg"]
    # tsv_m: 0.68 / 0.8 = 85.0 on even tasks, 0.72 / 0.8 = 90.0 on odd ones
    assert rows["tsv_m"] == ["85.0", "90.0"] * 4 + ["87.5"]
    assert rows["MASS (projection) over tsv_m, paper scoring rule"] == ["92.5", "97.5"] * 4 + ["95.0"]
    assert "zeroshot" not in rows  # no zeroshot run on this column
    assert len(by_col[("ViT-L-14", "14")].tasks) == 14


def test_router_rows_and_labels(report):
    labels = [r.label for r in report.router_rows]
    assert labels == ["MASS (projection) over tsv_m"]
    cell = report.router_rows[0].cells[("ViT-B-32", "8")]
    assert (round(cell.acc, 1), round(cell.norm, 1)) == (90.0, 99.0)


@pytest.mark.parametrize("variant,extra,label", [
    ("mass", (), "MASS (projection) over tsv_m"),
    ("mass_top1", (), "MASS (projection, top1) over tsv_m"),
    ("mass_oracle_head", ("router.mode=top1",), "MASS (projection, top1, oracle head) over tsv_m"),
    ("mass_eta_0p1", (), "MASS (projection, eta 0.1) over tsv_m"),
    ("mass_head_avg", (), "MASS (projection, head avg) over tsv_m"),
    ("mass_first_pass_zeroshot", (), "MASS (projection, first pass zeroshot) over tsv_m"),
    ("mass_redundancy_eps", (), "MASS (projection, eps 0.3) over tsv_m"),
    ("mass_oracle_routing", (), "MASS (oracle) over tsv_m"),
    ("mass_batched", ("eval.batch_size=32",), "MASS (batched_projection, batch 32) over tsv_m"),
    ("mass", ("router.block=3",), "MASS (projection, block 3) over tsv_m"),
    ("task_arithmetic", ("method.alpha_protocol=validation",), "task_arithmetic (alpha by validation)"),
])
def test_row_labels_name_every_changed_knob(variant, extra, label, make_result):
    assert row_label(make_result(variant, "tiny", "mini", 0.5, extra=extra)) == label


def test_router_ablation_published_only_for_first_pass_zeroshot_on_vit_l14(make_result):
    pub = load_published()
    runs = [make_result(v, "ViT-L-14", "20", 0.85, paper_rule=0.9, endpoints="retrained")
            for v in ("mass_first_pass_zeroshot", "mass_eta_0p1")]
    runs.append(make_result("mass_first_pass_zeroshot", "ViT-B-32", "20", 0.85, paper_rule=0.9,
                            endpoints="retrained"))
    rows = _md_rows(main_table_markdown(build_report(runs, pub)))
    assert rows["MASS (projection, first pass zeroshot) over tsv_m, paper scoring rule — published [M]"] == \
        ["–", "– / 91.9"]  # ViT-B-32 has no published ablation; ViT-L-14/20 = 91.9 normalized
    assert not any("eta 0.1" in k and "published" in k for k in rows)


def test_suspect_published_number_is_flagged(make_result):
    run = make_result("mass", "ViT-B-16", "20", 0.8, paper_rule=0.8, endpoints="retrained")
    rep = build_report([run], load_published())
    rows = _md_rows(main_table_markdown(rep))
    assert rows["MASS (projection) over tsv_m, paper scoring rule — published [M]"] == ["81.1? / –"]
    assert any(line.startswith("? =") for line in rep.legend)


def test_same_row_from_two_endpoint_sources_is_split(make_result):
    runs = [make_result("tsv_m", "ViT-B-32", "8", 0.7, endpoints="retrained"),
            make_result("tsv_m", "ViT-B-32", "8", 0.8, endpoints="tall_masks")]
    rows = _md_rows(main_table_markdown(build_report(runs, load_published())))
    assert rows["tsv_m [retrained endpoints]"] == ["70.0 / 87.5"]
    assert rows["tsv_m [tall_masks endpoints]"] == ["80.0 / 100.0"]
    assert rows["tsv_m [retrained endpoints] — published [M]"] == ["83.2 / –"]
    assert "tsv_m [tall_masks endpoints] — published [T]" not in rows  # fixed alpha; TSV chose it on validation


def test_latex_table(report):
    tex = main_table_latex(report)
    assert r"\begin{tabular}{lccc}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\multicolumn{1}{c}{ViT-B-32}" in tex and "8 tasks & 14 tasks" in tex
    assert r"tsv\_m & 48.0\,/\,60.0 & 70.0\,/\,87.5 & -- \\" in tex
    assert r"\textit{tsv\_m --- published [M]} & \textit{--} & \textit{83.2\,/\,--} & \textit{--} \\" in tex


def test_csv_tables(report):
    rows = list(csv.DictReader(io.StringIO(main_table_csv(report))))
    tsv = next(r for r in rows if r["method"] == "tsv_m")
    assert (tsv["source"], tsv["tiny/mini acc"], tsv["tiny/mini norm"], tsv["ViT-B-32/8 acc"]) == \
        ("ours", "48.0000", "60.0000", "70.0000")
    assert tsv["ViT-L-14/14 acc"] == ""
    pub = next(r for r in rows if r["method"] == "tsv_m — published [M]")
    assert (pub["source"], pub["ViT-B-32/8 acc"], pub["ViT-B-32/8 norm"]) == ("mass_iclr2026", "83.2000", "")
    long = list(csv.DictReader(io.StringIO(runs_csv(report, load_published()))))
    mass = [r for r in long if r["method"].startswith("MASS (projection) over tsv_m") and r["backbone"] == "ViT-B-32"]
    assert {(r["scoring"], r["published_source"], r["published_acc"]) for r in mass} == \
        {("strict", "", ""), ("paper_rule", "mass_iclr2026", "87.0000")}


def test_markdown_report_sections(report):
    md = report_markdown(report, ["sweep"])
    assert md.startswith("# mass-exp report\n\n9 runs from `sweep` (2 duplicate runs ignored, see Notes).")
    for heading in ("## Average accuracy / normalized accuracy (%)", "## Router diagnostics", "### tiny / mini",
                    "### ViT-B-32 / 8", "### ViT-L-14 / 14", "## Notes"):
        assert heading in md


def test_markdown_table_compat_with_router_columns(sweep):
    results = load_results([sweep / "mini"], warn=lambda m: None)
    rows = _md_rows(markdown_table(results, ("router_task_id_acc", "router_mean_tasks")))
    assert rows["MASS (projection) over tsv_m"] == ["56.0 / 70.0", "90.0", "1.50"]
    assert rows["tsv_m"] == ["48.0 / 60.0", "–", "–"]


def test_published_normalized_needs_the_packaged_reference(make_result):
    label = "MASS (projection) over tsv_m, paper scoring rule — published [M]"
    run = make_result("mass", "ViT-L-14", "8", 0.9, paper_rule=0.92, endpoints="retrained")
    run["config"]["endpoints"]["reference_acc"] = "packaged"
    assert _md_rows(main_table_markdown(build_report([run], load_published())))[label] == ["92.9 / 98.6"]
    run["config"]["endpoints"]["reference_acc"] = "measured"  # our own fine-tuned accuracies: not comparable
    assert _md_rows(main_table_markdown(build_report([run], load_published())))[label] == ["92.9 / –"]
