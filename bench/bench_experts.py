"""Expert-kernel benchmark on one GPU: σ-MoE FF layer and SwitchHead V/O, Triton vs reference vs dense.

    PYTHONPATH=.:kernels python bench/bench_experts.py [--only ff244,att,ff1b,att1b,ff126,att126,...]
        [--sweep [--sweep-ff 126M]] [--sweep-att 244M] [--sweep-tma] [--sweep-wgrad] [--sweep-floor]
        [--host-overhead] [--json out.json]

Prints: the measured bf16 matmul peak (8192^3), a correctness check at the real shape (Triton bf16 vs the
reference backend in fp32 on the same routing), fwd+bwd times with achieved TFLOP/s on the active expert FLOPs and
fraction of peak, the Triton layer's kernel time by category with the expert matmul kernels' own rate and
fraction of peak, the dense comparisons, host syncs per step (torch.cuda sync debug mode); with --sweep the
per-kernel tile-config sweep of the FF layer used to pick the heuristics in moeut_kernels/grouped.py, with
--sweep-att the time of each kernel call of the SwitchHead layer, with --sweep-tma the kernel calls and the
layers with TMA descriptor loads against pointer loads, with --sweep-wgrad the weight gradients' tile configs,
with --sweep-floor the FF calls that write [P, d] buffers
against the same calls on one expert, cuBLAS and a fill of the output (their floor), with --host-overhead the
host time per call of the expert ops against their GPU time (`--only none` skips the layer tables). With
--profile-layer ff244 it runs one warm fwd+bwd of that layer between cudaProfilerStart/Stop, for Nsight Compute:

    ncu --profile-from-start off -k regex:'gmm_kernel|wgrad_kernel|group_sum_kernel|sigmoid_topk_kernel' \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats -o ff244 \
        python bench/bench_experts.py --only none --no-check --profile-layer ff244
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import io
import json
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from moeut_ds.experts.reference import ReferenceBackend  # noqa: E402
from moeut_ds.experts.interface import Routing, sort_pairs  # noqa: E402
from moeut_ds.experts.triton_backend import TritonBackend  # noqa: E402
from moeut_ds.model.sigma_moe import router_logits  # noqa: E402
from moeut_kernels import grouped as GM  # noqa: E402

from bench_utils import CATEGORIES, count_syncs, device_kernels, time_by_category  # noqa: E402
from moeut_kernels.grouped import TileConfig  # noqa: E402
from moeut_kernels.pair_tiles import pair_matmul, pair_plan  # noqa: E402
from moeut_kernels.routing import RoutingPlan, plan_from_expert_index  # noqa: E402

TOKENS = 64 * 1024
# The presets' expert layers. Widths as the kernels see them: MoEUT-44M's d = 412 and d_h = 82 padded to multiples
# of 16 (grouped.aligned_operands), so that the sweeps, which call the kernels directly, time what a step runs.
_W = GM.aligned_width
FF_SHAPES = {"44M": dict(d=_W(412), n_experts=155, d_e=128, k=12), "126M": dict(d=768, n_experts=254, d_e=128, k=12),
             "244M": dict(d=1024, n_experts=387, d_e=128, k=16), "1B": dict(d=1536, n_experts=565, d_e=128, k=24)}
ATT_SHAPES = {"44M": dict(d=_W(412), heads=4, n_experts=8, k=2, d_h=_W(82)),
              "126M": dict(d=768, heads=4, n_experts=10, k=2, d_h=96),
              "244M": dict(d=1024, heads=4, n_experts=10, k=2, d_h=128),
              "1B": dict(d=1536, heads=6, n_experts=12, k=2, d_h=128)}
LARGE = ("244M", "1B")      # the shapes of the tile-order, TMA and floor sweeps
LAYERS = {"ff44": ("ff", "44M"), "ff126": ("ff", "126M"), "ff244": ("ff", "244M"), "ff1b": ("ff", "1B"),
          "att44": ("att", "44M"), "att126": ("att", "126M"), "att": ("att", "244M"), "att1b": ("att", "1B")}
DEV = "cuda"
BF16 = torch.bfloat16


def ms(fn, rep: int = 300) -> float:
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def peak_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device=DEV, dtype=BF16) for _ in range(2))
    return 2 * 8192 ** 3 / ms(lambda: a @ b) / 1e9


# ------------------------------------------------------------------ σ-MoE FF layer

def ff_inputs(shape: dict, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    d, E, d_e = shape["d"], shape["n_experts"], shape["d_e"]
    x = torch.randn(TOKENS, d, device=DEV, dtype=BF16, generator=g).requires_grad_()
    w_s = (torch.randn(E, d, device=DEV, generator=g) * d ** -0.5).to(BF16).requires_grad_()
    w1 = (torch.randn(E, d, d_e, device=DEV, generator=g) * d ** -0.5).to(BF16).requires_grad_()
    w2 = (torch.randn(E, d_e, d, device=DEV, generator=g) * (E * d_e) ** -0.5).to(BF16).requires_grad_()
    gy = torch.randn(TOKENS, d, device=DEV, dtype=BF16, generator=g)
    return x, w_s, w1, w2, gy


def rel_errs(got, want) -> list[float]:
    """Relative L2 error of each tensor in got against its fp32 counterpart in want."""
    return [((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, want)]


def kernel_split(what: str, step: Callable, flops: int, peak: float, rows: list, steps: int = 5) -> None:
    """Device time per fwd+bwd of `step` (already warm: the layer tables time it first) by profile category
    (bench_utils.CATEGORIES), and the rate of the expert matmul kernels alone on the active FLOPs: the layer's
    figure counts routing, group sums and the router too."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    # On CPU (the tests: Triton's interpreter) nothing has device time and the split stays empty.
    on_gpu = torch.device(DEV).type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by_cat = {label: us / steps / 1e3 for label, us in time_by_category(device_kernels(prof)).items() if us}
    matmul_ms = by_cat.get(CATEGORIES[0][0], float("nan"))
    rows.append(dict(what=f"{what} kernels", split_ms=by_cat, matmul_tflops=flops / matmul_ms / 1e9,
                     matmul_frac_peak=flops / matmul_ms / 1e9 / peak))
    print(rows[-1], flush=True)


def optional_backends() -> list:
    """(label, backend) of the installed comparison backends: MegaBlocks when bench/build_megablocks.sh built it."""
    from moeut_ds.experts import available_backends, get_backend
    return [(name, get_backend(name)) for name in ("megablocks",) if name in available_backends()]


def ff_layer(backend, x, w_s, w1, w2, k):
    """Router (LN omitted: the same for every backend) + σ-gating + experts; what the model's SigmaMoE runs."""
    logits = router_logits(x, w_s)
    routing = backend.route(logits.view(-1, 1, w_s.shape[0]), k)
    return backend.mlp(x, w1, w2, routing)


def bench_ff(name: str, shape: dict, peak: float, rows: list, check: bool) -> None:
    x, w_s, w1, w2, gy = ff_inputs(shape)
    k, d, d_e, E = shape["k"], shape["d"], shape["d_e"], shape["n_experts"]
    flops = 12 * TOKENS * k * d * d_e            # expert matmuls, fwd (2 GEMMs) + bwd (4 GEMMs)
    params = [x, w_s, w1, w2]
    tb, ref = TritonBackend(), ReferenceBackend()
    # the opt-in atomic combine of the MLP's two summed launches (bf16 atomics: not in the CPU tests' interpreter),
    # then MegaBlocks if it is built
    atomic = [] if GM.INTERPRET else [("triton combine=atomic", TritonBackend(combine="atomic"))]
    extra = atomic + optional_backends()
    if check:
        logits = F.linear(x.detach(), w_s).float().view(-1, 1, E)   # router path left out of dx on both sides
        r = tb.route(logits, k)
        y = tb.mlp(x, w1, w2, r)
        grads = torch.autograd.grad(y, [x, w1, w2], gy)
        leaves = [t.detach().float().requires_grad_() for t in (x, w1, w2)]
        order, offsets = sort_pairs(r.expert_index, E)
        rr = Routing(gate=r.gate.detach(), expert_index=r.expert_index, n_experts=E, order=order, offsets=offsets)
        y_r = ref.mlp(*leaves, rr)
        grads_r = torch.autograd.grad(y_r, leaves, gy.float())
        err = rel_errs([y, *grads], [y_r, *grads_r])
        print(f"[check {name} FF] rel err vs fp32 reference: out {err[0]:.2e} dx {err[1]:.2e} dW1 {err[2]:.2e} "
              f"dW2 {err[3]:.2e}", flush=True)
        rows.append(dict(what=f"check FF {name}", err=err))
        for label, backend in extra:
            out = backend.mlp(x, w1, w2, r)
            got = torch.autograd.grad(out, [x, w1, w2], gy)
            err = rel_errs([out, *got], [y_r, *grads_r])
            print(f"[check {name} FF {label}] rel err vs fp32 reference: {['%.2e' % e for e in err]}", flush=True)
            rows.append(dict(what=f"check FF {name} {label}", err=err))
        del y, grads, y_r, grads_r, leaves
    def fwd_bwd(backend) -> Callable:
        return lambda: torch.autograd.grad(ff_layer(backend, x, w_s, w1, w2, k), params, gy)

    for label, backend in (("triton", tb), ("reference", ref), *extra):
        fwd = ms(lambda: ff_layer(backend, x, w_s, w1, w2, k))
        step = ms(fwd_bwd(backend))
        syncs = count_syncs(fwd_bwd(backend))
        rows.append(dict(what=f"FF {name} {label}", fwd_ms=fwd, fwdbwd_ms=step, tflops=flops / step / 1e9,
                         frac_peak=flops / step / 1e9 / peak, syncs=syncs))
        print(rows[-1], flush=True)
    kernel_split(f"FF {name} triton", fwd_bwd(tb), flops, peak, rows)
    # dense FFNs (bias + ReLU, bf16): equal active FLOPs (d_ff = K d_e) and equal total params (d_ff = N_E d_e)
    for label, d_ff in (("dense equal-active", k * d_e), ("dense equal-params", E * d_e)):
        W1 = (torch.randn(d_ff, d, device=DEV) * d ** -0.5).to(BF16).requires_grad_()
        W2 = (torch.randn(d, d_ff, device=DEV) * d_ff ** -0.5).to(BF16).requires_grad_()
        b1 = torch.zeros(d_ff, device=DEV, dtype=BF16, requires_grad=True)
        b2 = torch.zeros(d, device=DEV, dtype=BF16, requires_grad=True)
        dense = lambda: F.linear(F.relu(F.linear(x, W1, b1)), W2, b2)  # noqa: E731
        step = ms(lambda: torch.autograd.grad(dense(), [x, W1, W2, b1, b2], gy), rep=200)
        dflops = 12 * TOKENS * d * d_ff
        rows.append(dict(what=f"FF {name} {label} (d_ff {d_ff})", fwdbwd_ms=step, tflops=dflops / step / 1e9,
                         frac_peak=dflops / step / 1e9 / peak))
        print(rows[-1], flush=True)
        del W1, W2, b1, b2


# ------------------------------------------------------------------ SwitchHead V/O projections

def att_inputs(s: dict, seed: int = 1) -> dict:
    """The SwitchHead V/O layer's inputs, router and expert weights, and output gradients at shape s."""
    d, H, n, d_h = s["d"], s["heads"], s["n_experts"], s["d_h"]
    g = torch.Generator(device=DEV).manual_seed(seed)
    t = dict(x=torch.randn(TOKENS, d, device=DEV, dtype=BF16, generator=g).requires_grad_(),
             a=torch.randn(TOKENS * H, d_h, device=DEV, dtype=BF16, generator=g).requires_grad_(),
             w_sv=(torch.randn(H * n, d, device=DEV, generator=g) * d ** -0.5).to(BF16).requires_grad_(),
             w_so=(torch.randn(H * n, d, device=DEV, generator=g) * d ** -0.5).to(BF16).requires_grad_(),
             w_v=(torch.randn(H * n, d, d_h, device=DEV, generator=g) * d ** -0.5).to(BF16).requires_grad_(),
             w_o=(torch.randn(H * n, d_h, d, device=DEV, generator=g) * (H * d_h) ** -0.5).to(BF16).requires_grad_())
    t["gv"] = torch.randn(TOKENS * H, d_h, device=DEV, dtype=BF16, generator=g)
    t["go"] = torch.randn(TOKENS, d, device=DEV, dtype=BF16, generator=g)
    return t


def att_vo(backend, t: dict, s: dict):
    """Both routers + σ-gating + the V and O expert projections; what the model's SwitchHead runs for V and O."""
    H, n, k = s["heads"], s["n_experts"], s["k"]
    rv = backend.route(F.linear(t["x"], t["w_sv"]).float().view(-1, H, n), k)
    ro = backend.route(F.linear(t["x"], t["w_so"]).float().view(-1, H, n), k)
    v = backend.matmul(t["x"], t["w_v"], rv, in_group=H * k, out_group=k)
    o = backend.matmul(t["a"], t["w_o"], ro, in_group=k, out_group=H * k)
    return v, o


def att_step(backend, t: dict, s: dict):
    v, o = att_vo(backend, t, s)
    return torch.autograd.grad([v, o], [t[name] for name in ("x", "a", "w_sv", "w_so", "w_v", "w_o")],
                               [t["gv"], t["go"]])


def _att_step(s: dict):
    """One fwd+bwd of the SwitchHead V/O layer at shape s on its own inputs (Triton backend)."""
    t = att_inputs(s)
    return lambda: att_step(TritonBackend(), t, s)


def _att_operands(s: dict) -> tuple:
    """(x, a, grad of V, grad of O, W_v, W_o) of att_inputs(s), detached: the per-call sweeps' operands."""
    t = att_inputs(s, seed=4)
    return tuple(t[name].detach() for name in ("x", "a", "gv", "go", "w_v", "w_o"))


def bench_att(name: str, s: dict, peak: float, rows: list, check: bool) -> None:
    """SwitchHead V and O projections with both routers, against the dense model's V and O (d -> d and back:
    16 x 64 heads at 244M, 24 x 64 at 1B)."""
    d, H, n, k, d_h = s["d"], s["heads"], s["n_experts"], s["k"], s["d_h"]
    t = att_inputs(s)
    x, w_sv, w_v, gv, go = t["x"], t["w_sv"], t["w_v"], t["gv"], t["go"]
    flops = 2 * 6 * TOKENS * H * k * d * d_h     # V and O expert matmuls, fwd + bwd
    if check:
        tb = TritonBackend()
        rv = tb.route(F.linear(x.detach(), w_sv).float().view(-1, H, n), k)
        v = tb.matmul(x, w_v, rv, in_group=H * k, out_group=k)
        dx, dw = torch.autograd.grad(v, [x, w_v], gv)
        order, offsets = sort_pairs(rv.expert_index, H * n)
        rr = Routing(gate=rv.gate.detach(), expert_index=rv.expert_index, n_experts=H * n, order=order, offsets=offsets)
        xl, wl = x.detach().float().requires_grad_(), w_v.detach().float().requires_grad_()
        v_r = ReferenceBackend().matmul(xl, wl, rr, in_group=H * k, out_group=k)
        dx_r, dw_r = torch.autograd.grad(v_r, [xl, wl], gv.float())
        err = rel_errs((v, dx, dw), (v_r, dx_r, dw_r))
        print(f"[check att V] rel err vs fp32 reference: out {err[0]:.2e} dx {err[1]:.2e} dW {err[2]:.2e}")
        rows.append(dict(what=f"check att V {name}", err=err))
    for label, backend in (("triton", TritonBackend()), ("reference", ReferenceBackend())):
        fwd = ms(lambda: att_vo(backend, t, s))
        step = ms(lambda: att_step(backend, t, s))
        rows.append(dict(what=f"att V+O {name} {label}", fwd_ms=fwd, fwdbwd_ms=step, tflops=flops / step / 1e9,
                         frac_peak=flops / step / 1e9 / peak, syncs=count_syncs(lambda: att_step(backend, t, s))))
        print(rows[-1], flush=True)
    kernel_split(f"att V+O {name} triton", lambda: att_step(TritonBackend(), t, s), flops, peak, rows)
    Wv = (torch.randn(d, d, device=DEV) * d ** -0.5).to(BF16).requires_grad_()
    Wo = (torch.randn(d, d, device=DEV) * d ** -0.5).to(BF16).requires_grad_()
    a2 = torch.randn(TOKENS, d, device=DEV, dtype=BF16, requires_grad=True)
    step = ms(lambda: torch.autograd.grad([F.linear(x, Wv), F.linear(a2, Wo)], [x, a2, Wv, Wo], [go, go]))
    dflops = 2 * 6 * TOKENS * d * d
    rows.append(dict(what=f"att V+O dense-{name} ({d // 64}x64)", fwdbwd_ms=step, tflops=dflops / step / 1e9,
                     frac_peak=dflops / step / 1e9 / peak))
    print(rows[-1], flush=True)


# ------------------------------------------------------------------ per-kernel sweep

def _timed(rows: list, what: str, fn, **extra) -> None:
    """Time fn into rows (or record why it failed: out of shared memory etc.) and print the row."""
    try:
        rows.append(dict(what=what, ms=ms(fn, rep=100), **extra))
        torch.cuda.synchronize()
    except Exception as e:
        rows.append(dict(what=what, error=str(e)[:80]))
    print(rows[-1], flush=True)


def sorted_operand(t: torch.Tensor, group: int, plan: RoutingPlan, gate: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """A weight-gradient operand materialised in sorted pair layout: rows t[pair // group] (t itself when group is
    0: already sorted), times the pair's gate when given; what the weight-gradient sweeps compare the in-kernel
    gathers and gate scale against."""
    rows = t[plan.order // group] if group else t
    return rows if gate is None else rows * gate[plan.order].unsqueeze(1).to(rows.dtype)


def sweep(shape: dict, rows: list, defaults_only: bool = False) -> None:
    """Time each kernel call of the FF layer alone for several tile configs (bf16, one FF shape): what picked the
    heuristics in moeut_kernels/grouped.py. 'R' configs keep the A tile resident and loop over n_loop output
    slices (the short-K calls); the default config is listed first. defaults_only: just the default configs at
    BLOCK_M 128 (the per-call breakdown of the layer, ~1 minute)."""
    x, w_s, w1, w2, gy = ff_inputs(shape, seed=3)
    k, d, d_e, E = shape["k"], shape["d"], shape["d_e"], shape["n_experts"]
    flop1 = 2 * TOKENS * k * d * d_e
    logits = F.linear(x, w_s).float().view(-1, 1, E).detach()
    P = TOKENS * k
    resident = [TileConfig(128, 128, 8, 3, True, n) for n in (8, 4, 2)] + [
        TileConfig(128, 128, 4, 3, True, 4), TileConfig(128, 128, 8, 2, True, 4), TileConfig(64, 128, 4, 3, True, 8),
        TileConfig(256, 128, 8, 2, True, 2), TileConfig(128, 64, 8, 3)]     # last: one slice per program, K loop
    # the looping-K training calls: 8 warps (the 4-warp default takes 227-255 registers, two programs per SM by
    # shared memory), also capped at 128 registers so that two 8-warp programs fit (KERNELS.md, "Three
    # weight-gradient programs per SM")
    looping = [TileConfig(128, 64, 8, 3, tma=True), TileConfig(128, 64, 8, 3, tma=True, maxnreg=128)]
    for block_m in (128,) if defaults_only else (128, 256):
        tb = TritonBackend(block_m=block_m)
        r = tb.route(logits, k)
        plan, gate = r.plan, r.gate.detach().reshape(-1)
        xd, h = x.detach(), torch.randn(P, d_e, device=DEV, dtype=BF16)
        gh = torch.randn(P, d_e, device=DEV, dtype=BF16)
        out_h = torch.empty(P, d_e, device=DEV, dtype=BF16)
        buf = torch.empty(P, d, device=DEV, dtype=BF16)
        gpart = torch.empty(P, 8, device=DEV, dtype=torch.float32)  # room for every column chunk
        h_side = torch.empty(P, d_e, device=DEV, dtype=BF16)
        sgrad = torch.empty(P, device=DEV, dtype=torch.float32)
        # The FF training path (moeut_kernels.gated_mlp): up_fwd (gated), down_fwd, down_dx_masked_gate_grad,
        # up_dx_nomask, wgrad_up, wgrad_down. down_dx_plain_scaled with up_dx_store_masked (+ the gate gradient)
        # were the eleventh to fifteenth sessions'; down_dx_plain and up_dx_store_masked_scaled the tenth's;
        # down_dx and down_dx_store_gated (fused gate gradient) the FF's path before that and attention O's
        # current one.
        calls = {  # name: (call, configs besides the default)
            "up_fwd": (lambda c: GM._gmm(xd, k, w1, False, plan, out_h, False, relu_out=True, scale=gate, cfg=c),
                       looping),
            "down_dx_plain": (lambda c: GM._gmm(gy, k, w2, True, plan, out_h, False, cfg=c), []),
            # the same with each row scaled by its gate in the epilogue (stores gate * dh: the training path)
            "down_dx_plain_scaled": (lambda c: GM._gmm(gy, k, w2, True, plan, out_h, False, scale=gate, cfg=c), []),
            # the training path: also the ReLU mask on the output and the gate's gradient from the stored rows
            "down_dx_masked_gate_grad": (lambda c: GM._gmm(gy, k, w2, True, plan, out_h, False, scale=gate,
                                                           out_mask=h, scale_grad=sgrad, cfg=c),
                                         looping),
            "down_dx": (lambda c: GM._gmm(gy, k, w2, True, plan, out_h, False, scale=gate, dsrc=h, gpart=gpart,
                                          cfg=c), [TileConfig(128, 64, 8, 3)]),
            # also stores h * gate once for the weight gradient
            "down_dx_store_gated": (lambda c: GM._gmm(gy, k, w2, True, plan, out_h, False, scale=gate, dsrc=h,
                                                      gpart=gpart, cfg=c, side_out=h_side), []),
            "down_fwd": (lambda c: GM._gmm(h, 0, w2, False, plan, buf, True, cfg=c), resident),
            # the same stores at the sorted position (contiguous rows per tile) instead of by pair id
            "down_fwd_sorted": (lambda c: GM._gmm(h, 0, w2, False, plan, buf, False, cfg=c), resident[:2]),
            "up_dx": (lambda c: GM._gmm(gh, 0, w1, True, plan, buf, True, amask=h, cfg=c), resident),
            # the training path (its A comes masked); without the mask, what the mask's loads cost
            "up_dx_nomask": (lambda c: GM._gmm(gh, 0, w1, True, plan, buf, True, cfg=c), resident[:2]),
            # also stores grad_h * mask once for the weight gradient
            "up_dx_store_masked": (lambda c: GM._gmm(gh, 0, w1, True, plan, buf, True, amask=h, cfg=c,
                                                     side_out=out_h), []),
            # with the gate's scale applied here (the tenth session's path, without its gate gradient)
            "up_dx_store_masked_scaled": (lambda c: GM._gmm(gh, 0, w1, True, plan, buf, True, amask=h, cfg=c,
                                                            scale=gate, side_out=out_h), []),
        }
        for name, (call, cfgs) in calls.items():
            extra = [] if defaults_only else cfgs if block_m == 128 else cfgs[:1]
            for c in [None] + extra:
                _timed(rows, f"sweep {name} BM{block_m} {c or 'default'}", lambda: call(c), flop=flop1)
        _timed(rows, f"sweep group_sum BM{block_m}", lambda: GM.group_sum(buf, k, gate),
               gbytes=(P * d * 2 + TOKENS * d * 2) / 1e9)
        _timed(rows, f"sweep relu mask in torch BM{block_m}", lambda: gh * (h > 0))   # the non-resident fallback
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        for name, call in (("wgrad_up", lambda: GM._wgrad(xd, k, gh, 0, plan, gw1)),
                           ("wgrad_down", lambda: GM._wgrad(h, 0, gy, k, plan, gw2))):   # h: the gated h
            _timed(rows, f"sweep {name} BM{block_m} default", call, flop=flop1)     # variants: --sweep-wgrad
        # what the gathers (and the gate scale) cost the weight gradients: the same sums on operands gathered
        # (and scaled) beforehand into the sorted layout
        x_sorted = sorted_operand(xd, k, plan)
        gy_sorted = sorted_operand(gy, k, plan, gate)
        _timed(rows, f"sweep wgrad_up on pre-gathered x BM{block_m}", lambda: GM._wgrad(x_sorted, 0, gh, 0, plan, gw1),
               flop=flop1)
        _timed(rows, f"sweep wgrad_down on pre-gathered, pre-scaled grad BM{block_m}",
               lambda: GM._wgrad(h, 0, gy_sorted, 0, plan, gw2), flop=flop1)
        # what a gated copy of h costs as a separate torch pass (against the down_dx_store_gated row)
        _timed(rows, f"sweep gate * h as a torch pass BM{block_m}", lambda: sorted_operand(h, 0, plan, gate),
               gbytes=2 * P * d_e * 2 / 1e9)
        del x_sorted, gy_sorted
        _timed(rows, f"route BM{block_m} (sigmoid/top-k/sort/plan)", lambda: tb.route(logits, k))


def _att_gemms(s: dict) -> tuple[list, SimpleNamespace]:
    """The SwitchHead V/O grouped matmuls of one shape as (what, call(cfg), configs besides the default), flop
    t.flop1 each, and t: their operands, routings and output buffers (bf16, routings of seeded logits)."""
    d, H, n, k, d_h = s["d"], s["heads"], s["n_experts"], s["k"], s["d_h"]
    x, a, gv, gy, w_v, w_o = _att_operands(s)
    g = torch.Generator(device=DEV).manual_seed(4)
    tb = TritonBackend()
    logits_v, logits_o = (torch.randn(TOKENS, H, n, device=DEV, generator=g) for _ in range(2))
    rv, ro = tb.route(logits_v, k), tb.route(logits_o, k)
    (pv, gate_v), (po, gate_o) = ((r.plan, r.gate.reshape(-1)) for r in (rv, ro))
    P, hk = TOKENS * H * k, H * k
    narrow, wide = torch.empty(P, d_h, device=DEV, dtype=BF16), torch.empty(P, d, device=DEV, dtype=BF16)
    gpart = torch.empty(P, 16, device=DEV, dtype=torch.float32)
    side = torch.empty(P, d_h, device=DEV, dtype=BF16)
    classic = TileConfig(128, 64, 8, 3)
    gemms = [
        ("V fwd", lambda c: GM._gmm(x, hk, w_v, False, pv, narrow, True, cfg=c), [None]),
        ("O fwd", lambda c: GM._gmm(a, k, w_o, False, po, wide, True, cfg=c), [None, classic]),
        ("V dx", lambda c: GM._gmm(gv, k, w_v, True, pv, wide, True, scale=gate_v, cfg=c), [None]),
        ("V dx fused gate grad (before keeps_pairs)",
         lambda c: GM._gmm(gv, k, w_v, True, pv, wide, True, scale=gate_v, dsrc=x, d_group=hk, gpart=gpart,
                           cfg=c), [None]),
        ("O dx (+gate grad)", lambda c: GM._gmm(gy, hk, w_o, True, po, narrow, True, scale=gate_o, dsrc=a,
                                                  d_group=k, gpart=gpart, cfg=c), [None]),
        # the training path since the gated side store: also store the weight gradient's gated operand
        ("V dx + gated store", lambda c: GM._gmm(gv, k, w_v, True, pv, wide, True, scale=gate_v, cfg=c,
                                                 side_out=side), [None]),
        ("O dx (+gate grad) + gated store", lambda c: GM._gmm(gy, hk, w_o, True, po, narrow, True, scale=gate_o,
                                                              dsrc=a, d_group=k, gpart=gpart, cfg=c,
                                                              side_out=side), [None]),
    ]
    return gemms, SimpleNamespace(x=x, a=a, gv=gv, gy=gy, w_v=w_v, w_o=w_o, tb=tb, logits_v=logits_v, pv=pv,
                                  gate_v=gate_v, po=po, gate_o=gate_o, k=k, hk=hk, narrow=narrow, wide=wide,
                                  experts_o=ro.expert_index.reshape(-1), flop1=2 * P * d * d_h)


def sweep_att(name: str, s: dict, rows: list) -> None:
    """Time each kernel call of the SwitchHead V/O layer alone (bf16): where its fwd+bwd time goes, with the
    training-path weight gradients' row chunks and tiles and the O forward's resident-A path as the variants."""
    gemms, t = _att_gemms(s)
    x, a, gv, gy, w_v, w_o, pv, gate_v, po, gate_o = (t.x, t.a, t.gv, t.gy, t.w_v, t.w_o, t.pv, t.gate_v, t.po,
                                                       t.gate_o)
    k, hk, narrow, wide, tb, logits_v, flop1 = t.k, t.hk, t.narrow, t.wide, t.tb, t.logits_v, t.flop1
    for what, call, cfgs in gemms:
        for c in cfgs:
            _timed(rows, f"sweep att {name} {what} {c or 'default'}", lambda: call(c), flop=flop1)
    for what, call in (("V fwd group sum", lambda: GM.group_sum(narrow, k, gate_v)),
                       ("O fwd group sum", lambda: GM.group_sum(wide, hk, gate_o)),
                       ("V dx group sum", lambda: GM.group_sum(wide, hk)),
                       ("O dx group sum", lambda: GM.group_sum(narrow, k)),
                       ("V gate grad from kept pairs", lambda: GM.pair_dot(gv, k, narrow)),
                       ("route (one of two)", lambda: tb.route(logits_v, k))):
        _timed(rows, f"sweep att {name} {what}", call)
    # the O forward as expert-pair tiles (the default for K_A = 2): the pair plan, the matmul and the sum of H rows
    # per token, against the per-pair launch and sum above
    H, n = s["heads"], s["n_experts"]
    plan_o = pair_plan(t.experts_o, H, H * n, po.block_m)
    rows_buf = torch.empty(TOKENS * H, s["d"], device=DEV, dtype=BF16)
    _timed(rows, f"sweep att {name} O fwd pair plan", lambda: pair_plan(t.experts_o, H, H * n, po.block_m))
    _timed(rows, f"sweep att {name} O fwd pair tiles",
           lambda: pair_matmul(a, w_o, plan_o, t.experts_o, gate_o, rows_buf, "tf32", GM._descriptor), flop=flop1)
    _timed(rows, f"sweep att {name} pair tiles group sum (H rows)", lambda: GM.group_sum(rows_buf, H))
    gw_v, gw_o = torch.empty_like(w_v), torch.empty_like(w_o)
    # the training path: the input-gradient launch stored one operand sorted and gated (side_out), the other is
    # gathered; the variants sweep its row chunks and tiles
    x_sorted = sorted_operand(x, hk, pv)
    gv_sorted = sorted_operand(gv, k, pv, gate_v)
    a_gated = sorted_operand(a, k, po, gate_o)
    wgrads = (("V", lambda: GM._wgrad(x, hk, gv_sorted, 0, pv, gw_v)),
              ("O", lambda: GM._wgrad(a_gated, 0, gy, hk, po, gw_o)))
    for over in ({}, {"wgrad_splits": 1}, {"wgrad_splits": 2}, {"wgrad_splits": 8}, {"wgrad_block_r": 32},
                 {"wgrad_block_r": 128}, {"wgrad": dict(num_stages=4)}, {"wgrad": dict(num_warps=8)},
                 {"wgrad": dict(block_n=64)}):
        GM.OVERRIDES.update(over)
        for proj, call in wgrads:
            _timed(rows, f"sweep att {name} {proj} wgrad {over or 'default'}", call, flop=flop1)
        for key in over:
            GM.OVERRIDES.pop(key)
    # what the gathers and the gate scale cost: the same sums with both operands gathered (the path without a
    # side store) and with both sorted beforehand
    _timed(rows, f"sweep att {name} V wgrad on gathered operands, scaled in the kernel",
           lambda: GM._wgrad(x, hk, gv, k, pv, gw_v, scale=gate_v), flop=flop1)
    _timed(rows, f"sweep att {name} V wgrad on pre-gathered, pre-scaled operands",
           lambda: GM._wgrad(x_sorted, 0, gv_sorted, 0, pv, gw_v), flop=flop1)


WGRAD_VARIANTS = (    # label, wgrad config fields ("width": the tile's extent along d), row step
    ("default", {}, None),
    ("8 warps, no cap (before)", dict(num_warps=8, maxnreg=None), None),
    ("cap 160", dict(maxnreg=160), None),
    ("4 stages", dict(num_stages=4), None),
    ("rows 32, 4 stages", dict(num_stages=4), 32),
    ("64 wide, 2 stages, cap 128", dict(width=64, num_stages=2, maxnreg=128), None),
    ("256 wide, 8 warps, rows 128, 2 stages", dict(width=256, num_warps=8, num_stages=2, maxnreg=None), 128))


def sweep_wgrad(rows: list, sizes: tuple = LARGE) -> None:
    """The four training-path weight gradients (one operand gathered, the other sorted by TMA) at 244M and 1B under
    the WGRAD_VARIANTS tile configs; each row records its largest difference from the default config's result.
    The gathered operand is read from DRAM once per pair whatever the tile (the floor, KERNELS.md "The memory floor
    of this design"); the tile's width along d sets how often the sorted one is read (from L2), its registers and
    shared memory how many programs share an SM (KERNELS.md, "Three weight-gradient programs per SM")."""
    for size in sizes:
        f, s = FF_SHAPES[size], ATT_SHAPES[size]
        x, w_s, w1, w2, gy = ff_inputs(f, seed=3)
        k, E, d_e = f["k"], f["n_experts"], f["d_e"]
        plan = TritonBackend().route(F.linear(x, w_s).float().view(-1, 1, E).detach(), k).plan
        xd, (gh, h) = x.detach(), (torch.randn(TOKENS * k, d_e, device=DEV, dtype=BF16) for _ in range(2))
        _, t = _att_gemms(s)
        gv_sorted, a_gated = sorted_operand(t.gv, t.k, t.pv, t.gate_v), sorted_operand(t.a, t.k, t.po, t.gate_o)
        calls = (   # name, gradient buffer, call, the axis along d (block_k: A gathered; block_n: B gathered), flop
            ("FF up", torch.empty_like(w1), lambda g: GM._wgrad(xd, k, gh, 0, plan, g), "block_k",
             2 * TOKENS * k * f["d"] * d_e),
            ("FF down", torch.empty_like(w2), lambda g: GM._wgrad(h, 0, gy, k, plan, g), "block_n",
             2 * TOKENS * k * f["d"] * d_e),
            ("att V", torch.empty_like(t.w_v), lambda g: GM._wgrad(t.x, t.hk, gv_sorted, 0, t.pv, g), "block_k",
             t.flop1),
            ("att O", torch.empty_like(t.w_o), lambda g: GM._wgrad(a_gated, 0, t.gy, t.hk, t.po, g), "block_n",
             t.flop1))
        for name, grad, call, axis, flop in calls:
            call(grad)
            want = grad.clone()
            for label, fields, block_r in WGRAD_VARIANTS:
                fields = dict(fields)
                if "width" in fields:
                    fields[axis] = fields.pop("width")
                GM.OVERRIDES["wgrad"] = fields
                if block_r:
                    GM.OVERRIDES["wgrad_block_r"] = block_r
                _timed_against(rows, f"wgrad {size} {name} {label}", lambda: call(grad), grad, want, flop)
                GM.OVERRIDES.pop("wgrad")
                GM.OVERRIDES.pop("wgrad_block_r", None)


def _timed_against(rows: list, what: str, fn, out: torch.Tensor, ref: torch.Tensor, flop: int) -> None:
    """_timed, then the row also records max |out - ref| (fn writes out; ref holds the baseline's result)."""
    _timed(rows, what, fn, flop=flop)
    if "ms" in rows[-1]:
        rows[-1]["max_abs_diff"] = (out.float() - ref.float()).abs().max().item()


def sweep_tma(rows: list) -> None:
    """Kernel calls with TMA descriptor loads (TileConfig.tma) next to the same calls with pointer loads, at the FF
    and SwitchHead shapes of 244M and 1B. The resident-A calls (K = d_e): FF down forward (sorted A, W plain), FF
    up input-grad (sorted A, W^T), attention O forward (gathered A, W) and V input-grad with its gated store
    (gathered A, W^T). The looping-K calls (K = d, gathered A, W by descriptor only): FF up forward, FF down
    input-grad with the gate, the ReLU mask and the gate gradient, attention V forward and O input-grad. The four
    weight gradients with their sorted operand by TMA. Each TMA row records its largest difference from the
    pointer-load output. Then each layer's fwd+bwd with gmm_config's choice on this GPU and with its choice for a
    GPU without TMA, twice, interleaved."""
    for size in LARGE:
        f, a = FF_SHAPES[size], ATT_SHAPES[size]
        x, w_s, w1, w2, gy = ff_inputs(f, seed=3)
        k, d, d_e, E = f["k"], f["d"], f["d_e"], f["n_experts"]
        logits = F.linear(x, w_s).float().view(-1, 1, E).detach()
        r = TritonBackend().route(logits, k)
        plan, gate = r.plan, r.gate.reshape(-1)
        P = TOKENS * k
        h, gh = (torch.randn(P, d_e, device=DEV, dtype=BF16) for _ in range(2))
        sgrad = torch.empty(P, device=DEV, dtype=torch.float32)
        H, n, ka, d_h = a["heads"], a["n_experts"], a["k"], a["d_h"]
        xa, av, gv, gya, w_v, w_o = _att_operands(a)
        g = torch.Generator(device=DEV).manual_seed(4)
        rv, ro = (TritonBackend().route(torch.randn(TOKENS, H, n, device=DEV, generator=g), ka) for _ in range(2))
        Pa, hk = TOKENS * H * ka, H * ka
        att_side = torch.empty(Pa, d_h, device=DEV, dtype=BF16)
        gpart = torch.empty(max(P, Pa), 16, device=DEV, dtype=torch.float32)
        resident = GM.gmm_config(d, d_e, BF16, plan.block_m)           # K = d_e: pointer loads (no device given)
        looping, looping_g = (GM.gmm_config(d_e, d, BF16, plan.block_m, gate_grad=gg) for gg in (False, True))
        calls = {  # name: (call writing into out, out shape, flop, pointer-load config)
            "FF down_fwd": (lambda c, o: GM._gmm(h, 0, w2, False, plan, o, True, cfg=c), (P, d), 2 * P * d * d_e,
                            resident),
            "FF up_dx": (lambda c, o: GM._gmm(gh, 0, w1, True, plan, o, True, cfg=c), (P, d), 2 * P * d * d_e,
                         resident),
            "att O fwd": (lambda c, o: GM._gmm(av, ka, w_o, False, ro.plan, o, True, cfg=c), (Pa, d),
                          2 * Pa * d * d_h, resident),
            "att V dx + gated store": (lambda c, o: GM._gmm(gv, ka, w_v, True, rv.plan, o, True,
                                                            scale=rv.gate.reshape(-1), cfg=c, side_out=att_side),
                                       (Pa, d), 2 * Pa * d * d_h, resident),
            # the looping-K calls (K = d, A gathered): only W can come by descriptor
            "FF up_fwd": (lambda c, o: GM._gmm(x.detach(), k, w1, False, plan, o, False, relu_out=True, cfg=c),
                          (P, d_e), 2 * P * d * d_e, looping),
            "FF down_dx + mask + gate grad": (
                lambda c, o: GM._gmm(gy, k, w2, True, plan, o, False, scale=gate, out_mask=h, scale_grad=sgrad,
                                     cfg=c), (P, d_e), 2 * P * d * d_e, looping),
            "att V fwd": (lambda c, o: GM._gmm(xa, hk, w_v, False, rv.plan, o, True, cfg=c), (Pa, d_h),
                          2 * Pa * d * d_h, looping),
            "att O dx + gate grad + gated store": (
                lambda c, o: GM._gmm(gya, hk, w_o, True, ro.plan, o, True, scale=ro.gate.reshape(-1), dsrc=av,
                                     d_group=ka, gpart=gpart, cfg=c, side_out=att_side), (Pa, d_h),
                2 * Pa * d * d_h, looping_g),
        }
        for name, (call, shape, flop, base) in calls.items():
            ref, out = (torch.empty(shape, device=DEV, dtype=BF16) for _ in range(2))
            _timed(rows, f"tma {size} {name} pointer loads {base}", lambda: call(base, ref), flop=flop)
            if base.a_resident:
                variants = [dict(num_warps=w, num_stages=st) for w, st in ((8, 3), (8, 2), (4, 3), (4, 2))]
            else:
                variants = [{}, dict(num_stages=4), dict(num_warps=12 - base.num_warps)]
            for over in variants:
                c = dataclasses.replace(base, tma=True, **over)
                _timed_against(rows, f"tma {size} {name} TMA loads {c.num_warps} warps {c.num_stages} stages",
                               lambda: call(c, out), out, ref, flop)
        # the weight gradients, each with one sorted operand (by TMA with tma=True) and one gathered
        sorted_a = torch.randn(Pa, d_h, device=DEV, dtype=BF16)      # a sorted attention operand (one per pair)
        gw1, gw2, gw_v, gw_o = (torch.empty_like(w) for w in (w1, w2, w_v, w_o))
        wgrads = {  # name: (call, gradient written, flop)
            "FF wgrad_up (x gathered, masked grad sorted)": (lambda: GM._wgrad(x.detach(), k, gh, 0, plan, gw1),
                                                            gw1, 2 * P * d * d_e),
            "FF wgrad_down (gate * h sorted, grad gathered)": (lambda: GM._wgrad(h, 0, gy, k, plan, gw2), gw2,
                                                              2 * P * d * d_e),
            "att V wgrad (x gathered, gated grad sorted)": (
                lambda: GM._wgrad(xa, hk, sorted_a, 0, rv.plan, gw_v), gw_v, 2 * Pa * d * d_h),
            "att O wgrad (gate * a sorted, grad gathered)": (
                lambda: GM._wgrad(sorted_a, 0, gya, hk, ro.plan, gw_o), gw_o, 2 * Pa * d * d_h),
        }
        for name, (call, grad, flop) in wgrads.items():
            GM.OVERRIDES.pop("wgrad", None)
            _timed(rows, f"tma {size} {name} pointer loads", call, flop=flop)
            ref = grad.clone()
            for over in (dict(tma=True), dict(tma=True, num_stages=4), dict(tma=True, num_warps=8)):
                GM.OVERRIDES["wgrad"] = over
                _timed_against(rows, f"tma {size} {name} {over}", call, grad, ref, flop)
            GM.OVERRIDES.pop("wgrad")
        del h, gh, sgrad, av, gv, att_side, gpart, ref, out, xa, gya, sorted_a, gw1, gw2, gw_v, gw_o
        has_tma = GM._has_tma
        try:
            for layer, step in ((f"FF {size}", _ff_step(f)), (f"att V+O {size}", _att_step(a))):
                for rep in range(2):
                    for tma in (False, True):       # gmm_config's choice with and without TMA on this GPU
                        GM._has_tma = has_tma if tma else (lambda device: False)
                        _timed(rows, f"tma layer {layer} fwd+bwd tma={tma} (run {rep})", step)
        finally:
            GM._has_tma = has_tma
        torch.cuda.empty_cache()


def _floor_config(d: int, d_e: int, block_m: int, gluon: bool) -> GM.TileConfig:
    """The config of the [P, d]-writing calls (FF down forward and up input-grad), chosen with or without Gluon."""
    before = GM.OVERRIDES.get("gluon")
    GM.OVERRIDES["gluon"] = gluon and before is not False
    try:
        return GM.gmm_config(d, d_e, BF16, block_m, device=torch.device(DEV))
    finally:
        if before is None:
            GM.OVERRIDES.pop("gluon")
        else:
            GM.OVERRIDES["gluon"] = before


def sweep_floor(rows: list, sizes: tuple = LARGE) -> None:
    """How far the FF calls that write a [P, d] buffer (the down forward; the up input-grad, W transposed, its A
    masked upstream) are from their floor, at the FF_SHAPES in `sizes`: each call on the real routing and on a
    one-expert plan of the same P rows (the dense analog: same kernel, same config), next to cuBLAS on that dense
    shape ([P, d_e] @ [d_e, d]) and a fill of the [P, d] output (the DRAM write alone, which no kernel that stores
    the buffer can beat). The one-expert down forward records its largest difference from cuBLAS. Where the Gluon
    kernel runs (Hopper), the routed calls are also timed on gmm_kernel, with the config chosen without Gluon."""
    for size in sizes:
        f = FF_SHAPES[size]
        x, w_s, w1, w2, _ = (t.detach() for t in ff_inputs(f, seed=3))
        k, d, d_e, E = f["k"], f["d"], f["d_e"], f["n_experts"]
        P, flop = TOKENS * k, 2 * TOKENS * k * d * d_e
        routed = TritonBackend().route(F.linear(x, w_s).float().view(-1, 1, E), k)
        one = plan_from_expert_index(torch.zeros(P, dtype=torch.int64, device=DEV), 1, routed.plan.block_m)
        h = torch.relu(torch.randn(P, d_e, device=DEV, dtype=BF16))     # ReLU-shaped, as the masked gradient
        out = torch.empty(P, d, device=DEV, dtype=BF16)
        chosen = _floor_config(d, d_e, one.block_m, True)
        runs = [(routed.plan, "routed", chosen), (one, "one expert", chosen)]
        if chosen.gluon:
            runs.insert(1, (routed.plan, "routed gmm_kernel", _floor_config(d, d_e, one.block_m, False)))
        for plan, weights, cfg in runs:
            e = plan.n_experts
            _timed(rows, f"floor {size} FF down_fwd {weights}",
                   lambda: GM._gmm(h, 0, w2[:e], False, plan, out, True, cfg=cfg), flop=flop)
            if weights == "one expert":
                rows[-1]["max_abs_diff_vs_cublas"] = (out.float() - (h @ w2[0]).float()).abs().max().item()
            _timed(rows, f"floor {size} FF up_dx {weights}",
                   lambda: GM._gmm(h, 0, w1[:e], True, plan, out, True, cfg=cfg), flop=flop)
        _timed(rows, f"floor {size} cuBLAS [P, d_e] @ [d_e, d]", lambda: torch.matmul(h, w2[0], out=out), flop=flop)
        _timed(rows, f"floor {size} fill of the [P, d] output", lambda: out.fill_(1.0))
        del h, out
        torch.cuda.empty_cache()


def _tile_orders():
    """Yields "expert order", then "window order", with every gathering launch forced into that order meanwhile
    (OVERRIDES["window_order"], removed afterwards)."""
    for window in (False, True):
        GM.OVERRIDES["window_order"] = window
        yield "window order" if window else "expert order"
    GM.OVERRIDES.pop("window_order")


def sweep_order(rows: list) -> None:
    """The gathering calls (FF up forward and down input-grad as training runs them, at 244M and 1B; the attention
    V forward and O input-grad at 244M and 1B) in expert and window tile order. In window order a tile reads its
    expert's weights from DRAM more often (256 KB per 128-row FF tile) but its gathered rows from L2 (KERNELS.md,
    "The memory floor of this design"); the attention's weights stay in L2 either way."""
    for size in LARGE:
        shape = FF_SHAPES[size]
        x, w_s, w1, w2, gy = ff_inputs(shape, seed=3)
        k, d_e, E = shape["k"], shape["d_e"], shape["n_experts"]
        logits = F.linear(x, w_s).float().view(-1, 1, E).detach()
        P, xd = TOKENS * k, x.detach()
        r = TritonBackend().route(logits, k)
        plan, gate = r.plan, r.gate.detach().reshape(-1)
        h, out_h = (torch.randn(P, d_e, device=DEV, dtype=BF16) for _ in range(2))
        sgrad = torch.empty(P, device=DEV, dtype=torch.float32)
        flop = 2 * P * shape["d"] * d_e
        for label in _tile_orders():
            _timed(rows, f"order FF {size} up_fwd {label}",
                   lambda: GM._gmm(xd, k, w1, False, plan, out_h, False, relu_out=True, scale=gate), flop=flop)
            _timed(rows, f"order FF {size} down_dx + mask + gate grad {label}",
                   lambda: GM._gmm(gy, k, w2, True, plan, out_h, False, scale=gate, out_mask=h, scale_grad=sgrad),
                   flop=flop)
    # the attention's narrow gathering calls, which take window order by default (grouped._window_order)
    for name in LARGE:
        gemms, t = _att_gemms(ATT_SHAPES[name])
        calls = {what: call for what, call, _ in gemms}
        for label in _tile_orders():
            for what in ("V fwd", "O dx (+gate grad) + gated store"):
                _timed(rows, f"order att {name} {what} {label}", lambda: calls[what](None), flop=t.flop1)
    # where window order stops paying: the 1B attention shape with more experts per head, so that all experts'
    # weights (E x d x d_h bf16) run from a sixth of the H200's L2 to over twice it
    for n_experts in (4, 12, 24, 40, 64):
        s = dict(ATT_SHAPES["1B"], n_experts=n_experts)
        gemms, t = _att_gemms(s)
        calls = {what: call for what, call, _ in gemms}
        mb = t.w_v.numel() * t.w_v.element_size() / 2**20
        for label in _tile_orders():
            for what in ("V fwd", "O dx (+gate grad) + gated store"):
                _timed(rows, f"order L2 W {mb:.0f} MiB (1B, {n_experts}/head) {what} {label}",
                       lambda: calls[what](None), flop=t.flop1)


def sweep_combine(rows: list) -> None:
    """The σ-MoE MLP's two summed calls (down forward, up input-gradient) at 244M and 1B: the per-pair buffer +
    group_sum against the atomic combine (grouped.atomic_sums), whose window order runs over all experts at once or
    over groups of experts one after the other (OVERRIDES["window_experts"]): with all experts every tile reads
    its expert's weights from DRAM; a group's weights can stay in L2, at the price of re-reading the token rows
    once per group (KERNELS.md, "The atomic combine"). fp32 operands in Triton's interpreter (no bf16 atomics)."""
    dtype = torch.float32 if GM.INTERPRET else BF16
    for size in LARGE:
        shape = FF_SHAPES[size]
        x, w_s, w1, w2, _ = ff_inputs(shape, seed=4)
        k, d, d_e, E = shape["k"], shape["d"], shape["d_e"], shape["n_experts"]
        plan = TritonBackend().route(F.linear(x, w_s).float().view(-1, 1, E).detach(), k).plan
        a = torch.randn(TOKENS * k, d_e, device=DEV, dtype=dtype)
        w1, w2 = w1.detach().to(dtype), w2.detach().to(dtype)
        flop = 2 * TOKENS * k * d * d_e
        for what, w, trans in (("down fwd", w2, False), ("up dx", w1, True)):
            def buffered(w=w, trans=trans) -> torch.Tensor:
                buf = torch.empty(TOKENS * k, d, device=DEV, dtype=dtype)
                GM._gmm(a, 0, w, trans, plan, buf, True)
                return GM.group_sum(buf, k)
            _timed(rows, f"combine FF {size} {what} buffer + group_sum", buffered, flop=flop)
            for parts in (1, 2, 3, 4, 6, 8):
                GM.OVERRIDES["window_experts"] = triton.cdiv(E, parts)
                _timed(rows, f"combine FF {size} {what} atomic, window order in {parts} group(s) of experts",
                       lambda w=w, trans=trans: GM.atomic_sums(a, w, trans, plan, k), flop=flop)
            GM.OVERRIDES.pop("window_experts")


def sweep_route(rows: list) -> None:
    """Time the routing's parts at the FF 244M and SwitchHead 244M shapes: the whole route (fp32- and bf16-valued
    logits, the latter at several top-k row blocks and warp counts), torch.topk for comparison, the stable sort, the
    expert offsets and the plan kernel."""
    from moeut_kernels import routing as R
    g = torch.Generator(device=DEV).manual_seed(5)
    for name, groups, n, k in (("FF 244M", 1, FF_SHAPES["244M"]["n_experts"], FF_SHAPES["244M"]["k"]),
                               ("att 244M", ATT_SHAPES["244M"]["heads"], ATT_SHAPES["244M"]["n_experts"],
                                ATT_SHAPES["244M"]["k"])):
        logits = torch.randn(TOKENS, groups, n, device=DEV, generator=g)
        tb = TritonBackend()
        _timed(rows, f"route {name}: whole", lambda: tb.route(logits, k))
        # what a bf16 router GEMM gives (low 16 bits zero): the top-k kernel packs into int32 instead of int64
        logits16 = logits.bfloat16().float()
        _timed(rows, f"route {name}: whole, bf16-valued logits", lambda: tb.route(logits16, k))
        block_n = triton.next_power_of_2(n)
        for block_r in sorted({max(1, 512 // block_n), max(1, 1024 // block_n), max(1, 4096 // block_n)}):
            for warps in (1, 2, 4):
                R.TOPK_OVERRIDE = (block_r, warps)
                try:
                    _timed(rows, f"route {name}: whole, bf16-valued, top-k rows {block_r} warps {warps}",
                           lambda: tb.route(logits16, k))
                finally:
                    R.TOPK_OVERRIDE = None
        _timed(rows, f"route {name}: torch.topk of the sigmoid", lambda: torch.sigmoid(logits).topk(k, dim=-1))
        key = tb.route(logits16, k).expert_index.reshape(-1).to(torch.int16)
        _timed(rows, f"route {name}: stable sort", lambda: torch.sort(key, stable=True))
        sorted_key = torch.sort(key, stable=True)[0]
        _timed(rows, f"route {name}: expert offsets", lambda: R._expert_starts(sorted_key, groups * n))
        offsets = R._expert_starts(sorted_key, groups * n)
        _timed(rows, f"route {name}: plan kernel", lambda: torch.ops.moeut.plan(offsets, key.numel(), 128))


def host_overhead(rows: list, tokens: int = 256, calls: int = 200) -> None:
    """Host time per call of the expert ops at the 244M shapes but few tokens: each call is timed on the host from
    an idle GPU (synchronised before, not after), so the time is its own launch cost and never a wait on a full
    launch queue, against the GPU time of one call (do_bench). Where the host time is larger, a step of such calls
    is launch-bound: at micro-batch 16 the compiled MoEUT-126M step is (PERFORMANCE.md, twenty-first session)."""
    global TOKENS
    saved, TOKENS = TOKENS, tokens
    try:
        ff, att = FF_SHAPES["244M"], ATT_SHAPES["244M"]
        x, w_s, w1, w2, gy = ff_inputs(ff, seed=8)
        tb = TritonBackend()
        logits = router_logits(x, w_s).view(-1, 1, ff["n_experts"]).detach()
        routing = tb.route(logits, ff["k"])
        t = att_inputs(att, seed=9)
        ops = {
            "FF route (sigmoid_topk_route)": lambda: tb.route(logits, ff["k"]),
            "FF up projection forward (grouped_matmul)": lambda: tb.matmul(
                x.detach(), w1.detach(), routing, in_group=ff["k"], out_group=None, activation="relu"),
            "FF experts forward (mlp)": lambda: tb.mlp(x.detach(), w1.detach(), w2.detach(), routing),
            "FF layer forward (router GEMM + route + mlp)": lambda: ff_layer(tb, x, w_s, w1, w2, ff["k"]),
            "FF layer forward + backward": lambda: torch.autograd.grad(
                ff_layer(tb, x, w_s, w1, w2, ff["k"]), [x, w_s, w1, w2], gy),
            "SwitchHead V+O forward + backward": lambda: att_step(tb, t, att),
        }

        def host_loop(fn: Callable) -> float:
            """Seconds of host time in `calls` calls, each started on an idle GPU."""
            total = 0.0
            for _ in range(calls):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                total += time.perf_counter() - start
            torch.cuda.synchronize()
            return total

        for what, fn in ops.items():
            for _ in range(3):
                fn()
            host_us = host_loop(fn) / calls * 1e6
            rows.append(dict(what=f"host {what}, {tokens} tokens", host_us=host_us, gpu_us=ms(fn, rep=50) * 1e3))
            print(rows[-1], flush=True)
        # where the host time of each layer's fwd+bwd goes, by Python function (own time; the synchronisations
        # between calls show as their own row)
        for what in ("FF layer forward + backward", "SwitchHead V+O forward + backward"):
            profiler = cProfile.Profile()
            profiler.runcall(host_loop, ops[what])
            stats = io.StringIO()
            pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(30)
            print(f"host time of {what}, {calls} calls, by function:\n{stats.getvalue()}", flush=True)
    finally:
        TOKENS = saved


def _ff_step(shape: dict):
    """One fwd+bwd of the FF layer at `shape` on its own inputs (a closure per shape, not per loop variable)."""
    x, w_s, w1, w2, gy = ff_inputs(shape)
    return lambda: torch.autograd.grad(ff_layer(TritonBackend(), x, w_s, w1, w2, shape["k"]), [x, w_s, w1, w2], gy)


def profile_layers(names: list[str]) -> None:
    """One fwd+bwd of each named FF layer (ff244, ff1b) between cudaProfilerStart/Stop, after a warm-up
    step: for Nsight Compute (`ncu --profile-from-start off ...`), which then sees each kernel call once."""
    shapes = {"ff244": FF_SHAPES["244M"], "ff1b": FF_SHAPES["1B"]}
    unknown = [name for name in names if name not in shapes]
    if unknown:
        raise ValueError(f"--profile-layer takes ff244 or ff1b, not {', '.join(unknown)}")
    steps = [_ff_step(shapes[name]) for name in names]
    for step in steps:
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for step in steps:
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", nargs="?", const="full", choices=["full", "defaults"], default=None,
                    help="per-call tile sweep of the FF layer (244M shape); 'defaults': only the chosen configs")
    ap.add_argument("--sweep-att", choices=sorted(ATT_SHAPES), default=None,
                    help="per-call times of the SwitchHead V/O layer at this shape")
    ap.add_argument("--sweep-route", action="store_true", help="time the routing's parts (244M shapes)")
    ap.add_argument("--sweep-combine", action="store_true",
                    help="the MLP's summed calls: buffer + group_sum vs atomic sums by window groups (244M, 1B)")
    ap.add_argument("--sweep-wgrad", action="store_true",
                    help="the four weight gradients under several tile configs (244M, 1B)")
    ap.add_argument("--sweep-tma", action="store_true",
                    help="kernel calls and layers with TMA descriptor loads vs pointer loads (244M, 1B)")
    ap.add_argument("--sweep-floor", action="store_true",
                    help="the FF calls writing [P, d] buffers against cuBLAS and a fill of the output (244M, 1B)")
    ap.add_argument("--sweep-order", action="store_true",
                    help="time the gathering FF calls in expert vs window tile order (244M shape)")
    ap.add_argument("--host-overhead", action="store_true",
                    help="host time per call of the expert ops (244M shapes, 256 tokens) against their GPU time")
    ap.add_argument("--profile-layer", default=None,
                    help="comma list of ff244, ff1b: one profiled fwd+bwd each, for ncu --profile-from-start off")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-gluon", action="store_true",
                    help="configs as chosen without the Gluon kernel (gmm_kernel everywhere), for A/B runs")
    ap.add_argument("--only", default="ff244,ff1b,att,att1b",
                    help=f"comma list of layer tables: {', '.join(LAYERS)} (att: 244M), or none")
    ap.add_argument("--sweep-ff", choices=sorted(FF_SHAPES), default="244M", help="the FF shape of --sweep")
    ap.add_argument("--json", default=None)
    ap.add_argument("--wgrad-splits", type=int, default=None,
                    help="force the weight gradient's row chunks per expert (default: chosen per shape)")
    args = ap.parse_args()
    only = [] if args.only == "none" else args.only.split(",")
    unknown = [name for name in only if name not in LAYERS]
    if unknown:             # before any GPU work: a typo should not cost device time
        ap.error(f"--only takes {', '.join(LAYERS)} or none, not {', '.join(unknown)}")
    if args.wgrad_splits:
        GM.OVERRIDES["wgrad_splits"] = args.wgrad_splits
    if args.no_gluon:
        GM.OVERRIDES["gluon"] = False
    rows: list = []
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=datetime.datetime.now().isoformat(timespec="minutes"), tokens=TOKENS)
    print(env, flush=True)
    peak = peak_tflops()
    env["bf16_peak_tflops"] = peak
    print(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s", flush=True)
    if args.profile_layer:
        profile_layers(args.profile_layer.split(","))
    if args.sweep:
        sweep(FF_SHAPES[args.sweep_ff], rows, defaults_only=args.sweep == "defaults")
    if args.sweep_att:
        sweep_att(args.sweep_att, ATT_SHAPES[args.sweep_att], rows)
    if args.sweep_route:
        sweep_route(rows)
    if args.sweep_combine:
        sweep_combine(rows)
    if args.sweep_order:
        sweep_order(rows)
    if args.sweep_wgrad:
        sweep_wgrad(rows)
    if args.sweep_tma:
        sweep_tma(rows)
    if args.sweep_floor:
        sweep_floor(rows)
    if args.host_overhead:
        host_overhead(rows)
    sweeping = bool(args.sweep or args.sweep_att or args.sweep_route or args.sweep_order or args.sweep_tma
                    or args.sweep_wgrad or args.sweep_floor or args.host_overhead or args.sweep_combine)
    if sweeping and args.json:     # keep the sweeps if a layer table below fails
        Path(args.json).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    tables = {"ff": (bench_ff, FF_SHAPES), "att": (bench_att, ATT_SHAPES)}
    for name in only:       # the 1B correctness check is left out for time
        kind, size = LAYERS[name]
        table, shapes = tables[kind]
        table(size, shapes[size], peak, rows, check=not args.no_check and size != "1B")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    if sweeping:
        print("\n| sweep call | ms | TFLOP/s |\n|---|---|---|")
        for r in rows:
            if "ms" in r or "error" in r:
                rate = f"{r['flop'] / r['ms'] / 1e9:.0f}" if "flop" in r and "ms" in r else ""
                diff = f" | {r['max_abs_diff']:.3g}" if "max_abs_diff" in r else ""
                print(f"| {r['what']} | {r.get('ms', float('nan')):.3f} | {rate or r.get('error', '')}{diff} |")
    print("\n| what | fwd ms | fwd+bwd ms | TFLOP/s | of peak | host syncs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "fwdbwd_ms" in r:
            print(f"| {r['what']} | {r.get('fwd_ms', float('nan')):.2f} | {r['fwdbwd_ms']:.2f} | {r['tflops']:.0f} | "
                  f"{r['frac_peak']:.0%} | {r.get('syncs', '')} |")
    splits = [r for r in rows if "split_ms" in r]
    if splits:
        labels = [label for label, _ in CATEGORIES if any(label in r["split_ms"] for r in splits)]
        print(f"\n| kernel time per fwd+bwd, ms | {' | '.join(labels)} | expert matmuls alone: TFLOP/s | of peak |")
        print("|---" * (len(labels) + 3) + "|")
        for r in splits:
            cells = " | ".join(f"{r['split_ms'].get(label, 0.0):.2f}" for label in labels)
            print(f"| {r['what']} | {cells} | {r['matmul_tflops']:.0f} | {r['matmul_frac_peak']:.0%} |")


if __name__ == "__main__":
    main()
