"""The MASS factor store (MASS_SPEC "MASS" step 1): rank-k truncated SVD factors of every matrix task vector.

For every task t and matrix parameter Δ = τ_t[name] ∈ R^{m×n} the store keeps U_t (m×k), σ_t (k) and V_t (n×k)
with k = max(1, floor(min(m, n) / T)) by default; vector-parameter deltas are kept in full. Building reads the
endpoints one parameter at a time, so memory does not grow with T; with an output path the factors are streamed
straight into a safetensors file (written atomically) and the returned store memory-maps it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mass_exp.merging.task_vectors import (
    LazyStateDict,
    StateDict,
    StreamingSafetensorsWriter,
    check_endpoints,
    is_matrix_param,
    param_dtype,
    param_shape,
)
from mass_exp.utils.io import file_sha256

__all__ = [
    "FORMAT",
    "FactorStore",
    "build_factor_store",
    "factor_cache_key",
    "file_sha256",
    "load_or_build_factor_store",
    "rank_rule",
    "resolve_rank",
    "truncated_svd",
]

log = logging.getLogger(__name__)

FORMAT = "mass-exp-factors/1"
SVD_METHODS = ("exact", "randomized")


# --------------------------------------------------------------------------------------------------------------
# rank rule and truncated SVD


def resolve_rank(
    shape: Sequence[int], num_tasks: int, rank: int | None = None, rank_fraction: float | None = None
) -> int:
    """k for one matrix: ``rank`` (capped at min(m, n)), else max(1, floor(rank_fraction·min(m, n))),
    else the spec default max(1, floor(min(m, n) / T))."""
    r = min(int(shape[0]), int(shape[1]))
    if rank is not None and rank_fraction is not None:
        raise ValueError("give at most one of rank and rank_fraction")
    if rank is not None:
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        return min(int(rank), r)
    if rank_fraction is not None:
        if not 0.0 < float(rank_fraction) <= 1.0:
            raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction}")
        return max(1, min(r, math.floor(float(rank_fraction) * r)))
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    return max(1, r // num_tasks)


def rank_rule(rank: int | None = None, rank_fraction: float | None = None) -> dict[str, Any]:
    """A JSON-able description of the rank rule (part of the cache key and the store metadata)."""
    if rank is not None and rank_fraction is not None:
        raise ValueError("give at most one of rank and rank_fraction")
    if rank is not None:
        return {"rule": "fixed", "rank": int(rank)}
    if rank_fraction is not None:
        return {"rule": "fraction", "rank_fraction": float(rank_fraction)}
    return {"rule": "1/T"}


def truncated_svd(
    delta: torch.Tensor,
    k: int,
    svd: str = "exact",
    *,
    oversample: int = 10,
    niter: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-k truncated SVD Δ ≈ U diag(σ) Vᵀ (spec "Notation"); returns U (m×k), σ (k), V (n×k), float32.

    ``svd="exact"`` uses ``torch.linalg.svd(full_matrices=False)``; ``"randomized"`` uses ``torch.svd_lowrank``
    with ``k + oversample`` columns and ``niter`` power iterations; it falls back to exact when the sketch is
    wider than min(m, n)/4 (there the exact SVD is as fast). The sketch is seeded, so results are deterministic.
    """
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    a = delta.to(torch.float32)
    m, n = a.shape
    k = max(1, min(int(k), m, n))
    q = k + int(oversample)
    if svd == "exact" or 4 * q > min(m, n):
        if m < n:  # LAPACK is markedly faster on tall matrices: factor Δᵀ = V Σ Uᵀ instead
            v, s, uh = torch.linalg.svd(a.T, full_matrices=False)
            return uh[:k].T.contiguous(), s[:k].contiguous(), v[:, :k].contiguous()
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].T.contiguous()
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a, q=q, niter=int(niter))
    return u[:, :k].contiguous(), s[:k].contiguous(), v[:, :k].contiguous()


def _recon(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * s) @ v.T


# --------------------------------------------------------------------------------------------------------------
# the store


def _key(kind: str, task: int, name: str) -> str:
    return f"{kind}/{task}/{name}"


class FactorStore:
    """Truncated-SVD factors per (task, matrix parameter) and full vector deltas per (task, vector parameter).

    ``tensors`` maps ``"U/<t>/<name>"``, ``"S/<t>/<name>"``, ``"V/<t>/<name>"`` and ``"vec/<t>/<name>"`` to
    float32 tensors (a dict, or a :class:`LazyStateDict` over the saved file); ``info`` holds the metadata
    (``num_tasks``, ``names`` in state-dict order, ``matrix_names``, ``ranks``, ``shapes``, ``dtypes``, ``rank_rule``,
    ``svd``, ``svd_errors``).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        self._t = tensors
        self.info: dict[str, Any] = dict(info)
        self._matrix = set(self.info["matrix_names"])

    # -- metadata --------------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return int(self.info["num_tasks"])

    @property
    def names(self) -> list[str]:
        """All parameter names, in the pretrained state-dict order."""
        return list(self.info["names"])

    @property
    def matrix_names(self) -> list[str]:
        return list(self.info["matrix_names"])

    @property
    def vector_names(self) -> list[str]:
        return [n for n in self.info["names"] if n not in self._matrix]

    def is_matrix(self, name: str) -> bool:
        self._check_name(name)
        return name in self._matrix

    def rank(self, name: str) -> int:
        """k kept for matrix parameter ``name``."""
        self._check_matrix(name)
        return int(self.info["ranks"][name])

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name)
        return tuple(self.info["shapes"][name])

    def nbytes(self) -> int:
        """Bytes held by all stored tensors."""
        total = 0
        for n in self.info["names"]:
            if n in self._matrix:
                m, c = self.info["shapes"][n]
                total += 4 * self.info["ranks"][n] * (m + c + 1)
            else:
                total += 4 * math.prod(self.info["shapes"][n])
        total *= self.num_tasks
        return total

    # -- accessors -------------------------------------------------------------------------------------------
    def U(self, task: int, name: str) -> torch.Tensor:
        """Left factor U_t (m×k) of matrix parameter ``name``."""
        return self._get("U", task, name)

    def S(self, task: int, name: str) -> torch.Tensor:
        """Singular values σ_t (k) of matrix parameter ``name``."""
        return self._get("S", task, name)

    def V(self, task: int, name: str) -> torch.Tensor:
        """Right factor V_t (n×k) of matrix parameter ``name`` (its columns span the layer's input space)."""
        return self._get("V", task, name)

    def factors(self, task: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_t, σ_t, V_t) of matrix parameter ``name``."""
        return self.U(task, name), self.S(task, name), self.V(task, name)

    def reconstruct(self, task: int, name: str) -> torch.Tensor:
        """Rank-k reconstruction U_t diag(σ_t) V_tᵀ of τ_t[name]."""
        return _recon(*self.factors(task, name))

    def vector(self, task: int, name: str) -> torch.Tensor:
        """Full delta τ_t[name] of vector parameter ``name``."""
        self._check_task(task)
        self._check_name(name)
        if name in self._matrix:
            raise ValueError(f"{name!r} is a matrix parameter; use U/S/V")
        return self._t[_key("vec", task, name)]

    def _get(self, kind: str, task: int, name: str) -> torch.Tensor:
        self._check_task(task)
        self._check_matrix(name)
        return self._t[_key(kind, task, name)]

    def _check_task(self, task: int) -> None:
        if not 0 <= int(task) < self.num_tasks:
            raise ValueError(f"task {task} out of range: the factor store holds {self.num_tasks} tasks")

    def _check_name(self, name: str) -> None:
        if name not in self.info["shapes"]:
            raise KeyError(f"parameter {name!r} not in the factor store")

    def _check_matrix(self, name: str) -> None:
        self._check_name(name)
        if name not in self._matrix:
            raise ValueError(f"{name!r} is a vector parameter; use vector()")

    # -- persistence -----------------------------------------------------------------------------------------
    def _entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return _entries(self.info)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the store as one safetensors file, atomically (temp file in the same dir, then os.replace)."""
        path = Path(path)
        with StreamingSafetensorsWriter(path, self._entries(), {"mass_exp_factors": json.dumps(self.info)}) as w:
            for key, _, _ in self._entries():
                w.write(key, self._t[key])
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, in_memory: bool = False) -> FactorStore:
        """Open a saved store (memory-mapped, one tensor read per access), or read it all with ``in_memory``."""
        lazy = LazyStateDict(path)
        meta = lazy.metadata().get("mass_exp_factors")
        if meta is None:
            raise ValueError(f"{path} is not a mass-exp factor store (no 'mass_exp_factors' metadata)")
        info = json.loads(meta)
        if info.get("format") != FORMAT:
            raise ValueError(f"{path}: unsupported factor store format {info.get('format')!r}, expected {FORMAT!r}")
        tensors: Mapping[str, torch.Tensor] = {k: lazy[k] for k in lazy} if in_memory else lazy
        return cls(tensors, info)

    def __repr__(self) -> str:
        return (
            f"FactorStore(num_tasks={self.num_tasks}, matrices={len(self._matrix)}, "
            f"vectors={len(self.info['names']) - len(self._matrix)}, svd={self.info.get('svd')!r}, "
            f"rank_rule={self.info.get('rank_rule')}, {self.nbytes() / 2**20:.1f} MiB)"
        )


def _entries(info: Mapping[str, Any]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Tensor names, dtypes and shapes in file order: parameter by parameter, task by task."""
    out: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    matrix = set(info["matrix_names"])
    f32 = torch.float32
    for name in info["names"]:
        shape = tuple(info["shapes"][name])
        for t in range(int(info["num_tasks"])):
            if name in matrix:
                k = int(info["ranks"][name])
                out += [
                    (_key("U", t, name), f32, (shape[0], k)),
                    (_key("S", t, name), f32, (k,)),
                    (_key("V", t, name), f32, (shape[1], k)),
                ]
            else:
                out.append((_key("vec", t, name), f32, shape))
    return out


def build_factor_store(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    *,
    rank: int | None = None,
    rank_fraction: float | None = None,
    svd: str = "exact",
    path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    oversample: int = 10,
    niter: int = 4,
    error_sample: int = 3,
) -> FactorStore:
    """Build the factor store (MASS step 1), one parameter at a time.

    With ``path`` the factors are streamed into that safetensors file (atomic) and the store returned is
    memory-mapped from it, so peak memory is about one parameter's T deltas. With ``svd="randomized"`` the
    relative reconstruction error against the exact rank-k truncation is measured on ``error_sample`` matrices
    (task 0) and logged; it is kept in ``info["svd_errors"]``.
    """
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    num_tasks = len(finetuned)
    if num_tasks < 1:
        raise ValueError("at least one fine-tuned endpoint is required")
    check_endpoints(pretrained, finetuned)
    names = list(pretrained)
    shapes = {n: list(param_shape(pretrained, n)) for n in names}
    matrix_names = [n for n in names if is_matrix_param(shapes[n])]
    ranks = {n: resolve_rank(shapes[n], num_tasks, rank, rank_fraction) for n in matrix_names}
    info: dict[str, Any] = {
        "format": FORMAT,
        "num_tasks": num_tasks,
        "names": names,
        "matrix_names": matrix_names,
        "ranks": ranks,
        "shapes": shapes,
        "dtypes": {n: str(param_dtype(pretrained, n)).removeprefix("torch.") for n in names},
        "rank_rule": rank_rule(rank, rank_fraction),
        "svd": svd,
        "svd_params": {"oversample": oversample, "niter": niter} if svd == "randomized" else {},
        "svd_errors": [],
    }
    if svd == "randomized" and matrix_names and error_sample > 0:
        idx = sorted({round(i * (len(matrix_names) - 1) / max(1, error_sample - 1)) for i in range(error_sample)})
        sample = {matrix_names[i] for i in idx}
    else:
        sample = set()

    t0 = time.perf_counter()
    # the metadata (with the measured errors and the build time) is only complete at the end: reserve room in
    # the header now and rewrite it when closing
    writer = (
        StreamingSafetensorsWriter(
            path, _entries(info), {"mass_exp_factors": json.dumps(info)}, reserve_bytes=2048 + 512 * len(sample)
        )
        if path is not None
        else None
    )
    tensors: dict[str, torch.Tensor] = {}

    def emit(key: str, value: torch.Tensor) -> None:
        if writer is not None:
            writer.write(key, value)
        else:
            tensors[key] = value

    try:
        for name in tqdm(names, desc="factor store", unit="param", disable=not progress):
            pre = pretrained[name].to(torch.float32)
            for t, ft in enumerate(finetuned):
                d = ft[name].to(device=pre.device, dtype=torch.float32) - pre
                if name in ranks:
                    u, s, v = truncated_svd(d, ranks[name], svd, oversample=oversample, niter=niter)
                    if t == 0 and name in sample:
                        info["svd_errors"].append(_svd_error(d, ranks[name], u, s, v, name))
                    emit(_key("U", t, name), u)
                    emit(_key("S", t, name), s)
                    emit(_key("V", t, name), v)
                else:
                    emit(_key("vec", t, name), d.contiguous())
                del d
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    elapsed = time.perf_counter() - t0
    info["build_seconds"] = round(elapsed, 3)
    if writer is not None:
        writer.set_metadata({"mass_exp_factors": json.dumps(info)})
        writer.close()
        store = FactorStore.load(path)  # type: ignore[arg-type]
    else:
        store = FactorStore(tensors, info)
    log.info(
        "factor store built: %d tasks, %d matrices, svd=%s, rank rule %s, %.1f MiB, %.1fs",
        num_tasks, len(matrix_names), svd, info["rank_rule"], store.nbytes() / 2**20, elapsed,
    )
    return store


def _svd_error(
    d: torch.Tensor, k: int, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, name: str
) -> dict[str, float | str | int]:
    ue, se, ve = truncated_svd(d, k, "exact")
    exact = _recon(ue, se, ve)
    approx = _recon(u, s, v)
    denom = float(torch.linalg.norm(exact)) or 1.0
    rel = float(torch.linalg.norm(approx - exact)) / denom
    sv_rel = float((s - se).abs().max()) / (float(se[0]) or 1.0)
    # how much worse the randomized truncation approximates Δ than the optimal (exact) one
    res_exact = float(torch.linalg.norm(d - exact))
    res_approx = float(torch.linalg.norm(d - approx))
    excess = (res_approx - res_exact) / (res_exact or 1.0)
    log.info(
        "randomized SVD %s (k=%d): rel. error vs exact rank-k = %.2e, max sv error / s1 = %.2e, "
        "excess truncation residual = %.2e", name, k, rel, sv_rel, excess,
    )
    return {"name": name, "k": k, "rel_error": rel, "sv_rel_error": sv_rel, "excess_residual": excess}


# --------------------------------------------------------------------------------------------------------------
# on-disk cache


def _cached_sha256(path: Path, hash_cache: Path | None) -> str:
    """sha256 of ``path``, remembered in ``hash_cache`` (json) by (absolute path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    ident = f"{st.st_size}:{st.st_mtime_ns}"
    table: dict[str, Any] = {}
    if hash_cache is not None and hash_cache.is_file():
        try:
            table = json.loads(hash_cache.read_text())
        except (OSError, ValueError):
            table = {}
    entry = table.get(str(path))
    if isinstance(entry, dict) and entry.get("id") == ident:
        return str(entry["sha256"])
    digest = file_sha256(path)
    if hash_cache is not None:
        table[str(path)] = {"id": ident, "sha256": digest}
        hash_cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{hash_cache.name}.", suffix=".tmp", dir=hash_cache.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, hash_cache)
    return digest


def factor_cache_key(
    endpoint_files: Sequence[str | os.PathLike[str]],
    pretrained_file: str | os.PathLike[str],
    backbone: str,
    rank_rule: str | Mapping[str, Any],
    svd: str,
    *,
    hash_cache: str | os.PathLike[str] | None = None,
) -> str:
    """Cache key of a factor store: sha256 over the files' contents (endpoint order matters: it fixes the task
    indices), the backbone, the rank rule, the SVD method and the store format. ``hash_cache`` (a json file)
    remembers file digests by (path, size, mtime) so unchanged files are not re-read."""
    hc = Path(hash_cache) if hash_cache is not None else None
    payload = {
        "format": FORMAT,
        "pretrained": _cached_sha256(Path(pretrained_file), hc),
        "endpoints": [_cached_sha256(Path(p), hc) for p in endpoint_files],
        "backbone": backbone,
        "rank_rule": rank_rule if isinstance(rank_rule, str) else dict(sorted(rank_rule.items())),
        "svd": svd,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def load_or_build_factor_store(
    cache_dir: str | os.PathLike[str],
    pretrained_file: str | os.PathLike[str],
    endpoint_files: Sequence[str | os.PathLike[str]],
    backbone: str,
    rank: int | None = None,
    svd: str = "exact",
    progress: bool = True,
    *,
    rank_fraction: float | None = None,
    in_memory: bool = False,
) -> FactorStore:
    """Return the factor store for these safetensors endpoints, from ``cache_dir`` when a store with the same
    content-hash key exists, else build it there (atomically) and return it. Logs time, size and path."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rule = rank_rule(rank, rank_fraction)
    t0 = time.perf_counter()
    hashes = cache_dir / "file_hashes.json"
    key = factor_cache_key(endpoint_files, pretrained_file, backbone, rule, svd, hash_cache=hashes)
    path = cache_dir / f"factors-{backbone.replace('/', '_')}-T{len(endpoint_files)}-{key}.safetensors"
    t_key = time.perf_counter() - t0
    if path.is_file():
        store = FactorStore.load(path, in_memory=in_memory)
        if store.num_tasks != len(endpoint_files):
            raise ValueError(f"{path}: cached store has {store.num_tasks} tasks, expected {len(endpoint_files)}")
        log.info(
            "factor store loaded from cache %s (%.1f MiB on disk, key %.1fs, load %.1fs)",
            path, path.stat().st_size / 2**20, t_key, time.perf_counter() - t0 - t_key,
        )
        return store
    log.info("factor store not cached (key %s, hashing took %.1fs); building %s", key, t_key, path)
    pretrained = LazyStateDict(pretrained_file)
    finetuned = [LazyStateDict(p) for p in endpoint_files]
    store = build_factor_store(
        pretrained, finetuned, rank=rank, rank_fraction=rank_fraction, svd=svd, path=path, progress=progress
    )
    if in_memory:
        store = FactorStore.load(path, in_memory=True)
    log.info(
        "factor store written to %s (%.1f MiB, build %.1fs)",
        path, path.stat().st_size / 2**20, store.info.get("build_seconds", float("nan")),
    )
    return store
