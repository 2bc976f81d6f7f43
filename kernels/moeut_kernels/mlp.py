"""The σ-MoE expert MLP, out[r] = sum over row r's pairs of (gate * relu(x_r W1[e])) W2[e], as one custom op
(moeut::gated_mlp and its backward; fake impls and registered autograd, like grouped.py's).

One op, not two grouped matmuls, because of where backward applies the gate. Each pair's gate scales its hidden
units h = gate * relu(x W1), so the down projection sums plainly. Backward:
- The down projection's input-gradient launch multiplies its accumulator by the gate in the epilogue, zeroes it
  where h is 0 (the ReLU mask, loaded after its K loop) and stores gate * dh * (h > 0), with dh the gradient of h.
  That product is not the gradient of any input of a down projection op on its own, so the two projections have
  to be one autograd op.
- The same epilogue writes the gate's gradient <gate dh (h > 0), h> / gate^2 = <dh, relu(x W1)> from the rows it
  stores and the mask it loaded.
- The up projection's input gradient and its weight gradient then read that product as it is: a plain sorted-A
  launch (the Gluon kernel on Hopper, as the down forward's). Before (fifteenth session), the up input gradient
  masked its A tile itself, stored the masked rows for the weight gradient and wrote the gate's gradient: 1.06 ms
  at 244M on an H200 against 0.74-0.78 for the down forward of the same shape (docs/KERNELS.md).
Rows, remote pairs (local) and determinism as in grouped.py: every kernel is a grouped.py launch. The one
exception is opt-in: combine="atomic" makes the two summed launches (the down forward and the up input-gradient)
add each pair's row into its token's sum by atomics (grouped.atomic_sums) instead of storing [P, d] rows for a
fixed-order group_sum: faster, not bitwise repeatable (docs/KERNELS.md, "The atomic combine").
"""
from __future__ import annotations

from typing import Optional

import torch

from moeut_kernels.grouped import (COMBINES, _gmm, _wgrad, aligned_operands, atomic_sums, input_grad_sums,
                                  pair_arguments, pair_sums, segment_ids)
from moeut_kernels.routing import RoutingPlan

MlpGrads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("moeut::gated_mlp", mutates_args=())
def _mlp_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor, order: torch.Tensor,
            offsets: torch.Tensor, tile_expert: torch.Tensor, tile_start: torch.Tensor, block_m: int, in_group: int,
            out_group: int, in_index: Optional[torch.Tensor] = None, out_offsets: Optional[torch.Tensor] = None,
            local: Optional[torch.Tensor] = None, combine: str = "buffer") -> tuple[torch.Tensor, torch.Tensor]:
    """(out [R, d], h [P, d_e]): h = gate * relu(x W1) in sorted pair layout (what backward keeps), out the sums of
    h W2 per row (fixed groups of out_group pairs, or out_offsets' segments). in_group 0 with in_index given.
    combine: how the sums are made (gated_mlp)."""
    plan = RoutingPlan(order, offsets, tile_expert, tile_start, w1.shape[0], block_m)
    h = torch.empty(plan.n_pairs, w1.shape[2], dtype=x.dtype, device=x.device)
    _gmm(x, in_group, w1, False, plan, h, False, relu_out=True, scale=gate, a_index=in_index)
    if combine != "buffer":
        return atomic_sums(h, w2, False, plan, out_group), h
    buf = torch.empty(plan.n_pairs, w2.shape[2], dtype=x.dtype, device=x.device)
    _gmm(h, 0, w2, False, plan, buf, True)
    return pair_sums(buf, out_group, out_offsets, None, local), h


@_mlp_op.register_fake
def _mlp_fake(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor, order: torch.Tensor,
              offsets: torch.Tensor, tile_expert: torch.Tensor, tile_start: torch.Tensor, block_m: int, in_group: int,
              out_group: int, in_index: Optional[torch.Tensor] = None, out_offsets: Optional[torch.Tensor] = None,
              local: Optional[torch.Tensor] = None, combine: str = "buffer") -> tuple[torch.Tensor, torch.Tensor]:
    n_rows = out_offsets.shape[0] - 1 if out_offsets is not None else order.shape[0] // out_group
    return x.new_empty(n_rows, w2.shape[2]), x.new_empty(order.shape[0], w1.shape[2])


@torch.library.custom_op("moeut::gated_mlp_backward", mutates_args=())
def _mlp_bwd_op(grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor,
                h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, tile_expert: torch.Tensor,
                tile_start: torch.Tensor, block_m: int, in_group: int, out_group: int, need_x: bool, need_w1: bool,
                need_w2: bool, need_g: bool, in_index: Optional[torch.Tensor] = None,
                out_offsets: Optional[torch.Tensor] = None, local: Optional[torch.Tensor] = None,
                combine: str = "buffer") -> MlpGrads:
    """(grad_x, grad_w1, grad_w2, grad_gate by pair id); one not needed comes back empty. h: the forward's.
    combine: how grad_x's per-pair rows are summed (gated_mlp)."""
    plan = RoutingPlan(order, offsets, tile_expert, tile_start, w1.shape[0], block_m)
    dy = grad_out.to(x.dtype)
    n_pairs, d, d_e = plan.n_pairs, w1.shape[1], w1.shape[2]
    out_index = segment_ids(out_offsets, n_pairs) if out_offsets is not None else None   # dy row of each pair
    remote = local is not None
    grad_x, grad_w1, grad_w2, grad_gate = (x.new_empty(0) for _ in range(4))   # distinct: outputs may not alias
    if need_w2:
        grad_w2 = torch.empty_like(w2)
        _wgrad(h, 0, dy, out_group, plan, grad_w2, b_index=out_index, remote=remote)
    if not (need_x or need_w1 or need_g):
        return grad_x, grad_w1, grad_w2, grad_gate
    # gate * dh * (h > 0) in sorted pair layout: the down projection's input gradient applies the gate and the ReLU
    # mask in its epilogue and writes the gate's gradient from the rows it stores. It is the up projection's
    # input-gradient operand and its weight gradient's, so neither of those launches masks anything.
    du = torch.empty(n_pairs, d_e, dtype=x.dtype, device=x.device)
    scale_grad = torch.empty(n_pairs, dtype=torch.float32, device=x.device) if need_g else None
    _gmm(dy, out_group, w2, True, plan, du, False, scale=gate, a_index=out_index, out_mask=h, scale_grad=scale_grad)
    if need_g:
        grad_gate = scale_grad.to(gate.dtype)
    if need_x and combine != "buffer":
        grad_x = atomic_sums(du, w1, True, plan, in_group)
    elif need_x:
        buf = torch.empty(n_pairs, d, dtype=x.dtype, device=x.device)
        _gmm(du, 0, w1, True, plan, buf, True)
        grad_x = input_grad_sums(buf, in_group, in_index, x.shape[0], local)
    if need_g and local is not None:
        grad_gate = torch.where(local, grad_gate, 0)
    if need_w1:
        grad_w1 = torch.empty_like(w1)
        _wgrad(x, in_group, du, 0, plan, grad_w1, a_index=in_index, remote=remote)
    return grad_x, grad_w1, grad_w2, grad_gate


@_mlp_bwd_op.register_fake
def _mlp_bwd_fake(grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor,
                  h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, tile_expert: torch.Tensor,
                  tile_start: torch.Tensor, block_m: int, in_group: int, out_group: int, need_x: bool,
                  need_w1: bool, need_w2: bool, need_g: bool, in_index: Optional[torch.Tensor] = None,
                  out_offsets: Optional[torch.Tensor] = None, local: Optional[torch.Tensor] = None,
                  combine: str = "buffer") -> MlpGrads:
    return (x.new_empty(x.shape) if need_x else x.new_empty(0), torch.empty_like(w1) if need_w1 else x.new_empty(0),
            torch.empty_like(w2) if need_w2 else x.new_empty(0),
            gate.new_empty(gate.shape) if need_g else x.new_empty(0))


def _mlp_setup(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    (x, w1, w2, gate, order, offsets, tile_expert, tile_start, block_m, in_group, out_group, in_index, out_offsets,
     local, combine) = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w1, w2, gate, h, order, offsets, tile_expert, tile_start, in_index, out_offsets, local)
    ctx.ints = (block_m, in_group, out_group)
    ctx.combine = combine


def _mlp_backward(ctx, grad_out: Optional[torch.Tensor], grad_h: None) -> tuple[Optional[torch.Tensor], ...]:
    x, w1, w2, gate, h, order, offsets, tile_expert, tile_start, in_index, out_offsets, local = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    if grad_out is None or not any(need):
        return (None,) * 15
    grads = torch.ops.moeut.gated_mlp_backward(grad_out, x, w1, w2, gate, h, order, offsets, tile_expert,
                                               tile_start, *ctx.ints, *need, in_index, out_offsets, local,
                                               ctx.combine)
    return (*(g if n else None for g, n in zip(grads, need)), *(None,) * 11)


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def gated_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, plan: RoutingPlan, gate: torch.Tensor, *,
              in_group: Optional[int] = None, out_group: Optional[int] = None,
              in_index: Optional[torch.Tensor] = None, out_offsets: Optional[torch.Tensor] = None,
              local: Optional[torch.Tensor] = None, combine: str = "buffer") -> torch.Tensor:
    """sum over each output row's pairs of (gate * relu(x_in W1[e])) W2[e]: x [N, d] (or [R, d] with in_index),
    w1 [E, d, d_e], w2 [E, d_e, d], gate [N, S] (differentiated). Input rows by in_group or in_index, output rows
    by out_group or out_offsets, local: as grouped_matmul's. combine: how the output and x's gradient sum each
    row's pairs: "buffer" (default: per-pair rows stored, then summed in a fixed order; bitwise repeatable) or,
    with fixed groups (in_group and out_group, no remote pairs), "atomic" (grouped.atomic_sums: each row added
    into its sum by atomics; faster, no [P, d] buffer, not repeatable)."""
    if in_group is None and in_index is None:
        raise ValueError("gated_mlp gathers its input rows: give in_group or in_index")
    if out_group is None and out_offsets is None:
        raise ValueError("gated_mlp sums its output rows: give out_group or out_offsets")
    if w2.dtype != w1.dtype or w2.shape[0] != w1.shape[0] or w2.shape[1] != w1.shape[2]:
        raise ValueError(f"w2 {tuple(w2.shape)} ({w2.dtype}) does not continue w1 {tuple(w1.shape)} ({w1.dtype})")
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r}: use one of {', '.join(COMBINES)}")
    if combine != "buffer" and (not in_group or not out_group or local is not None):
        raise ValueError(f"combine={combine!r} sums fixed groups of pairs: it needs in_group and out_group, and no "
                         f"explicit rows or remote pairs (expert parallelism); use combine='buffer' there")
    in_index, out_offsets, local, gate = pair_arguments(x, w1, plan, in_group, out_group, in_index, out_offsets,
                                                        local, gate)
    d_out = w2.shape[2]
    x, w1, w2 = aligned_operands(x, w1, w2)
    out, _ = torch.ops.moeut.gated_mlp(x, w1, w2, gate, plan.order, plan.offsets, plan.tile_expert,
                                       plan.tile_start, plan.block_m, in_group or 0, out_group or 0, in_index,
                                       out_offsets, local, combine)
    return out if out.shape[1] == d_out else out[:, :d_out]
