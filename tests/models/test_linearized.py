"""Linearised (tangent-space) fine-tuning: the wrapped model is the first-order Taylor expansion of the image tower
around θ_pre, only its offsets train, and the endpoint it gives is θ_pre + offset."""

from __future__ import annotations

import pytest
import torch

from mass_exp.finetune.linearized import LinearizedModel
from mass_exp.models.clip import create_clip

ATTENTION = lambda name: ".attn." in name  # noqa: E731 - the mini recipe's default trainable set


@pytest.fixture(scope="module")
def tower() -> torch.nn.Module:
    torch.manual_seed(0)
    visual = create_clip("mass-tiny-ViT")[0].visual.double()
    visual.eval()
    return visual


def _offsets(lin: LinearizedModel, scale: float, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, d in zip(lin.names, lin._tangents().values()):
            p = dict(lin.model.named_parameters())[n]
            d.copy_(scale * p.norm() / p.numel() ** 0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _at(visual: torch.nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(visual, state, (x,))


def test_is_the_model_at_zero_offset_and_linear_in_the_offset(tower):
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    lin = LinearizedModel(tower, ATTENTION)
    with torch.no_grad():
        assert torch.allclose(lin(x), tower(x), atol=1e-12)
        _offsets(lin, 1e-2)
        one = lin(x) - tower(x)
        _offsets(lin, 2e-2)
        two = lin(x) - tower(x)
    assert one.abs().max() > 1e-4  # the offsets move the output
    assert torch.allclose(two, 2 * one, rtol=1e-9, atol=1e-12)


def test_matches_the_model_to_first_order(tower):
    """|f(θ+εδ) - f_lin(θ+εδ)| shrinks as ε²: a wrong Jacobian would leave an error of order ε."""
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    lin = LinearizedModel(tower, ATTENTION)
    errors = []
    for eps in (1e-2, 5e-3):
        _offsets(lin, eps)
        with torch.no_grad():
            errors.append(float((_at(tower, lin.endpoint_state_dict(), x) - lin(x)).abs().max()))
    assert errors[0] > 0
    assert 3.0 < errors[0] / errors[1] < 5.0, errors


def test_only_the_offsets_train_and_the_endpoint_is_pretrained_plus_offset(tower):
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    lin = LinearizedModel(tower, ATTENTION)
    assert {n for n, p in lin.named_parameters() if p.requires_grad} == {f"deltas.{n.replace('.', '/')}" for n in lin.names}
    assert lin.names and all(".attn." in n for n in lin.names)
    opt = torch.optim.SGD([p for p in lin.parameters() if p.requires_grad], lr=1e-3)
    lin(torch.randn(4, 3, 32, 32, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    for k, v in tower.state_dict().items():
        assert torch.equal(v, before[k]), f"{k}: θ_pre changed"
    state = lin.endpoint_state_dict()
    moved = {k for k in state if not torch.equal(state[k], before[k])}
    assert moved == set(lin.names)
    for n, d in lin._tangents().items():
        assert torch.allclose(state[n] - before[n], d.detach(), atol=1e-15)
    for p in tower.parameters():
        p.requires_grad_(True)


def test_refuses_an_empty_trainable_set(tower):
    with pytest.raises(ValueError, match="at least one trainable parameter"):
        LinearizedModel(tower, lambda name: False)
