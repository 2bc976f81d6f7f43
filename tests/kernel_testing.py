"""Shared setup of the kernel tests: Triton's CPU interpreter (set before any kernel module is imported), the
device, tolerances and the error measure used to compare the Triton backend with the reference."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from moeut_ds.experts.reference import ReferenceBackend  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}    # relative L2 error vs an fp32 reference on the same values
REF = ReferenceBackend()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b (the absolute norm of a when b is empty or zero)."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape and torch.isfinite(a).all()
    if b.numel() == 0 or b.norm() == 0:
        return a.norm().item()
    return ((a - b).norm() / b.norm()).item()
