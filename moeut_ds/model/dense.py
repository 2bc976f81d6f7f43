"""The paper's dense baseline layer: pre-LN, multi-head attention (RoPE on half dims), ReLU FFN with bias."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeut_ds.config import ModelConfig
from moeut_ds.model.moeut_layer import LayerOutput
from moeut_ds.model.rope import RopeTables, rotated_heads
from moeut_ds.model.switchhead import KVCache, attend


class DenseLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, inner = cfg.d_model, cfg.n_heads * cfg.d_head
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.ln_att = nn.LayerNorm(d)
        self.w_q, self.w_k, self.w_v = (nn.Linear(d, inner, bias=False) for _ in range(3))
        self.w_o = nn.Linear(inner, d, bias=False)
        self.ln_ff = nn.LayerNorm(d)
        self.ff_up = nn.Linear(d, cfg.d_ff)
        self.ff_down = nn.Linear(cfg.d_ff, d)

    @torch.no_grad()
    def reset_parameters(self, n_layers: int) -> None:
        for lin in (self.w_q, self.w_k, self.w_v, self.w_o, self.ff_up, self.ff_down):
            # truncated at 2 sigma, then rescaled so the realised std is exactly the target (as the authors' code
            # does; truncation alone leaves 0.88 of it)
            nn.init.trunc_normal_(lin.weight, 0.0, 1.0, -2.0, 2.0)
            lin.weight.mul_(math.sqrt(2.0 / (n_layers * lin.in_features)) / lin.weight.std())
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, backend, rope: Optional[RopeTables], cache: Optional[KVCache] = None
                ) -> LayerOutput:
        """Same signature as MoEUTLayer (no routers: the logits and counts dicts are empty)."""
        xn = self.ln_att(x)
        scale = self.d_head ** -0.25
        q = rotated_heads(self.w_q(xn), self.n_heads, scale, rope)
        k = rotated_heads(self.w_k(xn), self.n_heads, scale, rope)
        v = self._heads(self.w_v(xn))
        if cache is not None:
            k = torch.cat([cache["k"], k], dim=-2) if cache else k
            v = torch.cat([cache["v"], v], dim=-2) if cache else v
            cache = {"k": k, "v": v}
        x = x + self.w_o(attend(q, k, v).transpose(1, 2).flatten(2))
        x = x + self.ff_down(F.relu(self.ff_up(self.ln_ff(x))))
        return x, cache, {}, {}
