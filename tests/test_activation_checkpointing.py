"""Activation checkpointing (LanguageModel.set_activation_checkpointing): the same loss and gradients, far fewer
bytes saved for backward, and no effect outside training."""
from __future__ import annotations

import copy

from kernel_testing import DEVICE  # noqa: F401  (sets TRITON_INTERPRET before any kernel import)

import pytest
import torch
import torch.nn.functional as F

from moeut_ds import LanguageModel, ModelConfig

CFG = ModelConfig(vocab_size=100, d_model=32, n_layers=4, group_size=2, n_heads=2, d_head=16, att_n_experts=4,
                  att_k=2, ff_n_experts=8, ff_expert_size=8, ff_k=2)


def _step(model: LanguageModel, tokens: torch.Tensor) -> tuple[torch.Tensor, dict, int]:
    """Loss, gradients, and the bytes autograd kept for backward outside checkpointed regions."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens.flatten()) + out.reg_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved[0]


@pytest.mark.parametrize("backend,arch", [("reference", "moeut"), ("triton", "moeut"), ("reference", "dense")])
def test_same_loss_and_gradients_with_fewer_saved_bytes(backend, arch):
    torch.manual_seed(0)
    cfg = CFG if arch == "moeut" else CFG.replace(arch="dense", d_ff=64)
    device = DEVICE if backend == "triton" else "cpu"
    plain = LanguageModel(cfg, backend).to(device).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_activation_checkpointing(True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), device=device)
    loss0, grads0, saved0 = _step(plain, tokens)
    loss1, grads1, saved1 = _step(ckpt, tokens)
    assert torch.equal(loss0, loss1)                           # recomputation reproduces the forward exactly
    for name, g in grads0.items():
        assert torch.equal(g, grads1[name]), name
    assert saved1 * 4 < saved0, (saved0, saved1)                # only layer inputs and router logits stay


def test_eval_and_cached_decoding_do_not_checkpoint():
    torch.manual_seed(0)
    model = LanguageModel(CFG, "reference")
    model.set_activation_checkpointing(True)
    tokens = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        full = model.eval()(tokens).logits
        out = model(tokens[:, :3], cache=[])
        step = model(tokens[:, 3:], cache=out.cache).logits
    torch.testing.assert_close(step, full[:, 3:], rtol=1e-5, atol=1e-5)
