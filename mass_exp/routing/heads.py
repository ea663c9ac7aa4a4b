"""Head selection over the routed tasks (MASS_SPEC "MASS" step 7).

Heads are zero-shot classifier weights [C_t, E] already multiplied by exp(logit_scale); embeddings
are L2-normalised, so logits = emb @ head^T.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

TaskSet = tuple[int, ...]
Heads = Union[Mapping[int, Tensor], Sequence[Tensor]]  # task index -> [C_t, E]


def _as_mapping(heads: Heads) -> Mapping[int, Tensor]:
    return heads if isinstance(heads, Mapping) else dict(enumerate(heads))


def _logits(emb: Tensor, head: Tensor) -> Tensor:
    return emb.to(torch.float32) @ head.to(device=emb.device, dtype=torch.float32).T


def _check(embeddings: Tensor, task_sets: Sequence[TaskSet], heads: Mapping[int, Tensor]) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [B, E], got {tuple(embeddings.shape)}")
    if len(task_sets) != embeddings.shape[0]:
        raise ValueError(f"{len(task_sets)} task sets for {embeddings.shape[0]} embeddings")
    missing = {t for s in task_sets for t in s} - set(heads)
    if missing:
        raise KeyError(f"no head for tasks {sorted(missing)}")


def _select_heads(
    embeddings: Tensor,
    heads: Mapping[int, Tensor],
    task_sets: Sequence[TaskSet],
    head_selection: str,
) -> tuple[Tensor, Tensor]:
    """Winning head and its argmax class per sample.

    ``max``: the head holding the largest logit over all (task, class) pairs of Omega; ``avg``: the
    head with the largest mean logit. Tasks are visited in ascending order with a strict ``>``, so
    the lower task index wins ties; inside a head, the lower class index wins.
    """
    if head_selection not in ("max", "avg"):
        raise ValueError(f"head_selection must be 'max' or 'avg', got {head_selection!r}")
    n = embeddings.shape[0]
    best_score = torch.full((n,), float("-inf"), dtype=torch.float32)
    pred_task = torch.full((n,), -1, dtype=torch.long)
    pred_class = torch.full((n,), -1, dtype=torch.long)
    for t in sorted({t for s in task_sets for t in s}):
        idx = torch.tensor([i for i, s in enumerate(task_sets) if t in s], dtype=torch.long)
        logits = _logits(embeddings[idx.to(embeddings.device)], heads[t]).cpu()
        top_val, top_cls = logits.max(dim=1)  # max returns the first maximal index
        score = top_val if head_selection == "max" else logits.mean(dim=1)
        better = score > best_score[idx]
        win = idx[better]
        best_score[win] = score[better]
        pred_task[win] = t
        pred_class[win] = top_cls[better]
    if (pred_task < 0).any():  # only reachable with NaN logits
        raise ValueError("no head scored for some samples (NaN logits?)")
    return pred_task, pred_class


def select_prediction(
    embeddings: Tensor,
    heads: Heads,
    task_sets: Sequence[TaskSet],
    head_selection: str = "max",
    oracle_tasks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(pred_task [B], pred_class [B]) from the heads of each sample's Omega (step 7).

    With ``oracle_tasks`` given, each sample uses only its true task's head (oracle-head mode).
    ``heads`` maps task index -> [C_t, E] (a list indexed by task works too). Outputs are on CPU.
    Strict correctness is ``(pred_task == true_task) & (pred_class == label)``: see :func:`strict_correct`.
    """
    heads = _as_mapping(heads)
    if oracle_tasks is not None:
        task_sets = [(int(t),) for t in oracle_tasks.tolist()]
    _check(embeddings, task_sets, heads)
    return _select_heads(embeddings, heads, task_sets, head_selection)


def strict_correct(pred_task: Tensor, pred_class: Tensor, task_ids_true: Tensor, labels: Tensor) -> Tensor:
    """The headline rule: right head AND right class (step 7). Bool [B] on CPU."""
    return (pred_task.cpu() == task_ids_true.cpu().long()) & (pred_class.cpu() == labels.cpu().long())


def paper_rule_correct(
    embeddings: Tensor,
    heads: Heads,
    task_sets: Sequence[TaskSet],
    task_ids_true: Tensor,
    labels: Tensor,
    head_selection: str = "max",
    pred_task: Tensor | None = None,
) -> Tensor:
    """The official code's looser scoring, used for the published numbers (``acc_paper_rule``, step 7).

    Take the routed head whose largest (``max``) or mean (``avg``) logit is highest (first on a tie,
    i.e. the lower task index), trim its logits to the true task's class count C or zero-pad them up
    to C, and compare their argmax with the label. A wrong head counts as correct when the index
    happens to match. Returns bool [B] on CPU. ``pred_task``: the head already chosen by
    :func:`select_prediction` with the same ``head_selection`` (skips choosing it again).
    """
    heads = _as_mapping(heads)
    _check(embeddings, task_sets, heads)
    if pred_task is None:
        pred_task, _ = _select_heads(embeddings, heads, task_sets, head_selection)
    true = task_ids_true.cpu().long()
    lab = labels.cpu().long()
    correct = torch.zeros(embeddings.shape[0], dtype=torch.bool)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, t) in enumerate(zip(pred_task.tolist(), true.tolist())):
        groups.setdefault((h, int(heads[t].shape[0])), []).append(i)
    for (h, n_cls), members in groups.items():
        idx = torch.tensor(members, dtype=torch.long)
        logits = _logits(embeddings[idx.to(embeddings.device)], heads[h]).cpu()
        if logits.shape[1] > n_cls:
            logits = logits[:, :n_cls]
        elif logits.shape[1] < n_cls:
            pad = torch.zeros(logits.shape[0], n_cls - logits.shape[1], dtype=logits.dtype)
            logits = torch.cat([logits, pad], dim=1)
        correct[idx] = logits.argmax(dim=1) == lab[idx]
    return correct


def score_predictions(
    embeddings: Tensor,
    heads: Heads,
    task_sets: Sequence[TaskSet],
    task_ids_true: Tensor,
    labels: Tensor,
    head_selection: str = "max",
    oracle_head: bool = False,
) -> dict[str, Tensor]:
    """Both scorings of step 7 at once: ``pred_task``, ``pred_class``, ``correct`` (strict, the
    headline) and ``correct_paper_rule`` (the official rule). With ``oracle_head`` the true task's head
    is used for both, so the two coincide."""
    if oracle_head:
        task_sets = [(int(t),) for t in task_ids_true.tolist()]
    pred_task, pred_class = select_prediction(embeddings, heads, task_sets, head_selection)
    return {
        "pred_task": pred_task,
        "pred_class": pred_class,
        "correct": strict_correct(pred_task, pred_class, task_ids_true, labels),
        "correct_paper_rule": paper_rule_correct(
            embeddings, heads, task_sets, task_ids_true, labels, head_selection, pred_task=pred_task
        ),
    }
