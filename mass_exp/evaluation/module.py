"""The one Lightning module that evaluates any method on every task of a suite.

Each task is one test dataloader (dataloader_idx = task index). Per-task correct/total counts are torchmetrics
`SumMetric`s, so they are exact and reduced across ranks under DDP (the loaders are sharded without padding by
`mass_exp.evaluation.sampling`). Every rank computes the same results: all metric syncs happen in
`on_test_epoch_end`, in the same order on every rank, whatever data a rank saw (possibly none of a task: one empty
batch), and which router diagnostics exist is agreed on across ranks first.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import lightning as L
import torch
from torch import nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from mass_exp.evaluation.predictors import Predictor


# the figures logged at epoch end are computed from metrics already reduced across ranks: no `sync_dist` needed
warnings.filterwarnings("ignore", message=r".*sync_dist=True.* when logging on epoch level in distributed setting")

# per-sample outputs of routing predictors, summed per task; names in results.json
EXTRA_SUMS = ("correct_paper_rule", "task_id_correct", "survival", "set_size")
EXTRA_NAMES = {"correct_paper_rule": "acc_paper_rule", "task_id_correct": "router_task_id_acc",
               "survival": "router_survival", "set_size": "router_mean_tasks"}


class EvaluationModule(L.LightningModule):
    """Runs a `Predictor` over each task's test set; logs acc/test/<task>, normalized_acc/test/<task> and averages.

    A prediction is correct only if the predicted task is the sample's task and the class matches (spec, MASS step 7).
    """

    def __init__(self, predictor: Predictor, task_names: Sequence[str],
                 reference_acc: Mapping[str, float] | None = None, split: str = "test"):
        super().__init__()
        self.predictor = predictor
        self.task_names = list(task_names)
        self.reference_acc = dict(reference_acc or {})
        self.split = split
        n = len(task_names)
        self.correct = nn.ModuleList([SumMetric() for _ in range(n)])
        self.total = nn.ModuleList([SumMetric() for _ in range(n)])
        # router diagnostics (filled only by predictors that route)
        self.extra = nn.ModuleDict({k: nn.ModuleList([SumMetric() for _ in range(n)]) for k in EXTRA_SUMS})
        self.confusion = MulticlassConfusionMatrix(num_classes=n)
        self._seen: set[str] = set()  # which diagnostics the predictor produced
        self.results: dict[str, dict] = {}
        self.confusion_matrix: list[list[int]] | None = None

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        images, labels = batch
        t = dataloader_idx
        if len(labels) == 0:  # a rank with no sample of this task (see sampling.shard_loader)
            return
        out = self.predictor.predict(images, t, labels)
        ok = (out["pred_task"] == t) & (out["pred_class"] == labels)
        self.correct[t].update(ok.sum().float())
        self.total[t].update(torch.tensor(float(len(labels)), device=labels.device))
        for key in EXTRA_SUMS:
            if key in out:
                self._seen.add(key)
                self.extra[key][t].update(out[key].float().sum())
        if "routed_task" in out:
            self.confusion.update(out["routed_task"], torch.full_like(out["routed_task"], t))

    def _seen_on_any_rank(self) -> list[str]:
        """The diagnostics some rank produced, the same sorted list on every rank (a rank may have seen no data)."""
        keys = list(EXTRA_SUMS)
        flags = torch.tensor([float(k in self._seen) for k in keys], device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
        return sorted(k for k, f in zip(keys, flags.tolist()) if f > 0)

    def on_test_epoch_end(self) -> None:
        seen = self._seen_on_any_rank()
        self._seen = set(seen)
        per_task = {}
        for i, name in enumerate(self.task_names):
            correct, total = int(self.correct[i].compute().item()), int(self.total[i].compute().item())
            acc = correct / total if total else float("nan")
            entry = {"acc": acc, "correct": correct, "samples": total}
            ref = self.reference_acc.get(name)
            if ref is not None:
                entry["finetuned_acc"] = ref
                entry["normalized_acc"] = acc / ref if ref > 0 else float("nan")
            if total:
                for key in seen:
                    entry[EXTRA_NAMES[key]] = self.extra[key][i].compute().item() / total
            per_task[name] = entry
        self.results = per_task
        if "task_id_correct" in self._seen:
            self.confusion_matrix = self.confusion.compute().cpu().long().tolist()
        s = self.split
        for name, e in per_task.items():
            self.log(f"acc/{s}/{name}", 100 * e["acc"], sync_dist=False, rank_zero_only=True)
            if "normalized_acc" in e:
                self.log(f"normalized_acc/{s}/{name}", 100 * e["normalized_acc"], rank_zero_only=True)
        accs = [e["acc"] for e in per_task.values()]
        self.log(f"acc/{s}/avg", 100 * sum(accs) / len(accs), rank_zero_only=True)
        if self._seen:
            for key in ("acc_paper_rule", "router_task_id_acc", "router_survival", "router_mean_tasks"):
                for name, e in per_task.items():
                    if key in e:
                        self.log(f"{key}/{s}/{name}", e[key] if key == "router_mean_tasks" else 100 * e[key],
                                 rank_zero_only=True)
        norms = [e["normalized_acc"] for e in per_task.values() if "normalized_acc" in e]
        if len(norms) == len(accs):
            self.log(f"normalized_acc/{s}/avg", 100 * sum(norms) / len(norms), rank_zero_only=True)
