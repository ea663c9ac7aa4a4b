"""Projection residuals and router probabilities (MASS_SPEC steps 4, 5, 8)."""

from __future__ import annotations

import math

import pytest
import torch

from mass_exp.routing.projection import (
    projection_residuals,
    routing_probabilities,
    stack_bases,
    standardize_scores,
)
from mass_exp.routing.selection import select_tasks


def _orthogonal_bases(d: int, ks: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    out, start = [], 0
    for k in ks:
        out.append(q[:, start : start + k].clone())
        start += k
    return out


def test_residuals_match_brute_force_with_different_ranks():
    bases = _orthogonal_bases(20, [3, 5, 1, 4])
    z = torch.randn(7, 20, dtype=torch.float64)
    r = projection_residuals(z, bases)
    assert r.shape == (7, 4)
    for t, v in enumerate(bases):
        expected = torch.linalg.vector_norm(z - (z @ v) @ v.T, dim=1)
        torch.testing.assert_close(r[:, t], expected)
    # pre-stacked (zero-padded) bases give the same numbers
    torch.testing.assert_close(projection_residuals(z, stack_bases(bases, dtype=torch.float64)), r)


def test_residual_zero_inside_span_and_full_norm_when_orthogonal():
    bases = _orthogonal_bases(12, [4, 4, 4])
    z = (bases[1] @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)).unsqueeze(0)
    r = projection_residuals(z, bases)[0]
    assert r[1].item() == pytest.approx(0.0, abs=1e-10)
    assert r[0].item() == pytest.approx(z.norm().item(), rel=1e-10)
    assert r[2].item() == pytest.approx(z.norm().item(), rel=1e-10)


def test_rejects_row_layout_bases():
    with pytest.raises(ValueError):
        projection_residuals(torch.randn(2, 10), [torch.randn(3, 10)])


def test_mahalanobis_equals_explicit_covariance_form():
    eps = 1e-3
    bases = _orthogonal_bases(10, [3, 2])
    z = torch.randn(4, 10, dtype=torch.float64)
    got = projection_residuals(z, bases, norm="mahalanobis", mahalanobis_eps=eps)
    for t, v in enumerate(bases):
        cov = torch.cov(v) + eps * torch.eye(10, dtype=torch.float64)  # k basis rows as observations
        res = z - (z @ v) @ v.T
        explicit = torch.sqrt(torch.einsum("bd,de,be->b", res, torch.linalg.inv(cov), res))
        torch.testing.assert_close(got[:, t], explicit, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(got[:, t], torch.linalg.vector_norm(res, dim=1) / math.sqrt(eps))


def test_standardisation_uses_sample_std_by_hand():
    # r = [2, 4, 4, 6] -> s = -r = [-2, -4, -4, -6]; mean -4; sample var = (4+0+0+4)/3 = 8/3
    r = torch.tensor([[2.0, 4.0, 4.0, 6.0]], dtype=torch.float64)
    std = math.sqrt(8.0 / 3.0)
    expected_s = [2 / (std + 1e-6), 0.0, 0.0, -2 / (std + 1e-6)]
    torch.testing.assert_close(standardize_scores(-r)[0], torch.tensor(expected_s, dtype=torch.float64))
    exps = [math.exp(v) for v in expected_s]
    expected_p = torch.tensor([e / sum(exps) for e in exps], dtype=torch.float64)
    torch.testing.assert_close(routing_probabilities(r, mode="topk")[0], expected_p)
    torch.testing.assert_close(routing_probabilities(r, mode="top1")[0], expected_p)
    # the population std (sqrt(2)) would give different numbers
    pop = [2 / math.sqrt(2), 0.0, 0.0, -2 / math.sqrt(2)]
    assert abs(routing_probabilities(r)[0, 0].item() - math.exp(pop[0]) / sum(map(math.exp, pop))) > 1e-3


def test_standardisation_epsilon_matters_for_tiny_spread():
    # s = [0, -1e-6, -2e-6]: std = 1e-6, so (s - mean)/(std + 1e-6) = [0.5, 0, -0.5], not [1, 0, -1]
    r = torch.tensor([[0.0, 1e-6, 2e-6]], dtype=torch.float64)
    torch.testing.assert_close(
        standardize_scores(-r)[0], torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64), rtol=1e-9, atol=1e-9
    )


def test_equal_residuals_give_uniform_probabilities():
    r = torch.full((1, 4), 3.0)
    torch.testing.assert_close(routing_probabilities(r), torch.full((1, 4), 0.25))


def test_temperature_divides_standardised_scores():
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    a = 1.0 / (1.0 + 1e-6)
    for temp in (1.0, 0.5):
        exps = [math.exp(a / temp), 1.0, math.exp(-a / temp)]
        expected = torch.tensor([e / sum(exps) for e in exps], dtype=torch.float64)
        torch.testing.assert_close(routing_probabilities(r, temperature=temp)[0], expected)


def test_weighted_mode_has_no_standardisation():
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    exps = [math.exp(-1.0), math.exp(-2.0), math.exp(-3.0)]
    expected = torch.tensor([e / sum(exps) for e in exps], dtype=torch.float64)
    torch.testing.assert_close(routing_probabilities(r, mode="weighted")[0], expected)
    # p = [0.665, 0.245, 0.090] -> {0, 1}
    assert select_tasks(routing_probabilities(r, mode="weighted"), mode="weighted") == [(0, 1)]


def test_single_task_gives_probability_one():
    torch.testing.assert_close(routing_probabilities(torch.tensor([[0.7]])), torch.tensor([[1.0]]))


def test_router_picks_the_subspace_z_is_drawn_from():
    d, k, n_tasks = 48, 6, 5
    bases = _orthogonal_bases(d, [k] * n_tasks, seed=3)
    g = torch.Generator().manual_seed(4)
    for true_t in range(n_tasks):
        coeffs = torch.randn(16, k, generator=g, dtype=torch.float64)
        z = coeffs @ bases[true_t].T + 0.05 * torch.randn(16, d, generator=g, dtype=torch.float64)
        r = projection_residuals(z.float(), [b.float() for b in bases])
        probs = routing_probabilities(r)
        assert (probs.argmax(dim=1) == true_t).all()
        assert select_tasks(probs, mode="top1") == [(true_t,)] * 16
        assert all(true_t in s for s in select_tasks(probs, mode="topk"))
