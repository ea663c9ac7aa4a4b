"""Two-pass MASS inference machinery (MASS_SPEC "MASS" steps 3, 6 and 8), model-agnostic.

Pass 1 features, the router, the expert builder and the pass-2 encoder are injected callables.
Samples are grouped by their task set; each group's expert runs once on that group's images, and
experts are kept across batches in an LRU cache bounded by bytes, whose evicted modules are rebuilt in place.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mass_exp.routing.selection import TaskSet, normalize_task_set, oracle_task_sets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what one cached expert holds)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class ExpertCache:
    """LRU of merged experts keyed by ascending task tuple (step 6), bounded by bytes (and optionally by count).

    ``build_fn(task_set, reuse)`` makes the expert (theta_pre + merge(Omega)); ``reuse`` is an evicted expert's
    module to overwrite in place, or None when a new one must be allocated. The cache holds at most
    ``max_bytes`` of experts (an int, or a callable giving it, resolved at the first request, e.g. from the
    device's free memory) and at most ``max_size`` of them (None: no count cap). Room is made *before* a build:
    the least recently used experts are evicted (and their modules recycled) until the new one fits, so the
    experts alive never exceed the budget; a budget that cannot hold one expert is an error. ``expert_bytes`` is
    one expert's size (default: measured on the first one built). ``max_size=0`` disables caching: every request
    builds, into one reused module. An expert returned by :meth:`get` is valid until the next :meth:`get`.
    Counts hits, misses, builds, evictions, seconds spent building and the peak bytes held.
    """

    def __init__(self, build_fn: Callable[[TaskSet, nn.Module | None], nn.Module], max_size: int | None = None, *,
                 max_bytes: int | Callable[[], int] | None = None, expert_bytes: int | None = None) -> None:
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size}")
        if isinstance(max_bytes, (int, float)) and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.build_fn = build_fn
        self.max_size = None if max_size is None else int(max_size)
        self._max_bytes_spec = max_bytes
        self.max_bytes: int | None = int(max_bytes) if isinstance(max_bytes, (int, float)) else None
        self.expert_bytes = int(expert_bytes) if expert_bytes else None
        self._cache: OrderedDict[TaskSet, nn.Module] = OrderedDict()
        self._sizes: dict[TaskSet, int] = {}
        self._spare: nn.Module | None = None  # max_size=0: the one module every build reuses
        self.hits = 0
        self.misses = 0
        self.builds = 0
        self.evictions = 0
        self.build_time_s = 0.0
        self.bytes = 0
        self.peak_bytes = 0
        if self.max_bytes is not None and self.expert_bytes is not None:
            self._check_fits(self.expert_bytes)

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, task_set: Sequence[int]) -> bool:
        return normalize_task_set(task_set) in self._cache

    def keys(self) -> list[TaskSet]:
        """Cached keys, least recently used first."""
        return list(self._cache)

    def _resolve_budget(self) -> None:
        if self.max_bytes is None and callable(self._max_bytes_spec):
            self.max_bytes = max(0, int(self._max_bytes_spec()))

    def _check_fits(self, nbytes: int) -> None:
        if self.max_bytes is not None and nbytes > self.max_bytes and self.max_size != 0:
            raise ValueError(
                f"the expert cache budget ({self.max_bytes / 2**30:.3f} GiB) cannot hold one expert "
                f"({nbytes / 2**30:.3f} GiB): raise router.expert_cache_gb")

    def capacity(self) -> int | None:
        """How many experts fit (None: not known yet / unbounded)."""
        caps = []
        if self.max_size is not None:
            caps.append(self.max_size)
        if self.max_bytes is not None and self.expert_bytes:
            caps.append(self.max_bytes // self.expert_bytes)
        return min(caps) if caps else None

    def _evict_one(self) -> nn.Module:
        key, module = self._cache.popitem(last=False)
        self.bytes -= self._sizes.pop(key)
        self.evictions += 1
        return module

    def _make_room(self, nbytes: int) -> nn.Module | None:
        """Evict LRU experts until one more of ``nbytes`` fits; the last evicted module is returned for reuse."""
        reuse = None
        while self._cache and (
            (self.max_size is not None and len(self._cache) + 1 > self.max_size)
            or (self.max_bytes is not None and self.bytes + nbytes > self.max_bytes)
        ):
            reuse = self._evict_one()
        return reuse

    def get(self, task_set: Sequence[int]) -> nn.Module:
        """The expert for ``task_set``, building it on a miss (after evicting LRU experts to make room)."""
        key = normalize_task_set(task_set)
        if key in self._cache:
            self.hits += 1
            self._cache.move_to_end(key)
            return self._cache[key]
        self.misses += 1
        self._resolve_budget()
        caching = self.max_size != 0
        if caching:
            estimate = self.expert_bytes or 0
            if estimate:
                self._check_fits(estimate)
            reuse = self._make_room(estimate)
        else:
            reuse = self._spare
        start = time.perf_counter()
        with torch.no_grad():
            expert = self.build_fn(key, reuse)
        param = next(expert.parameters(), None)
        if param is not None:
            _sync(param.device)
        self.build_time_s += time.perf_counter() - start
        self.builds += 1
        nbytes = module_nbytes(expert)
        if self.expert_bytes is None:
            self.expert_bytes = nbytes
        if not caching:
            self._spare = expert
            self.peak_bytes = max(self.peak_bytes, nbytes)
            return expert
        self._check_fits(nbytes)
        self._make_room(nbytes)  # only when the expert is larger than estimated
        self._cache[key] = expert
        self._sizes[key] = nbytes
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return expert

    def clear(self) -> None:
        """Drop every cached expert (counters are kept)."""
        self._cache.clear()
        self._sizes.clear()
        self._spare = None
        self.bytes = 0

    def stats(self) -> dict[str, float | int | None]:
        """Counters for results.json."""
        return {
            "hits": self.hits, "misses": self.misses, "builds": self.builds,
            "evictions": self.evictions, "build_time_s": self.build_time_s,
            "size": len(self._cache), "max_size": self.max_size, "capacity": self.capacity(),
            "bytes": self.bytes, "peak_bytes": self.peak_bytes, "max_bytes": self.max_bytes,
            "expert_bytes": self.expert_bytes,
        }


@dataclass
class TwoPassTimings:
    """Wall-clock seconds per stage of one batch (CUDA-synchronised at stage boundaries)."""

    pass1_s: float = 0.0
    routing_s: float = 0.0
    expert_build_s: float = 0.0
    pass2_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.pass1_s + self.routing_s + self.expert_build_s + self.pass2_s


@dataclass
class TwoPassOutput:
    """Result of :func:`two_pass_forward` for one batch."""

    task_sets: list[TaskSet]  # Omega per sample, ascending
    embeddings: Tensor  # [B, E] pass-2 embeddings, L2-normalised
    groups: dict[TaskSet, Tensor]  # Omega -> sample indices (ascending) run through that expert
    timings: TwoPassTimings = field(default_factory=TwoPassTimings)
    probs: Tensor | None = None  # router probabilities [B, T] when the router gives them
    residuals: Tensor | None = None  # projection residuals [B, T] when the router gives them


def group_by_task_set(task_sets: Sequence[TaskSet]) -> dict[TaskSet, list[int]]:
    """Omega -> sample indices, keys sorted, indices ascending."""
    groups: dict[TaskSet, list[int]] = {}
    for i, s in enumerate(task_sets):
        groups.setdefault(s, []).append(i)
    return {k: groups[k] for k in sorted(groups)}


def two_pass_forward(
    images: Tensor,
    task_ids_true: Tensor | None,
    first_pass_features: Callable[[Tensor], Tensor] | None,
    route: Callable[[Tensor], object] | None,
    experts: ExpertCache,
    encode: Callable[[nn.Module, Tensor], Tensor],
    oracle_routing: bool = False,
) -> TwoPassOutput:
    """Route each sample, run each distinct expert once on its group, scatter back (steps 3, 6, 8).

    ``first_pass_features(images) -> z [B, D]`` (pass 1 on theta_MT up to the routing block);
    ``route(z)`` returns a list of B task sets or an object with ``task_sets`` (and optionally
    ``probs`` / ``residuals``, e.g. :class:`~mass_exp.routing.router.RoutingDecision`);
    ``encode(expert, images) -> [b, E]``. With ``oracle_routing`` Omega = {true task} and pass 1 is
    skipped. No per-sample model copies are made: one expert per distinct Omega.
    """
    n = images.shape[0]
    device = images.device
    timings = TwoPassTimings()
    probs = residuals = None
    with torch.no_grad():
        if oracle_routing:
            if task_ids_true is None:
                raise ValueError("oracle routing needs task_ids_true")
            task_sets = oracle_task_sets(task_ids_true)
        else:
            if first_pass_features is None or route is None:
                raise ValueError("first_pass_features and route are required unless oracle_routing")
            _sync(device)
            t0 = time.perf_counter()
            z = first_pass_features(images)
            _sync(device)
            t1 = time.perf_counter()
            with torch.autocast(device_type=z.device.type, enabled=False):  # routing math in float32
                decision = route(z.float())
            t2 = time.perf_counter()
            timings.pass1_s, timings.routing_s = t1 - t0, t2 - t1
            raw = getattr(decision, "task_sets", decision)
            probs = getattr(decision, "probs", None)
            residuals = getattr(decision, "residuals", None)
            task_sets = [normalize_task_set(s) for s in raw]  # type: ignore[union-attr]
        if len(task_sets) != n:
            raise ValueError(f"router returned {len(task_sets)} task sets for {n} samples")

        groups = group_by_task_set(task_sets)
        out: Tensor | None = None
        group_idx: dict[TaskSet, Tensor] = {}
        for key, members in groups.items():
            idx = torch.tensor(members, dtype=torch.long, device=device)
            group_idx[key] = idx.cpu()
            build_before = experts.build_time_s
            t0 = time.perf_counter()
            expert = experts.get(key)
            t1 = time.perf_counter()
            emb = encode(expert, images.index_select(0, idx))
            emb = F.normalize(emb.float(), dim=-1)
            _sync(device)
            t2 = time.perf_counter()
            build = experts.build_time_s - build_before
            timings.expert_build_s += build
            timings.routing_s += max(0.0, (t1 - t0) - build)  # cache lookup overhead
            timings.pass2_s += t2 - t1
            if out is None:
                out = torch.empty(n, emb.shape[1], dtype=emb.dtype, device=emb.device)
            out.index_copy_(0, idx.to(emb.device), emb)
    assert out is not None
    return TwoPassOutput(task_sets, out, group_idx, timings, probs, residuals)
