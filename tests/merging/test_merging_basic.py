from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from merging_helpers import make_endpoints

from mass_exp.merging import get_merger
from mass_exp.merging.basic import finetuned, task_arithmetic, weight_average, zeroshot


def test_zeroshot_is_pretrained(endpoints):
    pre, fts = endpoints
    out = zeroshot(pre, fts)
    assert out.keys() == pre.keys()
    for k in pre:
        assert torch.equal(out[k], pre[k])
        assert out[k] is not pre[k]


def test_finetuned_returns_endpoint(endpoints):
    pre, fts = endpoints
    out = finetuned(pre, fts, task=1)
    for k in pre:
        assert torch.equal(out[k], fts[1][k])
    half = finetuned(pre, fts, task=1, alpha=0.5)
    k = "proj"
    assert torch.allclose(half[k], pre[k] + 0.5 * (fts[1][k] - pre[k]), atol=1e-6)
    with pytest.raises(ValueError, match="task must be"):
        finetuned(pre, fts, task=3)


def test_task_arithmetic_known_answer(endpoints):
    pre, fts = endpoints
    out = task_arithmetic(pre, fts, alpha=0.3)
    for k in pre:
        expected = pre[k] + 0.3 * sum(ft[k] - pre[k] for ft in fts)
        assert torch.allclose(out[k], expected, atol=1e-5), k


def test_weight_average_equals_task_arithmetic_with_alpha_one_over_t(endpoints):
    pre, fts = endpoints
    wa = weight_average(pre, fts)
    ta = task_arithmetic(pre, fts, alpha=1.0 / len(fts))
    for k in pre:
        assert torch.allclose(wa[k], ta[k], atol=1e-6)
        mean_ep = sum(ft[k] for ft in fts) / len(fts)
        assert torch.allclose(wa[k], mean_ep, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(num_tasks=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_weight_average_is_task_arithmetic_over_t_property(num_tasks, seed):
    pre, fts = make_endpoints(num_tasks, seed=seed, width=4, layers=1)
    wa = weight_average(pre, fts)
    ta = task_arithmetic(pre, fts, alpha=1.0 / num_tasks)
    assert all(torch.allclose(wa[k], ta[k], atol=1e-6) for k in pre)


def test_dtype_preserved_and_float32_math():
    pre, fts = make_endpoints(2, dtype=torch.float16)
    out = task_arithmetic(pre, fts, alpha=0.5)
    for k in pre:
        assert out[k].dtype == torch.float16
        exp = (pre[k].float() + 0.5 * sum(ft[k].float() - pre[k].float() for ft in fts)).half()
        assert torch.equal(out[k], exp)


def test_missing_key_is_named(endpoints):
    pre, fts = endpoints
    broken = dict(fts[1])
    del broken["ln_post.bias"]
    with pytest.raises(ValueError, match=r"endpoint 1 is missing key 'ln_post.bias'"):
        task_arithmetic(pre, [fts[0], broken])
    extra = dict(fts[0])
    extra["visual.proj"] = extra["proj"]
    with pytest.raises(ValueError, match=r"unexpected key 'visual.proj'"):
        task_arithmetic(pre, [extra])
    bad = dict(fts[0])
    bad["proj"] = bad["proj"].T
    with pytest.raises(ValueError, match=r"key 'proj' has shape"):
        task_arithmetic(pre, [bad])


def test_alpha_none_means_default(endpoints):
    pre, fts = endpoints
    a = task_arithmetic(pre, fts, alpha=None)
    b = task_arithmetic(pre, fts, alpha=1.0)
    assert all(torch.equal(a[k], b[k]) for k in pre)


def test_registry_flags():
    assert get_merger("finetuned").per_task
    assert not get_merger("task_arithmetic").per_task
