"""Parameter and MAC counts from a ModelConfig (analytic: the flops profiler cannot see custom kernels).

Two MAC counts, per token of a forward pass:
- `paper_macs_per_token`: the paper's formula (spec section 4): attention T^2 term unmasked, V/O router term
  2*N_A*d (not H*N_A), embedding and LM head excluded. Use it to compare with the paper's tables.
- `forward_macs_per_token`: what the code does: causal attention (a query at position t sees t+1 keys, averaged
  over the window), routers of all heads, the LM head; LayerNorms, softmax and other elementwise work are left
  out. This is what the trainer logs (training MACs = 3 x forward).
"""
from __future__ import annotations

import torch

from moeut_ds.config import ModelConfig


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Measured from the real module built on the meta device: total, per distinct layer, embeddings + head."""
    from moeut_ds.model import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(cfg, expert_backend="reference")
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "per_layer": per_layer[0], "layers": sum(per_layer), "embedding_and_head": total - sum(per_layer)}


def paper_macs_per_token(cfg: ModelConfig, context: int = 1024) -> float:
    d, h, dh, t = cfg.d_model, cfg.n_heads, cfg.d_head, context
    if cfg.arch == "dense":
        per_layer = 2 * h * dh * t + 4 * d * h * dh + 2 * d * cfg.d_ff
    else:
        attn = 2 * h * dh * t + (2 + 2 * cfg.att_k) * d * h * dh + 2 * h * cfg.att_k * dh + 2 * cfg.att_n_experts * d
        ff = 2 * cfg.ff_k * d * cfg.ff_expert_size + cfg.ff_n_experts * d
        per_layer = attn + ff
    return float(per_layer * cfg.n_layers)


def forward_macs_per_token(cfg: ModelConfig, context: int = 1024) -> float:
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    attention_core = h * dh * (context + 1)          # q.k and a.v, each over (context + 1) / 2 keys on average
    if cfg.arch == "dense":
        per_layer = 4 * d * h * dh + attention_core + 2 * d * cfg.d_ff
    else:
        if cfg.att_n_experts > 1:
            vo = 2 * cfg.att_k * h * d * dh + 2 * h * cfg.att_n_experts * d     # K_A experts each + both routers
        else:
            vo = 2 * h * d * dh + h * d                                         # dense V/O + output gate
        ff = 2 * cfg.ff_k * d * cfg.ff_expert_size + cfg.ff_n_experts * d
        per_layer = 2 * d * h * dh + vo + attention_core + ff
    return float(per_layer * cfg.n_layers + d * cfg.vocab_size)


def active_parameters(cfg: ModelConfig) -> int:
    """Parameters one token touches in one application of every distinct layer, plus its embedding row, the final
    LayerNorm (none in post-LN) and the LM head (shared layers counted once, as the distinct weights a token can reach per pass)."""
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    if cfg.arch == "dense":
        per_layer = 4 * d * h * dh + 2 * d * cfg.d_ff + cfg.d_ff + d + 4 * d
    else:
        if cfg.att_n_experts > 1:
            vo = 2 * cfg.att_k * h * d * dh + 2 * h * cfg.att_n_experts * d
        else:
            vo = 2 * h * d * dh + h * d
        ff = 2 * cfg.ff_k * d * cfg.ff_expert_size + cfg.ff_n_experts * d
        per_layer = 2 * d * h * dh + vo + ff + 4 * d
    final_norm = 0 if cfg.arch == "moeut" and cfg.norm == "post" else 2 * d      # post-LN has none
    return per_layer * cfg.n_distinct_layers + d + final_norm + d * cfg.vocab_size + cfg.vocab_size
