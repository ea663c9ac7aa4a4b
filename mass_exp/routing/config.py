"""Router configuration: every knob of the MASS projection router (MASS_SPEC "MASS" steps 3-8).

Defaults are the paper's (official configs): block 9 (ViT-B), CLS token, l2 norm, ``topk`` mode with
threshold 0.2, temperature 1, at most 3 tasks, per-sample routing, max-logit head selection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

RouterMode = Literal["topk", "top1", "weighted"]
TokenSelection = Literal["cls", "mean"]
ResidualNorm = Literal["l2", "mahalanobis"]
HeadSelection = Literal["max", "avg"]
RoutingParam = Literal["mlp_in", "attn_in"]

ROUTER_MODES: tuple[str, ...] = ("topk", "top1", "weighted")
TOKEN_SELECTIONS: tuple[str, ...] = ("cls", "mean")
RESIDUAL_NORMS: tuple[str, ...] = ("l2", "mahalanobis")
HEAD_SELECTIONS: tuple[str, ...] = ("max", "avg")
#: which input space of the routing block the router projects on: the MLP's (``mlp.c_fc``, ln_2 output; the paper's)
#: or the attention's (``attn.in_proj_weight``, ln_1 output)
ROUTING_PARAMS: tuple[str, ...] = ("mlp_in", "attn_in")
#: routers built from a few training samples per task (the paper's ablation), which read the first-pass image
#: embedding instead of projecting a routing block's input
SAMPLE_ROUTERS: tuple[str, ...] = ("nearest_neighbour", "mlp")

#: Routing block per backbone (0-based), MASS_SPEC step 3.
DEFAULT_ROUTING_BLOCK: dict[str, int] = {"ViT-B-32": 9, "ViT-B-16": 9, "ViT-L-14": 20}


@dataclass(frozen=True)
class RouterConfig:
    """All router knobs (MASS_SPEC steps 3-8).

    - ``block``: 0-based resblock whose ``ln_2`` output feeds the router (step 3).
    - ``routing_param``: ``mlp_in`` (the paper's): project the block's ``ln_2`` output on the task subspaces of
      ``mlp.c_fc.weight``; ``attn_in``: project its ``ln_1`` output on those of ``attn.in_proj_weight`` (for
      endpoints that fine-tuned the attention only, whose ``mlp.c_fc`` task vectors are zero).
    - ``token``: ``cls`` (token 0 of each sample, batch-first) or ``mean`` (mean over all tokens, CLS
      included, as the official ``x.mean(dim=0)`` on the (L, B, D) layout).
    - ``norm``: ``l2`` or ``mahalanobis`` (= l2 / sqrt(mahalanobis_eps), step 8).
    - ``mode``: ``topk`` (standardised softmax, threshold, cap), ``top1``, ``weighted`` (step 5).
    - ``threshold``: eta, strict ``p > threshold``. ``temperature``: softmax temperature.
    - ``max_tasks``: cap on |Omega| for ``topk`` (effective cap min(max_tasks, T)); ``None`` = no cap.
    - ``batched``: route a whole batch once from its mean residual (step 8) with ``batched_mode``.
    - ``head_selection``: ``max`` (max logit over task x class) or ``avg`` (mean-logit head choice).
    - ``oracle_head``: score with the true task's head (step 7). ``oracle_routing``: Omega = {true task}.
    """

    block: int = 9
    routing_param: RoutingParam = "mlp_in"
    token: TokenSelection = "cls"
    norm: ResidualNorm = "l2"
    mahalanobis_eps: float = 1e-3
    mode: RouterMode = "topk"
    threshold: float = 0.2
    temperature: float = 1.0
    max_tasks: int | None = 3
    batched: bool = False
    batched_mode: RouterMode = "top1"
    head_selection: HeadSelection = "max"
    oracle_head: bool = False
    oracle_routing: bool = False

    def __post_init__(self) -> None:
        if self.block < 0:
            raise ValueError(f"block must be >= 0, got {self.block}")
        if self.routing_param not in ROUTING_PARAMS:
            raise ValueError(f"routing_param must be one of {ROUTING_PARAMS}, got {self.routing_param!r}")
        if self.token not in TOKEN_SELECTIONS:
            raise ValueError(f"token must be one of {TOKEN_SELECTIONS}, got {self.token!r}")
        if self.norm not in RESIDUAL_NORMS:
            raise ValueError(f"norm must be one of {RESIDUAL_NORMS}, got {self.norm!r}")
        if self.mode not in ROUTER_MODES:
            raise ValueError(f"mode must be one of {ROUTER_MODES}, got {self.mode!r}")
        if self.batched_mode not in ROUTER_MODES:
            raise ValueError(f"batched_mode must be one of {ROUTER_MODES}, got {self.batched_mode!r}")
        if self.head_selection not in HEAD_SELECTIONS:
            raise ValueError(f"head_selection must be one of {HEAD_SELECTIONS}, got {self.head_selection!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1 or None, got {self.max_tasks}")
        if self.mahalanobis_eps <= 0:
            raise ValueError(f"mahalanobis_eps must be > 0, got {self.mahalanobis_eps}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RouterConfig":
        """Build from a plain mapping (e.g. a resolved Hydra node), rejecting unknown keys."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown RouterConfig keys: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for results.json."""
        return asdict(self)
