"""Expert parallelism for the σ-MoE feed-forward: dropless all-to-all dispatch behind the expert interface.

Each σ-MoE layer's N_E experts are split into ep contiguous shards; rank `ep_rank` of an expert-parallel group
holds shard `ep_rank` (`shard_bounds`). For one application of a layer:
1. every token is sent ONCE to each rank that holds at least one of its K experts (<= min(K, ep) copies, not K),
   with its (row, local expert, gate) pairs;
2. the receiving rank runs its local experts on the received rows through the local backend's `mlp_rows`
   (reference or Triton): each received pair names its row (`row_index`), the pairs of one row are contiguous
   (sorted by sender, then token), so the gated outputs are summed over CSR segments (`row_offsets`). The rows are
   gathered inside the grouped matmul: no [pairs, d] copy is made or saved for backward;
3. the per-row sums go back through the reverse all-to-all and are added into the token outputs.
Split sizes are exchanged first (one small all-to-all, then the one host sync of an application, to size the buffers:
NCCL needs them; everything else is sized from those host counts, so nothing else waits for the GPU);
no capacity factor, no padding to the busiest expert. The all-to-alls are differentiable (their backward is the
reverse exchange), so expert-weight gradients land on the owner and token gradients flow back to the sender.
(Slicing an application's tokens so that one slice's all-to-all overlaps another's experts was tried and made the
step slower; docs/PARALLEL.md.)

Attention experts (SwitchHead V/O) stay replicated: they are ~10% of a layer's parameters, and dispatching them
would add two all-to-alls per layer application for little memory.

The expert shards are held *outside* the nn.Module tree (`ExpertShards`), so DeepSpeed never sees them: it would
all-reduce them over the whole world (they must be averaged only over their expert-data-parallel group) and its
MoE checkpointing only knows its own layer class. The trainer owns their optimizer, gradient reduction and
checkpoints (see train/ and parallel/expert_checkpoint.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moeut_ds.experts.interface import ExpertBackend, Routing
from moeut_ds.parallel.groups import ExpertParallelGroups


def shard_bounds(n_experts: int, ep_size: int) -> list[int]:
    """Expert id boundaries of the ep shards: shard r holds [b[r], b[r+1]) (sizes differ by at most one)."""
    return [(n_experts * r) // ep_size for r in range(ep_size + 1)]


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single into a new tensor: send in_splits[r] rows of x to rank r, receive out_splits[r] from it."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single: the backward sends the gradient back along the reverse splits. (For inputs
    that need no gradient, apply just runs forward.)"""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


@dataclass
class _Plan:
    """An application's dispatch, planned on the device: the ranks each token needs (need [ep, N]), its pairs in
    rank-major order and their (row in the block sent to that rank, local expert) metadata, and what it sends to
    each rank (counts [ep, 2]: rows, pairs)."""
    need: torch.Tensor
    pair_order: torch.Tensor
    pair_meta: torch.Tensor
    counts: torch.Tensor


def _plan(dest: torch.Tensor, expert_index: torch.Tensor, bounds: torch.Tensor, ep: int) -> _Plan:
    """dest / expert_index [N, K]: the owner rank and global id of each pair. No host sync."""
    n, k = dest.shape
    need = torch.zeros(ep, n, dtype=torch.int32, device=dest.device)
    need.scatter_(0, dest.t(), 1)                                                       # rank <- token needed
    # rank-major with tokens innermost: the scan runs along contiguous memory (a [N, ep] cumsum over dim 0 took
    # 0.76 ms per application at MoEUT-1B on the H200, docs/PERFORMANCE.md)
    row_in_block = torch.cumsum(need, 1) - 1
    pair_order = torch.argsort(dest.reshape(-1), stable=True)                           # pairs, rank-major
    pair_dest = dest.reshape(-1)[pair_order]
    pair_meta = torch.stack([row_in_block[pair_dest, pair_order // k],  # int32: half the bytes of int64
                             expert_index.reshape(-1)[pair_order] - bounds[pair_dest]], 1).int()
    # counts without bincount/nonzero (each would sync with the host to size its output)
    pairs_per_rank = torch.zeros(ep, dtype=torch.long, device=dest.device).index_add_(
        0, pair_dest, torch.ones_like(pair_dest))
    return _Plan(need, pair_order, pair_meta, torch.stack([need.sum(1, dtype=torch.long), pairs_per_rank], 1))


@dataclass
class CommStats:
    """Since the last reset: bytes this rank sent through expert all-to-alls (forward: tokens out + results back),
    token rows it sent, and (token, expert) pairs its experts received (its share of the expert work: the ranks of
    a group wait for the busiest at every exchange)."""
    bytes_sent: int = 0
    rows_sent: int = 0
    pairs_received: int = 0

    def reset(self) -> dict[str, int]:
        out = {"bytes_sent": self.bytes_sent, "rows_sent": self.rows_sent, "pairs_received": self.pairs_received}
        self.bytes_sent = self.rows_sent = self.pairs_received = 0
        return out


@dataclass
class ExpertParallelBackend(ExpertBackend):
    """Wraps a local backend; `mlp` dispatches to the expert owners, everything else runs locally."""
    local: ExpertBackend
    groups: ExpertParallelGroups
    stats: CommStats = field(default_factory=CommStats)
    name: str = "expert-parallel"
    _bounds_cache: dict = field(default_factory=dict, repr=False)

    def forward_context(self):
        return self.local.forward_context()

    def _bounds(self, n_experts: int, ep: int, device: torch.device) -> torch.Tensor:
        """Shard boundaries as a device tensor, made once (a host->device copy per call would sync)."""
        key = (n_experts, ep, str(device))
        if key not in self._bounds_cache:
            self._bounds_cache[key] = torch.tensor(shard_bounds(n_experts, ep), device=device)
        return self._bounds_cache[key]

    def route(self, logits: torch.Tensor, k: int) -> Routing:
        return self.local.route(logits, k)

    def routing(self, gate: torch.Tensor, expert_index: torch.Tensor, n_experts: int) -> Routing:
        return self.local.routing(gate, expert_index, n_experts)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, routing: Routing, *, in_group: Optional[int],
               out_group: Optional[int], activation: Optional[str] = None, in_index: Optional[torch.Tensor] = None,
               out_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.local.matmul(x, weight, routing, in_group=in_group, out_group=out_group, activation=activation,
                                 in_index=in_index, out_offsets=out_offsets)

    def mlp(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
        ep, group = self.groups.ep_size, self.groups.ep_group
        if not torch.is_autocast_enabled(x.device.type):     # fp32 shards beside a bf16 engine's activations
            w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
        if ep == 1:                                          # one shard holds every expert: nothing to send
            return self.local.mlp(x, w1, w2, routing)
        n_tokens, k = routing.expert_index.shape
        dev = x.device
        bounds = self._bounds(routing.n_experts, ep, dev)
        dest = torch.searchsorted(bounds, routing.expert_index, right=True) - 1            # [N, K] owner rank
        plan = _plan(dest, routing.expert_index, bounds, ep)
        recv_counts = _exchange(plan.counts, [1] * ep, [1] * ep, group)                    # [ep, 2]
        sent, received = torch.stack([plan.counts, recv_counts]).tolist()                  # the one host sync
        rows_out, pairs_out = [c[0] for c in sent], [c[1] for c in sent]
        rows_in, pairs_in = [c[0] for c in received], [c[1] for c in received]
        # rows travel in the dtype the experts compute in (autocast casts there anyway; the cast's backward sends
        # the gradient back in that dtype too): half the bytes of fp32 activations under bf16 autocast
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
        send_token = torch.nonzero_static(plan.need, size=sum(rows_out))[:, 1]             # rank-major
        pair_gate = routing.gate.reshape(-1)[plan.pair_order].unsqueeze(1)
        rows = _AllToAll.apply(x[send_token].to(dtype), rows_in, rows_out, group)
        meta = _exchange(plan.pair_meta, pairs_in, pairs_out, group)
        gate = _AllToAll.apply(pair_gate, pairs_in, pairs_out, group)
        # received pair rows are relative to their sender's block: shift by where that block starts
        block_start = torch.cumsum(recv_counts[:, 0], 0) - recv_counts[:, 0]
        sender = torch.repeat_interleave(torch.arange(ep, device=dev), recv_counts[:, 1], output_size=len(meta))
        row_index = meta[:, 0].long() + block_start[sender]          # non-decreasing: by sender, then token
        row_offsets = torch.searchsorted(row_index, torch.arange(rows.shape[0] + 1, device=dev))
        local = self.local.routing(gate, meta[:, 1:2].long(), w1.shape[0])
        y_rows = self.local.mlp_rows(rows, w1, w2, local, row_index, row_offsets)          # gated sum per row
        back = _AllToAll.apply(y_rows, rows_out, rows_in, group)
        out = back.new_zeros(n_tokens, back.shape[1]).index_add(0, send_token, back)
        self._count(sent, received, (x.shape[1] * dtype.itemsize, x.shape[1] * out.dtype.itemsize),
                    2 * plan.pair_meta.element_size() + routing.gate.element_size())
        return out

    def _count(self, sent: list, received: list, row_bytes: tuple[int, int], pair_bytes: int) -> None:
        """Add one application's traffic to stats: rows sent (to every rank), and bytes sent to other ranks (token
        rows out, result rows back, per-pair metadata). sent / received: [rank] = [rows, pairs]."""
        me = self.groups.ep_rank

        def total(counts: list, i: int, remote: bool = True) -> int:
            return sum(c[i] for r, c in enumerate(counts) if not (remote and r == me))

        self.stats.rows_sent += total(sent, 0, remote=False)
        self.stats.pairs_received += total(received, 1, remote=False)
        self.stats.bytes_sent += (total(sent, 0) * row_bytes[0] + total(received, 0) * row_bytes[1]
                                  + total(sent, 1) * pair_bytes)


class ExpertShards:
    """This rank's slices of every σ-MoE layer's expert weights, kept out of the nn.Module tree (see module doc)."""

    def __init__(self, model: nn.Module, groups: ExpertParallelGroups):
        self.groups = groups
        self.params: dict[str, torch.Tensor] = {}       # "layers.{g}.ffn.w1" -> local shard (leaf, requires_grad)
        self.bounds: dict[str, tuple[int, int, int]] = {}   # name -> (first expert, end, total experts)
        for g, layer in enumerate(model.layers):
            ffn = layer.ffn
            lo, hi = shard_bounds(ffn.n_experts, groups.ep_size)[groups.ep_rank:groups.ep_rank + 2]
            for attr in ("w1", "w2"):
                full = getattr(ffn, attr)
                shard = full.detach()[lo:hi].clone().requires_grad_(full.requires_grad)   # a leaf, not a Parameter
                del ffn._parameters[attr]             # DeepSpeed must not see (or all-reduce) expert shards
                setattr(ffn, attr, shard)             # plain attribute: SigmaMoE.forward reads self.w1 / self.w2
                name = f"layers.{g}.ffn.{attr}"
                self.params[name], self.bounds[name] = shard, (lo, hi, ffn.n_experts)
        self.model_backend = ExpertParallelBackend(model.expert_backend, groups)
        model.set_expert_backend(self.model_backend)

    def to(self, device: torch.device | str) -> "ExpertShards":
        for t in self.params.values():
            t.data = t.data.to(device)
        return self

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def all_reduce_gradients(self, world_size: Optional[int] = None) -> None:
        """Average expert gradients as if over the whole data-parallel world.

        The owner already holds the sum of its EP group's contributions (the all-to-all backward); summing over
        the expert-data-parallel group and dividing by the world size gives d(mean over ranks of loss)/dw.
        """
        world = world_size or self.groups.world_size
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.groups.edp_size > 1:
            dist.all_reduce(flat, group=self.groups.edp_group)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def grad_norm_sq(self) -> torch.Tensor:
        """Squared L2 norm of all expert gradients of the model (every shard counted once: summed over ep)."""
        ref = next(iter(self.params.values()))
        sq = torch.zeros((), dtype=torch.float32, device=ref.device)
        for p in self.params.values():
            if p.grad is not None:
                sq = sq + p.grad.float().pow(2).sum()
        if self.groups.ep_size > 1:
            dist.all_reduce(sq, group=self.groups.ep_group)
        return sq


def shard_experts(model: nn.Module, groups: ExpertParallelGroups) -> ExpertShards:
    """Split every σ-MoE layer's experts across the expert-parallel group (ep = 1: one shard holding all of them,
    still owned outside DeepSpeed, which is how a checkpoint saved with ep > 1 resumes on fewer ranks)."""
    if getattr(model, "cfg", None) is None or model.cfg.arch != "moeut":
        raise ValueError("expert parallelism needs an arch='moeut' model (the dense baseline has no experts)")
    return ExpertShards(model, groups)
