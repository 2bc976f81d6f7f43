"""The output side of the σ-MoE FF's summed projections: what storing and combining each token's K per-pair rows
costs, the way the kernels do it and the ways they could, alone and with the down projection's matmul
(docs/KERNELS.md, "Reductions into the token rows, with L2 locality").

The down projection and the up projection's input gradient make one [d] row per (token, expert) pair, summed per
token. The kernels store the rows by pair id in a bf16 [P, d] buffer and `group_sum` adds each token's K rows in
a fixed order. The alternative adds each row into its token's output row where it is made (`red.global.add`:
Triton's relaxed `atomic_add`), in one of three tile orders:
- expert order (what the matmuls use): concurrent tiles touch every token, so the fp32 sums go to DRAM and back;
- window order (`routing.window_tiles`): concurrent tiles cover a narrow window of tokens, whose rows stay in L2;
- window order in column passes: every tile's first BLOCK_N columns, then the next, so that a matmul would only
  need one column block of every expert's weights in L2 at a time.
First without a matmul: each program stores a synthetic [BLOCK_M, BLOCK_N] tile, over the tile list of a random
routing at the FF shapes, so the numbers are the combine's floor whatever the matmul costs. Then with the FF down
projection's matmul in the same simple kernel (A = the sorted hidden rows, one d_e-wide block; W2[e]'s column
block), so that the reductions' tile orders also pay for where the weights come from; the kernels' own down
forward (`grouped._gmm` + `group_sum`) is timed beside it for scale.

    python3 bench/bench_combine.py [--shapes 244m,1b] [--reps 20]
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch
import triton
import triton.language as tl

from moeut_kernels import grouped, routing

SHAPES = {"244m": (65536, 16, 387, 1024), "1b": (65536, 24, 565, 1536)}   # tokens, K, experts, d (spec, FF)
D_EXPERT = 128                                                                # d_e of every preset
BLOCK_M = 128


@triton.jit
def tile_store_kernel(out_ptr, row_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, a_ptr, w_ptr, n_tiles,
                      n_experts, d, k_dim, REDUCE: tl.constexpr, COLUMN_PASSES: tl.constexpr, MATMUL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program = (tile, column block); COLUMN_PASSES runs every tile of one column block before the next. The value
    of sorted position p, column c is a[p] @ w[e][:, c] (MATMUL: a [P, k_dim] in sorted order, w [E, k_dim, d],
    k_dim <= BLOCK_K) or else p / 1024 + c / 8192; it goes to row row[p] of out: added (REDUCE, out = the [T, d]
    sums) or stored (out = the [P, d] buffer by pair id)."""
    pid = tl.program_id(0)
    n_col = tl.cdiv(d, BLOCK_N)
    if COLUMN_PASSES:
        tile, col = pid % n_tiles, pid // n_tiles
    else:
        tile, col = pid // n_col, pid % n_col
    e = tl.load(tile_expert_ptr + tile)
    e_in = tl.minimum(e, n_experts - 1)              # an expert to address for the plan's unused tail tiles,
    start = tl.load(tile_start_ptr + tile)
    end = tl.where(e < n_experts, tl.load(offsets_ptr + e_in + 1), start)     # which store nothing
    pos = start + tl.arange(0, BLOCK_M)
    rmask = pos < end
    cols = col * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rmask[:, None] & (cols < d)[None, :]
    if MATMUL:
        ks = tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + pos[:, None].to(tl.int64) * k_dim + ks[None, :],
                    mask=rmask[:, None] & (ks < k_dim)[None, :], other=0.0)
        w_e = w_ptr + e_in.to(tl.int64) * k_dim * d
        w = tl.load(w_e + ks[:, None] * d + cols[None, :], mask=(ks < k_dim)[:, None] & (cols < d)[None, :], other=0.0)
        value = tl.dot(a, w)
    else:
        value = pos[:, None].to(tl.float32) / 1024 + cols[None, :].to(tl.float32) / 8192
    rows = tl.load(row_ptr + pos, mask=rmask, other=0).to(tl.int64)
    ptrs = out_ptr + rows[:, None] * d + cols[None, :]
    if REDUCE:
        tl.atomic_add(ptrs, value.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, value.to(out_ptr.dtype.element_ty), mask=mask)


def store_tiles(out: torch.Tensor, rows: torch.Tensor, plan: routing.RoutingPlan, reduce: bool,
                column_passes: bool = False, block_n: int = 128, matmul: Optional[tuple] = None) -> None:
    """Every tile of plan into out (see tile_store_kernel); rows[p] is the output row of sorted position p;
    matmul = (a, w) makes the values a[p] @ w[e]."""
    n_tiles, d = plan.tile_expert.numel(), out.shape[1]
    a, w = matmul or (out, out)
    k_dim = a.shape[1] if matmul else 1
    tile_store_kernel[(n_tiles * triton.cdiv(d, block_n),)](
        out, rows, plan.tile_expert, plan.tile_start, plan.offsets, a, w, n_tiles, plan.n_experts, d, k_dim,
        REDUCE=reduce, COLUMN_PASSES=column_passes, MATMUL=matmul is not None, BLOCK_M=plan.block_m,
        BLOCK_N=block_n, BLOCK_K=max(16, triton.next_power_of_2(k_dim)), num_warps=8 if matmul else 4)


def random_plan(tokens: int, k: int, n_experts: int, device: str) -> routing.RoutingPlan:
    """The tile list of k distinct random experts per token (pair id = token * k + j)."""
    expert_index = torch.rand(tokens, n_experts, device=device).topk(k, dim=1).indices
    return routing.plan_from_expert_index(expert_index.reshape(-1), n_experts, BLOCK_M)


def variants(plan: routing.RoutingPlan, tokens: int, d: int, matmul: Optional[tuple] = None) -> dict:
    """name -> a function that combines the rows (synthetic, or matmul = (a, w)'s products) into a [tokens, d]
    result in the rows' dtype (bf16 for the synthetic ones), one way each."""
    k = plan.n_pairs // tokens
    pair, token = plan.order, plan.order // k
    window = routing.window_tiles(plan)
    dtype = matmul[0].dtype if matmul else torch.bfloat16

    def buffered() -> torch.Tensor:
        buf = torch.empty(plan.n_pairs, d, dtype=dtype, device=pair.device)
        store_tiles(buf, pair, plan, reduce=False, matmul=matmul)
        return grouped.group_sum(buf, k)

    def reduced(sum_dtype: torch.dtype, tiles: routing.RoutingPlan, column_passes: bool):
        def run() -> torch.Tensor:
            out = torch.zeros(tokens, d, dtype=sum_dtype, device=pair.device)
            store_tiles(out, token, tiles, reduce=True, column_passes=column_passes, matmul=matmul,
                        block_n=256 if column_passes and matmul else 128)
            return out.to(dtype)
        return run

    out = {f"{dtype_name(dtype)} buffer by pair id + group_sum (the kernels' way)": buffered}
    for sum_dtype in (torch.float32, torch.bfloat16):
        name = dtype_name(sum_dtype)
        out[f"{name} reductions, expert order"] = reduced(sum_dtype, plan, False)
        out[f"{name} reductions, window order"] = reduced(sum_dtype, window, False)
        out[f"{name} reductions, window order, column passes"] = reduced(sum_dtype, window, True)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def reference(plan: routing.RoutingPlan, tokens: int, d: int, matmul: Optional[tuple] = None) -> torch.Tensor:
    """The per-token sums of tile_store_kernel's values, in float64."""
    k = plan.n_pairs // tokens
    dev = plan.order.device
    token = plan.order // k
    out = torch.zeros(tokens, d, dtype=torch.float64, device=dev)
    if not matmul:
        pos = torch.arange(plan.n_pairs, dtype=torch.float64, device=dev)
        return out.index_add_(0, token, pos[:, None] / 1024 + torch.arange(d, dtype=torch.float64, device=dev) / 8192)
    a, w = matmul
    bounds = plan.offsets.tolist()
    for e in range(plan.n_experts):
        seg = slice(bounds[e], bounds[e + 1])
        out.index_add_(0, token[seg], a[seg].double() @ w[e].double())
    return out


def down_projection(plan: routing.RoutingPlan, tokens: int, d: int, d_expert: int) -> tuple:
    """(h, w2) of the FF down projection: h [P, d_expert] in sorted pair order (as the down forward reads it),
    w2 [E, d_expert, d], bf16 at the model's init scale."""
    dev = plan.order.device
    h = torch.randn(plan.n_pairs, d_expert, device=dev).relu_().to(torch.bfloat16)
    w2 = (torch.randn(plan.n_experts, d_expert, d, device=dev) / d_expert ** 0.5).to(torch.bfloat16)
    return h, w2


def cuda_ms(fn, reps: int) -> float:
    """Median of reps CUDA-event timings (fn already warm)."""
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
        table("rows alone (synthetic values)", variants(plan, tokens, d), ref, args.reps)
        mm = down_projection(plan, tokens, d, D_EXPERT)
        ways = {f"matmul + {name}": fn for name, fn in variants(plan, tokens, d, mm).items()}
        buf = torch.empty(plan.n_pairs, d, dtype=torch.bfloat16, device="cuda")

        def kernels_down_forward() -> torch.Tensor:
            grouped._gmm(mm[0], 0, mm[1], False, plan, buf, True)
            return grouped.group_sum(buf, k)
        ways["the kernels' down forward (grouped._gmm, Gluon where chosen) + group_sum"] = kernels_down_forward
        table("the FF down projection (d_e 128) and its sum", ways, reference(plan, tokens, d, mm), args.reps)


def table(title: str, ways: dict, ref: torch.Tensor, reps: int) -> None:
    """Time each way and print a row with its error against ref; the first way is the ratios' base."""
    print(f"\n{title}\n| way | ms | vs the first | max abs. error / max abs. value, vs float64 |\n|---|---|---|---|")
    base = None
    for name, fn in ways.items():
        err = ((fn().double() - ref).abs().max() / ref.abs().max()).item()     # also the warm-up call
        ms = cuda_ms(fn, reps)
        base = base or ms
        print(f"| {name} | {ms:.3f} | {ms / base:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
