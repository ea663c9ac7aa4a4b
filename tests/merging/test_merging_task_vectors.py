from __future__ import annotations

import pickle

import pytest
import torch
from merging_helpers import make_endpoints

from mass_exp.merging.basic import task_arithmetic
from mass_exp.merging.task_vectors import (
    LazyStateDict,
    StreamingSafetensorsWriter,
    check_endpoints,
    is_matrix_param,
    matrix_keys,
    save_state_dict,
    vector_keys,
)


def test_matrix_vs_vector_split(endpoints):
    pre, _ = endpoints
    mats = matrix_keys(pre)
    assert "positional_embedding" in mats and "proj" in mats
    assert "transformer.resblocks.0.attn.in_proj_weight" in mats
    assert "transformer.resblocks.1.mlp.c_proj.weight" in mats
    vecs = vector_keys(pre)
    assert "conv1.weight" in vecs  # 4-D is a vector parameter
    assert "class_embedding" in vecs and "ln_post.bias" in vecs
    assert set(mats) | set(vecs) == set(pre) and not set(mats) & set(vecs)
    assert is_matrix_param((3, 4)) and not is_matrix_param((3,)) and not is_matrix_param(torch.zeros(1, 2, 3))


def test_lazy_state_dict_roundtrip(tmp_path, endpoints):
    pre, _ = endpoints
    pre = {k: (v.half() if k == "proj" else v) for k, v in pre.items()}
    path = save_state_dict(pre, tmp_path / "pre.safetensors", metadata={"who": "test"})
    assert [p.name for p in tmp_path.iterdir()] == ["pre.safetensors"]  # no temp file left behind
    lazy = LazyStateDict(path)
    assert sorted(lazy) == sorted(pre) and len(lazy) == len(pre)  # key order: the file's (sorted)
    for k in pre:
        assert torch.equal(lazy[k], pre[k])
        assert lazy.shape(k) == tuple(pre[k].shape)
        assert lazy.dtype(k) == pre[k].dtype
    assert "proj" in lazy and "visual.proj" not in lazy
    assert lazy.metadata() == {"who": "test"}
    with pytest.raises(KeyError, match="visual.proj"):
        lazy["visual.proj"]
    with pytest.raises(KeyError):
        lazy.shape("nope")
    mapped = LazyStateDict(path, mmap=True)
    assert all(torch.equal(mapped[k], pre[k]) for k in pre)
    clone = pickle.loads(pickle.dumps(lazy))
    assert torch.equal(clone["proj"], pre["proj"])
    with pytest.raises(FileNotFoundError):
        LazyStateDict(tmp_path / "missing.safetensors")


def test_lazy_endpoints_merge_like_in_memory(tmp_path, endpoints):
    pre, fts = endpoints
    lpre = LazyStateDict(save_state_dict(pre, tmp_path / "pre.safetensors"))
    lfts = [LazyStateDict(save_state_dict(ft, tmp_path / f"ft{i}.safetensors")) for i, ft in enumerate(fts)]
    a = task_arithmetic(pre, fts, alpha=0.4)
    b = task_arithmetic(lpre, lfts, alpha=0.4)
    assert all(torch.equal(a[k], b[k]) for k in pre)


def test_streaming_writer_rejects_wrong_order_and_incomplete(tmp_path):
    entries = [("a", torch.float32, (2,)), ("b", torch.float32, (1, 3))]
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        w.write("b", torch.zeros(1, 3))
    with pytest.raises(ValueError, match="shape"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 of 2"):
        w.close()
    assert list(tmp_path.iterdir()) == []  # aborted: nothing written
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", entries, {"m": "1"}, reserve_bytes=64)
    w.write("a", torch.ones(2))
    w.write("b", torch.arange(3.0).reshape(1, 3))
    w.set_metadata({"m": "a somewhat longer value"})
    w.close()
    lazy = LazyStateDict(tmp_path / "x.safetensors")
    assert lazy.metadata() == {"m": "a somewhat longer value"}
    assert torch.equal(lazy["b"], torch.arange(3.0).reshape(1, 3))


def test_check_endpoints_messages():
    pre, fts = make_endpoints(2)
    check_endpoints(pre, fts)
    broken = dict(fts[1])
    del broken["transformer.resblocks.1.attn.out_proj.weight"]
    with pytest.raises(ValueError, match=r"endpoint 1 is missing key 'transformer.resblocks.1.attn.out_proj.weight'"):
        check_endpoints(pre, [fts[0], broken])
