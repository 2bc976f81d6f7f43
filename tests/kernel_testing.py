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


def tiny_moeut(backend="reference", **changes):
    """A 4-layer G=2 MoEUT with both expert kinds on DEVICE in training mode (seed 0; `changes` override config
    fields), and a [2, 13] batch of its tokens."""
    from moeut_ds.config import ModelConfig
    from moeut_ds.model import LanguageModel

    torch.manual_seed(0)
    cfg = ModelConfig(arch="moeut", vocab_size=50, d_model=16, n_layers=4, group_size=2, n_heads=2, d_head=8,
                      att_n_experts=3, att_k=2, ff_n_experts=5, ff_expert_size=4, ff_k=2).replace(**changes)
    model = LanguageModel(cfg, backend).to(DEVICE).train()
    return model, torch.randint(0, cfg.vocab_size, (2, 13), device=DEVICE)
