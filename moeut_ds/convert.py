"""Import weights saved by the authors' layer library (RobertCsordas/moeut, class MoEUTLM).

python -m moeut_ds.convert --from-reference IN.pt --reference-args ARGS.json --out OUT
ARGS.json holds the keyword arguments the reference MoEUTLM constructor was called with.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from moeut_ds.config import ConfigError, ModelConfig
from moeut_ds.model import LanguageModel
from moeut_ds.model_io import save_model

# reference keyword argument -> (our field, reference default)
_ARGS = {
    "n_tokens": ("vocab_size", None), "d_model": ("d_model", None), "n_layers": ("n_layers", None),
    "n_heads": ("n_heads", None), "ff_n_experts": ("ff_n_experts", None), "att_n_experts": ("att_n_experts", None),
    "d_head": ("d_head", None), "group_size": ("group_size", 2), "ff_k": ("ff_k", 8), "att_k": ("att_k", 2),
    "ff_expert_size": ("ff_expert_size", 128), "entropy_reg": ("ff_entropy_reg", 0.01),
    "att_entropy_reg": ("att_entropy_reg", 0.001), "ff_expert_dropout": ("ff_expert_dropout", 0.0),
    "att_expert_dropout": ("att_expert_dropout", 0.0),
}
# reference parameter name suffix (inside transformer.layers.{g}.) -> ours (inside layers.{g}.)
_LAYER_NAMES = {
    "attention.q.weight": "attention.w_q", "attention.k.weight": "attention.w_k", "attention.v": "attention.w_v",
    "attention.o": "attention.w_o", "attention.sel_v": "attention.router_v", "attention.sel_o": "attention.router_o",
    "ffn.keys": "ffn.w1", "ffn.values": "ffn.w2", "ffn.expert_sel": "ffn.router",
    "ln1.weight": "ln_att.weight", "ln1.bias": "ln_att.bias", "ln2.weight": "ln_ff.weight", "ln2.bias": "ln_ff.bias",
}
_TOP_NAMES = {n: n for n in ("embedding.weight", "lm_head.weight", "lm_head.bias", "out_norm.weight",
                             "out_norm.bias")}


def config_from_reference_args(args: dict[str, Any]) -> ModelConfig:
    unknown = sorted(set(args) - set(_ARGS) - {"dropout", "attention"})
    if unknown:
        raise ConfigError(f"reference args {unknown} are not supported by the importer; known: {sorted(_ARGS)}")
    if args.get("dropout", 0.0):
        raise ConfigError(f"reference dropout={args['dropout']}: moeut-ds models have no dropout (0 in all paper runs)")
    missing = [k for k, (_, default) in _ARGS.items() if default is None and k not in args and k != "d_head"]
    if missing:
        raise ConfigError(f"reference args lack required constructor argument(s) {missing}")
    fields = {ours: args.get(ref, default) for ref, (ours, default) in _ARGS.items()}
    if fields["d_head"] is None:
        fields["d_head"] = args["d_model"] // args["n_heads"]
    return ModelConfig(arch="moeut", **fields).validate()


def convert_state_dict(ref_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in ref_state.items():
        m = re.fullmatch(r"transformer\.layers\.(\d+)\.(.+)", name)
        if m and m.group(2) in _LAYER_NAMES:
            out[f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"] = tensor
        elif name in _TOP_NAMES:
            out[name] = tensor
        else:
            raise ConfigError(f"reference state_dict has an unexpected tensor {name!r}: not a MoEUTLM checkpoint?")
    return out


def model_from_reference(ref_state: dict[str, torch.Tensor], args: dict[str, Any],
                         expert_backend: str = "auto") -> LanguageModel:
    model = LanguageModel(config_from_reference_args(args), expert_backend=expert_backend)
    state = convert_state_dict(ref_state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConfigError(f"reference checkpoint lacks {missing[:5]}...: do the args match the checkpoint?")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConfigError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape "
                              f"{tuple(expected[name].shape)} from the args: do ARGS.json and IN.pt belong together?")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-reference", required=True, type=Path, help="state_dict saved from the reference MoEUTLM")
    ap.add_argument("--reference-args", required=True, type=Path, help="JSON with the MoEUTLM constructor kwargs")
    ap.add_argument("--out", required=True, type=Path, help="output model directory (moeut-ds format)")
    a = ap.parse_args(argv)
    try:
        args = json.loads(a.reference_args.read_text())
        loaded = torch.load(a.from_reference, map_location="cpu", weights_only=True)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise ConfigError(f"{a.from_reference}: expected a state_dict (dict of tensors)")
        model = model_from_reference(state, args, expert_backend="reference")
    except (ConfigError, OSError, json.JSONDecodeError) as e:
        print(f"moeut_ds.convert: error: {e}", file=sys.stderr)
        return 2
    save_model(model, a.out, extra={"source": f"reference MoEUTLM: {a.from_reference.name}"})
    print(f"wrote {a.out} ({model.num_parameters():,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
