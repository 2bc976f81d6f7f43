"""Helpers shared by the GPU benchmarks in bench/ (imported as a sibling module: `python bench/<script>.py`)."""
from __future__ import annotations

import warnings
from typing import Callable

import torch


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
