"""One optimizer step under torch.profiler: where a step's time goes (host vs device, which kernels), per rank."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def profile_step(out_dir: Path, step: int, rank: int, device: torch.device) -> Iterator[None]:
    """Profile the enclosed code (CPU ops, and CUDA kernels on a GPU); write `step<NNNNNN>_rank<r>.json` (the step
    zero-padded to six digits; Chrome trace: chrome://tracing or ui.perfetto.dev) and `step<NNNNNN>_rank<r>.txt` (the
    40 most expensive ops by self time on the device, or on the CPU without a GPU) into out_dir."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        yield
        if cuda:
            torch.cuda.synchronize(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"step{step:06d}_rank{rank}"
    prof.export_chrome_trace(str(stem.with_suffix(".json")))
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=40)
    stem.with_suffix(".txt").write_text(table)
