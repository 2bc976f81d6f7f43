"""Expert parallelism on the GPUs of one host: throughput per GPU, step time, memory, communication share.

    python bench/bench_expert_parallel.py --preset moeut-1b --micro 8                    # one GPU (baseline)
    torchrun --nproc_per_node 2 bench/bench_expert_parallel.py --preset moeut-1b --micro 8 --ep 1   # data parallel
    torchrun --nproc_per_node 2 bench/bench_expert_parallel.py --preset moeut-1b --micro 8 --ep 2   # expert parallel
    torchrun --nproc_per_node 2 bench/bench_expert_parallel.py --micro 8 --ep 2 --dispatch alltoall  # the other dispatch
    python bench/bench_expert_parallel.py --preset moeut-1b --micro 8 --sync-each-application   # prices the sync

A plain PyTorch step (bf16 autocast, fp32 weights, AdamW, Triton experts) around the project's expert-parallel
dispatch (moeut_ds/parallel): non-expert gradients are averaged with DDP, expert shards with
ExpertShards.all_reduce_gradients. Random token ids (the routing is then not a trained model's: the bytes moved are
close to the worst case of spread-out routing). The trainer adds DeepSpeed ZeRO on top (tested on CPU); this
isolates what expert parallelism itself costs. Prints one JSON line per run (rank 0), with every rank's forward /
backward / optimizer GPU time (CUDA events, no extra syncs) and the (token, expert) pairs its experts computed per
step: at each exchange the ranks of a group wait for the busiest. `--sync-each-application` adds, on any run, the
host sync that an expert-parallel dispatch makes once per σ-MoE application (to size its all-to-all buffers), to
price that sync on one GPU. `--trace DIR` profiles one
more step on every rank (torch.profiler: DIR/step<NNNNNN>_rank<r>.json/.txt) and prints bench/trace_gaps.py's summary
of each rank's trace (device busy vs idle, syncs, the longest idle gaps): where an expert-parallel step waits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def comm_share(step, steps: int = 1) -> dict[str, float]:
    """Fraction of GPU kernel time in NCCL all-to-all (SendRecv) and all-reduce kernels over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total = a2a = ar = 0.0
    for e in prof.key_averages():
        t = e.device_time_total
        total += t
        name = e.key.lower()
        if "nccl" in name and ("sendrecv" in name or "alltoall" in name):
            a2a += t
        elif "nccl" in name and "allreduce" in name:
            ar += t
    return {"alltoall_share": a2a / max(total, 1e-9), "allreduce_share": ar / max(total, 1e-9)}


def trace_step(step, out_dir: Path, n: int, rank: int, device: torch.device) -> None:
    """Profile one step on this rank and print the trace's busy/idle summary (GPU only: a CPU trace has no device
    timeline)."""
    from moeut_ds.train.profiling import profile_step

    with profile_step(out_dir, n, rank, device):
        step()
    if device.type == "cuda":
        from trace_gaps import format_summary, summarize

        stem = out_dir / f"step{n:06d}_rank{rank}"
        print(format_summary(stem.name, summarize(stem.with_suffix(".json"))), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="moeut-1b")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--dispatch", default="auto", help="expert dispatch: auto, allgather or alltoall")
    ap.add_argument("--micro", type=int, default=8, help="sequences per GPU per step")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="smoke-test the script on CPU (gloo, reference experts)")
    ap.add_argument("--trace", default=None, help="folder for a torch.profiler trace of one more step per rank")
    ap.add_argument("--sync-each-application", action="store_true",
                    help="a host sync before every σ-MoE application (what an ep > 1 dispatch makes once each)")
    a = ap.parse_args()

    from torch.nn.parallel import DistributedDataParallel

    from moeut_ds import LanguageModel, get_preset
    from moeut_ds.accounting import count_parameters
    from moeut_ds.parallel import CommStats, build_expert_parallel_groups, shard_experts
    from moeut_ds.parallel.expert_parallel import choose_dispatch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cpu") if a.cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not a.cpu:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("gloo" if a.cpu else "nccl")
    cfg = get_preset(a.preset)
    torch.manual_seed(0)
    with device:
        model = LanguageModel(cfg, expert_backend="reference" if a.cpu else "triton")
    shards = shard_experts(model, build_expert_parallel_groups(a.ep), a.dispatch) if a.ep > 1 else None
    sync = (lambda: None) if a.cpu else torch.cuda.synchronize
    if a.sync_each_application:
        backend = shards.model_backend if shards else model.expert_backend
        mlp = backend.mlp

        def synced_mlp(*args, **kwargs) -> torch.Tensor:
            sync()
            return mlp(*args, **kwargs)
        backend.mlp = synced_mlp
    params = list(model.parameters()) + (shards.parameters() if shards else [])
    n_local = sum(p.numel() for p in params)
    ddp = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(params, lr=1e-4, fused=not a.cpu)
    gen = torch.Generator(device=device).manual_seed(1 + rank)

    marks: list[list] = []          # per timed step: CUDA events at start, after forward, backward, optimizer

    def mark(events: Optional[list]) -> None:
        if events is not None and not a.cpu:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()

    def step(events: Optional[list] = None) -> torch.Tensor:
        mark(events)
        tokens = torch.randint(0, cfg.vocab_size, (a.micro, a.context + 1), device=device, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = ddp(tokens[:, :-1])
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + out.reg_loss
        mark(events)
        loss.backward()
        if shards:
            shards.all_reduce_gradients()
        mark(events)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark(events)
        return loss.detach()

    for _ in range(a.warmup):
        step()
    sync()
    if not a.cpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        marks.append([])
        t0 = time.perf_counter()
        step(marks[-1])
        sync()
        times.append(time.perf_counter() - t0)
    stats = (shards.model_backend.stats if shards else CommStats()).reset()
    bytes_per_step = stats["bytes_sent"] / (a.steps + a.warmup)
    phases = {name: round(statistics.median(ev[i].elapsed_time(ev[i + 1]) for ev in marks), 1)
              for i, name in enumerate(("forward_ms", "backward_ms", "optimizer_ms"))} if not a.cpu else {}
    mine = {**phases, "pairs_per_step": stats["pairs_received"] / (a.steps + a.warmup)}
    per_rank = [mine] * world
    if world > 1:
        dist.all_gather_object(per_rank, mine)
    share = comm_share(step) if world > 1 and not a.cpu else {}
    ms = statistics.median(times) * 1e3
    res = {"preset": a.preset, "gpus": world, "ep": a.ep, "dispatch": choose_dispatch(a.dispatch, a.ep) if a.ep > 1
           else None, "micro": a.micro, "context": a.context,
           "sync_each_application": a.sync_each_application,
           "params_total": count_parameters(cfg)["total"], "params_on_gpu": n_local, "step_ms": ms,
           "tokens_per_s_per_gpu": a.micro * a.context / ms * 1e3,
           "peak_gib": 0.0 if a.cpu else torch.cuda.max_memory_allocated() / 2 ** 30,
           "a2a_bytes_sent_per_step": bytes_per_step, **share, "per_rank": per_rank}
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)
    if a.trace:
        trace_step(step, Path(a.trace), a.warmup + a.steps + 2, rank, device)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
