"""One MoEUT layer: SwitchHead attention + σ-MoE feed-forward with peri-LN (pre-LN / post-LN as ablations)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from moeut_ds.config import ModelConfig
from moeut_ds.experts import ExpertBackend
from moeut_ds.model.sigma_moe import SigmaMoE
from moeut_ds.model.switchhead import KVCache, SwitchHead


class MoEUTLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = cfg.norm
        self.ln_att = nn.LayerNorm(cfg.d_model)
        self.attention = SwitchHead(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.att_n_experts, cfg.att_k,
                                    cfg.n_rotate, cfg.rope_base, cfg.att_expert_dropout)
        self.ln_ff = nn.LayerNorm(cfg.d_model)
        self.ffn = SigmaMoE(cfg.d_model, cfg.ff_n_experts, cfg.ff_expert_size, cfg.ff_k, cfg.ff_expert_dropout)

    @torch.no_grad()
    def reset_parameters(self, n_layers: int) -> None:
        std_scale = math.sqrt(2.0 / n_layers)
        self.attention.reset_parameters(std_scale)
        self.ffn.reset_parameters(std_scale)
        for ln in (self.ln_att, self.ln_ff):
            ln.reset_parameters()

    def forward(self, x: torch.Tensor, backend: ExpertBackend,
                router_log: Optional[dict[str, list[torch.Tensor]]] = None,
                cache: Optional[KVCache] = None) -> tuple[torch.Tensor, Optional[KVCache]]:
        ff_log = None if router_log is None else router_log["ff"]
        if self.norm == "peri":     # LN only in front of what feeds a softmax/sigmoid; V and experts read raw x
            xn = self.ln_att(x)
            att, cache = self.attention(xn, x, backend, router_log, cache)
            x = x + att
            return x + self.ffn(x, self.ln_ff(x), backend, ff_log), cache
        if self.norm == "pre":
            xn = self.ln_att(x)
            att, cache = self.attention(xn, xn, backend, router_log, cache)
            x = x + att
            xn = self.ln_ff(x)
            return x + self.ffn(xn, xn, backend, ff_log), cache
        att, cache = self.attention(x, x, backend, router_log, cache)      # post-LN
        x = self.ln_att(x + att)
        return self.ln_ff(x + self.ffn(x, x, backend, ff_log)), cache
