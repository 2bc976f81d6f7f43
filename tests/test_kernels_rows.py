"""Explicit rows in the expert interface (`in_index`, `out_offsets`, `mlp_rows`): the layout expert parallelism
receives (R token rows, each with a variable number of contiguous pairs).

Checked three ways: the reference backend against a per-pair Python loop (independent truth), the Triton kernels
(CPU, TRITON_INTERPRET=1) against the reference (forward and every gradient, fp32 and bf16), and expert
parallelism with the Triton backend on two gloo processes against one process.
"""
from __future__ import annotations


from pathlib import Path

from kernel_testing import DEVICE, INTERPRET, REF, TOL, rel_err  # noqa: E402  (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from moeut_ds.experts.interface import Routing, sort_pairs  # noqa: E402
from moeut_ds.experts.triton_backend import TritonBackend  # noqa: E402


def segments(case: str, gen: torch.Generator) -> torch.Tensor:
    """Pairs per row for the load patterns expert parallelism can produce (and some it cannot, e.g. empty rows)."""
    if case == "uneven":        # 1..K pairs per row, K = 24 as in MoEUT-1B
        return torch.randint(1, 25, (29,), generator=gen)
    if case == "empty_rows":    # zero-length segments first, last and in the middle
        n = torch.randint(0, 5, (23,), generator=gen)
        n[0] = n[-1] = n[7] = 0
        return n
    if case == "one_row":       # one row holds every pair (crosses several 16-row tiles and sum blocks)
        return torch.tensor([61])
    if case == "one_row_of_many":
        n = torch.zeros(70, dtype=torch.int64)
        n[40] = 37
        return n
    if case == "zero_pairs":    # rows but no pairs: the output is exactly zero
        return torch.zeros(5, dtype=torch.int64)
    if case == "zero_rows":
        return torch.zeros(0, dtype=torch.int64)
    raise AssertionError(case)


def make_problem(case: str, n_experts: int, d: int, d_e: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    counts = segments(case, gen)
    n_rows, n_pairs = counts.numel(), int(counts.sum())
    row_offsets = torch.zeros(n_rows + 1, dtype=torch.int64)
    row_offsets[1:] = torch.cumsum(counts, 0)
    row_index = torch.repeat_interleave(torch.arange(n_rows), counts)
    expert = torch.randint(0, n_experts, (n_pairs, 1), generator=gen)
    gate = torch.rand(n_pairs, 1, generator=gen)
    x = torch.randn(n_rows, d, generator=gen)
    w1 = torch.randn(n_experts, d, d_e, generator=gen) / d ** 0.5
    w2 = torch.randn(n_experts, d_e, d, generator=gen) / d_e ** 0.5
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, w1, w2, gate)]
    return leaves, expert.to(DEVICE), row_index.to(DEVICE), row_offsets.to(DEVICE)


def loop_mlp_rows(x, w1, w2, gate, expert, row_index):
    """Independent truth: one pair at a time."""
    out = torch.zeros_like(x)
    for p in range(expert.shape[0]):
        e, r = int(expert[p, 0]), int(row_index[p])
        out[r] = out[r] + gate[p, 0] * (torch.relu(x[r] @ w1[e]) @ w2[e])
    return out


CASES = ["uneven", "empty_rows", "one_row", "one_row_of_many", "zero_pairs", "zero_rows"]


@pytest.mark.parametrize("case", CASES)
def test_reference_mlp_rows_matches_loop(case):
    (x, w1, w2, gate), expert, row_index, row_offsets = make_problem(case, 5, 12, 8, torch.float64, seed=1)
    routing = REF.routing(gate, expert, 5)
    y = REF.mlp_rows(x, w1, w2, routing, row_index, row_offsets)
    y_loop = loop_mlp_rows(x, w1, w2, gate, expert, row_index)
    torch.testing.assert_close(y, y_loop)
    if expert.numel() == 0:     # nothing to differentiate in the loop
        return
    gy = torch.randn_like(y)
    leaves = [x, w1, w2, gate]
    g = torch.autograd.grad(y, leaves, gy, allow_unused=True)
    g_loop = torch.autograd.grad(y_loop, leaves, gy, allow_unused=True)
    for a, b in zip(g, g_loop):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_triton_mlp_rows_matches_reference(case, dtype):
    n_experts = 7
    leaves, expert, row_index, row_offsets = make_problem(case, n_experts, 40, 24, dtype, seed=CASES.index(case))
    x, w1, w2, gate = leaves
    tb = TritonBackend()
    y = tb.mlp_rows(x, w1, w2, tb.routing(gate, expert, n_experts), row_index, row_offsets)
    assert y.shape == x.shape and y.dtype == dtype
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    y_r = REF.mlp_rows(*ref_leaves[:3], REF.routing(ref_leaves[3], expert, n_experts), row_index, row_offsets)
    assert rel_err(y, y_r) < TOL[dtype], rel_err(y, y_r)
    if expert.numel() == 0:
        assert torch.equal(y, torch.zeros_like(y))
        return
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, leaves, gy)
    grads_r = torch.autograd.grad(y_r, ref_leaves, gy.float())
    for name, a, b in zip(("x", "w1", "w2", "gate"), grads, grads_r):
        assert a.dtype == dtype
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))
    if case == "empty_rows":   # rows without pairs get exactly zero output and gradient
        empty = (row_offsets[1:] == row_offsets[:-1])
        assert torch.equal(y[empty], torch.zeros_like(y[empty]))
        assert torch.equal(grads[0][empty], torch.zeros_like(grads[0][empty]))


def test_triton_mlp_rows_matches_gathered_pairs():
    """The new path computes what expert parallelism computed before: gather a row per pair, per-pair mlp,
    index_add per row (with the Triton backend on both sides)."""
    leaves, expert, row_index, row_offsets = make_problem("uneven", 6, 40, 24, torch.float32, seed=11)
    x, w1, w2, gate = leaves
    tb = TritonBackend()
    routing = tb.routing(gate, expert, 6)
    y = tb.mlp_rows(x, w1, w2, routing, row_index, row_offsets)
    y_pairs = tb.mlp(x[row_index], w1, w2, routing)
    y_old = y_pairs.new_zeros(x.shape).index_add(0, row_index, y_pairs)
    assert rel_err(y, y_old) < 2e-5
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_old, leaves, gy)):
        assert rel_err(a, b) < 2e-5


def test_triton_mlp_rows_deterministic_bitwise():
    runs = []
    for _ in range(2):
        leaves, expert, row_index, row_offsets = make_problem("uneven", 7, 40, 24, torch.bfloat16, seed=3)
        tb = TritonBackend()
        y = tb.mlp_rows(*leaves[:3], tb.routing(leaves[3], expert, 7), row_index, row_offsets)
        runs.append((y, torch.autograd.grad(y, leaves, torch.ones_like(y))))
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# ---------------------------------------------------------------- matmul with in_index / out_offsets alone

def test_matmul_in_index_unsorted_and_out_offsets():
    """in_index in any order with repeats (input grad summed through a stable sort) and, in the same call,
    out_offsets (gate gradient: fused reading x rows through in_index for a wider output, from the kept pairs
    through the segment of each pair for a narrower one); also in_index alone with ReLU and out_offsets on
    sorted pair input."""
    gen = torch.Generator().manual_seed(5)
    n_x, n_experts, n_pairs = 19, 5, 57
    in_index = torch.randint(0, n_x, (n_pairs,), generator=gen)
    in_index[:3] = 4                                 # a row used many times; some rows never used
    counts = torch.randint(0, 4, (13,), generator=gen)
    counts[2] = 0                                    # an empty segment
    counts[-1] = n_pairs - counts[:-1].sum()         # segments cover the pairs exactly (the last one is long)
    out_offsets = torch.zeros(14, dtype=torch.int64)
    out_offsets[1:] = torch.cumsum(counts, 0)
    expert = torch.randint(0, n_experts, (n_pairs, 1), generator=gen).to(DEVICE)
    tb = TritonBackend()
    for mode, d_in, d_out in [(m, *d) for m in ("in_out", "in_relu", "out") for d in ((40, 24), (24, 40))]:
        x_rows = n_pairs if mode == "out" else n_x
        x = torch.randn(x_rows, d_in, generator=gen).to(DEVICE).requires_grad_()
        w = (torch.randn(n_experts, d_in, d_out, generator=gen) / d_in ** 0.5).to(DEVICE).requires_grad_()
        gate = torch.rand(n_pairs, 1, generator=gen).to(DEVICE).requires_grad_()
        kw = {"in_index": None if mode == "out" else in_index.to(DEVICE),
              "out_offsets": None if mode == "in_relu" else out_offsets.to(DEVICE),
              "activation": "relu" if mode == "in_relu" else None}
        y = tb.matmul(x, w, tb.routing(gate, expert, n_experts), in_group=None, out_group=None, **kw)
        y_r = REF.matmul(x, w, REF.routing(gate, expert, n_experts), in_group=None, out_group=None, **kw)
        assert rel_err(y, y_r) < 2e-5, mode
        gy = torch.randn(y.shape, generator=gen).to(DEVICE)
        leaves = [x, w, gate] if mode != "in_relu" else [x, w]
        for a, b in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_r, leaves, gy)):
            assert rel_err(a, b) < 2e-5, mode
    # the reference itself against a loop, on the CPU (sorted pair input: x row j is pair order[j])
    expert = expert.cpu()
    order, offsets = sort_pairs(expert, n_experts)
    x = torch.randn(n_x, 40, dtype=torch.float64)
    w = torch.randn(n_experts, 40, 24, dtype=torch.float64)
    gate = torch.rand(n_pairs, 1, dtype=torch.float64)
    d_in, d_out = x.shape[1], w.shape[2]
    routing = Routing(gate=gate, expert_index=expert, n_experts=n_experts, order=order, offsets=offsets)
    y = REF.matmul(x, w, routing, in_group=None, out_group=None, in_index=in_index, out_offsets=out_offsets)
    want = torch.zeros(13, d_out, dtype=torch.float64)
    seg = torch.repeat_interleave(torch.arange(13), counts)
    for p in range(n_pairs):
        want[seg[p]] += gate[p, 0] * (x[in_index[p]] @ w[expert[p, 0]])
    torch.testing.assert_close(y, want)


def test_matmul_rejects_both_groupings():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(3, 8, 8, device=DEVICE)
    expert = torch.zeros(4, 1, dtype=torch.int64, device=DEVICE)
    for backend in (REF, TritonBackend()):
        routing = backend.routing(torch.ones(4, 1, device=DEVICE), expert, 3)
        with pytest.raises(ValueError, match="not both"):
            backend.matmul(x, w, routing, in_group=1, out_group=None, in_index=torch.arange(4, device=DEVICE))
        with pytest.raises(ValueError, match="not both"):
            backend.matmul(x, w, routing, in_group=None, out_group=1,
                           out_offsets=torch.arange(5, device=DEVICE))


def test_opcheck_grouped_matmul_rows():
    """The custom op with in_index / out_offsets: schema, fake tensors, autograd registration."""
    from moeut_kernels import plan_from_expert_index
    gen = torch.Generator().manual_seed(2)
    expert = torch.randint(0, 5, (45, 1), generator=gen).to(DEVICE)
    plan = plan_from_expert_index(expert, 5, 16)
    ptensors = (plan.order, plan.offsets, plan.tile_expert, plan.tile_start, 16)
    row_index = torch.sort(torch.randint(0, 11, (45,), generator=gen)).values.to(DEVICE)
    row_offsets = torch.searchsorted(row_index, torch.arange(12, device=DEVICE))
    x = torch.randn(11, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 24, 20, device=DEVICE, requires_grad=True)
    up = (x, w, None, *ptensors, 0, 0, True, row_index, None)
    h = torch.randn(45, 20, device=DEVICE, requires_grad=True)
    w2 = torch.randn(5, 20, 24, device=DEVICE, requires_grad=True)
    gate = torch.rand(45, device=DEVICE, requires_grad=True)
    down = (h, w2, gate, *ptensors, 0, 0, False, None, row_offsets)
    for args in (up, down):
        result = torch.library.opcheck(torch.ops.moeut.grouped_matmul.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result


# ---------------------------------------------------------------- remote pairs (shard_routing, all-gather dispatch)

SHARD_CASES = ["mixed", "no_local_pair", "all_local", "one_local_expert"]


def shard_problem(case: str, dtype: torch.dtype, seed: int):
    """Tokens with K distinct experts of 9; this rank holds experts [3, 7) (lo, hi)."""
    gen = torch.Generator().manual_seed(seed)
    n_experts, lo, hi, n, k, d, d_e = 9, 3, 7, 37, 3, 40, 24
    pool = {"mixed": range(9), "no_local_pair": [0, 1, 2, 7, 8], "all_local": range(3, 7),
            "one_local_expert": [0, 1, 5, 8]}[case]
    pool = torch.tensor(list(pool))
    expert = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(n)])
    x = torch.randn(n, d, generator=gen)
    w1 = torch.randn(n_experts, d, d_e, generator=gen) / d ** 0.5
    w2 = torch.randn(n_experts, d_e, d, generator=gen) / d_e ** 0.5
    gate = torch.rand(n, k, generator=gen)
    return [t.to(DEVICE, dtype) for t in (x, w1, w2, gate)], expert.to(DEVICE), lo, hi


def shard_truth(x, w1, w2, gate, expert, lo, hi):
    """Every expert on one process with the remote pairs' gates zeroed: the shard's share of the output."""
    local = ((expert >= lo) & (expert < hi)).to(gate.dtype)
    return REF.mlp(x, w1, w2, REF.routing(gate * local, expert, w1.shape[0]))


@pytest.mark.parametrize("case", SHARD_CASES)
def test_reference_shard_routing_matches_masked_gates(case):
    (x, w1, w2, gate), expert, lo, hi = shard_problem(case, torch.float64, seed=SHARD_CASES.index(case))
    leaves = [t.requires_grad_() for t in (x, w1, w2, gate)]
    routing = REF.shard_routing(gate, expert, lo, hi)
    assert int(routing.offsets[-1]) == int(routing.local.sum())
    y = REF.mlp(x, w1[lo:hi], w2[lo:hi], routing)
    y_t = shard_truth(x, w1, w2, gate, expert, lo, hi)
    torch.testing.assert_close(y, y_t)
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, leaves, gy, allow_unused=True)
    g_t = torch.autograd.grad(y_t, leaves, gy)
    for a, b in zip(g, g_t):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SHARD_CASES)
def test_triton_shard_routing_never_reads_remote_rows(case, dtype):
    """Triton against the reference with every uninitialised buffer filled with NaN (torch's deterministic mode):
    a remote pair's rows are never written, so any read of one would put NaN into the outputs or gradients."""
    leaves, expert, lo, hi = shard_problem(case, dtype, seed=10 + SHARD_CASES.index(case))
    x, w1, w2, gate = [t.requires_grad_() for t in leaves]
    ref = [t.detach().float().requires_grad_() for t in leaves]
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    torch.use_deterministic_algorithms(True, warn_only=True)      # warn only: CUDA's scatter_add has no such mode
    try:
        tb = TritonBackend()
        y = tb.mlp(x, w1[lo:hi], w2[lo:hi], tb.shard_routing(gate, expert, lo, hi))
        grads = torch.autograd.grad(y, [x, w1, w2, gate], gy)
    finally:
        torch.use_deterministic_algorithms(False)
    y_r = REF.mlp(ref[0], ref[1][lo:hi], ref[2][lo:hi], REF.shard_routing(ref[3], expert, lo, hi))
    grads_r = torch.autograd.grad(y_r, ref, gy.float(), allow_unused=True)
    assert rel_err(y, y_r) < TOL[dtype]
    for name, a, b in zip(("x", "w1", "w2", "gate"), grads, grads_r):
        b = torch.zeros_like(a, dtype=torch.float32) if b is None else b
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))
    remote = ~((expert >= lo) & (expert < hi))
    assert torch.equal(grads[3][remote], torch.zeros_like(grads[3][remote]))


@pytest.mark.parametrize("case", ["mixed", "no_local_pair"])
def test_triton_activation_on_summed_output_with_remote_pairs(case):
    """The unfused path (ReLU before the gate-weighted sum; no projection of the model uses it) with remote pairs and
    NaN-filled buffers, against the reference: forward and every gradient."""
    (x, w1, _, gate), expert, lo, hi = shard_problem(case, torch.float32, seed=30)
    k = expert.shape[1]
    leaves = [x.requires_grad_(), w1[lo:hi].detach().requires_grad_(), gate.requires_grad_()]
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    gy = torch.randn(x.shape[0], w1.shape[2], generator=torch.Generator().manual_seed(5)).to(DEVICE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        tb = TritonBackend()
        y = tb.matmul(leaves[0], leaves[1], tb.shard_routing(leaves[2], expert, lo, hi), in_group=k, out_group=k,
                      activation="relu")
        grads = torch.autograd.grad(y, leaves, gy)
    finally:
        torch.use_deterministic_algorithms(False)
    y_r = REF.matmul(ref[0], ref[1], REF.shard_routing(ref[2], expert, lo, hi), in_group=k, out_group=k,
                     activation="relu")
    grads_r = torch.autograd.grad(y_r, ref, gy, allow_unused=True)
    assert rel_err(y, y_r) < TOL[torch.float32]
    for name, a, b in zip(("x", "w", "gate"), grads, grads_r):
        b = torch.zeros_like(a) if b is None else b
        assert rel_err(a, b) < TOL[torch.float32], (name, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_sum_to_the_whole_layer(dtype):
    """What the all-gather dispatch computes: every shard's routing over all tokens, summed over the shards, equals
    the whole layer in one piece (forward and every gradient, the router's included); on a GPU at MoEUT-1B's width
    and expert count (d 1536, 565 experts, K 24). Uninitialised memory is NaN-filled, as in the test above: on the
    GPU that also covers the TMA loads, which the interpreter does not run."""
    n, d, d_e, n_experts, k = (70, 40, 24, 9, 3) if INTERPRET else (8192, 1536, 128, 565, 24)
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(n, 1, n_experts, generator=gen).to(DEVICE).requires_grad_()
    x = torch.randn(n, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    w1 = (torch.randn(n_experts, d, d_e, generator=gen) / d ** 0.5).to(DEVICE, dtype).requires_grad_()
    w2 = (torch.randn(n_experts, d_e, d, generator=gen) / d_e ** 0.5).to(DEVICE, dtype).requires_grad_()
    gy = torch.randn(n, d, generator=gen).to(DEVICE, dtype)
    tb = TritonBackend()
    routing = tb.route(logits, k)
    y_whole = tb.mlp(x, w1, w2, routing)
    whole = torch.autograd.grad(y_whole, [x, w1, w2, logits], gy, retain_graph=True)   # the router's graph is shared
    ys = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for lo, hi in ((0, n_experts // 3), (n_experts // 3, n_experts)):
            shard = tb.shard_routing(routing.gate, routing.expert_index, lo, hi)
            ys.append(tb.mlp(x, w1[lo:hi], w2[lo:hi], shard))
        parts = torch.autograd.grad(ys, [x, w1, w2, logits], [gy, gy])
    finally:
        torch.use_deterministic_algorithms(False)
    y = ys[0].float() + ys[1].float()
    assert rel_err(y, y_whole.float()) < TOL[dtype]
    for name, a, b in zip(("x", "w1", "w2", "logits"), parts, whole):
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


# ---------------------------------------------------------------- expert parallelism with the Triton backend

def _ep_worker(rank: int, world: int, init_file: str, result_file: str, dispatch: str) -> None:
    """One rank: EP(Triton) on this rank's tokens vs Triton mlp on the whole batch in one process."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    from moeut_ds.parallel import build_expert_parallel_groups, shard_bounds
    from moeut_ds.parallel.expert_parallel import ExpertParallelBackend

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=3))
    try:
        groups = build_expert_parallel_groups(world)
        torch.manual_seed(0)
        n_experts, d, de, n_tok, k = 7, 40, 24, 21, 3
        w1_full = torch.randn(n_experts, d, de) / d ** 0.5
        w2_full = torch.randn(n_experts, de, d) / de ** 0.5
        idx_all = torch.stack([torch.randperm(n_experts)[:k] for _ in range(n_tok * world)])
        x_all, gate_all = torch.randn(n_tok * world, d), torch.rand(n_tok * world, k)
        tb = TritonBackend()
        xr, gr = x_all.clone().requires_grad_(), gate_all.clone().requires_grad_()
        w1r, w2r = w1_full.clone().requires_grad_(), w2_full.clone().requires_grad_()
        yr = tb.mlp(xr, w1r, w2r, tb.routing(gr, idx_all, n_experts))
        yr.pow(2).sum().backward()
        lo, hi = shard_bounds(n_experts, world)[rank:rank + 2]
        ep = ExpertParallelBackend(tb, groups, dispatch)
        sl = slice(rank * n_tok, (rank + 1) * n_tok)
        x, g = x_all[sl].clone().requires_grad_(), gate_all[sl].clone().requires_grad_()
        w1, w2 = w1_full[lo:hi].clone().requires_grad_(), w2_full[lo:hi].clone().requires_grad_()
        y = ep.mlp(x, w1, w2, ep.routing(g, idx_all[sl], n_experts))
        y.pow(2).sum().backward()
        errors = {name: rel_err(a, b) for name, a, b in (
            ("y", y, yr[sl]), ("dx", x.grad, xr.grad[sl]), ("dgate", g.grad, gr.grad[sl]),
            ("dw1", w1.grad, w1r.grad[lo:hi]), ("dw2", w2.grad, w2r.grad[lo:hi]))}
        Path(result_file).write_text(json.dumps(errors))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="CPU ranks over gloo: the kernels run there only under TRITON_INTERPRET=1 "
                    "(as in CI); on GPUs bench/bench_expert_parallel.py runs the NCCL path")
@pytest.mark.parametrize("dispatch", ["alltoall", "allgather"])
def test_expert_parallel_triton_matches_single_process(tmp_path, dispatch):
    import json

    import torch.multiprocessing as mp
    world = 2
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ep_worker, args=(r, world, str(tmp_path / "init"), str(tmp_path / f"rank{r}.json"),
                                                  dispatch)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0, p.exitcode
    for r in range(world):
        errors = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert set(errors) == {"y", "dx", "dgate", "dw1", "dw2"}
        for name, value in errors.items():
            assert value < 2e-5, (r, name, value)
