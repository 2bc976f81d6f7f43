"""A prepared split as one memory-mapped token stream, cut into fixed windows of context+1 tokens.

Windows: window i holds tokens [i*context, i*context + context + 1) of the split's stream (the shards of the split
concatenated in order). Inputs are window[:-1], targets window[1:], so consecutive windows share one boundary
token and every token after the first is a target exactly once per epoch. Windows span shard and document
boundaries (documents are separated by eod_id, as in the reference training), so no token is dropped except
the tail shorter than a window.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import torch

from . import checks
from .errors import DataError
from .format import canonical_split, read_metadata


class TokenDataset:
    """One split of a prepared dataset directory. Build it with open_dataset()."""

    def __init__(self, root: str, split: str, meta: dict, shards: list[dict], dtype: np.dtype, tokenizer_path: str):
        self.root = root
        self.split = split
        self.meta = meta
        self.vocab_size: int = int(meta["vocab_size"])
        self.eod_id: int = int(meta["eod_id"])
        self.tokenizer_path: str = tokenizer_path
        self.dtype = dtype
        self._files = [os.path.join(root, s["file"]) for s in shards]
        self._arrays = [np.memmap(f, dtype=dtype, mode="r") for f in self._files]
        sizes = np.array([a.size for a in self._arrays], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # start offset of each shard in the stream
        self.num_tokens: int = int(self._starts[-1])

    def __repr__(self) -> str:
        return (f"TokenDataset({self.root!r}, split={self.split!r}, tokens={self.num_tokens}, "
                f"vocab={self.vocab_size}, shards={len(self._arrays)})")

    def check_vocab(self, model_vocab_size: int, allow_padding: bool = False) -> None:
        """Raise DataError unless the model's vocabulary matches the data's (see checks.check_model_vocab)."""
        checks.check_model_vocab(self.vocab_size, model_vocab_size, allow_padding)

    def num_windows(self, context: int) -> int:
        """Number of whole windows of context+1 tokens (stride context) in the split."""
        if context < 1:
            raise DataError(f"context must be >= 1, got {context}")
        return max(0, (self.num_tokens - 1) // context)

    def require_windows(self, context: int) -> int:
        n = self.num_windows(context)
        if n == 0:
            raise DataError(f"split {self.split!r} of {self.root} has {self.num_tokens} tokens, fewer than one "
                            f"window of context+1 = {context + 1}: use a shorter context or prepare more text")
        return n

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream as int64, crossing shard boundaries when needed."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside 0..{self.num_tokens}")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        pos = start
        i = first
        while pos < stop:
            s0 = int(self._starts[i])
            take = min(stop, int(self._starts[i + 1])) - pos
            if take > 0:
                parts.append(self._arrays[i][pos - s0: pos - s0 + take])
                pos += take
            i += 1
        if len(parts) == 1:
            return parts[0].astype(np.int64)
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    def windows(self, indices: np.ndarray, context: int) -> torch.Tensor:
        """A LongTensor [len(indices), context+1] holding the given windows. Ids >= vocab_size raise DataError
        here (a max over the batch, ~20 us per 64k tokens): the sha256 check passes a shard edited with its
        metadata updated, and such an id would otherwise fail inside the embedding as a device-side assert."""
        out = np.empty((len(indices), context + 1), dtype=np.int64)
        for row, w in enumerate(indices):
            start = int(w) * context
            out[row] = self.tokens(start, start + context + 1)
        if out.size and int(out.max()) >= self.vocab_size:
            row, col = (int(i) for i in np.argwhere(out >= self.vocab_size)[0])
            pos = int(indices[row]) * context + col
            shard = self._files[int(np.searchsorted(self._starts, pos, "right")) - 1]
            raise DataError(f"shard {shard} holds token id {int(out[row, col])} >= vocab_size {self.vocab_size} "
                            f"(split {self.split!r}, stream position {pos}): it was changed after preparation, its "
                            f"recorded sha256 too; prepare the data again into a new directory "
                            f"(`python -m data_prep.validate {self.root}` finds every such shard)")
        return torch.from_numpy(out)

    def eval_windows(self, context: int, batch_size: int, rank: int = 0, world_size: int = 1,
                     max_windows: Optional[int] = None) -> "EvalWindows":
        """Fixed validation batches: windows 0..n-1 in order (no shuffling), the same on every run.

        The first min(n, max_windows) windows are dealt to ranks in contiguous blocks (sizes differ by at most
        one), so ranks are disjoint and together cover them all.
        """
        return EvalWindows(self, context, batch_size, rank, world_size, max_windows)


class EvalWindows:
    """Re-iterable fixed evaluation batches of one rank; len() is the number of batches."""

    def __init__(self, ds: TokenDataset, context: int, batch_size: int, rank: int, world_size: int,
                 max_windows: Optional[int]):
        _check_rank(rank, world_size, batch_size)
        n = ds.require_windows(context)
        if max_windows is not None:
            if max_windows < 1:
                raise DataError(f"max_windows must be >= 1 or None, got {max_windows}")
            n = min(n, max_windows)
        lo, hi = (n * rank) // world_size, (n * (rank + 1)) // world_size
        self.ds, self.context, self.batch_size = ds, context, batch_size
        self.indices = np.arange(lo, hi, dtype=np.int64)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.ds.windows(self.indices[i:i + self.batch_size], self.context)


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} / world_size {world_size} is invalid: need 0 <= rank < world_size")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")


def open_dataset(path: str, split: str = "train", verify_checksums: bool = True) -> TokenDataset:
    """Open one split of a prepared dataset after every start-up check (metadata, tokenizer, shard sizes and,
    unless verify_checksums=False, shard sha256). Raises DataError naming the problem and the fix."""
    root = os.path.abspath(path)
    split = canonical_split(split)
    meta = read_metadata(root)
    dtype = checks.check_header(meta)
    tokenizer_path = checks.check_tokenizer(root, meta)
    shards = checks.check_shards(root, meta, split, verify_checksums)
    return TokenDataset(root, split, meta, shards, dtype, tokenizer_path)
