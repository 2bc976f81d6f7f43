"""The σ-MoE feed-forward experts through MegaBlocks' grouped path: an optional backend, for comparison.

What MegaBlocks' dMoE runs with `mlp_impl='grouped'`, fed with this project's σ-gating: its gather (one copied row
per (token, expert) pair, in expert order), grouped_gemm's CUTLASS grouped GEMMs (up, ReLU, down) and its scatter
(gate-weighted, through a [tokens, K, d] buffer and a sum). Routing and SwitchHead's V/O projections stay on the
Triton kernels (this class is the Triton backend with `mlp` replaced).

Registered as expert backend "megablocks" only when `megablocks` and `grouped_gemm` import: they need CUDA and a
source build (`bench/build_megablocks.sh`, with grouped_gemm's CUTLASS kernels, GROUPED_GEMM_CUTLASS=1, which take
the per-expert counts on the device). bf16 only (grouped_gemm's kernels), i.e. under bf16 autocast or with bf16
weights. Not for expert parallelism (its received rows need the explicit-rows form, `mlp_rows`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeut_ds.experts.interface import Routing
from moeut_ds.experts.triton_backend import TritonBackend


class MegaBlocksBackend(TritonBackend):
    name = "megablocks"

    def mlp(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
        from grouped_gemm.ops import gmm
        from megablocks import ops

        self._check_device(x)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if dtype != torch.bfloat16:
            raise TypeError(f"the megablocks expert backend runs bf16 only (grouped_gemm), got {dtype}: train with "
                            f"bf16 autocast (ds_configs/*_bf16.json) or use expert_backend=triton")
        x, w1, w2 = x.to(dtype), self._cast(w1, dtype), self._cast(w2, dtype)
        slots = routing.expert_index.shape[1]
        indices = routing.order.int()                                       # pair ids in expert order
        bin_ids = routing.expert_index.reshape(-1)[routing.order].int()     # expert of each sorted position
        bins = routing.offsets[1:].int()                                    # inclusive end of each expert's rows
        counts = routing.counts                                             # int64 on the device (CUTLASS build)
        with torch.autocast(dev, enabled=False):
            rows = ops.gather(x, indices, bin_ids, bins, slots)
            y = gmm(F.relu(gmm(rows, w1, counts)), w2, counts)
            return ops.scatter(y, indices, bin_ids, routing.gate.reshape(-1).to(dtype), bins, slots)

    def mlp_rows(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, routing: Routing,
                 row_index: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the megablocks expert backend does not support expert parallelism: use "
                                  "expert_backend=triton with expert_parallel_size > 1")
