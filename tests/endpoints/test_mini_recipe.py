"""Recipe keys of the mini endpoints: patch dropout (`endpoints.pretrain.patch_dropout`) thins the image tower's
tokens while it pretrains and nowhere else; linearised fine-tuning (`endpoints.finetune.linearized`) moves only the
trainable parameters, to θ_pre + the trained offset. Either enters a cache key only when it is on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mass_exp.endpoints.mini as mini
from mass_exp.data.datasets import build_mini_task
from mass_exp.data.tasks import get_task

ARCH = "mass-tiny-ViT"  # 32x32 images, patch 8: 16 patch tokens and the class token
GEN = dict(seed=0, image_size=32, train_size=16, validation_size=8, test_size=8, pretrain_size=48,
           pretrain_signed_share=0.25)
RECIPE = dict(steps=2, batch_size=16, lr=5e-4, weight_decay=0.1, warmup_steps=1, class_caption_share=0.0,
              domain_captions="templates")
TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}


FINETUNE = dict(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, warmup_steps=1, trainable="attention")


def test_the_new_keys_enter_the_cache_key_only_when_on():
    assert mini._recipe({**RECIPE, "patch_dropout": 0.0}) == mini._recipe(RECIPE)
    assert mini._recipe({**RECIPE, "patch_dropout": 0.5})["patch_dropout"] == 0.5
    assert mini._recipe({**FINETUNE, "linearized": False}) == mini._recipe(FINETUNE)
    assert mini._recipe({**FINETUNE, "linearized": True})["linearized"] is True


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mini-data")
    return {name: build_mini_task(name, GEN, root) for name in ("angles", "locations")}


def _pretrain(data, monkeypatch, patch_dropout: float) -> tuple[dict[str, torch.Tensor], list[int], torch.nn.Module]:
    """Pretrain; returns the weights, the token counts the image transformer saw, and the model afterwards."""
    seen, models = [], []
    create = mini.create_clip

    def recording_create(*args, **kwargs):
        model, preprocess, tokenizer = create(*args, **kwargs)
        model.visual.transformer.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].shape[1]))
        models.append(model)
        return model, preprocess, tokenizer

    monkeypatch.setattr(mini, "create_clip", recording_create)
    tasks = [get_task(name) for name in data]
    weights = mini.pretrain_tiny_clip(ARCH, tasks, data, {**RECIPE, "patch_dropout": patch_dropout}, TRAINER, 0, GEN)
    return weights, seen, models[0]


@pytest.mark.slow
def test_patch_dropout_thins_the_tokens_in_pretraining_only(data, monkeypatch):
    weights, seen, model = _pretrain(data, monkeypatch, 0.5)
    assert seen and set(seen) == {1 + 8}, seen  # the class token and half of the 16 patches, every step
    assert isinstance(model.visual.patch_dropout, torch.nn.Identity)
    seen.clear()
    model.visual.train()  # fine-tuning trains this tower: it must see every patch again
    with torch.no_grad():
        model.encode_image(torch.zeros(2, 3, 32, 32))
    assert seen == [1 + 16]

    plain, seen_plain, _ = _pretrain(data, monkeypatch, 0.0)
    assert set(seen_plain) == {1 + 16}
    assert weights.keys() == plain.keys()
    assert any(not torch.equal(weights[k], plain[k]) for k in weights)


@pytest.mark.slow
def test_linearized_finetune_moves_only_the_trainable_parameters(data):
    torch.manual_seed(0)
    pretrained = mini.create_clip(ARCH)[0].state_dict()
    task = get_task("angles")
    args = (ARCH, pretrained, task, data["angles"])
    lin, lin_acc = mini.finetune_endpoint(*args, {**FINETUNE, "linearized": True}, TRAINER, 1)
    plain, _ = mini.finetune_endpoint(*args, FINETUNE, TRAINER, 1)
    before = {k[len("visual."):]: v for k, v in pretrained.items() if k.startswith("visual.")}
    assert lin.keys() == plain.keys() == before.keys()
    moved = {k for k in lin if not torch.equal(lin[k], before[k])}
    assert moved and moved <= {k for k in before if ".attn." in k}
    assert 0.0 <= lin_acc <= 1.0
    # the same data, seed and steps, but trained in tangent space: a different task vector
    assert any(not torch.equal(lin[k], plain[k]) for k in moved)
