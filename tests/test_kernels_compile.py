"""The Triton expert kernels as torch.library custom ops: opcheck (schema, autograd registration, fake tensors,
AOT dispatch with dynamic shapes) and torch.compile(fullgraph=True) of a tiny MoEUT with the triton backend.

CPU only, under TRITON_INTERPRET=1 (set before the kernels are imported); the compile test uses the aot_eager
backend (Dynamo + AOTAutograd, no Inductor codegen), which is what decides graph breaks and fake-tensor shapes.
"""
from __future__ import annotations


from kernel_testing import DEVICE  # noqa: E402  (sets TRITON_INTERPRET before the kernels are imported)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from moeut_kernels import sigmoid_topk_route  # noqa: E402

BLOCK_M = 16


def _plan(n_rows: int = 37, n_groups: int = 2, n: int = 7, k: int = 3, seed: int = 0):
    """(gate, plan, each pair's expert [P]) of a seeded routing."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, n_groups, n, generator=gen).to(DEVICE)
    gate, expert_index, plan = sigmoid_topk_route(logits, k, BLOCK_M)
    return gate, plan, expert_index.reshape(-1).contiguous()


def _check(op, args) -> None:
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_route_and_plans():
    logits = torch.randn(37, 2, 7, device=DEVICE, requires_grad=True)
    _check(torch.ops.moeut.sigmoid_topk_route.default, (logits, 3, BLOCK_M))
    counts = torch.tensor([3, 0, 17, 1, 0, 40, 2], device=DEVICE)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    _check(torch.ops.moeut.plan.default, (offsets, int(counts.sum()), BLOCK_M))
    key = torch.randint(0, 8, (50,), dtype=torch.int16, device=DEVICE)      # 7 experts; 7 marks remote pairs
    _check(torch.ops.moeut.sorted_plan.default, (key, 7, BLOCK_M))


@pytest.mark.parametrize("layout", ["up_relu", "down", "down_plain", "narrow_sum"])
def test_opcheck_grouped_matmul(layout):
    gate, plan, _ = _plan()
    ptensors = (plan.order, plan.offsets, plan.tile_expert, plan.tile_start, BLOCK_M)
    n_rows, S = gate.shape
    gate_arg = gate.reshape(-1).clone().requires_grad_()
    if layout == "up_relu":      # gathered token rows -> sorted pairs, ReLU
        x = torch.randn(n_rows, 24, device=DEVICE, requires_grad=True)
        w = torch.randn(plan.n_experts, 24, 20, device=DEVICE, requires_grad=True)
        args = (x, w, None, *ptensors, S, 0, True)
    elif layout.startswith("down"):      # sorted pairs -> row sums, gate-weighted (wider: fused gate grad) or plain
        x = torch.randn(plan.n_pairs, 20, device=DEVICE, requires_grad=True)
        w = torch.randn(plan.n_experts, 20, 24, device=DEVICE, requires_grad=True)
        args = (x, w, gate_arg if layout == "down" else None, *ptensors, 0, S, False)
    else:                        # gathered rows -> sums narrower than the input (attention V: keeps the pairs)
        x = torch.randn(n_rows, 24, device=DEVICE, requires_grad=True)
        w = torch.randn(plan.n_experts, 24, 8, device=DEVICE, requires_grad=True)
        args = (x, w, gate_arg, *ptensors, S, 3, False)
    _check(torch.ops.moeut.grouped_matmul.default, args)
    out, pairs = torch.ops.moeut.grouped_matmul(*args)
    assert pairs.shape == ((plan.n_pairs, 8) if layout == "narrow_sum" else (0,))
    g = torch.randn(out.shape, device=DEVICE)
    y = out.detach() if layout == "up_relu" else None
    bargs = (g, x.detach(), w.detach(), args[2].detach() if args[2] is not None else None, y,
             pairs.detach() if pairs.numel() else None, *ptensors, args[-3], args[-2], True, True,
             args[2] is not None)
    _check(torch.ops.moeut.grouped_matmul_backward.default, bargs)


def test_opcheck_grouped_matmul_expert_pair_tiles():
    """Two pairs per row (K = 2) into wide summed rows with the experts given: the expert-pair tile forward
    (attention O), and its backward (the per-pair launches)."""
    gate, plan, experts = _plan(k=2)
    ptensors = (plan.order, plan.offsets, plan.tile_expert, plan.tile_start, BLOCK_M)
    n_rows, S = gate.shape
    gate_arg = gate.reshape(-1).clone().requires_grad_()
    x = torch.randn(n_rows * S // 2, 20, device=DEVICE, requires_grad=True)        # one row per (token, group)
    w = torch.randn(plan.n_experts, 20, 24, device=DEVICE, requires_grad=True)
    args = (x, w, gate_arg, *ptensors, 2, S, False, None, None, None, experts)
    _check(torch.ops.moeut.grouped_matmul.default, args)


@pytest.mark.parametrize("need_x,combine", [(True, "buffer"), (False, "buffer"), (True, "atomic")])
def test_opcheck_gated_mlp(need_x, combine):
    """The σ-MoE MLP op and its backward (without the input gradient: the gate's gradient by a torch pass), with
    either combine (atomic: fp32 atomics in the interpreter)."""
    gate, plan, _ = _plan(n_groups=1)
    ptensors = (plan.order, plan.offsets, plan.tile_expert, plan.tile_start, BLOCK_M)
    n_rows, S = gate.shape
    x = torch.randn(n_rows, 24, device=DEVICE, requires_grad=need_x)
    w1 = torch.randn(plan.n_experts, 24, 20, device=DEVICE, requires_grad=True)
    w2 = torch.randn(plan.n_experts, 20, 24, device=DEVICE, requires_grad=True)
    args = (x, w1, w2, gate.reshape(-1).clone().requires_grad_(), *ptensors, S, S, None, None, None, combine)
    _check(torch.ops.moeut.gated_mlp.default, args)
    out, h = torch.ops.moeut.gated_mlp(*args)
    assert h.shape == (plan.n_pairs, 20)
    g = torch.randn(out.shape, device=DEVICE)
    bargs = (g, x.detach(), w1.detach(), w2.detach(), args[3].detach(), h.detach(), *ptensors, S, S, need_x, True,
             True, True, None, None, None, combine)
    _check(torch.ops.moeut.gated_mlp_backward.default, bargs)


@pytest.mark.slow
def test_compile_fullgraph_tiny_moeut_matches_eager():
    """torch.compile(fullgraph=True) traces the whole model (routing + all four expert projections, the expert
    counts) in one graph, and gives the eager loss, gradients and counts."""
    from moeut_ds import LanguageModel, get_preset
    torch.manual_seed(0)
    cfg = get_preset("moeut-tiny")
    model = LanguageModel(cfg, expert_backend="triton").to(DEVICE).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), device=DEVICE)
    params = list(model.parameters())

    def loss_grads(m):
        out = m(tokens, return_expert_counts=True)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), tokens.flatten()) + out.reg_loss
        return loss.detach(), torch.autograd.grad(loss, params), out.expert_counts

    torch._dynamo.reset()
    l_eager, g_eager, c_eager = loss_grads(model)
    l_comp, g_comp, c_comp = loss_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-5, atol=1e-6)
    assert len(c_comp) == cfg.n_distinct_layers and all(          # the usage statistics stay inside the graph
        c.keys() == e.keys() == cfg.routers.keys() and all(torch.equal(c[k], e[k]) for k in c)
        for c, e in zip(c_comp, c_eager))
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
