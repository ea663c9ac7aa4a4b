"""Linearised (tangent-space) fine-tuning, Ortiz-Jimenez et al., NeurIPS 2023.

The model is replaced by its first-order Taylor expansion around the pretrained weights θ_0,

    f_lin(x; θ_0 + δ) = f(x; θ_0) + J_θ f(x; θ_0) · δ,

and only δ trains. The endpoint is θ_0 + δ, so its task vector is δ: a checkpoint like any other for the mergers.
The Jacobian-vector product is one forward-mode pass (`torch.func.jvp`), about twice a plain step's cost.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel


class LinearizedModel(nn.Module):
    """`model` linearised around its current weights in the parameters that `trainable(name)` selects.

    `model`'s own parameters are frozen (they are θ_0); the trainable offsets δ start at zero, so before training
    the linearised model computes exactly what `model` does.
    """

    def __init__(self, model: nn.Module, trainable: Callable[[str], bool]):
        super().__init__()
        self.model = model
        self.names = [n for n, _ in model.named_parameters() if trainable(n)]
        if not self.names:
            raise ValueError("linearised fine-tuning needs at least one trainable parameter")
        for p in model.parameters():
            p.requires_grad_(False)
        params = dict(model.named_parameters())
        # ParameterDict keys may not contain dots
        self.deltas = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(torch.zeros_like(params[n]))
                                        for n in self.names})

    def _tangents(self) -> dict[str, torch.Tensor]:
        return {n: self.deltas[n.replace(".", "/")] for n in self.names}

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        primals = {n: params[n] for n in self.names}

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.model, p, args)

        # the fused attention kernels (scaled-dot-product and nn.MultiheadAttention's inference fast path) have no
        # forward-mode derivative; the math kernel and the slow path compute the same
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                out, tangent_out = jvp(f, (primals,), (self._tangents(),))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        return out + tangent_out

    @torch.no_grad()
    def endpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """θ_0 + δ as a state dict of the wrapped model (buffers and untrained parameters as they were)."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for n, d in self._tangents().items():
            state[n] = state[n] + d.detach()
        return state
