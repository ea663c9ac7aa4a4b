"""The per-rank sampler: an exact partition of every task's samples, no padding, whatever the sizes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mass_exp.evaluation.sampling import RankShardSampler, shard_indices, shard_loader


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 10, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8, 16])
def test_shards_partition_without_padding(n, world_size):
    shards = [list(RankShardSampler(n, r, world_size)) for r in range(world_size)]
    flat = [i for s in shards for i in s]
    assert len(flat) == n  # no padding: nothing repeated to even out the ranks
    assert sorted(flat) == list(range(n))  # disjoint and covering
    for r, s in enumerate(shards):
        assert s == list(range(r, n, world_size))  # rank r: r, r + W, r + 2W, ...
        assert len(RankShardSampler(n, r, world_size)) == len(s)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    if world_size > n:  # more ranks than samples: the extra ranks get nothing
        assert sizes == [1] * n + [0] * (world_size - n)


def test_odd_size_two_ranks():
    assert list(shard_indices(101, 0, 2)) == list(range(0, 101, 2)) and len(shard_indices(101, 0, 2)) == 51
    assert list(shard_indices(101, 1, 2)) == list(range(1, 101, 2)) and len(shard_indices(101, 1, 2)) == 50


@pytest.mark.parametrize("rank,world_size", [(-1, 2), (2, 2), (0, 0)])
def test_bad_rank_is_refused(rank, world_size):
    with pytest.raises(ValueError):
        shard_indices(10, rank, world_size)


def _loader(n: int, batch_size: int = 4) -> DataLoader:
    ds = TensorDataset(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3), torch.arange(n))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def test_shard_loader_yields_each_sample_once():
    loader = _loader(11)
    seen = []
    batches = []
    for r in range(3):
        dl = shard_loader(loader, r, 3)
        labels = [b[1] for b in dl]
        batches.append(len(labels))
        assert len(dl) == len(labels)
        seen += torch.cat(labels).tolist()
    assert sorted(seen) == list(range(11)) and len(seen) == 11
    assert batches == [1, 1, 1]  # 4, 4, 3 samples at batch size 4: uneven shards, no padding
    assert [len(shard_loader(_loader(11, 2), r, 3).sampler) for r in range(3)] == [4, 4, 3]


def test_one_rank_is_the_loader_itself():
    loader = _loader(5)
    assert shard_loader(loader, 0, 1) is loader


def test_empty_shard_is_one_empty_batch():
    """A rank with no sample of a task still runs one (empty) batch of it, so it takes part in every sync."""
    loader = _loader(2)
    dl = shard_loader(loader, 3, 4)
    assert len(dl) == 1
    (batch,) = list(dl)
    images, labels = batch
    assert images.shape == (0, 3) and images.dtype == torch.float32
    assert labels.shape == (0,) and labels.dtype == torch.long
    # an empty dataset stays empty on every rank (Lightning then skips the task on all ranks alike)
    assert len(shard_loader(_loader(0), 1, 4)) == 0


def test_shard_loader_keeps_workers():
    ds = _loader(5).dataset
    loader = DataLoader(ds, batch_size=2, num_workers=1, shuffle=False)
    full = shard_loader(loader, 1, 2)
    assert full.num_workers == 1 and torch.cat([b[1] for b in full]).tolist() == [1, 3]
    empty = shard_loader(DataLoader(torch.utils.data.Subset(ds, [0, 1]), batch_size=2, num_workers=1), 2, 3)
    assert empty.num_workers == 1 and [len(b[1]) for b in empty] == [0]
