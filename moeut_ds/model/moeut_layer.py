"""One MoEUT layer: SwitchHead attention + σ-MoE feed-forward with peri-LN (pre-LN / post-LN as ablations)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from moeut_ds.config import ModelConfig
from moeut_ds.experts import ExpertBackend
from moeut_ds.model.rope import RopeTables
from moeut_ds.model.sigma_moe import SigmaMoE
from moeut_ds.model.switchhead import KVCache, SwitchHead

# new residual, KV cache, and by router ("ff", "v", "o") the raw logits and the tokens routed to each expert
LayerOutput = tuple[torch.Tensor, Optional[KVCache], dict[str, torch.Tensor], dict[str, torch.Tensor]]


class MoEUTLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = cfg.norm
        self.ln_att = nn.LayerNorm(cfg.d_model)
        self.attention = SwitchHead(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.att_n_experts, cfg.att_k,
                                    cfg.att_expert_dropout)
        self.ln_ff = nn.LayerNorm(cfg.d_model)
        self.ffn = SigmaMoE(cfg.d_model, cfg.ff_n_experts, cfg.ff_expert_size, cfg.ff_k, cfg.ff_expert_dropout)

    @torch.no_grad()
    def reset_parameters(self, n_layers: int) -> None:
        # sqrt(2 / L) for peri- and pre-LN; the authors' post-LN runs keep 1 (their training code's choice)
        std_scale = 1.0 if self.norm == "post" else math.sqrt(2.0 / n_layers)
        self.attention.reset_parameters(std_scale)
        self.ffn.reset_parameters(std_scale)
        for ln in (self.ln_att, self.ln_ff):
            ln.reset_parameters()

    def forward(self, x: torch.Tensor, backend: ExpertBackend, rope: Optional[RopeTables],
                cache: Optional[KVCache] = None) -> LayerOutput:
        """Returns the new residual, the KV cache, and the raw router logits and per-expert token counts
        {"ff", "v", "o"} of this application. rope: the model's rotary tables for this call's positions
        (model/rope.py)."""
        if self.norm == "peri":     # LN only in front of what feeds a softmax/sigmoid; V and experts read raw x
            xn = self.ln_att(x)
            att, cache, logits, counts = self.attention(xn, x, backend, rope, cache)
            x = x + att
            ff, logits["ff"], counts["ff"] = self.ffn(x, self.ln_ff(x), backend)
            return x + ff, cache, logits, counts
        if self.norm == "pre":
            xn = self.ln_att(x)
            att, cache, logits, counts = self.attention(xn, xn, backend, rope, cache)
            x = x + att
            xn = self.ln_ff(x)
            ff, logits["ff"], counts["ff"] = self.ffn(xn, xn, backend)
            return x + ff, cache, logits, counts
        att, cache, logits, counts = self.attention(x, x, backend, rope, cache)      # post-LN
        x = self.ln_att(x + att)
        ff, logits["ff"], counts["ff"] = self.ffn(x, x, backend)
        return self.ln_ff(x + ff), cache, logits, counts
