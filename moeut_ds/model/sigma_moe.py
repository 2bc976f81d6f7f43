"""σ-MoE feed-forward: sigmoid router, top-k without renormalisation, ReLU experts of width d_e, dropless."""
from __future__ import annotations

import math
import torch
import torch.nn as nn

from moeut_ds.experts import ExpertBackend
from moeut_ds.model.linear import as_router_logits, linear_split


def router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """x @ router.T as fp32 logits (one GEMM, rows padded for aligned kernels: linear_split)."""
    return as_router_logits(linear_split(x, [router])[0])


class SigmaMoE(nn.Module):
    def __init__(self, d_model: int, n_experts: int, expert_size: int, k: int, expert_dropout: float = 0.0):
        super().__init__()
        self.n_experts, self.k, self.expert_dropout = n_experts, k, expert_dropout
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, expert_size))       # up projections
        self.w2 = nn.Parameter(torch.empty(n_experts, expert_size, d_model))       # down projections
        self.router = nn.Parameter(torch.empty(n_experts, d_model))                # W_s

    @torch.no_grad()
    def reset_parameters(self, std_scale: float) -> None:
        d_model, expert_size = self.w1.shape[1], self.w1.shape[2]
        nn.init.normal_(self.w1, 0, std_scale / math.sqrt(d_model))
        nn.init.normal_(self.w2, 0, std_scale / math.sqrt(self.n_experts * expert_size))
        nn.init.normal_(self.router, 0, std_scale / math.sqrt(d_model))   # the training code keeps raw rows

    def forward(self, x: torch.Tensor, router_in: torch.Tensor,
                backend: ExpertBackend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] feeds the experts, router_in [B, T, d] (LayerNorm'd under peri-LN) feeds the router.

        Returns the output, the raw router logits s [B, T, N_E] (for the regulariser) and the tokens routed to each
        expert [N_E] (for usage statistics). The logits are a module output, not a side channel, so that ZeRO-3's
        backward hooks see the regulariser's gradient path."""
        logits = router_logits(router_in, self.router)
        selection = logits
        if self.training and self.expert_dropout > 0:
            selection = logits.masked_fill(torch.rand_like(logits) < self.expert_dropout, float("-inf"))
        routing = backend.route(selection.reshape(-1, 1, self.n_experts), self.k)
        y = backend.mlp(x.reshape(-1, x.shape[-1]), self.w1, self.w2, routing)
        return y.view_as(x), logits, routing.counts
