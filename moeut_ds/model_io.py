"""The project's model format: a directory with config.json and model.safetensors (no pickle anywhere).

Written by the importer (convert.py) and the trainer's export; read by `load_model`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moeut_ds.config import ModelConfig
from moeut_ds.experts import ExpertBackend
from moeut_ds.model import LanguageModel

FORMAT = "moeut-ds-model"
FORMAT_VERSION = 1
REEXPORT = "re-export the model with `python -m moeut_ds.export RUN --out DIR`"
TOKENIZER_FIX = "use the tokenizer.model of the prepared dataset the model was trained on"


def save_model(model: LanguageModel, path: Union[str, Path], extra: dict | None = None) -> Path:
    """Write atomically: a temporary sibling directory renamed into place, so a crash never leaves half a model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_config(path: Union[str, Path]) -> dict:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist: pass a directory written by "
                                f"`python -m moeut_ds.export` (its --out) or moeut_ds.convert")
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a moeut-ds model directory (no config.json); export a checkpoint with "
                                f"`python -m moeut_ds.export` or convert reference weights with moeut_ds.convert")
    try:
        meta = json.loads(cfg_file.read_text())
    except ValueError as e:     # JSONDecodeError, UnicodeDecodeError: a truncated or overwritten file
        raise ValueError(f"{cfg_file} is not valid JSON ({e}): {REEXPORT}") from None
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: format {meta.get('format')!r} v{meta.get('format_version')} is not "
                         f"{FORMAT!r} <= v{FORMAT_VERSION}; upgrade moeut-ds or re-export the model")
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{cfg_file} has no \"model\" settings: {REEXPORT}")
    return meta


def load_model(path: Union[str, Path], expert_backend: Union[str, ExpertBackend] = "auto",
               device: Union[str, torch.device] = "cpu") -> LanguageModel:
    """Load a model directory; returns an eval-mode LanguageModel whose call on [B, T] ids gives `.logits`.

    A truncated model.safetensors or one that does not fit config.json raises ValueError naming both files."""
    meta = read_config(path)
    model = LanguageModel(ModelConfig.from_dict(meta["model"]), expert_backend=expert_backend)
    weights, cfg_file = Path(path) / "model.safetensors", Path(path) / "config.json"
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} cannot be read ({e}): it is missing, truncated or corrupt; {REEXPORT}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:   # size mismatch / missing or unexpected keys, one line per tensor after a header
        last = str(e).strip().splitlines()[-1].strip().rstrip(".")
        if model.cfg.norm == "post" and "out_norm.weight" in state:
            raise ValueError(f"{weights} is a post-LN model in the layout before 2026-11-28 (a final LayerNorm, no "
                             f"input norm; docs/ARCHITECTURE.md): load it with the moeut-ds version that exported "
                             f"it") from None
        raise ValueError(f"{weights} does not match {cfg_file} ({last}): the config was edited or the files come "
                         f"from different models; {REEXPORT}") from None
    return model.to(device).eval()


def load_tokenizer(path: Union[str, Path], vocab_size: int):
    """A SentencePiece processor whose piece count is the model's vocab_size (other ids would index past the
    embedding); ValueError naming the file otherwise."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:   # sentencepiece raises either for a file that is not a ModelProto
        raise ValueError(f"tokenizer {path} cannot be loaded ({e}): {TOKENIZER_FIX}") from None
    if sp.get_piece_size() != vocab_size:
        raise ValueError(f"tokenizer {path} has {sp.get_piece_size()} pieces, the model's vocab_size is {vocab_size}: "
                         f"{TOKENIZER_FIX}")
    return sp
