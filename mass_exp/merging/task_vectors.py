"""Task vectors: deltas between endpoints and the pretrained encoder, parameter by parameter.

Conventions (MASS_SPEC "Notation"): a state dict is a ``Mapping[str, Tensor]`` of the open_clip image tower
(``model.visual.state_dict()``, no ``visual.`` prefix). A *matrix parameter* is any 2-D tensor; everything else
(biases, LayerNorm, ``class_embedding``, the 4-D ``conv1.weight``) is a *vector parameter*. All math runs in
float32; merged tensors are returned in the pretrained dtype.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

StateDict = Mapping[str, torch.Tensor]

__all__ = [
    "LazyStateDict",
    "StateDict",
    "check_endpoints",
    "compose",
    "delta",
    "deltas",
    "is_matrix_param",
    "matrix_keys",
    "param_dtype",
    "param_shape",
    "save_state_dict",
    "vector_keys",
]


class LazyStateDict(Mapping[str, torch.Tensor]):
    """Read-only mapping over a safetensors file; each ``__getitem__`` loads one tensor.

    The file is validated and its header read with ``safetensors.safe_open``. By default tensors are then read with
    ``os.pread`` into fresh memory: nothing stays mapped, so reading every tensor of T endpoints does not inflate the
    process RSS with file pages (a persistent ``safe_open`` handle keeps every touched page mapped and counted).
    ``mmap=True`` keeps a ``safe_open`` handle and returns its (memory-mapped) tensors instead.
    ``shape(key)`` and ``dtype(key)`` answer from the header without loading the tensor.
    """

    def __init__(self, path: str | os.PathLike[str], *, mmap: bool = False) -> None:
        self.path = Path(path)
        self.mmap = bool(mmap)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        self._open()

    def _open(self) -> None:
        with safe_open(str(self.path), framework="pt", device="cpu") as f:  # validates the file
            self._keys: list[str] = list(f.keys())
            self._metadata = dict(f.metadata() or {})
        with open(self.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        self._info: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
            k: (_ST_TO_TORCH[v["dtype"]], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items()
        }
        self._handle = safe_open(str(self.path), framework="pt", device="cpu") if self.mmap else None

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            return self._info[key]
        except KeyError:
            raise KeyError(f"{key!r} not in {self.path}") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self._entry(key)
        if self._handle is not None:
            return self._handle.get_tensor(key)
        out = torch.empty(shape, dtype=dtype)
        if end > start:
            buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = 0
                while got < end - start:
                    n = os.preadv(fd, [buf[got:]], start + got)
                    if n <= 0:
                        raise OSError(f"{self.path}: short read for {key!r}")
                    got += n
            finally:
                os.close(fd)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._info

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` read from the header (no data loaded)."""
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of ``key`` read from the header (no data loaded)."""
        return self._entry(key)[0]

    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__`` (empty dict when absent)."""
        return dict(self._metadata)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mmap": self.mmap}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.mmap = state["mmap"]
        self._open()

    def __repr__(self) -> str:
        return f"LazyStateDict({str(self.path)!r}, {len(self._keys)} tensors)"


_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_TO_TORCH.items()}


def param_shape(sd: StateDict, key: str) -> tuple[int, ...]:
    """Shape of ``sd[key]``, without loading it when ``sd`` is a :class:`LazyStateDict`."""
    if isinstance(sd, LazyStateDict):
        return sd.shape(key)
    return tuple(sd[key].shape)


def param_dtype(sd: StateDict, key: str) -> torch.dtype:
    """Dtype of ``sd[key]``, without loading it when ``sd`` is a :class:`LazyStateDict`."""
    if isinstance(sd, LazyStateDict):
        return sd.dtype(key)
    return sd[key].dtype


def is_matrix_param(shape: Sequence[int] | torch.Tensor) -> bool:
    """True for 2-D parameters (spec "Notation": matrix parameter = any 2-D weight)."""
    if isinstance(shape, torch.Tensor):
        shape = tuple(shape.shape)
    return len(shape) == 2


def matrix_keys(sd: StateDict) -> list[str]:
    """Keys of the matrix (2-D) parameters, in state-dict order."""
    return [k for k in sd if is_matrix_param(param_shape(sd, k))]


def vector_keys(sd: StateDict) -> list[str]:
    """Keys of the vector (non-2-D) parameters, in state-dict order."""
    return [k for k in sd if not is_matrix_param(param_shape(sd, k))]


def check_endpoints(pretrained: StateDict, finetuned: Sequence[StateDict]) -> None:
    """Raise ``ValueError`` (naming the key) unless every endpoint has exactly the pretrained keys and shapes."""
    pre_keys = list(pretrained)
    pre_set = set(pre_keys)
    for t, ft in enumerate(finetuned):
        ft_set = set(ft)
        for key in pre_keys:
            if key not in ft_set:
                raise ValueError(f"endpoint {t} is missing key {key!r}")
        extra = sorted(ft_set - pre_set)
        if extra:
            raise ValueError(f"endpoint {t} has unexpected key {extra[0]!r} (not in the pretrained state dict)")
        for key in pre_keys:
            ps, fs = param_shape(pretrained, key), param_shape(ft, key)
            if ps != fs:
                raise ValueError(f"endpoint {t} key {key!r} has shape {list(fs)}, pretrained has {list(ps)}")


def delta(pretrained: StateDict, finetuned: StateDict, key: str, *, pre: torch.Tensor | None = None) -> torch.Tensor:
    """Task vector of one parameter, τ[key] = θ_t[key] − θ_pre[key], in float32."""
    if key not in finetuned:
        raise KeyError(f"endpoint is missing key {key!r}")
    p = (pretrained[key] if pre is None else pre).to(torch.float32)
    return finetuned[key].to(device=p.device, dtype=torch.float32) - p


def deltas(pretrained: StateDict, finetuned: Sequence[StateDict], key: str) -> list[torch.Tensor]:
    """Float32 task vectors of all endpoints for one parameter (loads one tensor per endpoint)."""
    pre = pretrained[key].to(torch.float32)
    out = []
    for t, ft in enumerate(finetuned):
        if key not in ft:
            raise KeyError(f"endpoint {t} is missing key {key!r}")
        out.append(ft[key].to(device=pre.device, dtype=torch.float32) - pre)
    return out


def compose(pretrained_value: torch.Tensor, merged_delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """θ = θ_pre + α·M for one parameter, computed in float32, returned in the pretrained dtype."""
    out = pretrained_value.to(torch.float32) + alpha * merged_delta.to(device=pretrained_value.device)
    return out.to(pretrained_value.dtype)


def save_state_dict(sd: StateDict, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``sd`` as a safetensors file atomically (temp file in the same dir, then ``os.replace``).

    Tensors are streamed one at a time, so a :class:`LazyStateDict` or a large dict is never copied whole.
    """
    path = Path(path)
    entries = [(k, param_dtype(sd, k), param_shape(sd, k)) for k in sd]
    with StreamingSafetensorsWriter(path, entries, metadata) as w:
        for k in sd:
            w.write(k, sd[k])
    return path


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor, in the declared order, with memory O(one tensor).

    The header is computed up front from the declared (name, dtype, shape) entries; the file is written to a temp
    file in the destination directory and moved into place with ``os.replace`` on successful close.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
        *,
        reserve_bytes: int = 0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header: dict[str, Any] = {}
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for name, dtype, shape in entries:
            if name in header:
                raise ValueError(f"duplicate tensor name {name!r}")
            shape = tuple(int(s) for s in shape)
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._order.append((name, dtype, shape, nbytes))
            offset += nbytes
        self._header = header
        raw = self._header_bytes(metadata)
        raw += b" " * (int(reserve_bytes) + (8 - (len(raw) + int(reserve_bytes)) % 8) % 8)
        self._header_len = len(raw)
        self._rewrite: bytes | None = None
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._f = os.fdopen(fd, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def _header_bytes(self, metadata: Mapping[str, str] | None) -> bytes:
        header = dict(self._header)
        if metadata:
            header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
        return json.dumps(header, separators=(",", ":")).encode("utf-8")

    def set_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace the ``__metadata__`` (written at close); it must fit the header size reserved at creation."""
        raw = self._header_bytes(metadata)
        if len(raw) > self._header_len:
            raise ValueError(f"metadata needs {len(raw)} header bytes, only {self._header_len} reserved")
        self._rewrite = raw + b" " * (self._header_len - len(raw))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor (must match the declared name, dtype and shape)."""
        if self._next >= len(self._order):
            raise ValueError(f"unexpected tensor {name!r}: all declared tensors already written")
        exp_name, dtype, shape, nbytes = self._order[self._next]
        if name != exp_name:
            raise ValueError(f"expected tensor {exp_name!r} next, got {name!r}")
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, declared {list(shape)}")
        if nbytes:
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
        self._next += 1

    def close(self) -> None:
        """Finish: check that everything was written, fsync, and move the file into place."""
        if self._next != len(self._order):
            self.abort()
            raise ValueError(f"only {self._next} of {len(self._order)} declared tensors were written")
        if self._rewrite is not None:
            self._f.seek(8)
            self._f.write(self._rewrite)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temp file."""
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
