"""Scalars to TensorBoard and to a JSONL file (same names, same values), written by global rank 0 only.

Also the expert-usage statistics (per distinct layer and router: usage entropy, fraction of experts unused in the
window, an image layers x experts) and the analytic MACs / MFU numbers.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from moeut_ds.config import ModelConfig

# bf16 dense peak per device in TFLOP/s, matched against torch.cuda.get_device_name().
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "V100": 125.0}


def detect_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


class MetricsWriter:
    """SummaryWriter + `<run_dir>/metrics.jsonl`. A no-op object on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, first_step: int = 1):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard hides the events of steps >= first_step that an earlier run in this directory
        # logged (a killed run past its checkpoint, or one killed before its first checkpoint, then started afresh)
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        event = "start" if first_step == 1 else "resume"
        self.jsonl.write(json.dumps({"event": event, "step": first_step, "time": time.time()}) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, v in values.items():
            self.tb.add_scalar(tag, v, step)
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        if self.enabled:
            self.tb.add_image(tag, img, step, dataformats="HW")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self.enabled:
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


class ExpertUsage:
    """How often each expert was chosen over a logging window: the sum of the model's per-micro-batch expert counts
    (LanguageModel(..., return_expert_counts=True)), kept on the device until `summarize`."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.counts = {kind: torch.zeros(cfg.n_distinct_layers, n, dtype=torch.float64, device=device)
                       for kind, n in cfg.routers.items()}

    @property
    def active(self) -> bool:
        return bool(self.counts)

    @torch.no_grad()
    def update(self, expert_counts: list[dict[str, torch.Tensor]]) -> None:
        for g, layer in enumerate(expert_counts):
            for kind, c in layer.items():
                self.counts[kind][g] += c

    def summarize(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Collective (all-reduces the counts). Scalars per layer/router and one image per router; resets."""
        from moeut_ds.train.distributed import all_reduce_

        scalars: dict[str, float] = {}
        images: dict[str, np.ndarray] = {}
        for kind, c in self.counts.items():
            c = all_reduce_(c.clone()).cpu()
            total = c.sum(-1, keepdim=True).clamp_min(1)
            p = c / total
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(c.shape[1])
            for g in range(c.shape[0]):
                scalars[f"experts/layer{g}_{kind}_usage_entropy"] = float(ent[g])
                scalars[f"experts/layer{g}_{kind}_unused_frac"] = float((c[g] == 0).float().mean())
            images[f"experts/usage_{kind}"] = (p / p.amax(-1, keepdim=True).clamp_min(1e-30)).numpy().astype(np.float32)
            self.counts[kind].zero_()
        return scalars, images
