"""Task-set selection from router probabilities (MASS_SPEC "MASS" steps 5 and 8), oracle routing.

Task sets are tuples of task indices in ascending order everywhere (cache keys, grouping).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mass_exp.routing.projection import routing_probabilities

TaskSet = tuple[int, ...]


def normalize_task_set(tasks: Sequence[int] | int) -> TaskSet:
    """Canonical task set: sorted, de-duplicated tuple of ints."""
    if isinstance(tasks, int):
        return (int(tasks),)
    out = tuple(sorted({int(t) for t in tasks}))
    if not out:
        raise ValueError("a task set must contain at least one task")
    return out


def _argmax_first(row: Sequence[float]) -> int:
    """Index of the largest value; the lower index wins ties."""
    best = 0
    for i in range(1, len(row)):
        if row[i] > row[best]:
            best = i
    return best


def select_tasks(
    probs: Tensor,
    mode: str = "topk",
    threshold: float = 0.2,
    max_tasks: int | None = 3,
) -> list[TaskSet]:
    """Omega per sample from p [B, T] (step 5).

    - ``topk``: tasks with p_t > threshold (strict); if more than min(max_tasks, T) pass, keep the top
      ones by p (lower index wins ties); if none pass, {argmax p}.
    - ``top1``: {argmax p}.
    - ``weighted``: p_t > threshold, fallback {argmax p}, no cap.
    Each set is returned in ascending task order.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [B, T], got shape {tuple(probs.shape)}")
    if mode not in ("topk", "top1", "weighted"):
        raise ValueError(f"unknown router mode {mode!r}")
    n_tasks = probs.shape[1]
    cap = None
    if mode == "topk" and max_tasks is not None:
        cap = min(int(max_tasks), n_tasks)
    p_cpu = probs.detach().cpu()
    # Compare in the probabilities' own dtype, as torch does (``p > 0.2`` on float32 casts 0.2 to
    # float32), so a probability of exactly float32(0.2) does not pass the strict threshold.
    mask = (p_cpu > threshold).tolist()
    out: list[TaskSet] = []
    for row, row_mask in zip(p_cpu.tolist(), mask):
        if mode == "top1":
            out.append((_argmax_first(row),))
            continue
        passing = [t for t, ok in enumerate(row_mask) if ok]
        if not passing:
            out.append((_argmax_first(row),))
            continue
        if cap is not None and len(passing) > cap:
            passing = sorted(passing, key=lambda t: (-row[t], t))[:cap]
        out.append(tuple(sorted(passing)))
    return out


def route_residuals(
    residuals: Tensor,
    mode: str = "topk",
    threshold: float = 0.2,
    temperature: float = 1.0,
    max_tasks: int | None = 3,
) -> tuple[Tensor, list[TaskSet]]:
    """Per-sample routing: residuals [B, T] -> (p [B, T], Omega per sample) (step 5)."""
    probs = routing_probabilities(residuals, mode=mode, temperature=temperature)
    return probs, select_tasks(probs, mode=mode, threshold=threshold, max_tasks=max_tasks)


def batched_route(
    residuals: Tensor,
    mode: str = "top1",
    threshold: float = 0.2,
    temperature: float = 1.0,
    max_tasks: int | None = 3,
) -> TaskSet:
    """Batched routing (step 8): average r over the batch and route once; one Omega for the batch.

    The paper's batched mode is ``top1`` (argmin of the mean residual); other modes are allowed.
    """
    if residuals.dim() != 2 or residuals.shape[0] == 0:
        raise ValueError(f"residuals must be a non-empty [B, T], got shape {tuple(residuals.shape)}")
    mean_r = residuals.mean(dim=0, keepdim=True)
    probs = routing_probabilities(mean_r, mode=mode, temperature=temperature)
    return select_tasks(probs, mode=mode, threshold=threshold, max_tasks=max_tasks)[0]


def oracle_task_sets(task_ids_true: Tensor | Sequence[int]) -> list[TaskSet]:
    """Oracle routing: Omega = {true task} for every sample."""
    ids = task_ids_true.tolist() if isinstance(task_ids_true, Tensor) else list(task_ids_true)
    return [(int(t),) for t in ids]
