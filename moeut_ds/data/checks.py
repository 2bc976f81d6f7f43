"""Start-up checks of a prepared dataset, shared by the loader (open_dataset) and `python -m data_prep.validate`.

Each check raises DataError naming the file, what is wrong and the fix, so problems surface before training.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import DataError
from .format import sha256_file, token_dtype

REPREPARE = "re-run `python -m data_prep.prepare` with the same arguments (it rewrites only what is missing or bad)"


def check_tokenizer(root: str, meta: dict) -> str:
    """The tokenizer copy exists, hashes to the recorded sha256 and has the recorded vocabulary size."""
    tok = meta["tokenizer"]
    path = os.path.join(root, tok.get("file", ""))
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file {path} is missing: copy back the .model the data was prepared with, "
                        f"or {REPREPARE}")
    digest = sha256_file(path)
    if digest != tok.get("sha256"):
        raise DataError(f"tokenizer {path} has sha256 {digest[:12]}..., the shards were encoded with "
                        f"{str(tok.get('sha256'))[:12]}...: restore the original tokenizer or re-prepare the data "
                        f"with `--tokenizer {path}`")
    try:
        import sentencepiece as spm
    except ImportError:  # the hash already pins the file; the vocabulary check is a bonus
        return path
    try:
        n = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
        raise DataError(f"tokenizer {path} cannot be loaded by sentencepiece ({e}): {REPREPARE}") from None
    if n != meta["vocab_size"] or n != tok.get("vocab_size"):
        raise DataError(f"tokenizer {path} has {n} pieces but metadata says vocab_size {meta['vocab_size']}: "
                        f"{REPREPARE}")
    return path


def check_header(meta: dict) -> np.dtype:
    """vocab_size, eod_id and dtype agree with each other."""
    vocab, eod = meta["vocab_size"], meta["eod_id"]
    if not isinstance(vocab, int) or vocab < 2:
        raise DataError(f"metadata vocab_size {vocab!r} is invalid: {REPREPARE}")
    if not isinstance(eod, int) or not 0 <= eod < vocab:
        raise DataError(f"metadata eod_id {eod!r} is outside the vocabulary 0..{vocab - 1}: {REPREPARE}")
    dtype = token_dtype(vocab)
    if np.dtype(meta["dtype"]) != dtype:
        raise DataError(f"metadata dtype {meta['dtype']} cannot hold vocab_size {vocab} (expected {dtype.name}): "
                        f"{REPREPARE}")
    return dtype


def check_shards(root: str, meta: dict, split: str, verify_checksums: bool = True) -> list[dict]:
    """Every shard of the split exists with the recorded size (and sha256 when verify_checksums)."""
    if split not in meta["splits"]:
        raise DataError(f"dataset {root} has no {split!r} split (it has {sorted(meta['splits'])}): "
                        f"prepare it with a validation fraction or pick another split")
    info = meta["splits"][split]
    shards = info.get("shards", [])
    itemsize = np.dtype(meta["dtype"]).itemsize
    total = 0
    for sh in shards:
        path = os.path.join(root, sh["file"])
        if not os.path.isfile(path):
            raise DataError(f"shard {path} is missing: restore it or {REPREPARE}")
        size = os.path.getsize(path)
        if size != sh["bytes"] or size != sh["num_tokens"] * itemsize:
            raise DataError(f"shard {path} has {size} bytes, metadata expects {sh['bytes']} "
                            f"({sh['num_tokens']} tokens): the file is truncated or replaced; delete it and "
                            f"{REPREPARE}")
        if verify_checksums:
            digest = sha256_file(path)
            if digest != sh["sha256"]:
                raise DataError(f"shard {path} is corrupt (sha256 {digest[:12]}... != recorded "
                                f"{sh['sha256'][:12]}...): delete it and {REPREPARE}")
        total += sh["num_tokens"]
    if total != info.get("num_tokens"):
        raise DataError(f"split {split!r} shards hold {total} tokens, metadata says {info.get('num_tokens')}: "
                        f"{REPREPARE}")
    if total == 0:
        raise DataError(f"split {split!r} of {root} holds no tokens: give more input text or a larger "
                        f"validation fraction")
    return shards


def check_token_range(root: str, shards: list[dict], dtype: np.dtype, vocab_size: int) -> None:
    """Every stored id is < vocab_size (a full read: done by data_prep.validate, not at every start-up)."""
    for sh in shards:
        path = os.path.join(root, sh["file"])
        arr = np.memmap(path, dtype=dtype, mode="r")
        if arr.size and int(arr.max()) >= vocab_size:
            raise DataError(f"shard {path} holds token id {int(arr.max())} >= vocab_size {vocab_size}: "
                            f"it was encoded with another tokenizer; {REPREPARE}")


def check_model_vocab(vocab_size: int, model_vocab_size: int, allow_padding: bool = False) -> None:
    """The model's embedding matches the data's vocabulary (larger only when padding is allowed)."""
    if model_vocab_size == vocab_size or (allow_padding and model_vocab_size > vocab_size):
        return
    raise DataError(f"model vocab_size {model_vocab_size} does not match the dataset's tokenizer vocab_size "
                    f"{vocab_size}: set the model config's vocab_size to {vocab_size}, or prepare the data with a "
                    f"tokenizer of {model_vocab_size} pieces (`--vocab-size {model_vocab_size}`)")
