"""Pass-1 routing features from an open_clip ``VisionTransformer`` (MASS_SPEC "MASS" step 3).

The router reads the input of the MLP of one block, i.e. that block's ``ln_2`` output. This module
reproduces open_clip's own computation up to that point and stops there: no later block, and not
the MLP of the routing block, is run. open_clip >= 2.24 / 3.x is batch-first (B, L, D); older
builds whose transformer is sequence-first (L, B, D) are handled by checking ``batch_first``, and the
CLS token is always taken per sample (never ``x[0]`` of a batch-first tensor, which is sample 0).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn


def routing_param_name(block: int, prefix: str = "") -> str:
    """Name of the matrix whose right singular vectors span the router's input space (step 4)."""
    return f"{prefix}transformer.resblocks.{block}.mlp.c_fc.weight"


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


def routing_tokens(visual: nn.Module, images: Tensor, block: int) -> Tensor:
    """All tokens of resblock ``block``'s ``ln_2`` output, batch-first [B, L, D].

    Runs blocks 0..block-1 in full, then only the attention half of ``block`` and its ``ln_2``.
    """
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
    h = blk.ln_2(_attn_residual(blk, x))
    return h if batch_first else h.transpose(0, 1)


def select_token(tokens: Tensor, token: str = "cls") -> Tensor:
    """[B, L, D] -> [B, D]: ``cls`` = token 0 of each sample; ``mean`` = mean over all L tokens."""
    if token == "cls":
        return tokens[:, 0]
    if token == "mean":
        return tokens.mean(dim=1)
    raise ValueError(f"token must be 'cls' or 'mean', got {token!r}")


def routing_features(visual: nn.Module, images: Tensor, block: int, token: str = "cls") -> Tensor:
    """z [B, D]: the CLS (or mean) token of block ``block``'s MLP input (step 3), without grad."""
    with torch.no_grad():
        return select_token(routing_tokens(visual, images, block), token)


def first_pass_fn(visual: nn.Module, block: int, token: str = "cls") -> Callable[[Tensor], Tensor]:
    """``images -> z`` for :func:`mass_exp.routing.two_pass.two_pass_forward`."""
    return functools.partial(routing_features, visual, block=block, token=token)


def ln2_output_via_hook(visual: nn.Module, images: Tensor, block: int) -> Tensor:
    """Reference: capture block ``block``'s ``ln_2`` output [B, L, D] with a hook during a full forward."""
    captured: list[Tensor] = []
    ln_2 = visual.transformer.resblocks[block].ln_2
    handle = ln_2.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            visual(images)
    finally:
        handle.remove()
    out = captured[0]
    return out if getattr(visual.transformer, "batch_first", True) else out.transpose(0, 1)
