"""The Triton backend casts each expert weight once per forward pass (not once per shared-layer application)."""
from __future__ import annotations

import contextlib

from kernel_testing import DEVICE, rel_err  # noqa: E402  (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from moeut_ds import LanguageModel, ModelConfig  # noqa: E402
from moeut_ds.experts.triton_backend import TritonBackend  # noqa: E402

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=6, group_size=2, n_heads=2, d_head=16, att_n_experts=3,
                  att_k=2, ff_n_experts=6, ff_expert_size=16, ff_k=2)


class NoCacheBackend(TritonBackend):
    def forward_context(self):
        return contextlib.nullcontext()


def _loss_and_grads(backend: TritonBackend, tokens: torch.Tensor, seen: list[int]):
    torch.manual_seed(0)
    model = LanguageModel(CFG, backend).to(DEVICE)
    model.layers[-1].register_forward_hook(lambda m, a, o: seen.append(len(backend._casts or {})))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(tokens)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), tokens.flatten()) + out.reg_loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_one_cast_per_expert_weight_per_forward_and_same_training_signal():
    tokens = torch.randint(0, 64, (2, 12), device=DEVICE)
    seen_cached: list[int] = []
    loss, grads = _loss_and_grads(TritonBackend(), tokens, seen_cached)
    # G = 2 distinct layers x (W1, W2, W_v, W_o): 8 casts for the 3 applications of each layer, kept during the pass
    assert seen_cached == [8, 8, 8]
    seen_plain: list[int] = []
    loss_plain, grads_plain = _loss_and_grads(NoCacheBackend(), tokens, seen_plain)
    assert seen_plain == [0, 0, 0]
    assert torch.equal(loss, loss_plain)                       # the forward pass is bitwise the same
    for name, g in grads_plain.items():                        # gradients: R bf16 contributions summed in bf16
        assert rel_err(grads[name], g) < 2e-2, name
    assert TritonBackend()._casts is None                      # no state outside a forward pass
