"""σ-gating: logits -> sigmoid -> top-k per group -> pairs sorted by expert + tile list, with no host sync.

Launches per routing: the fused sigmoid/top-k kernel, torch's stable radix sort of a 16-bit key (2 radix passes for
< 32767 experts), a binary search of each expert's first sorted position (the offsets), and the plan kernel (the
tile list). Every buffer is sized by a static bound (at most cdiv(P, BLOCK_M) + E tiles), so nothing waits for
the device. Routing and plans are torch.library custom ops (moeut::sigmoid_topk_route, moeut::sorted_plan,
moeut::plan) with fake impls, so torch.compile traces them; inside an op the plans are plain calls, since a
nested op costs ~20 us of host time (H200 host, docs/PERFORMANCE.md, twentieth session).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from moeut_kernels import _triton as K

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (rows per program, warps) of the top-k kernel instead of the default (a benchmark's sweep sets it). Default: one
# warp per 1024 logits keeps each pick's max-reduction inside a warp (shuffles, no shared-memory round trip);
# H200, FF 244M (block_n 512) with the histogram atomics: 2 rows per program, 1 warp 0.40 ms, 4 warps 0.63.
TOPK_OVERRIDE: Optional[tuple[int, int]] = None


@dataclass
class RoutingPlan:
    """What the grouped matmuls need: the expert-sorted pairs and BLOCK_M-row tiles that never straddle experts."""
    order: torch.Tensor        # [P] int64, pair ids sorted by expert (stable)
    offsets: torch.Tensor      # [E + 1] int64
    tile_expert: torch.Tensor  # [T] int32, expert of each tile; E for the unused tail of the static-size list
    tile_start: torch.Tensor   # [T] int32, first sorted position of each tile
    n_experts: int
    block_m: int

    @property
    def n_pairs(self) -> int:
        return self.order.numel()


def max_tiles(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Static bound on the tile count: each expert wastes less than one tile; never more tiles than pairs.

    Plain integer arithmetic (also on the symbolic sizes of torch.compile's fake tensors)."""
    return torch.sym_min((n_pairs + block_m - 1) // block_m + n_experts, n_pairs)


def _tiles(offsets: torch.Tensor, n_pairs: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tile_expert [T] int32, tile_start [T] int32 from the per-expert offsets [E+1] int64 (one launch)."""
    n_experts = offsets.numel() - 1
    n_tiles = max_tiles(n_pairs, n_experts, block_m)
    tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=offsets.device)
    tile_start = torch.empty(n_tiles, dtype=torch.int32, device=offsets.device)
    block_e = triton.next_power_of_2(max(n_experts, 1))
    if INTERPRET:
        block_t = min(triton.next_power_of_2(max(n_tiles, 1)), 256)
    else:
        block_t = max(16, min(128, 16384 // block_e))
    if n_tiles:
        K.plan_kernel[(triton.cdiv(n_tiles, block_t),)](offsets, tile_expert, tile_start, n_experts, n_tiles,
                                                         BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_T=block_t,
                                                         num_warps=4)
    return tile_expert, tile_start


@torch.library.custom_op("moeut::plan", mutates_args=())
def _plan_op(offsets: torch.Tensor, n_pairs: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tile_expert, tile_start for a routing whose pairs are already sorted (_tiles)."""
    return _tiles(offsets.contiguous(), n_pairs, block_m)


@_plan_op.register_fake
def _plan_fake(offsets: torch.Tensor, n_pairs: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_tiles = max_tiles(n_pairs, offsets.shape[0] - 1, block_m)
    return offsets.new_empty(n_tiles, dtype=torch.int32), offsets.new_empty(n_tiles, dtype=torch.int32)


def slices_per_program(n: int, block_n: int, most: int = 8) -> int:
    """How many block_n-column slices of an n-column output one program loops over (a resident A tile): at most
    `most`, with the slices split evenly over as few programs as that allows."""
    slices = triton.cdiv(n, block_n)
    return triton.cdiv(slices, triton.cdiv(slices, most))


def plan_from_sorted(order: torch.Tensor, offsets: torch.Tensor, block_m: int) -> RoutingPlan:
    """Tile list for a routing made elsewhere (e.g. by the reference backend): one kernel, no sync."""
    tile_expert, tile_start = torch.ops.moeut.plan(offsets.to(torch.int64), order.numel(), block_m)
    return RoutingPlan(order, offsets, tile_expert, tile_start, offsets.numel() - 1, block_m)


def window_tiles(plan: RoutingPlan, group_experts: Optional[int] = None) -> RoutingPlan:
    """The plan with its tiles in window order (each tile's first pair id ascending, unused tiles last): tile j of
    every expert runs together over a narrow window of tokens, so a token's gathered rows are reused from L2 by
    its experts' tiles instead of read from DRAM once per expert. Same tiles, so the same outputs in any launch.
    group_experts: window order within consecutive groups of that many experts, one group after the other, so
    that only one group's weights need L2 at a time (default: one group of all experts).
    One launch of ~log2(tiles) dependent loads, no sort, no sync (docs/KERNELS.md, "Window tile order for the
    attention's narrow gathers"). It relies on the plan's stable order (pair ids ascending within an expert,
    as every constructor here makes it): the ranks come from binary searches of those runs."""
    n_tiles = plan.tile_expert.numel()
    win_expert, win_start = torch.empty_like(plan.tile_expert), torch.empty_like(plan.tile_start)
    if n_tiles:
        block_t = 16 if INTERPRET else 32
        block_e = min(triton.next_power_of_2(plan.n_experts), 16 if INTERPRET else 32)
        K.window_tiles_kernel[(triton.cdiv(n_tiles, block_t),)](
            plan.order, plan.offsets, plan.tile_expert, plan.tile_start, win_expert, win_start, plan.n_experts,
            n_tiles, n_tiles.bit_length(), group_experts or plan.n_experts, BLOCK_M=plan.block_m, BLOCK_T=block_t,
            BLOCK_E=block_e, num_warps=4)
    return RoutingPlan(plan.order, plan.offsets, win_expert, win_start, plan.n_experts, plan.block_m)


def _key_dtype(n_experts: int) -> torch.dtype:
    """The narrowest sort key that holds every expert id and the remote id n_experts: int16 sorts in 2 radix
    passes instead of 8 for int64."""
    return torch.int16 if n_experts < 2 ** 15 - 1 else torch.int32


def _expert_starts(sorted_key: torch.Tensor, n_experts: int) -> torch.Tensor:
    """offsets [n_experts + 1] int64 from stably sorted expert keys: each expert's first sorted position by binary
    search, one launch. (A histogram by atomics contends on a few hundred counters: a `scatter_add_` of 1.6M pairs
    into ~283 counters took 0.68 ms on the H200, docs/KERNELS.md; arange + searchsorted + difference + cast were
    four launches, ~48 us of host time.) Keys equal to n_experts (remote pairs) sort past offsets[n_experts]."""
    offsets = torch.empty(n_experts + 1, dtype=torch.int64, device=sorted_key.device)
    block_e = min(triton.next_power_of_2(n_experts + 1), 128)
    K.expert_starts_kernel[(triton.cdiv(n_experts + 1, block_e),)](
        sorted_key, offsets, sorted_key.numel(), n_experts, sorted_key.numel().bit_length(), BLOCK_E=block_e,
        num_warps=4)
    return offsets


def _sorted_plan(key: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """order, offsets, tile_expert, tile_start from the expert key of every pair (by pair id, _key_dtype): a stable
    sort, the offsets, the tiles. Keys equal to n_experts (remote pairs) sort last. Launches kernels: call it
    inside a custom op (moeut::sorted_plan outside one)."""
    sorted_key, order = torch.sort(key.reshape(-1), stable=True)
    offsets = _expert_starts(sorted_key, n_experts)
    return (order, offsets, *_tiles(offsets, order.numel(), block_m))


@torch.library.custom_op("moeut::sorted_plan", mutates_args=())
def _sorted_plan_op(key: torch.Tensor, n_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """_sorted_plan as an op, for plans made outside the routing op (plan_from_expert_index)."""
    return _sorted_plan(key.contiguous(), n_experts, block_m)


@_sorted_plan_op.register_fake
def _sorted_plan_fake(key: torch.Tensor, n_experts: int, block_m: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_pairs = key.numel()
    n_tiles = max_tiles(n_pairs, n_experts, block_m)
    return (key.new_empty(n_pairs, dtype=torch.int64), key.new_empty(n_experts + 1, dtype=torch.int64),
            key.new_empty(n_tiles, dtype=torch.int32), key.new_empty(n_tiles, dtype=torch.int32))


def plan_from_expert_index(expert_index: torch.Tensor, n_experts: int, block_m: int) -> RoutingPlan:
    """Plan for experts chosen elsewhere (e.g. on another rank), no sync.
    An id equal to n_experts marks a remote pair (held by another rank): it sorts after every local pair, past
    offsets[-1], and no tile covers it."""
    key = expert_index.to(_key_dtype(n_experts))
    return RoutingPlan(*torch.ops.moeut.sorted_plan(key, n_experts, block_m), n_experts, block_m)


RouteOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("moeut::sigmoid_topk_route", mutates_args=())
def _route_op(logits: torch.Tensor, k: int, block_m: int) -> RouteOut:
    """logits [N, G, n] -> gate [N, G*k], expert_index [N, G*k] int64, order [P] int64, offsets [E+1] int64,
    tile_expert [T] int32, tile_start [T] int32. Differentiable w.r.t. logits through the gate only."""
    n_rows, n_groups, n = logits.shape
    if not 1 <= k <= n:
        raise ValueError(f"top-k {k} out of range for {n} experts per group")
    logits = logits.contiguous()
    n_experts = n_groups * n
    S = n_groups * k
    device = logits.device
    gate = torch.empty(n_rows, S, dtype=logits.dtype, device=device)
    expert_index = torch.empty(n_rows, S, dtype=torch.int64, device=device)
    key = torch.empty(n_rows, S, dtype=_key_dtype(n_experts), device=device)
    block_n = triton.next_power_of_2(n)
    block_r, warps = TOPK_OVERRIDE or (max(1, (16384 if INTERPRET else 1024) // block_n), max(1, block_n // 1024))
    if n_rows:
        K.sigmoid_topk_kernel[(triton.cdiv(n_rows, block_r), n_groups)](
            logits, gate, expert_index, key, n_rows, n, logits.stride(0), logits.stride(1),
            K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps)
    return (gate, expert_index, *_sorted_plan(key, n_experts, block_m))


@_route_op.register_fake
def _route_fake(logits: torch.Tensor, k: int, block_m: int) -> RouteOut:
    n_rows, n_groups, n = logits.shape
    if not 1 <= k <= n:
        raise ValueError(f"top-k {k} out of range for {n} experts per group")
    S, n_experts = n_groups * k, n_groups * n
    n_pairs = n_rows * S
    n_tiles = max_tiles(n_pairs, n_experts, block_m)
    i64, i32 = torch.int64, torch.int32
    return (logits.new_empty(n_rows, S), logits.new_empty(n_rows, S, dtype=i64), logits.new_empty(n_pairs, dtype=i64),
            logits.new_empty(n_experts + 1, dtype=i64), logits.new_empty(n_tiles, dtype=i32),
            logits.new_empty(n_tiles, dtype=i32))


def _route_setup(ctx, inputs: tuple, output: RouteOut) -> None:
    logits, k, _ = inputs
    ctx.save_for_backward(output[0], output[1])
    ctx.shape = (logits.shape[0], logits.shape[1], logits.shape[2], k)


def _route_backward(ctx, grad_gate: Optional[torch.Tensor], *unused) -> tuple[Optional[torch.Tensor], None, None]:
    """grad_logits: grad * g * (1 - g) scattered into the chosen logits (plain torch ops: traceable)."""
    gate, expert_index = ctx.saved_tensors
    n_rows, n_groups, n, k = ctx.shape
    if grad_gate is None:
        return None, None, None
    g = gate.float()
    local = expert_index.view(n_rows, n_groups, k) - torch.arange(n_groups, device=gate.device).view(1, -1, 1) * n
    val = (grad_gate.float() * g * (1.0 - g)).view(n_rows, n_groups, k)
    grad = torch.zeros(n_rows, n_groups, n, dtype=torch.float32, device=gate.device).scatter_(2, local, val)
    return grad.to(gate.dtype), None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


def sigmoid_topk_route(logits: torch.Tensor, k: int, block_m: int = 128
                       ) -> tuple[torch.Tensor, torch.Tensor, RoutingPlan]:
    """logits [N, G, n] -> gate [N, G*k] (differentiable), global expert ids [N, G*k] int64, and the plan.

    Slots within a group are in descending gate order; experts are chosen by logit (ties: lowest index).
    """
    gate, expert_index, order, offsets, tile_expert, tile_start = torch.ops.moeut.sigmoid_topk_route(
        logits, k, block_m)
    n_experts = logits.shape[1] * logits.shape[2]
    return gate, expert_index, RoutingPlan(order, offsets, tile_expert, tile_start, n_experts, block_m)
