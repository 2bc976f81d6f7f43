"""Gluon (Triton's explicit-layout dialect) kernel for the plainest resident-A grouped matmul on Hopper.

gmm_kernel's resident-A path written with explicit TMA barriers and wgmma: for one tile of one expert, the sorted A
tile comes by TMA once, W[e]'s output slices through a ring of num_stages TMA buffers refilled as soon as a slice's
wgmma retires, and each slice is stored from a row-vector layout. Same products and fp32 accumulation as
gmm_kernel, bitwise-equal outputs, 15-17% faster on the FF down forward on an H200 (docs/KERNELS.md, "Gluon").
Only the calls without mask, scale, side output or gate gradient take it (grouped._gmm decides); Gluon has no
interpreter, so tests/test_kernels_gluon.py compiles it on CPU and compares it with gmm_kernel on a GPU.
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import constexpr_function
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared     # renamed after Triton 3.6


@constexpr_function
def wgmma_layout(block_m, block_n, num_warps):
    """The accumulator layout: warps stacked along M (16 rows each) first, the widest wgmma N that tiles block_n."""
    warps = [4, 1]
    while warps[0] * warps[1] != num_warps:
        if block_m > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    max_n = max(block_n // triton.cdiv(num_warps, triton.cdiv(block_m, 16)), 8)
    n = 256
    while n > max_n or block_n % n != 0:
        n -= 8
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, n, 16])


@constexpr_function
def row_store_layout(block_n, num_warps):
    """8 consecutive columns per thread: 16-byte stores of whole row segments."""
    threads_n = min(block_n // 8, 32)
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // threads_n, threads_n],
                            warps_per_cta=[num_warps, 1], order=[1, 0])


@gluon.jit
def resident_gmm_kernel(a_desc, w_desc, c_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
                        N, K, E, n_per_prog, s_cm,
                        OUT_BY_PAIR: gl.constexpr, RELU_OUT: gl.constexpr, NUM_STAGES: gl.constexpr,
                        num_warps: gl.constexpr):
    """C[rows] = (relu)(A[sorted rows] @ W[e][:, program's columns]) for one tile and n_per_prog columns; rows at
    the pair id (OUT_BY_PAIR) or the sorted position. a_desc: A [P, K] in [BLOCK_M, K] tiles; w_desc: W viewed as
    [E*K, N] in [K, BLOCK_N] tiles. Rows the A tile takes past the expert's end are computed and not stored."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    acc_layout: gl.constexpr = wgmma_layout(BLOCK_M, BLOCK_N, num_warps)
    out_layout: gl.constexpr = row_store_layout(BLOCK_N, num_warps)
    pid = gl.program_id(0)
    num_chunks = gl.cdiv(N, n_per_prog)
    tile = pid // num_chunks
    e = gl.load(tile_expert_ptr + tile)
    if e < E:                                   # the unused tail of the static tile list does nothing
        start = gl.load(tile_start_ptr + tile)
        end = gl.load(offsets_ptr + e + 1)
        n_lo = (pid % num_chunks) * n_per_prog
        n_slices = gl.cdiv(gl.minimum(n_lo + n_per_prog, N) - n_lo, BLOCK_N)
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [BLOCK_M, BLOCK_K], a_desc.layout)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES, BLOCK_K, BLOCK_N], w_desc.layout)
        a_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        w_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(a_bar, count=1)
        for s in gl.static_range(NUM_STAGES):
            mbarrier.init(w_bars.index(s), count=1)
        mbarrier.expect(a_bar, a_desc.block_type.nbytes)
        tma_load(a_desc, [start, 0], a_bar, a_smem)
        for s in gl.static_range(NUM_STAGES):
            mbarrier.expect(w_bars.index(s), w_desc.block_type.nbytes, pred=s < n_slices)
            tma_load(w_desc, [e * K, n_lo + s * BLOCK_N], w_bars.index(s), w_smem.index(s), pred=s < n_slices)
        pos = start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
        rmask = pos < end
        if OUT_BY_PAIR:
            rows = gl.load(order_ptr + pos, mask=rmask, other=0).to(gl.int64)
        else:
            rows = pos.to(gl.int64)
        zero = gl.zeros([BLOCK_M, BLOCK_N], dtype=gl.float32, layout=acc_layout)
        mbarrier.wait(a_bar, phase=0)
        for i in range(0, n_slices):
            buf = i % NUM_STAGES
            mbarrier.wait(w_bars.index(buf), phase=(i // NUM_STAGES) & 1)
            acc = warpgroup_mma(a_smem, w_smem.index(buf), zero, use_acc=False, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            if i + NUM_STAGES < n_slices:       # the buffer is free again: fetch the slice NUM_STAGES ahead
                mbarrier.expect(w_bars.index(buf), w_desc.block_type.nbytes)
                tma_load(w_desc, [e * K, n_lo + (i + NUM_STAGES) * BLOCK_N], w_bars.index(buf), w_smem.index(buf))
            if RELU_OUT:
                acc = gl.maximum(acc, 0.0)
            out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), out_layout)
            cols = n_lo + i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
            gl.store(c_ptr + rows[:, None] * s_cm + cols[None, :], out, mask=rmask[:, None] & (cols < N)[None, :])
        mbarrier.invalidate(a_bar)
        for s in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(w_bars.index(s))


def descriptor(t, block: list[int]) -> TensorDescriptor:
    """A Gluon TMA descriptor of the 2-D tensor t in `block` tiles, in the wgmma operand's shared layout."""
    dtype = {"torch.bfloat16": gl.bfloat16, "torch.float16": gl.float16}[str(t.dtype)]
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))
