"""The paper's learning-rate schedule: linear warm-up, then cosine from lr down to min_lr_ratio * lr."""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): reaches min_ratio at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR; its state (last_epoch) travels in the DeepSpeed checkpoint, so resume continues the curve."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, min_ratio))


def apply_recipe(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
    """After a checkpoint load: the optimizer hyperparameters and the schedule's base lr come back as they were
    saved, but the run config is what this run trains with (changing optim.* or train.steps on resume is how a run
    is adjusted or extended). Put the configured values back and recompute this step's lr from them."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=lr, lr=lr * factor(scheduler.last_epoch), betas=tuple(betas), eps=eps,
                     weight_decay=weight_decay)
