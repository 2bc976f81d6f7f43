"""The DeepSpeed trainer: `python -m moeut_ds.train --config CONFIG.yaml [--resume auto|PATH|none] [key=value ...]`.

Modules: config (run config + overrides), distributed (process group from env), schedule (lr), checkpoint (atomic
save, exact resume), metrics (TensorBoard + JSONL), loop (the training loop). See docs/TRAINING.md.
"""
from __future__ import annotations

# Exit status after a SIGTERM/SIGUSR1: a checkpoint was saved, the job should be requeued and resumed.
PREEMPTED_EXIT_CODE = 75
# Exit status when the run stopped on too many non-finite steps in a row (not worth requeueing).
DIVERGED_EXIT_CODE = 3

__all__ = ["PREEMPTED_EXIT_CODE", "DIVERGED_EXIT_CODE"]
