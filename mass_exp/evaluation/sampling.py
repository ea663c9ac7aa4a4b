"""Exact sharding of the evaluation data over the ranks of a distributed run (no sample repeated or dropped).

Lightning's default `DistributedSampler` pads every rank to the same length by repeating samples when a task's size
is not divisible by the world size; per-task accuracies would then count some images twice. Instead rank r of W
sees the indices r, r + W, r + 2W, ... of each task (`RankShardSampler`): every sample exactly once, ranks may get
different numbers of batches. The Trainer runs with `use_distributed_sampler=False`, and the loaders are sharded in
`ShardedTestData.test_dataloader()`, which Lightning calls after the strategy is set up (and, under
`strategy=ddp`, after it has launched the other processes), so `trainer.global_rank` / `trainer.world_size` are
known there, on one device, several GPUs or several nodes alike.

A rank that has no sample of a task (W larger than the task) gets one *empty* batch of it instead of an empty
loader: Lightning refuses zero-length loaders on one rank only, and skips the whole test epoch (with its end-of-epoch
metric synchronisation, a collective every rank must join) on a rank whose loaders are all empty.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The indices of `range(n)` that rank `rank` of `world_size` evaluates: rank, rank + W, rank + 2W, ..."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return range(rank, n, world_size)


class RankShardSampler(Sampler[int]):
    """Strided, unpadded shard of `range(n)` for one rank; the shards of all ranks partition `range(n)`."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world_size = int(n), int(rank), int(world_size)
        self.indices = shard_indices(self.n, self.rank, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _empty_like(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _empty_like(v) for k, v in batch.items()}
    raise TypeError(f"cannot build an empty batch from a {type(batch).__name__}")


class _EmptyBatch:
    """collate_fn of the one-empty-batch loader (a class, not a lambda, so worker processes can pickle it)."""

    def __init__(self, template: Any):
        self.template = template

    def __call__(self, samples: list) -> Any:
        return self.template


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """`loader` restricted to rank `rank`'s shard (the loader itself when there is one rank).

    Keeps the dataset, batch size, workers and collate function; never shuffles, never drops or repeats a sample.
    An empty shard of a non-empty dataset becomes one empty batch (see the module docstring).
    """
    if world_size == 1:
        return loader
    dataset = loader.dataset
    n = len(dataset)  # type: ignore[arg-type]  # map-style datasets have a length
    common: dict[str, Any] = {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory}
    if loader.num_workers > 0:
        common.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor,
                      worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context)
    sampler = RankShardSampler(n, rank, world_size)
    if len(sampler) == 0 and n > 0:
        template = _empty_like(loader.collate_fn([dataset[0]]))
        return DataLoader(dataset, batch_sampler=[[]], collate_fn=_EmptyBatch(template), **common)
    return DataLoader(dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=False,
                      collate_fn=loader.collate_fn, **common)


class ShardedTestData(L.LightningDataModule):
    """The test loaders of one `Trainer.test` (one per task), sharded for the rank that asks for them."""

    def __init__(self, loaders: Sequence[DataLoader]):
        super().__init__()
        self.loaders = list(loaders)

    def test_dataloader(self) -> list[DataLoader]:
        trainer = self.trainer
        assert trainer is not None, "ShardedTestData is used through Trainer.test(datamodule=...)"
        rank, world_size = trainer.global_rank, trainer.world_size
        return [shard_loader(dl, rank, world_size) for dl in self.loaders]


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_rank() -> int:
    """This process's rank in the default process group (0 when not distributed).

    The process group exists once the first `Trainer.test` of a distributed run has started and stays for the rest
    of the process, so every rank-0-only write after an evaluation asks this."""
    return torch.distributed.get_rank() if distributed() else 0


def is_rank_zero() -> bool:
    return global_rank() == 0


def from_rank_zero(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a broadcast when distributed, `obj` itself otherwise)."""
    if not distributed() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
