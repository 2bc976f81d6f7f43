"""Several projections of one input as one GEMM."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def linear_split(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[x @ w.T for w in weights] from one GEMM over all the weights' rows, zero-padded to a multiple of 8.

    One GEMM reads x once and gives x one gradient, where separate projections each write a [tokens, d] input
    gradient that autograd then adds (SwitchHead: Q, K and two routers; the narrow routers also run poorly as GEMMs
    of their own). The padding keeps cuBLAS on its aligned bf16 kernels when the total width is not a multiple of
    8 (σ-MoE's N_E = 387 fell back to unaligned ones: ~1.6 ms per layer forward+backward at 244M on an H200).
    The outputs are views of the GEMM's output."""
    w = torch.cat(list(weights)) if len(weights) > 1 else weights[0]
    n_out = w.shape[0]
    if n_out % 8:
        w = F.pad(w, (0, 0, 0, -n_out % 8))
    return list(F.linear(x, w)[..., :n_out].split([v.shape[0] for v in weights], dim=-1))


def as_router_logits(y: torch.Tensor) -> torch.Tensor:
    """A router's GEMM output as the fp32, contiguous logits routing and the regulariser take (one copy)."""
    return y.to(torch.float32, memory_format=torch.contiguous_format)
