"""Expert-pair tiles: a grouped matmul whose rows each hold two pairs (2r, 2r+1) of one routing group, both
summed in registers. SwitchHead's O forward (K_A = 2) gathers one row per (token, head) for both of its experts
and writes wide [d] rows: per pair that costs a [P, d] buffer and a sum of H * 2 rows per token. With the rows
sorted by their (lower, higher) expert pair instead of by expert, a tile's rows share both weights, and a tile
computes g_lo * (A @ W[lo]) + g_hi * (A @ W[hi]): the buffer and its sum hold one row per (token, head), and the
gate-weighted sum over the K_A experts never leaves registers (docs/KERNELS.md, "Expert-pair tiles for the
attention's wide outputs"; the V input-gradient the same way measured slower, its weight gradient's gated store
scattered to the expert plan's positions).

The layout is the routing's (moeut_kernels.routing.sigmoid_topk_route): S pairs per token, G = S / 2 groups of
two, group g's experts among the global ids [g * E / G, (g + 1) * E / G). The pair plan is a RoutingPlan over
pair keys (group * C + triangle index, C = n (n - 1) / 2 for n = E / G experts per group) instead of experts,
made by the routing's own stable sort and plan kernel: no host sync.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton

from moeut_kernels import _triton as K
from moeut_kernels.routing import INTERPRET, RoutingPlan, _key_dtype, _sorted_plan, slices_per_program


def pair_plan(experts: torch.Tensor, n_groups: int, n_experts: int, block_m: int) -> RoutingPlan:
    """The rows (pairs 2r, 2r+1 of experts [P] int64, by pair id) sorted by their expert pair within their group,
    stably, and their tiles; plan.n_experts is the number of pair keys."""
    n_per_group = n_experts // n_groups
    n_keys = n_groups * (n_per_group * (n_per_group - 1) // 2)
    n_rows = experts.numel() // 2
    key = torch.empty(n_rows, dtype=_key_dtype(n_keys), device=experts.device)
    if n_rows:
        block = 128 if INTERPRET else 1024
        K.pair_key_kernel[(triton.cdiv(n_rows, block),)](experts, key, n_rows, n_per_group, BLOCK=block)
    return RoutingPlan(*_sorted_plan(key, n_keys, block_m), n_keys, block_m)


def pair_matmul(a: torch.Tensor, w: torch.Tensor, plan: RoutingPlan, experts: torch.Tensor, gate: torch.Tensor,
                out: torch.Tensor, precision: str, descriptor: Optional[Callable] = None) -> None:
    """out[r] = g_lo * (a[r] @ W[lo]) + g_hi * (a[r] @ W[hi]) for every row r of the pair plan (W [E, K, N],
    K <= 128); experts and gate [P] by pair id; precision: tl.dot's input precision. descriptor(t, rows, block):
    a TMA descriptor of t viewed as [rows, -1], or None (grouped._descriptor where the GPU has TMA), for W's
    tiles. 64-column slices at 8 warps (H200 sweep, KERNELS.md: 0.409 / 0.889 ms per call at 244M / 1B, against
    0.453 / 1.038 with 128 columns; TMA ~3% of that)."""
    kdim, ndim = w.shape[1], w.shape[2]
    n_tiles = plan.tile_expert.numel()
    if n_tiles == 0:
        return
    block_n, warps, stages = (32, 4, 1) if INTERPRET else (64, 8, 2)
    block_k = max(16, triton.next_power_of_2(kdim))
    w_desc = descriptor(w, w.shape[0] * kdim, [block_k, block_n]) if descriptor is not None else None
    cols = block_n * slices_per_program(ndim, block_n)
    K.pair_gmm_kernel[(n_tiles * triton.cdiv(ndim, cols),)](
        a, w, out, plan.order, plan.tile_expert, plan.tile_start, plan.offsets, experts, gate, w_desc, ndim, kdim,
        plan.n_experts, cols, a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        out.stride(1), FP32_DOT=INTERPRET, PRECISION=precision, BLOCK_M=plan.block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages)
