"""Rotary position embedding on the first n_rot dims of each head (NeoX "rotate_half" convention)."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, n_rot: int, base: float, offset: int = 0) -> torch.Tensor:
    """x [B, H, T, d_h]: rotate dims [:n_rot] by position (offset + t); frequencies over the rotated slice only."""
    if n_rot == 0:
        return x
    seq = x.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, n_rot, 2, device=x.device, dtype=torch.float32) / n_rot))
    pos = torch.arange(offset, offset + seq, device=x.device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot, keep = x[..., :n_rot], x[..., n_rot:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)
