"""The MegaBlocks backend's adapter (order / bin ids / bins / top_k, dtypes, gradients) on CPU.

megablocks and grouped_gemm need CUDA, so here they are replaced by small torch modules with the semantics of
megablocks 0.10.0's gather/scatter kernels (backend/kernels.py: sorted position j copies row indices[j] // top_k;
scatter sums weights[indices[j]] * y[j] into that row) and grouped_gemm 0.3.0's gmm (rows split by batch_sizes,
bf16 only). On a GPU with the real packages, bench/bench_experts.py checks the backend against the fp32
reference at the 244M shape.
"""
from __future__ import annotations

import sys
import types

from kernel_testing import DEVICE, REF, TOL, rel_err, tiny_moeut  # noqa: E402  (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from moeut_ds.experts.megablocks_backend import MegaBlocksBackend  # noqa: E402
from test_kernels_experts import make_logits, reference_routing  # noqa: E402


def _gather(x, indices, bin_ids, bins, top_k):
    assert indices.dtype == bin_ids.dtype == bins.dtype == torch.int32
    assert torch.equal(bins.long(), torch.bincount(bin_ids.long(), minlength=bins.numel()).cumsum(0))
    return x[indices.long() // top_k]


def _scatter(y, indices, bin_ids, weights, bins, top_k):
    assert weights.dtype == y.dtype
    rows = indices.long() // top_k
    out = y.new_zeros(indices.numel() // top_k, y.shape[1])
    return out.index_add(0, rows, y * weights[indices.long()].unsqueeze(1))


def _gmm(a, b, batch_sizes, trans_b=False):
    assert a.dtype == b.dtype == torch.bfloat16 and batch_sizes.dtype == torch.int64 and not trans_b
    parts, start = [], 0
    for e, n in enumerate(batch_sizes.tolist()):
        parts.append(a[start:start + n] @ b[e])
        start += n
    assert start == a.shape[0]
    return torch.cat(parts)


@pytest.fixture
def fake_megablocks(monkeypatch):
    mb, mb_ops = types.ModuleType("megablocks"), types.ModuleType("megablocks.ops")
    mb_ops.gather, mb_ops.scatter, mb.ops = _gather, _scatter, mb_ops
    gg, gg_ops = types.ModuleType("grouped_gemm"), types.ModuleType("grouped_gemm.ops")
    gg_ops.gmm, gg.ops = _gmm, gg_ops
    for name, module in (("megablocks", mb), ("megablocks.ops", mb_ops), ("grouped_gemm", gg),
                         ("grouped_gemm.ops", gg_ops)):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("bias", ["uneven", "empty"])
def test_mlp_matches_reference(fake_megablocks, bias):
    gen = torch.Generator().manual_seed(3)
    n_rows, n, k, d, d_e = 45, 9, 3, 40, 24
    logits = make_logits(n_rows, 1, n, bias, gen).requires_grad_()
    x = torch.randn(n_rows, d, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    w1 = (torch.randn(n, d, d_e, generator=gen) / d ** 0.5).to(DEVICE, torch.bfloat16).requires_grad_()
    w2 = (torch.randn(n, d_e, d, generator=gen) / d_e ** 0.5).to(DEVICE, torch.bfloat16).requires_grad_()
    mb = MegaBlocksBackend()
    routing = mb.route(logits, k)
    y = mb.mlp(x, w1, w2, routing)
    gy = torch.randn(y.shape, generator=gen).to(DEVICE, torch.bfloat16)
    grads = torch.autograd.grad(y, [x, w1, w2, logits], gy)
    logits_r = logits.detach().clone().requires_grad_()
    leaves = [t.detach().float().requires_grad_() for t in (x, w1, w2)]
    y_r = REF.mlp(*leaves, reference_routing(logits_r, routing.expert_index))
    grads_r = torch.autograd.grad(y_r, leaves + [logits_r], gy.float())
    assert rel_err(y, y_r) < TOL[torch.bfloat16]
    for name, a, b in zip(("x", "w1", "w2", "logits"), grads, grads_r):
        assert rel_err(a, b) < TOL[torch.bfloat16], name


def test_fp32_and_expert_parallel_are_refused(fake_megablocks):
    mb = MegaBlocksBackend()
    routing = mb.route(make_logits(8, 1, 4), 2)
    x, w1, w2 = torch.randn(8, 16), torch.randn(4, 16, 8), torch.randn(4, 8, 16)
    with pytest.raises(TypeError, match="bf16 only"):
        mb.mlp(x, w1, w2, routing)
    with pytest.raises(NotImplementedError, match="expert_backend=triton"):
        mb.mlp_rows(x, w1, w2, routing, routing.order // 2, torch.arange(0, 17, 2))


def test_config_refuses_megablocks_with_expert_parallelism(monkeypatch):
    from moeut_ds import experts
    from moeut_ds.config import ConfigError
    from moeut_ds.train.config import load_run_config

    monkeypatch.setitem(experts._FACTORIES, "megablocks", MegaBlocksBackend)   # as when the packages are installed
    load_run_config(None, ["data.path=/d", "expert_backend=megablocks"])
    with pytest.raises(ConfigError, match="expert_backend=megablocks: the MegaBlocks backend has no expert-parallel"):
        load_run_config(None, ["data.path=/d", "expert_backend=megablocks", "expert_parallel_size=2"])


def test_tiny_moeut_under_bf16_autocast_matches_triton(fake_megablocks):
    """The model's σ-MoE layers go through the backend's mlp (fp32 weights cast once per pass under autocast)."""
    from moeut_ds.experts.triton_backend import TritonBackend

    model, tokens = tiny_moeut()
    results = []
    for backend in (TritonBackend(), MegaBlocksBackend()):
        model.set_expert_backend(backend)
        model.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = model(tokens)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().reshape(-1, 50), tokens[:, 1:].reshape(-1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "ffn.w" in n}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=2e-2, atol=2e-2)
    assert g1.keys() == g2.keys() and len(g1) == 4        # w1 and w2 of both distinct layers
    for name in g1:
        assert rel_err(g2[name], g1[name]) < 5e-2, name
