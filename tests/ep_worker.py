"""One rank of the expert-parallel equivalence tests (run by tests/test_expert_parallel.py through dist_harness).

usage: python tests/ep_worker.py EP_SIZE OUT_DIR
Compares, on every rank, the expert-parallel computation (both dispatches: all-to-all and all-gather) with a
single-process computation of the same global batch and writes the max errors to OUT_DIR/rank{r}.json, keyed
"<dispatch>/<case>/<quantity>".
"""
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeut_ds import LanguageModel, ModelConfig
from moeut_ds.experts import get_backend
from moeut_ds.parallel import build_expert_parallel_groups, shard_bounds, shard_experts
from moeut_ds.parallel.expert_parallel import ExpertParallelBackend

ep_size, out_dir = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", timeout=timedelta(minutes=3))
rank, world = dist.get_rank(), dist.get_world_size()
groups = build_expert_parallel_groups(ep_size)
ref_backend = get_backend("reference")
errors: dict[str, float] = {}


def err(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    errors[name] = max(errors.get(name, 0.0), ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())


# 1. the backend alone, with hand-made routings: skewed loads, one shard receiving nothing
torch.manual_seed(0)
n_experts, d, de, n_tok, k = 7, 8, 5, 6, 3
w1_full, w2_full = torch.randn(n_experts, d, de), torch.randn(n_experts, de, d)
lo, hi = shard_bounds(n_experts, ep_size)[groups.ep_rank:groups.ep_rank + 2]
cases = {
    "random": lambda: torch.stack([torch.randperm(n_experts)[:k] for _ in range(n_tok * world)]),
    "all_on_shard0": lambda: torch.stack([torch.randperm(shard_bounds(n_experts, ep_size)[1])[:min(k, 1)]
                                          for _ in range(n_tok * world)]),
    "all_on_last_expert": lambda: torch.full((n_tok * world, 1), n_experts - 1),
}
for dispatch, case in [(dispatch, case) for dispatch in ("alltoall", "allgather") for case in cases]:
    make = cases[case]
    name = f"{dispatch}/{case}"
    torch.manual_seed(1)
    idx_all = make()
    kk = idx_all.shape[1]
    x_all = torch.randn(n_tok * world, d)
    gate_all = torch.rand(n_tok * world, kk)
    # single process reference on the whole batch
    xr, gr = x_all.clone().requires_grad_(), gate_all.clone().requires_grad_()
    w1r, w2r = w1_full.clone().requires_grad_(), w2_full.clone().requires_grad_()
    yr = ref_backend.mlp(xr, w1r, w2r, ref_backend.routing(gr, idx_all, n_experts))
    yr.pow(2).sum().backward()
    # expert parallel: this rank's tokens and shard
    ep = ExpertParallelBackend(ref_backend, groups, dispatch)
    sl = slice(rank * n_tok, (rank + 1) * n_tok)
    x, g = x_all[sl].clone().requires_grad_(), gate_all[sl].clone().requires_grad_()
    w1, w2 = w1_full[lo:hi].clone().requires_grad_(), w2_full[lo:hi].clone().requires_grad_()
    y = ep.mlp(x, w1, w2, ep.routing(g, idx_all[sl], n_experts))
    y.pow(2).sum().backward()
    err(f"{name}/y", y, yr[sl])
    err(f"{name}/dx", x.grad, xr.grad[sl])
    err(f"{name}/dgate", g.grad, gr.grad[sl])
    # weight grads: sum over the EP group's tokens lands on the owner; add the other EP groups' contributions
    for wname, got, want in (("dw1", w1.grad, w1r.grad[lo:hi]), ("dw2", w2.grad, w2r.grad[lo:hi])):
        if groups.edp_size > 1:
            dist.all_reduce(got, group=groups.edp_group)
        err(f"{name}/{wname}", got, want)
    # all-to-all: each token goes once to each rank owning any of its experts (the distinct (token, owner) pairs);
    # all-gather: once to every rank
    owner = torch.searchsorted(torch.tensor(shard_bounds(n_experts, ep_size)), idx_all[sl], right=True) - 1
    distinct = sum(len(set(row.tolist())) for row in owner) if dispatch == "alltoall" else ep_size * n_tok
    sent = ep.stats.read()
    errors[f"{name}/rows_sent_minus_distinct_owners"] = float(sent["rows_sent"] - distinct)
    errors[f"{name}/bytes_sent"] = float(sent["bytes_sent"])
    # this rank's experts received exactly the pairs of its EP group's tokens that fall in its shard
    group_start = (rank // ep_size) * ep_size
    group_idx = idx_all[group_start * n_tok:(group_start + ep_size) * n_tok]
    in_shard = int(((group_idx >= lo) & (group_idx < hi)).sum())
    errors[f"{name}/pairs_received_minus_in_shard"] = float(ep.stats.reset()["pairs_received"] - in_shard)

# 1b. under bf16 autocast the token rows travel as bf16 (forward rows and their gradients), with the results of the
# single-process computation under the same autocast
import moeut_ds.parallel.expert_parallel as EPM  # noqa: E402
like = [torch.empty(1, k, dtype=torch.int32), torch.empty(1, k), torch.empty(1, d, dtype=torch.bfloat16)]
bf16_widths = {EPM._layout(like)[1], EPM._layout(like[1:])[1]}
for dispatch, patched in (("alltoall", ["_exchange"]), ("allgather", ["_gather", "_scatter_sum"])):
    sent: list = []
    originals = {fn: getattr(EPM, fn) for fn in patched}
    for fn, orig in originals.items():
        setattr(EPM, fn, lambda t, *a, orig=orig: (sent.append((t.dtype, t.shape[1:])), orig(t, *a))[1])
    torch.manual_seed(4)
    idx_all = cases["random"]()
    x_all, gate_all = torch.randn(n_tok * world, d), torch.rand(n_tok * world, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xr, gr = x_all.clone().requires_grad_(), gate_all.clone().requires_grad_()
        yr = ref_backend.mlp(xr, w1_full, w2_full, ref_backend.routing(gr, idx_all, n_experts))
        yr.float().pow(2).sum().backward()
        sl = slice(rank * n_tok, (rank + 1) * n_tok)
        x, g = x_all[sl].clone().requires_grad_(), gate_all[sl].clone().requires_grad_()
        ep = EPM.ExpertParallelBackend(ref_backend, groups, dispatch)
        y = ep.mlp(x, w1_full[lo:hi], w2_full[lo:hi], ep.routing(g, idx_all[sl], n_experts))
        y.float().pow(2).sum().backward()
    for fn, orig in originals.items():
        setattr(EPM, fn, orig)
    name = f"{dispatch}/autocast"
    err(f"{name}/y", y.float(), yr[sl].float())
    err(f"{name}/dx", x.grad, xr.grad[sl])
    err(f"{name}/dgate", g.grad, gr.grad[sl])
    rows = [dtype for dtype, rest in sent if tuple(rest) == (d,)]      # results back and their gradients
    errors[f"{name}/fp32_row_exchanges"] = float(sum(dtype == torch.float32 for dtype in rows))
    errors[f"{name}/row_exchanges"] = float(len(rows))
    # token rows out (with their gates and expert ids) and, all-to-all, their gradients back travel packed: as
    # wide as bf16 rows
    packed = [rest[0] for dtype, rest in sent if dtype == torch.uint8]
    errors[f"{name}/packed_exchanges"] = float(len(packed))
    errors[f"{name}/wide_packed_exchanges"] = float(sum(w not in bf16_widths for w in packed))

# 2. the whole model: loss and every gradient equal the single-process model on the global batch
cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=4, group_size=2, n_heads=2, d_head=8, att_n_experts=3,
                  att_k=2, ff_n_experts=6, ff_expert_size=4, ff_k=3)
torch.manual_seed(2)
tokens = torch.randint(0, 64, (2 * world, 9))
torch.manual_seed(3)
full = LanguageModel(cfg, "reference")
out = full(tokens)
loss_full = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()) + out.reg_loss
loss_full.backward()
full_grads = {n: p.grad.clone() for n, p in full.named_parameters()}

for dispatch in ("alltoall", "allgather"):
    torch.manual_seed(3)
    model = LanguageModel(cfg, "reference")
    shards = shard_experts(model, groups, dispatch)
    mine = tokens[2 * rank:2 * rank + 2]
    out = model(mine)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), mine[:, 1:].flatten()) + out.reg_loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    name = f"{dispatch}/model"
    err(f"{name}/loss", mean_loss / world, loss_full.detach())
    for n, p in model.named_parameters():          # non-expert: averaged over the whole world (what ZeRO does)
        dist.all_reduce(p.grad)
        err(f"{name}/grad/{n}", p.grad / world, full_grads[n])
    shards.all_reduce_gradients()
    for n, p in shards.params.items():
        lo, hi, _ = shards.bounds[n]
        err(f"{name}/grad/{n}", p.grad, full_grads[n][lo:hi])
    total_sq = torch.zeros(())
    for n, p in model.named_parameters():
        total_sq += (p.grad / world).pow(2).sum()
    norm = (total_sq + shards.grad_norm_sq()).sqrt()
    want = torch.sqrt(sum(g.pow(2).sum() for g in full_grads.values()))
    err(f"{name}/grad_norm", norm, want)

with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(errors, f)
dist.destroy_process_group()
