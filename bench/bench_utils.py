"""Helpers shared by the GPU benchmarks in bench/ (imported as a sibling module: `python bench/<script>.py`)."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from moeut_kernels import grouped

# Our kernels by the names they launch under: every *_kernel of moeut_kernels' kernel modules, so that a new one
# lands in its category of the profile tables, not in "other" (window_tiles_kernel and pair_key_kernel did).
OURS = sorted({name for module in (grouped.K, grouped.GL) if module is not None for name in dir(module)
               if name.endswith("_kernel")})
MATMULS = tuple(name for name in OURS if "gmm" in name or "wgrad" in name)
# Kernel-name substrings per category of the profile tables (first match wins).
CATEGORIES = (
    ("expert matmuls (ours)", MATMULS),
    ("expert sums and routing (ours)", tuple(name for name in OURS if name not in MATMULS)),
    ("attention core", ("flash", "fmha", "attention", "Attention")),
    ("cuBLAS matmuls", ("gemm", "nvjet", "xmma", "cutlass")),
    ("sorts", ("radix", "Radix", "sort", "Sort")),
    ("optimizer", ("multi_tensor", "adam", "Adam")),
    ("inductor-generated (norms, elementwise, loss)", ("triton_",)),
    ("other", ("",)),
)


def category(kernel: str) -> str:
    """The profile table's category of a kernel name (CATEGORIES' first match)."""
    return next(label for label, keys in CATEGORIES if any(k in kernel for k in keys))


def device_kernels(prof: "torch.profiler.profile") -> list:
    """The profiled kernels (key averages with self device time), longest first."""
    avgs = prof.key_averages()
    events = [e for e in avgs if "CUDA" in str(getattr(e, "device_type", "")) and e.self_device_time_total > 0]
    if not events:   # older profilers: no device_type on the averages
        events = [e for e in avgs if getattr(e, "self_device_time_total", 0) > 0]
    return sorted(events, key=lambda e: e.self_device_time_total, reverse=True)


def time_by_category(events: list) -> dict[str, float]:
    """Self device time (us) of device_kernels' events per CATEGORIES label, in the categories' order."""
    by_cat = {label: 0.0 for label, _ in CATEGORIES}
    for e in events:
        by_cat[category(e.key)] += e.self_device_time_total
    return by_cat


def count_syncs(fn: Callable[[], object], warm: bool = True) -> int:
    """Host syncs in one fn() call (after one uncounted call when warm), counted with torch's sync debug mode, which
    warns once per synchronising call; its own one-time notice about the prototype feature is not a sync."""
    if warm:
        fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("called a synchronizing" in str(w.message) for w in caught)


def own_grad_buffers(model: torch.nn.Module) -> None:
    """For CUDA graphs (torch.compile reduce-overhead) with gradient accumulation: zeroed .grad buffers of our own,
    allocated once, so autograd accumulates into them and never adopts a graph's static gradient output as .grad,
    which the next micro-batch's replay would overwrite. Zero them with zero_grad(set_to_none=False) after a step."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
