"""SMILE: zero-shot Sparse MIxture of Low-rank Experts (Tang et al., arXiv 2408.10174), for open_clip image towers.

Every linear layer y = W_pre x + b_pre of the image tower becomes

    y = W_pre x + b_pre + Σ_{t ∈ top_k(x)} w_t(x) · (U_t diag(σ_t) V_tᵀ x + (b_t − b_pre))

where U_t σ_t V_t are the first k singular triplets of the task-t weight delta Δ_t = W_t − W_pre (k = -1: the full
delta, no truncation). The router is data-free, per layer and per token: the gate logit of task t is
‖V_t[:, :gate_k]ᵀ x‖₂ (how much of x lies in the input subspace task t's fine-tuning changed), p = softmax over
tasks, the top_k tasks are kept and their probabilities renormalised to sum to 1. With a single task the gate is
constant 1 (the layer is W_pre + rank-k Δ).

Facts taken from FusionBench's implementation (tanganke/fusion_bench@54c9e8c, files
fusion_bench/models/smile_moe/linear_from_module.py and fusion_bench/method/smile_upscaling/smile_upscaling.py):
- the gate uses the right singular vectors of the weight *difference* (`routing_use_diff: true`), unweighted by σ;
- experts are (σ·Vᵀ then U) with the bias difference b_t − b_pre, scaled by the renormalised top-k weight;
- only `nn.Linear` layers are upscaled; every other parameter stays the pretrained one (`average_experts: false`;
  `true` replaces them by the mean of the endpoints);
- a layer whose deltas are all zero is left as the pretrained linear layer.
open_clip packs the attention's q, k and v projections into one `in_proj_weight` (3D × D); FusionBench's CLIP
(transformers) has separate q_proj / k_proj / v_proj layers, each with its own gate, so here the packed weight is
split into three SMILE layers and the attention is recomputed from them (`SmileMultiheadAttention`).

Memory: endpoints are read one parameter at a time and only the truncated factors are kept, so the build streams
(peak = one parameter of one endpoint plus the factors kept so far). Factors come from the MASS factor store when it
holds at least max(gate_k, k) components of that parameter (never for the split q/k/v slices: the store factors the
packed matrix), so nothing is decomposed twice.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mass_exp.merging.task_vectors import StateDict, check_endpoints

__all__ = ["SmileLinear", "SmileMultiheadAttention", "smile_visual", "smile_stats"]

log = logging.getLogger(__name__)

Factors = tuple[Tensor, Tensor, Tensor]  # U (m×r), σ (r), V (n×r)


def _svd(delta: Tensor, r: int) -> Factors:
    """First r singular triplets of delta (exact, float32)."""
    from mass_exp.merging.factors import truncated_svd

    return truncated_svd(delta, r, "exact")


class SmileLinear(nn.Module):
    """A SMILE layer: pretrained linear + per-token top-k mixture of per-task (low-rank) delta experts.

    Buffers: `w_pre` (out, in), `b_pre` (out) or None, `gate` (T·g, in) rows = the first g right singular vectors
    of each task's delta, `expert_u` (T, out, k) and `expert_svh` (T, k, in) for low-rank experts or `expert_w`
    (T, out, in) for full-rank ones (k = -1), `expert_b` (T, out) bias deltas (zeros when there is no bias).
    """

    def __init__(self, w_pre: Tensor, b_pre: Tensor | None, gate: Tensor, gate_k: int, expert_b: Tensor, *,
                 top_k: int, expert_u: Tensor | None = None, expert_svh: Tensor | None = None,
                 expert_w: Tensor | None = None):
        super().__init__()
        if (expert_w is None) == (expert_u is None or expert_svh is None):
            raise ValueError("give either expert_w (full-rank experts) or expert_u and expert_svh (low-rank)")
        self.out_features, self.in_features = int(w_pre.shape[0]), int(w_pre.shape[1])
        self.num_experts = int(expert_b.shape[0])
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = min(int(top_k), self.num_experts)
        self.gate_k = int(gate_k)
        self.k = -1 if expert_w is not None else int(expert_u.shape[-1])
        self.register_buffer("w_pre", w_pre.detach().float().contiguous())
        self.register_buffer("b_pre", None if b_pre is None else b_pre.detach().float().contiguous())
        self.register_buffer("gate", gate.detach().float().contiguous())
        self.register_buffer("expert_b", expert_b.detach().float().contiguous())
        self.register_buffer("expert_u", None if expert_u is None else expert_u.detach().float().contiguous())
        self.register_buffer("expert_svh", None if expert_svh is None else expert_svh.detach().float().contiguous())
        self.register_buffer("expert_w", None if expert_w is None else expert_w.detach().float().contiguous())

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_factors(cls, w_pre: Tensor, b_pre: Tensor | None, factors: Sequence[Factors],
                     b_ft: Sequence[Tensor | None] | None, *, gate_k: int, k: int, top_k: int,
                     full_deltas: Sequence[Tensor] | None = None) -> "SmileLinear":
        """From each task's (at least max(gate_k, k) components of) SVD factors of its weight delta.

        `full_deltas` (the deltas themselves) are needed for k = -1. `b_ft[t]` is task t's bias (None: no bias).
        """
        if gate_k < 1:
            raise ValueError(f"gate_k must be >= 1, got {gate_k}")
        if k == 0 or k < -1:
            raise ValueError(f"k must be >= 1 or -1 (full-rank experts), got {k}")
        num = len(factors)
        if num < 1:
            raise ValueError("SMILE needs at least one fine-tuned task")
        r = min(w_pre.shape)
        g = min(gate_k, r)
        gate = torch.cat([f[2][:, :g].T for f in factors], dim=0)
        if gate.shape[0] != num * g:
            raise ValueError(f"factors hold fewer than gate_k={g} components")
        if b_pre is None:
            eb = torch.zeros(num, w_pre.shape[0])
        else:
            eb = torch.stack([(b.float() - b_pre.float()) if b is not None else torch.zeros_like(b_pre, dtype=torch.float32)
                              for b in (b_ft or [None] * num)])
        if k == -1:
            if full_deltas is None:
                raise ValueError("k = -1 (full-rank experts) needs the full deltas")
            return cls(w_pre, b_pre, gate, g, eb, top_k=top_k, expert_w=torch.stack([d.float() for d in full_deltas]))
        kk = min(k, r)
        if any(f[0].shape[1] < kk for f in factors):
            raise ValueError(f"factors hold fewer than k={kk} components")
        u = torch.stack([f[0][:, :kk] for f in factors])
        svh = torch.stack([(f[1][:kk, None] * f[2][:, :kk].T) for f in factors])
        return cls(w_pre, b_pre, gate, g, eb, top_k=top_k, expert_u=u, expert_svh=svh)

    @classmethod
    def from_weights(cls, w_pre: Tensor, b_pre: Tensor | None, w_ft: Tensor, b_ft: Tensor | None, *, gate_k: int,
                     k: int, top_k: int) -> "SmileLinear":
        """SMILE layer from the pretrained weight (out, in), bias (out), and the T fine-tuned weights (T, out, in) and
        biases (T, out). k = -1 gives full-rank experts. Returns a module mapping (..., in) -> (..., out)."""
        w_ft = torch.as_tensor(w_ft)
        if w_ft.dim() != 3 or tuple(w_ft.shape[1:]) != tuple(w_pre.shape):
            raise ValueError(f"w_ft must be (T, {w_pre.shape[0]}, {w_pre.shape[1]}), got {tuple(w_ft.shape)}")
        deltas = [w_ft[t].float() - w_pre.float() for t in range(w_ft.shape[0])]
        r = max(gate_k, k if k > 0 else 0)
        factors = [_svd(d, r) for d in deltas]
        biases = [b_ft[t] for t in range(w_ft.shape[0])] if b_ft is not None else None
        return cls.from_factors(w_pre, b_pre, factors, biases, gate_k=gate_k, k=k, top_k=top_k,
                                full_deltas=deltas if k == -1 else None)

    # ------------------------------------------------------------------------------------------------ forward

    @property
    def weight(self) -> Tensor:  # like nn.Linear (device / dtype queries)
        return self.w_pre

    @property
    def bias(self) -> Tensor | None:
        return self.b_pre

    def gate_logits(self, x: Tensor) -> Tensor:
        """(N, in) -> (N, T): ‖V_t[:, :g]ᵀ x‖₂ per task (ones with a single task)."""
        if self.num_experts == 1:
            return torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
        return F.linear(x, self.gate.to(x.dtype)).view(x.shape[0], self.num_experts, self.gate_k).norm(p=2, dim=2)

    def routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights (N, top_k), experts (N, top_k)): softmax of the gate logits, top-k, renormalised."""
        probs = F.softmax(self.gate_logits(x), dim=1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), idx

    def expert(self, t: int, x: Tensor) -> Tensor:
        if self.expert_w is not None:
            return F.linear(x, self.expert_w[t].to(x.dtype), self.expert_b[t].to(x.dtype))
        h = F.linear(x, self.expert_svh[t].to(x.dtype))
        return F.linear(h, self.expert_u[t].to(x.dtype), self.expert_b[t].to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        h = x.reshape(-1, self.in_features)
        out = F.linear(h, self.w_pre.to(h.dtype), None if self.b_pre is None else self.b_pre.to(h.dtype))
        weights, experts = self.routing(h)
        for t in range(self.num_experts):
            tok, slot = torch.where(experts == t)
            if tok.numel() == 0:
                continue
            y = self.expert(t, h.index_select(0, tok)) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, gate_k={self.gate_k}, k={self.k}")


class SmileMultiheadAttention(nn.Module):
    """Drop-in for open_clip's `nn.MultiheadAttention` with separate (SMILE or plain) q, k, v and out projections."""

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, out_proj: nn.Module, num_heads: int,
                 batch_first: bool = True):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.num_heads = int(num_heads)
        self.batch_first = bool(batch_first)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False,
                attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None, **_: object):
        if key_padding_mask is not None:
            raise NotImplementedError("key_padding_mask is not supported by SmileMultiheadAttention")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, lq, d = query.shape
        lk = key.shape[1]
        hd = d // self.num_heads
        q = self.q_proj(query).view(b, lq, self.num_heads, hd).transpose(1, 2)
        k = self.k_proj(key).view(b, lk, self.num_heads, hd).transpose(1, 2)
        v = self.v_proj(value).view(b, lk, self.num_heads, hd).transpose(1, 2)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.out_proj(o.transpose(1, 2).reshape(b, lq, d))
        if not self.batch_first:
            o = o.transpose(0, 1)
        return o, None


# ---------------------------------------------------------------------------------------------------- the model


def _store_factors(factors, name: str, r: int, num_tasks: int) -> list[Factors] | None:
    """The store's factors of `name` when it holds at least r components of every task's delta, else None."""
    if factors is None or factors.num_tasks != num_tasks or name not in factors.names or not factors.is_matrix(name):
        return None
    if factors.rank(name) < r:
        return None
    return [tuple(x.float() for x in factors.factors(t, name)) for t in range(num_tasks)]


def _build_layer(name: str, w_pre: Tensor, b_pre: Tensor | None, read_w, read_b, num_tasks: int, *, gate_k: int,
                 k: int, top_k: int, factors=None, stats: dict | None = None) -> nn.Module:
    """One SMILE layer (or the plain pretrained linear if every delta is zero). `read_w(t)` / `read_b(t)` read task
    t's weight / bias of this layer (one at a time, so memory does not grow with T)."""
    r = min(max(gate_k, k if k > 0 else 0), min(w_pre.shape))
    stored = _store_factors(factors, name, r, num_tasks) if k != -1 else None
    fac: list[Factors] = []
    full: list[Tensor] = []
    biases = []
    nonzero = False
    for t in range(num_tasks):
        biases.append(read_b(t) if b_pre is not None else None)
        if stored is not None:
            fac.append(stored[t])
            nonzero = nonzero or bool(stored[t][1].abs().sum() > 0)
            continue
        d = read_w(t).float() - w_pre.float()
        nonzero = nonzero or bool(d.abs().sum() > 0)
        fac.append(_svd(d, r))
        if k == -1:
            full.append(d)
    if stats is not None:
        stats["from_store" if stored is not None else "decomposed"] += 1
    if not nonzero:
        lin = nn.Linear(w_pre.shape[1], w_pre.shape[0], bias=b_pre is not None)
        with torch.no_grad():
            lin.weight.copy_(w_pre)
            if b_pre is not None:
                lin.bias.copy_(b_pre)
        return lin
    return SmileLinear.from_factors(w_pre, b_pre, fac, biases, gate_k=gate_k, k=k, top_k=top_k,
                                    full_deltas=full if k == -1 else None)


def smile_visual(template: nn.Module, pretrained: StateDict, finetuned: Sequence[StateDict], *, gate_k: int = 16,
                 k: int = 32, top_k: int = 2, average_experts: bool = False, factors=None,
                 stats: dict | None = None) -> nn.Module:
    """The SMILE image tower: a copy of `template` (an open_clip VisionTransformer) with the pretrained weights,
    every linear layer (attention q/k/v split out of in_proj, out_proj, mlp.c_fc, mlp.c_proj, any other nn.Linear)
    upscaled to a `SmileLinear`. `factors` (a FactorStore of the same endpoints) supplies SVDs where its ranks allow.
    """
    check_endpoints(pretrained, finetuned)
    t0 = time.time()
    num = len(finetuned)
    stats = stats if stats is not None else {}
    stats.setdefault("from_store", 0)
    stats.setdefault("decomposed", 0)
    visual = copy.deepcopy(template).float()
    sd = {name: pretrained[name] for name in pretrained}
    linear_params: set[str] = set()
    for mname, mod in visual.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            linear_params |= {f"{mname}.in_proj_weight", f"{mname}.in_proj_bias"}
        if isinstance(mod, nn.Linear):
            linear_params |= {f"{mname}.weight", f"{mname}.bias"}
    if average_experts:  # FusionBench's `average_experts`: non-linear leaves become the mean of the endpoints
        for name in sd:
            if name not in linear_params:
                sd[name] = sum(ft[name].float() for ft in finetuned) / num
    visual.load_state_dict(sd)
    kw = dict(gate_k=gate_k, k=k, top_k=top_k, factors=factors, stats=stats)

    def parent_and_attr(mname: str):
        parent = visual.get_submodule(mname.rsplit(".", 1)[0]) if "." in mname else visual
        return parent, mname.rsplit(".", 1)[-1]

    modules = [(n, m) for n, m in visual.named_modules() if isinstance(m, (nn.MultiheadAttention, nn.Linear))]
    inside_attn = {f"{n}.out_proj" for n, m in modules if isinstance(m, nn.MultiheadAttention)}
    for mname, mod in tqdm(modules, desc=f"SMILE upscaling ({num} tasks)", leave=False):
        if mname in inside_attn:
            continue
        if isinstance(mod, nn.MultiheadAttention):
            if not getattr(mod, "_qkv_same_embed_dim", True) or mod.in_proj_weight is None:
                raise NotImplementedError(f"{mname}: attention with separate q/k/v weights is not supported")
            d = mod.embed_dim
            wn, bn = f"{mname}.in_proj_weight", f"{mname}.in_proj_bias"
            has_b = mod.in_proj_bias is not None
            projs = []
            for j, part in enumerate("qkv"):
                sl = slice(j * d, (j + 1) * d)
                projs.append(_build_layer(
                    f"{wn}[{part}]", sd[wn][sl], sd[bn][sl] if has_b else None,
                    lambda t, sl=sl: finetuned[t][wn][sl], lambda t, sl=sl: finetuned[t][bn][sl], num, **kw))
            on = f"{mname}.out_proj"
            ob = mod.out_proj.bias is not None
            out = _build_layer(f"{on}.weight", sd[f"{on}.weight"], sd[f"{on}.bias"] if ob else None,
                               lambda t: finetuned[t][f"{on}.weight"], lambda t: finetuned[t][f"{on}.bias"], num, **kw)
            parent, attr = parent_and_attr(mname)
            setattr(parent, attr, SmileMultiheadAttention(*projs, out, mod.num_heads, batch_first=mod.batch_first))
        else:
            has_b = mod.bias is not None
            new = _build_layer(f"{mname}.weight", sd[f"{mname}.weight"], sd[f"{mname}.bias"] if has_b else None,
                               lambda t: finetuned[t][f"{mname}.weight"], lambda t: finetuned[t][f"{mname}.bias"],
                               num, **kw)
            parent, attr = parent_and_attr(mname)
            setattr(parent, attr, new)
    stats["build_s"] = time.time() - t0
    stats["extra_bytes"] = smile_stats(visual)["expert_bytes"]
    log.info("SMILE (gate_k=%d, k=%d, top_k=%d) over %d tasks built in %.2fs: %d layers from the factor store, %d "
             "decomposed, %.1f MB of gates and experts", gate_k, k, top_k, num, stats["build_s"], stats["from_store"],
             stats["decomposed"], stats["extra_bytes"] / 2**20)
    return visual.eval()


def smile_stats(visual: nn.Module) -> dict[str, int]:
    """Counts and sizes of the SMILE layers of a model (gates + experts, beyond the pretrained weights)."""
    layers = [m for m in visual.modules() if isinstance(m, SmileLinear)]
    extra = 0
    for m in layers:
        for name in ("gate", "expert_u", "expert_svh", "expert_w", "expert_b"):
            t = getattr(m, name)
            if t is not None:
                extra += t.numel() * t.element_size()
    return {"smile_layers": len(layers), "expert_bytes": extra}


def smile(pretrained: StateDict, finetuned: Sequence[StateDict], *, template: nn.Module, gate_k: int = 16,
          k: int = 32, top_k: int = 2, average_experts: bool = False, factors=None,
          alpha: float | None = None) -> nn.Module:
    """Registry entry (`builds_module`): the SMILE image tower. `alpha` is not used by SMILE."""
    del alpha
    return smile_visual(template, pretrained, finetuned, gate_k=int(gate_k), k=int(k), top_k=int(top_k),
                        average_experts=bool(average_experts), factors=factors)
