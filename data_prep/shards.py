"""Parallel tokenization into shard files that are complete or absent.

Shard boundaries depend only on the document stream (text size per shard), never on timing, so a re-run plans the
same shards. Each shard is written to `<name>.tmp<pid>`, fsynced and renamed, then a sidecar `<name>.json` records
a fingerprint of its input text and tokenizer: a re-run skips shards whose file and sidecar match.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import re

from multiprocessing.pool import Pool
from typing import Iterator, Optional

import numpy as np

from moeut_ds.data.format import METADATA_FILE, shard_name, write_json_atomic

from .errors import InputError

BLOCK_CHARS = 1 << 20  # ~1 MB of text per worker task: many tasks per shard keep all cores busy

_sp = None
_eod = 0
_dtype: Optional[np.dtype] = None


def init_worker(model_path: str, eod: int, dtype: str) -> None:
    """Pool initializer: each worker loads the tokenizer once."""
    global _sp, _eod, _dtype
    import sentencepiece as spm
    _sp = spm.SentencePieceProcessor(model_file=model_path)
    _eod, _dtype = eod, np.dtype(dtype)


def encode_block(texts: list[str]) -> np.ndarray:
    """Token ids of the documents, each followed by the end-of-document id."""
    flat: list[int] = []
    for ids in _sp.encode(texts):
        flat.extend(ids)
        flat.append(_eod)
    return np.asarray(flat, dtype=_dtype)


@dataclasses.dataclass
class PlannedShard:
    split: str
    index: int
    texts: list[str]
    num_documents: int
    chars: int
    fingerprint: str = ""

    @property
    def file(self) -> str:
        return shard_name(self.split, self.index)


class ShardPlanner:
    """Groups (split, text) documents into shards of about shard_chars characters per split."""

    def __init__(self, shard_chars: int, salt: str):
        self.shard_chars = shard_chars
        self.salt = salt
        self.buf: dict[str, PlannedShard] = {}
        self.next_index: dict[str, int] = collections.Counter()

    def _new(self, split: str) -> PlannedShard:
        sh = PlannedShard(split, self.next_index[split], [], 0, 0)
        self.next_index[split] += 1
        return sh

    def add(self, split: str, text: str, times: int) -> Optional[PlannedShard]:
        sh = self.buf.get(split) or self._new(split)
        self.buf[split] = sh
        for _ in range(times):
            sh.texts.append(text)
            sh.chars += len(text)
        sh.num_documents += times
        if sh.chars >= self.shard_chars:
            del self.buf[split]
            return self._seal(sh)
        return None

    def flush(self) -> Iterator[PlannedShard]:
        for split in sorted(self.buf):
            yield self._seal(self.buf.pop(split))

    def _seal(self, sh: PlannedShard) -> PlannedShard:
        h = hashlib.sha256(self.salt.encode())
        for t in sh.texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        sh.fingerprint = h.hexdigest()
        return sh


def finished_record(out_dir: str, sh: PlannedShard) -> Optional[dict]:
    """The sidecar record if this shard was already written by an identical plan, else None."""
    path = os.path.join(out_dir, sh.file)
    try:
        with open(path + ".json", encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != sh.fingerprint or not os.path.isfile(path):
        return None
    if os.path.getsize(path) != rec.get("bytes"):
        return None
    return rec


class ShardWriter:
    """Feeds planned shards through a worker pool, at most two shards in flight, writing each atomically."""

    def __init__(self, pool: Pool, out_dir: str, progress):
        self.pool, self.out_dir, self.progress = pool, out_dir, progress
        self.pending: collections.deque = collections.deque()
        self.records: list[dict] = []
        self.skipped = 0
        self.tokens = 0

    def submit(self, sh: PlannedShard) -> None:
        rec = finished_record(self.out_dir, sh)
        if rec is not None:
            self.skipped += 1
            self.records.append(rec)
            self.progress.update(sh.chars)
            return
        blocks, cur, n = [], [], 0
        for t in sh.texts:
            cur.append(t)
            n += len(t)
            if n >= BLOCK_CHARS:
                blocks.append((cur, n))
                cur, n = [], 0
        if cur:
            blocks.append((cur, n))
        futures = [(self.pool.apply_async(encode_block, (b,)), n) for b, n in blocks]
        sh.texts = []  # the workers hold their copies; free ours
        self.pending.append((sh, futures))
        while len(self.pending) > 1:
            self._collect()

    def finish(self) -> list[dict]:
        while self.pending:
            self._collect()
        return self.records

    def _collect(self) -> None:
        sh, futures = self.pending.popleft()
        path = os.path.join(self.out_dir, sh.file)
        tmp = f"{path}.tmp{os.getpid()}"
        h = hashlib.sha256()
        ntok = 0
        with open(tmp, "wb") as f:
            for fut, n in futures:
                arr = fut.get()
                b = arr.tobytes()
                f.write(b)
                h.update(b)
                ntok += arr.size
                self.progress.update(n)
            f.flush()
            os.fsync(f.fileno())
        invalidate_metadata(self.out_dir)
        os.replace(tmp, path)
        rec = {"file": sh.file, "split": sh.split, "num_tokens": ntok, "bytes": os.path.getsize(path),
               "sha256": h.hexdigest(), "num_documents": sh.num_documents, "text_chars": sh.chars,
               "fingerprint": sh.fingerprint}
        write_json_atomic(path + ".json", rec)
        self.tokens += ntok
        self.records.append(rec)


OWN_FILE = re.compile(r"^(metadata\.json|tokenizer\.model(\.sample-sha256)?|(train|val)-\d{5}\.bin(\.json)?)"
                      r"(\.tmp\d*)?$")


def check_out_dir(out_dir: str) -> None:
    """Refuse an output directory holding files this tool did not write: re-runs delete stale shards and
    temporaries there, which must never touch a user's other files."""
    foreign = sorted(n for n in os.listdir(out_dir) if not OWN_FILE.match(n))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(f"--out {out_dir} holds files that are not part of a prepared dataset ({shown}): "
                         f"choose a new or empty directory")


def invalidate_metadata(out_dir: str) -> None:
    """Remove metadata.json just before the first change to a file it describes: the dataset is unfinished from
    then until the run writes its own, and a run failing before any change leaves the finished dataset intact."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, METADATA_FILE))


def remove_temporaries(out_dir: str) -> int:
    """Delete leftovers of an interrupted run (temporary shard, tokenizer or metadata files)."""
    n = 0
    for name in os.listdir(out_dir):
        if OWN_FILE.match(name) and ".tmp" in name:
            os.remove(os.path.join(out_dir, name))
            n += 1
    return n


