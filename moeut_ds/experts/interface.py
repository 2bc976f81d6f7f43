"""The one expert interface every MoE projection of the model goes through.

Routing is expressed over *pairs*. A router scores N rows against G independent groups of n experts
(G = 1 for the σ-MoE feed-forward, G = H heads for SwitchHead) and keeps the top-k of each group by sigmoid, giving
S = G * k slots per row. Pair p = row * S + slot names one (row, chosen expert) combination; its global expert id is
group * n + local id, so a weight tensor holds all G * n experts stacked on dim 0.

`ExpertBackend.matmul` computes, for every pair p,  y_p = act(x_in(p) @ W[expert(p)])  and then either
- keeps y in *expert-sorted pair layout* ([P, d_out], row j <-> pair routing.order[j]), when out_group is None, or
- gate-weighted sums it into rows p // out_group ([P // out_group, d_out]).
The input row is x[p // in_group], or, when in_group is None, x is itself in expert-sorted pair layout (the output
of a previous matmul with out_group=None on the same routing). That covers all four projections:

| projection          | x                    | in_group | out_group | output                |
| FF up (+ReLU)       | tokens [N, d]        | K        | None      | sorted pairs [P, d_e] |
| FF down             | sorted pairs         | None     | K         | tokens [N, d]         |
| attention V         | tokens [N, d]        | H*K_A    | K_A       | heads [N*H, d_h]      |
| attention O         | heads [N*H, d_h]     | K_A      | H*K_A     | tokens [N, d]         |

Explicit rows (expert parallelism): a rank that receives R token rows with a variable number of pairs each cannot
use fixed groups. `in_index` [P] (the input row of each pair, used instead of p // in_group) and `out_offsets`
[R+1] (CSR segments of contiguous pair ids, gate-weighted summed into each output row, used instead of fixed
out_group) describe that layout; `mlp_rows` is the FF expert computation on it. The received rows are gathered
inside the grouped matmul, so no [P, d] copy of them is made (or saved for backward).

Remote pairs (expert parallelism by all-gather: a rank sees every token of its group but holds only the experts
[lo, hi)): `shard_routing` gives them the id n_experts and marks the others in `Routing.local`. They sort last, past
offsets[-1], are never computed, add nothing to any sum, and get zero gradients; outputs in sorted pair layout are
meaningless at their positions.

Backends (reference PyTorch, Triton, expert-parallel) implement `route` and `matmul`; `mlp` (the whole FF expert
computation) is a separate entry point so expert parallelism can ship tokens once per FF layer.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch


@dataclass
class Routing:
    """Chosen experts, their gates, and the pairs sorted by expert (what grouped matmuls need)."""
    gate: torch.Tensor           # [N, S] sigmoid gate of each chosen expert (differentiable w.r.t. the logits)
    expert_index: torch.Tensor   # [N, S] int64 global expert id
    n_experts: int               # total experts addressed (G * n)
    order: torch.Tensor          # [P] int64: pair ids sorted by expert (stable)
    offsets: torch.Tensor        # [n_experts + 1] int64: start of each expert's pairs in `order`
    local: Optional[torch.Tensor] = None   # [N, S] bool: the pairs computed here (None: all; see shard_routing)

    @property
    def n_pairs(self) -> int:
        return self.expert_index.numel()

    @property
    def counts(self) -> torch.Tensor:
        """Pairs routed to each expert: [n_experts] int64 on the device, no host sync (remote pairs of
        `shard_routing` are not counted)."""
        return self.offsets[1:] - self.offsets[:-1]


class ExpertBackend(ABC):
    """Runs tokens through experts. Stateless; selected by name with `moeut_ds.experts.get_backend`."""

    name: str = "abstract"

    def route(self, logits: torch.Tensor, k: int) -> Routing:
        """logits [N, G, n] (raw router scores) -> top-k per group by sigmoid, no renormalisation."""
        gate, expert_index = sigmoid_topk(logits, k)
        return self.routing(gate, expert_index, logits.shape[1] * logits.shape[2])

    def forward_context(self) -> ContextManager:
        """Entered by the model around one forward pass: a backend may keep per-pass state in it (the Triton backend
        keeps one low-precision copy of each expert weight for all applications of a shared layer)."""
        return contextlib.nullcontext()

    @abstractmethod
    def routing(self, gate: torch.Tensor, expert_index: torch.Tensor, n_experts: int) -> Routing:
        """Build the routing metadata for given gates and expert ids [N, S] (expert parallelism routes on one
        rank and computes on another, so it needs this separately from `route`). An id equal to n_experts is a
        remote pair: sorted last, past offsets[-1] (see shard_routing)."""

    def shard_routing(self, gate: torch.Tensor, expert_index: torch.Tensor, lo: int, hi: int) -> Routing:
        """Routing of every pair of expert_index [N, S] (global ids) over the experts [lo, hi) held here: theirs
        become local ids e - lo, every other pair is remote (module docstring)."""
        local = (expert_index >= lo) & (expert_index < hi)
        routing = self.routing(gate, torch.where(local, expert_index - lo, hi - lo), hi - lo)
        routing.local = local
        return routing

    @abstractmethod
    def matmul(self, x: torch.Tensor, weight: torch.Tensor, routing: Routing, *, in_group: Optional[int],
               out_group: Optional[int], activation: Optional[str] = None, in_index: Optional[torch.Tensor] = None,
               out_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Grouped expert matmul over pairs; see the module docstring for the layouts. in_index (excludes
        in_group) and out_offsets (excludes out_group; offsets[0] = 0, offsets[-1] = P) are the explicit-rows
        forms of the two groupings."""

    def mlp(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
        """σ-MoE experts: sum_k gate_k * relu(x @ W1[e_k]) @ W2[e_k] for x [N, d] -> [N, d]."""
        k = routing.expert_index.shape[1]
        h = self.matmul(x, w1, routing, in_group=k, out_group=None, activation="relu")
        return self.matmul(h, w2, routing, in_group=None, out_group=k)

    def mlp_rows(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, routing: Routing,
                 row_index: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """σ-MoE experts over rows with variable pair counts: x [R, d], routing over P pairs, row_index [P] the
        row of each pair and row_offsets [R+1] its CSR form (row r owns pairs [row_offsets[r], row_offsets[r+1]),
        so row_index must be non-decreasing). Returns [R, d] = sum over r's pairs of gate * relu(x_r W1) W2.
        Both forms are passed because the caller has them for free and either would cost a pass to derive."""
        h = self.matmul(x, w1, routing, in_group=None, out_group=None, activation="relu", in_index=row_index)
        return self.matmul(h, w2, routing, in_group=None, out_group=None, out_offsets=row_offsets)


def segment_ids(offsets: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """[P] int64 segment of each pair id from CSR offsets [R+1] (empty segments skipped); no host sync."""
    pairs = torch.arange(n_pairs, device=offsets.device, dtype=torch.int64)
    return torch.searchsorted(offsets[1:].to(torch.int64).contiguous(), pairs, right=True)


def sort_pairs(expert_index: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert (stable) and per-expert offsets; plain PyTorch, no host sync. Remote pairs (id
    n_experts) sort last and are left out of the offsets."""
    flat = expert_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts]
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def sigmoid_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per group by sigmoid score: gates [N, G*k] and global expert ids [N, G*k]."""
    n_rows, n_groups, n = logits.shape
    gate, local = torch.sigmoid(logits).topk(k, dim=-1, sorted=False)
    base = torch.arange(n_groups, device=logits.device, dtype=local.dtype).unsqueeze(-1) * n
    return gate.reshape(n_rows, n_groups * k), (local + base).reshape(n_rows, n_groups * k)
