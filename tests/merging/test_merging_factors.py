from __future__ import annotations

import logging
import os

import pytest
import torch
from merging_helpers import make_endpoints

from mass_exp.merging import factors as F
from mass_exp.merging.factors import (
    FactorStore,
    build_factor_store,
    factor_cache_key,
    load_or_build_factor_store,
    rank_rule,
    resolve_rank,
    truncated_svd,
)
from mass_exp.merging.task_vectors import LazyStateDict, matrix_keys, save_state_dict, vector_keys
from mass_exp.merging.tsv import tsv_m


def test_resolve_rank_rules():
    assert resolve_rank((768, 3072), 8) == 96
    assert resolve_rank((50, 768), 8) == 6
    assert resolve_rank((50, 768), 100) == 1  # never 0
    assert resolve_rank((50, 768), 8, rank=64) == 50  # capped at min(m, n)
    assert resolve_rank((768, 512), 8, rank_fraction=0.25) == 128
    assert resolve_rank((3, 5), 8, rank_fraction=0.1) == 1
    with pytest.raises(ValueError):
        resolve_rank((3, 5), 2, rank=2, rank_fraction=0.5)
    with pytest.raises(ValueError):
        resolve_rank((3, 5), 2, rank=0)
    with pytest.raises(ValueError):
        resolve_rank((3, 5), 2, rank_fraction=1.5)
    assert rank_rule() == {"rule": "1/T"}
    assert rank_rule(rank=4) == {"rule": "fixed", "rank": 4}


def test_store_contents_and_shapes():
    pre, fts = make_endpoints(3)
    store = build_factor_store(pre, fts, progress=False)
    assert store.num_tasks == 3
    assert store.names == list(pre)
    assert set(store.matrix_names) == set(matrix_keys(pre))
    assert set(store.vector_names) == set(vector_keys(pre))
    name = "transformer.resblocks.1.mlp.c_fc.weight"  # 32 x 8 -> k = 8 // 3 = 2
    assert store.rank(name) == 2
    u, s, v = store.factors(1, name)
    assert u.shape == (32, 2) and s.shape == (2,) and v.shape == (8, 2)
    assert store.V(1, name).shape == (8, 2)
    assert torch.allclose(v.T @ v, torch.eye(2), atol=1e-5)
    ue, se, ve = truncated_svd(fts[1][name] - pre[name], 2)
    assert torch.allclose(store.reconstruct(1, name), (ue * se) @ ve.T, atol=1e-5)
    assert torch.equal(store.vector(2, "ln_pre.bias"), fts[2]["ln_pre.bias"] - pre["ln_pre.bias"])
    with pytest.raises(ValueError, match="vector parameter"):
        store.U(0, "ln_pre.bias")
    with pytest.raises(ValueError, match="matrix parameter"):
        store.vector(0, name)
    with pytest.raises(ValueError, match="task 3 out of range"):
        store.V(3, name)
    with pytest.raises(KeyError, match="nope"):
        store.V(0, "nope")
    assert store.nbytes() > 0 and "num_tasks=3" in repr(store)


def test_save_load_roundtrip(tmp_path):
    pre, fts = make_endpoints(3)
    store = build_factor_store(pre, fts, progress=False)
    path = store.save(tmp_path / "f.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]
    for in_memory in (False, True):
        loaded = FactorStore.load(path, in_memory=in_memory)
        assert loaded.info == store.info
        for key in store._t:
            assert torch.equal(loaded._t[key], store._t[key])
    assert path.stat().st_size >= store.nbytes()
    save_state_dict(pre, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a mass-exp factor store"):
        FactorStore.load(tmp_path / "plain.safetensors")


def test_streamed_build_equals_in_memory(tmp_path):
    pre, fts = make_endpoints(2)
    lpre = LazyStateDict(save_state_dict(pre, tmp_path / "pre.safetensors"))
    lfts = [LazyStateDict(save_state_dict(ft, tmp_path / f"ft{i}.safetensors")) for i, ft in enumerate(fts)]
    mem = build_factor_store(pre, fts, progress=False)
    disk = build_factor_store(lpre, lfts, path=tmp_path / "store.safetensors", progress=False)
    assert isinstance(disk._t, LazyStateDict)
    assert disk.info["ranks"] == mem.info["ranks"]
    for key in mem._t:
        assert torch.equal(disk._t[key], mem._t[key]), key
    assert disk.info["build_seconds"] >= 0
    a, b = tsv_m(pre, fts, factors=mem), tsv_m(lpre, [], factors=disk)
    assert all(torch.equal(a[k], b[k]) for k in pre)


def test_build_errors_name_the_key():
    pre, fts = make_endpoints(2)
    broken = dict(fts[1])
    del broken["proj"]
    with pytest.raises(ValueError, match=r"endpoint 1 is missing key 'proj'"):
        build_factor_store(pre, [fts[0], broken], progress=False)
    with pytest.raises(ValueError, match="svd must be"):
        build_factor_store(pre, fts, svd="fast", progress=False)


def test_randomized_svd_close_to_exact_and_error_logged(caplog):
    g = torch.Generator().manual_seed(0)
    m, n, r = 96, 64, 4
    low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    d = low + 1e-3 * torch.randn(m, n, generator=g)
    u, s, v = truncated_svd(d, r, "randomized", oversample=6, niter=2)
    ue, se, ve = truncated_svd(d, r, "exact")
    assert torch.allclose((u * s) @ v.T, (ue * se) @ ve.T, atol=1e-3)
    assert torch.allclose(s, se, rtol=1e-4)
    u2, s2, _ = truncated_svd(d, r, "randomized", oversample=6, niter=2)
    assert torch.equal(u, u2) and torch.equal(s, s2)  # seeded: deterministic
    pre = {"w": torch.zeros(m, n), "b": torch.zeros(3)}
    fts = [{"w": d, "b": torch.ones(3)}]
    with caplog.at_level(logging.INFO, logger="mass_exp.merging.factors"):
        store = build_factor_store(pre, fts, rank=r, svd="randomized", progress=False)
    errs = store.info["svd_errors"]
    assert len(errs) == 1 and errs[0]["name"] == "w" and errs[0]["rel_error"] < 1e-3
    assert "randomized SVD w" in caplog.text


def _write_endpoints(tmp_path, num_tasks=2, seed=0):
    pre, fts = make_endpoints(num_tasks, seed=seed)
    pre_file = save_state_dict(pre, tmp_path / "pre.safetensors")
    ft_files = [save_state_dict(ft, tmp_path / f"ft{i}.safetensors") for i, ft in enumerate(fts)]
    return pre, fts, pre_file, ft_files


def test_cache_key_tracks_content_rank_and_order(tmp_path, monkeypatch):
    pre, fts, pre_file, ft_files = _write_endpoints(tmp_path)
    hc = tmp_path / "hashes.json"
    key = factor_cache_key(ft_files, pre_file, "ViT-B-32", rank_rule(), "exact", hash_cache=hc)
    assert key == factor_cache_key(ft_files, pre_file, "ViT-B-32", rank_rule(), "exact")
    assert key != factor_cache_key(ft_files, pre_file, "ViT-B-32", rank_rule(rank=4), "exact")
    assert key != factor_cache_key(ft_files, pre_file, "ViT-B-32", rank_rule(), "randomized")
    assert key != factor_cache_key(ft_files, pre_file, "ViT-B-16", rank_rule(), "exact")
    assert key != factor_cache_key(ft_files[::-1], pre_file, "ViT-B-32", rank_rule(), "exact")
    # the digest cache is used for unchanged files
    calls = []
    real = F.file_sha256
    monkeypatch.setattr(F, "file_sha256", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    assert key == factor_cache_key(ft_files, pre_file, "ViT-B-32", rank_rule(), "exact", hash_cache=hc)
    assert calls == []
    # same size, different content -> different key (even with the digest cache)
    changed = dict(fts[1])
    changed["proj"] = changed["proj"] + 1.0
    save_state_dict(changed, ft_files[1])
    assert ft_files[1].stat().st_size == ft_files[0].stat().st_size
    key2 = factor_cache_key(ft_files, pre_file, "ViT-B-32", rank_rule(), "exact", hash_cache=hc)
    assert key2 != key and len(calls) == 1
    # touching a file without changing it keeps the key
    st = ft_files[0].stat()
    os.utime(ft_files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert factor_cache_key(ft_files, pre_file, "ViT-B-32", rank_rule(), "exact", hash_cache=hc) == key2


def test_load_or_build_caches(tmp_path, monkeypatch, caplog):
    pre, fts, pre_file, ft_files = _write_endpoints(tmp_path, num_tasks=3)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="mass_exp.merging.factors"):
        store = load_or_build_factor_store(cache, pre_file, ft_files, "tiny", progress=False)
    assert "written to" in caplog.text
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and "file_hashes.json" in files  # the store and the digest cache, no temp files
    ref = build_factor_store(pre, fts, progress=False)
    for key in ref._t:
        assert torch.equal(store._t[key], ref._t[key])

    def boom(*a, **k):
        raise AssertionError("should have been loaded from the cache")

    monkeypatch.setattr(F, "build_factor_store", boom)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mass_exp.merging.factors"):
        again = load_or_build_factor_store(cache, pre_file, ft_files, "tiny", progress=False, in_memory=True)
    assert "loaded from cache" in caplog.text
    assert again.info == store.info
    with pytest.raises(AssertionError, match="loaded from the cache"):  # a different rank is a different store
        load_or_build_factor_store(cache, pre_file, ft_files, "tiny", rank=1, progress=False)
