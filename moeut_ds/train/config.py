"""Run configuration: dataclasses filled from a YAML file plus dotted `key=value` overrides.

The run config owns the recipe (model, data, optimizer, schedule, batch, logging, checkpoints); the DeepSpeed JSON
named by `deepspeed_config` owns ZeRO and precision. Every mistake raises ConfigError naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from moeut_ds.config import ConfigError, ModelConfig, typed_value
from moeut_ds.presets import get_preset

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DataSection:
    path: str = ""                      # a directory written by `python -m data_prep.prepare`
    context: int = 1024                 # T: windows of T+1 tokens
    shuffle: bool = True
    val_split: str = "val"


@dataclass
class OptimSection:
    lr: float = 2.5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 0.25             # global-norm clipping (0 = off)
    warmup_steps: int = 4000
    min_lr_ratio: float = 0.1           # cosine ends at min_lr_ratio * lr on the last step


@dataclass
class TrainSection:
    steps: int = 100_000
    global_batch: int = 64              # sequences per optimizer step, all ranks together
    micro_batch: int = 64               # sequences per rank per forward/backward
    max_bad_steps: int = 5              # stop after this many non-finite steps in a row
    compile: bool = False               # torch.compile the model (nn.Module.compile); ZeRO-0/1/2, all-gather dispatch
    cuda_graphs: bool = False           # with compile: its graphs replayed as CUDA graphs (docs/CUDA_GRAPHS.md)
    activation_checkpointing: bool = False  # recompute each layer application in backward: less memory, ~1/3 more compute


@dataclass
class EvalSection:
    every: int = 1000                   # validation every N steps (0 = only at the end)
    max_windows: Optional[int] = 256    # held-out windows per validation (None = the whole split)
    batch: int = 8
    at_end: bool = True


@dataclass
class LogSection:
    every: int = 1                      # scalars every N steps
    expert_stats_every: int = 100       # expert usage entropy / unused / image every N steps (0 = off)
    peak_tflops: Optional[float] = None  # per device, for MFU; None = detect (known GPUs) or no MFU
    progress: bool = True               # tqdm line on rank 0
    profile_step: int = 0               # torch.profiler trace + top-op table of this step, every rank (0 = off)


@dataclass
class CheckpointSection:
    every: int = 1000                   # save every N steps (0 = only on preemption and at the end)
    keep_last: int = 3
    keep_every: int = 0                 # also keep every M-th step forever (0 = off)
    dir: Optional[str] = None           # default: <run_dir>/checkpoints
    # write, hash and fsync in a thread while training goes on, from a copy of the state in host memory (as much
    # host RAM as this rank's share of a checkpoint); docs/TRAINING.md, "Checkpoints and resume"
    async_save: bool = False


@dataclass
class DebugSection:
    nan_steps: list[int] = field(default_factory=list)   # inject a NaN loss at these steps (tests of the skip)
    step_sleep: float = 0.0             # seconds slept after each step (tests that kill a run mid-way)
    save_pause_step: int = 0            # pause 30 s inside the save of this step, before it is committed (kill tests)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "moeut-tiny"})
    expert_backend: str = "auto"
    # how the σ-MoE MLP sums each token's K expert outputs: buffer (per-pair rows, then a fixed-order sum: bitwise
    # repeatable) | atomic (added into the token rows by atomics: faster, no [P, d] buffer, not repeatable;
    # triton backend, no expert parallelism); docs/KERNELS.md, "The atomic combine"
    expert_combine: str = "buffer"
    expert_parallel_size: int = 1       # ranks that split each σ-MoE layer's experts (needs ZeRO-1/2; 1 = off)
    expert_dispatch: str = "auto"       # allgather | alltoall | auto (allgather for ep <= 2); docs/PARALLEL.md
    deepspeed_config: str = "ds_configs/zero2.json"
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)   # merged into the ds config (nested keys)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def model_config(self) -> ModelConfig:
        """`model: {preset: NAME, field: value, ...}`: the preset with fields replaced, or fields alone."""
        fields = dict(self.model)
        preset = fields.pop("preset", None)
        try:
            base = get_preset(preset) if preset else ModelConfig()
            return base.replace(**fields) if fields else base.validate()
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step; the global batch must split evenly over ranks and micro-batches."""
        per_step = self.train.micro_batch * world_size
        if self.train.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.train.global_batch} is not a multiple of train.micro_batch="
                f"{self.train.micro_batch} x world size {world_size} = {per_step}: choose a micro_batch (or number "
                f"of ranks) so that global_batch = micro_batch x world_size x accumulation")
        return self.train.global_batch // per_step

    def validate(self) -> "RunConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(bool(self.data.path), "data.path is empty: set it to a dataset directory prepared with "
                                   "`python -m data_prep.prepare --input ... --out DIR` (e.g. data.path=DIR)")
        need(self.data.context >= 1, f"data.context={self.data.context}: must be >= 1")
        for key in ("train.steps", "train.global_batch", "train.micro_batch", "train.max_bad_steps", "eval.batch"):
            sec, name = key.split(".")
            val = getattr(getattr(self, sec), name)
            need(isinstance(val, int) and val >= 1, f"{key}={val!r}: must be a positive integer")
        need(self.train.compile or not self.train.cuda_graphs,
             "train.cuda_graphs=true replays torch.compile's graphs: set train.compile=true as well")
        need(self.train.micro_batch <= self.train.global_batch,
             f"train.micro_batch={self.train.micro_batch} > train.global_batch={self.train.global_batch}: the micro "
             f"batch is per rank and must not exceed the global batch")
        for key in ("eval.every", "log.expert_stats_every", "log.profile_step", "checkpoint.every",
                    "checkpoint.keep_every", "optim.warmup_steps"):
            sec, name = key.split(".")
            val = getattr(getattr(self, sec), name)
            need(isinstance(val, int) and val >= 0, f"{key}={val!r}: must be an integer >= 0")
        from moeut_ds.experts import available_backends

        backends = ["auto", *available_backends()]
        need(self.expert_backend in backends, f"expert_backend={self.expert_backend!r}: use one of {', '.join(backends)}")
        need(self.expert_combine in ("buffer", "atomic"),
             f"expert_combine={self.expert_combine!r}: use buffer (default, bitwise repeatable) or atomic")
        need(self.expert_combine == "buffer" or self.expert_backend in ("auto", "triton"),
             f"expert_combine={self.expert_combine} needs the triton expert backend, not {self.expert_backend}")
        need(self.expert_combine == "buffer" or self.expert_parallel_size == 1,
             f"expert_combine={self.expert_combine} with expert_parallel_size={self.expert_parallel_size}: the "
             f"expert-parallel dispatches sum local pairs or variable segments, not the fixed groups the atomic "
             f"sums add; use expert_combine=buffer")
        need(isinstance(self.expert_parallel_size, int) and self.expert_parallel_size >= 1,
             f"expert_parallel_size={self.expert_parallel_size!r}: must be a positive integer (1 = no expert "
             f"parallelism)")
        from moeut_ds.parallel.expert_parallel import choose_dispatch

        choose_dispatch(self.expert_dispatch, self.expert_parallel_size)      # raises for an unknown dispatch
        need(self.expert_parallel_size == 1 or self.expert_backend != "megablocks",
             f"expert_parallel_size={self.expert_parallel_size} with expert_backend=megablocks: the MegaBlocks backend "
             f"has no expert-parallel path; use expert_backend=triton (or auto)")
        need(self.expert_parallel_size == 1 or self.model_config().arch == "moeut",
             f"expert_parallel_size={self.expert_parallel_size} needs a MoEUT / σ-MoE model: the dense baseline has "
             f"no experts")
        need(isinstance(self.log.every, int) and self.log.every >= 1, f"log.every={self.log.every!r}: must be >= 1")
        need(self.checkpoint.keep_last >= 1, f"checkpoint.keep_last={self.checkpoint.keep_last}: must be >= 1 "
                                             f"(the newest checkpoint is what --resume auto needs)")
        need(self.optim.lr > 0, f"optim.lr={self.optim.lr}: must be > 0")
        need(len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
             f"optim.betas={list(self.optim.betas)}: must be two numbers in [0, 1)")
        need(self.optim.eps > 0, f"optim.eps={self.optim.eps}: must be > 0")
        need(self.optim.weight_decay >= 0, f"optim.weight_decay={self.optim.weight_decay}: must be >= 0")
        need(self.optim.grad_clip >= 0, f"optim.grad_clip={self.optim.grad_clip}: must be >= 0 (0 = no clipping)")
        need(0 <= self.optim.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.optim.min_lr_ratio}: must be in [0, 1]")
        need(self.eval.max_windows is None or self.eval.max_windows >= 1,
             f"eval.max_windows={self.eval.max_windows}: must be >= 1 or null (whole split)")
        need(self.log.peak_tflops is None or self.log.peak_tflops > 0,
             f"log.peak_tflops={self.log.peak_tflops}: must be > 0 or null (detect)")
        self.model_config()
        self.deepspeed_config_path()
        return self

    def deepspeed_config_path(self) -> Path:
        """As given (relative to the working directory), else relative to the repository root."""
        p = Path(self.deepspeed_config)
        for cand in (p, REPO_ROOT / p):
            if cand.is_file():
                return cand.resolve()
        raise ConfigError(f"deepspeed_config={self.deepspeed_config!r}: no such file (looked in the working directory "
                          f"and in {REPO_ROOT}); use one of ds_configs/*.json")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a (nested) dataclass, refusing unknown keys with the list of known ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in hints:
            raise ConfigError(f"unknown config key {name!r}; known keys{' of ' + where if where else ''}: "
                              f"{sorted(hints)}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _from_dict(hints[key], value, name)
        else:
            kwargs[key] = typed_value(name, hints[key], value)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}=...: {p!r} is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'train.steps=100' -> ('train.steps', 100); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None


def load_run_config(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    """YAML file (may be None) + overrides -> a validated RunConfig."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file; see configs/*.yaml for examples")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys (like configs/*.yaml), got a "
                              f"{type(tree).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return _from_dict(RunConfig, tree, "").validate()


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved with a checkpoint (RunConfig.to_dict)."""
    return _from_dict(RunConfig, json.loads(json.dumps(d)), "")
