"""Atomic checkpoints with everything an exact resume needs.

Layout of `<checkpoint dir>`::

    latest                      name of the newest complete checkpoint (rewritten atomically)
    step00001000/               one complete checkpoint
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (engine.save_checkpoint)
        trainer_state.json      step, counters, loader position, run + model config, world size, ZeRO stage
        rng_rank<r>.json        every RNG state of rank r (python, numpy, torch CPU, CUDA)
    .tmp-step00002000/          a save in progress (or killed mid-way): never read, removed by the next save

A save (`Saver`) writes everything into the `.tmp-` directory; every rank hashes (sha256) and fsyncs the files it
wrote (on a file system shared by nodes only the writer's node can flush a file); rank 0 records the hashes in
trainer_state.json, renames the directory to `stepNNNNNNNN` (atomic on POSIX) and then replaces `latest`. With
checkpoint.async_save the writing, hashing and fsyncs run in a thread while training goes on, from a copy of the
state in host memory, and the rename waits for every rank's thread. A kill at any moment leaves the previous
checkpoint complete and `latest` pointing at one. A resume checks the sha256s before
DeepSpeed reads anything, so bytes changed on disk are refused instead of loaded (torch.load checks no checksum).
The trainer's own files are JSON; DeepSpeed's `.pt` files are read by DeepSpeed with torch.load, which unpickles:
only resume from checkpoints you trust (docs/TRAINING.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from moeut_ds.config import ConfigError
from moeut_ds.train.distributed import all_gather_objects, barrier

STATE_FILE = "trainer_state.json"
DIGESTS = "file_sha256"             # trainer_state.json's key: {path relative to the checkpoint: file_digest}
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TAG_RE = re.compile(r"^step(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag_dir: Path) -> int:
    m = TAG_RE.match(tag_dir.name)
    return int(m.group(1)) if m else -1


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durable(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_durable(path: Path, obj: Any) -> None:
    write_text_durable(path, json.dumps(obj, indent=1))


def is_complete(tag_dir: Path) -> bool:
    return TAG_RE.match(tag_dir.name) is not None and (tag_dir / STATE_FILE).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=step_of)


def incomplete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """stepNNNNNNNN directories without trainer_state.json. The trainer never leaves one (it renames complete
    directories into place and deletes through a temporary name), so they come from elsewhere: a copy cut short, a
    file removed by hand."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name) and not is_complete(p)),
                  key=step_of)


def newest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` names when it is complete, else the highest complete step (covers a kill between
    the rename and the rewrite of `latest`; a `latest` that cannot be read counts as stale too)."""
    found = complete_checkpoints(ckpt_dir)
    try:
        named = ckpt_dir / (ckpt_dir / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = None
    if named is not None and named.is_dir() and is_complete(named) and (not found or found[-1] == named):
        return named
    return found[-1] if found else None


def _refuse_incomplete(ckpt_dir: Path) -> None:
    bad = incomplete_checkpoints(ckpt_dir)
    if bad:
        raise ConfigError(f"{ckpt_dir} holds {', '.join(p.name for p in bad)} without {STATE_FILE}: not a "
                          f"checkpoint this trainer finished writing (a copy cut short?). Move "
                          f"{'it' if len(bad) == 1 else 'them'} out of {ckpt_dir}: a resume would skip "
                          f"{'it' if len(bad) == 1 else 'them'}, and a save of the same step would collide")


def resolve_resume(resume: str, ckpt_dir: Path) -> Optional[Path]:
    """'auto' -> newest complete checkpoint or None; 'none' -> None (refused if checkpoints exist); else a path to a
    checkpoint directory (with `latest`) or to one checkpoint. Incomplete step directories (incomplete_checkpoints)
    are refused in ckpt_dir, where this run saves, and in a directory given to search."""
    _refuse_incomplete(ckpt_dir)
    if resume == "none":
        if complete_checkpoints(ckpt_dir):
            raise ConfigError(f"--resume none but {ckpt_dir} already holds checkpoints that a new run would overwrite "
                              f"or prune: use --resume auto to continue it, or set run_dir (or checkpoint.dir) to a "
                              f"new directory")
        return None
    if resume == "auto":
        return newest_checkpoint(ckpt_dir)
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return p
    if p.is_dir():
        _refuse_incomplete(p)
        found = newest_checkpoint(p)
        if found is not None:
            return found
    raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}) nor a directory holding one; "
                      f"pass a stepNNNNNNNN directory, its parent, 'auto' or 'none'")


def check_compatible(state: dict, model_cfg: dict, world_size: int, zero_stage: int, where: Path,
                     experts_sharded: bool = False, tokenizer_sha256: Optional[str] = None) -> None:
    """Refuse a resume that would silently train something else (or that DeepSpeed cannot load).

    A different world size is fine for ZeRO-1/2: DeepSpeed's own files are converted to its universal checkpoint
    format (`universal_checkpoint`) and expert shards are re-sliced (parallel/expert_checkpoint.py)."""
    saved_model = state["model_config"]
    if saved_model != model_cfg:
        diff = sorted(k for k in set(saved_model) | set(model_cfg) if saved_model.get(k) != model_cfg.get(k))
        detail = ", ".join(f"{k}: saved {saved_model.get(k)!r} vs now {model_cfg.get(k)!r}" for k in diff)
        raise ConfigError(f"cannot resume from {where}: the model config differs ({detail}). Resume with the saved "
                          f"model settings, or start a new run_dir (export the checkpoint to fine-tune from it)")
    saved_tok = state.get("tokenizer_sha256")
    if saved_tok and tokenizer_sha256 and saved_tok != tokenizer_sha256:
        raise ConfigError(f"cannot resume from {where}: it was trained on data tokenized with another tokenizer "
                          f"(sha256 {saved_tok[:12]}... vs {tokenizer_sha256[:12]}... of data.path now; it was "
                          f"{state['run_config']['data']['path']!r}): the token ids would change meaning. Resume with "
                          f"data prepared with the run's tokenizer (data_prep.prepare --tokenizer OLD_DATA/"
                          f"tokenizer.model)")
    if state.get("experts_sharded", False) != experts_sharded:
        raise ConfigError(f"cannot resume from {where}: it was saved "
                          f"{'with' if state.get('experts_sharded') else 'without'} expert parallelism and this run "
                          f"is {'with' if experts_sharded else 'without'} it; the optimizer state layouts differ. "
                          f"Resume with expert_parallel_size > 1 if it was saved so, or export the checkpoint "
                          f"(python -m moeut_ds.export) and start a new run from its weights")
    if state["world_size"] != world_size and zero_stage not in (1, 2):
        raise ConfigError(f"cannot resume from {where}: it was saved with world size {state['world_size']}, this run "
                          f"has {world_size}, and only ZeRO-1/2 checkpoints are converted for another number of ranks "
                          f"(DeepSpeed's universal format): resume with {state['world_size']} ranks")
    if state["zero_stage"] != zero_stage:
        raise ConfigError(f"cannot resume from {where}: it was saved with ZeRO stage {state['zero_stage']}, this run "
                          f"uses stage {zero_stage}: resume with the same ds config")


def _unreadable(tag_dir: Path, what: str) -> ConfigError:
    """The error for a damaged checkpoint, pointing at the complete one before it."""
    older = [p for p in complete_checkpoints(tag_dir.parent) if step_of(p) < step_of(tag_dir)]
    then = (f"the previous checkpoint, {older[-1]}, is then the newest one (what --resume auto, export and evaluate "
            f"of the directory take)" if older else "then start the run again")
    return ConfigError(f"checkpoint {tag_dir} is damaged ({what}): move {tag_dir.name} out of {tag_dir.parent}; "
                       f"{then}")


def read_state(tag_dir: Path) -> dict:
    try:
        state = json.loads((tag_dir / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unreadable(tag_dir, f"{STATE_FILE}: {e}") from None
    needed = {"step", "world_size", "zero_stage", "model_config", "run_config", "counters", "loader"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise _unreadable(tag_dir, f"{STATE_FILE} lacks the trainer's keys")
    return state


def verify_files(tag_dir: Path, state: dict, rank: int = 0, world_size: int = 1) -> None:
    """Collective where world_size > 1. Before DeepSpeed reads anything: its files are all there, none is truncated
    (a torch .pt file is a zip whose directory sits at the end; safetensors headers give their data size; the RNG
    files parse), and every file has the sha256 the save recorded (rank r hashes every world_size-th file; the ranks
    then share what they found). Every rank raises the same error, so all refuse together instead of one failing
    inside a collective load while the others wait. Checkpoints saved before the sha256s (2026-12-02) get the
    other checks only."""
    import zipfile

    from safetensors import safe_open

    pts = sorted(tag_dir.glob("*.pt"))
    if not any(p.name.endswith("model_states.pt") for p in pts):
        raise _unreadable(tag_dir, "no DeepSpeed *model_states.pt file")
    per_rank = [("optim_states.pt", "optimizer-state", 1), ("model_states.pt", "model-state", 3)]
    for suffix, what, from_stage in per_rank:      # partitioned from ZeRO-1 (optimizer) / ZeRO-3 (parameters) on
        n = sum(p.name.endswith(suffix) and "zero_pp_rank_" in p.name for p in pts)
        if state["zero_stage"] >= from_stage and n != state["world_size"]:
            raise _unreadable(tag_dir, f"{n} DeepSpeed {what} files for the {state['world_size']} ranks that saved it")
    if state.get("experts_sharded"):
        ep = state["expert_parallel_size"]
        missing = [f"shard{i}-of-{ep}.safetensors" for i in range(ep)
                   if not (tag_dir / "experts" / f"shard{i}-of-{ep}.safetensors").is_file()]
        if missing:
            raise _unreadable(tag_dir, f"expert shard file(s) missing: {', '.join(missing)}")
    for f in pts:
        try:
            zipfile.ZipFile(f).close()
        except (OSError, zipfile.BadZipFile) as e:
            raise _unreadable(tag_dir, f"{f.name}: {e}") from None
    for f in sorted(tag_dir.glob("experts/*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:            # safetensors raises its own SafetensorError (and OSError)
            raise _unreadable(tag_dir, f"experts/{f.name}: {e}") from None
    for f in sorted(tag_dir.glob("rng_rank*.json")):
        try:
            json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _unreadable(tag_dir, f"{f.name}: {e}") from None
    digests = state.get(DIGESTS, {})
    problems = []
    for name in sorted(digests)[rank::world_size]:
        try:
            if file_digest(tag_dir / name) != digests[name]:
                problems.append(f"{name} does not match the sha256 recorded when it was saved (its bytes changed)")
        except OSError as e:                 # missing, unreadable
            problems.append(f"{name}: {e.strerror or e}")
    problems = [p for found in all_gather_objects(problems) for p in found]
    if problems:
        more = f"; {len(problems) - 3} more" if len(problems) > 3 else ""
        raise _unreadable(tag_dir, "; ".join(problems[:3]) + more)


def file_digest(path: Path, block: int = 64 << 20) -> str:
    """Hex sha256 over the sha256s of the file's `block`-byte blocks, hashed by up to 8 threads (hashlib releases the
    GIL): one core hashes ~0.8 GB/s on the H200 host, too slow for a checkpoint of several GB at every save. Not the
    `sha256sum` of the file; the same function checks what it wrote."""
    from concurrent.futures import ThreadPoolExecutor

    fd = os.open(path, os.O_RDONLY)
    try:
        n_blocks = max(1, -(-os.fstat(fd).st_size // block))
        with ThreadPoolExecutor(max_workers=min(8, len(os.sched_getaffinity(0)), n_blocks)) as pool:
            parts = pool.map(lambda i: hashlib.sha256(os.pread(fd, block, i * block)).digest(), range(n_blocks))
            return hashlib.sha256(b"".join(parts)).hexdigest()
    finally:
        os.close(fd)


def check_no_newer(start: Path, ckpt_dir: Path) -> None:
    """Resuming from an older step into a checkpoint directory that holds newer ones would overwrite or prune them
    (saves of the same step are skipped as done, pruning keeps the highest steps): refuse."""
    newer = [p for p in complete_checkpoints(ckpt_dir) if step_of(p) > step_of(start)]
    if newer:
        raise ConfigError(f"--resume {start} is older than {', '.join(p.name for p in newer)} in {ckpt_dir}: "
                          f"continuing would overwrite or prune those. Resume into a new run_dir (or "
                          f"checkpoint.dir), or move the newer checkpoints out of {ckpt_dir}")


# ---- RNG ----

def rng_state() -> dict:
    """Every RNG the training step can touch, as JSON (no pickle)."""
    py = random.getstate()
    np_state = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s["cuda"]])


# ---- save / load ----

def _to_host(obj: Any) -> Any:
    """A copy of a state dict whose tensors live in host memory and no longer alias the training state (DeepSpeed's
    ZeRO optimizer state dict holds the live fp32 partitions and AdamW moments). Containers are rebuilt as
    DeepSpeed's clone_tensors_for_torch_save does."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)({k: _to_host(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [_to_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_host(v) for v in obj)
    return obj


def _recording_engine(engine, background: bool):
    """DeepSpeed's torch.save checkpoint engine, changed in two ways: it records the files this rank writes (the
    rank then hashes and fsyncs exactly those), and with `background` it copies each state dict to host memory and
    leaves the torch.save to the save's thread. DeepSpeed's own asynchronous engines (Fast, Decoupled) need its
    async_io op (libaio), which the pip wheel does not build."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    old = engine.checkpoint_engine
    if type(old) is not TorchCheckpointEngine:
        raise ConfigError(f"the ds config selects DeepSpeed's {type(old).__name__}: moeut_ds writes checkpoints "
                          f"itself (atomically; checkpoint.async_save writes in the background): remove the ds "
                          f"config's checkpoint writer / datastates settings")

    class Recording(TorchCheckpointEngine):
        def __init__(self) -> None:
            self.name = "moeut_ds"
            self.zipfile_serialization = old.zipfile_serialization
            self.writes: list[tuple[Any, str]] = []       # (host copy, path) left to the thread
            self.files: list[str] = []                    # every file this rank wrote or will write

        def preserves_storage_sharing(self) -> bool:   # True: DeepSpeed clones model states to the host first,
            return not background                      # which _to_host does anyway

        def save(self, state_dict, path: str) -> None:
            self.files.append(path)
            if background:
                self.writes.append((_to_host(state_dict), path))
            else:
                super().save(state_dict, path)

    return Recording()


@dataclass
class _PendingSave:
    """A save between `Saver.start` and `Saver.commit`."""
    tmp: Path                           # .tmp-stepN, renamed to `final` by the commit
    final: Path
    state: dict                         # trainer_state.json without the digests
    files: list[Path]                   # the files this rank wrote (or its thread will write)
    t0: float
    pause_s: float                      # test hook of the commit (synchronous saves)
    phases: dict[str, float]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None                  # {path relative to tmp: digest}, or the error's text


class Saver:
    """Saves checkpoints: every rank writes into `.tmp-stepN`, hashes and fsyncs the files it wrote; then rank 0
    records the hashes in trainer_state.json, renames the directory into place and rewrites `latest` (commit).

    With background=True, `start` only copies the state to host memory (seconds) and a thread writes, hashes and
    fsyncs the files while training goes on; `commit` runs at a step where every rank's thread has finished (the
    trainer learns that from its per-step all-reduce), or waits for them. Until the commit the previous checkpoint is
    the newest, so a kill at any moment loses nothing that was committed. The host copy costs as much host memory
    as this rank's share of the checkpoint."""

    def __init__(self, engine, ckpt_dir: Path, rank: int, keep_last: int, keep_every: int, background: bool = False,
                 extra: Optional[Callable[[Path], list[Path]]] = None) -> None:
        self.engine, self.ckpt_dir, self.rank = engine, ckpt_dir, rank
        self.keep_last, self.keep_every, self.background, self.extra = keep_last, keep_every, background, extra
        self.pending: Optional[_PendingSave] = None

    def writing(self) -> bool:
        """This rank's thread of the pending save has not finished."""
        return self.pending is not None and not self.pending.done.is_set()

    def start(self, step: int, state: dict, pause_s: float = 0.0) -> bool:
        """Collective. Returns False when the step is already saved (e.g. a preemption right after a periodic save).
        `extra(tmp_dir)` writes more files (expert shards) and returns them. pause_s: a test hook, a window in which
        to kill the save (after trainer_state.json is written, or before a background thread writes)."""
        assert self.pending is None, "commit the pending save first"
        final = self.ckpt_dir / tag_for(step)
        if final.is_dir() and is_complete(final):
            return False
        t0 = time.perf_counter()
        tmp = self.ckpt_dir / (TMP_PREFIX + tag_for(step))
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.ckpt_dir.glob(TMP_PREFIX + "*"):   # left by a save that was killed: incomplete
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        recorder = _recording_engine(self.engine, self.background)
        default, self.engine.checkpoint_engine = self.engine.checkpoint_engine, recorder
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tmp.name, client_state={}, save_latest=False)
        finally:
            self.engine.checkpoint_engine = default
        rng = tmp / f"rng_rank{self.rank}.json"
        write_json_durable(rng, rng_state())
        files = [Path(f) for f in recorder.files] + [rng] + (self.extra(tmp) if self.extra is not None else [])
        p = self.pending = _PendingSave(tmp, final, state, files, t0, pause_s=0.0 if self.background else pause_s,
                                        phases={"copy" if self.background else "write": time.perf_counter() - t0})
        if self.background:
            threading.Thread(target=self._write_hash_sync, args=(p, recorder.writes, pause_s),
                             name=f"save-{tmp.name}", daemon=True).start()
        else:
            self._write_hash_sync(p, [], 0.0)
        return True

    def _write_hash_sync(self, p: _PendingSave, writes: list[tuple[Any, str]], pause_s: float) -> None:
        """This rank's part of the save `p`, without collectives (it may run in a thread): write what is left, hash
        and fsync this rank's files. Sets p.result to {relative path: digest} or to the error's text."""
        try:
            time.sleep(pause_s)
            t0 = time.perf_counter()
            for state_dict, path in writes:
                torch.save(state_dict, path)
            writes.clear()
            t1 = time.perf_counter()
            digests = {str(f.relative_to(p.tmp)): file_digest(f) for f in p.files}
            t2 = time.perf_counter()
            for f in p.files:
                _fsync_path(f)
            if self.background:
                p.phases["write"] = t1 - t0
            p.phases.update(digests=t2 - t1, fsync=time.perf_counter() - t2)
            p.result = digests
        except Exception as e:          # reported by commit() on every rank, not lost in the thread
            p.result = f"rank {self.rank}: {type(e).__name__}: {e}"
        finally:
            p.done.set()

    def commit(self) -> tuple[Path, float, dict[str, float]]:
        """Collective: wait for every rank's files, then rank 0 makes the save the newest checkpoint. Returns the
        checkpoint, the seconds since its start and this rank's seconds per phase: "copy" to host memory (in the
        background; training waits for it), "write", "digests", "fsync" (in the thread, in the background) and
        "commit" (training waits for it; it includes waiting for a thread that has not finished)."""
        p, self.pending = self.pending, None
        t0 = time.perf_counter()
        p.done.wait()
        results = all_gather_objects(p.result)
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            raise RuntimeError(f"checkpoint {p.final} was not saved ({'; '.join(errors)}); the previous "
                               f"checkpoint is still the newest. Free disk space or fix {self.ckpt_dir}, then "
                               f"resume with --resume auto")
        if self.rank == 0:
            digests = {k: v for r in results for k, v in r.items()}
            for f in sorted(p.tmp.rglob("*")):      # written outside DeepSpeed's checkpoint engine: none today
                name = str(f.relative_to(p.tmp))
                if f.is_file() and name not in digests and name != STATE_FILE:
                    digests[name] = file_digest(f)
                    _fsync_path(f)
            write_json_durable(p.tmp / STATE_FILE, {**p.state, DIGESTS: digests})
            time.sleep(p.pause_s)                   # test hook: a window in which to kill the save
            _fsync_path(p.tmp)
            os.replace(p.tmp, p.final)
            _fsync_path(self.ckpt_dir)
            write_text_durable(self.ckpt_dir / LATEST, p.final.name)
            _fsync_path(self.ckpt_dir)
            prune(self.ckpt_dir, self.keep_last, self.keep_every)
        barrier()
        now = time.perf_counter()
        return p.final, now - p.t0, {**p.phases, "commit": now - t0 - p.pause_s}


def prune(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest keep_last, except every keep_every-th step."""
    found = complete_checkpoints(ckpt_dir)
    keep = set(found[-keep_last:])
    if keep_every:
        keep |= {p for p in found if step_of(p) % keep_every == 0}
    removed = [p for p in found if p not in keep]
    for p in removed:       # renamed first: a kill mid-delete leaves a .tmp- directory, not an incomplete step
        doomed = p.with_name(f"{TMP_PREFIX}pruned-{p.name}")
        os.replace(p, doomed)
        shutil.rmtree(doomed)
    return removed


UNIVERSAL = "universal"


def universal_checkpoint(tag_dir: Path, rank: int) -> Path:
    """Collective. DeepSpeed's files of `tag_dir` in its universal format (per-parameter, any number of ranks),
    converted once by rank 0 into `tag_dir/universal` (atomically: a temporary name, then a rename)."""
    import subprocess

    out = tag_dir / UNIVERSAL
    if rank == 0 and not out.is_dir():
        tmp = tag_dir / f"{TMP_PREFIX}{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            str(tag_dir), "--output_folder", str(tmp), "--inject_missing_state",
                            "--num_extract_workers", "1", "--num_merge_workers", "1"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"converting {tag_dir} to DeepSpeed's universal format failed:\n{r.stderr[-3000:]}")
        os.replace(tmp, out)
    barrier()
    return out


def load(engine, tag_dir: Path, rank: int, universal: bool = False) -> dict:
    """Collective. Loads DeepSpeed's model/optimizer/scheduler state, then this rank's RNG; returns the trainer state.
    universal=True reads `tag_dir/universal` (the engine must be configured with checkpoint.load_universal)."""
    state = read_state(tag_dir)
    load_dir, tag = (tag_dir, UNIVERSAL) if universal else (tag_dir.parent, tag_dir.name)
    try:
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except RuntimeError as e:       # e.g. missing/unexpected keys: weights of another model layout
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"DeepSpeed could not load {tag_dir} into this model ({first[:300]}): the checkpoint holds "
                          f"another parameter layout (e.g. a post-LN run saved before 2026-11-28, "
                          f"docs/ARCHITECTURE.md); resume it with the code that wrote it, or start a new run_dir") \
            from None
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    rng_file = tag_dir / f"rng_rank{rank}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    elif rank < state["world_size"]:     # ranks beyond the saved world size never had one
        print(f"warning: {rng_file} is missing: rank {rank} continues with fresh RNG streams, so the resumed run "
              f"is not bitwise the uninterrupted one", file=sys.stderr, flush=True)
    return state
