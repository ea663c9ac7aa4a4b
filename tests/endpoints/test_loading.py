"""Safe loading (no code runs without the opt-in), key conversion, checks with one-line messages, materializing."""

from __future__ import annotations

import io
import os
import pathlib
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from mass_exp.endpoints import loading
from mass_exp.endpoints.hf_clip import open_clip_to_hf_clip_vision
from mass_exp.endpoints.loading import (
    check_visual_state_dict,
    load_checkpoint_tensors,
    materialize_endpoint,
    to_open_clip_visual,
)
from mass_exp.errors import ConfigError
from mass_exp.merging.task_vectors import LazyStateDict

from .conftest import perturbed

OPT_IN = "endpoints.allow_unsafe_pickle=true"




def _assert_same(a, b):
    assert set(a) == set(b)
    for k in b:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ unsafe pickles


class _WritesFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.target), "pwned"))


class _RunsShell:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [_WritesFile, _RunsShell])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, ref, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "nonlinear_finetuned.pt"
    torch.save({"conv1.weight": ref["conv1.weight"], "evil": payload(marker)}, path)
    with pytest.raises(ConfigError) as err:
        load_checkpoint_tensors(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and OPT_IN in msg and "execute code" in msg
    with pytest.raises(ConfigError, match=OPT_IN):
        materialize_endpoint(path, tmp_path / "out", ref, backbone="mass-tiny-ViT")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_pickled_module_needs_the_opt_in_and_then_loads_even_if_its_class_is_gone(tmp_path, clip, ref, monkeypatch):
    """A TALL-masks style checkpoint: a whole pickled ImageEncoder from a training repo that is not installed."""
    pkg = tmp_path / "trainrepo_src"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "modeling.py").write_text(textwrap.dedent("""
        import torch
        class ImageEncoder(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model
                self.train_preprocess = None
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from trainrepo_src import modeling

    want = perturbed(ref, 1)
    import copy

    full = copy.deepcopy(clip)
    full.visual.load_state_dict(want)
    path = tmp_path / "nonlinear_finetuned.pt"
    torch.save(modeling.ImageEncoder(full), path)
    # the training repo is not importable at load time
    monkeypatch.delitem(sys.modules, "trainrepo_src.modeling")
    monkeypatch.delitem(sys.modules, "trainrepo_src")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])

    with pytest.raises(ConfigError, match=OPT_IN):
        load_checkpoint_tensors(path)
    raw = load_checkpoint_tensors(path, allow_unsafe_pickle=True)
    assert "model.visual.conv1.weight" in raw and "model.token_embedding.weight" in raw
    out = materialize_endpoint(path, tmp_path / "out", ref, backbone="mass-tiny-ViT", allow_unsafe_pickle=True)
    _assert_same(dict(LazyStateDict(out).items()), want)


# --------------------------------------------------------------------------------------------- formats


def test_containers_and_prefixes_are_unwrapped(tmp_path, clip, ref):
    want = perturbed(ref, 2)
    full = {**{f"visual.{k}": v for k, v in want.items()},
            **{k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}}
    cases = {
        "full_clip.pt": full,
        "tall.pt": {f"model.{k}": v for k, v in full.items()},
        "ddp.bin": {"state_dict": {f"module.{k}": v for k, v in want.items()}, "epoch": 3},
        "encoder.pth": {"model": {f"image_encoder.model.visual.{k}": v for k, v in want.items()}},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        got = to_open_clip_visual(load_checkpoint_tensors(tmp_path / name), source=name)
        _assert_same(got, want)
    # safetensors, detected by extension and by content
    save_file({f"visual.{k}": v.contiguous() for k, v in want.items()}, str(tmp_path / "w.safetensors"))
    os.link(tmp_path / "w.safetensors", tmp_path / "w_disguised.bin")
    for name in ("w.safetensors", "w_disguised.bin"):
        _assert_same(to_open_clip_visual(load_checkpoint_tensors(tmp_path / name)), want)


def test_non_state_dict_content_is_refused(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "a.pt")
    with pytest.raises(ConfigError, match=r"a\.pt: holds a dict whose entry 'epoch' is a int"):
        load_checkpoint_tensors(tmp_path / "a.pt")
    torch.save([torch.zeros(1)], tmp_path / "b.pt")
    with pytest.raises(ConfigError, match=r"b\.pt: holds a list"):
        load_checkpoint_tensors(tmp_path / "b.pt")
    with pytest.raises(ConfigError, match=r"c\.pt: file not found"):
        load_checkpoint_tensors(tmp_path / "c.pt")


# ------------------------------------------------------------------------------------------------ checks


def _msg(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_check_missing_parameter(ref):
    sd = dict(ref)
    del sd["ln_post.bias"]
    with pytest.raises(ConfigError) as e:
        check_visual_state_dict(sd, ref, "/x/y.pt", backbone="mass-tiny-ViT")
    assert _msg(e) == ("endpoint /x/y.pt: parameter 'ln_post.bias' is missing, the backbone mass-tiny-ViT needs it; "
                       "is this an image-encoder checkpoint for this backbone?")


def test_check_unexpected_parameter(ref):
    sd = dict(ref, **{"attnpool.weight": torch.zeros(2), "head.bias": torch.zeros(2)})
    with pytest.raises(ConfigError) as e:
        check_visual_state_dict(sd, ref, "/x/y.pt", backbone="mass-tiny-ViT")
    assert "/x/y.pt" in _msg(e) and "unexpected parameter 'attnpool.weight' (and 1 more)" in _msg(e)


def test_check_shape_mismatch_against_tensors_or_shapes(ref):
    sd = dict(ref)
    sd["transformer.resblocks.3.attn.in_proj_weight"] = torch.zeros(96, 32)
    shapes = {k: tuple(v.shape) for k, v in ref.items()}
    for reference in (ref, shapes):
        with pytest.raises(ConfigError) as e:
            check_visual_state_dict(sd, reference, "/x/y.pt", backbone="mass-tiny-ViT")
        assert _msg(e) == ("endpoint /x/y.pt: parameter 'transformer.resblocks.3.attn.in_proj_weight' has shape "
                           "(96, 32), the backbone mass-tiny-ViT expects (384, 128); "
                           "is this checkpoint for another backbone?")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_non_finite_values(ref, bad):
    sd = dict(ref)
    t = sd["ln_pre.weight"].clone()
    t[3] = bad
    sd["ln_pre.weight"] = t
    with pytest.raises(ConfigError) as e:
        check_visual_state_dict(sd, ref, "/x/y.pt")
    assert _msg(e).startswith("endpoint /x/y.pt: parameter 'ln_pre.weight' has 1 non-finite value(s) (NaN/Inf)")
    check_visual_state_dict(ref, ref, "/x/y.pt")  # the clean one passes


# --------------------------------------------------------------------------------------------- materialize


def test_materialize_writes_checked_visual_and_reuses_it(tmp_path, ref, monkeypatch):
    want = perturbed(ref, 3)
    src = tmp_path / "ft.pt"
    torch.save({f"model.visual.{k}": v for k, v in want.items()}, src)
    out_dir = tmp_path / "out"
    out = materialize_endpoint(src, out_dir, ref, backbone="mass-tiny-ViT")
    assert out.parent == out_dir and out.suffix == ".safetensors"
    lazy = LazyStateDict(out)
    assert set(lazy.keys()) == set(ref.keys())
    _assert_same(dict(lazy.items()), want)
    assert [p.name for p in out_dir.iterdir()] == [out.name]  # no temporary left behind

    def boom(*a, **k):
        raise AssertionError("source reloaded on a cache hit")

    monkeypatch.setattr(loading, "load_checkpoint_tensors", boom)
    assert materialize_endpoint(src, out_dir, ref, backbone="mass-tiny-ViT") == out
    # another backbone name or other contents -> another file
    monkeypatch.undo()
    assert materialize_endpoint(src, out_dir, ref, backbone="other") != out
    torch.save({f"model.visual.{k}": v for k, v in perturbed(ref, 4).items()}, src)
    assert materialize_endpoint(src, out_dir, ref, backbone="mass-tiny-ViT") != out


def test_materialize_rejects_a_bad_checkpoint_and_writes_nothing(tmp_path, ref):
    bad = perturbed(ref, 5)
    bad["proj"] = torch.full_like(bad["proj"], float("nan"))
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"bad\.pt: parameter 'proj' has \d+ non-finite"):
        materialize_endpoint(tmp_path / "bad.pt", tmp_path / "out", ref, backbone="mass-tiny-ViT")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_materialize_fills_only_proj_from_the_pretrained_visual(tmp_path, ref, caplog):
    want = perturbed(ref, 6)
    hf = open_clip_to_hf_clip_vision(want, with_projection=False)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"parameter 'proj' is missing"):
        materialize_endpoint(tmp_path / "model.safetensors", tmp_path / "out", ref, backbone="mass-tiny-ViT")
    with caplog.at_level("INFO", logger="mass_exp.endpoints.loading"):
        out = materialize_endpoint(tmp_path / "model.safetensors", tmp_path / "out", ref, backbone="mass-tiny-ViT",
                                   fill_missing_from=ref)
    assert any("'proj'" in r.getMessage() and "pretrained" in r.getMessage() for r in caplog.records)
    got = dict(LazyStateDict(out).items())
    _assert_same(got, {**want, "proj": ref["proj"]})
    # anything else missing is still an error
    del hf["vision_model.post_layernorm.bias"]
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model2.safetensors"))
    with pytest.raises(ConfigError, match=r"parameter 'ln_post.bias' is missing"):
        materialize_endpoint(tmp_path / "model2.safetensors", tmp_path / "out", ref, backbone="mass-tiny-ViT",
                             fill_missing_from=ref)


def test_checkpoint_bytes_written_by_torch_save_to_buffer_are_equivalent(tmp_path, ref):
    """Sanity for the hub fakes: torch.save to bytes then to a file loads the same (used by test_sources)."""
    buf = io.BytesIO()
    torch.save(ref, buf)
    (tmp_path / "x.bin").write_bytes(buf.getvalue())
    _assert_same(load_checkpoint_tensors(tmp_path / "x.bin"), ref)
