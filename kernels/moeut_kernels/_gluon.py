"""Gluon (Triton's explicit-layout dialect) kernel for the resident-A grouped matmul on Hopper.

gmm_kernel's resident-A path written with explicit TMA barriers and wgmma: for one tile of one expert, the A tile
comes once (sorted rows by TMA), W[e]'s output slices through a ring of num_stages TMA buffers refilled as soon
as a slice's wgmma retires, and each slice is stored from a row-vector layout. Same products and fp32
accumulation as gmm_kernel, bitwise-equal outputs, 15-17% faster on the FF down forward on an H200
(docs/KERNELS.md, "The Gluon resident kernel"). The FF up input-gradient takes it too (W transposed; its A comes
masked from the down projection's input-gradient launch), a ReLU grouped_matmul's input gradient (the ReLU mask
applied to the A tile in shared memory, the masked rows stored on the way), and the attention O forward and V
input-gradient, whose A rows are gathered (pair // group) by pointer loads into the shared tile (V's with the gate
on its outputs and its gated rows stored). Calls with a fused gate gradient or an output mask, and the long-K
calls, stay on gmm_kernel (grouped._gmm decides; a Gluon looping-K kernel for the MLP's down input-gradient tied
with it at best and was removed: docs/KERNELS.md).
Gluon has no interpreter: tests/test_kernels_gluon.py compiles it on CPU and compares it with gmm_kernel on a GPU.
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import constexpr_function
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared     # renamed after Triton 3.6
cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier                    # renamed after Triton 3.6


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
def resident_gmm_kernel(a_desc, a_ptr, w_desc, c_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
                        amask_ptr, scale_ptr, side_ptr, N, K, E, n_per_prog, s_am, s_cm, s_mm, s_om,
                        A_GROUP: gl.constexpr, OUT_BY_PAIR: gl.constexpr, RELU_OUT: gl.constexpr,
                        TRANS_W: gl.constexpr, MASK_A: gl.constexpr, HAS_SCALE: gl.constexpr,
                        STORE_SIDE: gl.constexpr, SUM_GROUP: gl.constexpr, BLOCK_M: gl.constexpr,
                        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
    """C[rows] = (relu)(A'[A rows] @ W[e][:, program's columns]) for one tile and n_per_prog columns; rows at the
    pair id (OUT_BY_PAIR) or the sorted position, or added by relaxed atomics into row pair // SUM_GROUP (SUM_GROUP > 0,
    with OUT_BY_PAIR; C zeroed by the caller). A rows: the sorted positions, the [BLOCK_M, BLOCK_K] tile by TMA
    through a_desc (A_GROUP == 0), or pair // A_GROUP, gathered from a_ptr by pointer loads (A_GROUP > 0; a_desc
    None). w_desc: W viewed as [E*K, N] in [K, BLOCK_N] tiles, or with TRANS_W (C = A W[e]^T) as [E*N, K] in
    [BLOCK_N, K] tiles. Rows the A tile takes past the expert's end are computed and not stored.
    MASK_A: A' = A * (amask[sorted rows] > 0), made in shared memory before the first slice (a ReLU
    grouped_matmul's input gradient); the first column chunk's program also stores A' at the sorted positions of
    side (STORE_SIDE: the weight gradient's operand). HAS_SCALE (A gathered): each output row times scale[pair]
    (after the ReLU), and STORE_SIDE stores A * scale (the attention V input-gradient), as gmm_kernel does."""
    gl.static_assert(A_GROUP == 0 or not MASK_A)
    gl.static_assert(not HAS_SCALE or A_GROUP > 0)
    gl.static_assert(SUM_GROUP == 0 or OUT_BY_PAIR)
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0 if TRANS_W else 1]
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
        a_smem = gl.allocate_shared_memory(w_desc.dtype, [BLOCK_M, BLOCK_K],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], w_desc.dtype))
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES, w_desc.block_type.shape[0],
                                                          w_desc.block_type.shape[1]], w_desc.layout)
        a_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        w_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(a_bar, count=1)
        for s in gl.static_range(NUM_STAGES):
            mbarrier.init(w_bars.index(s), count=1)
        if A_GROUP == 0:
            mbarrier.expect(a_bar, a_desc.block_type.nbytes)
            tma_load(a_desc, [start, 0], a_bar, a_smem)
        for s in gl.static_range(NUM_STAGES):
            _load_w_slice(w_desc, w_bars.index(s), w_smem.index(s), e, n_lo + s * BLOCK_N, N, K, TRANS_W,
                          s < n_slices)
        pos = start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
        rmask = pos < end
        if OUT_BY_PAIR:
            rows = gl.load(order_ptr + pos, mask=rmask, other=0).to(gl.int64)
            if SUM_GROUP > 0:
                rows = rows // SUM_GROUP
        else:
            rows = pos.to(gl.int64)
        if HAS_SCALE:
            spos = start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
            spair = gl.load(order_ptr + spos, mask=spos < end, other=0)
            scale = gl.load(scale_ptr + spair, mask=spos < end, other=0.0).to(gl.float32)
        if A_GROUP > 0:
            _gather_a_tile(a_smem, a_ptr, order_ptr, scale_ptr, side_ptr, start, end, K, s_am, s_om,
                           (pid % num_chunks) == 0, A_GROUP, HAS_SCALE, STORE_SIDE, num_warps)
        elif MASK_A:
            _mask_a_tile(a_smem, amask_ptr, side_ptr, a_bar, start, end, K, s_mm, s_om, (pid % num_chunks) == 0,
                         STORE_SIDE, num_warps)
        else:
            mbarrier.wait(a_bar, phase=0)
        zero = gl.zeros([BLOCK_M, BLOCK_N], dtype=gl.float32, layout=acc_layout)
        for i in range(0, n_slices):
            buf = i % NUM_STAGES
            mbarrier.wait(w_bars.index(buf), phase=(i // NUM_STAGES) & 1)
            if TRANS_W:
                w_tile = w_smem.index(buf).permute((1, 0))
            else:
                w_tile = w_smem.index(buf)
            acc = warpgroup_mma(a_smem, w_tile, zero, use_acc=False, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            if i + NUM_STAGES < n_slices:       # the buffer is free again: fetch the slice NUM_STAGES ahead
                _load_w_slice(w_desc, w_bars.index(buf), w_smem.index(buf), e, n_lo + (i + NUM_STAGES) * BLOCK_N,
                              N, K, TRANS_W, True)
            if RELU_OUT:
                acc = gl.maximum(acc, 0.0)
            if HAS_SCALE:
                acc = acc * scale[:, None]
            out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), out_layout)
            cols = n_lo + i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
            ptrs = c_ptr + rows[:, None] * s_cm + cols[None, :]
            if SUM_GROUP > 0:
                gl.atomic_add(ptrs, out, mask=rmask[:, None] & (cols < N)[None, :], sem="relaxed")
            else:
                gl.store(ptrs, out, mask=rmask[:, None] & (cols < N)[None, :])
        mbarrier.invalidate(a_bar)
        for s in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(w_bars.index(s))


@gluon.jit
def _load_w_slice(w_desc, bar, dest, e, n0, N, K, TRANS_W: gl.constexpr, pred):
    """TMA of W[e]'s output columns [n0, n0 + BLOCK_N) into dest, arriving on bar (nothing where pred is false)."""
    mbarrier.expect(bar, w_desc.block_type.nbytes, pred=pred)
    if TRANS_W:
        tma_load(w_desc, [e * N + n0, 0], bar, dest, pred=pred)
    else:
        tma_load(w_desc, [e * K, n0], bar, dest, pred=pred)


@constexpr_function
def chunk_width(block_k):
    """Columns per chunk of the pointer-loaded tiles: the whole tile at once spills registers (ptxas, 128 x 128).
    _load_chunks loads four: gmm_config's block_k is at most 128."""
    if block_k > 4 * 32:
        raise ValueError(f"a pointer-loaded A tile of {block_k} columns needs more than four chunks")
    return min(block_k, 32)


@gluon.jit
def _load_chunks(ptr, rows, rmask, K, s_m, CHUNK: gl.constexpr, layout: gl.constexpr):
    """Rows `rows` (masked by rmask) of a [*, K] tensor as four chunks of CHUNK columns (a chunk past K loads
    nothing), all issued at once so that their latencies overlap."""
    ks = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, layout))
    base = ptr + rows[:, None] * s_m + ks[None, :]
    return (gl.load(base, mask=rmask[:, None] & (ks < K)[None, :], other=0.0),
            gl.load(base + CHUNK, mask=rmask[:, None] & (ks + CHUNK < K)[None, :], other=0.0),
            gl.load(base + 2 * CHUNK, mask=rmask[:, None] & (ks + 2 * CHUNK < K)[None, :], other=0.0),
            gl.load(base + 3 * CHUNK, mask=rmask[:, None] & (ks + 3 * CHUNK < K)[None, :], other=0.0))


@gluon.jit
def _gather_a_tile(a_smem, a_ptr, order_ptr, scale_ptr, side_ptr, start, end, K, s_am, s_om, first,
                   A_GROUP: gl.constexpr, HAS_SCALE: gl.constexpr, STORE_SIDE: gl.constexpr,
                   num_warps: gl.constexpr):
    """A rows pair // A_GROUP of the tile into shared memory by pointer loads (Hopper's TMA cannot gather rows),
    every chunk's issued before the first is stored; the first program of the tile also stores them (times the
    pair's scale with HAS_SCALE) at the sorted positions of side. Then the fence and barrier that make the tile
    visible to wgmma."""
    CHUNK: gl.constexpr = chunk_width(a_smem.shape[1])
    layout: gl.constexpr = row_store_layout(CHUNK, num_warps)
    pos = start + gl.arange(0, a_smem.shape[0], layout=gl.SliceLayout(1, layout))
    rmask = pos < end
    pair = gl.load(order_ptr + pos, mask=rmask, other=0)
    chunks = _load_chunks(a_ptr, pair.to(gl.int64) // A_GROUP, rmask, K, s_am, CHUNK, layout)
    if STORE_SIDE and HAS_SCALE:
        scale = gl.load(scale_ptr + pair, mask=rmask & first, other=0.0).to(gl.float32)
    for c in gl.static_range(a_smem.shape[1] // CHUNK):
        a_smem.slice(c * CHUNK, CHUNK, dim=1).store(chunks[c])
        if STORE_SIDE:
            if first:
                side = chunks[c]
                if HAS_SCALE:
                    side = (side.to(gl.float32) * scale[:, None]).to(side.dtype)
                _store_chunk(side_ptr, pos.to(gl.int64), rmask, c, K, s_om, side, CHUNK, layout)
    fence_async_shared()
    cta_barrier()


@gluon.jit
def _store_chunk(side_ptr, pos, rmask, c, K, s_om, value, CHUNK: gl.constexpr, layout: gl.constexpr):
    """Chunk c (columns [c * CHUNK, (c + 1) * CHUNK)) of the tile's rows at the sorted positions pos of side."""
    ks = c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, layout))
    gl.store(side_ptr + pos[:, None] * s_om + ks[None, :], value, mask=rmask[:, None] & (ks < K)[None, :])


@gluon.jit
def _mask_a_tile(a_smem, amask_ptr, side_ptr, a_bar, start, end, K, s_mm, s_om, first, STORE_SIDE: gl.constexpr,
                 num_warps: gl.constexpr):
    """Waits for the A tile, then A *= (mask > 0) in shared memory, chunk by chunk. The mask comes by pointer loads
    (a second TMA tile would leave room for only one program per SM), every chunk's issued before the wait so that
    their latencies overlap each other's and the A tile's. The first program of the tile also stores the masked
    rows (side). Ends with the fence and barrier that make the rewritten tile visible to wgmma."""
    CHUNK: gl.constexpr = chunk_width(a_smem.shape[1])
    layout: gl.constexpr = row_store_layout(CHUNK, num_warps)
    pos = start + gl.arange(0, a_smem.shape[0], layout=gl.SliceLayout(1, layout))
    rmask = pos < end
    pos = pos.to(gl.int64)
    masks = _load_chunks(amask_ptr, pos, rmask, K, s_mm, CHUNK, layout)
    mbarrier.wait(a_bar, phase=0)
    for c in gl.static_range(a_smem.shape[1] // CHUNK):
        part = a_smem.slice(c * CHUNK, CHUNK, dim=1)
        a = gl.where(masks[c] > 0, part.load(layout), 0.0)
        part.store(a)
        if STORE_SIDE:
            if first:
                _store_chunk(side_ptr, pos, rmask, c, K, s_om, a, CHUNK, layout)
    fence_async_shared()
    cta_barrier()


def descriptor(t, block: list[int]) -> TensorDescriptor:
    """A Gluon TMA descriptor of the 2-D tensor t in `block` tiles, in the wgmma operand's shared layout."""
    dtype = {"torch.bfloat16": gl.bfloat16, "torch.float16": gl.float16}[str(t.dtype)]
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))
