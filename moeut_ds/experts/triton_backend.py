"""Triton expert backend: fused σ-gating and dropless grouped matmuls from `moeut_kernels`, no host syncs.

Imported lazily (see experts/__init__.py) so that `import moeut_ds` never imports Triton. CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from moeut_ds.experts.interface import ExpertBackend, Routing, segment_ids
from moeut_kernels import (RoutingPlan, gated_mlp, grouped_matmul, plan_from_expert_index, plan_from_sorted,
                           sigmoid_topk_route)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class TritonRouting(Routing):
    """Routing plus the tile list (BLOCK_M rows inside one expert) the grouped matmuls walk."""
    plan: Optional[RoutingPlan] = None


class TritonBackend(ExpertBackend):
    name = "triton"

    def __init__(self, block_m: Optional[int] = None, combine: str = "buffer"):
        # 128-row tiles on the GPU (pads each expert by < 128 rows in the tile list only); small in the interpreter
        # so that tests cross tile boundaries with tiny shapes.
        self.block_m = block_m or (16 if _INTERPRET else 128)
        # How the σ-MoE MLP sums each token's K expert outputs (and its input gradient): moeut_kernels.gated_mlp.
        self.combine = combine
        self._casts: Optional[dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor, int]]] = None

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Within one forward pass, cast each expert weight to the autocast dtype once, not once per application of
        its shared layer: one bf16 copy is saved for backward instead of R, and R casts (and R fp32 gradient
        accumulations) become one. autocast does the same for nn.Linear weights; as there, the R weight-gradient
        contributions are then summed in bf16 before the single cast back to fp32."""
        outer = self._casts
        self._casts = {} if outer is None else outer
        try:
            yield
        finally:
            self._casts = outer

    def _cast(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if weight.dtype == dtype or self._casts is None or torch.compiler.is_compiling():
            return weight.to(dtype)
        key = (id(weight), dtype)
        hit = self._casts.get(key)
        if hit is not None and hit[0] is weight and hit[2] == weight._version:
            return hit[1]
        cast = weight.to(dtype)
        self._casts[key] = (weight, cast, weight._version)
        return cast

    @staticmethod
    def runs_on(device: torch.device) -> bool:
        """CUDA, or any device under Triton's interpreter (TRITON_INTERPRET=1: CPU tests)."""
        return device.type == "cuda" or _INTERPRET

    def _check_device(self, t: torch.Tensor) -> None:
        if not self.runs_on(t.device):
            raise RuntimeError("the triton expert backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")

    def route(self, logits: torch.Tensor, k: int) -> Routing:
        self._check_device(logits)
        gate, expert_index, plan = sigmoid_topk_route(logits, k, self.block_m)
        return TritonRouting(gate=gate, expert_index=expert_index, n_experts=plan.n_experts, order=plan.order,
                             offsets=plan.offsets, plan=plan)

    def routing(self, gate: torch.Tensor, expert_index: torch.Tensor, n_experts: int) -> Routing:
        """Metadata for experts chosen elsewhere (expert parallelism); gate passes through untouched."""
        self._check_device(expert_index)
        plan = plan_from_expert_index(expert_index, n_experts, self.block_m)
        return TritonRouting(gate=gate, expert_index=expert_index, n_experts=n_experts, order=plan.order,
                             offsets=plan.offsets, plan=plan)

    def _plan(self, routing: Routing) -> RoutingPlan:
        plan = getattr(routing, "plan", None)
        if plan is not None and plan.block_m == self.block_m:
            return plan
        return plan_from_sorted(routing.order, routing.offsets, self.block_m)  # a routing made by another backend

    def _operands(self, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x and the weights in the autocast dtype (what autocast does for the reference's bmm), or x's dtype."""
        self._check_device(x)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return (x.to(dtype), *(self._cast(w, dtype) for w in weights))

    def mlp(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
        k = routing.expert_index.shape[1]
        return self._gated_mlp(x, w1, w2, routing, in_group=k, out_group=k)

    def mlp_rows(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, routing: Routing,
                 row_index: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        return self._gated_mlp(x, w1, w2, routing, in_index=row_index, out_offsets=row_offsets)

    def _gated_mlp(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, routing: Routing, *,
                   in_group: Optional[int] = None, out_group: Optional[int] = None,
                   in_index: Optional[torch.Tensor] = None, out_offsets: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """The σ-MoE experts as one op (moeut_kernels.gated_mlp): each pair's gate applied to its hidden units,
        (gate * relu(x W1)) W2 summed per row, the same value as gating the output, with a cheaper backward
        (mlp.py's docstring)."""
        x, w1, w2 = self._operands(x, w1, w2)
        return gated_mlp(x, w1, w2, self._plan(routing), routing.gate, in_group=in_group, out_group=out_group,
                         in_index=in_index, out_offsets=out_offsets, local=routing.local,
                         combine=self.combine)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, routing: Routing, *, in_group: Optional[int],
               out_group: Optional[int], activation: Optional[str] = None, in_index: Optional[torch.Tensor] = None,
               out_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, weight = self._operands(x, weight)
        plan = self._plan(routing)
        summed = out_group is not None or out_offsets is not None
        if activation is not None and summed:
            # Not fused (the fused gate gradient needs a linear output); no projection of the model uses it.
            y = grouped_matmul(x, weight, plan, in_group=in_group, out_group=None, activation=activation,
                               in_index=in_index, local=routing.local)
            if routing.local is not None:    # remote rows were never written: zero them before the gate (NaN * 0)
                y = torch.where(routing.local.reshape(-1)[routing.order].unsqueeze(1), y, 0)
            y = y * routing.gate.reshape(-1)[routing.order].unsqueeze(1).to(y.dtype)
            if out_offsets is not None:
                out = y.new_zeros(out_offsets.numel() - 1, y.shape[1])
                return out.index_add(0, segment_ids(out_offsets, routing.n_pairs)[routing.order], y)
            out = y.new_zeros(routing.n_pairs // out_group, y.shape[1])
            return out.index_add(0, routing.order // out_group, y)
        return grouped_matmul(x, weight, plan, in_group=in_group, out_group=out_group,
                              gate=routing.gate if summed else None, activation=activation, in_index=in_index,
                              out_offsets=out_offsets, local=routing.local,
                              experts=routing.expert_index if summed else None)
