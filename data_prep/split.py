"""Deterministic train/validation assignment and weighted repetition, both from hashes of stable keys.

Hashing (not a random stream) makes each document's side independent of input order and of every other
document, so adding an input never moves existing documents between sides.
"""
from __future__ import annotations

import hashlib
import math

from .sources import Document, InputGroup

SPLIT_BY = ("document", "file", "input")


def unit_hash(seed: int, purpose: str, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, purpose, key)."""
    h = hashlib.blake2b(f"{seed}\0{purpose}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def assign_side(doc: Document, group: InputGroup, split_by: str, val_fraction: float, seed: int) -> str:
    """'train' or 'val'. A group pinned with --side goes wholly there; otherwise the unit chosen by split_by
    (the document, its whole file, or the whole input group) is hashed, so a unit never straddles the split."""
    if group.side in ("train", "val"):
        return group.side
    key = {"document": doc.key, "file": doc.source, "input": group.label}[split_by]
    return "val" if unit_hash(seed, "split", key) < val_fraction else "train"


def copies(doc: Document, weight: float, seed: int) -> int:
    """How many times a training document is written: floor(weight), plus one more with probability equal to
    the fractional part (decided per document by hash). Validation documents are always written once."""
    whole = math.floor(weight)
    frac = weight - whole
    return whole + (1 if frac > 0 and unit_hash(seed, "weight", doc.key) < frac else 0)
