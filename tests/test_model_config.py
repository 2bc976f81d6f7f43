"""Presets against the spec's tables, initialisation statistics, and configuration errors."""
import json
import math
import subprocess
import sys

import pytest
import torch

from moeut_ds import ConfigError, LanguageModel, ModelConfig, get_preset
from moeut_ds.accounting import count_parameters, forward_macs_per_token, paper_macs_per_token

# Spec section 2 (params, M) and section 4 (paper-formula forward MACs per token at T = 1024, M).
SPEC = {
    "moeut-44m": (44.3, 45.1), "moeut-126m": (125.7, 92.3), "moeut-244m": (243.3, 158.5),
    "moeut-319m": (318.1, 210.2), "moeut-728m": (727.4, 482.9), "moeut-1b": (1040.3, 683.8),
    "dense-44m": (44.5, 51.3), "dense-126m": (125.7, 138.4), "dense-244m": (243.6, 264.8),
    "dense-319m": (319.3, 353.0), "dense-728m": (728.7, 802.2), "dense-1b": (1044.3, 1132.5),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_preset_params_and_macs_match_spec(name):
    params, macs = SPEC[name]
    cfg = get_preset(name)
    assert count_parameters(cfg)["total"] / 1e6 == pytest.approx(params, rel=0.005)
    assert paper_macs_per_token(cfg, 1024) / 1e6 == pytest.approx(macs, rel=0.01)


def test_moeut_244m_per_layer_macs_from_spec():
    assert paper_macs_per_token(get_preset("moeut-244m"), 1024) / 18 == 8_807_424


def test_every_named_preset_exists_and_is_valid():
    names = [f"moeut-{s}" for s in ("44m", "126m", "244m", "319m", "728m", "1b")]
    names += [f"dense-{s}" for s in ("44m", "126m", "244m", "319m", "728m", "1b")]
    names += [f"sigma-moe-{s}" for s in ("44m", "126m", "244m", "319m", "728m")]
    names += [f"moeut-244m-{s}" for s in ("g1", "g3", "g6", "g9", "aabb")]
    for n in names:
        cfg = get_preset(n)
        assert cfg.validate() is cfg
    s = get_preset("sigma-moe-244m")
    assert (s.group_size, s.n_layers, s.att_n_experts, s.att_k, s.ff_n_experts) == (18, 18, 1, 1, 40)
    g = get_preset("moeut-244m-g9")
    assert (g.group_size, g.att_n_experts, g.ff_n_experts) == (9, 2, 84)
    assert get_preset("moeut-244m-aabb").layer_order == "aabb"
    # the G ablation keeps ~244M parameters
    for n in ("moeut-244m-g1", "moeut-244m-g3", "moeut-244m-g6", "moeut-244m-g9"):
        assert count_parameters(get_preset(n))["total"] / 1e6 == pytest.approx(244, rel=0.01)


def test_exact_macs_count_causal_attention_and_head():
    cfg = get_preset("moeut-244m")
    exact, paper = forward_macs_per_token(cfg, 1024), paper_macs_per_token(cfg, 1024)
    h, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    # paper counts 2*H*d_h*T unmasked and router 2*N_A*d; code does H*d_h*(T+1), 2*H*N_A*d, plus the LM head
    diff = (h * dh * 1025 - 2 * h * dh * 1024 + 2 * h * cfg.att_n_experts * d - 2 * cfg.att_n_experts * d
            - 2 * h * cfg.att_k * dh) * 18 + d * cfg.vocab_size
    assert exact - paper == pytest.approx(diff)


def test_info_cli_json_and_text():
    out = subprocess.run([sys.executable, "-m", "moeut_ds.info", "moeut-244m", "--json"], capture_output=True,
                         text=True, check=True)
    info = json.loads(out.stdout)
    assert info["params"] == count_parameters(get_preset("moeut-244m"))["total"]
    assert info["macs_per_token"] == pytest.approx(158.5e6, rel=0.001)
    assert info["params_per_group_member"] > 0 and 0 < info["active_params_per_token"] < info["params"]
    text = subprocess.run([sys.executable, "-m", "moeut_ds.info", "dense-44m"], capture_output=True, text=True,
                          check=True).stdout
    assert "parameters" in text and "44.5M" in text
    bad = subprocess.run([sys.executable, "-m", "moeut_ds.info", "moeut-7t"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown preset 'moeut-7t'" in bad.stderr


def test_init_statistics_follow_the_spec():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=3000, d_model=256, n_layers=8, group_size=2, n_heads=4, d_head=64,
                      att_n_experts=6, att_k=2, ff_n_experts=40, ff_expert_size=128, ff_k=4)
    model = LanguageModel(cfg, "reference")
    s = math.sqrt(2 / 8)
    layer = model.layers[0]
    expected = {
        layer.ffn.w1: s / math.sqrt(256), layer.ffn.w2: s / math.sqrt(40 * 128), layer.ffn.router: s / math.sqrt(256),
        layer.attention.w_q: s / math.sqrt(256), layer.attention.w_k: s / math.sqrt(256),
        layer.attention.w_v: s / math.sqrt(256), layer.attention.w_o: s / math.sqrt(4 * 64),
        layer.attention.router_v: s / math.sqrt(256), layer.attention.router_o: s / math.sqrt(256),
        model.embedding.weight: 1 / math.sqrt(256),
    }
    for w, std in expected.items():
        assert w.std().item() == pytest.approx(std, rel=0.05)
        assert abs(w.mean().item()) < 0.1 * std
    for w in (layer.attention.router_v, layer.attention.router_o):     # rows renormalised to equal norm
        norms = w.norm(dim=-1)
        torch.testing.assert_close(norms, norms.mean().expand_as(norms))
    assert layer.ffn.router.norm(dim=-1).std() > 1e-3                   # the training code keeps raw rows
    assert torch.all(layer.ln_att.weight == 1) and torch.all(layer.ln_ff.bias == 0)


@pytest.mark.parametrize("name", ["moeut-tiny", "dense-tiny", "sigma-moe-44m"])
def test_model_is_built_on_the_default_device(name):
    """The trainer builds the model under `with device:` (an 8B model is then initialised on the GPU, not in host
    RAM): every parameter and buffer must follow the default device, none may be made on the CPU explicitly."""
    with torch.device("meta"):
        model = LanguageModel(get_preset(name), "reference")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and {t.device.type for t in tensors} == {"meta"}
    assert model.num_parameters() == LanguageModel(get_preset(name), "reference").num_parameters()


def test_dense_init_truncated_normal():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(arch="dense", vocab_size=100, d_model=256, n_layers=8, n_heads=4, d_head=64,
                                      d_ff=1024), "reference")
    for lin in (model.layers[0].ff_up, model.layers[0].ff_down, model.layers[1].w_q):
        std = math.sqrt(2 / (8 * lin.in_features))
        # truncated at 2 sigma, then rescaled to the exact target std (the authors' reset_prenorm_params)
        assert lin.weight.std().item() == pytest.approx(std, rel=1e-5)
        assert lin.weight.abs().max() <= 2 / 0.85 * std
    assert torch.all(model.layers[0].ff_up.bias == 0)


def test_post_ln_follows_the_authors_training_code():
    """Post-LN ablation: embeddings x sqrt(d) -> LayerNorm without weights -> layers (init scale 1, not sqrt(2/L))
    -> no final LayerNorm -> head."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=256, n_layers=8, group_size=2, n_heads=4, d_head=64, att_n_experts=6,
                      att_k=2, ff_n_experts=40, ff_expert_size=128, ff_k=4, norm="post")
    model = LanguageModel(cfg, "reference").eval()
    assert model.layers[0].ffn.w1.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert not any("norm" in n for n, _ in model.named_parameters() if not n.startswith("layers."))
    tokens = torch.randint(0, 300, (2, 7))
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda m, a: None if "first_in" in seen else    # 1st application
                                              seen.__setitem__("first_in", a[0]))
    model.lm_head.register_forward_pre_hook(lambda m, a: seen.__setitem__("head_in", a[0]))
    model.layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("last_out", o[0]))
    model(tokens)
    emb = model.embedding(tokens) * 16.0
    expected = (emb - emb.mean(-1, keepdim=True)) / torch.sqrt(emb.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(seen["first_in"], expected)
    assert seen["head_in"] is seen["last_out"]


@pytest.mark.parametrize("changes,field", [
    (dict(n_layers=7, group_size=2), "n_layers=7 is not divisible by group_size=2"),
    (dict(ff_k=200, ff_n_experts=155), "ff_k=200 > ff_n_experts=155"),
    (dict(att_k=3, att_n_experts=2), "att_k=3 > att_n_experts=2"),
    (dict(d_head=0), "d_head=0"),
    (dict(n_heads=-1), "n_heads=-1"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(norm="sandwich"), "norm='sandwich'"),
    (dict(layer_order="abba"), "layer_order='abba'"),
    (dict(rotate_fraction=1.5), "rotate_fraction=1.5"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        ModelConfig(**changes).validate()


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ConfigError, match="unknown preset 'moeut-3m'"):
        get_preset("moeut-3m")
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) \['d_modle'\]"):
        ModelConfig.from_dict({"d_modle": 10})


def test_odd_head_dim_rotates_an_even_count():
    assert get_preset("moeut-44m").n_rotate == 40     # d_h 82 -> 41 -> 40
    assert ModelConfig(d_head=41).n_rotate == 20
