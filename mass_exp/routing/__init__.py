"""MASS routing: projection router, task-set selection, head selection, two-pass machinery."""

from mass_exp.routing.config import DEFAULT_ROUTING_BLOCK, RouterConfig
from mass_exp.routing.heads import (
    paper_rule_correct,
    score_predictions,
    select_prediction,
    strict_correct,
)
from mass_exp.routing.projection import (
    projection_residuals,
    routing_probabilities,
    stack_bases,
    standardize_scores,
)
from mass_exp.routing.router import ProjectionRouter, RoutingDecision, router_diagnostics
from mass_exp.routing.selection import (
    TaskSet,
    batched_route,
    normalize_task_set,
    oracle_task_sets,
    route_residuals,
    select_tasks,
)
from mass_exp.routing.two_pass import (
    ExpertCache,
    TwoPassOutput,
    TwoPassTimings,
    group_by_task_set,
    two_pass_forward,
)

__all__ = [
    "DEFAULT_ROUTING_BLOCK",
    "ExpertCache",
    "ProjectionRouter",
    "RouterConfig",
    "RoutingDecision",
    "TaskSet",
    "TwoPassOutput",
    "TwoPassTimings",
    "batched_route",
    "group_by_task_set",
    "normalize_task_set",
    "oracle_task_sets",
    "paper_rule_correct",
    "projection_residuals",
    "route_residuals",
    "router_diagnostics",
    "routing_probabilities",
    "score_predictions",
    "select_prediction",
    "select_tasks",
    "stack_bases",
    "standardize_scores",
    "strict_correct",
    "two_pass_forward",
]
