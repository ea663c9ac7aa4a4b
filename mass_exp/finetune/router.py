"""Training the MLP router (Lightning), as the MASS code trains its `linear` router.

Official recipe (crisostomi/mass@583b35e): src/mass/scripts/train_router.py, src/mass/pl_module/
router_task_classifier.py, conf/train_router.yaml, conf/train/default.yaml, conf/nn/module/default.yaml,
conf/nn/data/default.yaml: cross-entropy on the task index over the union of the tasks' *train* splits (shuffled,
batch size 32), features = the first-pass (TSV-M-merged) encoder's image embedding (encoder frozen), AdamW lr 1e-5
weight decay 0.1, cosine annealing with T_max = 10 (stepped per epoch), gradient clipping 10, at most 80 epochs of at
most 400·T batches, keeping the checkpoint with the lowest training loss.
"""

from __future__ import annotations

import copy
import logging

import lightning as L
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class RouterTrainingModule(L.LightningModule):
    """Cross-entropy on (embedding, task index) pairs; remembers the weights of the epoch with the lowest loss."""

    def __init__(self, mlp: torch.nn.Module, lr: float, weight_decay: float, t_max: int):
        super().__init__()
        self.mlp = mlp
        self.lr, self.weight_decay, self.t_max = float(lr), float(weight_decay), int(t_max)
        self._epoch_loss: list[float] = []
        self.best_loss = float("inf")
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.mlp(x)
        loss = F.cross_entropy(logits, y)
        self._epoch_loss.append(float(loss.detach()))
        self.log("router/loss", loss, prog_bar=True)
        self.log("router/train_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        if not self._epoch_loss:
            return
        mean = sum(self._epoch_loss) / len(self._epoch_loss)
        self.history.append({"epoch": int(self.current_epoch), "loss": mean})
        log.info("router training epoch %d: mean loss %.4f over %d batches", self.current_epoch, mean,
                 len(self._epoch_loss))
        if mean < self.best_loss:
            self.best_loss = mean
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.mlp.state_dict().items()}
        self._epoch_loss = []

    def best_mlp(self) -> torch.nn.Module:
        mlp = copy.deepcopy(self.mlp).cpu()
        if self.best_state is not None:
            mlp.load_state_dict(self.best_state)
        return mlp.eval()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.mlp.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.t_max)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
