"""The Triton kernels (no autograd, no model knowledge). Wrappers live in routing.py and grouped.py.

Vocabulary: a *pair* p = row * S + slot is one (row, chosen expert); `order[j]` is the pair at *sorted position* j
(pairs sorted by expert, stable); expert e owns sorted positions [offsets[e], offsets[e+1]). Matmul kernels walk
*tiles*: BLOCK_M consecutive sorted positions inside one expert (tile_expert[t], tile_start[t]); the padding to a
multiple of BLOCK_M lives only in this tile list, never in the data. Row offsets are int64: the per-pair buffers of
the 1B shape exceed 2^31 elements.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _flip_sign_magnitude(b):
    """int32 bits of an fp32 <-> an int32 with the same order as the float (an involution: also the inverse)."""
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def sigmoid_topk_kernel(logits_ptr, gate_ptr, index_ptr, key_ptr, n_rows, n, stride_row, stride_group,
                        K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = BLOCK_R rows of one group: top-K by logit (= by sigmoid, monotonic), lowest index on ties.

    Each logit and its column are packed into one integer (order-preserving bits of the value high,
    BLOCK_N-1-column low), so one max-reduction per pick finds the largest value and, among equal values, the lowest
    column. When every logit of the block is a bf16 value held in fp32 (router logits from a bf16 GEMM: the low 16
    bits are zero), the 16 value bits and the column fit one int32, whose reductions cost half those of the int64
    packing that exact fp32 logits need; both give the same picks. The picks collect in registers and each row's
    gates, global expert ids (int64) and narrow sort keys are stored once, K contiguous values per row. No
    histogram: the per-expert counts come from the sorted keys (routing.py), so no atomics contend here.
    """
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    cmask = cols < n
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row + g * stride_group + cols[None, :]
    vals = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
    vals = tl.where(vals == 0.0, 0.0, vals)                           # -0.0 ties with 0.0, as in the float order
    bits = vals.to(tl.int32, bitcast=True)
    ordered = _flip_sign_magnitude(bits)
    code = (BLOCK_N - 1 - cols)[None, :]
    bf16_values = tl.max(tl.max(bits & 0xFFFF, axis=1), axis=0) == 0
    if bf16_values & (BLOCK_N <= 65536):                             # the column code needs <= 16 bits
        value, idx = _pick_topk(((ordered >> 16) << 16) | code, cols, cmask, K, BLOCK_K, BLOCK_N, 16)
    else:
        value, idx = _pick_topk((ordered.to(tl.int64) << 32) | code.to(tl.int64), cols, cmask, K, BLOCK_K, BLOCK_N,
                                32)
    slots = tl.arange(0, BLOCK_K)
    out = rows.to(tl.int64)[:, None] * (tl.num_programs(1) * K) + g * K + slots[None, :]
    omask = rmask[:, None] & (slots < K)[None, :]
    expert = g * n + idx
    tl.store(gate_ptr + out, tl.sigmoid(value).to(gate_ptr.dtype.element_ty), mask=omask)
    tl.store(index_ptr + out, expert.to(tl.int64), mask=omask)
    tl.store(key_ptr + out, expert.to(key_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _pick_topk(packed, cols, cmask, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
               SHIFT: tl.constexpr):
    """K max-reductions over packed values (value bits above SHIFT, column code below), each pick masking its
    column with the packing's minimum (padding columns start masked). Returns the picks' logits [R, BLOCK_K] fp32
    and columns [R, BLOCK_K] int32, in pick order (slots past K hold nothing; the caller masks them)."""
    if SHIFT == 16:
        taken = -2147483648                 # below every packed logit (the packing's minimum)
    else:
        taken = -9223372036854775808
    packed = tl.where(cmask[None, :], packed, taken)                 # padding columns are never picked
    slots = tl.arange(0, BLOCK_K)[None, :]
    picks = tl.zeros([packed.shape[0], BLOCK_K], dtype=packed.dtype)
    for j in tl.static_range(K):
        best = tl.max(packed, axis=1)
        picks = tl.where(slots == j, best[:, None], picks)
        idx = BLOCK_N - 1 - (best & ((1 << SHIFT) - 1)).to(tl.int32)
        packed = tl.where(cols[None, :] == idx[:, None], taken, packed)
    idx = BLOCK_N - 1 - (picks & ((1 << SHIFT) - 1)).to(tl.int32)
    if SHIFT == 16:
        hi = picks >> 16                                                     # the value's ordered bf16 bits
        bits = (hi ^ ((hi >> 15) & 0x7FFF)) << 16
    else:
        bits = _flip_sign_magnitude((picks >> 32).to(tl.int32))
    return bits.to(tl.float32, bitcast=True), idx


@triton.jit
def expert_starts_kernel(key_ptr, starts_ptr, n_keys, E, search_steps, BLOCK_E: tl.constexpr):
    """starts[e] = the first sorted position whose key is >= e, for e = 0..E (so starts[E] counts the keys below E:
    remote pairs, keyed E, are left out): one lower-bound binary search per expert over the stably sorted keys,
    search_steps (= n_keys.bit_length()) deep. The expert offsets with no histogram, so no atomics contend."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e <= E
    lo = tl.zeros([BLOCK_E], dtype=tl.int64)
    hi = tl.zeros([BLOCK_E], dtype=tl.int64) + n_keys
    for _ in range(0, search_steps):
        open_ = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(key_ptr + mid, mask=emask & open_, other=0).to(tl.int32) < e
        lo = tl.where(open_ & below, mid + 1, lo)
        hi = tl.where(open_ & ~below, mid, hi)
    tl.store(starts_ptr + e, lo, mask=emask)


@triton.jit
def plan_kernel(offsets_ptr, tile_expert_ptr, tile_start_ptr, E, n_tiles,
                BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """The tile list from the per-expert offsets [E + 1], in one launch.

    Every program recomputes the (cheap) tile cumsum over experts and fills BLOCK_T entries of the tile list; tiles
    past the real count get expert E (the matmul kernels skip them).
    """
    pid = tl.program_id(0)
    es = tl.arange(0, BLOCK_E)
    emask = es < E
    excl = tl.load(offsets_ptr + es, mask=emask, other=0)
    counts = tl.load(offsets_ptr + es + 1, mask=emask, other=0) - excl
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tincl = tl.cumsum(tiles, 0)
    texcl = tincl - tiles
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    done = (tincl[None, :] <= t[:, None]) & emask[None, :]
    expert = tl.sum(done.to(tl.int32), axis=1)
    onehot = es[None, :] == expert[:, None]
    base = tl.sum(tl.where(onehot, excl[None, :], 0), axis=1)
    first = tl.sum(tl.where(onehot, texcl[None, :], 0), axis=1)
    tmask = t < n_tiles
    tl.store(tile_expert_ptr + t, expert, mask=tmask)
    tl.store(tile_start_ptr + t, (base + (t - first) * BLOCK_M).to(tl.int32), mask=tmask)


@triton.jit
def window_tiles_kernel(order_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, win_expert_ptr, win_start_ptr,
                        E, n_tiles, search_steps, group_experts, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_E: tl.constexpr):
    """The tile list in window order: sorted by each tile's group of experts (e // group_experts), then by its first
    pair id, so that tile j of every expert of a group runs together over a narrow window of tokens, unused tiles
    (expert E) left at the tail. No sort: a tile's rank is the number of tiles of the earlier groups' experts plus
    the number of tiles of its own group's experts whose first pair id is smaller, found by a binary search over
    that expert's tiles (pair ids ascend within an expert), all experts of BLOCK_E at once, search_steps deep."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < n_tiles
    e = tl.load(tile_expert_ptr + t, mask=tmask, other=E)
    start = tl.load(tile_start_ptr + t, mask=tmask, other=0)
    valid = tmask & (e < E)
    key = tl.load(order_ptr + start, mask=valid, other=0)[:, None]
    group = (e // group_experts)[:, None]
    rank = tl.zeros([BLOCK_T], dtype=tl.int64)
    for e0 in range(0, E, BLOCK_E):
        others = e0 + tl.arange(0, BLOCK_E)
        omask = others < E
        first = tl.load(offsets_ptr + others, mask=omask, other=0)
        count = tl.load(offsets_ptr + others + 1, mask=omask, other=0) - first
        tiles = ((count + BLOCK_M - 1) // BLOCK_M)[None, :]
        other_group = (others // group_experts)[None, :]
        same = valid[:, None] & (other_group == group)
        lo = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int64)               # lower bound of key among the first
        hi = tl.where(same, tiles, 0)                                   # pair ids of the group's experts' tiles
        for _ in range(0, search_steps):
            open_ = lo < hi
            mid = (lo + hi) // 2
            below = tl.load(order_ptr + first[None, :] + mid * BLOCK_M, mask=open_, other=0) < key
            lo = tl.where(open_ & below, mid + 1, lo)
            hi = tl.where(open_ & ~below, mid, hi)
        rank += tl.sum(tl.where(other_group < group, tiles, lo), axis=1)     # all tiles of an earlier group
    dest = tl.where(valid, rank, t)
    tl.store(win_expert_ptr + dest, e, mask=tmask)
    tl.store(win_start_ptr + dest, start, mask=tmask)


@triton.jit
def _source_rows(pair, pos, idx_ptr, rmask, GROUP: tl.constexpr):
    """The operand row of each pair: pair // GROUP (GROUP > 0), idx[pair] (GROUP < 0), or the sorted position."""
    if GROUP > 0:
        rows = pair // GROUP
    elif GROUP < 0:
        rows = tl.load(idx_ptr + pair, mask=rmask, other=0).to(tl.int64)
    else:
        rows = pos
    return rows


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr):
    if FP32_DOT:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _program_tile(tile_expert_ptr, tile_start_ptr, offsets_ptr, order_ptr, N, E, n_per_prog,
                  BLOCK_M: tl.constexpr):
    """This program's (column chunk, expert, whether the tile is used, first sorted position, positions, row mask,
    the rows' entries of order) in a tile list of n_per_prog-column programs. An unused tile (expert E, the
    static list's tail) masks every row."""
    pid = tl.program_id(0)
    num_chunks = tl.cdiv(N, n_per_prog)
    tile = pid // num_chunks
    chunk = pid % num_chunks
    e = tl.load(tile_expert_ptr + tile)
    valid = e < E
    e = tl.where(valid, e, 0)
    start = tl.load(tile_start_ptr + tile).to(tl.int64)
    end = tl.where(valid, tl.load(offsets_ptr + e + 1), 0)
    pos = start + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = pos < end
    pair = tl.load(order_ptr + pos, mask=rmask, other=0)
    return chunk, e, valid, start, pos, rmask, pair


@triton.jit
def gmm_kernel(a_ptr, w_ptr, c_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr,
               scale_ptr, amask_ptr, dsrc_ptr, gpart_ptr, aidx_ptr, didx_ptr, side_ptr, a_desc, m_desc, w_desc,
               N, K, E, n_per_prog,
               s_am, s_ak, s_we, s_wk, s_wn, s_cm, s_cn, s_mm, s_mk, s_dm, s_dk, s_gp, s_om, s_ok,
               A_GROUP: tl.constexpr, D_GROUP: tl.constexpr, OUT_BY_PAIR: tl.constexpr, RELU_OUT: tl.constexpr,
               MASK_A: tl.constexpr, MASK_OUT: tl.constexpr, HAS_SCALE: tl.constexpr, GATE_GRAD: tl.constexpr,
               SCALE_GRAD: tl.constexpr,
               A_RESIDENT: tl.constexpr, STORE_SIDE: tl.constexpr, TRANS_W: tl.constexpr,
               SUM_GROUP: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[rows] = epilogue(A[rows] @ W[e]) for one tile of one expert and n_per_prog columns of the output.

    A rows: the sorted position itself (A_GROUP == 0), the gathered row pair // A_GROUP (A_GROUP > 0) or aidx[pair]
    (A_GROUP < 0: an explicit pair -> row index), loaded straight from the source (no gathered copy). D rows
    (GATE_GRAD) likewise with D_GROUP / didx. MASK_A: A *= (amask[pos] > 0) (ReLU backward). GATE_GRAD: writes
    gpart[pair, program's column chunk] = sum over its columns of acc * D[rows] (the gate's gradient for this
    chunk, no atomics). Then optional ReLU, optional per-pair scale (the gate), and a store at the sorted position
    or at the pair id (OUT_BY_PAIR). SUM_GROUP > 0 (with OUT_BY_PAIR): added instead, by relaxed atomics, into row
    pair // SUM_GROUP of the summed output C (zeroed by the caller), in a run-dependent order.
    A_RESIDENT (K <= BLOCK_K, the short-K calls K = d_e that write wide [P, d] outputs; not with GATE_GRAD): the
    tile's A rows (and mask) are loaded once and reused for every BLOCK_N slice of the program's columns, instead
    of once per slice by separate programs; otherwise n_per_prog == BLOCK_N and the program loops over K.
    MASK_OUT (not MASK_A; amask then has the output's shape, in sorted pair layout): the stored output is zero where
    amask[pos] <= 0. The down projection's input gradient of the σ-MoE MLP uses it with the gate (HAS_SCALE) and
    amask = y = s * relu(.), the saved hidden units: it then stores s * dh * (y > 0), which is at once the up
    projection's input-gradient operand and its weight gradient's. SCALE_GRAD (MASK_OUT, HAS_SCALE) also writes
    gpart[pair, program's column chunk] = <out, y> / s^2 over the chunk's columns (their sum is
    <dy, relu(.)>, the gradient of the scale s; 0 where s^2 is 0), from the stored (rounded) outputs.
    STORE_SIDE: also writes, at the sorted position in side, the operand the weight gradient will pair with the
    other one, with the mask and the gate already applied: the effective A rows (A * mask * scale, once per tile)
    for A_RESIDENT, the D rows times the scale for GATE_GRAD. The weight gradient then reads one operand sorted
    and unscaled instead of loading the mask or scaling a gathered operand in each of its programs. With GATE_GRAD
    that store comes before the K loop, from a load of its own (D is loaded again for the gate gradient after the
    loop): measured faster than storing from the epilogue, which holds the accumulator and D at once.
    TMA (descriptors are None otherwise): w_desc views W as [E*K, N] (or [E*N, K] with TRANS_W) so each W tile is
    one descriptor load; a_desc / m_desc (A_RESIDENT, sorted A, A_GROUP == 0) load the whole A tile and mask from
    the tile's first sorted position. Rows or columns such a load takes past the tile's expert belong to the next
    expert or are zero-filled past the tensor; only masked outputs, or A's zero columns past K, see them.
    """
    tl.static_assert(not (MASK_A and MASK_OUT))
    tl.static_assert(not SCALE_GRAD or (MASK_OUT and HAS_SCALE))
    chunk, e, valid, start, pos, rmask, pair = _program_tile(tile_expert_ptr, tile_start_ptr, offsets_ptr,
                                                             order_ptr, N, E, n_per_prog, BLOCK_M)
    a_row = _source_rows(pair, pos, aidx_ptr, rmask, A_GROUP)
    if GATE_GRAD:
        d_row = _source_rows(pair, pos, didx_ptr, rmask, D_GROUP)
    else:
        d_row = pair
    tl.static_assert(SUM_GROUP == 0 or OUT_BY_PAIR)
    if SUM_GROUP > 0:
        c_row = pair // SUM_GROUP
    elif OUT_BY_PAIR:
        c_row = pair
    else:
        c_row = pos
    w_base = w_ptr + e.to(tl.int64) * s_we
    n_lo = chunk * n_per_prog
    n_hi = tl.where(valid, tl.minimum(n_lo + n_per_prog, N), n_lo)    # an unused tile runs no slice
    if A_RESIDENT:
        tl.static_assert(not GATE_GRAD)     # measured slower: the D loads per slice crowd the pipeline
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < K
        if a_desc is not None:
            first = start.to(tl.int32)
            a = a_desc.load([first, 0])
            if MASK_A:
                m = m_desc.load([first, 0])
        else:
            a = _load_a(a_ptr, amask_ptr, a_row, pos, ks, rmask, kmask, s_am, s_ak, s_mm, s_mk, False)
            if MASK_A:
                m = _load_mask(amask_ptr, pos, ks, rmask, kmask, s_mm, s_mk)
        if MASK_A:
            a = tl.where(m > 0, a, 0.0)
        s = _pair_scale(scale_ptr, pair, rmask, HAS_SCALE, BLOCK_M)     # once per tile, not per slice
        g = tl.zeros([BLOCK_M], dtype=tl.float32)
        if STORE_SIDE:
            if chunk == 0:
                side = a
                if HAS_SCALE:
                    side = (a.to(tl.float32) * s[:, None]).to(a.dtype)
                tl.store(side_ptr + pos[:, None] * s_om + ks[None, :] * s_ok, side,
                         mask=rmask[:, None] & kmask[None, :])
        for n0 in range(n_lo, n_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            nmask = cols < N
            w = _load_w(w_desc, w_base, e, 0, n0, ks, cols, kmask, nmask, s_wk, s_wn, N, K, TRANS_W)
            acc = _dot(a, w, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), FP32_DOT, PRECISION)
            gs = _epilogue(acc, s, pos, c_row, d_row, rmask, cols, nmask, c_ptr, dsrc_ptr, amask_ptr, s_cm, s_cn,
                           s_dm, s_dk, s_mm, s_mk, RELU_OUT, MASK_OUT, HAS_SCALE, GATE_GRAD, SCALE_GRAD, SUM_GROUP,
                           BLOCK_M)
            if SCALE_GRAD:
                g += gs
        if SCALE_GRAD:
            tl.store(gpart_ptr + pair * s_gp + chunk, g, mask=rmask)
    else:
        tl.static_assert(not STORE_SIDE or (GATE_GRAD and HAS_SCALE))
        cols = n_lo + tl.arange(0, BLOCK_N)
        nmask = cols < n_hi
        s = _pair_scale(scale_ptr, pair, rmask, HAS_SCALE, BLOCK_M)
        if STORE_SIDE:
            omask = rmask[:, None] & nmask[None, :]
            d = _load_d(dsrc_ptr, d_row, cols, omask, s_dm, s_dk)
            tl.store(side_ptr + pos[:, None] * s_om + cols[None, :] * s_ok,
                     (d.to(tl.float32) * s[:, None]).to(d.dtype), mask=omask)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_hi = tl.where(valid, K, 0)
        for k0 in range(0, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = _load_a(a_ptr, amask_ptr, a_row, pos, ks, rmask, kmask, s_am, s_ak, s_mm, s_mk, MASK_A)
            w = _load_w(w_desc, w_base, e, k0, n_lo, ks, cols, kmask, nmask, s_wk, s_wn, N, K, TRANS_W)
            acc = _dot(a, w, acc, FP32_DOT, PRECISION)
        g = _epilogue(acc, s, pos, c_row, d_row, rmask, cols, nmask, c_ptr, dsrc_ptr, amask_ptr, s_cm, s_cn, s_dm,
                      s_dk, s_mm, s_mk, RELU_OUT, MASK_OUT, HAS_SCALE, GATE_GRAD, SCALE_GRAD, SUM_GROUP, BLOCK_M)
        if GATE_GRAD or SCALE_GRAD:
            tl.store(gpart_ptr + pair * s_gp + chunk, g, mask=rmask)


@triton.jit
def _load_w(w_desc, w_base, e, k0, n0, ks, cols, kmask, nmask, s_wk, s_wn, N, K, TRANS_W: tl.constexpr):
    """W[e][ks, cols] (zeros outside K x N) by pointers, or by descriptor at (k0, n0) (rows of W past K, or for
    TRANS_W columns past N, then belong to the next expert: the caller's A is zero past K and its outputs past N
    are masked)."""
    if w_desc is None:
        w = tl.load(w_base + ks[:, None] * s_wk + cols[None, :] * s_wn, mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
    elif TRANS_W:
        w = tl.trans(w_desc.load([e * N + n0, k0]))
    else:
        w = w_desc.load([e * K + k0, n0])
    return w


@triton.jit
def _load_a(a_ptr, amask_ptr, a_row, pos, ks, rmask, kmask, s_am, s_ak, s_mm, s_mk, MASK_A: tl.constexpr):
    """A[rows, ks], times the ReLU mask (amask at the sorted position > 0) when MASK_A."""
    m2 = rmask[:, None] & kmask[None, :]
    a = tl.load(a_ptr + a_row[:, None] * s_am + ks[None, :] * s_ak, mask=m2, other=0.0)
    if MASK_A:
        a = tl.where(_load_mask(amask_ptr, pos, ks, rmask, kmask, s_mm, s_mk) > 0, a, 0.0)
    return a


@triton.jit
def _load_mask(amask_ptr, pos, ks, rmask, kmask, s_mm, s_mk):
    """The mask source (the forward's output) at the sorted positions, zeros outside the tile."""
    return tl.load(amask_ptr + pos[:, None] * s_mm + ks[None, :] * s_mk, mask=rmask[:, None] & kmask[None, :],
                   other=0.0)


@triton.jit
def _load_d(dsrc_ptr, d_row, cols, omask, s_dm, s_dk):
    """The D rows of the fused gate gradient (the forward's input rows), zeros outside omask."""
    return tl.load(dsrc_ptr + d_row[:, None] * s_dm + cols[None, :] * s_dk, mask=omask, other=0.0)


@triton.jit
def _pair_scale(scale_ptr, pair, rmask, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each row's per-pair scale (the gate) in fp32; ones without HAS_SCALE (then never applied)."""
    if HAS_SCALE:
        s = tl.load(scale_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
    else:
        s = tl.full([BLOCK_M], 1.0, tl.float32)
    return s


@triton.jit
def _epilogue(acc, s, pos, c_row, d_row, rmask, cols, nmask, c_ptr, dsrc_ptr, amask_ptr, s_cm, s_cn, s_dm, s_dk,
              s_mm, s_mk, RELU_OUT: tl.constexpr, MASK_OUT: tl.constexpr, HAS_SCALE: tl.constexpr,
              GATE_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr, SUM_GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Stores (adds, with SUM_GROUP) epilogue(acc) for one [BLOCK_M, BLOCK_N] slice, scaled by s (the rows'
    _pair_scale) with HAS_SCALE and zeroed where the output mask (amask at the sorted positions, loaded here, after
    the K loop: before it, its registers spill) is not positive with MASK_OUT; returns this slice's gate-gradient
    partial: sum_n acc * D[d_row] (GATE_GRAD), sum_n out * mask / s^2 (SCALE_GRAD), zeros otherwise."""
    if MASK_OUT:
        om = _load_mask(amask_ptr, pos, cols, rmask, nmask, s_mm, s_mk)
    omask = rmask[:, None] & nmask[None, :]
    g = tl.zeros([BLOCK_M], dtype=tl.float32)
    if GATE_GRAD:
        d = _load_d(dsrc_ptr, d_row, cols, omask, s_dm, s_dk)
        g = tl.sum(acc * d.to(tl.float32), axis=1)
    if RELU_OUT:
        acc = tl.maximum(acc, 0.0)
    if HAS_SCALE:
        acc = acc * s[:, None]
    out = acc.to(c_ptr.dtype.element_ty)
    if MASK_OUT:
        out = tl.where(om > 0, out, 0.0).to(c_ptr.dtype.element_ty)
        if SCALE_GRAD:
            s2 = s * s     # 0 also where it underflows (s < ~1e-19): then s(1-s), the logit's factor, is ~0
            dots = tl.sum(out.to(tl.float32) * om.to(tl.float32), axis=1)
            g = tl.where(s2 > 0.0, dots / tl.where(s2 > 0.0, s2, 1.0), 0.0)
    if SUM_GROUP > 0:
        tl.atomic_add(c_ptr + c_row[:, None] * s_cm + cols[None, :] * s_cn, out, mask=omask, sem="relaxed")
    else:
        tl.store(c_ptr + c_row[:, None] * s_cm + cols[None, :] * s_cn, out, mask=omask)
    return g


@triton.jit
def wgrad_kernel(a_ptr, b_ptr, gw_ptr, order_ptr, offsets_ptr, eorder_ptr, scale_ptr, aidx_ptr,
                 bidx_ptr, a_desc, b_desc, K, N, E,
                 s_am, s_ak, s_bm, s_bn, s_gs, s_ge, s_gk, s_gn,
                 A_GROUP: tl.constexpr, B_GROUP: tl.constexpr, HAS_SCALE: tl.constexpr,
                 SPLITS: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """gW[s, e, k-tile, n-tile] = sum over chunk s of e's sorted rows of A^T B, in a fixed order: no atomics,
    bitwise repeatable.

    Each expert's rows are cut into SPLITS chunks of equal length (rounded up to BLOCK_R; a function of the
    expert's row count only), one program per (chunk, expert, tile of W), so that few experts with many rows still
    fill the GPU; with SPLITS > 1 the caller sums the chunks in a fixed order. Programs take the experts in the
    order eorder (the caller passes the most loaded first), so that the longest programs start first instead of
    forming the tail; each program's result does not depend on that order. A rows gathered (pair // A_GROUP,
    or aidx[pair] when A_GROUP < 0) or sorted; B rows gathered (pair // B_GROUP, or bidx[pair] when B_GROUP < 0;
    times the gate when HAS_SCALE) or sorted (the ReLU mask is already applied by the caller). Empty chunks write
    exact zeros. a_desc / b_desc (or None): a sorted operand loaded by TMA descriptor; its rows past the chunk
    belong to the next chunk or expert, and add nothing because the other operand, gathered with the row mask, is
    zero there (so the caller gives a descriptor for one operand at most).
    """
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    num_n = tl.cdiv(N, BLOCK_N)
    per_expert = SPLITS * num_k * num_n
    e = tl.load(eorder_ptr + pid // per_expert)
    rest = pid % per_expert
    split = rest // (num_k * num_n)
    rest = rest % (num_k * num_n)
    pid_k = rest // num_n
    pid_n = rest % num_n
    first = tl.load(offsets_ptr + e)
    last = tl.load(offsets_ptr + e + 1)
    chunk = tl.cdiv(tl.cdiv(last - first, SPLITS), BLOCK_R) * BLOCK_R
    start = first + split * chunk
    end = tl.minimum(start + chunk, last)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = ks < K
    nmask = ns < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        pos = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = pos < end
        pair = tl.load(order_ptr + pos, mask=rmask, other=0)
        a_row = _source_rows(pair, pos, aidx_ptr, rmask, A_GROUP)
        b_row = _source_rows(pair, pos, bidx_ptr, rmask, B_GROUP)
        if a_desc is not None:
            a = a_desc.load([tl.cast(r0, tl.int32), pid_k * BLOCK_K])
        else:
            a = tl.load(a_ptr + a_row[:, None] * s_am + ks[None, :] * s_ak, mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
        if b_desc is not None:
            b = b_desc.load([tl.cast(r0, tl.int32), pid_n * BLOCK_N])
        else:
            b = tl.load(b_ptr + b_row[:, None] * s_bm + ns[None, :] * s_bn, mask=rmask[:, None] & nmask[None, :],
                        other=0.0)
        if HAS_SCALE:
            s = tl.load(scale_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * s[:, None]).to(b.dtype)
        acc = _dot(tl.trans(a), b, acc, FP32_DOT, PRECISION)
    gmask = kmask[:, None] & nmask[None, :]
    tl.store(gw_ptr + split.to(tl.int64) * s_gs + e.to(tl.int64) * s_ge + ks[:, None] * s_gk + ns[None, :] * s_gn,
             acc.to(gw_ptr.dtype.element_ty), mask=gmask)


@triton.jit
def pair_dot_kernel(a_ptr, b_ptr, out_ptr, aidx_ptr, n_pairs, N, s_am, s_an, s_bm, s_bn,
                    A_GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[p] = sum_n A[row(p), n] * B[p, n] in fp32, row(p) = p // A_GROUP or aidx[p] (A_GROUP < 0), in a fixed
    order: the gate's gradient <grad of the summed output row, the pair's saved pre-gate product>."""
    pair = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = pair < n_pairs
    a_row = _source_rows(pair, pair, aidx_ptr, rmask, A_GROUP)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        m = rmask[:, None] & (cols[None, :] < N)
        a = tl.load(a_ptr + a_row[:, None] * s_am + cols[None, :] * s_an, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + pair[:, None] * s_bm + cols[None, :] * s_bn, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + pair, acc, mask=rmask)


@triton.jit
def group_sum_kernel(buf_ptr, out_ptr, scale_ptr, n_out, N, s_bm, s_bn, s_om, s_on,
                     GROUP: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[r] = sum_j scale[r*GROUP+j] * buf[r*GROUP+j] in fixed j order, fp32 accumulation (deterministic).

    buf is indexed by pair id, so a row's GROUP pairs are contiguous: every load is a coalesced row segment. Rows
    with a zero scale are not read: a remote pair (expert parallelism) has no computed row, only a zero scale.
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_out
    mask = rmask[:, None] & (cols[None, :] < N)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(GROUP):
        p = rows * GROUP + j
        if HAS_SCALE:
            s = tl.load(scale_ptr + p, mask=rmask, other=0.0).to(tl.float32)
            v = tl.load(buf_ptr + p[:, None] * s_bm + cols[None, :] * s_bn, mask=mask & (s != 0)[:, None],
                        other=0.0).to(tl.float32) * s[:, None]
        else:
            v = tl.load(buf_ptr + p[:, None] * s_bm + cols[None, :] * s_bn, mask=mask, other=0.0).to(tl.float32)
        acc += v
    tl.store(out_ptr + rows[:, None] * s_om + cols[None, :] * s_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def segment_sum_kernel(buf_ptr, out_ptr, scale_ptr, seg_ptr, perm_ptr, n_out, N, s_bm, s_bn, s_om, s_on,
                       HAS_SCALE: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """out[r] = sum_j scale[p_j] * buf[p_j] over j in [seg[r], seg[r+1]), p_j = perm[j] or j, in increasing j with
    fp32 accumulation: the variable-length sibling of group_sum_kernel (deterministic, no atomics; rows with a
    zero scale are not read).

    A block of BLOCK_R rows loops to its longest segment; shorter rows are masked (segments of one expert-parallel
    dispatch have 1..K pairs, so the waste is bounded by K per block). Empty segments give exact zeros.
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_out
    cmask = cols < N
    start = tl.load(seg_ptr + rows, mask=rmask, other=0)
    length = tl.load(seg_ptr + rows + 1, mask=rmask, other=0) - start
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for j in range(0, tl.max(length, axis=0)):
        live = rmask & (j < length)
        q = start + j
        if HAS_PERM:
            p = tl.load(perm_ptr + q, mask=live, other=0)
        else:
            p = q
        if HAS_SCALE:
            s = tl.load(scale_ptr + p, mask=live, other=0.0).to(tl.float32)
            v = tl.load(buf_ptr + p[:, None] * s_bm + cols[None, :] * s_bn,
                        mask=(live & (s != 0))[:, None] & cmask[None, :], other=0.0).to(tl.float32) * s[:, None]
        else:
            v = tl.load(buf_ptr + p[:, None] * s_bm + cols[None, :] * s_bn, mask=live[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
        acc += v
    tl.store(out_ptr + rows[:, None] * s_om + cols[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def pair_key_kernel(expert_ptr, key_ptr, n_rows, n_per_group, BLOCK: tl.constexpr):
    """key[r] = group * C + the triangle index of row r's two experts (lower, higher) within their routing group,
    for rows of exactly two pairs (2r, 2r+1) of one group (C = n (n - 1) / 2 expert pairs per group of n)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = r < n_rows
    e0 = tl.load(expert_ptr + 2 * r, mask=mask, other=0)
    e1 = tl.load(expert_ptr + 2 * r + 1, mask=mask, other=1)
    lo = tl.minimum(e0, e1)
    hi = tl.maximum(e0, e1)
    group = lo // n_per_group
    l = lo - group * n_per_group
    h = hi - group * n_per_group
    key = group * (n_per_group * (n_per_group - 1) // 2) + l * n_per_group - l * (l + 1) // 2 + (h - l - 1)
    tl.store(key_ptr + r, key.to(key_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pair_gmm_kernel(a_ptr, w_ptr, c_ptr, rows_ptr, tile_key_ptr, tile_start_ptr, offsets_ptr, expert_ptr, gate_ptr,
                    w_desc, N, K, n_keys, n_per_prog, s_am, s_ak, s_we, s_wk, s_wn, s_cm, s_cn,
                    FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[r] = g_lo * (A[r] @ W[lo]) + g_hi * (A[r] @ W[hi]) for one tile of rows sharing their expert pair
    (lo, hi) and n_per_prog columns: both pairs of a row (2r, 2r+1) summed in registers, so C holds one row per
    pair of pairs instead of one per pair. A's row (K <= BLOCK_K) stays resident across the column slices; W's
    tiles come by descriptor where w_desc is given (_load_w)."""
    chunk, _, valid, start, pos, rmask, row = _program_tile(tile_key_ptr, tile_start_ptr, offsets_ptr, rows_ptr,
                                                            N, n_keys, n_per_prog, BLOCK_M)
    first = tl.load(rows_ptr + start, mask=valid, other=0)     # every row of the tile has the same two experts
    e_first = tl.load(expert_ptr + 2 * first).to(tl.int64)
    e_second = tl.load(expert_ptr + 2 * first + 1).to(tl.int64)
    e_lo = tl.minimum(e_first, e_second)
    e_hi = tl.maximum(e_first, e_second)
    lo_first = tl.load(expert_ptr + 2 * row, mask=rmask, other=0) == e_lo     # which of the row's pairs is lo's
    g_lo = tl.load(gate_ptr + 2 * row + tl.where(lo_first, 0, 1), mask=rmask, other=0.0).to(tl.float32)
    g_hi = tl.load(gate_ptr + 2 * row + tl.where(lo_first, 1, 0), mask=rmask, other=0.0).to(tl.float32)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    a = tl.load(a_ptr + row[:, None] * s_am + ks[None, :] * s_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
    n_lo = chunk * n_per_prog
    n_hi = tl.where(valid, tl.minimum(n_lo + n_per_prog, N), n_lo)    # an unused tile runs no slice
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        nmask = cols < N
        # descriptor offsets are 32-bit
        w_lo = _load_w(w_desc, w_ptr + e_lo * s_we, e_lo.to(tl.int32), 0, n0, ks, cols, kmask, nmask, s_wk, s_wn,
                       N, K, False)
        w_hi = _load_w(w_desc, w_ptr + e_hi * s_we, e_hi.to(tl.int32), 0, n0, ks, cols, kmask, nmask, s_wk, s_wn,
                       N, K, False)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = (_dot(a, w_lo, zero, FP32_DOT, PRECISION) * g_lo[:, None]
               + _dot(a, w_hi, zero, FP32_DOT, PRECISION) * g_hi[:, None])
        tl.store(c_ptr + row[:, None] * s_cm + cols[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])
