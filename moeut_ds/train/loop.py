"""The training loop: DeepSpeed engine, micro-batches, logging, validation, checkpoints, preemption.

One optimizer step = `accumulation` micro-batches per rank; DeepSpeed scales each micro-batch loss by
1/accumulation, reduces gradients over the data-parallel ranks, clips the global norm and steps AdamW. One
all-reduce per step carries the loss, the regulariser, the stop/bad flags and whether a background save is still
writing to every rank, so all ranks take the same decisions (stop, skip, save, commit a save) at the same step.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
import yaml

from moeut_ds.accounting import forward_macs_per_token
from moeut_ds.config import ConfigError
from moeut_ds.experts import get_backend
from moeut_ds.train import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE
from moeut_ds.train import checkpoint as ckpt
from moeut_ds.parallel.expert_checkpoint import has_expert_shards
from moeut_ds.train.config import RunConfig
from moeut_ds.train.experts import ExpertTraining
from moeut_ds.train.distributed import (DistInfo, all_reduce_, barrier, init_distributed, release_cpu_shm_buffer,
                                        release_cpu_shm_buffer_on_error)
from moeut_ds.train.metrics import ExpertUsage, MetricsWriter, detect_peak_tflops
from moeut_ds.train.profiling import profile_step
from moeut_ds.train.schedule import apply_recipe, make_scheduler

# Keys the run config owns; a ds config that sets them would be silently ignored or contradict the recipe.
OWNED_DS_KEYS = {"train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.micro_batch",
                 "gradient_accumulation_steps": "train.global_batch / micro_batch", "gradient_clipping":
                 "optim.grad_clip", "optimizer": "optim.*", "scheduler": "optim.warmup_steps / min_lr_ratio"}


class Diverged(RuntimeError):
    """Too many non-finite steps in a row."""


def build_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The ds config file plus what the run config owns (batch sizes, clipping, AdamW)."""
    path = cfg.deepspeed_config_path()
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config {path}: not valid JSON ({e})") from None
    _merge(ds, cfg.deepspeed_overrides)
    for key, owner in OWNED_DS_KEYS.items():
        if key in ds:
            raise ConfigError(f"deepspeed_config {path} sets {key!r}, which the run config owns ({owner}): remove it "
                              f"from the JSON and set {owner} in the run config")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed_config {path}: zero_optimization.stage={stage!r}: use 0, 1, 2 or 3 "
                          f"(ds_configs/zero*.json)")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"deepspeed_config {path} enables fp16: MoEUT trains in bf16 (torch_autocast) or fp32; use "
                          f"ds_configs/*_bf16.json")
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    ds["gradient_accumulation_steps"] = cfg.accumulation(world_size)
    ds["train_batch_size"] = cfg.train.global_batch
    ds["gradient_clipping"] = cfg.optim.grad_clip
    # torch_adam: torch.optim.AdamW (no JIT-built FusedAdam); weight decay on all parameters, as the paper
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas),
                                                   "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay,
                                                   "torch_adam": True}}
    # DeepSpeed's throughput timer synchronises the device twice per micro-batch (in a forward pre-hook and in
    # engine.step), which stops the host from queueing ahead, and a CUDA graph cannot capture the first (compiled,
    # it is traced into the graph; docs/CUDA_GRAPHS.md). The trainer logs its own perf/tokens_per_s.
    ds["timers"] = {**ds.get("timers", {}), "throughput": {"enabled": False}}
    if cfg.train.cuda_graphs:
        zero = ds.get("zero_optimization", {})
        if zero.get("stage", 0) == 2 and not zero.get("contiguous_gradients", True):
            raise ConfigError(f"deepspeed_config {path}: train.cuda_graphs=true at ZeRO-2 needs contiguous_gradients "
                              f"(without it DeepSpeed keeps the graphs' gradient outputs across micro-batches, and "
                              f"the next replay overwrites them): set it to true or train.cuda_graphs=false")
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32 (logits may be bf16 under autocast)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loader batch onto the device without waiting for it: a copy from pageable host memory may synchronise
    with the stream (CUDA's API notes), one from pinned memory is queued like a kernel."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def validation_loss(model, batches, device: torch.device) -> tuple[float, int]:
    """Mean token cross-entropy over this rank's batches, all-reduced over ranks; returns (loss, tokens)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = list(batches) if not isinstance(batches, list) else batches
    # Ranks may hold one batch more than others; under ZeRO-3 every forward is collective, so all ranks run the same
    # number of forwards and the extra ones (on a throw-away batch) are not counted.
    n = torch.tensor([len(batches)], device=device)
    all_reduce_(n, op="max")
    for i in range(int(n.item())):
        batch = (batches[i] if i < len(batches) else None)
        dummy = batch is None
        if dummy:
            batch = batches[0] if batches else torch.zeros(1, 2, dtype=torch.long)
        batch = to_device(batch, device)
        # Under train.cuda_graphs each batch starts a graph generation (the last batch's loss is already queued
        # above); without it torch records one more graph per batch. Anywhere else this is a no-op.
        torch.compiler.cudagraph_mark_step_begin()
        out = model(batch[:, :-1])
        if not dummy:
            total[0] += cross_entropy(out.logits, batch[:, 1:], reduction="sum").double()
            total[1] += batch[:, 1:].numel()
    all_reduce_(total)
    return float(total[0] / total[1].clamp_min(1)), int(total[1])


def compile_without_graph_cache(model: torch.nn.Module, mode: Optional[str] = None) -> None:
    """model.compile() in place (parameter names and checkpoints stay those of the eager model), with Inductor's
    on-disk FX-graph and AOTAutograd caches off for this process. Their keys miss things the cached code assumes:
    on an H200 a graph that a plain torch.compile of dense-244M had cached crashed this trainer's first forward
    (CUBLAS_STATUS_INTERNAL_ERROR), and one cached by an older checkout called a custom op with its old schema
    (docs/KERNELS.md, "A stale compile cache"). Every start compiles afresh (~1 min at 244M); Triton's kernel
    cache, keyed by the kernel source, stays on. mode: torch.compile's (reduce-overhead: CUDA graphs)."""
    import torch._functorch.config
    import torch._inductor.config
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    model.compile(mode=mode)


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop finishes the current step, saves and exits PREEMPTED_EXIT_CODE."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum


class Trainer:
    """Composes model, data, engine, metrics and checkpoints. `run()` returns the process exit status."""

    def __init__(self, cfg: RunConfig, resume: str = "auto"):
        self.cfg = cfg
        self.resume = resume
        self.dist: DistInfo = init_distributed()
        self.stop = StopFlag()          # after the rendezvous: until then SIGTERM ends a rank that waits for peers
        self.rank0 = self.dist.rank == 0

    def log(self, msg: str) -> None:
        if self.rank0:
            print(f"[moeut_ds.train] {msg}", file=sys.stderr, flush=True)

    def setup(self) -> None:
        import deepspeed

        from moeut_ds.data import WindowLoader, open_dataset
        from moeut_ds.model import LanguageModel

        cfg, d = self.cfg, self.dist
        self.mcfg = cfg.model_config()
        self.accum = cfg.accumulation(d.world_size)
        ds_config = build_ds_config(cfg, d.world_size)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.log("resolved run config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.log(f"world size {d.world_size} ({d.backend}, {d.device.type}), accumulation {self.accum}, ZeRO stage "
                 f"{self.zero_stage}, ds config {cfg.deepspeed_config_path()}")

        self.train_ds = open_dataset(cfg.data.path, "train")
        self.train_ds.check_vocab(self.mcfg.vocab_size)
        self.tokenizer_sha256 = self.train_ds.meta["tokenizer"]["sha256"]
        self.val_ds = open_dataset(cfg.data.path, cfg.data.val_split) if (cfg.eval.every or cfg.eval.at_end) else None
        if self.val_ds is not None:     # now, not at the first validation: that runs before the save of its step
            self.val_ds.require_windows(cfg.data.context)
        self.loader = WindowLoader(self.train_ds, cfg.data.context, cfg.train.micro_batch, d.rank, d.world_size,
                                   seed=cfg.seed, shuffle=cfg.data.shuffle)

        torch.manual_seed(cfg.seed)                  # identical initial weights on every rank (ZeRO-3 needs it)
        # Built where it trains: on a GPU the init takes seconds even at 8B, and no rank holds an fp32 copy in host
        # RAM (CPU init runs at ~80 M parameters/s on 2 cores: ~100 s and 32 GB of RAM per rank for MoEUT-8B).
        backend = get_backend(cfg.expert_backend)
        if backend.name == "triton" and not backend.runs_on(d.device):
            raise ConfigError("expert_backend=triton needs a CUDA GPU (this run has none): use expert_backend=auto "
                              "or reference")
        if cfg.expert_combine != "buffer":
            if backend.name != "triton":
                raise ConfigError(f"expert_combine={cfg.expert_combine} needs the triton expert backend, and "
                                  f"expert_backend={cfg.expert_backend} gave {backend.name} (no CUDA GPU?): set "
                                  f"expert_combine=buffer")
            backend.combine = cfg.expert_combine
        with d.device:
            model = LanguageModel(self.mcfg, expert_backend=backend)
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.log(f"model: {self.mcfg.arch}, {model.num_parameters():,} parameters, expert backend "
                 f"{type(model.expert_backend).__name__}"
                 + (f" (combine={model.expert_backend.combine})" if model.expert_backend.name == "triton" else "")
                 + (", activation checkpointing" if cfg.train.activation_checkpointing else ""))
        self.ckpt_dir = cfg.checkpoint_dir()
        for key, where in (("run_dir", Path(cfg.run_dir)), ("checkpoint.dir", self.ckpt_dir)):
            if where.exists() and not where.is_dir():    # else the first save would fail, after the steps before it
                raise ConfigError(f"{key}={str(where)!r} is a file, not a directory: point {key} at a directory")
        start = ckpt.resolve_resume(self.resume, self.ckpt_dir)
        # Expert shards are owned outside DeepSpeed when ep > 1, and also at ep = 1 when resuming such a run.
        sharded = cfg.expert_parallel_size > 1 or (start is not None and has_expert_shards(start))
        self.experts = ExpertTraining.create(model, cfg.expert_parallel_size, self.zero_stage, cfg) if sharded else None
        if self.experts:
            self.log(f"expert parallelism: {cfg.expert_parallel_size} ranks per expert group, "
                     f"{self.experts.shards.model_backend.dispatch} dispatch, "
                     f"{sum(p.numel() for p in self.experts.shards.parameters()):,} expert parameters on this rank")
        saved = ckpt.read_state(start) if start is not None else None
        if saved is not None:
            ckpt.check_compatible(saved, self.mcfg.to_dict(), d.world_size, self.zero_stage, start,
                                  experts_sharded=sharded, tokenizer_sha256=self.tokenizer_sha256)
            ckpt.verify_files(start, saved, d.rank, d.world_size)
            ckpt.check_no_newer(start, self.ckpt_dir)
        # Another number of ranks: read DeepSpeed's state through its universal checkpoint format (ZeRO-1/2).
        self.universal = saved is not None and saved["world_size"] != d.world_size
        if self.universal:
            ckpt.universal_checkpoint(start, d.rank)
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        if cfg.train.compile:
            if self.zero_stage == 3:
                raise ConfigError("train.compile=true works with ZeRO stages 0-2 (ZeRO-3's parameter hooks break "
                                  "the graph): set train.compile=false or use ds_configs/zero1*/zero2*.json")
            if self.experts:
                if self.experts.shards.model_backend.dispatch != "allgather":
                    raise ConfigError("train.compile=true with expert parallelism needs expert_dispatch=allgather "
                                      "(the all-to-all's split sizes are a host sync that breaks the graph): set "
                                      "expert_dispatch=allgather or train.compile=false")
                if cfg.train.cuda_graphs:
                    raise ConfigError("train.cuda_graphs=true is not supported with expert parallelism (its "
                                      "collectives inside CUDA graphs are untested): set train.cuda_graphs=false")
            if self.mcfg.arch != "dense" and model.expert_backend.name == "reference":
                raise ConfigError("train.compile=true needs the triton expert backend (expert_backend=triton or auto "
                                  "on a GPU): the reference backend's data-dependent shapes break the graph, and "
                                  "torch's CPU Inductor crashes on the pieces; set train.compile=false")
            compile_without_graph_cache(model, "reduce-overhead" if cfg.train.cuda_graphs else None)
            if cfg.train.cuda_graphs:
                self.log("CUDA graphs on (docs/CUDA_GRAPHS.md)"
                         + ("" if d.device.type == "cuda" else "; torch skips them on this device"))
        opt = cfg.optim
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config,
            lr_scheduler=lambda o: make_scheduler(o, opt.warmup_steps, cfg.train.steps, opt.min_lr_ratio))
        torch.manual_seed(cfg.seed + 1 + d.rank)     # dropout streams differ per rank
        self.device = self.engine.device if hasattr(self.engine, "device") else d.device
        if self.experts:
            self.experts.attach(self.engine)
        self.saver = ckpt.Saver(self.engine, self.ckpt_dir, d.rank, cfg.checkpoint.keep_last,
                                cfg.checkpoint.keep_every, background=cfg.checkpoint.async_save,
                                extra=self.experts.save if self.experts else None)

        self.step = 0
        self.counters = {"samples": 0, "tokens": 0, "fwd_macs": 0.0, "bad_in_row": 0, "skipped": 0}
        if start is not None:
            state = ckpt.load(self.engine, start, d.rank, universal=self.universal)
            if self.experts:
                self.experts.load(start, state["step"])
            self.loader.load_state_dict(state["loader"])
            self.step = state["step"]
            self.counters.update(state["counters"])
            self.log(f"resumed from {start} at step {self.step}")
            self._apply_recipe(state["run_config"])
        elif self.resume == "auto":
            self.log(f"no checkpoint in {self.ckpt_dir}: starting from scratch")

        self.fwd_macs_per_token = forward_macs_per_token(self.mcfg, cfg.data.context)
        self.tokens_per_step = cfg.train.global_batch * cfg.data.context
        self.peak = cfg.log.peak_tflops or detect_peak_tflops(self.device)
        self.usage = ExpertUsage(self.mcfg, self.device)
        self.want_usage = self.usage.active and cfg.log.expert_stats_every > 0
        run_dir = Path(cfg.run_dir)
        self.metrics = MetricsWriter(run_dir, self.rank0, first_step=self.step + 1)
        if self.rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.metrics.text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "\n```")

    def _apply_recipe(self, saved_run: dict) -> None:
        """The configured optimizer and schedule win over the checkpoint's (log what changed)."""
        now = self.cfg.to_dict()
        keys = [("optim", k) for k in ("lr", "betas", "eps", "weight_decay", "warmup_steps", "min_lr_ratio",
                                       "grad_clip")] + [("train", "steps"), ("train", "global_batch")]
        changed = [f"{sec}.{k} {saved_run[sec][k]} -> {now[sec][k]}" for sec, k in keys
                   if saved_run[sec][k] != now[sec][k]]
        if changed:
            self.log(f"changed since the checkpoint: {', '.join(changed)}; the schedule continues at step "
                     f"{self.step} with the new values")
        o = self.cfg.optim
        for scheduler in [self.scheduler] + ([self.experts.scheduler] if self.experts else []):
            apply_recipe(scheduler, o.lr, o.betas, o.eps, o.weight_decay)

    # ---- one optimizer step ----

    def train_step(self) -> tuple[float, float, bool, bool, bool]:
        """Returns (loss, reg, non-finite?, stop requested?, a background save still writing?), identical on every
        rank."""
        engine, cfg = self.engine, self.cfg
        engine.train()
        ce_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        reg_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.stage0_norm = None
        for micro in range(self.accum):
            if cfg.train.cuda_graphs:
                self._new_graph_generation(micro)
            batch = to_device(next(self.loader), self.device)
            out = engine(batch[:, :-1], return_expert_counts=self.want_usage)
            ce = cross_entropy(out.logits, batch[:, 1:])
            loss = ce + out.reg_loss
            if self.step + 1 in cfg.debug.nan_steps:
                loss = loss * float("nan")
            engine.backward(loss)
            if self.zero_stage == 0 and micro == self.accum - 1:
                self.stage0_norm = self._stage0_grad_norm()
            last = micro == self.accum - 1
            if self.experts and last:
                self.experts.before_step()
                skipped = engine.skipped_steps
            engine.step()
            if self.experts and last:
                self.experts.after_step(engine.get_global_grad_norm(), applied=engine.skipped_steps == skipped)
            ce_sum += ce.detach() if (self.step + 1) not in cfg.debug.nan_steps else float("nan")
            reg_sum += out.reg_loss.detach().float()
            if self.want_usage:
                self.usage.update(out.expert_counts)
        flags = torch.stack([ce_sum / self.accum, reg_sum / self.accum,
                             (~torch.isfinite(ce_sum)).float(),
                             torch.tensor(float(self.stop.signum is not None), device=self.device),
                             torch.tensor(float(self.saver.writing()), device=self.device)])
        flags = torch.where(torch.isfinite(flags), flags, torch.full_like(flags, float("inf")))
        all_reduce_(flags)
        world = self.dist.world_size
        loss, reg = float(flags[0]) / world, float(flags[1]) / world
        bad = flags[2].item() > 0 or not math.isfinite(loss)
        return loss, reg, bad, flags[3].item() > 0, flags[4].item() > 0

    def _new_graph_generation(self, micro: int) -> None:
        """Before each micro-batch under CUDA graphs: a new graph generation (the graphs may now overwrite the last
        micro-batch's outputs), and before the first, at ZeRO-0/1, zeroed gradients of our own. At those stages
        DeepSpeed leaves the gradients in param.grad until the last micro-batch, and autograd would adopt the
        backward graph's static output as param.grad, which the next replay overwrites. ZeRO-2 copies each
        gradient out within its own backward, and sets param.grad to None after it (docs/CUDA_GRAPHS.md)."""
        torch.compiler.cudagraph_mark_step_begin()
        if micro == 0 and self.zero_stage < 2:
            for p in self.engine.module.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)    # fresh each step: at ZeRO-1 DeepSpeed rebinds .grad.data

    def _stage0_grad_norm(self) -> float:
        """ZeRO-0 neither reports nor checks the norm: compute it before the update, refuse a non-finite one."""
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        if not math.isfinite(norm):
            raise Diverged(f"step {self.step + 1}: non-finite gradient norm under ZeRO stage 0, which cannot skip a "
                           f"step; stopped before the update (weights intact). Use a ds config with ZeRO >= 1 to "
                           f"skip such steps, or resume from the last checkpoint with a lower lr")
        return norm

    def grad_norm(self) -> float:
        if self.stage0_norm is not None:
            return self.stage0_norm
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else float("nan")

    # ---- the loop ----

    def run(self) -> int:
        try:
            status = self._setup_and_train()       # ends with a barrier
        except BaseException:   # a refused setup too: DeepSpeed never frees its CPU all-reduce segment itself
            release_cpu_shm_buffer_on_error(self.dist.rank)
            raise
        release_cpu_shm_buffer(self.dist.rank)
        return status

    def _setup_and_train(self) -> int:
        from tqdm import tqdm

        self.setup()
        cfg = self.cfg
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not (self.rank0 and cfg.log.progress),
                   dynamic_ncols=True, desc="train", file=sys.stderr)
        window_t0, window_steps = time.perf_counter(), 0
        status = 0
        profile_dir = Path(cfg.run_dir) / "profile"
        try:
            while self.step < cfg.train.steps:
                skipped_before = self.engine.skipped_steps
                self.lr = float(self.engine.get_lr()[0])     # the lr this step uses
                profiled = self.step + 1 == cfg.log.profile_step
                with profile_step(profile_dir, self.step + 1, self.dist.rank, self.device) if profiled \
                        else contextlib.nullcontext():
                    loss, reg, bad, stop, writing = self.train_step()
                if profiled:
                    self.log(f"profile of step {self.step + 1}: {profile_dir}")
                self.step += 1
                window_steps += 1
                self.counters["samples"] += cfg.train.global_batch
                self.counters["tokens"] += self.tokens_per_step
                self.counters["fwd_macs"] += self.fwd_macs_per_token * self.tokens_per_step
                gnorm = self.grad_norm()
                applied = self.engine.skipped_steps == skipped_before
                bad = bad or not applied or not math.isfinite(gnorm)
                if bad:
                    self.counters["skipped"] += 1
                    self.counters["bad_in_row"] += 1
                    self.log(f"step {self.step}: non-finite loss ({loss}) or gradient norm ({gnorm}): step skipped "
                             f"({self.counters['bad_in_row']} in a row, limit {cfg.train.max_bad_steps})")
                    if self.counters["bad_in_row"] >= cfg.train.max_bad_steps:
                        raise Diverged(f"{self.counters['bad_in_row']} non-finite steps in a row (train.max_bad_steps="
                                       f"{cfg.train.max_bad_steps}): the run diverged. Resume from the last checkpoint "
                                       f"with a lower optim.lr or stronger optim.grad_clip")
                else:
                    self.counters["bad_in_row"] = 0
                if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_t0
                    self.log_step(loss, reg, gnorm, elapsed, window_steps)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_step * window_steps / elapsed:.0f}",
                                    refresh=False)
                    window_t0, window_steps = time.perf_counter(), 0
                paused = time.perf_counter()     # statistics, validation and saves are not step time (perf/*)
                if self.want_usage and self.step % cfg.log.expert_stats_every == 0:
                    self.log_expert_usage()
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                    self.validate()
                bar.update(1)
                if self.saver.pending and not writing:      # every rank's thread has finished: same step everywhere
                    self.commit()
                if stop:
                    self.log(f"signal received: saving a checkpoint at step {self.step} and exiting with "
                             f"{PREEMPTED_EXIT_CODE} (requeue and resume with --resume auto)")
                    self.save()
                    status = PREEMPTED_EXIT_CODE
                    break
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
                window_t0 += time.perf_counter() - paused
                if cfg.debug.step_sleep:
                    time.sleep(cfg.debug.step_sleep)
            else:
                if cfg.eval.at_end and self.val_ds is not None:
                    self.validate()
                if not (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):   # not saved just now
                    self.save()
        except Diverged as e:
            self.log(f"stopped: {e}")
            status = DIVERGED_EXIT_CODE
        finally:
            bar.close()
            self.metrics.close()
        if self.saver.pending:          # the last save, or a background one still writing (its step was good)
            self.commit()
        barrier()                       # peers map each other's all-reduce segments until the last collective
        return status

    def save(self) -> None:
        """Collective. Synchronous: the checkpoint is committed on return. checkpoint.async_save: a copy of the state
        is taken and written in the background (a previous save still writing is committed first)."""
        if self.saver.pending:
            self.commit()
        state = {"step": self.step, "counters": self.counters, "loader": self.loader.state_dict(),
                 "world_size": self.dist.world_size, "zero_stage": self.zero_stage,
                 "tokenizer_sha256": self.tokenizer_sha256,
                 "experts_sharded": self.experts is not None, "expert_parallel_size": self.cfg.expert_parallel_size,
                 "model_config": self.mcfg.to_dict(), "run_config": self.cfg.to_dict(), "time": time.time()}
        if not self.saver.start(self.step, state, pause_s=30.0 if self.step == self.cfg.debug.save_pause_step
                                else 0.0):
            return                                          # this step is saved already
        if self.saver.background:
            self.log(f"checkpoint of step {self.step}: state copied to host memory in "
                     f"{self.saver.pending.phases['copy']:.1f} s, writing in the background")
        else:
            self.commit()

    def commit(self) -> None:
        path, total, phases = self.saver.commit()
        detail = "".join(f", {name} {sec:.1f}" for name, sec in phases.items())
        self.log(f"checkpoint {path} ({total:.1f} s{detail})")

    def log_step(self, loss: float, reg: float, gnorm: float, elapsed: float, steps: int) -> None:
        tokens = self.tokens_per_step * steps
        fwd_step = self.fwd_macs_per_token * self.tokens_per_step
        flops = 2 * 3 * fwd_step * steps / max(elapsed, 1e-9)           # 1 MAC = 2 FLOPs; training = 3 x forward
        s = {"train/loss": loss, "train/reg_loss": reg, "train/ppl": math.exp(min(loss, 50.0)),
             "train/lr": self.lr, "train/grad_norm": gnorm,
             "train/skipped_steps": float(self.counters["skipped"]),
             "perf/tokens_per_s": tokens / max(elapsed, 1e-9), "perf/step_time_s": elapsed / steps,
             "progress/samples": float(self.counters["samples"]), "progress/tokens": float(self.counters["tokens"]),
             "compute/fwd_macs_per_step": fwd_step, "compute/train_macs_per_step": 3 * fwd_step,
             "compute/fwd_macs_total": self.counters["fwd_macs"], "compute/train_macs_total":
                 3 * self.counters["fwd_macs"],
             "perf/tflops": flops / 1e12,
             "mem/host_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
        if self.experts:
            s["comm/expert_alltoall_bytes_per_step"] = self.experts.comm_bytes() / steps
        if self.peak:
            s["perf/mfu"] = flops / 1e12 / (self.peak * self.dist.world_size)
        if self.device.type == "cuda":
            s["mem/gpu_allocated_gib"] = torch.cuda.memory_allocated(self.device) / 2 ** 30
            s["mem/gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.metrics.scalars(self.step, s)

    def log_expert_usage(self) -> None:
        scalars, images = self.usage.summarize()
        self.metrics.scalars(self.step, scalars)
        for tag, img in images.items():
            self.metrics.image(tag, img, self.step)

    def validate(self) -> None:
        windows = self.val_ds.eval_windows(self.cfg.data.context, self.cfg.eval.batch, self.dist.rank,
                                           self.dist.world_size, self.cfg.eval.max_windows)
        self.engine.eval()
        loss, tokens = validation_loss(self.engine, windows, self.device)
        self.engine.train()
        self.metrics.scalars(self.step, {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)),
                                         "val/tokens": float(tokens)})
        self.log(f"step {self.step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50.0)):.2f} "
                 f"({tokens} tokens)")


def main_with(cfg: RunConfig, resume: str) -> int:
    return Trainer(cfg, resume).run()
