"""Save and load expert shards with their AdamW state, independent of the expert-parallel size.

DeepSpeed never sees the expert shards (expert_parallel.py), so the checkpoint holds them beside DeepSpeed's files:

    <checkpoint>/experts/shard<i>-of-<ep>.safetensors   experts [lo, hi) of every σ-MoE layer: the weight and its
                                                          AdamW exp_avg / exp_avg_sq, named "<param>", "<param>.exp_avg",
                                                          "<param>.exp_avg_sq"; metadata: bounds and the AdamW step

Only the first expert-data-parallel replica of each shard writes (replicas are identical). A load at any other
expert-parallel size reads, for each parameter, the slices of the saved shards that overlap the new shard.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeut_ds.parallel.expert_parallel import ExpertShards

EXPERT_DIR = "experts"
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def save_expert_shards(shards: ExpertShards, optimizer: torch.optim.Optimizer, checkpoint: Path) -> list[Path]:
    """Collective-free; call on every rank. Returns the files written (none on ranks that are not the shard's first
    replica)."""
    if shards.groups.rank >= shards.groups.ep_size:          # expert-data-parallel replica of ranks 0..ep-1
        return []
    tensors, step = {}, 0.0
    for name, p in shards.params.items():
        tensors[name] = p.detach().float().cpu().contiguous()
        state = optimizer.state.get(p, {})
        for key in STATE_KEYS:
            if key in state:
                tensors[f"{name}.{key}"] = state[key].detach().float().cpu().contiguous()
        step = float(state.get("step", step))
    meta = {"bounds": json.dumps({n: list(b) for n, b in shards.bounds.items()}), "step": repr(step)}
    out = Path(checkpoint) / EXPERT_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"shard{shards.groups.ep_rank}-of-{shards.groups.ep_size}.safetensors"
    save_file(tensors, str(path), meta)
    return [path]


def has_expert_shards(checkpoint: Path) -> bool:
    return any((Path(checkpoint) / EXPERT_DIR).glob("shard*-of-*.safetensors"))


def _saved_shards(checkpoint: Path) -> list[tuple[Path, dict[str, list[int]], float]]:
    files = sorted((Path(checkpoint) / EXPERT_DIR).glob("shard*-of-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no {EXPERT_DIR}/shard*.safetensors: this checkpoint was saved "
                                f"without expert parallelism")
    saved = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
            saved.append((f, json.loads(meta["bounds"]), float(meta["step"])))
    return saved


def _read_range(saved, name: str, key: str, lo: int, hi: int, total: int) -> torch.Tensor | None:
    """Experts [lo, hi) of `name` (or of its optimizer state `key`) from the saved shards that overlap them."""
    pieces, covered = [], lo
    for f, bounds, _ in sorted(saved, key=lambda s: s[1].get(name, [0])[0]):
        if name not in bounds or bounds[name][2] != total:
            raise ValueError(f"{f}: {name} holds {bounds.get(name, [0, 0, None])[2]} experts, the model has {total}: "
                             f"the checkpoint is from another model")
        s_lo, s_hi, _ = bounds[name]
        a, b = max(lo, s_lo), min(hi, s_hi)
        if a >= b:
            continue
        tname = f"{name}.{key}" if key else name
        with safe_open(str(f), framework="pt") as h:
            if tname not in h.keys():
                return None
            pieces.append(h.get_slice(tname)[a - s_lo:b - s_lo])
        covered = b
    if covered != hi:
        raise ValueError(f"the saved expert shards do not cover experts [{lo}, {hi}) of {name}")
    return torch.cat(pieces)


def load_expert_shards(shards: ExpertShards, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Fill this rank's shards (and their AdamW state) from a checkpoint saved at any expert-parallel size."""
    saved = _saved_shards(checkpoint)
    step = saved[0][2]
    for name, p in shards.params.items():
        lo, hi, total = shards.bounds[name]
        with torch.no_grad():
            p.copy_(_read_range(saved, name, "", lo, hi, total).to(p.dtype))
        state = {k: _read_range(saved, name, k, lo, hi, total) for k in STATE_KEYS}
        if all(v is not None for v in state.values()):
            optimizer.state[p] = {"step": torch.tensor(step), **{k: v.to(p.device) for k, v in state.items()}}


def read_full_experts(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every expert weight, whole (for export): {"layers.{g}.ffn.w1": [N_E, d, d_e], ...}."""
    saved = _saved_shards(checkpoint)
    names = {n: b[2] for _, bounds, _ in saved for n, b in bounds.items()}
    return {n: _read_range(saved, n, "", 0, total, total) for n, total in names.items()}
