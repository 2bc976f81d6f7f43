"""Full training step on one GPU: MoEUT (triton expert backend) vs the dense baseline, eager and torch.compile.

    PYTHONPATH=.:kernels python bench/bench_step.py [--sizes 244m,1b] [--budget-s 300] [--out DIR]
        [--no-compile | --no-eager] [--micro 32] [--compile-mode reduce-overhead] [--trace] [--no-gluon]

One step = forward + backward of cross-entropy (+ the entropy regulariser, training mode) over 64 x 1024 tokens
under bf16 autocast with fp32 master weights, then a fused AdamW step and zero_grad. Plain PyTorch, no DeepSpeed.
If 64 sequences do not fit in memory, the step runs as 2 or 4 micro-batches with gradient accumulation (the table
says which); --micro 16 asks for 16 x 4, the micro-batch of a 4-GPU run at the paper's global batch, where MoEUT is
host-bound (docs/PERFORMANCE.md, twenty-first session). Per variant: median ms/step over the timed steps (CUDA
events, after warm-up; compile time reported separately), tokens/s, steady-state peak memory
(torch.cuda.max_memory_allocated), host syncs in one steady step (torch.cuda.set_sync_debug_mode). Also: a quick
correctness check (triton vs reference backend forward loss; eager vs compiled loss and gradient norm), and a
torch.profiler breakdown of one eager MoEUT step (kernel time by category and top kernels; with --profile-compiled
also of each compiled step, and with --trace its Chrome trace for bench/trace_gaps.py, trace_*.json).
--compile-mode passes torch.compile's mode (reduce-overhead: CUDA graphs, a graph generation per micro-batch,
gradients accumulated in buffers allocated once).
Variants run in order of importance and stop when --budget-s is spent.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moeut_ds import LanguageModel, get_preset  # noqa: E402
from moeut_kernels import grouped  # noqa: E402

from bench_utils import count_syncs, device_kernels, own_grad_buffers, time_by_category  # noqa: E402

BATCH, SEQ = 64, 1024
DEV = "cuda"
T0 = time.time()
COMPILE_MODE: Optional[str] = None     # torch.compile's mode (--compile-mode)
TRACE_DIR: Optional[Path] = None        # where profiled steps write their Chrome traces (--trace)
torch._dynamo.config.automatic_dynamic_shapes = False   # static shapes: every variant compiles for its own shapes


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def make_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (never zeros): inputs [B, T] and next-token targets [B, T]."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ + 1), device=DEV, generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def lm_loss(model: Callable, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    out = model(inp)
    return F.cross_entropy(out.logits.flatten(0, 1).float(), tgt.flatten()) + out.reg_loss


class Trainer:
    """model (fp32 weights) + fused AdamW; step() = accumulate over micro-batches under bf16 autocast, then update."""

    def __init__(self, preset: str, backend: str, compile_model: bool, micro: int):
        torch.manual_seed(0)
        self.model = LanguageModel(get_preset(preset), expert_backend=backend).to(DEV).train()
        self.fn: Callable = torch.compile(self.model, mode=COMPILE_MODE) if compile_model else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.micro = micro
        self.inp, self.tgt = make_batch(self.model.cfg.vocab_size)
        self.graphs = compile_model and COMPILE_MODE == "reduce-overhead"
        if self.graphs:
            own_grad_buffers(self.model)

    def step(self, record: Optional[dict] = None) -> None:
        """One optimizer step; with `record`, also store the loss and the gradient norm (host syncs: first step)."""
        n = BATCH // self.micro
        total = 0.0
        for i in range(n):
            if self.graphs:     # a new CUDA-graph generation per micro-batch: the last one's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            sl = slice(i * self.micro, (i + 1) * self.micro)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = lm_loss(self.fn, self.inp[sl], self.tgt[sl])
            (loss / n).backward()
            if record is not None:
                total += loss.item() / n
        if record is not None:
            grads = [p.grad.float().norm() for p in self.model.parameters() if p.grad is not None]
            record.update(loss=total, grad_norm=torch.linalg.vector_norm(torch.stack(grads)).item())
        self.opt.step()
        self.opt.zero_grad(set_to_none=not self.graphs)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def bench(preset: str, backend: str, compile_model: bool, micro: int, warmup: int, steps: int,
          profile_top: int = 0) -> dict:
    """Time one variant (with `profile_top` > 0, also its kernel_table listing that many kernels); raises
    torch.OutOfMemoryError if the micro-batch does not fit."""
    torch._dynamo.reset()               # no graphs (or automatic dynamic shapes) carried over from another model
    tr = Trainer(preset, backend, compile_model, micro)
    first: dict = {}
    try:
        t = time.time()
        tr.step(first)                  # compile (if any), optimizer state allocation; loss and grad norm
        torch.cuda.synchronize()
        first_s = time.time() - t
        for _ in range(warmup - 1):
            tr.step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            tr.step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        syncs = count_syncs(tr.step, warm=False)
        med = statistics.median(times)
        mode = ("compiled" + (f" {COMPILE_MODE}" if COMPILE_MODE else "")) if compile_model else "eager"
        title = f"one {mode} {preset} step (micro-batch {micro})"
        table = kernel_table(tr, title, profile_top) if profile_top else None
        return dict(profile=table, preset=preset, backend=backend, mode=mode, micro=micro,
                    ms=med, ms_min=min(times), ms_max=max(times), tok_s=BATCH * SEQ / med * 1e3, peak_gib=peak,
                    syncs=syncs, first_step_s=first_s, first_loss=first["loss"], first_grad_norm=first["grad_norm"],
                    params_m=sum(p.numel() for p in tr.model.parameters()) / 1e6)
    finally:
        del tr
        free()


def bench_fit(preset: str, backend: str, compile_model: bool, micros: list[int], warmup: int, steps: int,
              profile_top: int = 0) -> Optional[dict]:
    """bench() at the largest micro-batch that fits."""
    for micro in micros:
        try:
            r = bench(preset, backend, compile_model, micro, warmup, steps, profile_top)
            log(f"{preset} {r['mode']}: micro {micro}, {r['ms']:.1f} ms/step ({r['ms_min']:.1f}-{r['ms_max']:.1f}), "
                f"{r['tok_s']:,.0f} tok/s, peak {r['peak_gib']:.1f} GiB, syncs {r['syncs']}, "
                f"first step {r['first_step_s']:.1f} s")
            return r
        except torch.OutOfMemoryError:
            log(f"{preset} {'compiled' if compile_model else 'eager'}: OOM at micro-batch {micro}")
            free()
    return None


def check(preset: str) -> dict:
    """Forward loss with the triton vs the reference backend on the same weights (4 sequences, bf16 autocast).
    Eager vs compiled agreement is checked in the table's runs: same init, same batch, first-step loss/grad norm."""
    torch.manual_seed(0)
    model = LanguageModel(get_preset(preset), expert_backend="triton").to(DEV).train()
    inp, tgt = make_batch(model.cfg.vocab_size, seed=1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        lt = lm_loss(model, inp[:4], tgt[:4]).item()
        model.set_expert_backend("reference")
        lr = lm_loss(model, inp[:4], tgt[:4]).item()
    del model
    free()
    return dict(loss_triton=lt, loss_reference=lr)


def kernel_table(tr: "Trainer", title: str, top: int = 15) -> str:
    """Kernel time of one steady step of a warmed-up Trainer, by category and top kernels (self CUDA time), and
    the step's wall time (the difference is GPU idle time or host overhead)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.time()
        tr.step()
        torch.cuda.synchronize()
        wall = (time.time() - t) * 1e3
    if TRACE_DIR is not None:
        TRACE_DIR.mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in title)
        prof.export_chrome_trace(str(TRACE_DIR / f"trace_{name}.json"))
    events = device_kernels(prof)
    total = max(sum(e.self_device_time_total for e in events), 1e-9)
    by_cat = time_by_category(events)
    lines = [f"{title}: kernel time {total / 1e3:.1f} ms, wall {wall:.1f} ms (profiled, self CUDA time)",
             "| category | ms | % |", "|---|---|---|"]
    lines += [f"| {lab} | {v / 1e3:.2f} | {100 * v / total:.1f} |" for lab, v in by_cat.items() if v]
    lines += ["", "| kernel | calls | ms | % |", "|---|---|---|---|"]
    for e in events[:top]:
        lines.append(f"| {e.key[:90]} | {e.count} | {e.self_device_time_total / 1e3:.2f} | "
                     f"{100 * e.self_device_time_total / total:.1f} |")
    return "\n".join(lines)


def profile_step(preset: str, micro: int) -> str:
    """kernel_table of one steady eager MoEUT step."""
    tr = Trainer(preset, "triton", False, micro)
    for _ in range(2):
        tr.step()
    table = kernel_table(tr, f"one eager {preset} step")
    del tr
    free()
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="244m,1b")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new variant after this many seconds")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-eager", action="store_true", help="only the compiled variants (and no eager profile)")
    ap.add_argument("--micro", type=int, default=BATCH,
                    help="largest micro-batch to try first (e.g. 32 where 64 is known not to fit: saves a compile)")
    ap.add_argument("--out", default=None, help="folder for bench_step.json and profile.md")
    ap.add_argument("--profile-compiled", action="store_true",
                    help="also profile one step of each compiled variant (kernel time by category) into profile.md")
    ap.add_argument("--profile-top", type=int, default=15, help="kernels listed in each profile table")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--trace", action="store_true", help="write each profiled step's Chrome trace into --out")
    ap.add_argument("--no-gluon", action="store_true",
                    help="expert calls on gmm_kernel only (configs as chosen without the Gluon kernel), for A/B runs")
    args = ap.parse_args()
    if args.trace and not args.out:
        ap.error("--trace writes each profiled step's Chrome trace into --out: give --out")
    global COMPILE_MODE, TRACE_DIR
    COMPILE_MODE = args.compile_mode
    out = Path(args.out) if args.out else None
    TRACE_DIR = out if args.trace else None
    import triton
    if args.no_gluon:
        grouped.OVERRIDES["gluon"] = False
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), tokens=BATCH * SEQ, gluon=not args.no_gluon)
    log(str(info))
    results: dict = dict(info=info, rows=[])

    def save() -> None:
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench_step.json").write_text(json.dumps(results, indent=1))

    def add_profile(table: str) -> None:
        print(table, flush=True)
        results.setdefault("profiles", []).append(table)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "profile.md").write_text("\n\n".join(results["profiles"]) + "\n")

    sizes = args.sizes.split(",")
    results["check"] = check(f"moeut-{sizes[0]}")
    log(f"check: {results['check']}")
    save()
    micros = [m for m in (BATCH, BATCH // 2, BATCH // 4) if m <= args.micro]
    plan = []
    for size in sizes:
        if not args.no_eager:
            plan += [(f"moeut-{size}", "triton", False), (f"dense-{size}", "reference", False)]
            if size == sizes[0]:
                plan.append(("profile", None, None))
        if not args.no_compile:
            plan += [(f"moeut-{size}", "triton", True), (f"dense-{size}", "reference", True)]
    fitted: dict[str, int] = {}
    for preset, backend, comp in plan:
        if time.time() - T0 > args.budget_s:
            log(f"budget spent: skipping {preset} {'compiled' if comp else 'eager'}")
            results.setdefault("skipped", []).append(f"{preset} {'compiled' if comp else 'eager'}")
            continue
        if preset == "profile":
            p = f"moeut-{sizes[0]}"
            add_profile(profile_step(p, fitted.get(p, BATCH)))
            continue
        start = micros.index(fitted[preset]) if preset in fitted else 0
        try:
            r = bench_fit(preset, backend, comp, micros[start:], args.warmup, args.steps,
                          profile_top=args.profile_top if comp and args.profile_compiled else 0)
        except Exception as e:  # a variant that fails (e.g. compile) is reported, the rest still run
            log(f"{preset} {'compiled' if comp else 'eager'} failed: {type(e).__name__}: {str(e)[:800]}")
            results.setdefault("failed", []).append(f"{preset} compiled={comp}: {type(e).__name__}: {str(e)[:800]}")
            free()
            continue
        if r:
            fitted.setdefault(preset, r["micro"])
            table = r.pop("profile")
            if table:
                add_profile(table)
            results["rows"].append(r)
        save()

    rows = results["rows"]
    print("\n| model | mode | micro-batch x accum | ms/step (min-max) | tokens/s | peak GiB | host syncs "
          "| first step s | first loss / grad norm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} ({r['params_m']:.0f}M) | {r['mode']} | {r['micro']} x {BATCH // r['micro']} | "
              f"{r['ms']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {r['tok_s']:,.0f} | {r['peak_gib']:.1f} | "
              f"{r['syncs']} | {r['first_step_s']:.1f} | {r['first_loss']:.4f} / {r['first_grad_norm']:.4f} |")
    by = {(r["preset"], r["mode"]): r["ms"] for r in rows}
    ratios = {}
    for size in sizes:
        for mm, dm in (("eager", "eager"), ("compiled", "compiled"), ("eager", "compiled")):
            m, d = by.get((f"moeut-{size}", mm)), by.get((f"dense-{size}", dm))
            if m and d:
                ratios[f"{size} moeut {mm} / dense {dm}"] = m / d
                print(f"MoEUT-{size} {mm} / dense-{size} {dm}: {m / d:.2f}x")
    results["ratios"] = ratios
    save()


if __name__ == "__main__":
    main()
