"""Trainer overhead on one GPU: a step of dense-244M and MoEUT-244M (64 x 1024 tokens, bf16 autocast; any preset
with a configs/<preset>_gpu.yaml) through the full trainer (DeepSpeed engine, data loader, logging) vs a plain
PyTorch loop of the same model and numerics (fp32 weights, bf16 autocast, torch AdamW, global-norm clipping, same
micro-batch and accumulation).

    python bench/bench_trainer.py --data DIR [--models dense-244m moeut-244m] [--steps 16] [--micro 16] [--out results.json]
        [--ds-configs ds_configs/zero2_bf16.json ds_configs/zero1_bf16.json ...] [--override KEY=VALUE ...]
        [--profile-step N] [--compile] [--cuda-graphs]

Each model runs the plain loop once and the trainer once per ds config (ZeRO stage and options matter on one GPU:
ZeRO-2 copies every gradient into its buckets even when there is nothing to reduce). The trainer logs every
`--log-every` steps; its step time is the median over those windows after the first. With
`--profile-step N` step N of the plain loop and of every trainer run is profiled (torch.profiler); the JSON gets
the rank-0 top-op tables and bench/trace_gaps.py's device-busy / idle / sync summary of both, which is what tells
GPU-side overhead (more device time) from host-side overhead (idle gaps). Pick N in the last window: the median
ignores one slow window. `--compile` compiles the plain loop's model and sets train.compile=true (without it both
run eager, whatever the config says); `--cuda-graphs` (with it) compiles in reduce-overhead mode (CUDA graphs; the
plain loop then accumulates into gradient buffers of its own and starts a graph generation per micro-batch, as
bench_step does) and sets train.cuda_graphs=true.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def plain_loop(preset: str, data: str, steps: int, micro: int, accum: int, context: int = 1024,
               compile_model: bool = False, graphs: bool = False, profile_step: int = 0,
               profile_dir: Optional[Path] = None) -> list[float]:
    """Per-step wall times of the plain loop; step `profile_step` (1-based, 0 = none) is profiled into profile_dir."""
    from moeut_ds import LanguageModel, get_preset
    from moeut_ds.data import WindowLoader, open_dataset
    from moeut_ds.train.profiling import profile_step as profiled

    from bench_utils import own_grad_buffers

    ds = open_dataset(data, "train")
    cfg = get_preset(preset).replace(vocab_size=ds.vocab_size)
    torch.manual_seed(0)
    model = LanguageModel(cfg).cuda().train()
    if compile_model:
        model.compile(mode="reduce-overhead" if graphs else None)
    if graphs:
        own_grad_buffers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                            foreach=None)
    loader = WindowLoader(ds, context, micro, seed=0)
    times = []
    for step in range(1, steps + 1):
        torch.cuda.synchronize()
        prof = (profiled(profile_dir, step, 0, torch.device("cuda")) if step == profile_step
                else contextlib.nullcontext())
        t0 = time.perf_counter()
        with prof:
            _plain_step(model, opt, loader, cfg.vocab_size, accum, graphs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del model, opt
    torch._dynamo.reset()       # compiled graphs hold the model's tensors; the trainer subprocess needs the memory
    torch.cuda.empty_cache()
    print(f"plain loop done: {torch.cuda.memory_reserved() / 2**30:.1f} GiB still reserved", flush=True)
    return times


def _plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loader, vocab_size: int, accum: int,
                graphs: bool) -> None:
    for _ in range(accum):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        b = next(loader).cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(b[:, :-1])
        loss = F.cross_entropy(out.logits.float().reshape(-1, vocab_size), b[:, 1:].reshape(-1)) + out.reg_loss
        (loss / accum).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    opt.step()
    opt.zero_grad(set_to_none=not graphs)
    loss.item()


def trainer_config(preset: str) -> Path:
    """The one-GPU run config of a preset (configs/moeut_126m_gpu.yaml for moeut-126m): the trainer run must train
    the plain loop's model."""
    path = REPO / "configs" / f"{preset.replace('-', '_')}_gpu.yaml"
    if not path.is_file():
        have = sorted(f.name[:-len("_gpu.yaml")].replace("_", "-") for f in (REPO / "configs").glob("*_gpu.yaml"))
        raise SystemExit(f"no run config {path.relative_to(REPO)} for preset {preset}; presets with one: {have}")
    return path


def trainer_run(config: Path, data: str, steps: int, micro: int, run_dir: Path, ds_config: str, log_every: int,
                extra: list[str]) -> tuple[list[float], dict]:
    """Step times of the log windows and the last logged row; config: the preset's run config (trainer_config)."""
    shutil.rmtree(run_dir, ignore_errors=True)      # the bench's own scratch run: start fresh every time
    over = [f"run_dir={run_dir}", f"data.path={data}", f"train.steps={steps}", f"train.micro_batch={micro}",
            f"deepspeed_config={ds_config}", "eval.every=0", "eval.at_end=false", "checkpoint.every=0",
            f"log.every={log_every}", "log.progress=false", "log.expert_stats_every=100000", *extra,
            "--resume", "none"]
    ds_vocab = json.loads((Path(data) / "metadata.json").read_text())["vocab_size"]
    over.append(f"model.vocab_size={ds_vocab}")
    cmd = [sys.executable, "-m", "moeut_ds.train", "--config", str(config)] + over
    subprocess.run(cmd, check=True, cwd=REPO)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_time_s" in r]
    return [r["perf/step_time_s"] for r in rows], rows[-1]


def profile_summary(profile_dir: Path, step: int) -> dict:
    """The rank-0 top-op table and trace_gaps summary of a profiled step."""
    from trace_gaps import format_summary, summarize

    stem = profile_dir / f"step{step:06d}_rank0"
    gaps = summarize(stem.with_suffix(".json"))
    print(format_summary(str(stem), gaps), flush=True)
    return {"table": stem.with_suffix(".txt").read_text(), "gaps": gaps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--models", nargs="+", default=["dense-244m", "moeut-244m"])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--out", default="bench_trainer.json")
    p.add_argument("--ds-configs", nargs="*", default=["ds_configs/zero1_bf16.json"],
                   help="trainer runs to compare (none: only the plain loop, e.g. to profile it)")
    p.add_argument("--log-every", type=int, default=4, help="trainer log window (steps)")
    p.add_argument("--override", nargs="*", default=[], help="extra run-config overrides for every trainer run")
    p.add_argument("--profile-step", type=int, default=0, help="profile this step of every run (0: none)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both the plain loop and trainer")
    p.add_argument("--cuda-graphs", action="store_true", help="with --compile: CUDA graphs in both")
    args = p.parse_args()
    if args.cuda_graphs and not args.compile:
        p.error("--cuda-graphs replays torch.compile's graphs: add --compile")
    # resolved before any GPU work, so that a preset without a run config stops the bench at once
    configs = {preset: trainer_config(preset) for preset in args.models} if args.ds_configs else {}
    accum = 64 // args.micro
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps,
               "micro_batch": args.micro, "accumulation": accum, "compile": args.compile,
               "cuda_graphs": args.cuda_graphs,
               "date": time.strftime("%Y-%m-%d")}
    try:
        import deepspeed
        results["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    extra = list(args.override) + [f"train.compile={str(args.compile).lower()}"] + \
        (["train.cuda_graphs=true"] if args.cuda_graphs else []) + \
        ([f"log.profile_step={args.profile_step}"] if args.profile_step else [])
    for preset in args.models:
        plain_dir = Path(f"/tmp/bench_{preset}_plain")
        shutil.rmtree(plain_dir, ignore_errors=True)
        plain = plain_loop(preset, args.data, args.steps, args.micro, accum, compile_model=args.compile,
                           graphs=args.cuda_graphs, profile_step=args.profile_step, profile_dir=plain_dir / "profile")
        timed = [t for i, t in enumerate(plain[3:], start=4) if i != args.profile_step]
        pm = statistics.median(timed)
        results[preset] = {"plain_ms": pm * 1e3, "plain_all_ms": [round(t * 1e3, 1) for t in plain]}
        print(json.dumps({preset: {"plain_ms": round(pm * 1e3, 1)}}), flush=True)
        if args.profile_step:
            results[preset]["plain_profile"] = profile_summary(plain_dir / "profile", args.profile_step)
        Path(args.out).write_text(json.dumps(results, indent=1))
        for ds_config in args.ds_configs:
            tag = Path(ds_config).stem
            run_dir = Path(f"/tmp/bench_{preset}_{tag}")
            windows, last = trainer_run(configs[preset], args.data, args.steps, args.micro, run_dir, ds_config,
                                        args.log_every, extra)
            tm = statistics.median(windows[1:])
            results[preset][tag] = {"trainer_ms": tm * 1e3, "overhead": tm / pm - 1,
                                    "trainer_tokens_per_s": 65536 / tm, "trainer_mfu": last.get("perf/mfu"),
                                    "trainer_gpu_peak_gib": last.get("mem/gpu_peak_gib"),
                                    "trainer_windows_ms": [round(t * 1e3, 1) for t in windows]}
            print(json.dumps({preset: {"plain_ms": round(pm * 1e3, 1), tag: results[preset][tag]}}), flush=True)
            if args.profile_step:
                results[preset][f"{tag}_profile"] = profile_summary(run_dir / "profile", args.profile_step)
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
