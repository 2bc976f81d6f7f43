"""Triton kernels for MoEUT-style σ-MoE layers: σ-gating with expert-sorted routing, and a dropless grouped expert
matmul family (forward, input gradient, deterministic weight gradient), and the σ-MoE expert MLP built from it.
No model knowledge lives here.

Set TRITON_INTERPRET=1 before importing to run everything on CPU tensors (tests).
"""
from moeut_kernels.grouped import TileConfig, group_sum, grouped_matmul, segment_sum
from moeut_kernels.mlp import gated_mlp
from moeut_kernels.routing import (RoutingPlan, max_tiles, plan_from_expert_index, plan_from_sorted,
                                   sigmoid_topk_route)

__all__ = ["RoutingPlan", "TileConfig", "gated_mlp", "group_sum", "grouped_matmul", "max_tiles",
           "plan_from_expert_index", "plan_from_sorted", "segment_sum", "sigmoid_topk_route"]
