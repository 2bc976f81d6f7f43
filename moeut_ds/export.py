"""Consolidate a trainer checkpoint (ZeRO stage 0-3) into the project's model format.

    python -m moeut_ds.export RUN_DIR_OR_CHECKPOINT --out DIR

The result (config.json + model.safetensors + tokenizer.model) loads with `moeut_ds.load_model(DIR)`.
Reading a DeepSpeed checkpoint unpickles its .pt files (torch.load with weights_only=False inside DeepSpeed's
zero_to_fp32): export only checkpoints you trust. The exported directory itself contains no pickle.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from moeut_ds.config import ModelConfig
from moeut_ds.parallel.expert_checkpoint import has_expert_shards, read_full_experts


def find_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ directory, or one stepNNNNNNNN checkpoint -> the checkpoint to read."""
    from moeut_ds.train import checkpoint as ckpt

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory, its checkpoints/ directory or one "
                                f"stepNNNNNNNN checkpoint")
    if (p / ckpt.STATE_FILE).is_file():
        return p
    for cand in (p, p / "checkpoints"):
        found = ckpt.newest_checkpoint(cand)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: no complete trainer checkpoint found (looked for {ckpt.STATE_FILE} in it, in "
                            f"its newest stepNNNNNNNN/ and under checkpoints/)")


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from the (possibly partitioned) DeepSpeed files of one checkpoint."""
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:   # ZeRO stage 0: the full module is in the model-states file
        obj = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = obj["module"]
    return {k: v.float().contiguous() for k, v in sd.items()}


def load_from_checkpoint(path: str | Path, expert_backend: str = "auto"):
    """(model in eval mode, trainer state) from a trainer checkpoint, without DeepSpeed's engine."""
    from moeut_ds.model import LanguageModel
    from moeut_ds.train import checkpoint as ckpt

    tag_dir = find_checkpoint(path)
    state = ckpt.read_state(tag_dir)
    ckpt.verify_files(tag_dir, state)        # a damaged checkpoint: one message, not a DeepSpeed traceback
    model = LanguageModel(ModelConfig.from_dict(state["model_config"]), expert_backend=expert_backend)
    weights = consolidated_state_dict(tag_dir)
    if has_expert_shards(tag_dir):          # expert-parallel run: the experts live beside DeepSpeed's files
        weights.update(read_full_experts(tag_dir))
    model.load_state_dict(weights, strict=True)
    return model.eval(), state


def _check_destination(out: Path, tokenizer: Optional[str]) -> None:
    """The user's --out and --tokenizer, checked before the consolidation work."""
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new --out (export never overwrites a directory)")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer} does not exist: pass the tokenizer.model the training data "
                                f"was prepared with, or leave --tokenizer out to use the data's")
    ancestor = next(p for p in out.parents if p.exists())     # where the missing parent directories would go
    if not ancestor.is_dir():
        raise NotADirectoryError(f"--out {out}: {ancestor} is a file, not a directory: choose an --out under a "
                                 f"directory")


def export(path: str | Path, out: str | Path, tokenizer: Optional[str] = None) -> Path:
    """Write the model directory atomically (a temporary sibling renamed into place); refuses to overwrite."""
    from moeut_ds.model_io import save_model

    out = Path(out)
    _check_destination(out, tokenizer)
    model, state = load_from_checkpoint(path, expert_backend="reference")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export.", dir=out.parent))
    try:
        staged = save_model(model, tmp / "model", extra={"trained_steps": state["step"],
                                                          "tokens_seen": state["counters"]["tokens"],
                                                          "train_context": state["run_config"]["data"]["context"]})
        tok = tokenizer or os.path.join(state["run_config"]["data"]["path"], "tokenizer.model")
        if os.path.isfile(tok):
            shutil.copyfile(tok, staged / "tokenizer.model")
        else:
            print(f"warning: tokenizer {tok} not found; pass --tokenizer to include it (generate needs it)",
                  file=sys.stderr)
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeut_ds.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or one stepNNNNNNNN checkpoint")
    p.add_argument("--out", required=True, help="new model directory")
    p.add_argument("--tokenizer", help="SentencePiece .model to include (default: the training data's)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.tokenizer)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:   # ValueError: ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / "config.json").read_text())
    print(f"exported step {meta.get('trained_steps')} to {out} (load with moeut_ds.load_model({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
