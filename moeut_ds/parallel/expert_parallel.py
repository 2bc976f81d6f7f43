"""Expert parallelism for the σ-MoE feed-forward: dropless dispatch behind the expert interface.

Each σ-MoE layer's N_E experts are split into ep contiguous shards; rank `ep_rank` of an expert-parallel group
holds shard `ep_rank` (`shard_bounds`). Two dispatches, both dropless (`expert_dispatch`, `choose_dispatch`):

**all-gather** (the default for ep = 2): every rank gathers every token of its group with the tokens' K gates
and expert ids (one all_gather of packed rows), computes the pairs that fall in its shard through the local
backend's `mlp` (`shard_routing`: the other pairs are remote, never computed), and one reduce_scatter sums the
ranks' partial outputs back onto each token's own rank. Fixed sizes: no counts exchange, no host sync, so the
host runs ahead of the GPU as in a one-GPU step. With K >= 16 of hundreds of experts nearly every token has an
expert on every rank, so it moves what the all-to-all moves at ep = 2; it costs per-pair buffers sized for all
ep * N * K pairs of the group (the ReLU output kept for backward is ep times the one-GPU size), which is why the
all-to-all stays the default above ep = 2.

**all-to-all**, for one application of a layer:
1. every token is sent ONCE to each rank that holds at least one of its K experts (<= min(K, ep) copies, not K).
   Packed beside the row in the same message go its K gates and K slots naming the local expert of each (-1 where
   another rank owns it): one all-to-all per direction, not one per tensor;
2. the receiving rank runs its local experts on the received rows through the local backend's `mlp_rows`
   (reference or Triton): its pairs are the valid slots in row order (`row_index`), so the gated outputs are
   summed over CSR segments (`row_offsets`). The rows are gathered inside the grouped matmul: no [pairs, d] copy
   is made or saved for backward;
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

from moeut_ds.config import ConfigError
from moeut_ds.experts.interface import ExpertBackend, Routing
from moeut_ds.parallel.groups import ExpertParallelGroups


def shard_bounds(n_experts: int, ep_size: int) -> list[int]:
    """Expert id boundaries of the ep shards: shard r holds [b[r], b[r+1]) (sizes differ by at most one)."""
    return [(n_experts * r) // ep_size for r in range(ep_size + 1)]


DISPATCHES = ("auto", "allgather", "alltoall")


def choose_dispatch(dispatch: str, ep: int) -> str:
    """'auto' -> 'allgather' for ep <= 2 (same bytes as the all-to-all at MoEUT's K, no host sync; measured faster
    on two H200, docs/PARALLEL.md), 'alltoall' above (the all-gather's per-pair buffers grow with ep)."""
    if dispatch not in DISPATCHES:
        raise ConfigError(f"expert_dispatch={dispatch!r}: use one of {', '.join(DISPATCHES)}")
    if dispatch == "auto":
        return "allgather" if ep <= 2 else "alltoall"
    return dispatch


# all_gather_single / reduce_scatter_single replace the *_tensor names in torch 2.13 (same arguments)
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _gather(x: torch.Tensor, ep: int, group) -> torch.Tensor:
    """[R, ...] on each of the ep ranks -> [ep * R, ...], rank-major."""
    out = x.new_empty((ep * x.shape[0],) + tuple(x.shape[1:]))
    _ALL_GATHER(out, x.contiguous(), group=group)
    return out


def _scatter_sum(x: torch.Tensor, ep: int, group) -> torch.Tensor:
    """[ep * R, ...] on each rank -> [R, ...]: rank r gets the sum over ranks of rows [r * R, (r + 1) * R)."""
    out = x.new_empty((x.shape[0] // ep,) + tuple(x.shape[1:]))
    _REDUCE_SCATTER(out, x.contiguous(), group=group)
    return out


class _GatherTokens(torch.autograd.Function):
    """Every rank's token rows with their gates and expert ids, in one all_gather of packed rows. Backward: the
    ranks' gradients of every row and gate are summed onto the rows' own rank (two reduce_scatters: the row and
    gate gradients differ in dtype, and packed bytes cannot be summed)."""

    @staticmethod
    def forward(ctx, rows, gate, expert_index, ep, group):
        ctx.ep, ctx.group = ep, group
        gathered = _gather(_pack([expert_index, gate, rows]), ep, group)
        index_all, gate_all, rows_all = _unpack(gathered, [expert_index, gate, rows])
        ctx.mark_non_differentiable(index_all)
        return rows_all, gate_all, index_all

    @staticmethod
    def backward(ctx, grad_rows, grad_gate, _):
        return (_scatter_sum(grad_rows, ctx.ep, ctx.group), _scatter_sum(grad_gate, ctx.ep, ctx.group), None, None,
                None)


class _ScatterSum(torch.autograd.Function):
    """Partial outputs for every token of the group -> this rank's tokens, summed over ranks. Backward: all_gather."""

    @staticmethod
    def forward(ctx, y, ep, group):
        ctx.ep, ctx.group = ep, group
        return _scatter_sum(y, ep, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.ep, ctx.group), None, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single into a new tensor: send in_splits[r] rows of x to rank r, receive out_splits[r] from it."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single: the backward sends the gradient back along the reverse splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _row_bytes(t: torch.Tensor) -> int:
    return t.shape[1:].numel() * t.element_size()


def _layout(parts: list[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offset of each part inside a packed row (aligned to its element size) and the row width (a multiple
    of 4), so that every part can be viewed back from the packed bytes."""
    starts, width = [], 0
    for t in parts:
        width += -width % t.element_size()
        starts.append(width)
        width += _row_bytes(t)
    return starts, width + -width % 4


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """[R, ...] tensors with one row count -> one [R, W] uint8 tensor laid out by `_layout`."""
    rows = parts[0].shape[0]
    starts, width = _layout(parts)
    buf = parts[0].new_zeros((rows, width), dtype=torch.uint8)
    for t, start in zip(parts, starts):
        buf[:, start:start + _row_bytes(t)] = t.reshape(rows, t.shape[1:].numel()).contiguous().view(torch.uint8)
    return buf


def _unpack(buf: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of `_pack` for parts with the per-row shape and dtype of `like` (any row count)."""
    starts, _ = _layout(like)
    return [buf[:, s:s + _row_bytes(t)].contiguous().view(t.dtype).reshape((buf.shape[0],) + tuple(t.shape[1:]))
            for t, s in zip(like, starts)]


class _Dispatch(torch.autograd.Function):
    """Token rows with their gates and expert slots ([R, ...] each) in one all_to_all_single of packed rows.
    Backward: the row and gate gradients go back, packed the same way, in one reverse exchange."""

    @staticmethod
    def forward(ctx, rows, gate, slots, out_splits, in_splits, group):
        # shape and dtype only: a [:0] view would keep the whole sent rows alive until the backward (~7 GiB at
        # MoEUT-1B, 32k tokens per GPU)
        ctx.like = tuple(t.new_empty((0,) + tuple(t.shape[1:])) for t in (gate, rows))
        ctx.splits, ctx.group = (out_splits, in_splits), group
        received = _exchange(_pack([slots, gate, rows]), out_splits, in_splits, group)
        slots_in, gate_in, rows_in = _unpack(received, [slots, gate, rows])
        ctx.mark_non_differentiable(slots_in)
        return rows_in, gate_in, slots_in

    @staticmethod
    def backward(ctx, grad_rows, grad_gate, _):
        out_splits, in_splits = ctx.splits
        gate_like, rows_like = ctx.like
        back = _exchange(_pack([grad_gate.to(gate_like.dtype), grad_rows.to(rows_like.dtype)]), in_splits,
                         out_splits, ctx.group)
        grad_gate, grad_rows = _unpack(back, [gate_like, rows_like])
        return grad_rows, grad_gate, None, None, None, None


def _plan(dest: torch.Tensor, ep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dest [N, K]: the owner rank of each pair -> the ranks each token needs (need [ep, N], int32) and what this
    rank sends to each (counts [ep, 2]: rows, pairs). No host sync (bincount or nonzero would size their outputs on
    the host)."""
    n, k = dest.shape
    need = torch.zeros(ep, n, dtype=torch.int32, device=dest.device)
    need.scatter_(0, dest.t(), 1)                                                       # rank <- token needed
    pairs = torch.zeros(ep, dtype=torch.long, device=dest.device).index_add_(
        0, dest.reshape(-1), torch.ones(n * k, dtype=torch.long, device=dest.device))
    return need, torch.stack([need.sum(1, dtype=torch.long), pairs], 1)


@dataclass
class CommStats:
    """Since the last reset: bytes this rank sent to other ranks through the expert dispatch (forward: tokens out +
    results back), token rows it sent (to every rank, itself included), and (token, expert) pairs its experts
    computed (its share of the expert work: the ranks of a group wait for the busiest at every exchange).

    Held in one int64 tensor on the device, added to in place and read at `read` / `reset`: the all-gather knows
    its pair count only on the device, and a compiled forward guards on Python ints it changes (recompiling the
    model at every step) but not on a tensor's values. Scalar adds: no host-to-device copy, so no sync."""
    totals: Optional[torch.Tensor] = None          # [bytes_sent, rows_sent, pairs_received]
    KEYS = ("bytes_sent", "rows_sent", "pairs_received")

    def to(self, device: torch.device | str) -> "CommStats":
        """Made (or moved) before any compiled forward: making it inside one would recompile at the second."""
        self.totals = (torch.zeros(len(self.KEYS), dtype=torch.int64, device=device) if self.totals is None
                       else self.totals.to(device))
        return self

    def add(self, device: torch.device, bytes_sent: int, rows_sent: int, pairs_received: int | torch.Tensor) -> None:
        if self.totals is None:
            self.to(device)
        self.totals[0] += bytes_sent
        self.totals[1] += rows_sent
        self.totals[2] += pairs_received

    def read(self) -> dict[str, int]:
        return dict(zip(self.KEYS, self.totals.tolist() if self.totals is not None else [0] * len(self.KEYS)))

    def reset(self) -> dict[str, int]:
        out = self.read()
        if self.totals is not None:
            self.totals.zero_()                    # the same tensor: a compiled forward keeps adding to it
        return out


@dataclass
class ExpertParallelBackend(ExpertBackend):
    """Wraps a local backend; `mlp` dispatches to the expert owners, everything else runs locally. dispatch:
    'allgather' or 'alltoall' (module docstring; `choose_dispatch` resolves 'auto')."""
    local: ExpertBackend
    groups: ExpertParallelGroups
    dispatch: str
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
        dev = x.device
        # rows travel in the dtype the experts compute in (autocast casts there anyway; the cast's backward sends
        # the gradient back in that dtype too): half the bytes of fp32 activations under bf16 autocast
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
        if self.dispatch == "allgather":
            return self._mlp_allgather(x.to(dtype), w1, w2, routing)
        n_tokens, k = routing.expert_index.shape
        bounds = self._bounds(routing.n_experts, ep, dev)
        dest = torch.searchsorted(bounds, routing.expert_index, right=True) - 1            # [N, K] owner rank
        need, counts = _plan(dest, ep)
        recv_counts = _exchange(counts, [1] * ep, [1] * ep, group)                         # [ep, 2]
        sent, received = torch.stack([counts, recv_counts]).tolist()                       # the one host sync
        rows_out, rows_in = [c[0] for c in sent], [c[0] for c in received]
        to_rank, send_token = torch.nonzero_static(need, size=sum(rows_out)).unbind(1)   # rank-major
        # each sent row's K slots: the expert's id in the receiving shard, or -1 where another rank owns it
        slots = torch.where(dest[send_token] == to_rank[:, None],
                            routing.expert_index[send_token] - bounds[to_rank][:, None], -1).int()
        rows, gate, slots = _Dispatch.apply(x[send_token].to(dtype), routing.gate[send_token], slots, rows_in,
                                            rows_out, group)
        pair = torch.nonzero_static(slots.reshape(-1) >= 0, size=sum(c[1] for c in received))[:, 0]
        row_index = pair // k                                        # non-decreasing: by sender, then token
        row_offsets = torch.searchsorted(row_index, torch.arange(rows.shape[0] + 1, device=dev))
        local = self.local.routing(gate.reshape(-1)[pair].unsqueeze(1), slots.reshape(-1)[pair].long().unsqueeze(1),
                                   w1.shape[0])
        y_rows = self.local.mlp_rows(rows, w1, w2, local, row_index, row_offsets)          # gated sum per row
        back = _AllToAll.apply(y_rows, rows_out, rows_in, group)
        out = back.new_zeros(n_tokens, back.shape[1]).index_add(0, send_token, back)
        self._count(dev, sent, received, _layout([slots, gate, rows])[1], _row_bytes(back))
        return out

    def _mlp_allgather(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The all-gather dispatch (module docstring): no host sync, every size fixed."""
        ep, group, me = self.groups.ep_size, self.groups.ep_group, self.groups.ep_rank
        lo, hi = shard_bounds(routing.n_experts, ep)[me:me + 2]
        index = routing.expert_index.int()
        rows, gate, index = _GatherTokens.apply(x, routing.gate, index, ep, group)
        shard = self.local.shard_routing(gate, index.long(), lo, hi)
        y = _ScatterSum.apply(self.local.mlp(rows, w1, w2, shard), ep, group)
        n = x.shape[0]
        self.stats.add(x.device, (ep - 1) * n * (_layout([index, gate, x])[1] + _row_bytes(y)), ep * n,
                       shard.offsets[-1])
        return y

    def _count(self, device: torch.device, sent: list, received: list, packed_row_bytes: int,
               result_row_bytes: int) -> None:
        """Add one application's traffic to stats: rows sent (to every rank), pairs received, and bytes sent to
        other ranks (packed token rows out, result rows back). sent / received: [rank] = [rows, pairs]."""
        me = self.groups.ep_rank

        def total(counts: list, i: int, remote: bool = True) -> int:
            return sum(c[i] for r, c in enumerate(counts) if not (remote and r == me))

        self.stats.add(device, total(sent, 0) * packed_row_bytes + total(received, 0) * result_row_bytes,
                       total(sent, 0, remote=False), total(received, 1, remote=False))


class ExpertShards:
    """This rank's slices of every σ-MoE layer's expert weights, kept out of the nn.Module tree (see module doc)."""

    def __init__(self, model: nn.Module, groups: ExpertParallelGroups, dispatch: str = "auto"):
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
        self.model_backend = ExpertParallelBackend(model.expert_backend, groups,
                                                   choose_dispatch(dispatch, groups.ep_size))
        model.set_expert_backend(self.model_backend)

    def to(self, device: torch.device | str) -> "ExpertShards":
        for t in self.params.values():
            t.data = t.data.to(device)
        self.model_backend.stats.to(device)
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


def shard_experts(model: nn.Module, groups: ExpertParallelGroups, dispatch: str = "auto") -> ExpertShards:
    """Split every σ-MoE layer's experts across the expert-parallel group (ep = 1: one shard holding all of them,
    still owned outside DeepSpeed, which is how a checkpoint saved with ep > 1 resumes on fewer ranks). dispatch:
    'auto', 'allgather' or 'alltoall' (module docstring)."""
    if getattr(model, "cfg", None) is None or model.cfg.arch != "moeut":
        raise ValueError("expert parallelism needs an arch='moeut' model (the dense baseline has no experts)")
    return ExpertShards(model, groups, dispatch)
