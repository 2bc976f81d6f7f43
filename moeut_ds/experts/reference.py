"""Reference expert backend in plain PyTorch: exact, device-agnostic, no Python loop over experts.

Pairs are sorted by expert and packed into a zero-padded [E, max_count, d_in] tensor so that one `torch.bmm` does
every expert at once. The padding costs memory (E * max_count rows) and `max_count` needs a host sync (so does
leaving out remote pairs): fine for tests and CPU runs; the Triton backend removes both.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moeut_ds.experts.interface import ExpertBackend, Routing, segment_ids, sort_pairs


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, expert_sorted: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """rows [P, d_in] sorted by expert (expert_sorted [P]) times weight[expert] -> [P, d_out]."""
    n_experts, d_in, _ = weight.shape
    n_pairs = rows.shape[0]
    counts = offsets[1:] - offsets[:-1]
    capacity = int(counts.max()) if n_pairs else 0
    position = torch.arange(n_pairs, device=rows.device) - offsets[expert_sorted]
    padded = rows.new_zeros(n_experts, capacity, d_in)
    padded[expert_sorted, position] = rows
    return torch.bmm(padded, weight)[expert_sorted, position]


class ReferenceBackend(ExpertBackend):
    name = "reference"

    def routing(self, gate: torch.Tensor, expert_index: torch.Tensor, n_experts: int) -> Routing:
        order, offsets = sort_pairs(expert_index, n_experts)
        return Routing(gate=gate, expert_index=expert_index, n_experts=n_experts, order=order, offsets=offsets)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, routing: Routing, *, in_group: Optional[int],
               out_group: Optional[int], activation: Optional[str] = None, in_index: Optional[torch.Tensor] = None,
               out_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if in_index is not None and in_group is not None:
            raise ValueError("give in_group or in_index, not both")
        if out_offsets is not None and out_group is not None:
            raise ValueError("give out_group or out_offsets, not both")
        order = routing.order
        n_remote = routing.n_pairs - int(routing.offsets[-1])       # remote pairs sort last: leave them out
        order = order[:order.numel() - n_remote]
        expert_sorted = routing.expert_index.reshape(-1)[order]
        if in_index is not None:
            rows = x[in_index.reshape(-1)[order]]
        else:
            rows = x[:order.numel()] if in_group is None else x[order // in_group]
        y = grouped_matmul(rows, weight, expert_sorted, routing.offsets)
        if activation == "relu":
            y = F.relu(y)
        elif activation is not None:
            raise ValueError(f"unknown activation {activation!r}; supported: 'relu' or None")
        if out_group is None and out_offsets is None:
            return torch.cat([y, y.new_zeros(n_remote, y.shape[1])]) if n_remote else y
        y = y * routing.gate.reshape(-1)[order].unsqueeze(1).to(y.dtype)
        if out_offsets is not None:
            out = y.new_zeros(out_offsets.numel() - 1, y.shape[1])
            return out.index_add(0, segment_ids(out_offsets, routing.n_pairs)[order], y)
        out = y.new_zeros(routing.n_pairs // out_group, y.shape[1])
        return out.index_add(0, order // out_group, y)
