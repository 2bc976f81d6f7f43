"""SwitchHead attention: dense Q and K, mixture-of-experts V and O (per-head sigmoid top-K_A), RoPE on half dims."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeut_ds.experts import ExpertBackend
from moeut_ds.model.rope import RopeTables, rotated_heads
from moeut_ds.model.linear import as_router_logits, linear_split

KVCache = dict[str, torch.Tensor]   # {"k": rotated keys [B, H, T, d_h], "v": mixed values [B, H, T, d_h]}


@torch.no_grad()
def renorm_rows_keep_std(w: torch.Tensor) -> None:
    """Rescale every row to the same L2 norm, keeping the tensor's global std (spec 1.4)."""
    std = w.std()
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(std / w.std())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q.k) v with no extra scaling (1/sqrt(d_h) is already in q and k). q may be a suffix of k."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)


class SwitchHead(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int, n_experts: int, k: int, expert_dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.d_head, self.n_experts, self.k = n_heads, d_head, n_experts, k
        self.expert_dropout = expert_dropout
        self.w_q = nn.Parameter(torch.empty(n_heads * d_head, d_model))
        self.w_k = nn.Parameter(torch.empty(n_heads * d_head, d_model))
        if n_experts > 1:
            self.w_v = nn.Parameter(torch.empty(n_heads * n_experts, d_model, d_head))   # expert = head*N_A + e
            self.w_o = nn.Parameter(torch.empty(n_heads * n_experts, d_head, d_model))
            self.router_v = nn.Parameter(torch.empty(n_heads * n_experts, d_model))
        else:   # N_A = 1: dense V and O, each head's output gated by sigmoid(xn @ router_o) (as the reference)
            self.w_v = nn.Parameter(torch.empty(n_heads * d_head, d_model))
            self.w_o = nn.Parameter(torch.empty(d_model, n_heads * d_head))
            self.register_parameter("router_v", None)
        self.router_o = nn.Parameter(torch.empty(n_heads * n_experts, d_model))

    @torch.no_grad()
    def reset_parameters(self, std_scale: float) -> None:
        d_model = self.w_q.shape[1]
        for w in (self.w_q, self.w_k, self.w_v):
            nn.init.normal_(w, 0, std_scale / math.sqrt(d_model))
        nn.init.normal_(self.w_o, 0, std_scale / math.sqrt(self.n_heads * self.d_head))
        for w in (self.router_v, self.router_o):
            if w is not None:
                nn.init.normal_(w, 0, std_scale / math.sqrt(d_model))
                renorm_rows_keep_std(w)

    def _route(self, scores: torch.Tensor, backend: ExpertBackend):
        """scores: one router's GEMM output [B, T, H*N_A]. Returns the raw logits [B, T, H, N_A] (fp32, for the
        regulariser) and the per-head sigmoid top-K_A routing."""
        logits = as_router_logits(scores).view(*scores.shape[:-1], self.n_heads, self.n_experts)
        selection = logits
        if self.training and self.expert_dropout > 0:
            selection = logits.masked_fill(torch.rand_like(logits) < self.expert_dropout, float("-inf"))
        return logits, backend.route(selection.reshape(-1, self.n_heads, self.n_experts), self.k)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, H*d_h] -> [B, H, T, d_h]"""
        return t.view(*t.shape[:2], self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, xn: torch.Tensor, x: torch.Tensor, backend: ExpertBackend, rope: Optional[RopeTables],
                cache: Optional[KVCache] = None
                ) -> tuple[torch.Tensor, Optional[KVCache], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """xn: LayerNorm'd input (Q, K, routers); x: raw residual (V); rope: the model's tables for these positions.

        Returns the output [B, T, d], the new cache, the raw router logits {"v", "o"} and the tokens routed to each
        expert {"v", "o"} ([H*N_A], expert head * N_A + e); both dicts are empty when N_A = 1."""
        bsz, seq, d_model = x.shape
        scale = self.d_head ** -0.25
        routers = [self.router_v, self.router_o] if self.n_experts > 1 else [self.router_o]
        q, k, *scores = linear_split(xn, [self.w_q, self.w_k, *routers])     # everything that reads xn: one GEMM
        q, k = rotated_heads(q, self.n_heads, scale, rope), rotated_heads(k, self.n_heads, scale, rope)
        logits: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        if self.n_experts > 1:
            logits["v"], routing_v = self._route(scores[0], backend)
            logits["o"], routing_o = self._route(scores[1], backend)
            counts = {"v": routing_v.counts, "o": routing_o.counts}
            group = self.n_heads * self.k
            v = backend.matmul(x.reshape(-1, d_model), self.w_v, routing_v, in_group=group, out_group=self.k)
            v = v.view(bsz, seq, self.n_heads, self.d_head).transpose(1, 2)
        else:
            o_gate = torch.sigmoid(scores[0])                                          # [B, T, H]
            v = self._heads(F.linear(x, self.w_v))
        if cache is not None:
            k = torch.cat([cache["k"], k], dim=-2) if cache else k
            v = torch.cat([cache["v"], v], dim=-2) if cache else v
            cache = {"k": k, "v": v}
        a = attend(q, k, v).transpose(1, 2)                                              # [B, T, H, d_h]
        if self.n_experts > 1:
            out = backend.matmul(a.reshape(-1, self.d_head), self.w_o, routing_o, in_group=self.k, out_group=group)
        else:
            out = F.linear((a * o_gate.unsqueeze(-1).to(a.dtype)).flatten(2), self.w_o)
        return out.view(bsz, seq, d_model), cache, logits, counts
