"""Training state of expert-parallel shards: their optimizer, gradient reduction, global-norm clipping, checkpoint.

With expert_parallel_size > 1 the σ-MoE expert shards live outside the module that DeepSpeed wraps
(parallel/expert_parallel.py). This component gives them everything DeepSpeed gives the other parameters:
- gradients averaged over the expert-data-parallel group (`ExpertShards.all_reduce_gradients`);
- AdamW with the run's hyper-parameters and the same learning-rate schedule;
- clipping by the TRUE global norm of the whole model: DeepSpeed's ZeRO-1/2 optimizer computes the norm of the
  parameters it owns in `scaled_global_norm()`; we wrap that one method so it returns
  sqrt(own^2 + experts^2). DeepSpeed then clips its parameters with the global norm, logs it as the grad norm, and
  we clip the expert gradients with the same coefficient (DeepSpeed's formula: max(1, (norm + 1e-6) / clip));
- a non-finite step that DeepSpeed skips is skipped for the experts too;
- checkpoints beside DeepSpeed's (parallel/expert_checkpoint.py), loadable at any expert-parallel size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from moeut_ds.config import ConfigError
from moeut_ds.parallel import ExpertShards, build_expert_parallel_groups, shard_experts
from moeut_ds.parallel.expert_checkpoint import load_expert_shards, save_expert_shards
from moeut_ds.train.schedule import make_scheduler


class ExpertTraining:
    def __init__(self, shards: ExpertShards, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 grad_clip: float, warmup: int, total_steps: int, min_lr_ratio: float):
        self.shards = shards
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(shards.parameters(), lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)
        self.scheduler = make_scheduler(self.optimizer, warmup, total_steps, min_lr_ratio)
        self._expert_norm_sq: Optional[torch.Tensor] = None

    @classmethod
    def create(cls, model, ep_size: int, zero_stage: int, cfg) -> "ExpertTraining":
        """Shard the model's experts over expert-parallel groups of ep_size ranks (collective)."""
        if zero_stage not in (1, 2):
            raise ConfigError(f"expert_parallel_size={ep_size} needs ZeRO stage 1 or 2 (the ds config has stage "
                              f"{zero_stage}): use ds_configs/zero1*.json or zero2*.json")
        shards = shard_experts(model, build_expert_parallel_groups(ep_size), cfg.expert_dispatch)
        o = cfg.optim
        return cls(shards, o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip, o.warmup_steps, cfg.train.steps,
                   o.min_lr_ratio)

    def attach(self, engine) -> None:
        """Make DeepSpeed's norm (used for clipping and logging) include the expert gradients."""
        opt = engine.optimizer
        if not hasattr(opt, "scaled_global_norm"):
            raise ConfigError(f"expert parallelism needs DeepSpeed's ZeRO-1/2 optimizer, got {type(opt).__name__}")
        own = opt.scaled_global_norm

        def global_norm(norm_type: int = 2) -> torch.Tensor:
            norm = own(norm_type)
            extra = self._expert_norm_sq
            if extra is None or float(norm) < 0:          # -1 is DeepSpeed's "non-finite" sentinel: keep it
                return norm
            scale = float(getattr(opt, "loss_scale", 1.0))
            return torch.sqrt(norm.float() ** 2 + extra.to(norm.device) * scale ** 2)

        opt.scaled_global_norm = global_norm
        self.shards.to(engine.device)

    def before_step(self) -> None:
        """At the gradient-accumulation boundary, before engine.step(): reduce expert grads, measure their norm."""
        self.shards.all_reduce_gradients()
        self._expert_norm_sq = self.shards.grad_norm_sq()

    def after_step(self, global_norm: Optional[float], applied: bool) -> None:
        """After engine.step(): clip with the global norm DeepSpeed used and step (or skip with DeepSpeed)."""
        if applied:                    # DeepSpeed neither steps nor advances its schedule on a skipped step
            if self.grad_clip > 0 and global_norm is not None:
                coef = max(1.0, (global_norm + 1e-6) / self.grad_clip)
                for p in self.shards.parameters():
                    if p.grad is not None:
                        p.grad.div_(coef)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._expert_norm_sq = None

    def save(self, checkpoint_dir: Path) -> list[Path]:
        return save_expert_shards(self.shards, self.optimizer, checkpoint_dir)

    def load(self, checkpoint_dir: Path, step: int) -> None:
        load_expert_shards(self.shards, self.optimizer, checkpoint_dir)
        for _ in range(step - self.scheduler.last_epoch):       # the schedule is a pure function of the step
            self.scheduler.step()

    def comm_bytes(self) -> int:
        """Bytes this rank sent through expert all-to-alls since the last call."""
        return self.shards.model_backend.stats.reset()["bytes_sent"]
