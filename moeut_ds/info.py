"""Print a preset's size and cost: python -m moeut_ds.info PRESET [--context T] [--json]

With any of --ep/--zero/--gpus/--micro-batch/--gpu-mem-gib it also estimates the training memory per GPU
(moeut_ds/memory.py, docs/PARALLEL.md): python -m moeut_ds.info moeut-8b --ep 8 --zero 2 --gpus 8 --micro-batch 8"""
from __future__ import annotations

import argparse
import json
import sys

from moeut_ds.accounting import active_parameters, count_parameters, forward_macs_per_token, paper_macs_per_token
from moeut_ds.config import ConfigError
from moeut_ds.memory import GIB, H200_GIB, estimate_memory
from moeut_ds.parallel.expert_parallel import DISPATCHES
from moeut_ds.presets import get_preset


def describe(name: str, context: int = 1024, memory: dict | None = None) -> dict:
    """memory: keyword arguments of memory.estimate_memory (gpus, ep, zero, micro_batch, activation_checkpointing,
    gpu_mem_gib) or None."""
    if context < 1:
        raise ConfigError(f"--context {context}: must be at least 1")
    if memory is not None and not memory.get("gpu_mem_gib", H200_GIB) > 0:     # `not >`: also rejects nan
        raise ConfigError(f"--gpu-mem-gib {memory['gpu_mem_gib']:g}: must be more than 0")
    cfg = get_preset(name)
    params = count_parameters(cfg)
    out = {
        "preset": name, "arch": cfg.arch, "config": cfg.to_dict(),
        "params": params["total"], "params_per_group_member": params["per_layer"],
        "params_embedding_and_head": params["embedding_and_head"],
        "active_params_per_token": active_parameters(cfg),
        "context": context,
        "macs_per_token": paper_macs_per_token(cfg, context),
        "macs_per_token_exact": forward_macs_per_token(cfg, context),
    }
    if memory is not None:
        out["memory"] = estimate_memory(cfg, context=context, params_total=params["total"], **memory).to_dict()
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def print_memory(m: dict) -> None:
    ds, ex, act = m["deepspeed"], m["experts"], m["activations"]
    ac = ", activation checkpointing" if m["activation_checkpointing"] else ""
    ep = f"ep {m['ep']} ({m['dispatch']} dispatch)" if m["ep"] > 1 else "ep 1"
    print(f"memory per GPU: {m['gpus']} GPU(s), ZeRO-{m['zero']}, {ep}, micro-batch {m['micro_batch']} x "
          f"{m['context']} tokens{ac} (estimate: moeut_ds/memory.py)")
    what = "all parameters (experts included, ep 1)" if m["experts_in_deepspeed"] else "non-expert parameters"
    print(f"  DeepSpeed, {what}: {m['params_total'] - (0 if m['experts_in_deepspeed'] else m['params_expert']):,}")
    for k in ("params", "grads", "optimizer"):
        print(f"    {k + ' (fp32)':<34} {_gib(ds[k])}")
    if not m["experts_in_deepspeed"]:
        print(f"  expert shard (1/{m['ep']} of {m['params_expert']:,} σ-MoE expert parameters, torch AdamW)")
        for k in ("params", "grads", "optimizer"):
            print(f"    {k + ' (fp32)':<34} {_gib(ex[k])}")
    print(f"  {'DeepSpeed reduce buckets':<36} {_gib(m['buckets'])}")
    per_layer, tokens = sum(m["per_token_layer"].values()), m["context"] * m["micro_batch"]
    how = (f"{m['checkpointed_per_token_layer']:,} B/token kept per layer application x L + one application "
           f"recomputed at {per_layer:,} B/token" if m["activation_checkpointing"] else f"{per_layer:,} B/token/layer "
           f"x L")
    print(f"  activations (bf16 autocast, Triton experts, {tokens:,} tokens: {how})")
    for k, v in act.items():
        print(f"    {k.replace('_', ' '):<34} {_gib(v)}")
    verdict = "fits" if m["fits"] else "does NOT fit"
    print(f"  {'total':<36} {_gib(m['total_bytes'])}  {verdict} in {m['gpu_mem_gib']:g} GiB "
          f"(largest micro-batch that fits: {m['max_micro_batch']}; leave a few GiB for CUDA/NCCL/fragmentation)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("preset")
    ap.add_argument("--context", type=int, default=1024, help="tokens per sequence for the MACs (default 1024)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    mem = ap.add_argument_group("memory estimate per GPU (any of these turns it on)")
    mem.add_argument("--gpus", type=int, help="data-parallel ranks (GPUs) in the run (default 1)")
    mem.add_argument("--ep", type=int, help="expert_parallel_size: ranks that split each σ-MoE layer's experts "
                                            "(default 1; > 1 needs --zero 1 or 2)")
    mem.add_argument("--dispatch", choices=DISPATCHES,
                     help="expert_dispatch with --ep > 1 (default auto: allgather for ep 2, alltoall above)")
    mem.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage 0-3 (default 2)")
    mem.add_argument("--micro-batch", type=int, help="sequences per GPU per forward/backward (default 8)")
    mem.add_argument("--gpu-mem-gib", type=float, help=f"GPU memory to fit in, GiB (default {H200_GIB:g}, an H200)")
    mem.add_argument("--activation-checkpointing", action="store_true",
                     help="with train.activation_checkpointing=true (layer applications recomputed in backward)")
    a = ap.parse_args(argv)
    memory = None
    if (any(v is not None for v in (a.gpus, a.ep, a.zero, a.micro_batch, a.gpu_mem_gib, a.dispatch))
            or a.activation_checkpointing):
        memory = {"gpus": 1 if a.gpus is None else a.gpus, "ep": 1 if a.ep is None else a.ep,
                  "dispatch": a.dispatch or "auto",
                  "zero": 2 if a.zero is None else a.zero, "micro_batch": 8 if a.micro_batch is None else a.micro_batch,
                  "activation_checkpointing": a.activation_checkpointing,
                  "gpu_mem_gib": H200_GIB if a.gpu_mem_gib is None else a.gpu_mem_gib}
    try:
        info = describe(a.preset, a.context, memory)
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
    if "memory" in info:
        print_memory(info["memory"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
