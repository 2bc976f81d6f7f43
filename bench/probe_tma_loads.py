"""Probe: the FF down forward (resident A, N = d written by pair id) with its A tile and W slices loaded through
TMA tensor descriptors, against gmm_kernel's default launch, on the same plan and inputs.

    PYTHONPATH=.:kernels python bench/probe_tma_loads.py

Why: Nsight Compute shows the resident-A calls latency-bound at ~40% of DRAM bandwidth (docs/KERNELS.md). On the
H200 (fifth session of 2026-11-29; this kernel before its interpreter branch was added) it took 0.886 ms with
128-wide slices, 2 stages and 4 warps against the default's 0.974, with bitwise-equal output. It is not the
product path yet: the up input-grad (ReLU mask), the gathered-A attention calls and the 1B shape are unmeasured.
With `tl.range(..., warp_specialize=True)` the same kernel did not finish on triton 3.6 (the call hit its 200 s
limit), so the probe leaves warp specialisation out.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "bench")]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

import bench_experts as B  # noqa: E402
from moeut_ds.experts.triton_backend import TritonBackend  # noqa: E402
from moeut_kernels import grouped as GM  # noqa: E402

INTERPRETED = tl.constexpr(GM.INTERPRET)     # the interpreter's bf16 dot is wrong (see _triton._dot)


@triton.jit
def down_tma_kernel(a_desc, w_desc, c_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, E, N, s_cm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """One tile of one expert: A [BLOCK_M, BLOCK_K] (sorted rows, K = d_e = BLOCK_K) and each [BLOCK_K, BLOCK_N]
    slice of W[e] by TMA, C rows stored by pair id. A tile's rows past its expert belong to the next expert or are
    zero-filled past the tensor: their outputs are masked."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    valid = e < E
    e = tl.where(valid, e, 0)
    start = tl.load(tile_start_ptr + tile)
    end = tl.where(valid, tl.load(offsets_ptr + e + 1), 0)
    pos = start + tl.arange(0, BLOCK_M)
    rmask = pos < end
    pair = tl.load(order_ptr + pos, mask=rmask, other=0).to(tl.int64)
    a = a_desc.load([start, 0])
    for n0 in tl.range(0, tl.where(valid, N, 0), BLOCK_N, num_stages=STAGES):
        w = w_desc.load([e * BLOCK_K, n0])
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32)) if INTERPRETED else tl.dot(a, w)
        cols = n0 + tl.arange(0, BLOCK_N)
        tl.store(c_ptr + pair[:, None] * s_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < N)[None, :])



def main(block_m: int = 128) -> list[dict]:
    shape = B.FF_SHAPES["244M"]
    x, w_s, w1, w2, gy = B.ff_inputs(shape, seed=3)
    k, d, d_e, E = shape["k"], shape["d"], shape["d_e"], shape["n_experts"]
    logits = torch.nn.functional.linear(x, w_s).float().view(-1, 1, E).detach()
    plan = TritonBackend(block_m=block_m).route(logits, k).plan
    P = B.TOKENS * k
    h = torch.randn(P, d_e, device=B.DEV, dtype=B.BF16)
    w2d = w2.detach()
    ref = torch.zeros(P, d, device=B.DEV, dtype=B.BF16)
    rows: list = []
    B._timed(rows, "down forward, gmm_kernel default", lambda: GM._gmm(h, 0, w2d, False, plan, ref, True))
    a_desc = TensorDescriptor.from_tensor(h, [block_m, d_e])
    for block_n, stages, warps in ((128, 2, 4), (128, 3, 4), (128, 3, 8), (256, 2, 8)):
        w_desc = TensorDescriptor.from_tensor(w2d.reshape(E * d_e, d), [d_e, block_n])
        out = torch.zeros_like(ref)
        B._timed(rows, f"down forward, TMA loads, {block_n}-wide slices, {stages} stages, {warps} warps",
                 lambda: down_tma_kernel[(plan.tile_expert.numel(),)](
                     a_desc, w_desc, out, plan.order, plan.tile_expert, plan.tile_start, plan.offsets, E, d,
                     out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=d_e, STAGES=stages,
                     num_warps=warps))
        if "ms" in rows[-1]:
            rows[-1]["max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
