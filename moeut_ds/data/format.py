"""On-disk format of a prepared dataset: layout, metadata schema, dtypes, checksums.

Kept in the trainer's package (not in data_prep) so the loader and the offline tools agree on one definition;
data_prep imports it, never the other way round.

Layout of a dataset directory::

    metadata.json          written last: its presence means the preparation finished
    tokenizer.model        copy of the SentencePiece model the shards were encoded with
    train-00000.bin ...    raw little-endian token ids (uint16 or uint32), documents concatenated,
    val-00000.bin ...      each document followed by the end-of-document id (eod_id = the tokenizer's eos id)
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from .errors import DataError

FORMAT_NAME = "moeut-ds-tokens"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val"}
UINT16_MAX_VOCAB = 65535  # ids 0..65534 fit; keep one value spare so the largest id never equals the dtype max


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (halves disk and page-cache use), uint32 beyond."""
    return np.dtype("<u2") if vocab_size <= UINT16_MAX_VOCAB else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks so big shards need no big buffers."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def canonical_split(split: str) -> str:
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise DataError(f"unknown split {split!r}: use one of {sorted(SPLIT_ALIASES)}") from None


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to a temporary name and rename, so a crash never leaves a half file under the real name."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metadata(root: str) -> dict:
    """Load and schema-check metadata.json; every failure is a DataError with the fix."""
    if not os.path.isdir(root):
        raise DataError(f"dataset directory {root!r} does not exist: prepare one with "
                        f"`python -m data_prep.prepare --input ... --out {root}`")
    path = os.path.join(root, METADATA_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: the dataset was never prepared or its preparation did not finish; "
                        f"re-run `python -m data_prep.prepare` with the same arguments (finished shards are kept)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}): re-run data_prep.prepare to rewrite it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DataError(f"{path} is not a {FORMAT_NAME} metadata file: point the trainer at a directory "
                        f"written by data_prep.prepare")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {version!r}, this code reads {FORMAT_VERSION}: "
                        f"re-prepare the data with this version of data_prep.prepare")
    for key in ("vocab_size", "eod_id", "dtype", "tokenizer", "splits"):
        if key not in meta:
            raise DataError(f"{path} lacks the key {key!r}: the file is damaged; re-run data_prep.prepare")
    return meta
