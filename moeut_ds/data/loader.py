"""Deterministic, rank-sharded, resumable training batches.

The order is one infinite global stream: epoch e is a permutation of all windows drawn from seed+e (or the
identity when shuffle=False), and epochs follow each other. Each step the world consumes the next
batch_size * world_size windows of that stream; rank r takes the r-th block of batch_size. A step may straddle
an epoch boundary (the tail of epoch e, then the head of e+1), so every window of every epoch is seen exactly once.

The whole state is the global count of windows consumed (windows_seen). It does not depend on the number of
ranks, so a run saved with 2 ranks resumes with 3 at exactly the next unseen window.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .dataset import TokenDataset, _check_rank
from .errors import DataError

STATE_VERSION = 1


class WindowLoader:
    """Infinite iterator of LongTensor [batch_size, context+1] (inputs = [:, :-1], targets = [:, 1:])."""

    def __init__(self, ds: TokenDataset, context: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        _check_rank(rank, world_size, batch_size)
        self.ds = ds
        self.context = int(context)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_windows = ds.require_windows(self.context)
        self.windows_seen = 0  # global: windows consumed by all ranks together
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """The epoch the next window comes from."""
        return self.windows_seen // self.num_windows

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # one cached permutation: steps touch at most two consecutive epochs
            if self.shuffle:
                rng = np.random.default_rng([self.seed + epoch, 0x6D6F6575])  # seed+epoch, fixed stream tag
                self._perm = rng.permutation(self.num_windows).astype(np.int64)
            else:
                self._perm = np.arange(self.num_windows, dtype=np.int64)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Window ids at global stream positions [start, start+count), crossing epochs as needed."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            pos = start + filled
            epoch, offset = divmod(pos, self.num_windows)
            take = min(count - filled, self.num_windows - offset)
            out[filled:filled + take] = self._order(epoch)[offset:offset + take]
            filled += take
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        start = self.windows_seen + self.rank * self.batch_size
        idx = self.global_indices(start, self.batch_size)
        self.windows_seen += self.batch_size * self.world_size
        return self.ds.windows(idx, self.context)

    def state_dict(self) -> dict:
        """Plain ints/str/bool (JSON-safe). Same on every rank; world_size and batch_size are not part of it."""
        return {"version": STATE_VERSION, "windows_seen": self.windows_seen, "epoch": self.epoch,
                "seed": self.seed, "shuffle": self.shuffle, "context": self.context,
                "num_windows": self.num_windows, "split": self.ds.split}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the next unseen window; refuses a state from another dataset, context, seed or order."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}: "
                            f"this checkpoint was written by another version of the loader")
        mine = {"seed": self.seed, "shuffle": self.shuffle, "context": self.context,
                "num_windows": self.num_windows, "split": self.ds.split}
        for key, value in mine.items():
            if state.get(key) != value:
                raise DataError(f"loader state has {key}={state.get(key)!r} but this loader has {key}={value!r}: "
                                f"resume with the same dataset, context, seed and shuffle setting as the saved "
                                f"run, or start a new run_dir from its weights (python -m moeut_ds.export)")
        seen = state.get("windows_seen")
        if not isinstance(seen, int) or seen < 0:
            raise DataError(f"loader state windows_seen={seen!r} is invalid: the checkpoint is damaged")
        self.windows_seen = seen
