"""A toy distributed evaluation, run as a script by test_ddp.py (Lightning's launcher re-runs this file per rank).

    python tests/evaluation/ddp_toy.py OUT_DIR WORLD_SIZE N1 N2 ...

Evaluates a deterministic toy predictor (with router-like diagnostics) over tasks of N1, N2, ... samples through the
real EvaluationModule + ShardedTestData, with `strategy=ddp` on WORLD_SIZE CPU processes (gloo) or, for
WORLD_SIZE=0, on one device without a strategy. Every rank writes OUT_DIR/rank<r>.json (its results and the
samples it saw), so the test can check that all ranks agree and that no sample was seen twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from mass_exp.evaluation.module import EvaluationModule
from mass_exp.evaluation.predictors import Predictor
from mass_exp.evaluation.sampling import ShardedTestData

NUM_CLASSES = 3


class ToyPredictor(Predictor):
    """Predicts class (id % 3), routes sample `id` to task (id % 4) and reports every diagnostic of a router."""

    def __init__(self, num_tasks: int):
        super().__init__([torch.zeros(NUM_CLASSES, 2) for _ in range(num_tasks)])
        self.seen: list[list[int]] = [[] for _ in range(num_tasks)]

    def predict(self, images, task, labels=None):
        ids = images[:, 0].long()
        self.seen[task] += ids.tolist()
        routed = ids % 4 % self.num_tasks
        return {"pred_task": torch.where(ids % 5 == 0, (task + 1) % self.num_tasks, task),
                "pred_class": ids % NUM_CLASSES, "correct_paper_rule": (ids % NUM_CLASSES == labels), "set_size": 1 + ids % 2,
                "survival": ids % 3 != 0, "task_id_correct": routed == task, "routed_task": routed}


def loaders(sizes: list[int]) -> list[DataLoader]:
    out = []
    for t, n in enumerate(sizes):
        ids = torch.arange(n) + 1000 * t
        images = torch.stack([ids.float(), torch.zeros(n)], dim=1)
        labels = (ids * 7 + t) % NUM_CLASSES
        out.append(DataLoader(TensorDataset(images, labels), batch_size=2, shuffle=False))
    return out


def run(out_dir: Path, world_size: int, sizes: list[int]) -> dict:
    names = [f"task{t}" for t in range(len(sizes))]
    predictor = ToyPredictor(len(sizes))
    module = EvaluationModule(predictor, names, {n: 0.5 for n in names})
    kwargs = {"devices": world_size, "strategy": "ddp"} if world_size else {"devices": 1}
    trainer = L.Trainer(accelerator="cpu", num_nodes=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, use_distributed_sampler=False, **kwargs)
    trainer.test(module, datamodule=ShardedTestData(loaders(sizes)), verbose=False)
    rank = trainer.global_rank
    out = {"rank": rank, "world_size": trainer.world_size, "results": module.results,
           "confusion_matrix": module.confusion_matrix, "seen": predictor.seen}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    return json.loads(json.dumps(out))


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), [int(x) for x in sys.argv[3:]])
