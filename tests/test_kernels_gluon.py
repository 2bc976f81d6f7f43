"""The Gluon resident grouped matmul (moeut_kernels/_gluon.py). Gluon has no interpreter: on CPU it is compiled for
sm_90a with the installed Triton (a kernel edit or a Triton upgrade that breaks it fails here); on a Hopper GPU its
outputs must equal gmm_kernel's bit for bit (same bf16 products, same fp32 accumulation)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from kernel_testing import DEVICE  # noqa: F401  (sets TRITON_INTERPRET before any kernel import)

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from moeut_kernels import _gluon as GL

BLOCK_M = 128
layout = lambda block: gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
# (K, block_n, stages, by pair, relu, W transposed, masked A with side output, A gathered by group, per-pair scale
# with the scaled A as side output, rows added into sums of this many pairs); K 64 and 16: fewer column chunks
# than 4
for K, block_n, stages, by_pair, relu, trans, masked, group, scaled, sum_group in (
        (128, 128, 2, True, False, False, False, 0, False, 0),
        (128, 64, 3, False, True, False, False, 0, False, 0),
        (128, 128, 2, True, False, True, False, 0, False, 0),
        (128, 128, 2, True, False, True, True, 0, False, 0),
        (128, 128, 2, True, False, False, False, 2, False, 0),
        (128, 128, 2, True, False, True, False, 2, True, 0),
        (16, 128, 2, True, False, True, True, 0, False, 0),
        (64, 128, 2, True, False, True, False, 3, True, 0),
        (128, 128, 2, True, False, False, False, 0, False, 16),
        (128, 128, 2, True, False, True, False, 0, False, 24)):
    w_block = [block_n, K] if trans else [K, block_n]
    signature = dict(
        a_desc=f"tensordesc<bf16[{BLOCK_M}, {K}],{layout([BLOCK_M, K])!r}>" if group == 0 else "constexpr",
        a_ptr="*bf16", w_desc=f"tensordesc<bf16[{w_block[0]}, {w_block[1]}],{layout(w_block)!r}>",
        c_ptr="*bf16", order_ptr="*i64", tile_expert_ptr="*i32", tile_start_ptr="*i32", offsets_ptr="*i64",
        amask_ptr="*bf16", scale_ptr="*bf16", side_ptr="*bf16",
        N="i32", K="i32", E="i32", n_per_prog="i32", s_am="i32", s_cm="i32", s_mm="i32", s_om="i32",
        **{name: "constexpr" for name in ("A_GROUP", "OUT_BY_PAIR", "RELU_OUT", "TRANS_W", "MASK_A", "HAS_SCALE",
                                          "STORE_SIDE", "SUM_GROUP", "BLOCK_M", "BLOCK_K", "NUM_STAGES",
                                          "num_warps")})
    consts = dict(A_GROUP=group, OUT_BY_PAIR=by_pair, RELU_OUT=relu, TRANS_W=trans, MASK_A=masked,
                  HAS_SCALE=scaled, STORE_SIDE=masked or scaled, SUM_GROUP=sum_group, BLOCK_M=BLOCK_M, BLOCK_K=K,
                  NUM_STAGES=stages, num_warps=4)
    if group:
        consts["a_desc"] = None
    k = triton.compile(GluonASTSource(fn=GL.resident_gmm_kernel, signature=signature, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert k.asm["cubin"]
    # two programs per SM (228 KB): what makes it faster than gmm_kernel's one-slice-ahead pipeline
    assert k.metadata.shared <= 233472 // 2, (K, block_n, stages, masked, group, scaled, k.metadata.shared)
    print(K, block_n, stages, masked, group, scaled, k.metadata.shared)
"""


@pytest.mark.slow
def test_gluon_kernel_compiles_for_hopper():
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # real JIT functions
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "kernels"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(proc.stdout.strip().split("\n")) == 10, proc.stdout


def test_gluon_can_be_turned_off(monkeypatch):
    """MOEUT_GLUON=0 (or OVERRIDES["gluon"] = False) keeps a Hopper GPU's calls on gmm_kernel: the way out if a
    Triton release breaks the experimental Gluon API, and the benchmarks' A/B switch."""
    from moeut_kernels import grouped as GM

    if GM.GL is None:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    hopper = torch.device("cuda", 0)
    assert GM._has_wgmma(hopper)
    monkeypatch.setenv("MOEUT_GLUON", "0")
    assert not GM._has_wgmma(hopper)
    monkeypatch.setenv("MOEUT_GLUON", "1")
    monkeypatch.setitem(GM.OVERRIDES, "gluon", False)
    assert not GM._has_wgmma(hopper)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
hopper_only = pytest.mark.skipif(not HOPPER, reason="Gluon's wgmma kernel runs on sm_90 only (CPU: the compile "
                                                    "test above)")
E, P = 7, 3000      # experts and pairs of the GPU comparisons


def _ragged_plan(seed: int):
    """The routing plan of P pairs over E experts, the last one empty: ragged tiles past each expert's end and an
    unused tail of the tile list (the generator seeded first, for the inputs drawn after it)."""
    from moeut_kernels.routing import plan_from_expert_index

    torch.manual_seed(seed)
    return plan_from_expert_index(torch.randint(0, E - 1, (P,), device="cuda"), E, 128)


@hopper_only
@pytest.mark.parametrize("n, by_pair, relu, group, trans", [
    (1024, True, False, 0, False), (1536, False, True, 0, False), (1000, True, True, 0, False),
    (1024, True, False, 0, True), (1000, True, False, 0, True), (1024, True, False, 2, False),
    (1000, False, False, 3, False)])
def test_gluon_kernel_equals_gmm_kernel(n, by_pair, relu, group, trans):
    """Ragged experts (one empty, tiles past each end, the unused tail of the tile list), several column chunks
    (n = 1536: two programs per tile), a partial last slice (n = 1000); A sorted (group 0, by TMA) or gathered as
    rows pair // group (the attention O forward's rows, by pointer loads); W plain or transposed (the FF up
    input-gradient, whose A comes masked from the down input-gradient)."""
    from moeut_kernels import grouped as GM

    K = 128
    plan = _ragged_plan(0)
    a = torch.randn(P // group if group else P, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, *((n, K) if trans else (K, n)), device="cuda", dtype=torch.bfloat16) * K ** -0.5
    cfg = GM.gmm_config(n, K, torch.bfloat16, plan.block_m, device=a.device)
    assert cfg.gluon
    got, want = (torch.full((P, n), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(2))
    GM._gmm(a, group, w, trans, plan, got, by_pair, relu_out=relu, cfg=cfg)
    GM._gmm(a, group, w, trans, plan, want, by_pair, relu_out=relu, cfg=replace(cfg, gluon=False))
    assert not want.isnan().any()
    assert torch.equal(got, want)


@hopper_only
@pytest.mark.parametrize("n, K", [(1024, 128), (1536, 128), (1000, 128), (1024, 64), (512, 16)])
def test_gluon_masked_input_grad_equals_gmm_kernel(n, K):
    """A ReLU projection's input-gradient (W transposed, ReLU mask, side output), ragged experts as above; expert
    widths K of 4, 2 and 1 mask chunks. Outputs and side output bit for bit."""
    from moeut_kernels import grouped as GM

    plan = _ragged_plan(1)
    du = torch.randn(P, K, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(P, K, device="cuda", dtype=torch.bfloat16).relu_()      # about half the units masked
    w = torch.randn(E, n, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    cfg = GM.gmm_config(n, K, torch.bfloat16, plan.block_m, masked=True, device=du.device)
    assert cfg.gluon

    def run(cfg):
        out = torch.full((P, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        side = torch.full_like(du, float("nan"))
        GM._gmm(du, 0, w, True, plan, out, True, amask=h, cfg=cfg, side_out=side)
        return out, side

    got, want = run(cfg), run(replace(cfg, gluon=False, num_stages=3))
    assert not any(t.isnan().any() for t in want)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@hopper_only
@pytest.mark.parametrize("n, group", [(1024, 2), (1000, 3)])
def test_gluon_scaled_gathered_input_grad_equals_gmm_kernel(n, group):
    """The attention V input-gradient: gradient rows gathered (pair // group), W transposed, each output row times
    its pair's gate (exactly 0 on some pairs), the gated rows stored as the side output; ragged experts as above.
    Outputs and side output bit for bit."""
    from moeut_kernels import grouped as GM

    K = 128
    plan = _ragged_plan(2)
    grad = torch.randn(P // group, K, device="cuda", dtype=torch.bfloat16)
    gate = torch.rand(P, device="cuda", dtype=torch.bfloat16)
    gate[::17] = 0
    w = torch.randn(E, n, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    cfg = GM.gmm_config(n, K, torch.bfloat16, plan.block_m, device=grad.device)
    assert cfg.gluon

    def run(cfg):
        out = torch.full((P, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        side = torch.full((P, K), float("nan"), device="cuda", dtype=torch.bfloat16)
        GM._gmm(grad, group, w, True, plan, out, True, scale=gate, cfg=cfg, side_out=side)
        return out, side

    got, want = run(cfg), run(replace(cfg, gluon=False))
    assert not any(t.isnan().any() for t in want)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@hopper_only
@pytest.mark.parametrize("n, trans", [(1024, False), (1000, True)])
def test_gluon_atomic_sums(n, trans):
    """The σ-MoE MLP's summed launches with the atomic combine (grouped.atomic_sums: the Gluon kernel adds each row
    into its token's sum by bf16 atomics): the FF down forward (W plain) and up input-gradient (W transposed, a
    partial last slice), K distinct random experts per token, ragged tiles. Against float64 sums of the same bf16
    operands, a bound for bf16 sums rounded at each of the K adds; a row added twice or into another token's sum
    is off by O(1)."""
    from moeut_kernels import grouped as GM
    from moeut_kernels.routing import plan_from_expert_index

    torch.manual_seed(3)
    tokens, k, d_k = 1500, 6, 128
    plan = plan_from_expert_index(torch.rand(tokens, E, device="cuda").topk(k, dim=1).indices.reshape(-1), E, 128)
    a = torch.randn(plan.n_pairs, d_k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, *((n, d_k) if trans else (d_k, n)), device="cuda", dtype=torch.bfloat16) * d_k ** -0.5
    assert GM.gmm_config(n, d_k, torch.bfloat16, plan.block_m, device=a.device).gluon
    got = GM.atomic_sums(a, w, trans, plan, k)
    want = torch.zeros(tokens, n, device="cuda", dtype=torch.float64)
    bounds = plan.offsets.tolist()
    for e in range(E):
        seg = slice(bounds[e], bounds[e + 1])
        w_e = w[e].double().T if trans else w[e].double()
        want.index_add_(0, plan.order[seg] // k, a[seg].double() @ w_e)
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert got.dtype == torch.bfloat16 and err < 2e-2, err
