"""The output side of the σ-MoE FF's summed projections, timed alone: what storing and combining each token's K
per-pair rows costs, the way the kernels do it and the ways they could (docs/KERNELS.md, "Reductions into the
token rows, with L2 locality").

The down projection and the up projection's input gradient make one [d] row per (token, expert) pair, summed per
token. The kernels store the rows by pair id in a bf16 [P, d] buffer and `group_sum` adds each token's K rows in
a fixed order. The alternative adds each row into its token's output row where it is made (`red.global.add`:
Triton's relaxed `atomic_add`), in one of three tile orders:
- expert order (what the matmuls use): concurrent tiles touch every token, so the fp32 sums go to DRAM and back;
- window order (`routing.window_tiles`): concurrent tiles cover a narrow window of tokens, whose rows stay in L2;
- window order in column passes: every tile's first BLOCK_N columns, then the next, so that a matmul would only
  need one column block of every expert's weights in L2 at a time.
No matmul runs: each program stores a synthetic [BLOCK_M, BLOCK_N] tile, over the tile list of a random routing at
the FF shapes, so the numbers are the combine's floor whatever the matmul costs.

    python3 bench/bench_combine.py [--shapes 244m,1b] [--reps 20]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from moeut_kernels import grouped, routing

SHAPES = {"244m": (65536, 16, 387, 1024), "1b": (65536, 24, 565, 1536)}   # tokens, K, experts, d (spec, FF)
BLOCK_M = 128


@triton.jit
def tile_store_kernel(out_ptr, row_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, n_tiles, n_experts, d,
                      REDUCE: tl.constexpr, COLUMN_PASSES: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Program = (tile, column block); COLUMN_PASSES runs every tile of one column block before the next. The value
    of sorted position p, column c is p / 1024 + c / 8192; it goes to row row[p] of out: added (REDUCE, out = the
    [T, d] sums) or stored (out = the [P, d] buffer by pair id)."""
    pid = tl.program_id(0)
    n_col = tl.cdiv(d, BLOCK_N)
    if COLUMN_PASSES:
        tile, col = pid % n_tiles, pid // n_tiles
    else:
        tile, col = pid // n_col, pid % n_col
    e = tl.load(tile_expert_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(offsets_ptr + tl.minimum(e, n_experts - 1) + 1)
    end = tl.where(e < n_experts, end, start)        # the plan's unused tail tiles store nothing
    pos = start + tl.arange(0, BLOCK_M)
    rmask = pos < end
    cols = col * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rmask[:, None] & (cols < d)[None, :]
    value = pos[:, None].to(tl.float32) / 1024 + cols[None, :].to(tl.float32) / 8192
    rows = tl.load(row_ptr + pos, mask=rmask, other=0).to(tl.int64)
    ptrs = out_ptr + rows[:, None] * d + cols[None, :]
    if REDUCE:
        tl.atomic_add(ptrs, value.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, value.to(out_ptr.dtype.element_ty), mask=mask)


def store_tiles(out: torch.Tensor, rows: torch.Tensor, plan: routing.RoutingPlan, reduce: bool,
                column_passes: bool = False, block_n: int = 128) -> None:
    """Every tile of plan into out (see tile_store_kernel); rows[p] is the output row of sorted position p."""
    n_tiles, d = plan.tile_expert.numel(), out.shape[1]
    tile_store_kernel[(n_tiles * triton.cdiv(d, block_n),)](
        out, rows, plan.tile_expert, plan.tile_start, plan.offsets, n_tiles, plan.n_experts, d, REDUCE=reduce,
        COLUMN_PASSES=column_passes, BLOCK_M=plan.block_m, BLOCK_N=block_n, num_warps=4)


def random_plan(tokens: int, k: int, n_experts: int, device: str) -> routing.RoutingPlan:
    """The tile list of k distinct random experts per token (pair id = token * k + j)."""
    expert_index = torch.rand(tokens, n_experts, device=device).topk(k, dim=1).indices
    return routing.plan_from_expert_index(expert_index.reshape(-1), n_experts, BLOCK_M)


def variants(plan: routing.RoutingPlan, tokens: int, d: int) -> dict:
    """name -> a function that combines the synthetic rows into a [tokens, d] bf16 result, one way each."""
    k = plan.n_pairs // tokens
    pair, token = plan.order, plan.order // k
    window = routing.window_tiles(plan)

    def buffered() -> torch.Tensor:
        buf = torch.empty(plan.n_pairs, d, dtype=torch.bfloat16, device=pair.device)
        store_tiles(buf, pair, plan, reduce=False)
        return grouped.group_sum(buf, k)

    def reduced(dtype: torch.dtype, tiles: routing.RoutingPlan, column_passes: bool):
        def run() -> torch.Tensor:
            out = torch.zeros(tokens, d, dtype=dtype, device=pair.device)
            store_tiles(out, token, tiles, reduce=True, column_passes=column_passes)
            return out.to(torch.bfloat16)
        return run

    out = {"bf16 buffer by pair id + group_sum (the kernels' way)": buffered}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out[f"{name} reductions, expert order"] = reduced(dtype, plan, False)
        out[f"{name} reductions, window order"] = reduced(dtype, window, False)
        out[f"{name} reductions, window order, column passes"] = reduced(dtype, window, True)
    return out


def reference(plan: routing.RoutingPlan, tokens: int, d: int) -> torch.Tensor:
    """The per-token sums of tile_store_kernel's values, in float64."""
    k = plan.n_pairs // tokens
    pos = torch.arange(plan.n_pairs, dtype=torch.float64, device=plan.order.device)
    cols = torch.arange(d, dtype=torch.float64, device=plan.order.device)
    out = torch.zeros(tokens, d, dtype=torch.float64, device=plan.order.device)
    return out.index_add_(0, plan.order // k, pos[:, None] / 1024 + cols[None, :] / 8192)


def cuda_ms(fn, reps: int) -> float:
    """Median of reps CUDA-event timings after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[reps // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="244m,1b")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU; tests/test_bench_combine.py checks the same code on CPU")
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        tokens, k, n_experts, d = SHAPES[shape]
        plan = random_plan(tokens, k, n_experts, "cuda")
        ref = reference(plan, tokens, d)
        print(f"\nσ-MoE FF {shape}: {tokens} tokens, K {k}, {n_experts} experts, d {d}; {plan.n_pairs} pairs")
        print("| way | ms | vs the kernels' way | max rel. error vs float64 |\n|---|---|---|---|")
        base = None
        for name, fn in variants(plan, tokens, d).items():
            ms = cuda_ms(fn, args.reps)
            base = base or ms
            err = ((fn().double() - ref).abs().max() / ref.abs().max()).item()
            print(f"| {name} | {ms:.3f} | {ms / base:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
