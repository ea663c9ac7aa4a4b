"""Lightning modules that make the mini suite's models: contrastive pretraining and per-task fine-tuning.

Fine-tuning follows the paper's endpoints: only the image encoder trains, against the task's frozen zero-shot head.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F


def _cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def multi_positive_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, label_ids: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where every pair with the same (task, class) is a positive.

    A batch drawn from few classes holds duplicate captions; plain CLIP loss would push them apart.
    """
    logits = scale * image_emb @ text_emb.T
    pos = (label_ids[:, None] == label_ids[None, :]).float()
    targets = pos / pos.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))


class ContrastivePretrainModule(L.LightningModule):
    """Short CLIP-style pretraining of both towers on captions made from the task templates."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, max_steps: int,
                 max_logit_scale: float = 100.0):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.max_logit_scale = max_logit_scale

    def training_step(self, batch, batch_idx):
        images, tokens, label_ids = batch
        img = F.normalize(self.model.encode_image(images), dim=-1)
        txt = F.normalize(self.model.encode_text(tokens), dim=-1)
        scale = self.model.logit_scale.exp().clamp(max=self.max_logit_scale)
        loss = multi_positive_clip_loss(img, txt, label_ids, scale)
        self.log("pretrain/loss", loss, prog_bar=True)
        self.log("pretrain/logit_scale", scale, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = _cosine_with_warmup(opt, self.warmup_steps, self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FinetuneModule(L.LightningModule):
    """Fine-tune the image encoder with a frozen zero-shot head (cross-entropy on head @ normalised features)."""

    def __init__(self, visual: torch.nn.Module, head: torch.Tensor, lr: float, weight_decay: float,
                 warmup_steps: int, max_steps: int):
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head.clone())
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.max_steps = warmup_steps, max_steps

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1) @ self.head.T

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.logits(images)
        loss = F.cross_entropy(logits, labels)
        self.log("finetune/loss", loss, prog_bar=True)
        self.log("finetune/train_acc", (logits.argmax(-1) == labels).float().mean(), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("finetune/val_acc", (self.logits(images).argmax(-1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.visual.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = _cosine_with_warmup(opt, self.warmup_steps, self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
