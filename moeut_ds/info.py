"""Print a preset's size and cost: python -m moeut_ds.info PRESET [--context T] [--json]"""
from __future__ import annotations

import argparse
import json
import sys

from moeut_ds.accounting import active_parameters, count_parameters, forward_macs_per_token, paper_macs_per_token
from moeut_ds.config import ConfigError
from moeut_ds.presets import get_preset


def describe(name: str, context: int = 1024) -> dict:
    cfg = get_preset(name)
    params = count_parameters(cfg)
    return {
        "preset": name, "arch": cfg.arch, "config": cfg.to_dict(),
        "params": params["total"], "params_per_group_member": params["per_layer"],
        "params_embedding_and_head": params["embedding_and_head"],
        "active_params_per_token": active_parameters(cfg),
        "context": context,
        "macs_per_token": paper_macs_per_token(cfg, context),
        "macs_per_token_exact": forward_macs_per_token(cfg, context),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("preset")
    ap.add_argument("--context", type=int, default=1024, help="tokens per sequence for the MACs (default 1024)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    try:
        info = describe(a.preset, a.context)
    except ConfigError as e:
        print(f"moeut_ds.info: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(info))
        return 0
    c = info["config"]
    print(f"{info['preset']} ({info['arch']})")
    for k in ("d_model", "n_layers", "group_size", "n_heads", "d_head", "att_n_experts", "att_k", "ff_n_experts",
              "ff_expert_size", "ff_k", "d_ff", "layer_order", "norm"):
        print(f"  {k:<26} {c[k]}")
    print(f"  {'parameters':<26} {info['params']:,} ({info['params'] / 1e6:.1f}M)")
    print(f"  {'per group member':<26} {info['params_per_group_member']:,}")
    print(f"  {'embedding + LM head':<26} {info['params_embedding_and_head']:,}")
    print(f"  {'active params / token':<26} {info['active_params_per_token']:,}")
    print(f"  {'fwd MACs/token (paper)':<26} {info['macs_per_token'] / 1e6:.1f}M at T={a.context}")
    print(f"  {'fwd MACs/token (exact)':<26} {info['macs_per_token_exact'] / 1e6:.1f}M (causal, LM head, all routers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
