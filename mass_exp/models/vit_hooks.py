"""Pass-1 routing features from an open_clip ``VisionTransformer`` (MASS_SPEC "MASS" step 3).

The router reads the input of one linear layer of the routing block: by default (``mlp_in``, the paper's) the MLP's
input, i.e. the block's ``ln_2`` output, whose space the right singular vectors of ``mlp.c_fc.weight`` span; with
``attn_in`` the attention's input, i.e. the block's ``ln_1`` output, the input space of ``attn.in_proj_weight``
(for endpoints whose MLPs were not fine-tuned). This module reproduces open_clip's own computation up to that point
and stops there: no later block, and not the MLP (``mlp_in``) or anything of the routing block after ``ln_1``
(``attn_in``), is run. open_clip >= 2.24 / 3.x is batch-first (B, L, D); older
builds whose transformer is sequence-first (L, B, D) are handled by checking ``batch_first``, and the
CLS token is always taken per sample (never ``x[0]`` of a batch-first tensor, which is sample 0).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn


#: router.routing_param -> (the routing block's matrix whose right singular vectors span the router's input space,
#: the block's layer norm whose output is that matrix's input and the router's feature)
ROUTING_PARAMS: dict[str, tuple[str, str]] = {
    "mlp_in": ("mlp.c_fc.weight", "ln_2"),  # the paper's: the MLP's input layer
    "attn_in": ("attn.in_proj_weight", "ln_1"),  # the attention's fused q/k/v input projection (3*width x width)
}


def _routing_param(routing_param: str) -> tuple[str, str]:
    if routing_param not in ROUTING_PARAMS:
        raise ValueError(f"routing_param must be one of {tuple(ROUTING_PARAMS)}, got {routing_param!r}")
    return ROUTING_PARAMS[routing_param]


def routing_param_name(block: int, prefix: str = "", routing_param: str = "mlp_in") -> str:
    """Name of the matrix whose right singular vectors span the router's input space (step 4)."""
    return f"{prefix}transformer.resblocks.{block}.{_routing_param(routing_param)[0]}"


def routing_layer_norm(routing_param: str = "mlp_in") -> str:
    """The routing block's layer norm (``ln_2`` or ``ln_1``) whose output the router reads for ``routing_param``."""
    return _routing_param(routing_param)[1]


def _embed(visual: nn.Module, images: Tensor) -> Tensor:
    """open_clip ``VisionTransformer._embeds``: conv1 -> tokens -> class/pos embedding -> patch_dropout -> ln_pre."""
    if getattr(visual, "input_patchnorm", False):
        raise NotImplementedError("input_patchnorm ViTs are not supported")
    x = visual.conv1(images)  # [B, width, grid, grid]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, grid**2, width]
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def _attn_residual(blk: nn.Module, x: Tensor) -> Tensor:
    """x + ls_1(attention(ln_1(x))) exactly as the block's forward computes it (attn mask None)."""
    ls_1 = getattr(blk, "ls_1", None)
    if ls_1 is None:
        ls_1 = nn.Identity()
    if hasattr(blk, "ln_attn"):  # open_clip CustomResidualAttentionBlock
        return x + ls_1(blk.ln_attn(blk.attn(blk.ln_1(x), attn_mask=None)))
    return x + ls_1(blk.attention(blk.ln_1(x)))


def routing_tokens(visual: nn.Module, images: Tensor, block: int, routing_param: str = "mlp_in") -> Tensor:
    """All tokens of resblock ``block``'s ``ln_2`` (``mlp_in``) or ``ln_1`` (``attn_in``) output, batch-first [B, L, D].

    Runs blocks 0..block-1 in full, then only the attention half of ``block`` and its ``ln_2`` (``mlp_in``), or only
    ``block``'s ``ln_1`` (``attn_in``).
    """
    layer_norm = routing_layer_norm(routing_param)
    blocks = visual.transformer.resblocks
    if not 0 <= block < len(blocks):
        raise IndexError(f"block {block} out of range for {len(blocks)} resblocks")
    batch_first = getattr(visual.transformer, "batch_first", True)
    x = _embed(visual, images)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()  # NLD -> LND, as Transformer.forward does
    for blk in blocks[:block]:
        x = blk(x, attn_mask=None)
    blk = blocks[block]
    h = blk.ln_1(x) if layer_norm == "ln_1" else blk.ln_2(_attn_residual(blk, x))
    return h if batch_first else h.transpose(0, 1)


def select_token(tokens: Tensor, token: str = "cls") -> Tensor:
    """[B, L, D] -> [B, D]: ``cls`` = token 0 of each sample; ``mean`` = mean over all L tokens."""
    if token == "cls":
        return tokens[:, 0]
    if token == "mean":
        return tokens.mean(dim=1)
    raise ValueError(f"token must be 'cls' or 'mean', got {token!r}")


def routing_features(visual: nn.Module, images: Tensor, block: int, token: str = "cls",
                     routing_param: str = "mlp_in") -> Tensor:
    """z [B, D]: the CLS (or mean) token of block ``block``'s MLP input (``mlp_in``) or attention input (``attn_in``)
    (step 3), without grad."""
    with torch.no_grad():
        return select_token(routing_tokens(visual, images, block, routing_param), token)


def first_pass_fn(visual: nn.Module, block: int, token: str = "cls",
                  routing_param: str = "mlp_in") -> Callable[[Tensor], Tensor]:
    """``images -> z`` for :func:`mass_exp.routing.two_pass.two_pass_forward`."""
    return functools.partial(routing_features, visual, block=block, token=token, routing_param=routing_param)


def ln2_output_via_hook(visual: nn.Module, images: Tensor, block: int) -> Tensor:
    """Reference: capture block ``block``'s ``ln_2`` output [B, L, D] with a hook during a full forward."""
    return layer_norm_output_via_hook(visual, images, block, "ln_2")


def layer_norm_output_via_hook(visual: nn.Module, images: Tensor, block: int, layer_norm: str) -> Tensor:
    """Reference: capture block ``block``'s ``layer_norm`` (``ln_1`` or ``ln_2``) output [B, L, D] with a hook during a
    full forward."""
    captured: list[Tensor] = []
    ln = getattr(visual.transformer.resblocks[block], layer_norm)
    handle = ln.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            visual(images)
    finally:
        handle.remove()
    out = captured[0]
    return out if getattr(visual.transformer, "batch_first", True) else out.transpose(0, 1)
