"""bench_combine's ways of combining a token's K rows all give the per-token sums (so its timings compare like with
like): the buffer + group_sum and the reductions in every tile order, at a shape where experts have a full and a
partial tile, one expert has no pair, and the width is not a multiple of the column block; with synthetic rows
and with the down projection's products. The interpreter has no bf16 atomics, so on
CPU the bf16 reductions are left out (the same kernel as the fp32 ones; the GPU run checks them too)."""
import sys
from pathlib import Path

import torch

from kernel_testing import DEVICE, INTERPRET  # sets TRITON_INTERPRET before the kernels are imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_combine as C  # noqa: E402


def test_every_way_gives_the_per_token_sums():
    torch.manual_seed(0)
    tokens, k, n_experts, d = 300, 3, 6, 160
    expert_index = torch.stack([torch.randperm(n_experts - 1)[:k] for _ in range(tokens)])   # the last: none
    plan = C.routing.plan_from_expert_index(expert_index.reshape(-1).to(DEVICE), n_experts, C.BLOCK_M)
    loads = plan.offsets.diff().cpu()
    assert loads[-1] == 0 and (loads[:-1] > C.BLOCK_M).all() and (loads[:-1] % C.BLOCK_M > 0).all()
    ref = C.reference(plan, tokens, d)
    # two bf16 roundings of all-positive values (a pair's row or a partial sum, and the result), each at most
    # 2^-7 relative where the interpreter truncates; a lost or doubled tile is off by a whole row (~1/3 here)
    check(C.variants(plan, tokens, d), ref, 2 * 2 ** -7)
    # the down projection's products, fp32 operands (the interpreter's bf16 dot is wrong); d_e not a power of 2
    h = torch.randn(plan.n_pairs, 24, device=DEVICE).relu()
    w2 = torch.randn(n_experts, 24, d, device=DEVICE) / 24 ** 0.5
    # (on a GPU: tf32 dots, and bf16 partial sums of mixed-sign rows)
    check(C.variants(plan, tokens, d, (h, w2)), C.reference(plan, tokens, d, (h, w2)), 1e-5 if INTERPRET else 3e-2)


def check(ways: dict, ref: torch.Tensor, tol: float) -> None:
    assert len(ways) == 7
    if INTERPRET:
        ways = {name: run for name, run in ways.items() if not name.startswith("bf16 reductions")}
    for name, run in ways.items():
        out = run().double()
        assert out.shape == ref.shape, name
        assert (out - ref).abs().max() <= tol * ref.abs().max(), name
