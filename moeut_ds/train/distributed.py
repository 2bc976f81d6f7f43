"""The one place the process group is set up: from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

Launchers (torchrun, `deepspeed`, the Slurm scripts, the test harness) only have to export those variables.
A plain `python -m moeut_ds.train` with none of them set is a world of one. gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from moeut_ds.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env() -> None:
    """Must run before `import deepspeed`: DeepSpeed picks its accelerator at import time."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except KeyError:
        raise ConfigError(f"environment variable {name} is not set: launch with torchrun, the deepspeed launcher or "
                          f"launch/ scripts (they export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    except ValueError:
        raise ConfigError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and pick this rank's device."""
    prepare_env()
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE and "
                          f"LOCAL_RANK >= 0; check the launcher's process count and the exported variables")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(f"{name} is not set (RANK={rank}, WORLD_SIZE={world}): export the rendezvous address "
                               f"and port of rank 0")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local >= n:
            raise ConfigError(f"LOCAL_RANK={local} but only {n} GPU(s) are visible: start one process per GPU")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    import deepspeed

    if not torch.distributed.is_initialized():
        if world > 1 and rank == 0:
            print(f"[moeut_ds.train] waiting for {world} ranks at {os.environ['MASTER_ADDR']}:"
                  f"{os.environ['MASTER_PORT']} (timeout {timeout_s:.0f} s)", file=sys.stderr, flush=True)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s), rank=rank, world_size=world)
    return DistInfo(rank, world, local, device, backend)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce that is a no-op in a world of one."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        torch.distributed.all_reduce(t, op=red)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable obj in rank order (a list of one in a world of one)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def release_cpu_shm_buffer(rank: int) -> None:
    """Remove this rank's /dev/shm segment of DeepSpeed's CPU shared-memory all-reduce (~66 MB, named
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>): DeepSpeed never unlinks it, so every CPU
    run would leave one per rank behind until /dev/shm (RAM) is full. Call after a barrier: peers open each other's
    segments by name during DeepSpeed's start-up and map them while collectives run."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def release_cpu_shm_buffer_on_error(rank: int, timeout_s: float = 60.0) -> None:
    """The same on a rank that stops with an error: only once every peer has got this far (a peer still starting up
    may not have opened the segment yet and would wait for it forever). A peer that never arrives (it failed
    elsewhere, or is stuck in another collective) leaves the segment in place rather than a hang."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() != "gloo":
            return                          # the shared-memory all-reduce exists only for CPU (gloo) runs
        try:
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        except RuntimeError:
            return
    release_cpu_shm_buffer(rank)
