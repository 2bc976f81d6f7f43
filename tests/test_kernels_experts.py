"""Triton expert kernels (moeut_kernels + the "triton" backend) against the reference backend.

Runs the kernels on CPU under TRITON_INTERPRET=1 (set here, before the kernels are imported). Tiny shapes, dims and
token counts that are multiples of no block size, 16-row tiles so that experts span several tiles.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import zlib
from pathlib import Path

from kernel_testing import DEVICE, REF, TOL, rel_err, tiny_moeut  # noqa: E402  (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

pytest.importorskip("triton")

from moeut_ds.experts import get_backend  # noqa: E402
from moeut_ds.experts.interface import Routing, sigmoid_topk, sort_pairs  # noqa: E402
from moeut_ds.experts.triton_backend import TritonBackend  # noqa: E402
from moeut_kernels import plan_from_expert_index, sigmoid_topk_route  # noqa: E402


def make_logits(n_rows: int, n_groups: int, n: int, bias: str = "none", gen=None) -> torch.Tensor:
    """Router logits with controlled load: 'none' random, 'uneven' skewed, 'empty' half the experts never chosen,
    'one' expert 0 wins everywhere."""
    logits = torch.randn(n_rows, n_groups, n, generator=gen)
    if bias == "uneven":
        logits += torch.linspace(0, 3, n)
    elif bias == "empty":
        logits[..., n // 2:] -= 50.0
    elif bias == "one":
        logits[..., 0] += 50.0
    return logits.to(DEVICE)


def reference_routing(logits: torch.Tensor, expert_index: torch.Tensor) -> Routing:
    """The reference's routing for the same chosen experts (slot order is free; the reference's topk is unsorted)."""
    n_rows, n_groups, n = logits.shape
    k = expert_index.shape[1] // n_groups
    local = expert_index.view(n_rows, n_groups, k) - torch.arange(n_groups, device=logits.device).view(1, -1, 1) * n
    gate = torch.sigmoid(logits).gather(2, local).reshape(n_rows, n_groups * k)
    order, offsets = sort_pairs(expert_index, n_groups * n)
    return Routing(gate=gate, expert_index=expert_index, n_experts=n_groups * n, order=order, offsets=offsets)


# ---------------------------------------------------------------- routing

@pytest.mark.parametrize("n_rows,n_groups,n,k,bias", [
    (37, 1, 7, 3, "none"), (45, 4, 5, 2, "uneven"), (29, 1, 6, 1, "one"), (33, 2, 6, 6, "none"),
    (50, 1, 12, 4, "empty"), (1, 3, 4, 2, "none")])
@pytest.mark.parametrize("block_m", [16, 32])
def test_route_matches_reference(n_rows, n_groups, n, k, bias, block_m):
    logits = make_logits(n_rows, n_groups, n, bias)
    gate, expert_index, plan = sigmoid_topk_route(logits, k, block_m)
    ref_gate, ref_index = sigmoid_topk(logits, k)
    S = n_groups * k
    # same experts and gates per row (as sets: slot order is the backends' own)
    mine = sorted(zip(expert_index.tolist()[0], gate.tolist()[0]))
    assert expert_index.shape == (n_rows, S) and expert_index.dtype == torch.int64
    for r in range(n_rows):
        a = sorted(zip(expert_index[r].tolist(), gate[r].tolist()))
        b = sorted(zip(ref_index[r].tolist(), ref_gate[r].tolist()))
        assert [e for e, _ in a] == [e for e, _ in b], r
        torch.testing.assert_close(torch.tensor([g for _, g in a]), torch.tensor([g for _, g in b]))
    assert mine
    order, offsets = sort_pairs(expert_index, n_groups * n)
    assert torch.equal(plan.order, order) and torch.equal(plan.offsets, offsets)
    _assert_tiles_cover_each_expert_once(plan, n_rows * S)


def _assert_tiles_cover_each_expert_once(plan, n_local: int) -> None:
    """The tile list covers each expert's sorted positions [0, n_local) exactly once, never straddling experts,
    with the unused tiles (expert E) only at the end."""
    E, offsets, block_m = plan.n_experts, plan.offsets.cpu(), plan.block_m
    covered = torch.zeros(n_local, dtype=torch.int64)
    for e, s in zip(plan.tile_expert.tolist(), plan.tile_start.tolist()):
        if e == E:
            continue
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        assert lo <= s < hi and (s - lo) % block_m == 0
        covered[s:min(s + block_m, hi)] += 1
    assert torch.equal(covered, torch.ones_like(covered))
    used = (plan.tile_expert < E).tolist()
    assert used == sorted(used, reverse=True)


@pytest.mark.parametrize("n_pairs,n_experts", [(0, 5), (1, 1), (300, 7), (5000, 40), (777, 300)])
def test_plan_from_expert_index_with_remote_pairs(n_pairs, n_experts):
    """Offsets by binary search over the sorted keys (expert_starts_kernel) equal torch's searchsorted; keys equal
    to E (remote pairs) sort last and no tile covers them; empty experts get no tile."""
    gen = torch.Generator().manual_seed(n_pairs + n_experts)
    ids = torch.randint(0, n_experts // 2 + 1, (n_pairs,), generator=gen) * 2     # every odd expert empty
    ids = torch.where(torch.rand(n_pairs, generator=gen) < 0.2, n_experts, ids.clamp(max=n_experts))
    plan = plan_from_expert_index(ids.to(DEVICE), n_experts, 16)
    sorted_ids, order = torch.sort(ids, stable=True)
    want = torch.searchsorted(sorted_ids, torch.arange(n_experts + 1))
    assert torch.equal(plan.offsets.cpu(), want) and torch.equal(plan.order.cpu(), order)
    _assert_tiles_cover_each_expert_once(plan, int(want[-1]))


def _assert_picks_by_value_then_index(logits: torch.Tensor, k: int, gate: torch.Tensor,
                                      expert_index: torch.Tensor) -> None:
    """Each group's picks are its k largest logits, the lowest index first among equal ones, with their gates."""
    n_rows, n_groups, n = logits.shape
    for r in range(n_rows):
        for grp in range(n_groups):
            v = logits[r, grp].tolist()
            want = sorted(range(n), key=lambda i: (-v[i], i))[:k]     # by value, then lowest index
            got = (expert_index[r, grp * k:(grp + 1) * k] - grp * n).tolist()
            assert got == want, (r, grp, got, want)
            torch.testing.assert_close(gate[r, grp * k:(grp + 1) * k].cpu(), torch.sigmoid(torch.tensor(v)[want]))


@pytest.mark.parametrize("bf16_values", [False, True])
def test_route_ties_signs_and_infinities(bf16_values):
    """Lowest index wins ties; negative, zero, -0.0 and -inf logits keep their order (the kernel compares packed
    integer bits); rows that are all -inf (full expert dropout) still pick k experts, the lowest ids. With every
    logit a bf16 value (what a bf16 router GEMM gives) the kernel packs into int32 instead of int64: same picks."""
    logits = torch.tensor([[0.5, -1.0, 0.5, -0.0, 0.0, -1.0, 3.0, 0.5],
                           [-2.0, -0.0, -1e-30, 0.0, float("-inf"), -1e30, -0.5, -7.0],
                           [float("-inf")] * 8,
                           [1.0] * 8]).view(4, 1, 8)
    logits = torch.cat([logits, logits.flip(-1)], 1)                   # a second group, other positions
    if bf16_values:
        logits = logits.bfloat16().float()
    assert (logits.view(torch.int32) & 0xFFFF).any() != bf16_values    # which packing the kernel takes
    logits = logits.to(DEVICE)
    gate, expert_index, _ = sigmoid_topk_route(logits, 3, 16)
    _assert_picks_by_value_then_index(logits, 3, gate, expert_index)


@pytest.mark.parametrize("bf16_values", [False, True])
def test_route_many_ties_at_the_ff_width(bf16_values):
    """387 experts (the 244M FF router), k = 16, logits from a coarse grid so every row has many exact ties around
    its k-th value, negatives included; bf16-valued logits take the int32 packing, the others the int64 one."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randint(-12, 13, (40, 1, 387), generator=gen).float() / 8
    if not bf16_values:
        logits = logits + torch.randn(logits.shape, generator=gen) * 1e-6 * (torch.rand(logits.shape, generator=gen)
                                                                              < 0.5)
    assert (logits.view(torch.int32) & 0xFFFF).any() != bf16_values
    gate, expert_index, _ = sigmoid_topk_route(logits.to(DEVICE), 16, 32)
    _assert_picks_by_value_then_index(logits, 16, gate, expert_index)


def test_route_backward_matches_reference():
    logits = make_logits(41, 2, 9, "uneven").requires_grad_()
    gate, expert_index, _ = sigmoid_topk_route(logits, 3, 16)
    w = torch.randn_like(gate)
    (g_mine,) = torch.autograd.grad((gate * w).sum(), logits)
    ref = reference_routing(logits, expert_index)
    (g_ref,) = torch.autograd.grad((ref.gate * w).sum(), logits)
    torch.testing.assert_close(g_mine, g_ref)


# ---------------------------------------------------------------- the four projections

def run_layout(backend, layout, logits, x, w, expert_index, routing):
    """One projection through `backend`; returns (output, routing used)."""
    n_rows, n_groups, n = logits.shape
    k = expert_index.shape[1] // n_groups
    if layout == "ff_up":
        return backend.matmul(x, w, routing, in_group=k, out_group=None, activation="relu")
    if layout == "ff_mlp":          # w is W1 of the whole σ-MoE MLP; W2 is fixed (its gradient: test_mlp_*)
        return backend.mlp(x, w, mlp_w2(w), routing)
    if layout == "ff_down":
        return backend.matmul(x, w, routing, in_group=None, out_group=k)
    if layout == "att_v":
        return backend.matmul(x, w, routing, in_group=n_groups * k, out_group=k)
    if layout == "att_o":
        return backend.matmul(x, w, routing, in_group=k, out_group=n_groups * k)
    raise AssertionError(layout)


def mlp_w2(w1: torch.Tensor) -> torch.Tensor:
    """A fixed W2 [E, d_e, d] for W1 [E, d, d_e], exact in bf16 (so the fp32 reference sees the same values)."""
    n, d, d_e = w1.shape
    w2 = torch.randn(n, d_e, d, generator=torch.Generator().manual_seed(d * d_e + n)) / d_e ** 0.5
    return w2.bfloat16().to(w1.device, w1.dtype)


LAYOUTS = {  # name: (groups, experts per group, k, d_in, d_out, x rows as a function of (N, P))
    "ff_up": (1, 7, 3, 40, 24, lambda N, P, G, k: N),
    "ff_mlp": (1, 7, 3, 40, 24, lambda N, P, G, k: N),      # d_out: the hidden width d_e
    "ff_down": (1, 7, 3, 24, 40, lambda N, P, G, k: P),
    "att_v": (3, 5, 2, 40, 24, lambda N, P, G, k: N),
    "att_o": (3, 5, 2, 24, 40, lambda N, P, G, k: N * G),
}


def check_against_reference(layout, dtype, n_rows, bias="none", k=None, n=None, seed=0, need=("x", "w", "logits"),
                            widths=None):
    """Output and the gradients w.r.t. `need` (a subset of x, w, logits; the others do not require grad, which
    selects other backward paths) against the fp32 reference. widths: (d_in, d_out) instead of the layout's."""
    gen = torch.Generator().manual_seed(seed)
    G, n_def, k_def, d_in, d_out, rows = LAYOUTS[layout]
    d_in, d_out = widths or (d_in, d_out)
    n, k = n or n_def, k or k_def
    logits = make_logits(n_rows, G, n, bias, gen).requires_grad_("logits" in need)
    P = n_rows * G * k
    x = torch.randn(rows(n_rows, P, G, k), d_in, generator=gen).to(DEVICE, dtype).requires_grad_("x" in need)
    w = (torch.randn(G * n, d_in, d_out, generator=gen) / d_in ** 0.5).to(DEVICE, dtype).requires_grad_("w" in need)
    tb = TritonBackend()
    routing = tb.route(logits, k)
    y = run_layout(tb, layout, logits, x, w, routing.expert_index, routing)
    assert y.dtype == dtype
    gy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    leaves = {"x": x, "w": w, "logits": logits}
    grads = torch.autograd.grad(y, [leaves[name] for name in need], gy, allow_unused=True)
    # reference in fp32 on the same (bf16-rounded) values, same chosen experts
    logits_r = logits.detach().clone().requires_grad_()
    x_r = x.detach().float().requires_grad_()
    w_r = w.detach().float().requires_grad_()
    ref_routing = reference_routing(logits_r, routing.expert_index)
    y_r = run_layout(REF, layout, logits_r, x_r, w_r, routing.expert_index, ref_routing)
    leaves_r = {"x": x_r, "w": w_r, "logits": logits_r}
    grads_r = torch.autograd.grad(y_r, [leaves_r[name] for name in need], gy.float(), allow_unused=True)
    tol = TOL[dtype]
    assert rel_err(y, y_r) < tol, ("out", rel_err(y, y_r))
    for name, a, b in zip(need, grads, grads_r):
        if b is None:        # FF up does not use the gate
            assert a is None and layout == "ff_up"
            continue
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_reference(layout, dtype):
    check_against_reference(layout, dtype, n_rows=37, seed=zlib.crc32(f"{layout}{dtype}".encode()) % 1000)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", ["uneven", "empty", "one_k1", "k_eq_n"])
def test_layout_load_patterns(layout, case):
    n_rows = 45
    if case == "uneven":
        check_against_reference(layout, torch.float32, n_rows, bias="uneven", seed=1)
    elif case == "empty":
        check_against_reference(layout, torch.float32, n_rows, bias="empty", n=8, k=2, seed=2)
    elif case == "one_k1":   # every pair on expert 0 of its group: several full tiles of one expert, k = 1
        check_against_reference(layout, torch.float32, n_rows, bias="one", k=1, seed=3)
    else:                    # k = n: every expert gets every row
        check_against_reference(layout, torch.float32, n_rows, n=4, k=4, seed=4)


@pytest.mark.parametrize("layout", ["ff_down", "att_v", "att_o"])
@pytest.mark.parametrize("need", [("w",), ("w", "logits")])
def test_summed_backward_without_input_grad(layout, need):
    """Without the input gradient the weight gradient scales the gathered grad rows itself (no input-gradient
    launch stores the gated operand), unless the fused gate gradient runs that launch anyway."""
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(layout, dtype, n_rows=29, bias="uneven", seed=11, need=need)


class _MoeutOperandWidths(TorchDispatchMode):
    """Records (op, shape) of every floating tensor with rows (>= 2 dims) that reaches a moeut:: matmul op
    (grouped_matmul, gated_mlp and their backward ops; the routing reads its logits row by row, masked)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "moeut" and ("matmul" in func.name() or "mlp" in func.name()):
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2:
                    self.seen.append((func.name(), tuple(t.shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unaligned_widths_reach_the_kernels_padded(layout):
    """Widths that are no multiple of 16 elements (MoEUT-44M's d = 412, d_h = 82) reach every moeut:: matmul op,
    forward and backward, zero-padded to one (Triton vectorises only rows whose stride it knows to be a multiple
    of 16), and the outputs and gradients still match the fp32 reference on the unpadded shapes."""
    for dtype, widths in ((torch.bfloat16, (13, 40)), (torch.float32, (24, 7))):
        with _MoeutOperandWidths() as mode:
            y, _ = check_against_reference(layout, dtype, n_rows=31, bias="uneven", widths=widths,
                                           seed=zlib.crc32(layout.encode()) % 1000)
        d_out = widths[0] if layout == "ff_mlp" else widths[1]
        assert y.shape[1] == d_out
        ops = {name for name, _ in mode.seen}
        assert any(name.endswith("backward") for name in ops), ops     # the backward ops were seen too
        unaligned = [(name, shape) for name, shape in mode.seen if shape[-1] % 16]
        assert not unaligned, unaligned


# bf16 atomics exist on GPUs only (the interpreter has none): tests/test_kernels_gpu_compile.py runs that case.
MLP_CASES = [(torch.float32, "buffer"), (torch.bfloat16, "buffer"), (torch.float32, "atomic")]


@pytest.mark.parametrize("dtype,combine", MLP_CASES)
def test_mlp_matches_reference(dtype, combine):
    """The σ-MoE MLP and its gradients, with either way of summing a row's pairs (the atomic one adds into the
    output rows), uneven loads, experts spanning several tiles and a row count no tile size divides."""
    gen = torch.Generator().manual_seed(5 if dtype == torch.float32 else 6)
    n_rows, n, k, d, d_e = 53, 9, 3, 40, 24
    logits = make_logits(n_rows, 1, n, "uneven", gen).requires_grad_()
    x = torch.randn(n_rows, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    w1 = (torch.randn(n, d, d_e, generator=gen) / d ** 0.5).to(DEVICE, dtype).requires_grad_()
    w2 = (torch.randn(n, d_e, d, generator=gen) / d_e ** 0.5).to(DEVICE, dtype).requires_grad_()
    tb = TritonBackend(combine=combine)
    routing = tb.route(logits, k)
    y = tb.mlp(x, w1, w2, routing)
    gy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, [x, w1, w2, logits], gy)
    logits_r = logits.detach().clone().requires_grad_()
    leaves = [t.detach().float().requires_grad_() for t in (x, w1, w2)]
    y_r = REF.mlp(*leaves, reference_routing(logits_r, routing.expert_index))
    grads_r = torch.autograd.grad(y_r, leaves + [logits_r], gy.float())
    assert rel_err(y, y_r) < TOL[dtype]
    for a, b in zip(grads, grads_r):
        assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("window_experts", [None, 4])
def test_atomic_sums_in_any_window_order(window_experts, monkeypatch):
    """grouped.atomic_sums adds every pair's row into its token's sum whatever the tiles' window order (all experts
    at once, or groups of experts: OVERRIDES["window_experts"], the benchmark's knob, which reaches window_tiles):
    against the buffer + group_sum, W plain and transposed (fp32: the interpreter has no bf16 atomics)."""
    from moeut_kernels import grouped
    from moeut_kernels.routing import plan_from_expert_index

    groups = []
    window_tiles = grouped.window_tiles
    monkeypatch.setattr(grouped, "window_tiles", lambda plan, g=None: (groups.append(g), window_tiles(plan, g))[1])
    if window_experts:
        monkeypatch.setitem(grouped.OVERRIDES, "window_experts", window_experts)
    gen = torch.Generator().manual_seed(11)
    tokens, k, n_experts, d_k, n = 83, 3, 10, 24, 40
    plan = plan_from_expert_index(torch.rand(tokens, n_experts, generator=gen).topk(k, dim=1).indices.reshape(-1)
                                  .to(DEVICE), n_experts, 16)
    a = torch.randn(plan.n_pairs, d_k, generator=gen).to(DEVICE)
    for trans in (False, True):
        w = torch.randn(n_experts, *((n, d_k) if trans else (d_k, n)), generator=gen).to(DEVICE)
        buf = torch.empty(plan.n_pairs, n, device=DEVICE)
        grouped._gmm(a, 0, w, trans, plan, buf, True)
        torch.testing.assert_close(grouped.atomic_sums(a, w, trans, plan, k), grouped.group_sum(buf, k))
    assert groups == [window_experts] * 2


def test_atomic_combine_needs_fixed_groups():
    """The atomic combines add into row pair // group: explicit rows or remote pairs are refused early."""
    from moeut_kernels import gated_mlp

    logits = make_logits(12, 1, 5)
    tb = TritonBackend()
    routing = tb.route(logits, 2)
    x, w1, w2 = torch.randn(12, 16), torch.randn(5, 16, 16), torch.randn(5, 16, 16)
    plan = tb._plan(routing)
    with pytest.raises(ValueError, match="fixed groups"):
        gated_mlp(x, w1, w2, plan, routing.gate, in_group=2, out_group=2, combine="atomic",
                  local=torch.ones(24, dtype=torch.bool))
    with pytest.raises(ValueError, match="use one of"):
        gated_mlp(x, w1, w2, plan, routing.gate, in_group=2, out_group=2, combine="atomics")


def test_routing_from_reference_backend_is_accepted():
    """A plain Routing (no tile list) still works: the backend builds the tiles itself."""
    gen = torch.Generator().manual_seed(7)
    logits = make_logits(30, 1, 6, "none", gen)
    x = torch.randn(30, 40, generator=gen).to(DEVICE)
    w = torch.randn(6, 40, 24, generator=gen).to(DEVICE)
    routing = REF.route(logits, 2)
    y = TritonBackend().matmul(x, w, routing, in_group=2, out_group=None, activation="relu")
    torch.testing.assert_close(y, REF.matmul(x, w, routing, in_group=2, out_group=None, activation="relu"))


def test_routing_from_given_experts_matches_route():
    """routing(gate, expert_index) (the expert-parallel entry) gives the same metadata as route()."""
    logits = make_logits(39, 2, 7, "uneven")
    tb = TritonBackend()
    a = tb.route(logits, 3)
    b = tb.routing(a.gate, a.expert_index, 14)
    for name in ("order", "offsets"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.plan.tile_expert, b.plan.tile_expert) and torch.equal(a.plan.tile_start, b.plan.tile_start)


@pytest.mark.parametrize("bias", ["none", "uneven", "empty"])
@pytest.mark.parametrize("group_experts", [None, 2, 5])
def test_window_tiles_orders_by_first_pair(bias, group_experts):
    """routing.window_tiles: the same tiles sorted by their group of experts (all experts by default), then by
    their first pair id, unused tiles (and remote pairs, which no tile covers) last: against an argsort of the tile
    list."""
    from moeut_kernels.routing import plan_from_expert_index, window_tiles

    gen = torch.Generator().manual_seed(len(bias))
    for n_rows, n_groups, n, k in ((300, 1, 7, 3), (97, 3, 5, 2), (150, 2, 12, 3)):   # 24 experts: two blocks
        logits = make_logits(n_rows, n_groups, n, bias, gen)
        expert_index = TritonBackend().route(logits, k).expert_index.clone()
        E = n_groups * n
        expert_index[expert_index == 1] = E             # pairs held by another rank
        plan = plan_from_expert_index(expert_index, E, 16)
        got = window_tiles(plan, group_experts)
        first = plan.order[plan.tile_start.clamp(0, plan.n_pairs - 1).long()]
        key = first + (plan.tile_expert // (group_experts or E)) * plan.n_pairs
        perm = torch.argsort(torch.where(plan.tile_expert < E, key, E * plan.n_pairs), stable=True)
        assert torch.equal(got.tile_expert, plan.tile_expert[perm])
        assert torch.equal(got.tile_start, plan.tile_start[perm])
        if group_experts is None:          # (with groups, 'empty' leaves one used expert per group: no change)
            assert not torch.equal(got.tile_start, plan.tile_start)    # the order did change
        assert got.order is plan.order and got.offsets is plan.offsets


@pytest.mark.parametrize("by_descriptor", [False, True])
def test_pair_matmul_sums_both_experts_of_a_row(by_descriptor):
    """pair_tiles: each row's two pairs (2r, 2r+1) summed with their gates, K not a power of two, several column
    slices, unused tiles and experts with no row; W's tiles by pointers or by TMA descriptor (then the rows past
    K belong to the next expert and the last slice's columns lie past N: both must stay out of the sums)."""
    from moeut_kernels import grouped
    from moeut_kernels.pair_tiles import pair_matmul, pair_plan

    gen = torch.Generator().manual_seed(31)
    n_rows, G, n, K, N = 41, 3, 6, 20, 72
    logits = make_logits(n_rows, G, n, "uneven", gen)
    routing = TritonBackend().route(logits, 2)
    experts, gate = routing.expert_index.reshape(-1).contiguous(), routing.gate.reshape(-1).contiguous()
    P = experts.numel()
    plan = pair_plan(experts, G, G * n, 16)
    assert plan.n_experts == G * n * (n - 1) // 2
    a = torch.randn(P // 2, K, generator=gen).to(DEVICE)
    w = torch.randn(G * n, K, N, generator=gen).to(DEVICE)
    out = torch.full((P // 2, N), float("nan"), device=DEVICE)
    descriptor = grouped._descriptor if by_descriptor else None
    pair_matmul(a, w, plan, experts, gate, out, "ieee", descriptor)
    if by_descriptor:
        assert descriptor(w, w.shape[0] * K, [32, 32]) is not None       # the descriptor path did run
    products = gate[:, None] * torch.einsum("pk,pkn->pn", a.repeat_interleave(2, 0), w[experts])
    torch.testing.assert_close(out, products.view(P // 2, 2, N).sum(1), rtol=1e-5, atol=1e-5)


def test_grouped_matmul_rejects_experts_of_another_routing():
    """experts must give one expert per pair of the plan: a routing's expert_index of another size is named."""
    from moeut_kernels import grouped_matmul

    gen = torch.Generator().manual_seed(5)
    routing = TritonBackend().route(make_logits(9, 2, 4, "none", gen), 2)
    x = torch.randn(18, 8, device=DEVICE)
    w = torch.randn(8, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="experts has 12 entries, expected one per pair \\(36\\)"):
        grouped_matmul(x, w, routing.plan, in_group=2, out_group=4, gate=routing.gate,
                       experts=routing.expert_index[:3])


@pytest.mark.parametrize("layout", ["att_v", "att_o"])
def test_expert_pair_tiles_replace_the_per_pair_launch(layout, monkeypatch):
    """SwitchHead's O forward (K_A = 2, wide rows) runs as one expert-pair tile launch and gives the per-pair
    path's output and gradients (both within tolerance of the fp32 reference in check_against_reference; to
    rounding of each other); OVERRIDES["pair_tiles"] = False keeps the per-pair launch. V (narrow rows), and
    K_A = 1 or 3, never take them."""
    from moeut_kernels import _triton, grouped

    launches = []
    kernel = _triton.pair_gmm_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(_triton, "pair_gmm_kernel", Spy())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        runs = []
        for pair_tiles in (True, False):
            launches.clear()
            monkeypatch.setitem(grouped.OVERRIDES, "pair_tiles", pair_tiles)
            runs.append(check_against_reference(layout, dtype, 45, bias="uneven", seed=21))
            assert len(launches) == (1 if pair_tiles and layout == "att_o" else 0)
        (y1, g1), (y0, g0) = runs
        assert rel_err(y1, y0) < tol
        for a, b in zip(g1, g0):
            assert rel_err(a, b) < tol
    monkeypatch.delitem(grouped.OVERRIDES, "pair_tiles")
    launches.clear()
    for k in (1, 3):
        check_against_reference(layout, torch.float32, 45, k=k, seed=22)
    assert not launches


@pytest.mark.parametrize("layout", ["att_v", "att_o", "ff_up", "ff_mlp"])
def test_window_order_gives_the_same_outputs(layout, monkeypatch):
    """Every launch with gathered rows in window tile order (forced) equals expert order bitwise, gradients
    included: only the order in which tiles run changes."""
    from moeut_kernels import grouped

    reordered = []       # launches whose tile order window_tiles changed
    window_tiles = grouped.window_tiles

    def spy(plan):
        got = window_tiles(plan)
        reordered.append(not torch.equal(got.tile_start, plan.tile_start))
        return got

    monkeypatch.setattr(grouped, "window_tiles", spy)
    runs = []
    for window in (True, False):
        monkeypatch.setitem(grouped.OVERRIDES, "window_order", window)
        runs.append(check_against_reference(layout, torch.bfloat16, 61, bias="uneven", seed=12))
    assert any(reordered)
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b)


def test_window_order_policy(monkeypatch):
    """The default: window order only for gathered A, one output column block, and weights within half of L2
    (the attention's V forward and O input-gradient at 244M and 1B, not the FF's 100 MB of weights, nor an
    attention with 54 MiB of weights, where the H200 sweep found the orders tied); never off CUDA."""
    from moeut_kernels import grouped

    monkeypatch.setattr(grouped, "_l2_bytes", lambda device: 60 * 2 ** 20)        # the H200's
    gpu, cfg = torch.device("cuda", 0), grouped.TileConfig(128, 64, 4, 3)
    att_244m = torch.empty(4 * 10, 1024, 128, dtype=torch.bfloat16, device="meta")    # 10 MiB
    att_1b = torch.empty(6 * 12, 1536, 128, dtype=torch.bfloat16, device="meta")      # 27 MiB
    att_wide = torch.empty(6 * 24, 1536, 128, dtype=torch.bfloat16, device="meta")    # 54 MiB
    ff_w = torch.empty(387, 1024, 128, dtype=torch.bfloat16, device="meta")           # 97 MiB
    assert grouped._window_order(gpu, 8, att_244m, 128, cfg)
    assert grouped._window_order(gpu, 12, att_1b, 128, cfg)
    assert not grouped._window_order(gpu, 12, att_wide, 128, cfg)
    assert not grouped._window_order(gpu, 8, ff_w, 128, cfg)
    assert not grouped._window_order(gpu, 8, att_244m, 1024, cfg)     # a wide output: weight reuse matters
    assert not grouped._window_order(gpu, 0, att_244m, 128, cfg)      # sorted A: nothing gathered
    assert not grouped._window_order(torch.device("cpu"), 8, att_244m, 128, cfg)
    monkeypatch.setitem(grouped.OVERRIDES, "window_order", False)
    assert not grouped._window_order(gpu, 8, att_244m, 128, cfg)


def test_atomic_window_groups_policy(monkeypatch):
    """The atomic sums' window order: all experts at once while their weights fit half of L2 or exceed twice L2,
    else the fewest groups of experts whose weights fit half of L2 (the FF 244M: 4 groups of 97 experts; the FF
    1B's 212 MiB stays one group, where the H200 sweep found 8 groups slower); never groups off CUDA."""
    from moeut_kernels import grouped

    monkeypatch.setattr(grouped, "_l2_bytes", lambda device: 60 * 2 ** 20)        # the H200's
    gpu = torch.device("cuda", 0)
    ff_244m = torch.empty(387, 128, 1024, dtype=torch.bfloat16, device="meta")       # 97 MiB
    ff_1b = torch.empty(565, 128, 1536, dtype=torch.bfloat16, device="meta")         # 212 MiB
    att_1b = torch.empty(6 * 12, 1536, 128, dtype=torch.bfloat16, device="meta")     # 27 MiB
    assert grouped._window_experts(gpu, ff_244m) == 97
    assert grouped._window_experts(gpu, ff_244m.float()) is None                     # 194 MiB > twice L2
    assert grouped._window_experts(gpu, ff_1b) is None
    assert grouped._window_experts(gpu, att_1b) is None
    assert grouped._window_experts(torch.device("cpu"), ff_244m) is None
    monkeypatch.setitem(grouped.OVERRIDES, "window_experts", 50)
    assert grouped._window_experts(gpu, ff_1b) == 50


def test_deterministic_bitwise():
    """Every kernel (no atomics on floats) repeats bitwise, gradients included."""
    runs = [check_against_reference("att_v", torch.bfloat16, 45, bias="uneven", seed=9) for _ in range(2)]
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_weight_grad_row_splits(layout, splits, monkeypatch):
    """Weight gradients with each expert's rows cut into chunks (as on GPUs for the attention shapes) equal the
    reference and repeat bitwise: one expert with several chunks' worth of rows, uneven loads, empty chunks."""
    from moeut_kernels import grouped
    monkeypatch.setitem(grouped.OVERRIDES, "wgrad_splits", splits)
    check_against_reference(layout, torch.float32, 45, bias="one", k=1, seed=11)   # 45 rows on one expert
    runs = [check_against_reference(layout, torch.bfloat16, 150, bias="uneven", seed=12) for _ in range(2)]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("need,gated", [("x_and_w", False), ("w_only", False), ("x_only", False),
                                        ("x_and_w", True), ("w_only", True), ("x_only", True), ("none", True)])
def test_relu_backward_paths(need, gated, resident, monkeypatch):
    """The up projection's ReLU gradient mask reaches both gradients on every path. A ReLU projection: applied in
    the resident input-gradient launch, which stores grad * mask for the weight gradient (x and W), or in one torch
    pass first (W only, or configs without a resident A tile). Gated (the whole σ-MoE MLP, gate * relu(x W1) then
    W2): the down projection's input-gradient epilogue applies the mask and writes the gate's gradient
    <gate dh, h> / gate^2, resident or not, whichever gradients are needed."""
    from moeut_kernels import grouped
    if not resident:
        monkeypatch.setitem(grouped.OVERRIDES, "gmm", {"a_resident": False})
    gen = torch.Generator().manual_seed(14)
    n_rows, n, k, d, d_e = 45, 7, 3, 40, 24
    logits = make_logits(n_rows, 1, n, "uneven", gen).requires_grad_(gated)
    x = torch.randn(n_rows, d, generator=gen).to(DEVICE).requires_grad_(need in ("x_and_w", "x_only"))
    w = (torch.randn(n, d, d_e, generator=gen) / d ** 0.5).to(DEVICE).requires_grad_(need in ("x_and_w", "w_only"))
    layout = "ff_mlp" if gated else "ff_up"
    routing = TritonBackend().route(logits, k)
    y = run_layout(TritonBackend(), layout, logits, x, w, routing.expert_index, routing)
    gy = torch.randn(y.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(y, [t for t in (x, w, logits) if t.requires_grad], gy)
    logits_r = logits.detach().clone().requires_grad_(gated)
    y_r = run_layout(REF, layout, logits_r, x, w, routing.expert_index,
                     reference_routing(logits_r, routing.expert_index))
    hidden = REF.matmul(x, w, reference_routing(logits_r, routing.expert_index), in_group=k, out_group=None,
                        activation="relu")
    assert (hidden == 0).float().mean() > 0.3          # the mask matters
    grads_r = torch.autograd.grad(y_r, [t for t in (x, w, logits_r) if t.requires_grad], gy)
    assert len(grads) == len(grads_r) > 0
    for a, b in zip(grads, grads_r):
        assert rel_err(a, b) < TOL[torch.float32]


@pytest.mark.parametrize("k_dim, n_dim", [(24, 72), (40, 24), (40, 150)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_output_and_its_scale_grad(k_dim, n_dim, dtype):
    """MASK_OUT and SCALE_GRAD, the σ-MoE MLP's down input-gradient: out = s * (A[pair // 3] @ W[e]^T) * (y > 0) at
    the sorted positions, and s's gradient sum_n out * y / s^2 (0 where s is 0) by pair id; from a resident A tile
    (K 24, three column chunks of 32) or the K loop (K 40, one chunk of 32 or three of 64), the chunks' partial
    sums added by _gmm. Ragged experts over 16-row tiles, one expert empty."""
    from moeut_kernels import grouped
    from moeut_kernels.routing import plan_from_expert_index
    gen = torch.Generator().manual_seed(k_dim * 1000 + n_dim)
    n_rows, group, n_experts = 23, 3, 5
    n_pairs = n_rows * group
    plan = plan_from_expert_index(torch.randint(0, n_experts - 1, (n_pairs,), generator=gen).to(DEVICE),
                                  n_experts, 16)
    a = torch.randn(n_rows, k_dim, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n_experts, n_dim, k_dim, generator=gen) / k_dim ** 0.5).to(DEVICE, dtype)
    y = torch.randn(n_pairs, n_dim, generator=gen).relu().to(DEVICE, dtype)    # sorted layout, ~half zero
    s = torch.rand(n_pairs, generator=gen).to(DEVICE, dtype)
    s[::7] = 0
    out = torch.full((n_pairs, n_dim), float("nan"), dtype=dtype, device=DEVICE)
    s_grad = torch.full((n_pairs,), float("nan"), device=DEVICE)
    grouped._gmm(a, group, w, True, plan, out, False, scale=s, out_mask=y, scale_grad=s_grad)
    pair = plan.order.cpu()
    expert = torch.repeat_interleave(torch.arange(n_experts), plan.offsets.diff().cpu())
    af, wf, yf, sf = (t.cpu().float() for t in (a, w, y, s))
    want = torch.einsum("pk,pnk->pn", af[pair // group], wf[expert]) * sf[pair, None] * (yf > 0)
    assert rel_err(out.cpu().float(), want) < TOL[dtype]
    assert (out.cpu()[yf <= 0] == 0).all()
    s2 = sf[pair] ** 2
    want_g = torch.where(s2 > 0, (out.cpu().float() * yf).sum(1) / torch.where(s2 > 0, s2, 1), 0)
    torch.testing.assert_close(s_grad.cpu()[pair], want_g, rtol=1e-5, atol=1e-5)
    assert (s_grad.cpu()[sf == 0] == 0).all()
    with pytest.raises(ValueError, match="not both"):
        grouped._gmm(a, group, w, True, plan, out, False, scale=s, out_mask=y, amask=y)
    with pytest.raises(ValueError, match="scale_grad needs"):
        grouped._gmm(a, group, w, True, plan, out, False, out_mask=y, scale_grad=s_grad)


TMA_WIDTHS = {"ff_up": (72, 32), "ff_mlp": (72, 32), "ff_down": (32, 72), "att_v": (72, 32), "att_o": (32, 72)}


def _tma_on_with_spy(monkeypatch) -> dict:
    """Turns TileConfig.tma on for every grouped-matmul and weight-gradient launch (two row chunks per expert in
    the weight gradient: rows past a chunk belong to the same expert) and records, per kernel, each launch's
    (TRANS_W, which descriptor arguments were given)."""
    from moeut_kernels import _triton, grouped
    seen: dict = {"gmm_kernel": [], "wgrad_kernel": []}

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(_triton, name)
            self.params = list(inspect.signature(self.kernel.fn).parameters)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(self.params, args))
                descs = tuple(named[p] is not None for p in self.params if p.endswith("_desc"))
                seen[self.name].append((kwargs.get("TRANS_W"), *descs))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in seen:
        monkeypatch.setattr(_triton, name, Spy(name))
    monkeypatch.setitem(grouped.OVERRIDES, "gmm", {"tma": True, "gluon": False})    # gmm_kernel's TMA path
    monkeypatch.setitem(grouped.OVERRIDES, "wgrad", {"tma": True})
    monkeypatch.setitem(grouped.OVERRIDES, "wgrad_splits", 2)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tma_loads_match_reference(layout, dtype, monkeypatch):
    """Launches with TMA descriptor loads (TileConfig.tma) give the reference's values and the pointer loads'
    values (to the ULP). The short width is 32 (= the interpreter's block_k, which the A descriptor needs) and the
    long one 72: a transposed W slice past N reads the next expert's rows, which must stay masked, and the
    looping-K calls take two K steps of 64, the second W tile mostly past K, where A's columns are zero. The spy
    checks which operands went by descriptor: W plain or transposed in every launch, the sorted A tile (down
    forward, up input gradient) and its ReLU mask (a ReLU projection's input gradient), and the weight gradients'
    sorted operand,
    with each expert's rows in two chunks. (Expert-pair tiles are off here: the attention O forward keeps its
    per-pair launch, which expert parallelism runs; test_pair_matmul_sums_both_experts_of_a_row loads the pair
    kernel's W by descriptor.)"""
    from moeut_kernels import grouped

    monkeypatch.setitem(grouped.OVERRIDES, "pair_tiles", False)
    widths = TMA_WIDTHS[layout]
    seed = zlib.crc32(f"tma{layout}{dtype}".encode()) % 1000
    plain = check_against_reference(layout, dtype, 45, bias="uneven", seed=seed, widths=widths)
    seen = _tma_on_with_spy(monkeypatch)
    tma = check_against_reference(layout, dtype, 45, bias="uneven", seed=seed, widths=widths)
    # equal up to the summation order of the interpreter's matmul on a transposed view (ULPs of the dtype)
    torch.testing.assert_close(plain[0], tma[0])
    for a, b in zip(plain[1], tma[1]):
        assert a is None and b is None or torch.testing.assert_close(a, b) is None
    by_desc = {  # (TRANS_W, A by descriptor, mask by descriptor); the looping-K launches take only W by descriptor
        "ff_up": {(True, True, True), (False, False, False)},
        # up forward, down forward (sorted A), down input-grad (its output masked), up input-grad (sorted A,
        # masked by the down input-grad)
        "ff_mlp": {(False, False, False), (False, True, False), (True, False, False), (True, True, False)},
        "ff_down": {(False, True, False), (True, False, False)},
        "att_v": {(True, False, False), (False, False, False)},
        "att_o": {(False, False, False), (True, False, False)}}[layout]
    assert all(s[3] for s in seen["gmm_kernel"])                          # every launch: W by descriptor
    assert {s[:3] for s in seen["gmm_kernel"]} == by_desc
    # the weight gradient: its sorted operand (the other one's gathered rows mask the rows past the chunk)
    sorted_operand = {"ff_up": "b", "ff_mlp": "b", "ff_down": "a", "att_v": "b", "att_o": "a"}[layout]
    assert {s[1:] for s in seen["wgrad_kernel"]} == {(sorted_operand == "a", sorted_operand == "b")}


FIRST_IN_BACKWARD = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
import test_kernels_experts as T
from moeut_kernels import grouped
from moeut_ds.experts.triton_backend import TritonBackend

grouped.OVERRIDES.update(gmm={"tma": True}, wgrad={"tma": True})
gen = torch.Generator().manual_seed(41)
n_rows, n, k, d_e, d = 45, 7, 3, 32, 72                     # FF down: x [pairs, d_e] sorted, out_group k
logits = T.make_logits(n_rows, 1, n, "uneven", gen).requires_grad_()
routing = TritonBackend().route(logits, k)
h = torch.randn(n_rows * k, d_e, generator=gen).to(T.DEVICE, torch.bfloat16).requires_grad_()
w = torch.randn(n, d_e, d, generator=gen).to(T.DEVICE, torch.bfloat16).requires_grad_()
y = TritonBackend().matmul(h, w, routing, in_group=None, out_group=k)
gy = torch.randn(y.shape, generator=gen).to(T.DEVICE, torch.bfloat16)
p = routing.plan
# the backward op once in this thread, so that its kernels are compiled and loaded here (loading binds a context)
main = torch.ops.moeut.grouped_matmul_backward(gy, h, w, routing.gate.reshape(-1), None, None, p.order, p.offsets,
                                               p.tile_expert, p.tile_start, p.block_m, 0, k, True, True, True)
# then the same launches as the first CUDA work of autograd's backward thread
grads = torch.autograd.grad(y, [h, w, logits], gy)
for a, b in zip(main[:2], grads[:2]):
    torch.testing.assert_close(a, b, rtol=0, atol=0)
"""


def test_tma_launch_first_in_the_backward_thread():
    """A TMA launch of an already loaded kernel as the first CUDA work of autograd's backward thread (FF down's input
    gradient, W by descriptor) binds the CUDA context itself; on the H200 Triton otherwise failed to encode the
    descriptor ("invalid device context"). A fresh process: this one's backward thread has done CUDA work already."""
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests.parent / "kernels"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", FIRST_IN_BACKWARD, str(tests)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tma_config_without_host_descriptors_uses_pointer_loads(monkeypatch):
    """On a Triton without host tensor descriptors (< 3.4) a TMA config still runs, with pointer loads, and no
    GPU reports TMA."""
    from moeut_kernels import grouped
    monkeypatch.setattr(grouped, "TensorDescriptor", None)
    assert not grouped._has_tma.__wrapped__(torch.device("cuda"))
    seen = _tma_on_with_spy(monkeypatch)
    check_against_reference("ff_up", torch.float32, 45, bias="uneven", seed=21, widths=TMA_WIDTHS["ff_up"])
    assert seen["gmm_kernel"] and seen["wgrad_kernel"]
    assert not any(any(s[1:]) for launches in seen.values() for s in launches)


def test_auto_backend_is_reference_without_cuda():
    if not torch.cuda.is_available():
        assert get_backend("auto").name == "reference"
    assert get_backend("triton").name == "triton"


# ---------------------------------------------------------------- the whole model

@pytest.mark.parametrize("widths", [{}, {"d_model": 20, "d_head": 6, "ff_expert_size": 5}], ids=["default", "odd"])
def test_tiny_moeut_same_loss_and_grads_with_either_backend(widths):
    """The whole model (loss, regulariser, gradients, expert counts); "odd": every expert width padded for the
    kernels and sliced back (aligned_operands), the outputs then reshaped by the model's own code."""
    model, tokens = tiny_moeut(**widths)
    results, counts = [], []
    for backend in ("reference", TritonBackend()):
        model.set_expert_backend(backend)
        model.zero_grad()
        out = model(tokens, return_expert_counts=True)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1))
        (loss + out.reg_loss).backward()
        results.append((loss.detach(), out.reg_loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        counts.append(out.expert_counts)
    (l1, r1, g1), (l2, r2, g2) = results
    assert len(counts[0]) == len(model.layers)                     # usage statistics: the same routing decisions
    for c1, c2 in zip(*counts):
        assert c1.keys() == c2.keys() == {"ff", "v", "o"} and all(torch.equal(c1[k], c2[k]) for k in c1)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r2, r1, rtol=1e-5, atol=1e-7)
    assert g1.keys() == g2.keys() and any("w1" in n for n in g1)
    for name in g1:
        assert rel_err(g2[name], g1[name]) < 1e-4, name
