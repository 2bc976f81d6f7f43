"""A small multi-process harness for the trainer tests: N processes with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR=127.0.0.1 / a free MASTER_PORT, exactly what torchrun or the Slurm scripts export.

Also the shared test data: one small dataset prepared from the bundled English corpus per session, in a
directory shared by all trainer tests (and by pytest-xdist workers) via a lock.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra or {})
    return env


class Ranks:
    """Processes of one distributed job; always reaped (killed by PID on exit)."""

    def __init__(self, argv: Sequence[str], world: int, log_dir: Path, extra_env: Optional[dict] = None):
        self.port = free_port()
        self.logs = [log_dir / f"rank{r}.log" for r in range(world)]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for r in range(world):
            f = open(self.logs[r], "w")
            self.procs.append(subprocess.Popen(list(argv), env=rank_env(r, world, self.port, extra_env), cwd=REPO,
                                               stdout=f, stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.time() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"timeout after {timeout}s:\n{self.output()}")
        return [p.returncode for p in self.procs]

    def signal(self, sig: int, ranks: Sequence[int] = ()) -> None:
        for r in ranks or range(len(self.procs)):
            if self.procs[r].poll() is None:
                os.kill(self.procs[r].pid, sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)      # own session: the rank and anything it started
        for p in self.procs:
            p.wait()
        # DeepSpeed's CPU shared-memory all-reduce segments of killed (or trainer-less) ranks: ~66 MB of RAM each
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{self.port}_*"):
            os.unlink(f)

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")[-6000:]

    def report(self, rcs: Sequence[int], expect: int = 0) -> str:
        """Exit codes and the log tails of the ranks that did not exit with `expect` (rank 0's if all did)."""
        bad = [r for r, rc in enumerate(rcs) if rc != expect] or [0]
        return f"exit codes {list(rcs)}, expected {expect}\n" + "\n".join(
            f"--- rank {r} ---\n{self.output(r)}" for r in bad)

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def train_argv(config: Optional[str], *overrides: str, resume: str = "auto") -> list[str]:
    argv = [sys.executable, "-m", "moeut_ds.train", "--resume", resume]
    if config:
        argv += ["--config", config]
    return argv + list(overrides)


def run_train(tmp: Path, world: int, *overrides: str, resume: str = "auto", timeout: float = 300,
              expect: int = 0, name: str = "logs") -> Ranks:
    with Ranks(train_argv(None, *overrides, resume=resume), world, tmp / name) as job:
        rcs = job.wait(timeout)
        assert all(rc == expect for rc in rcs), job.report(rcs, expect)
    return job


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    """A tiny MoEUT on the shared test data; extra: dotted key -> value."""
    base = {"run_dir": str(run_dir), "data.path": str(data), "data.context": 32, "model.preset": "moeut-tiny",
            "model.vocab_size": VOCAB, "model.d_model": 64, "model.d_head": 16, "model.ff_n_experts": 8,
            "model.ff_expert_size": 16, "model.ff_k": 2, "optim.lr": 3e-3, "optim.warmup_steps": 2,
            "train.steps": 10, "train.global_batch": 8, "train.micro_batch": 2, "eval.every": 0,
            "eval.max_windows": 16, "eval.batch": 8, "log.expert_stats_every": 5, "log.progress": False,
            "checkpoint.every": 0, "deepspeed_config": "ds_configs/zero2.json"}
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def seed_run_from(checkpoint: Path, run_dir: Path) -> None:
    """Start run_dir's checkpoints/ with a copy of one checkpoint (named by `latest`), so --resume auto picks it."""
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint, ckpts / checkpoint.name)
    (ckpts / "latest").write_text(checkpoint.name)


def read_jsonl(run_dir: Path) -> dict[int, dict]:
    """Step -> its row in the latest run: a start or resume event at step s supersedes the rows of steps >= s that
    an earlier run in the directory logged (a resumed run re-logs the steps after its checkpoint)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "event" in row:
            rows = {s: r for s, r in rows.items() if s < row["step"]}
            continue
        rows.setdefault(row["step"], {}).update(row)
    return rows


def prepared_data(base: Path) -> Path:
    """The session's dataset (two Austen novels, vocab 512), prepared once under a lock."""
    out = base / "english-512"
    lock = base / ".prepare.lock"
    base.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        if not (out / "metadata.json").is_file():
            subprocess.run([sys.executable, "-m", "data_prep.prepare", "--input",
                            str(REPO / "data/english/austen_emma.txt.gz"),
                            str(REPO / "data/english/austen_prideprejudice.txt.gz"),
                            "--out", str(out), "--vocab-size", str(VOCAB), "--val-fraction", "0.05", "--workers", "2"],
                           check=True, cwd=REPO, capture_output=True)
    return out


# ---- pytest fixtures shared by the trainer/export/evaluate tests (import them into a test module) ----
import pytest  # noqa: E402


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test run's shared folder (dataset, trained run). pytest-xdist gives each worker its own base temp under
    one parent; the workers share the parent's folder, so the locked builds above run once per test run."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trainer-shared"


def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test run's dataset, prepared once in shared_dir (also for the launcher and Slurm tests)."""
    return prepared_data(shared_dir(tmp_path_factory))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return shared_data(tmp_path_factory)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A finished 2-rank ZeRO-2 tiny-MoEUT run (validation, expert stats, checkpoint), built once per session."""
    base = shared_dir(tmp_path_factory)
    run = base / "run-zero2"
    done = base / "run-zero2.done"
    with open(base / ".run.lock", "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        if not done.exists():
            run_train(base, 2, *tiny_overrides(data_dir, run, **{"eval.every": 5, "checkpoint.every": 5,
                                                                  "log.peak_tflops": 1.0, "log.profile_step": 3}),
                      name="run-zero2-logs")
            done.write_text("ok")
    return run
