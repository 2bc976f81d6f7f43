"""Rotary position embedding on the first n_rot dims of each head (NeoX "rotate_half" convention)."""
from __future__ import annotations

from typing import Optional

import torch

RopeTables = tuple[torch.Tensor, torch.Tensor]     # cos, sin of every position's angles: [T, n_rot] fp32

# Positions the model keeps precomputed tables for (non-persistent buffers, 4 MB at n_rot 64); longer sequences
# compute theirs per call.
TABLE_POSITIONS = 8192


def rope_tables(n_rot: int, base: float, seq: int, offset: int = 0,
                device: Optional[torch.device] = None) -> Optional[RopeTables]:
    """cos and sin for positions offset .. offset + seq - 1 (None when nothing rotates); frequencies over the
    rotated slice only. The model keeps them as buffers (LanguageModel.rope): computed inside the forward pass,
    torch.compile fuses the table into every q/k kernel, which then evaluates pow, sin and cos per element, forward
    and backward (16 ms of a compiled MoEUT-244M step on an H200, 32 ms of dense-244M's; PERFORMANCE.md)."""
    if n_rot == 0:
        return None
    inv_freq = 1.0 / (base ** (torch.arange(0, n_rot, 2, device=device, dtype=torch.float32) / n_rot))
    pos = torch.arange(offset, offset + seq, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, tables: Optional[RopeTables]) -> torch.Tensor:
    """x [B, H, T, d_h]: rotate dims [:n_rot] by position with rope_tables(n_rot, ..., seq=T) (None: unchanged).
    Any layout whose dims broadcast against the tables works: x [B, T, H, d_h] with tables [T, 1, n_rot].
    The rotation runs against the fp32 tables and rounds once to x's dtype, as the authors' code does under bf16
    autocast (its fp32 result is cast once, by attention); rounding the tables to bf16 first would add ~2^-9
    relative error per product."""
    if tables is None:
        return x
    cos, sin = tables
    n_rot = cos.shape[-1]
    rot, keep = x[..., :n_rot].float(), x[..., n_rot:]
    return torch.cat(((rot * cos + rotate_half(rot) * sin).to(x.dtype), keep), dim=-1)


def rotated_heads(t: torch.Tensor, n_heads: int, scale: float, tables: Optional[RopeTables]) -> torch.Tensor:
    """A projection [B, T, H*d_h] -> scale * RoPE(t) as heads [B, H, T, d_h], rotated before the head transpose:
    then RoPE's backward writes in the projection's [B, T, H*d_h] order and, under torch.compile, fuses into the
    kernel that makes the projection's input gradient operand; rotated after the transpose, it wrote a separate
    [B, H, T, d_h] buffer that a second kernel read transposed into the fused Q/K/router GEMM's gradient
    (MoEUT-244M on an H200: 0.47 -> 0.08 ms per layer, kernel time per compiled step 266.6 -> 260.7 ms; eleventh
    session in PERFORMANCE.md)."""
    t = t.view(*t.shape[:2], n_heads, -1) * scale
    if tables is not None:
        t = apply_rope(t, (tables[0].unsqueeze(1), tables[1].unsqueeze(1)))     # [T, 1, n_rot]: over heads
    return t.transpose(1, 2)
