"""RoutedPredictor's expert cache with the real in-place TSV-M builder (issue 14): results do not depend on it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mass_exp.evaluation.predictors import RoutedPredictor, embed
from mass_exp.merging.factors import build_factor_store
from mass_exp.merging.tsv import TSVExpertBuilder, tsv_merge_from_factors
from mass_exp.routing import RouterConfig, two_pass_forward
from mass_exp.routing.two_pass import module_nbytes

SETS = [(0,), (1, 2), (0, 2), (2,), (0, 1, 2), (1,), (0, 1)]


class CyclingRouter:
    """Stand-in router: sample i of call c gets SETS[(c + i) % len(SETS)] (many distinct experts per batch)."""

    def __init__(self):
        self.calls = 0

    def to(self, device):
        return self

    def __call__(self, z):
        sets = [SETS[(self.calls + i) % len(SETS)] for i in range(z.shape[0])]
        self.calls += 1
        return sets


@pytest.fixture()
def routed_parts(tiny_visual):
    pre = {n: t.detach().clone() for n, t in tiny_visual.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    fts = [{n: v + 0.02 * torch.randn(v.shape, generator=g) for n, v in pre.items()} for _ in range(3)]
    store = build_factor_store(pre, fts, progress=False)
    heads = [nn.functional.normalize(torch.randn(4, 32, generator=g), dim=-1) * 50 for _ in range(3)]
    batches = [(torch.randn(5, 3, 32, 32, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(4)]
    return tiny_visual, pre, store, heads, batches


def _predictor(parts, **cache):
    visual, pre, store, heads, _ = parts
    builder = TSVExpertBuilder(pre, store, alpha=1.0)
    first = copy.deepcopy(visual).eval()
    return RoutedPredictor(first, heads, CyclingRouter(), lambda s, out: builder.build(s, out=out),
                           copy.deepcopy(visual).eval(), RouterConfig(block=2), **cache).eval()


def test_results_identical_with_one_expert_and_a_large_cache(routed_parts):
    *_, batches = routed_parts
    one_gb = module_nbytes(routed_parts[0]) * 1.5 / 2**30
    small = _predictor(routed_parts, cache_gb=one_gb)  # room for one expert: every new Ω evicts
    large = _predictor(routed_parts, cache_gb=1.0)
    outs = []
    for pred in (small, large):
        per_batch = []
        for task, (images, labels) in enumerate(batches):
            p = pred.predict(images, task % 3, labels)
            out = two_pass_forward(images, None, pred._features, pred.router, pred.experts, embed)
            per_batch.append((p, out.embeddings, out.task_sets))
        outs.append(per_batch)
    for (pa, ea, sa), (pb, eb, sb) in zip(*outs):
        assert sa == sb
        assert torch.equal(ea, eb)
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    s, lg = small.experts.stats(), large.experts.stats()
    assert s["capacity"] == 1 and s["evictions"] > 0 and s["peak_bytes"] <= s["max_bytes"]
    assert lg["evictions"] == 0 and lg["builds"] == len(SETS) and lg["peak_bytes"] == len(SETS) * lg["expert_bytes"]
    assert s["builds"] > lg["builds"] and s["hits"] + s["misses"] == lg["hits"] + lg["misses"]


def test_in_place_experts_equal_a_fresh_merge(routed_parts):
    visual, pre, store, _, batches = routed_parts
    pred = _predictor(routed_parts, cache_gb=1.0, cache_size=2)
    images = batches[0][0]
    for key in SETS:  # cache size 2: modules are recycled and rebuilt in place
        expert = pred.experts.get(key)
        ref = copy.deepcopy(visual).eval()
        ref.load_state_dict(tsv_merge_from_factors(pre, store, list(key)))
        torch.testing.assert_close(embed(expert, images), embed(ref, images), rtol=0, atol=1e-5)
    assert pred.experts.stats()["evictions"] == len(SETS) - 2


def test_budget_that_cannot_hold_an_expert_is_an_error(routed_parts):
    pred = _predictor(routed_parts, cache_gb=1e-6)
    images, labels = routed_parts[-1][0]
    with pytest.raises(ValueError, match="router.expert_cache_gb"):
        pred.predict(images, 0, labels)
    assert pred.experts.builds == 0


def test_default_budget_is_a_share_of_free_memory(routed_parts, monkeypatch):
    import mass_exp.utils.memory as memory

    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 8 * 2**30)
    pred = _predictor(routed_parts, cache_free_fraction=0.25)
    pred.experts.get((0,))
    assert pred.experts.max_bytes == 2 * 2**30


def test_builds_and_routing_stay_float32_under_autocast(routed_parts):
    """eval.precision=bf16 runs the forward passes under autocast; merges, builds and routing must not be."""
    *_, batches = routed_parts
    ref = _predictor(routed_parts, cache_gb=1.0)
    mixed = _predictor(routed_parts, cache_gb=1.0)
    a = ref.experts.get((0, 2)).state_dict()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = mixed.experts.get((0, 2)).state_dict()
    assert all(b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)


def test_bf16_evaluation_through_lightning(routed_parts):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from mass_exp.evaluation.module import EvaluationModule

    *_, batches = routed_parts
    loaders = [DataLoader(TensorDataset(images, labels), batch_size=5) for images, labels in batches[:2]]
    accs = {}
    for precision in ("32-true", "bf16-mixed"):
        module = EvaluationModule(_predictor(routed_parts, cache_gb=1.0), ["a", "b"])
        L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                  enable_model_summary=False).test(module, dataloaders=loaders, verbose=False)
        accs[precision] = module.results
    for name in ("a", "b"):
        assert accs["bf16-mixed"][name]["samples"] == accs["32-true"][name]["samples"] == 5
        assert abs(accs["bf16-mixed"][name]["router_mean_tasks"] - accs["32-true"][name]["router_mean_tasks"]) < 1e-9
