"""Expert cache and the two-pass forward: grouping, scatter-back, mixed batch = per-sample (steps 6, 8)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mass_exp.models.vit_hooks import first_pass_fn, routing_features
from mass_exp.routing import (
    ExpertCache,
    ProjectionRouter,
    RouterConfig,
    paper_rule_correct,
    select_prediction,
    two_pass_forward,
)


class _Counter:
    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, key, reuse=None):
        self.calls.append(key)
        return nn.Linear(2, 2)


def test_expert_cache_lru():
    build = _Counter()
    cache = ExpertCache(build, max_size=2)
    a = cache.get((0,))
    cache.get((1, 0))  # normalised to (0, 1)
    assert cache.get((0,)) is a  # hit, (0,) becomes most recent
    cache.get((2,))  # evicts (0, 1), the least recently used
    assert cache.keys() == [(0,), (2,)]
    assert (0, 1) not in cache and (0,) in cache
    cache.get((0, 1))  # rebuilt, evicts (0,)
    assert build.calls == [(0,), (0, 1), (2,), (0, 1)]
    s = cache.stats()
    assert (s["hits"], s["misses"], s["builds"], s["evictions"], s["size"]) == (1, 4, 4, 2, 2)
    assert s["build_time_s"] >= 0.0
    cache.clear()
    assert len(cache) == 0


def test_expert_cache_size_zero_never_caches():
    build = _Counter()
    cache = ExpertCache(build, max_size=0)
    cache.get((1,))
    cache.get((1,))
    assert build.calls == [(1,), (1,)] and len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError):
        ExpertCache(build, max_size=-1)


def _perturbed_builder(base: nn.Module):
    """Stand-in for theta_pre + tsv_m(Omega): a copy of the base with weights perturbed per task set."""

    def build(key, reuse=None):
        expert = copy.deepcopy(base)
        g = torch.Generator().manual_seed(1000 + sum((t + 1) * 31**i for i, t in enumerate(key)))
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return expert

    return build


def _encode(model, x):
    return model(x)


@pytest.fixture()
def mixed_setup(tiny_visual, images):
    block = 2
    z = routing_features(tiny_visual, images, block)
    # endpoint-free bases: task t < 3 spans the pass-1 features of samples t and t+3, task 3 those of
    # samples 0 and 1, so samples 0 and 1 route to two tasks each
    pairs = [(0, 3), (1, 4), (2, 5), (0, 1)]
    bases = [torch.linalg.qr(torch.stack([z[a], z[b]], dim=1))[0] for a, b in pairs]
    router = ProjectionRouter(bases, RouterConfig(block=block))
    g = torch.Generator().manual_seed(7)
    heads = {t: 100 * nn.functional.normalize(torch.randn(4 + t, 32, generator=g), dim=-1) for t in range(4)}
    return block, router, heads, bases


def test_mixed_batch_equals_each_sample_alone(tiny_visual, images, mixed_setup):
    block, router, heads, _ = mixed_setup
    build = _perturbed_builder(tiny_visual)
    cache = ExpertCache(build, max_size=8)
    feats = first_pass_fn(tiny_visual, block)

    out = two_pass_forward(images, None, feats, router, cache, _encode)
    assert out.task_sets == [(0, 3), (1, 3), (2,), (0,), (1,), (2,)]
    assert sorted(out.groups) == [(0,), (0, 3), (1,), (1, 3), (2,)]
    assert out.groups[(2,)].tolist() == [2, 5]
    assert cache.builds == len(out.groups)  # one expert per distinct Omega, no per-sample copies
    assert sorted(torch.cat(list(out.groups.values())).tolist()) == list(range(6))
    assert out.probs.shape == (6, 4) and out.residuals.shape == (6, 4)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(6))
    assert out.timings.pass1_s > 0 and out.timings.pass2_s > 0 and out.timings.expert_build_s > 0

    pred_batch = select_prediction(out.embeddings, heads, out.task_sets)
    builds_before = cache.builds
    for i in range(6):
        single = two_pass_forward(images[i : i + 1], None, feats, router, cache, _encode)
        assert single.task_sets == [out.task_sets[i]]
        torch.testing.assert_close(single.embeddings[0], out.embeddings[i], rtol=0, atol=1e-5)
        # the embedding is the expert's own output for that sample
        direct = nn.functional.normalize(build(out.task_sets[i])(images[i : i + 1]), dim=-1)[0]
        torch.testing.assert_close(out.embeddings[i], direct, rtol=0, atol=1e-5)
        pt, pc = select_prediction(single.embeddings, heads, single.task_sets)
        assert (pt.item(), pc.item()) == (pred_batch[0][i].item(), pred_batch[1][i].item())
    assert cache.builds == builds_before  # all cache hits
    assert cache.hits == 6


def test_group_embeddings_differ_by_expert(tiny_visual, images, mixed_setup):
    block, router, _, _ = mixed_setup
    cache = ExpertCache(_perturbed_builder(tiny_visual), max_size=8)
    out = two_pass_forward(images, None, first_pass_fn(tiny_visual, block), router, cache, _encode)
    base = nn.functional.normalize(tiny_visual(images), dim=-1)
    assert not torch.allclose(out.embeddings, base, atol=1e-4)


def test_oracle_routing_skips_pass_one(tiny_visual, images):
    def boom(_):
        raise AssertionError("pass 1 must not run under oracle routing")

    cache = ExpertCache(_perturbed_builder(tiny_visual), max_size=4)
    true = torch.tensor([2, 0, 2, 1, 0, 0])
    out = two_pass_forward(images, true, boom, boom, cache, _encode, oracle_routing=True)
    assert out.task_sets == [(2,), (0,), (2,), (1,), (0,), (0,)]
    assert sorted(out.groups) == [(0,), (1,), (2,)]
    assert out.groups[(0,)].tolist() == [1, 4, 5]
    assert out.timings.pass1_s == 0.0 and out.probs is None


def test_batched_router_runs_one_expert(tiny_visual, images, mixed_setup):
    block, _, _, bases = mixed_setup
    batched = ProjectionRouter(bases, RouterConfig(block=block, batched=True))
    cache = ExpertCache(_perturbed_builder(tiny_visual), max_size=4)
    out = two_pass_forward(images, None, first_pass_fn(tiny_visual, block), batched, cache, _encode)
    assert len(out.groups) == 1 and cache.builds == 1
    assert len(set(out.task_sets)) == 1 and len(out.task_sets[0]) == 1


def test_plain_list_router_and_length_check(tiny_visual, images):
    cache = ExpertCache(_perturbed_builder(tiny_visual), max_size=4)
    feats = first_pass_fn(tiny_visual, 1)
    out = two_pass_forward(images, None, feats, lambda z: [(1, 0)] * z.shape[0], cache, _encode)
    assert out.task_sets == [(0, 1)] * 6 and out.probs is None
    with pytest.raises(ValueError):
        two_pass_forward(images, None, feats, lambda z: [(0,)], cache, _encode)


def test_paper_rule_on_two_pass_output(tiny_visual, images, mixed_setup):
    block, router, heads, _ = mixed_setup
    cache = ExpertCache(_perturbed_builder(tiny_visual), max_size=8)
    out = two_pass_forward(images, None, first_pass_fn(tiny_visual, block), router, cache, _encode)
    true = torch.tensor([0, 1, 2, 0, 1, 2])
    labels = torch.zeros(6, dtype=torch.long)
    task, cls = select_prediction(out.embeddings, heads, out.task_sets)
    strict = (task == true) & (cls == labels)
    loose = paper_rule_correct(out.embeddings, heads, out.task_sets, true, labels)
    assert bool((loose | ~strict).all())  # anything strictly correct is correct under the paper rule


class _Sized:
    """Builds a Linear(n, 1) per task set (n from the task set, so sizes differ), recording reuse."""

    def __init__(self, width=lambda key: 10):
        self.width = width
        self.calls: list[tuple[tuple[int, ...], bool]] = []

    def __call__(self, key, reuse=None):
        self.calls.append((key, reuse is not None))
        return nn.Linear(self.width(key), 1, bias=False)  # 4 * width bytes


def test_byte_budget_evicts_lru_first_and_recycles_modules():
    build = _Sized()
    cache = ExpertCache(build, max_bytes=100, expert_bytes=40)  # two experts of 40 B fit in 100 B
    assert cache.capacity() == 2
    a = cache.get((0,))
    cache.get((1,))
    assert cache.get((0,)) is a  # hit: (0,) most recent, (1,) least
    cache.get((2,))  # evicts (1,), its module is handed to the build
    assert cache.keys() == [(0,), (2,)]
    assert build.calls == [((0,), False), ((1,), False), ((2,), True)]
    cache.get((3,))  # evicts (0,)
    assert cache.keys() == [(2,), (3,)]
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["bytes"], s["peak_bytes"]) == (1, 4, 2, 80, 80)
    assert s["max_bytes"] == 100 and s["expert_bytes"] == 40


def test_count_cap_is_an_extra_bound():
    cache = ExpertCache(_Sized(), max_size=1, max_bytes=1000, expert_bytes=40)
    assert cache.capacity() == 1
    for key in [(0,), (1,), (0,)]:
        cache.get(key)
    assert cache.keys() == [(0,)] and cache.evictions == 2 and cache.peak_bytes == 40


def test_byte_budget_never_exceeded_with_experts_of_different_sizes():
    g = torch.Generator().manual_seed(0)
    widths = {}

    def width(key):
        return widths.setdefault(key, int(torch.randint(1, 30, (1,), generator=g)))

    budget = 200
    cache = ExpertCache(_Sized(width), max_bytes=budget, expert_bytes=None)
    order = [(int(t),) for t in torch.randint(0, 12, (200,), generator=g)]
    last_use: dict[tuple[int, ...], int] = {}
    for i, key in enumerate(order):
        before = cache.keys()
        cache.get(key)
        last_use[key] = i
        assert cache.bytes <= budget and cache.peak_bytes <= budget
        assert cache.bytes == sum(4 * widths[k] for k in cache.keys())
        evicted = [k for k in before if k not in cache.keys()]
        kept = [k for k in before if k in cache.keys() and k != key]
        # least recently used first: every evicted expert was used before every kept one
        assert all(last_use[e] < last_use[k] for e in evicted for k in kept)
    assert cache.evictions > 0


def test_budget_below_one_expert_is_an_error_before_any_build():
    build = _Sized()
    with pytest.raises(ValueError, match="expert_cache_gb"):
        ExpertCache(build, max_bytes=30, expert_bytes=40)
    lazy = ExpertCache(build, max_bytes=lambda: 30, expert_bytes=40)  # resolved at the first request
    with pytest.raises(ValueError, match="cannot hold one expert"):
        lazy.get((0,))
    assert build.calls == []  # nothing was built
    assert lazy.max_bytes == 30
