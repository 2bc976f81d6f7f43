"""Named model configurations: every row of the spec's tables (docs/ARCHITECTURE.md lists them), plus MoEUT-4B and
MoEUT-8B past the paper (docs/PARALLEL.md)."""
from __future__ import annotations

from moeut_ds.config import ConfigError, ModelConfig

# name: (d, L, G, H, d_h, N_A, K_A, N_E, K)   d_e = 128 everywhere
_MOEUT = {
    "44m": (412, 16, 2, 4, 82, 8, 2, 155, 12),
    "126m": (768, 18, 2, 4, 96, 10, 2, 254, 12),
    "244m": (1024, 18, 2, 4, 128, 10, 2, 387, 16),
    "319m": (1024, 24, 3, 4, 128, 10, 2, 338, 16),
    "728m": (1280, 36, 4, 5, 128, 13, 2, 467, 20),
    "1b": (1536, 36, 4, 6, 128, 12, 2, 565, 24),
    # Past the paper (docs/PARALLEL.md): the 1B row's ratios kept: d_e 128, K = 2d/128 (K*d_e = 2d), G 4, d_h 128,
    # K_A 2, H = d/256 (H*d_h = d/2), N_A 12; d chosen so that N_E ~ 0.36-0.41 d as in the paper's rows
    # (244M 0.38, 728M 0.36, 1B 0.37), then N_E solved from the spec's parameter formula for 4.0e9 / 8.0e9 total.
    # Depth (compute and activations only, not parameters) grows slowly with width: L 40 (R 10) and 48 (R 12).
    "4b": (3072, 40, 4, 12, 128, 12, 2, 1095, 48),     # 4,001.5M parameters
    "8b": (4096, 48, 4, 16, 128, 12, 2, 1676, 64),     # 8,001.4M parameters
}
# name: (d, L, H, d_h, d_ff)
_DENSE = {
    "44m": (412, 16, 10, 41, 2053),
    "126m": (768, 16, 16, 48, 3072),
    "244m": (1024, 18, 16, 64, 4110),
    "319m": (1024, 24, 16, 64, 4110),
    "728m": (1280, 36, 20, 64, 5120),
    "1b": (1536, 36, 24, 64, 6144),
}
# σ-MoE baseline: the MoEUT row with G = L, N_A = K_A = 1 and this many FF experts.
_SIGMA_MOE_EXPERTS = {"44m": 17, "126m": 26, "244m": 40, "319m": 40, "728m": 50}
# Group-size ablation at 244M: G -> (N_A, N_E)
_G_ABLATION = {1: (20, 779), 3: (6, 260), 6: (3, 128), 9: (2, 84)}


def _moeut(d: int, L: int, G: int, H: int, dh: int, na: int, ka: int, ne: int, k: int, **kw) -> ModelConfig:
    return ModelConfig(arch="moeut", d_model=d, n_layers=L, group_size=G, n_heads=H, d_head=dh,
                       att_n_experts=na, att_k=ka, ff_n_experts=ne, ff_expert_size=128, ff_k=k, **kw)


def _build() -> dict[str, ModelConfig]:
    presets: dict[str, ModelConfig] = {}
    for size, row in _MOEUT.items():
        presets[f"moeut-{size}"] = _moeut(*row)
    for size, (d, L, H, dh, dff) in _DENSE.items():
        presets[f"dense-{size}"] = ModelConfig(arch="dense", d_model=d, n_layers=L, n_heads=H, d_head=dh, d_ff=dff)
    for size, ne in _SIGMA_MOE_EXPERTS.items():
        d, L, _, H, dh, _, _, _, k = _MOEUT[size]
        presets[f"sigma-moe-{size}"] = _moeut(d, L, L, H, dh, 1, 1, ne, k)
    d, L, _, H, dh, _, ka, _, k = _MOEUT["244m"]
    for g, (na, ne) in _G_ABLATION.items():
        presets[f"moeut-244m-g{g}"] = _moeut(d, L, g, H, dh, na, ka, ne, k)
    presets["moeut-244m-g2"] = presets["moeut-244m"]
    presets["moeut-244m-aabb"] = _moeut(*_MOEUT["244m"], layer_order="aabb")
    presets["moeut-244m-pre"] = _moeut(*_MOEUT["244m"], norm="pre")
    presets["moeut-244m-post"] = _moeut(*_MOEUT["244m"], norm="post")
    # Small configs for tests, CPU quickstarts and the small-scale reproduction.
    presets["moeut-tiny"] = ModelConfig(arch="moeut", d_model=128, n_layers=4, group_size=2, n_heads=2, d_head=32,
                                        att_n_experts=4, att_k=2, ff_n_experts=16, ff_expert_size=32, ff_k=4)
    presets["dense-tiny"] = ModelConfig(arch="dense", d_model=128, n_layers=4, n_heads=4, d_head=32, d_ff=512)
    for cfg in presets.values():
        cfg.validate()
    return presets


PRESETS: dict[str, ModelConfig] = _build()
ALIASES = {"moeut-1.04b": "moeut-1b", "dense-1.04b": "dense-1b", "moeut-4.0b": "moeut-4b",
           "moeut-8.0b": "moeut-8b"}


def get_preset(name: str) -> ModelConfig:
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]
