"""Dropless grouped expert matmul over routed pairs, as torch.library custom ops (moeut::grouped_matmul and its
backward; fake impls and registered autograd, so torch.compile traces through them without graph breaks).

For pair p (sorted position j, expert e):  y_p = act(x_in(p) @ W[e]).
- Input rows: x[p // in_group] gathered inside the kernel's loads, or x in expert-sorted pair layout (in_group None).
- Output: expert-sorted pair layout [P, d_out] (out_group None), or out[r] = sum_j gate[r*og+j] * y[r*og+j]: the
  kernel writes y by pair id and a second, deterministic kernel sums each row's og contiguous pairs (fp32). The
  gate is optional: without it the sums are plain. (A gate on sorted ReLU rows is the σ-MoE MLP's: mlp.py.) With
  two pairs per gathered row and a wide output (SwitchHead's O forward), both pairs of a row are summed in
  registers instead (expert-pair tiles, pair_tiles.py), and the second kernel sums one row per two pairs.
- Explicit rows (expert parallelism, where a received row has a variable number of pairs): in_index [P] gives the
  input row of each pair (read in the kernel's loads instead of p // in_group), out_offsets [R+1] gives CSR
  segments of contiguous pair ids summed into each output row (instead of fixed groups of out_group).
- Rows of any width: the public functions zero-pad every feature dimension to a multiple of 16 elements
  (aligned_operands) and slice the output back, because Triton vectorises loads and stores only along rows whose
  stride it knows to be a multiple of 16. MoEUT-44M's d = 412 otherwise ran its FF layer at 16.5 instead of 4.1 ms
  on an H200, and its d_h = 82 padded only to 88 its attention O input-gradient at 2.46 instead of 0.28 ms
  (docs/KERNELS.md, "Rows of any width").
- Remote pairs (expert parallelism by all-gather, where every rank sees every token's pairs but holds only some
  experts): local [P] bool marks the pairs this rank computes. The plan sorts the others past offsets[-1] (no tile
  covers them), so their rows are never written: sums skip them (zero scale) and their gate gradient is zero.
Backward: the input gradient reuses the forward kernel on W^T (gathering grad rows, gate in the epilogue, the
gate's gradient as <x_p, g_row W^T> per output slice, again without atomics, or, for outputs narrower than their
input, as <g_row, y_p> from the per-pair products the forward kept (keeps_pairs); with in_index the per-pair
input gradients are summed per input row through a stable sort of in_index, in a fixed order); the weight
gradient is one program per (expert, tile of W) looping over the expert's rows in a fixed order: bitwise
repeatable.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton

try:        # Triton >= 3.4; older ones (3.3 ships with torch 2.7) keep pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from moeut_kernels import _triton as K
from moeut_kernels.pair_tiles import pair_matmul, pair_plan
from moeut_kernels.routing import RoutingPlan, slices_per_program, window_tiles

try:        # Triton's Gluon dialect; without it every call stays on gmm_kernel
    from moeut_kernels import _gluon as GL
except ImportError:
    GL = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TileConfig:
    """Block shape and pipelining of one kernel launch (chosen by shape class, never re-tuned per batch).
    a_resident (grouped matmul, K <= block_k): each program keeps its A tile and loops over n_loop output slices.
    tma (sm_90+): TMA descriptor loads. Grouped matmul: the W tiles, and with a_resident and K == block_k the A tile
    and its mask where A is sorted. Weight gradient: its sorted operand. Operands a descriptor cannot address fall
    back to pointer loads.
    gluon (Hopper, with a_resident and tma): the calls among these with A sorted or gathered by group, no fused
    gate gradient or output mask, and a per-pair scale only with gathered A (the FF down forward and up
    input-gradient, a ReLU projection's input gradient with its mask and side output, the attention O forward and
    V input-gradient) run the Gluon kernel (moeut_kernels/_gluon.py), num_stages being its W ring's depth.
    maxnreg: a cap on registers per thread, so that more programs share an SM (the weight gradient's default on
    Hopper; benchmarks may set it for the others)."""
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    a_resident: bool = False
    n_loop: int = 1
    tma: bool = False
    gluon: bool = False
    maxnreg: Optional[int] = None

    def columns_per_program(self) -> int:
        return self.block_n * (self.n_loop if self.a_resident else 1)


# Benchmarks and tests may override these (keys: "gmm", "wgrad", "wgrad_block_r", "wgrad_splits", "sum",
# "gluon": False for the configs chosen as without the Gluon kernel, "window_order": True / False for every
# launch with gathered A instead of _window_order's choice, "window_experts": the atomic sums' window order in
# groups of that many experts, or None for all at once, instead of _window_experts' choice).
OVERRIDES: dict[str, dict] = {}


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(v, 1))))


@functools.cache
def _has_tma(device: Optional[torch.device]) -> bool:
    """Whether the GPU has the Tensor Memory Accelerator (sm_90+) and this Triton has host descriptors (False for
    no device: the configs of a GPU without TMA)."""
    return (TensorDescriptor is not None and device is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _is_hopper(device: Optional[torch.device]) -> bool:
    """sm_90 (H100, H200): wgmma, whose accumulators the configs measured there are sized for."""
    return device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _has_wgmma(device: Optional[torch.device]) -> bool:
    """Whether the Gluon kernel runs here: a Hopper GPU (its wgmma is sm_90 only), a Triton with Gluon, and not
    turned off (MOEUT_GLUON=0 in the environment: Gluon is an experimental Triton API, so this is the way out if a
    Triton release breaks it; OVERRIDES["gluon"] = False for benchmarks' A/B runs)."""
    enabled = OVERRIDES.get("gluon", os.environ.get("MOEUT_GLUON", "1") != "0")
    return enabled and GL is not None and _is_hopper(device)


def _window_order(device: torch.device, a_group: int, w: torch.Tensor, ndim: int, cfg: TileConfig) -> bool:
    """Whether a grouped-matmul launch runs its tiles in window order (routing.window_tiles): where its A rows are
    gathered by fixed groups, its output is one column block wide, and all experts' weights fit in half of L2.
    In expert order consecutive tiles share their expert's weights through L2 and read their gathered rows from
    DRAM; in window order the reverse, which pays only where the weights stay in L2 anyway. H200 (60 MiB of L2):
    the attention O input-gradient 0.51 -> 0.43 ms at 244M (10 MiB of weights), 0.98-1.09 -> 0.87 at 1B (27 MiB);
    tied at 54 MiB; slower from 90 MiB, as are the FF calls (97 MiB) (docs/KERNELS.md)."""
    if a_group <= 0:
        return False
    if "window_order" in OVERRIDES:
        return OVERRIDES["window_order"]
    if device.type != "cuda" or ndim > cfg.block_n:
        return False
    return _l2_halves(device, w) <= 1


def _l2_halves(device: torch.device, w: torch.Tensor) -> int:
    """How many halves of the GPU's L2 the weights w fill, rounded up: the unit of both window-order rules."""
    return triton.cdiv(w.numel() * w.element_size(), _l2_bytes(device) // 2)


def _window_experts(device: torch.device, w: torch.Tensor) -> Optional[int]:
    """Experts per group of the atomic sums' window order (routing.window_tiles' group_experts; None: all experts
    at once). Weights over half of L2 but within twice L2 run in the fewest groups whose weights fit half of L2:
    each group's weights then stay in L2 while every token's sum is read and written once per group. H200, bf16
    atomics per call (PERFORMANCE.md, thirty-second session): FF 244M (97 MiB of weights) 1.19 -> 1.05 ms in 4
    groups; FF 1B (212 MiB) no better in 2-6 groups (2.54-2.62 ms against 2.58) and slower in the 8 that half of
    L2 per group would give (2.79), so beyond twice L2: all experts. Both sizes then add at ~2 TB/s of bf16
    payload, the rate this kernel's atomics reach (KERNELS.md, "What bounds the sums now")."""
    if "window_experts" in OVERRIDES:
        return OVERRIDES["window_experts"]
    if device.type != "cuda":
        return None
    groups = _l2_halves(device, w)
    return triton.cdiv(w.shape[0], groups) if 1 < groups <= 4 else None


@functools.cache
def _shared_memory(device: Optional[torch.device]) -> int:
    """Shared memory one program may use on this GPU, asked once per device (Hopper's 227 KB when there is no CUDA
    device: the configs a benchmark or test reads without one)."""
    if device is None or device.type != "cuda":
        return 232448
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def _fit_shared_memory(cfg: TileConfig, block_m: int, itemsize: int, masked: bool,
                       device: Optional[torch.device]) -> TileConfig:
    """cfg with fewer pipeline stages where its buffers would not fit the GPU's shared memory: a resident A tile
    and three W stages take 128 KB in bf16, which an A100 has and an L40S or RTX 4090 (99 KB) has not. A resident
    A tile loaded by TMA with its ReLU mask holds the mask tile too."""
    tile = block_m * cfg.block_k * itemsize
    fixed = tile * (2 if masked and cfg.tma else 1) if cfg.a_resident else 0
    per_stage = cfg.block_k * cfg.block_n * itemsize + (0 if cfg.a_resident else tile)
    stages = cfg.num_stages
    while stages > 1 and fixed + stages * per_stage > _shared_memory(device):
        stages -= 1
    return replace(cfg, num_stages=stages)


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size (asked once per device: _window_order runs on every launch)."""
    return torch.cuda.get_device_properties(device).L2_cache_size


def _pair_tiles(in_group: int, out_group: int, weight: torch.Tensor, experts: Optional[torch.Tensor],
                gate: Optional[torch.Tensor], relu: bool, explicit: bool) -> bool:
    """Whether a forward launch runs as expert-pair tiles (moeut_kernels.pair_tiles): two pairs per gathered row
    (SwitchHead's K_A = 2), their gated products summed in fixed groups of pairs, an output row wider than the
    gathered one (d_in <= 128: one resident A tile), the pairs' experts given, no ReLU, explicit rows or remote
    pairs: the attention O forward. H200, 1B shape (KERNELS.md): matmul + sum 0.94 + 0.61 -> 0.89 + 0.34 ms per
    call, compiled 1B step -9.8 kernel-ms before the pair kernel's tuning. In fp32 only on GPUs with 160 KB of
    shared memory per program or more: there the pair kernel takes 128-144 KB (compile test), more than an L40S
    or RTX 5090 has. OVERRIDES["pair_tiles"] = False keeps the per-pair launch."""
    d_in, d_out = weight.shape[1], weight.shape[2]
    return (OVERRIDES.get("pair_tiles", True) and experts is not None and gate is not None and not relu
            and not explicit and in_group == 2 and out_group % 2 == 0 and weight.shape[0] % (out_group // 2) == 0
            and d_in < d_out and d_in <= 128
            and (weight.element_size() < 4 or _shared_memory(weight.device) >= 160 * 1024))


def gmm_config(n: int, k: int, dtype: torch.dtype, block_m: int, gate_grad: bool = False, masked: bool = False,
               device: Optional[torch.device] = None) -> TileConfig:
    """Heuristic (H200 sweeps, docs/KERNELS.md). Short K without the fused gate gradient (the K = d_e calls that
    write wide [P, d] outputs): the A tile stays resident while the program walks up to 8 output slices of 128,
    balanced over the columns; in bf16 on sm_90+ with TMA loads at 4 warps and 2 stages, or 3 stages with the
    ReLU mask (masked), whose tile leaves room for only one program per SM either way; on Hopper, the Gluon
    kernel where the call allows (TileConfig.gluon; 2 stages, two programs per SM). Otherwise one 128-wide slice
    per program, 64-deep K steps (32 for fp32 to fit shared memory), 3 stages; in bf16 on sm_90+ W comes by TMA.
    Fewer stages where the GPU's shared memory is smaller (_fit_shared_memory). The interpreter uses tiny blocks so
    tests cross every boundary."""
    big = dtype != torch.float32
    if INTERPRET:
        if triton.next_power_of_2(k) <= 32 and not gate_grad:
            cfg = TileConfig(16, _pow2_clamp(k, 16, 32), 4, 1, a_resident=True, n_loop=2)
        else:
            cfg = TileConfig(_pow2_clamp(n, 16, 64), _pow2_clamp(k, 16, 64), 4, 1)
    elif triton.next_power_of_2(k) <= (128 if big else 64) and not gate_grad:
        block_n = 128 if big else 64
        cfg = TileConfig(block_n, _pow2_clamp(k, 16, 128), 8, 3 if big else 2, a_resident=True,
                         n_loop=slices_per_program(n, block_n))
        if big and _has_tma(device):
            gluon = _has_wgmma(device)
            cfg = replace(cfg, tma=True, num_warps=4, num_stages=3 if masked and not gluon else 2, gluon=gluon)
    else:
        # 8 warps for short K (K = d_e), 4 for long K (K = d)
        warps = 8 if block_m * min(n, 128) >= 16384 and k < 512 else 4
        cfg = TileConfig(_pow2_clamp(n, 16, 128), 64 if big else 32, warps, 3 if big else 2)
        if big and _has_tma(device):    # W by descriptor (H200 sweep: 1-9% faster than pointer loads)
            cfg = replace(cfg, tma=True)
    if not INTERPRET:
        cfg = _fit_shared_memory(cfg, block_m, dtype.itemsize, masked, device)
    return replace(cfg, **OVERRIDES.get("gmm", {}))


def wgrad_config(k: int, n: int, dtype: torch.dtype, device: Optional[torch.device] = None) -> TileConfig:
    """block_n x block_k tiles of W[e]; the row step is _wgrad_block_r. In bf16 on sm_90+ the sorted operand comes
    by TMA; on Hopper at 4 warps capped at 168 registers: three programs per SM (3 x 66 KB of shared memory, 3 x 4 x
    32 x 168 registers of 64K) instead of two 8-warp ones, -3 to -13% per call on an H200 (docs/KERNELS.md, "Three
    weight-gradient programs per SM"); at 8 warps on later GPUs, where the cap spills (sm_120: 532-732 bytes)."""
    if INTERPRET:
        cfg = TileConfig(_pow2_clamp(n, 16, 64), _pow2_clamp(k, 16, 64), 4, 1)
    else:
        big = dtype != torch.float32
        # H200 sweep: with pointer loads 4 warps beat 8 by ~1.45x on both FF weight gradients (docs/KERNELS.md)
        cfg = TileConfig(_pow2_clamp(n, 16, 128), _pow2_clamp(k, 16, 128), 4, 3 if big else 2)
        if big and _has_tma(device):
            cfg = replace(cfg, tma=True, **(dict(maxnreg=168) if _is_hopper(device) else dict(num_warps=8)))
    return replace(cfg, **OVERRIDES.get("wgrad", {}))


def _wgrad_block_r(dtype: torch.dtype) -> int:
    if INTERPRET:
        return 32
    return OVERRIDES.get("wgrad_block_r", 64 if dtype != torch.float32 else 32)


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul setting (ieee unless TF32 is allowed); bf16/fp16 take Triton's default."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


_THREAD = threading.local()


def _bind_cuda_context(device: torch.device) -> None:
    """Make the device's primary CUDA context current in this thread (once per thread and device). Triton encodes
    host TMA descriptors at launch before it binds a context itself, so the first TMA launch in a thread without a
    current context fails with "invalid device context": autograd's backward thread, when one of our backward ops
    is its first CUDA work (pytorch/pytorch#124565; seen on the H200, docs/KERNELS.md)."""
    bound = _THREAD.__dict__.setdefault("devices", set())
    if device.type != "cuda" or device.index in bound:
        return
    cuda, ctx = ctypes.CDLL("libcuda.so.1"), ctypes.c_void_p()
    _driver(cuda.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        dev = ctypes.c_int()
        _driver(cuda.cuDeviceGet(ctypes.byref(dev), device.index), "cuDeviceGet")
        _driver(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        _driver(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    bound.add(device.index)


def _driver(result: int, call: str) -> None:
    if result:
        raise RuntimeError(f"CUDA driver call {call} failed with CUresult {result}")


def _descriptor(t: torch.Tensor, rows: int, block: list[int], make: Optional[Callable] = None) -> Optional[object]:
    """A TMA descriptor of t viewed as [rows, t.numel() // rows] (a view, never a copy), or None where TMA cannot
    address it (not viewable that way, base or row stride not 16-byte aligned) or this Triton has no descriptors.
    make(view, block) builds it (a Gluon one); Triton's TensorDescriptor by default."""
    if TensorDescriptor is None or not t.is_contiguous() or t.numel() == 0 or t.data_ptr() % 16:
        return None
    cols = t.numel() // rows
    if (cols * t.element_size()) % 16:
        return None
    _bind_cuda_context(t.device)
    return (make or TensorDescriptor.from_tensor)(t.view(rows, cols), block)


def _gmm(a: torch.Tensor, a_group: int, w: torch.Tensor, transpose_w: bool, plan: RoutingPlan, out: torch.Tensor,
         out_by_pair: bool, *, relu_out: bool = False, amask: Optional[torch.Tensor] = None,
         scale: Optional[torch.Tensor] = None, dsrc: Optional[torch.Tensor] = None, d_group: int = 0,
         gpart: Optional[torch.Tensor] = None, cfg: Optional[TileConfig] = None,
         a_index: Optional[torch.Tensor] = None, d_index: Optional[torch.Tensor] = None,
         side_out: Optional[torch.Tensor] = None, out_mask: Optional[torch.Tensor] = None,
         scale_grad: Optional[torch.Tensor] = None, sum_group: int = 0) -> None:
    """Launch gmm_kernel, or the Gluon kernel where cfg.gluon and the call allow (same outputs): out[rows] =
    epilogue(a[rows] @ (W[e] or W[e]^T)). sum_group > 0 (out_by_pair): out is [P // sum_group, N], zeroed, and each
    pair's row is added into row pair // sum_group by atomics, tiles in window order (atomic_sums). a_index / d_index
    (int64, by pair id) replace a_group / d_group when given. side_out [P, K] (resident-A configs) or [P, N] (with
    gpart and scale): also receives, at the sorted positions, A * mask * scale or D * scale, the weight gradient's
    gated operand.
    out_mask [P, N] (sorted pair layout; not with amask): out is zero where out_mask <= 0 (MASK_OUT). scale_grad
    [P] fp32 (with out_mask and scale) receives sum_n out * out_mask / scale^2 by pair id (SCALE_GRAD): with
    out_mask = scale * relu(.) a gated output and `a` its output gradient, the gradient of the gate."""
    n_experts = w.shape[0]
    if transpose_w:
        kdim, ndim, s_wk, s_wn = w.shape[2], w.shape[1], w.stride(2), w.stride(1)
    else:
        kdim, ndim, s_wk, s_wn = w.shape[1], w.shape[2], w.stride(1), w.stride(2)
    cfg = cfg or gmm_config(ndim, kdim, a.dtype, plan.block_m, gate_grad=gpart is not None, masked=amask is not None,
                            device=a.device)
    if cfg.a_resident and (kdim > cfg.block_k or gpart is not None):
        raise ValueError(f"a resident A tile needs K ({kdim}) <= block_k ({cfg.block_k}) and no gate gradient")
    if side_out is not None and not (cfg.a_resident or (gpart is not None and scale is not None)):
        raise ValueError("side_out needs a resident-A config or a fused gate gradient")
    if out_mask is not None and amask is not None:
        raise ValueError("a launch masks its A operand (amask) or its output (out_mask), not both")
    if scale_grad is not None and (out_mask is None or scale is None or gpart is not None):
        raise ValueError("scale_grad needs out_mask and scale, and no fused gate gradient (gpart)")
    cols = cfg.columns_per_program()
    chunks = triton.cdiv(ndim, cols)
    if scale_grad is not None:      # the kernel writes one partial sum per column chunk
        gpart = scale_grad.view(-1, 1) if chunks == 1 else scale_grad.new_empty(scale_grad.shape[0], chunks)
    if sum_group:
        plan = window_tiles(plan, _window_experts(a.device, w))
    elif a_index is None and _window_order(a.device, a_group, w, ndim, cfg):
        plan = window_tiles(plan)
    n_tiles = plan.tile_expert.numel()
    if n_tiles == 0:
        return
    dummy = plan.order
    amask_t = amask if amask is not None else out_mask if out_mask is not None else a
    dsrc_t = dsrc if dsrc is not None else a
    scale_t = scale if scale is not None else dummy
    gpart_t = gpart if gpart is not None else dummy
    side_t = side_out if side_out is not None else a
    w_rows = n_experts * (ndim if transpose_w else kdim)      # W as [E*K, N], or [E*N, K] transposed, for TMA
    w_block = [cfg.block_n, cfg.block_k] if transpose_w else [cfg.block_k, cfg.block_n]
    a_block = [plan.block_m, cfg.block_k]                      # a resident A tile (and its mask) for TMA
    if a_index is not None:
        a_group = -1
    if d_index is not None:
        d_group = -1
    grid = (n_tiles * chunks,)
    if (cfg.gluon and GL is not None and a_group >= 0 and kdim == cfg.block_k and gpart is None
            and out_mask is None and (a_group == 0 or amask is None)
            and (scale is None or a_group > 0)
            and all(t is None or t.stride(1) == 1 for t in (a, out, amask, side_out))):
        a_g = _descriptor(a, a.shape[0], a_block, GL.descriptor) if a_group == 0 else None
        w_g = _descriptor(w, w_rows, w_block, GL.descriptor)
        if (a_g is not None or a_group > 0) and w_g is not None:
            GL.resident_gmm_kernel[grid](
                a_g, a, w_g, out, plan.order, plan.tile_expert, plan.tile_start, plan.offsets, amask_t, scale_t,
                side_t, ndim, kdim, n_experts, cols, a.stride(0), out.stride(0), amask_t.stride(0),
                side_out.stride(0) if side_out is not None else 0,
                A_GROUP=a_group, OUT_BY_PAIR=out_by_pair, RELU_OUT=relu_out, TRANS_W=transpose_w,
                MASK_A=amask is not None, HAS_SCALE=scale is not None, STORE_SIDE=side_out is not None,
                SUM_GROUP=sum_group, BLOCK_M=plan.block_m, BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages,
                num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)
            return
    a_desc = m_desc = w_desc = None
    if cfg.tma:
        w_desc = _descriptor(w, w_rows, w_block)
        if cfg.a_resident and kdim == cfg.block_k and a_group == 0:      # sorted A (a_index set a_group -1)
            a_desc = _descriptor(a, a.shape[0], a_block)
            m_desc = _descriptor(amask, amask.shape[0], a_block) if amask is not None else None
            if amask is not None and m_desc is None:
                a_desc = None
    K.gmm_kernel[grid](
        a, w, out, plan.order, plan.tile_expert, plan.tile_start, plan.offsets,
        scale_t, amask_t, dsrc_t, gpart_t,
        a_index if a_index is not None else dummy, d_index if d_index is not None else dummy,
        side_t, a_desc, m_desc, w_desc,
        ndim, kdim, n_experts, cols,
        a.stride(0), a.stride(1), w.stride(0), s_wk, s_wn, out.stride(0), out.stride(1),
        amask_t.stride(0), amask_t.stride(1), dsrc_t.stride(0), dsrc_t.stride(1),
        gpart.stride(0) if gpart is not None else 0,
        side_out.stride(0) if side_out is not None else 0, side_out.stride(1) if side_out is not None else 0,
        A_GROUP=a_group, D_GROUP=d_group, OUT_BY_PAIR=out_by_pair, RELU_OUT=relu_out, MASK_A=amask is not None,
        MASK_OUT=out_mask is not None, HAS_SCALE=scale is not None,
        GATE_GRAD=gpart is not None and scale_grad is None, SCALE_GRAD=scale_grad is not None,
        A_RESIDENT=cfg.a_resident,
        STORE_SIDE=side_out is not None, TRANS_W=transpose_w, SUM_GROUP=sum_group, FP32_DOT=INTERPRET,
        PRECISION=_precision(a.dtype),
        BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
    if scale_grad is not None and chunks > 1:
        torch.sum(gpart, 1, out=scale_grad)


def _wgrad_splits(n_programs: int, device: torch.device) -> int:
    """Row chunks per expert for the weight gradient: enough programs for ~8 per SM (the attention shape has only
    40 experts x 8 tiles of W for 132 SMs; the FF shapes have thousands and keep one chunk)."""
    if "wgrad_splits" in OVERRIDES:
        return OVERRIDES["wgrad_splits"]
    if INTERPRET:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, triton.cdiv(8 * sms, max(n_programs, 1))))


def _wgrad(a: torch.Tensor, a_group: int, b: torch.Tensor, b_group: int, plan: RoutingPlan, grad_w: torch.Tensor, *,
           scale: Optional[torch.Tensor] = None, a_index: Optional[torch.Tensor] = None,
           b_index: Optional[torch.Tensor] = None, remote: bool = False) -> None:
    """Launch wgrad_kernel: grad_w[e] = A_e^T B_e over expert e's pairs (deterministic, no atomics: with several
    row chunks per expert, fp32 partial sums are added in chunk order). The busiest experts' programs go first
    (their row loops are the longest). a_index / b_index (int64, by pair id) replace a_group / b_group when given.
    remote: the plan has remote pairs. Then no operand comes by TMA: a descriptor load of the last local expert's
    rows reads past them into the remote rows, which were never written (NaN times the other operand's masked zero
    is NaN)."""
    n_experts, kdim, ndim = grad_w.shape
    a_group = -1 if a_index is not None else a_group
    b_group = -1 if b_index is not None else b_group
    cfg = wgrad_config(kdim, ndim, a.dtype, a.device)
    tiles = n_experts * triton.cdiv(kdim, cfg.block_k) * triton.cdiv(ndim, cfg.block_n)
    splits = _wgrad_splits(tiles, a.device)
    out = grad_w.unsqueeze(0) if splits == 1 else torch.empty(splits, n_experts, kdim, ndim, dtype=torch.float32,
                                                              device=a.device)
    by_load = torch.argsort(plan.offsets[1:] - plan.offsets[:-1], descending=True)    # busiest experts first
    block_r = _wgrad_block_r(a.dtype)
    a_desc = b_desc = None
    tma = cfg.tma and not remote
    if tma and a_group == 0 and b_group != 0:        # one sorted operand by TMA, the other gathered (masked)
        a_desc = _descriptor(a, a.shape[0], [block_r, cfg.block_k])
    elif tma and b_group == 0 and a_group != 0:
        b_desc = _descriptor(b, b.shape[0], [block_r, cfg.block_n])
    K.wgrad_kernel[(splits * tiles,)](
        a, b, out, plan.order, plan.offsets, by_load, scale if scale is not None else plan.order,
        a_index if a_index is not None else plan.order, b_index if b_index is not None else plan.order,
        a_desc, b_desc, kdim, ndim, n_experts, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        *out.stride(),
        A_GROUP=a_group, B_GROUP=b_group, HAS_SCALE=scale is not None, SPLITS=splits,
        FP32_DOT=INTERPRET, PRECISION=_precision(a.dtype),
        BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, BLOCK_R=block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
    if splits > 1:
        grad_w.copy_(out.sum(0))


def _sum_blocks(d: int) -> tuple[int, int]:
    """(rows, columns) per program of the fixed-order sum kernels."""
    if INTERPRET:
        return 64, _pow2_clamp(d, 16, 128)
    o = OVERRIDES.get("sum", {})
    return o.get("block_r", 16), o.get("block_n", _pow2_clamp(d, 16, 256))


def group_sum(buf: torch.Tensor, group: int, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[R*group, d] (by pair id) -> [R, d]: out[r] = sum_j scale[r*group+j] * buf[r*group+j], fp32 accumulation."""
    n_out, d = buf.shape[0] // group, buf.shape[1]
    out = torch.empty(n_out, d, dtype=buf.dtype, device=buf.device)
    if n_out == 0:
        return out
    block_r, block_n = _sum_blocks(d)
    grid = (triton.cdiv(n_out, block_r), triton.cdiv(d, block_n))
    K.group_sum_kernel[grid](buf, out, scale if scale is not None else buf, n_out, d,
                             buf.stride(0), buf.stride(1), out.stride(0), out.stride(1),
                             GROUP=group, HAS_SCALE=scale is not None, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4)
    return out


COMBINES = ("buffer", "atomic")     # how a summed MLP launch adds each row's pairs: gated_mlp's combine


def atomic_sums(a: torch.Tensor, w: torch.Tensor, transpose_w: bool, plan: RoutingPlan, group: int) -> torch.Tensor:
    """[P // group, N] in a's dtype: each group of `group` consecutive pair ids summed, with a in sorted pair layout
    and every pair's row a[pos] @ W[e] (W[e]^T) added into its sum by atomics in a's dtype where the matmul makes it,
    tiles in window order (in groups of experts: _window_experts). The opt-in alternative to the [P, N] buffer by
    pair id + group_sum (bitwise repeatable); this one is not: the order of the adds changes from run to run, and
    bf16 sums round at each of the `group` adds (docs/KERNELS.md, "The atomic combine")."""
    n = w.shape[1] if transpose_w else w.shape[2]
    sums = torch.zeros(plan.n_pairs // group, n, device=a.device, dtype=a.dtype)
    _gmm(a, 0, w, transpose_w, plan, sums, True, sum_group=group)
    return sums


def segment_sum(buf: torch.Tensor, seg_offsets: torch.Tensor, scale: Optional[torch.Tensor] = None,
                perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[P, d] -> [R, d] with R = len(seg_offsets) - 1: out[r] = sum over j in [seg[r], seg[r+1]) of
    scale[p] * buf[p], p = perm[j] (or j), in increasing j with fp32 accumulation. Empty segments give zeros."""
    n_out, d = seg_offsets.numel() - 1, buf.shape[1]
    out = torch.empty(n_out, d, dtype=buf.dtype, device=buf.device)
    if n_out == 0 or d == 0:
        return out
    block_r, block_n = _sum_blocks(d)
    grid = (triton.cdiv(n_out, block_r), triton.cdiv(d, block_n))
    seg = seg_offsets.to(torch.int64).contiguous()
    K.segment_sum_kernel[grid](buf, out, scale if scale is not None else buf, seg, perm if perm is not None else seg,
                               n_out, d, buf.stride(0), buf.stride(1), out.stride(0), out.stride(1),
                               HAS_SCALE=scale is not None, HAS_PERM=perm is not None, BLOCK_R=block_r,
                               BLOCK_N=block_n, num_warps=4)
    return out


def pair_dot(a: torch.Tensor, a_group: int, pairs: torch.Tensor, a_index: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
    """[P] fp32: <a[row(p)], pairs[p]> with row(p) = p // a_group, or a_index[p] when given (int64)."""
    n_pairs, d = pairs.shape
    out = torch.empty(n_pairs, dtype=torch.float32, device=pairs.device)
    if n_pairs == 0:
        return out
    block_r, block_n = 64, _pow2_clamp(d, 16, 64 if INTERPRET else 128)
    K.pair_dot_kernel[(triton.cdiv(n_pairs, block_r),)](
        a, pairs, out, a_index if a_index is not None else pairs, n_pairs, d, a.stride(0), a.stride(1),
        pairs.stride(0), pairs.stride(1), A_GROUP=-1 if a_index is not None else a_group, BLOCK_R=block_r,
        BLOCK_N=block_n, num_warps=4)
    return out


def keeps_pairs(d_in: int, d_out: int) -> bool:
    """Whether a summed output keeps its pre-gate per-pair products [P, d_out] for backward. For outputs narrower
    than their input (attention V: d_h from d) that is cheap, and the gate's gradient becomes one pass over them
    (pair_dot) instead of <x_p, grad W^T> fused over d_in columns into the input-gradient launch, which then takes
    the resident-A path (K = d_out short). Wider outputs (FF down, attention O) fuse: keeping [P, d] per
    application would cost more memory than the fused dot costs time."""
    return d_out < d_in


def _summed(out_group: int, out_offsets: Optional[torch.Tensor]) -> bool:
    """Whether the op's output rows are gate-weighted sums of pairs (out_group 0 means None)."""
    return bool(out_group) or out_offsets is not None


def _kept(weight: torch.Tensor, out_group: int, out_offsets: Optional[torch.Tensor]) -> bool:
    """Whether the forward op returns (and autograd saves) the per-pair products: summed and keeps_pairs."""
    return _summed(out_group, out_offsets) and keeps_pairs(weight.shape[1], weight.shape[2])


def segment_ids(seg_offsets: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """[P] int64: the segment (output row) of each pair id, from CSR offsets; empty segments are skipped. No sync."""
    pairs = torch.arange(n_pairs, device=seg_offsets.device, dtype=torch.int64)
    return torch.searchsorted(seg_offsets[1:].to(torch.int64).contiguous(), pairs, right=True)


def pair_sums(buf: torch.Tensor, out_group: int, out_offsets: Optional[torch.Tensor], gate: Optional[torch.Tensor],
              local: Optional[torch.Tensor]) -> torch.Tensor:
    """A summed output from its per-pair rows [P, d] (by pair id): fixed groups of out_group pairs, or out_offsets'
    segments, gate-weighted when a gate is given. Remote pairs' rows were never written: a zero scale skips them."""
    scale = gate
    if local is not None:
        scale = torch.where(local, gate, 0) if gate is not None else local.to(buf.dtype)
    return segment_sum(buf, out_offsets, scale) if out_offsets is not None else group_sum(buf, out_group, scale)


def input_grad_sums(buf: torch.Tensor, in_group: int, in_index: Optional[torch.Tensor], n_rows: int,
                    local: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient of gathered input rows from the per-pair rows [P, d] (by pair id): each row sums its pairs
    (in_index, else fixed groups of in_group), skipping remote pairs, whose rows were never written."""
    lmask = local.to(buf.dtype) if local is not None else None
    return _rows_sum(buf, in_index, n_rows, lmask) if in_index is not None else group_sum(buf, in_group, lmask)


def _rows_sum(buf: torch.Tensor, in_index: torch.Tensor, n_rows: int, scale: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
    """[P, d] by pair id -> [n_rows, d]: row r sums its pairs (in_index[p] == r), times scale[p] if given, in
    increasing p. A stable sort of the index gives each row's pairs as one segment, so the sum is fixed-order
    (deterministic), without atomics."""
    perm = torch.argsort(in_index, stable=True)
    rows = torch.arange(n_rows + 1, device=in_index.device, dtype=torch.int64)
    seg = torch.searchsorted(in_index[perm].contiguous(), rows)
    return segment_sum(buf, seg, scale, perm=perm)


@torch.library.custom_op("moeut::grouped_matmul", mutates_args=())
def _gmm_op(x: torch.Tensor, weight: torch.Tensor, gate: Optional[torch.Tensor], order: torch.Tensor,
            offsets: torch.Tensor, tile_expert: torch.Tensor, tile_start: torch.Tensor, block_m: int, in_group: int,
            out_group: int, relu: bool, in_index: Optional[torch.Tensor] = None,
            out_offsets: Optional[torch.Tensor] = None, local: Optional[torch.Tensor] = None,
            experts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (output, pairs). Output: [P, d_out] in sorted pair layout (out_group 0, no out_offsets),
    [P // out_group, d_out] or [len(out_offsets) - 1, d_out] row sums. gate (by pair id, optional, summed outputs
    only) weights each pair's product in the sums. in_group / out_group 0 mean None (sorted pair layout);
    in_index / out_offsets (int64) take precedence over them. pairs: the pre-gate
    per-pair products by pair id where keeps_pairs says so (saved for the gate's gradient), else empty. local:
    [P] bool, the pairs computed here (None: all). experts: [P] int64, each pair's expert (for expert-pair tiles,
    _pair_tiles)."""
    plan = RoutingPlan(order, offsets, tile_expert, tile_start, weight.shape[0], block_m)
    n_pairs, d_out = order.numel(), weight.shape[2]
    gate = gate.contiguous() if gate is not None else None
    explicit = in_index is not None or out_offsets is not None or local is not None
    if _pair_tiles(in_group, out_group, weight, experts, gate, relu, explicit):
        buf = torch.empty(n_pairs // 2, d_out, dtype=x.dtype, device=x.device)       # one row per 2 pairs
        pair_matmul(x, weight, pair_plan(experts, out_group // 2, weight.shape[0], block_m), experts, gate, buf,
                    _precision(x.dtype), _descriptor if _has_tma(x.device) else None)
        return group_sum(buf, out_group // 2), buf.new_empty(0)
    if _summed(out_group, out_offsets):
        buf = torch.empty(n_pairs, d_out, dtype=x.dtype, device=x.device)
        _gmm(x, in_group, weight, False, plan, buf, True, relu_out=relu, a_index=in_index)
        out = pair_sums(buf, out_group, out_offsets, gate, local)
        return out, buf if _kept(weight, out_group, out_offsets) else buf.new_empty(0)
    out = torch.empty(n_pairs, d_out, dtype=x.dtype, device=x.device)
    _gmm(x, in_group, weight, False, plan, out, False, relu_out=relu, a_index=in_index)
    return out, out.new_empty(0)


@_gmm_op.register_fake
def _gmm_fake(x: torch.Tensor, weight: torch.Tensor, gate: Optional[torch.Tensor], order: torch.Tensor,
              offsets: torch.Tensor, tile_expert: torch.Tensor, tile_start: torch.Tensor, block_m: int, in_group: int,
              out_group: int, relu: bool, in_index: Optional[torch.Tensor] = None,
              out_offsets: Optional[torch.Tensor] = None, local: Optional[torch.Tensor] = None,
              experts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    n_pairs, d_out = order.shape[0], weight.shape[2]
    pairs = x.new_empty(n_pairs, d_out) if _kept(weight, out_group, out_offsets) else x.new_empty(0)
    if out_offsets is not None:
        return x.new_empty(out_offsets.shape[0] - 1, d_out), pairs
    return x.new_empty(n_pairs // out_group if out_group else n_pairs, d_out), pairs


GradOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("moeut::grouped_matmul_backward", mutates_args=())
def _gmm_bwd_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, gate: Optional[torch.Tensor],
                y: Optional[torch.Tensor], pairs: Optional[torch.Tensor], order: torch.Tensor, offsets: torch.Tensor,
                tile_expert: torch.Tensor, tile_start: torch.Tensor, block_m: int, in_group: int, out_group: int,
                need_x: bool, need_w: bool, need_g: bool, in_index: Optional[torch.Tensor] = None,
                out_offsets: Optional[torch.Tensor] = None, local: Optional[torch.Tensor] = None) -> GradOut:
    """(grad_x, grad_w, grad_gate); a gradient that is not needed comes back as an empty tensor. y: the saved
    output of a ReLU projection (its gradient mask), None otherwise. pairs: the forward's pre-gate per-pair
    products (keeps_pairs), None otherwise; with them the gate's gradient is one pair_dot pass instead of a partial
    sum fused into the input-gradient launch.
    The weight gradient reads grad_out * (y > 0): a resident-A input-gradient launch applies the mask as it loads
    its A tile and stores the product once (one read of the mask instead of one per weight-gradient program);
    otherwise one torch pass makes it first. Likewise the gate: the input-gradient launch stores the operand it
    scales (side_out) so that the weight gradient needs no scale. local: as in the forward; a remote pair's rows of
    every per-pair buffer are left unwritten, so the input-gradient sums skip them and its gate gradient is zero."""
    plan = RoutingPlan(order, offsets, tile_expert, tile_start, weight.shape[0], block_m)
    ig, og = in_group, out_group
    grad_out = grad_out.to(x.dtype)
    gate = gate.contiguous() if gate is not None else None
    n_pairs, d_in = plan.n_pairs, weight.shape[1]
    gathered_in = bool(ig) or in_index is not None      # x rows gathered (else x is in sorted pair layout)
    summed_out = _summed(og, out_offsets)
    out_index = segment_ids(out_offsets, n_pairs) if out_offsets is not None else None   # grad row of each pair
    need_g = need_g and gate is not None
    grad_x, grad_w, grad_gate = (x.new_empty(0) for _ in range(3))     # distinct: outputs may not alias
    fused_g = need_g and summed_out and pairs is None   # as partial sums <x_p, g_row W^T> in the input-gradient launch
    if need_g and summed_out and not fused_g:
        grad_gate = pair_dot(grad_out, og, pairs, a_index=out_index).to(gate.dtype)
    mask = y
    cfg = gmm_config(d_in, weight.shape[2], x.dtype, block_m, gate_grad=fused_g, masked=mask is not None,
                     device=x.device)                                          # of the input-gradient launch
    resident_dx = need_x and cfg.a_resident
    launch = need_x or fused_g
    # The weight gradient's gated operand in sorted pair layout, written by the input-gradient launch: the grad
    # rows times the ReLU mask or the gate (resident A), or gate * x (fused gate gradient). The weight gradient
    # then pairs it with the other operand gathered and unscaled (measured: the gate's scale of a gathered operand
    # in the weight gradient's row loop cost 0.17-0.32 ms per call at 244M, docs/PERFORMANCE.md).
    side_of_grad = launch and need_w and cfg.a_resident and (mask is not None or gate is not None)
    side_of_x = launch and need_w and fused_g
    side = None
    if side_of_grad or side_of_x:
        side = torch.empty(n_pairs, weight.shape[2] if side_of_grad else d_in, dtype=x.dtype, device=x.device)
    if mask is not None and not resident_dx:
        grad_out, mask = grad_out * (mask > 0), None
    if launch:
        gpart = None
        if fused_g:
            # one gate-gradient partial per program's column chunk
            gpart = torch.empty(n_pairs, triton.cdiv(d_in, cfg.columns_per_program()), dtype=torch.float32,
                                device=x.device)
        buf = torch.empty(n_pairs, d_in, dtype=x.dtype, device=x.device)
        _gmm(grad_out, og, weight, True, plan, buf, gathered_in, amask=mask, scale=gate,
             dsrc=x if fused_g else None, d_group=ig, gpart=gpart, cfg=cfg, a_index=out_index, d_index=in_index,
             side_out=side)
        if need_x:
            grad_x = input_grad_sums(buf, ig, in_index, x.shape[0], local) if gathered_in else buf
        if fused_g:
            grad_gate = gpart.sum(1).to(gate.dtype)
    if need_g and local is not None:
        grad_gate = torch.where(local, grad_gate, 0)
    if need_w:
        grad_w = torch.empty_like(weight)
        remote = local is not None
        if side_of_x:
            _wgrad(side, 0, grad_out, og, plan, grad_w, b_index=out_index, remote=remote)
        elif side_of_grad:
            _wgrad(x, ig, side, 0, plan, grad_w, a_index=in_index, remote=remote)
        else:
            _wgrad(x, ig, grad_out, og, plan, grad_w, scale=gate, a_index=in_index, b_index=out_index, remote=remote)
    return grad_x, grad_w, grad_gate


@_gmm_bwd_op.register_fake
def _gmm_bwd_fake(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, gate: Optional[torch.Tensor],
                  y: Optional[torch.Tensor], pairs: Optional[torch.Tensor], order: torch.Tensor,
                  offsets: torch.Tensor, tile_expert: torch.Tensor, tile_start: torch.Tensor, block_m: int,
                  in_group: int, out_group: int, need_x: bool, need_w: bool, need_g: bool,
                  in_index: Optional[torch.Tensor] = None, out_offsets: Optional[torch.Tensor] = None,
                  local: Optional[torch.Tensor] = None) -> GradOut:
    grad_x = x.new_empty(x.shape) if need_x else x.new_empty(0)
    grad_w = torch.empty_like(weight) if need_w else x.new_empty(0)
    grad_gate = gate.new_empty(order.shape[0]) if need_g and gate is not None else x.new_empty(0)
    return grad_x, grad_w, grad_gate


def _gmm_setup(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    (x, weight, gate, order, offsets, tile_expert, tile_start, block_m, in_group, out_group, relu, in_index,
     out_offsets, local, _experts) = inputs
    out, pairs = output
    ctx.mark_non_differentiable(pairs)
    ctx.set_materialize_grads(False)
    kept = pairs if _kept(weight, out_group, out_offsets) else None
    y = out if relu else None         # the ReLU mask
    ctx.save_for_backward(x, weight, gate, y, kept, order, offsets, tile_expert, tile_start, in_index, out_offsets,
                          local)
    ctx.ints = (block_m, in_group, out_group)


def _gmm_backward(ctx, grad_out: Optional[torch.Tensor], grad_pairs: None) -> tuple[Optional[torch.Tensor], ...]:
    x, weight, gate, y, pairs, order, offsets, tile_expert, tile_start, in_index, out_offsets, local = ctx.saved_tensors
    block_m, ig, og = ctx.ints
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_g = gate is not None and ctx.needs_input_grad[2]
    grad_x, grad_w, grad_gate = torch.ops.moeut.grouped_matmul_backward(
        grad_out, x, weight, gate, y, pairs, order, offsets, tile_expert, tile_start, block_m, ig, og, need_x, need_w,
        need_g, in_index, out_offsets, local)
    return (grad_x if need_x else None, grad_w if need_w else None, grad_gate if need_g else None,
            None, None, None, None, None, None, None, None, None, None, None, None)


_gmm_op.register_autograd(_gmm_backward, setup_context=_gmm_setup)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan, *, in_group: Optional[int],
                   out_group: Optional[int], gate: Optional[torch.Tensor] = None,
                   activation: Optional[str] = None, in_index: Optional[torch.Tensor] = None,
                   out_offsets: Optional[torch.Tensor] = None, local: Optional[torch.Tensor] = None,
                   experts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped expert matmul; see the module docstring. gate [N, S] (optional, differentiated; summed outputs
    only) weights each pair's product in the sums (out_group or out_offsets; without a gate the sums are plain).
    local [N, S] bool: the pairs computed here, with the plan's remote pairs (plan_from_expert_index) False; None
    when every pair is computed. experts [N, S] (the routing's expert_index, optional): lets a summed forward with
    two pairs per row (in_group 2) run as expert-pair tiles (_pair_tiles; the routing's layout: S pairs per token,
    in S / 2 groups of two, each group's experts in its own block of E / (S / 2) ids, as sigmoid_topk_route makes
    them for K = 2).

    in_index [P] (input row of each pair, any order; excludes in_group) and out_offsets [R+1] (CSR segments of
    contiguous pair ids, offsets[0] = 0, offsets[R] = P; excludes out_group) are integer tensors on x's device;
    nothing here reads their values on the host. x and weight must share a dtype (the caller resolves autocast).
    ReLU with a summed output is not supported: the fused gate gradient <x, g W^T> holds only for a linear output.
    A gate on sorted ReLU rows is the σ-MoE MLP's (mlp.gated_mlp).
    """
    if activation not in (None, "relu"):
        raise ValueError(f"unknown activation {activation!r}; supported: 'relu' or None")
    summed = out_group is not None or out_offsets is not None
    relu = activation == "relu"
    if relu and summed:
        raise NotImplementedError("activation with out_group is not supported by the Triton kernels")
    if gate is not None and not summed:
        raise ValueError("a gate needs a summed output (out_group or out_offsets); gated ReLU rows: gated_mlp")
    in_index, out_offsets, local, gate = pair_arguments(x, weight, plan, in_group, out_group, in_index,
                                                        out_offsets, local, gate)
    if experts is not None:
        if experts.numel() != plan.n_pairs:
            raise ValueError(f"experts has {experts.numel()} entries, expected one per pair ({plan.n_pairs})")
        experts = experts.reshape(-1).to(torch.int64).contiguous()
    d_out = weight.shape[2]
    x, weight = aligned_operands(x, weight)
    out, _ = torch.ops.moeut.grouped_matmul(x, weight, gate, plan.order, plan.offsets, plan.tile_expert,
                                            plan.tile_start, plan.block_m, in_group or 0, out_group or 0, relu,
                                            in_index, out_offsets, local, experts)
    return out if out.shape[1] == d_out else out[:, :d_out]


ROW_MULTIPLE = 16     # Triton specialises integer arguments (sizes, strides) divisible by 16, and only those


def aligned_width(n: int) -> int:
    """n rounded up to a multiple of ROW_MULTIPLE elements."""
    return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE


def aligned_operands(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x [N, d_0] and a chain of expert weights [E, d_i, d_i+1] with every d_i zero-padded to aligned_width (the
    same tensors when all are aligned). The zeros add nothing to any product, sum or gate gradient, and autograd
    drops the padded part of each gradient. Why: Triton vectorises a row's loads and stores only where it knows
    the row stride to be a multiple of 16 elements. With d = 412 (MoEUT-44M) every gathered and stored row fell
    back to 2-byte accesses, 4x slower per FF layer on an H200 than at d = 416; a 16-byte multiple is not enough
    (d_h = 88: the attention O input-gradient 2.46 ms, against 0.28 at d_h = 96). The cost is one copy of x and of
    each weight per call where padded (under torch.compile Inductor fuses it into their producers)."""
    dims = [x.shape[1], *(w.shape[2] for w in weights)]
    pad = [aligned_width(n) - n for n in dims]
    if not any(pad):
        return (x, *weights)
    return (F.pad(x, (0, pad[0])), *(F.pad(w, (0, pad[i + 1], 0, pad[i])) for i, w in enumerate(weights)))


def pair_arguments(x: torch.Tensor, weight: torch.Tensor, plan: RoutingPlan, in_group: Optional[int],
                   out_group: Optional[int], in_index: Optional[torch.Tensor], out_offsets: Optional[torch.Tensor],
                   local: Optional[torch.Tensor], gate: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """Checks the arguments that describe the pairs' rows (grouped_matmul's docstring) against x, weight (the
    first projection) and the plan, and returns in_index, out_offsets, local and gate in the ops' layouts: int64,
    bool and the gate by pair id, each contiguous."""
    if in_index is not None and in_group is not None:
        raise ValueError("give in_group or in_index, not both")
    if out_offsets is not None and out_group is not None:
        raise ValueError("give out_group or out_offsets, not both")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if in_index is not None:
        if in_index.numel() != plan.n_pairs:
            raise ValueError(f"in_index has {in_index.numel()} entries, expected one per pair ({plan.n_pairs})")
        in_index = in_index.reshape(-1).to(torch.int64).contiguous()
        expect = x.shape[0]
    else:
        expect = plan.n_pairs if in_group is None else plan.n_pairs // in_group
    if x.shape[0] != expect or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [{expect}, {weight.shape[1]}]")
    if out_offsets is not None:
        if out_offsets.dim() != 1 or out_offsets.numel() < 1:
            raise ValueError("out_offsets must be a 1-d tensor of R + 1 segment starts")
        out_offsets = out_offsets.to(torch.int64).contiguous()
    if local is not None:
        if local.dtype != torch.bool or local.numel() != plan.n_pairs:
            raise ValueError(f"local must be a bool tensor with one entry per pair ({plan.n_pairs}), got "
                             f"{local.dtype} with {local.numel()}")
        local = local.reshape(-1).contiguous()
    if gate is not None:
        gate = gate.reshape(-1)
        gate = gate if gate.stride(0) == 1 else gate.contiguous()
    return in_index, out_offsets, local, gate
