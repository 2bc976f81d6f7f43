"""The language model: embedding -> L layer applications (G distinct layers, "abab"/"aabb") -> LN -> LM head."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint

from moeut_ds.config import ModelConfig
from moeut_ds.experts import ExpertBackend, get_backend
from moeut_ds.model.dense import DenseLayer
from moeut_ds.model.moeut_layer import MoEUTLayer
from moeut_ds.model.regularizer import entropy_regularizer
from moeut_ds.model.rope import TABLE_POSITIONS, RopeTables, rope_tables
from moeut_ds.model.switchhead import KVCache

RouterLog = dict[str, list[torch.Tensor]]   # {"ff"|"v"|"o": router logits of each application}
ExpertCounts = dict[str, torch.Tensor]       # {"ff"|"v"|"o": int64 [experts]: tokens routed to each expert}


@dataclass
class LMOutput:
    logits: torch.Tensor                            # [B, T, V]
    reg_loss: torch.Tensor                          # entropy regulariser (0 outside training and for dense)
    cache: Optional[list[KVCache]] = None           # one KV cache per layer application
    expert_counts: Optional[list[ExpertCounts]] = None  # per distinct layer, all its applications, when requested


class LanguageModel(nn.Module):
    """MoEUT (arch "moeut"; G = L with N_A = 1 is the σ-MoE baseline) or the dense baseline (arch "dense")."""

    def __init__(self, cfg: ModelConfig, expert_backend: Union[str, ExpertBackend] = "auto"):
        super().__init__()
        self.cfg = cfg.validate()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        layer_cls = MoEUTLayer if cfg.arch == "moeut" else DenseLayer
        self.layers = nn.ModuleList(layer_cls(cfg) for _ in range(cfg.n_distinct_layers))
        self.schedule = cfg.layer_schedule()
        # The post-LN ablation as the authors' training code runs it: embeddings x sqrt(d) through a LayerNorm
        # without weights into the first layer, and no final LayerNorm (every layer already ends with one).
        self.post_ln = cfg.arch == "moeut" and cfg.norm == "post"
        self.in_norm = nn.LayerNorm(cfg.d_model, elementwise_affine=False) if self.post_ln else nn.Identity()
        self.out_norm = nn.Identity() if self.post_ln else nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        tables = rope_tables(cfg.n_rotate, cfg.rope_base, TABLE_POSITIONS)
        self.register_buffer("rope_cos", tables[0] if tables else None, persistent=False)
        self.register_buffer("rope_sin", tables[1] if tables else None, persistent=False)
        self.set_expert_backend(expert_backend)
        self.activation_checkpointing = False
        self.reset_parameters()

    def set_expert_backend(self, backend: Union[str, ExpertBackend]) -> None:
        """Swap the kernels behind every MoE projection; the weights are untouched."""
        self.expert_backend = get_backend(backend) if isinstance(backend, str) else backend

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Keep only each layer application's input for backward and recompute the rest when it is needed: one
        extra forward pass of the layers per step, for activation memory ~L x d per token instead of everything
        the layers save (a training-time setting, like the backend: not part of the config or the weights)."""
        self.activation_checkpointing = enabled

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding.weight, 0.0, self.cfg.d_model ** -0.5)
        for layer in self.layers:
            layer.reset_parameters(self.cfg.n_layers)
        if not self.post_ln:
            self.out_norm.reset_parameters()
        self.lm_head.reset_parameters()

    def forward(self, tokens: torch.Tensor, cache: Optional[list[KVCache]] = None,
                return_expert_counts: bool = False) -> LMOutput:
        """tokens [B, T] -> logits [B, T, V]. Pass cache=[] to start incremental decoding (see generation.py).
        return_expert_counts: also count the experts each token was routed to (after expert dropout), per distinct
        layer and router, summed over the layer's applications. They come from the routing's own sort (no top-k of
        returned logits, no host sync): a top-k per micro-batch cost ~50 ms per MoEUT-244M step."""
        x = self.embedding(tokens)
        if self.post_ln:
            x = self.in_norm(x * self.cfg.d_model ** 0.5)
        collect = self.cfg.arch == "moeut" and self.training
        logs: Optional[list[RouterLog]] = (
            [{"ff": [], "v": [], "o": []} for _ in self.layers] if collect else None)
        counts: Optional[list[ExpertCounts]] = [{} for _ in self.layers] if return_expert_counts else None
        new_cache: Optional[list[KVCache]] = [] if cache is not None else None
        offset = cache[0]["k"].shape[-2] if cache and cache[0] else 0     # tokens already in the KV cache
        rope = self.rope(offset, tokens.shape[1])
        # per-pass backend state (e.g. one bf16 copy of each shared expert weight); none inside a traced graph
        with contextlib.nullcontext() if torch.compiler.is_compiling() else self.expert_backend.forward_context():
            for i, g in enumerate(self.schedule):
                layer_cache = (cache[i] if i < len(cache) else {}) if cache is not None else None
                if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                    # non-reentrant: any outputs (the router logits dict), and collectives inside (expert
                    # parallelism) rerun in the same order on every rank during backward
                    x, layer_cache, logits, counted = torch.utils.checkpoint.checkpoint(
                        self.layers[g], x, self.expert_backend, rope, None, use_reentrant=False)
                else:
                    x, layer_cache, logits, counted = self.layers[g](x, self.expert_backend, rope, layer_cache)
                if logs is not None:
                    for key, value in logits.items():
                        logs[g][key].append(value)
                if counts is not None:
                    for key, c in counted.items():
                        counts[g][key] = counts[g][key] + c if key in counts[g] else c
                if new_cache is not None:
                    new_cache.append(layer_cache)
        logits = self.lm_head(self.out_norm(x))
        reg = None
        if logs is not None:
            reg = entropy_regularizer(logs, self.cfg.ff_entropy_reg, self.cfg.att_entropy_reg)
        if reg is None:
            reg = logits.new_zeros((), dtype=torch.float32)
        return LMOutput(logits, reg, new_cache, counts)

    def rope(self, offset: int, seq: int) -> Optional[RopeTables]:
        """Rotary tables for positions offset .. offset + seq - 1: slices of the buffers (an input of a compiled
        graph, not recomputed in it), or computed for positions past TABLE_POSITIONS."""
        if self.rope_cos is None:
            return None
        if offset + seq <= self.rope_cos.shape[0]:
            return self.rope_cos[offset:offset + seq], self.rope_sin[offset:offset + seq]
        return rope_tables(self.cfg.n_rotate, self.cfg.rope_base, seq, offset, self.rope_cos.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
