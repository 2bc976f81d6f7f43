"""WindowLoader / eval_windows semantics on synthetic shards whose token at stream position p is p, so a window
names itself (first token / context = window index)."""
import json
import os

import numpy as np
import pytest
import torch

from moeut_ds.data import DataError, WindowLoader
from moeut_ds.data.dataset import TokenDataset


def synthetic(tmp_path, sizes=(50, 37, 113)) -> TokenDataset:
    """Shards of consecutive ids (uint32), opened without the tokenizer checks (none needed here)."""
    shards, start = [], 0
    for i, n in enumerate(sizes):
        arr = np.arange(start, start + n, dtype="<u4")
        name = f"train-{i:05d}.bin"
        arr.tofile(os.path.join(tmp_path, name))
        shards.append({"file": name, "num_tokens": n})
        start += n
    meta = {"vocab_size": 1 << 20, "eod_id": 0}
    return TokenDataset(str(tmp_path), "train", meta, shards, np.dtype("<u4"), "unused")


def ids(batch: torch.Tensor, context: int) -> list[int]:
    """Window index of each row, after checking the row is the right contiguous slice."""
    out = []
    for row in batch.tolist():
        assert row == list(range(row[0], row[0] + context + 1))
        assert row[0] % context == 0
        out.append(row[0] // context)
    return out


def global_stream(ds, context, batch, world, steps, seed=0, shuffle=True, state=None):
    """Windows consumed by all ranks together, in global order (rank 0's block, then rank 1's, ...)."""
    loaders = [WindowLoader(ds, context, batch, r, world, seed=seed, shuffle=shuffle) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(json.loads(json.dumps(state)))
    seq = []
    for _ in range(steps):
        for ld in loaders:
            b = next(ld)
            assert b.dtype == torch.long and b.shape == (batch, context + 1)
            seq += ids(b, context)
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)
    return seq, states[0]


def test_windows_cross_shard_boundaries_and_count(tmp_path):
    ds = synthetic(tmp_path)
    assert ds.num_tokens == 200
    assert ds.num_windows(8) == (200 - 1) // 8
    loader = WindowLoader(ds, 8, 4, shuffle=False)
    seq = ids(next(loader), 8) + ids(next(loader), 8)  # windows 6 (tokens 48..56) spans shards 0 and 1
    assert seq == list(range(8))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_slices_disjoint_and_complete(tmp_path, world):
    ds = synthetic(tmp_path)
    context, batch = 7, 2
    n = ds.num_windows(context)  # 28 windows: not a multiple of batch*world for world 3
    steps = -(-2 * n // (batch * world))
    seq, state = global_stream(ds, context, batch, world, steps)
    assert sorted(seq[:n]) == list(range(n))          # epoch 0: every window exactly once across ranks
    assert sorted(seq[n:2 * n]) == list(range(n))     # epoch 1 likewise, in another order
    assert seq[:n] != seq[n:2 * n]
    assert seq[:n] != list(range(n))                  # shuffled
    per_rank = [[] for _ in range(world)]
    loaders = [WindowLoader(ds, context, batch, r, world) for r in range(world)]
    for _ in range(n // (batch * world)):
        for r, ld in enumerate(loaders):
            per_rank[r] += ids(next(ld), context)
    flat = [w for r in per_rank for w in r]
    assert len(flat) == len(set(flat))                # disjoint within the epoch
    assert state["windows_seen"] == steps * batch * world and state["epoch"] == state["windows_seen"] // n


def test_same_seed_same_order_other_seed_differs(tmp_path):
    ds = synthetic(tmp_path)
    a, _ = global_stream(ds, 5, 3, 1, 10, seed=1)
    b, _ = global_stream(ds, 5, 3, 1, 10, seed=1)
    c, _ = global_stream(ds, 5, 3, 1, 10, seed=2)
    assert a == b and a != c


def test_unshuffled_order_is_sequential(tmp_path):
    ds = synthetic(tmp_path)
    seq, _ = global_stream(ds, 10, 4, 2, 3, shuffle=False)
    assert seq == [i % 19 for i in range(24)]


@pytest.mark.parametrize("before,after,steps_before", [(1, 1, 5), (2, 2, 3), (2, 3, 3), (3, 2, 4), (3, 1, 7)])
def test_resume_equals_uninterrupted(tmp_path, before, after, steps_before):
    ds = synthetic(tmp_path)
    context, batch = 6, 2
    reference, _ = global_stream(ds, context, 1, 1, 200)  # the one global stream, independent of ranks
    first, state = global_stream(ds, context, batch, before, steps_before)
    second, _ = global_stream(ds, context, batch, after, 9, state=state)
    assert first + second == reference[:len(first) + len(second)]
    assert state["windows_seen"] == len(first)


def test_state_is_json_and_refuses_other_settings(tmp_path):
    ds = synthetic(tmp_path)
    ld = WindowLoader(ds, 8, 2, seed=3)
    next(ld)
    state = ld.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert all(isinstance(v, (int, str, bool)) for v in state.values())
    for key, kwargs in (("seed", {"seed": 4}), ("context", {}), ("shuffle", {"shuffle": False})):
        other = WindowLoader(ds, 9 if key == "context" else 8, 2, **{"seed": 3, **kwargs})
        with pytest.raises(DataError, match=key):
            other.load_state_dict(state)


def test_eval_windows_fixed_disjoint_and_complete(tmp_path):
    ds = synthetic(tmp_path)
    context = 5
    n = ds.num_windows(context)
    for world in (1, 2, 3):
        got = []
        for r in range(world):
            ev = ds.eval_windows(context, 4, rank=r, world_size=world)
            batches = list(ev)
            assert len(batches) == len(ev)
            assert all(b.shape[0] == 4 for b in batches[:-1]) and 1 <= batches[-1].shape[0] <= 4
            assert [ids(b, context) for b in batches] == [ids(b, context) for b in ev]  # re-iterable, identical
            got += [w for b in batches for w in ids(b, context)]
        assert got == list(range(n))
    capped = [w for b in ds.eval_windows(context, 3, max_windows=10) for w in ids(b, context)]
    assert capped == list(range(10))


def test_bad_arguments(tmp_path):
    ds = synthetic(tmp_path, sizes=(10,))
    with pytest.raises(DataError, match="fewer than one window"):
        WindowLoader(ds, 10, 1)
    with pytest.raises(DataError, match="rank"):
        WindowLoader(ds, 4, 1, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch_size"):
        ds.eval_windows(4, 0)


def test_token_id_outside_the_vocabulary_is_named_with_its_shard(tmp_path):
    """A shard edited after preparation (its sha256 updated too) can hold ids >= vocab_size: the batch that reads
    one raises DataError naming the shard and the position, instead of an embedding assert on the device."""
    ds = synthetic(tmp_path)
    ds.vocab_size = 150                      # stream positions 150.. (shard 2, from position 87 of it) are too large
    loader = WindowLoader(ds, 10, 2, shuffle=False)
    for _ in range(7):                       # windows 0..13: tokens 0..140
        next(loader)
    with pytest.raises(DataError, match=r"train-00002\.bin holds token id 150 >= vocab_size 150 .*position 150"):
        next(loader)                         # windows 14, 15: tokens 140..160
