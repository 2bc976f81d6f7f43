"""σ-MoE and SwitchHead against naive per-token loops written here, plus routing and layer-structure checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from moeut_ds import LanguageModel, ModelConfig
from moeut_ds.experts import get_backend
from moeut_ds.model.linear import linear_split
from moeut_ds.model.rope import apply_rope, rope_tables, rotated_heads
from moeut_ds.model.sigma_moe import SigmaMoE, router_logits
from moeut_ds.model.switchhead import SwitchHead

BACKEND = get_backend("reference")


def naive_sigma_moe(moe: SigmaMoE, x: torch.Tensor, router_in: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            scores = torch.sigmoid(router_in[b, t] @ moe.router.T)
            for e in scores.argsort(descending=True)[: moe.k]:
                out[b, t] += scores[e] * (torch.relu(x[b, t] @ moe.w1[e]) @ moe.w2[e])
    return out


def test_sigma_moe_matches_naive_loop():
    torch.manual_seed(0)
    moe = SigmaMoE(d_model=12, n_experts=7, expert_size=5, k=3)
    moe.reset_parameters(1.0)
    x, r = torch.randn(2, 6, 12), torch.randn(2, 6, 12)
    torch.testing.assert_close(moe(x, r, BACKEND)[0], naive_sigma_moe(moe, x, r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_out", [387, 40, 1])
def test_router_logits_padding_is_invisible(n_out):
    """The router GEMM pads its rows to a multiple of 8 for aligned cuBLAS kernels: same logits and gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(n_out, 16, requires_grad=True)
    got = router_logits(x, w)
    assert got.shape == (2, 5, n_out) and got.dtype == torch.float32
    want = F.linear(x, w)
    # fp32 tolerances for sums the padded GEMM may block differently (CPU-dependent BLAS kernels: one CI machine's
    # input gradient, a sum of 387 products ~20 in magnitude, was off by 3e-6); a leaked or misplaced padding row
    # would be off by O(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    gx, gw = torch.autograd.grad(got, (x, w), g)
    wx, ww = torch.autograd.grad(want, (x, w), g)
    assert gw.shape == w.shape
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("widths", [[8, 8, 3, 2], [5], [16, 16, 16]])
def test_linear_split_equals_separate_projections(widths):
    """Q, K and the routers as one padded GEMM: the same outputs, input gradient and weight gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ws = [torch.randn(n, 16, requires_grad=True) for n in widths]
    got = linear_split(x, ws)
    want = [F.linear(x, w) for w in ws]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)     # fp32 sums, as above
    grads = [torch.randn_like(w) for w in want]
    g_got = torch.autograd.grad(got, [x, *ws], grads)
    g_want = torch.autograd.grad(want, [x, *ws], grads)
    for a, b in zip(g_got, g_want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sigmoid_topk_without_renormalisation():
    torch.manual_seed(1)
    logits = torch.randn(9, 3, 6)
    routing = BACKEND.route(logits, 2)
    for n in range(9):
        for g in range(3):
            chosen = routing.expert_index[n, g * 2:(g + 1) * 2]
            assert set((chosen - g * 6).tolist()) == set(logits[n, g].topk(2).indices.tolist())
            torch.testing.assert_close(routing.gate[n, g * 2:(g + 1) * 2], torch.sigmoid(logits[n, g, chosen - g * 6]))
    assert not torch.allclose(routing.gate.view(9, 3, 2).sum(-1), torch.ones(9, 3))   # not renormalised
    order, offsets = routing.order, routing.offsets
    assert torch.all(routing.expert_index.reshape(-1)[order].diff() >= 0)
    assert offsets[-1] == 9 * 3 * 2


def naive_switchhead(att: SwitchHead, xn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bsz, seq, d = x.shape
    h_, dh, na, k = att.n_heads, att.d_head, att.n_experts, att.k
    out = torch.zeros_like(x)
    scale = dh ** -0.25
    rope = rope_tables(4, 10000.0, seq)
    for b in range(bsz):
        q = (xn[b] @ att.w_q.T * scale).view(seq, h_, dh).transpose(0, 1)
        kk = (xn[b] @ att.w_k.T * scale).view(seq, h_, dh).transpose(0, 1)
        q = apply_rope(q.unsqueeze(0), rope)[0]
        kk = apply_rope(kk.unsqueeze(0), rope)[0]
        v = torch.zeros(h_, seq, dh)
        gv = torch.sigmoid((xn[b] @ att.router_v.T).view(seq, h_, na))
        go = torch.sigmoid((xn[b] @ att.router_o.T).view(seq, h_, na))
        for t in range(seq):
            for h in range(h_):
                for e in gv[t, h].argsort(descending=True)[:k]:
                    v[h, t] += gv[t, h, e] * (x[b, t] @ att.w_v[h * na + e])
        for h in range(h_):
            for t in range(seq):
                w = torch.softmax(q[h, t] @ kk[h, : t + 1].T, -1)    # causal, no extra scaling
                a = w @ v[h, : t + 1]
                for e in go[t, h].argsort(descending=True)[:k]:
                    out[b, t] += go[t, h, e] * (a @ att.w_o[h * na + e])
    return out


def test_switchhead_matches_naive_loop():
    torch.manual_seed(2)
    att = SwitchHead(d_model=16, n_heads=3, d_head=10, n_experts=4, k=2)
    att.reset_parameters(1.0)
    xn, x = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    got, *_ = att(xn, x, BACKEND, rope_tables(4, 10000.0, 7))
    torch.testing.assert_close(got, naive_switchhead(att, xn, x), rtol=1e-5, atol=1e-5)


def test_rope_rotates_only_the_first_n_rot_dims_with_slice_frequencies():
    x = torch.randn(1, 1, 5, 10)
    y = apply_rope(x, rope_tables(4, 100.0, 5))
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    pos = torch.arange(5.0)
    for i in range(2):                      # inv_freq_i = base^(-2i / n_rot), pairs (i, i + n_rot/2)
        ang = pos * 100.0 ** (-2 * i / 4)
        x1, x2 = x[0, 0, :, i], x[0, 0, :, i + 2]
        torch.testing.assert_close(y[0, 0, :, i], x1 * ang.cos() - x2 * ang.sin())
        torch.testing.assert_close(y[0, 0, :, i + 2], x2 * ang.cos() + x1 * ang.sin())


def test_rope_in_bf16_rotates_in_fp32_and_rounds_once():
    """A bf16 input is rotated against the fp32 tables and rounded once (the authors' numerics under autocast):
    bitwise the fp32 rotation of the same values, cast to bf16. Rounding the tables to bf16 first differs."""
    x = torch.randn(2, 3, 64, 16).to(torch.bfloat16)
    tables = rope_tables(8, 10000.0, 64)
    got = apply_rope(x, tables)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, apply_rope(x.float(), tables).to(torch.bfloat16))
    rounded = apply_rope(x.float(), tuple(t.to(torch.bfloat16).float() for t in tables)).to(torch.bfloat16)
    assert not torch.equal(got, rounded)


def test_model_rope_tables_are_buffers_sliced_by_position():
    """The model's rotary tables: slices of non-persistent buffers (not in checkpoints), equal to the tables
    computed for those positions, and computed per call past the buffers' length (long generation)."""
    from moeut_ds.model.rope import TABLE_POSITIONS
    model = LanguageModel(tiny_cfg(), "reference")
    assert not any("rope" in name for name in model.state_dict())
    n_rot, base = model.cfg.n_rotate, model.cfg.rope_base
    for offset, seq in ((0, 7), (5, 1), (TABLE_POSITIONS - 3, 3), (TABLE_POSITIONS - 2, 5)):
        got, want = model.rope(offset, seq), rope_tables(n_rot, base, seq, offset)
        assert got[0].shape == (seq, n_rot)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_expert_counts_are_the_top_k_of_every_application(dropout):
    """return_expert_counts: per distinct layer and router, how often each expert was chosen over the layer's R
    applications, equal to the top-k of the router logits each application returned (per head for SwitchHead,
    ids head * N_A + e); under expert dropout still K choices per token and router."""
    cfg = tiny_cfg(ff_expert_dropout=dropout, att_expert_dropout=dropout)
    model = LanguageModel(cfg, "reference").train()
    logits = {g: {"ff": [], "v": [], "o": []} for g in range(len(model.layers))}
    for g, layer in enumerate(model.layers):
        layer.ffn.register_forward_hook(lambda m, a, o, g=g: logits[g]["ff"].append(o[1]))
        layer.attention.register_forward_hook(
            lambda m, a, o, g=g: logits[g]["v"].append(o[2]["v"]) or logits[g]["o"].append(o[2]["o"]))
    bsz, seq = 2, 5
    torch.manual_seed(0)
    out = model(torch.randint(0, 50, (bsz, seq)), return_expert_counts=True)
    n_att = cfg.n_heads * cfg.att_n_experts
    for g, layer_counts in enumerate(out.expert_counts):
        assert set(layer_counts) == {"ff", "v", "o"}
        assert all(c.dtype == torch.int64 for c in layer_counts.values())
        reps = len(logits[g]["ff"])
        assert layer_counts["ff"].sum() == reps * bsz * seq * cfg.ff_k
        assert layer_counts["v"].sum() == reps * bsz * seq * cfg.n_heads * cfg.att_k
        if dropout:
            continue                     # which experts were dropped is the model's random draw
        want_ff = torch.zeros(cfg.ff_n_experts, dtype=torch.int64)
        for s in logits[g]["ff"]:
            for row in s.reshape(-1, cfg.ff_n_experts):
                want_ff[row.argsort(descending=True)[:cfg.ff_k]] += 1
        assert torch.equal(layer_counts["ff"], want_ff)
        for kind in ("v", "o"):
            want = torch.zeros(n_att, dtype=torch.int64)
            for s in logits[g][kind]:
                for tok in s.reshape(-1, cfg.n_heads, cfg.att_n_experts):
                    for h in range(cfg.n_heads):
                        want[h * cfg.att_n_experts + tok[h].argsort(descending=True)[:cfg.att_k]] += 1
            assert torch.equal(layer_counts[kind], want)
    assert model(torch.randint(0, 50, (bsz, seq))).expert_counts is None
    dense = LanguageModel(ModelConfig(arch="dense", vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_head=8,
                                      d_ff=32), "reference")
    assert dense(torch.randint(0, 50, (1, 3)), return_expert_counts=True).expert_counts == [{}, {}]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(arch="moeut", vocab_size=50, d_model=16, n_layers=6, group_size=2, n_heads=2, d_head=8,
                att_n_experts=3, att_k=2, ff_n_experts=5, ff_expert_size=4, ff_k=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("order,expected", [("abab", [0, 1, 0, 1, 0, 1]), ("aabb", [0, 0, 0, 1, 1, 1])])
def test_group_layers_are_shared_and_ordered(order, expected):
    model = LanguageModel(tiny_cfg(layer_order=order), "reference")
    calls = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    model(torch.randint(0, 50, (1, 5)))
    assert calls == expected
    assert len(model.layers) == 2   # G distinct weight sets, reused R = 3 times


@pytest.mark.parametrize("norm", ["peri", "pre", "post"])
def test_layernorm_placement(norm):
    """peri: Q/K/routers read LN_att(x), V reads raw x; experts read raw x, only the FF router sees LN_ff(x)."""
    model = LanguageModel(tiny_cfg(norm=norm, n_layers=2), "reference")
    layer = model.layers[0]
    seen = {}
    layer.register_forward_hook(lambda m, a, o: seen.__setitem__("layer_in", a[0]))
    layer.ln_att.register_forward_hook(lambda m, a, o: seen.__setitem__("ln_att", (a[0], o)))
    layer.ln_ff.register_forward_hook(lambda m, a, o: seen.__setitem__("ln_ff", (a[0], o)))
    layer.attention.register_forward_hook(lambda m, a, o: seen.__setitem__("att", a))
    layer.ffn.register_forward_hook(lambda m, a, o: seen.__setitem__("ffn", a))
    model(torch.randint(0, 50, (2, 5)))
    att_xn, att_x = seen["att"][0], seen["att"][1]
    ff_x, ff_router = seen["ffn"][0], seen["ffn"][1]
    if norm == "peri":
        assert att_xn is seen["ln_att"][1] and att_x is seen["layer_in"]
        assert ff_router is seen["ln_ff"][1] and ff_x is seen["ln_ff"][0]
    elif norm == "pre":
        assert att_xn is seen["ln_att"][1] and att_x is seen["ln_att"][1]
        assert ff_router is seen["ln_ff"][1] and ff_x is seen["ln_ff"][1]
    else:
        assert att_xn is seen["layer_in"] and att_x is seen["layer_in"]
        assert ff_x is seen["ln_att"][1] and ff_router is seen["ln_att"][1]


def test_entropy_regulariser_hand_computation():
    """Two sequences, one FF router with 2 experts, 2 tokens, applied twice (R = 2)."""
    from moeut_ds.model.regularizer import entropy_regularizer
    a1 = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]], [[0.0, 0.0], [0.0, 0.0]]])    # [B=2, T=2, E=2]
    a2 = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]], [[10.0, -10.0], [10.0, -10.0]]])
    # sequence 0: softmaxes (.5,.5), (.75,.25), (.25,.75), (.5,.5) -> mean (.5,.5) -> H = ln 2
    p1 = torch.softmax(torch.tensor([10.0, -10.0]), 0)
    mean1 = (torch.tensor([0.5, 0.5]) * 2 + p1 * 2) / 4
    h1 = -(mean1 * mean1.log()).sum()
    expected = -0.01 * (math.log(2) + h1) / 2
    got = entropy_regularizer([{"ff": [a1, a2], "v": [], "o": []}], ff_coef=0.01, att_coef=0.001)
    torch.testing.assert_close(got, expected.float())


def test_entropy_regulariser_is_per_head_for_attention():
    from moeut_ds.model.regularizer import mean_selection_neg_entropy
    s = torch.zeros(1, 3, 2, 4)            # [B, T, H, N_A]
    s[..., 1, :] = torch.tensor([5.0, -5.0, -5.0, -5.0])
    got = mean_selection_neg_entropy([s])
    p = torch.softmax(torch.tensor([5.0, -5.0, -5.0, -5.0]), 0)
    expected = -(math.log(4) + -(p * p.log()).sum()) / 2
    torch.testing.assert_close(got, expected)


def test_regulariser_only_in_training_and_backward_reaches_every_parameter():
    model = LanguageModel(tiny_cfg(), "reference")
    tok = torch.randint(0, 50, (2, 9))
    model.eval()
    assert model(tok).reg_loss.item() == 0.0
    model.train()
    out = model(tok)
    assert out.reg_loss.item() < 0
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tok[:, 1:].flatten()) + out.reg_loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert out.logits.shape == (2, 9, 50)


@pytest.mark.parametrize("arch", ["moeut", "dense", "sigma"])
def test_kv_cache_decoding_equals_full_forward(arch):
    torch.manual_seed(3)
    cfg = {"moeut": tiny_cfg(), "dense": ModelConfig(arch="dense", vocab_size=50, d_model=16, n_layers=3, n_heads=2,
                                                     d_head=8, d_ff=20),
           "sigma": tiny_cfg(group_size=6, att_n_experts=1, att_k=1)}[arch]
    model = LanguageModel(cfg, "reference").eval()
    tok = torch.randint(0, 50, (2, 12))
    full = model(tok).logits
    out = model(tok[:, :5], cache=[])
    steps = [out.logits]
    cache = out.cache
    for t in range(5, 12):
        out = model(tok[:, t:t + 1], cache=cache)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache[0]["k"].shape[-2] == 12 and cache[0]["v"].shape[-2] == 12


def test_generate_greedy_matches_argmax_of_full_forward():
    from moeut_ds.model import generate
    torch.manual_seed(4)
    model = LanguageModel(tiny_cfg(), "reference")
    prompt = torch.randint(0, 50, (2, 4))
    out = generate(model, prompt, max_new_tokens=5, greedy=True)
    for t in range(4, 9):
        logits = model.eval()(out[:, :t]).logits[:, -1]
        assert torch.equal(out[:, t], logits.argmax(-1))
    sampled = generate(model, prompt, 6, temperature=0.7, top_k=3, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 10) and torch.equal(sampled[:, :4], prompt)


def test_rotated_heads_equals_rope_on_transposed_heads():
    """The rotation before the head transpose (model code) is the same map as rotating the [B, H, T, d_h] heads."""
    t = torch.randn(2, 5, 3 * 8, requires_grad=True)
    tables = rope_tables(4, 100.0, 5)
    got = rotated_heads(t, 3, 0.5, tables)
    want = apply_rope((t * 0.5).view(2, 5, 3, 8).transpose(1, 2), tables)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(rotated_heads(t, 3, 0.5, None), (t * 0.5).view(2, 5, 3, 8).transpose(1, 2))



def test_entropy_regulariser_compiles_to_the_eager_gradients():
    """torch.compile (inductor, CPU) gives the regulariser's eager value and gradients. A guard: the same math
    reduced per application first, stack([logsumexp(log_softmax(s_r), dim=1)]) then logsumexp over the stack,
    compiled to gradients 10-1000x off in torch 2.13 (docs/KERNELS.md, eleventh session)."""
    from moeut_ds.model.regularizer import mean_selection_neg_entropy
    torch.manual_seed(4)
    logits = [(torch.randn(2, 33, 3, 10) * 2).requires_grad_() for _ in range(5)]     # R=5 of [B, T, H, E]
    want = mean_selection_neg_entropy(logits)
    g_want = torch.autograd.grad(want, logits)
    torch._dynamo.reset()
    got = torch.compile(mean_selection_neg_entropy)(logits)
    g_got = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
