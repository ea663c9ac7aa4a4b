"""Published numbers (packaged `resources/paper_results.json`) and the protocol each one assumes.

A published number is shown beside one of our rows only when our run used the same protocol: the same backbone and
suite, the endpoints the source was measured on (`config.endpoints.source`), the coefficient protocol the source
states, and, for MASS, the paper's scoring rule (our `acc_paper_rule`). Everything here is pure except `load_published`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping


@dataclass(frozen=True)
class PublishedRow:
    """How one of our rows maps onto a source's numbers. Paths index the source's JSON; `{backbone}` / `{suite}` are
    filled in. `require` lists protocol facts our run must have (see `run_protocol`); absent = not stated."""

    abs_path: tuple[str, ...] | None
    norm_path: tuple[str, ...] | None = None
    require: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PublishedSource:
    key: str  # top-level key of paper_results.json
    tag: str  # short marker used in tables
    description: str  # what the numbers assume (endpoints, reference accuracies, protocol)
    endpoints: tuple[str, ...]  # our `endpoints.source` values that reproduce its endpoints
    rows: Mapping[str, PublishedRow]  # our row kind (see `row_kind`) -> its numbers


B, S = "{backbone}", "{suite}"

SOURCES: tuple[PublishedSource, ...] = (
    PublishedSource(
        key="mass_iclr2026", tag="M",
        description=("MASS paper, ICLR 2026 (third-party transcription of its main table): retrained endpoints "
                     "(HF crisostomi/<model>-<task>), fine-tuned reference finetuned_acc_retrained.json; MASS scored "
                     "with the paper's rule (shown beside our `paper scoring rule` rows); tsv_m and MASS at alpha = 1, "
                     "iso_cts at the MASS code's fixed alphas. Shown only beside runs with endpoints=retrained."),
        endpoints=("retrained",),
        rows={
            "finetuned": PublishedRow(("finetuned", B, S)),
            "task_arithmetic": PublishedRow(("task_arithmetic", B, S)),
            "tsv_m": PublishedRow(("tsv_m", B, S), require={"alpha_protocol": "fixed", "alpha": 1.0}),
            "iso_cts": PublishedRow(("iso_cts", B, S), require={"alpha_protocol": "fixed"}),
            "mass": PublishedRow(("mass", B, S), ("mass_normalized", B, S),
                                 require={"scoring": "paper_rule", "alpha": 1.0}),
            "mass_first_pass_zeroshot": PublishedRow(
                None, ("router_ablation_normalized_ViT-L-14", "projection_from_pretrained", S),
                require={"scoring": "paper_rule", "alpha": 1.0, "backbone": "ViT-L-14"}),
            "mass_nearest_neighbour": PublishedRow(
                None, ("router_ablation_normalized_ViT-L-14", "nearest_neighbour", S),
                require={"scoring": "paper_rule", "alpha": 1.0, "backbone": "ViT-L-14"}),
            "mass_mlp": PublishedRow(
                None, ("router_ablation_normalized_ViT-L-14", "trained_mlp", S),
                require={"scoring": "paper_rule", "alpha": 1.0, "backbone": "ViT-L-14"}),
            # SMILE, scored like the other MoErging baselines with the task's own head (task known)
            "smile": PublishedRow(("smile_2", B, S)),
        },
    ),
    PublishedSource(
        key="tsv_cvpr2025", tag="T",
        description=("TSV paper, CVPR 2025 (averages of its published per-task results): TALL-masks endpoints "
                     "(HF nik-dim/tall_masks), fine-tuned reference finetuned_acc_tall_masks.json; alpha (and "
                     "consensus lambda_t) chosen on validation. Shown only beside runs with endpoints=tall_masks."),
        endpoints=("tall_masks",),
        rows={
            "zeroshot": PublishedRow(("zeroshot", B, S)),
            "weight_average": PublishedRow(("weight_average", B, S)),
            "task_arithmetic": PublishedRow(("task_arithmetic", B, S), require={"alpha_protocol": "validation"}),
            "consensus": PublishedRow(("consensus_ta", B, S),
                                      require={"alpha_protocol": "validation", "lambda_protocol": "validation"}),
            "tsv_m": PublishedRow(("tsv_m", B, S), require={"alpha_protocol": "validation"}),
            "tsv_c": PublishedRow(("tsv_c", B, S)),
        },
    ),
)

#: Published cells flagged as doubtful by the file's own provenance note.
SUSPECT: frozenset[tuple[str, str, str, str]] = frozenset({("mass_iclr2026", "mass", "ViT-B-16", "20")})


def load_published() -> dict[str, Any]:
    """The packaged paper_results.json."""
    return json.loads(resources.files("mass_exp").joinpath("resources/paper_results.json").read_text())


def canonical_endpoints(name: str | None) -> str | None:
    return None if name is None else str(name).lower().replace("-", "_")


def _lookup(data: Mapping[str, Any], path: tuple[str, ...] | None, backbone: str, suite: str) -> float | None:
    if path is None:
        return None
    node: Any = data
    for part in path:
        part = part.format(backbone=backbone, suite=suite)
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) else None


def find_published(data: Mapping[str, Any], kind: str | None, protocol: Mapping[str, Any]) -> list[tuple[PublishedSource, float | None, float | None, bool]]:
    """Every source whose numbers match our run: (source, abs %, normalized %, suspect).

    `kind` is `row_kind(...)` of our row; `protocol` is `run_protocol(...)` of our run (plus the row's scoring).
    Absolute numbers need the same endpoints, backbone, suite and the source's stated protocol; normalized ones
    also the source's fine-tuned reference (a run with `endpoints.reference_acc=measured` gets none)."""
    if kind is None:
        return []
    out = []
    for src in SOURCES:
        row = src.rows.get(kind)
        if row is None or protocol.get("endpoints") not in src.endpoints or src.key not in data:
            continue
        if any(protocol.get(k) != v for k, v in row.require.items()):
            continue
        if "scoring" not in row.require and protocol.get("scoring", "strict") != "strict":
            continue
        b, s = protocol["backbone"], protocol["suite"]
        a = _lookup(data[src.key], row.abs_path, b, s)
        # a published normalized accuracy divides by the source's own fine-tuned accuracies: only comparable when
        # our run normalizes by the same packaged reference (endpoints.reference_acc=packaged)
        n = _lookup(data[src.key], row.norm_path, b, s) if protocol.get("reference_acc") != "measured" else None
        if a is None and n is None:
            continue
        out.append((src, a, n, (src.key, kind, b, s) in SUSPECT))
    return out
