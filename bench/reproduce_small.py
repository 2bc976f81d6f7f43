"""Reproduce the paper's central comparisons at small scale with the project's own data tools, trainer and evaluator.

    python bench/reproduce_small.py [--scale small|toy] [--data PREPARED_DIR | --corpus FILE_OR_DIR ...]
                                    [--models moeut dense sigma-moe moeut-g1 moeut-pre moeut-post]
                                    [--gpus N] [--steps N] [--out DIR]

Every model sees the same data in the same order (same seed, same loader), the same token budget and the same
schedule; then held-out perplexity and BLiMP are measured and one table is printed (and written to
OUT/results.md, OUT/results.json, and OUT/loss_curves.png when matplotlib is available).

Scales:
- small: the 44M presets of the spec (MoEUT-44M, dense-44M, σ-MoE-44M; the G=1 and pre/post-LN ablations at the
  same size), context 512, 32 sequences a step. Chosen so that each model trains for a couple of minutes on one
  H200: the paper's smallest size, with its exact architecture, at a token budget of a few epochs of the bundled
  corpus. A claim at this scale is weak evidence, not a reproduction of the paper's numbers.
- toy: tiny models and a few steps on CPU, to check the pipeline end to end (CI); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
ENGLISH = REPO / "data" / "english"


@dataclass
class Scale:
    context: int
    batch: int
    steps: int
    lr: float
    warmup: int
    clip: float
    vocab: int
    blimp_pairs: Optional[int]
    val_windows: Optional[int]


SCALES = {
    "small": Scale(context=512, batch=32, steps=300, lr=2.5e-4 * 4, warmup=50, clip=0.1, vocab=8000,
                   blimp_pairs=None, val_windows=None),
    "toy": Scale(context=64, batch=8, steps=6, lr=3e-3, warmup=1, clip=0.25, vocab=400, blimp_pairs=4,
                 val_windows=8),
}

# The 44M MoEUT keeps G·N_E and G·N_A (so the parameters) when G changes: G=1 doubles the experts of its one layer.
MODELS = {
    "small": {
        "moeut": {"preset": "moeut-44m"},
        "dense": {"preset": "dense-44m"},
        "sigma-moe": {"preset": "sigma-moe-44m"},
        "moeut-g1": {"preset": "moeut-44m", "group_size": 1, "ff_n_experts": 310, "att_n_experts": 16},
        "moeut-pre": {"preset": "moeut-44m", "norm": "pre"},
        "moeut-post": {"preset": "moeut-44m", "norm": "post"},
    },
    "toy": {
        "moeut": {"preset": "moeut-tiny", "d_model": 64, "d_head": 16, "ff_expert_size": 16},
        "dense": {"preset": "dense-tiny", "d_model": 64, "d_head": 16, "d_ff": 256},
        "sigma-moe": {"preset": "moeut-tiny", "d_model": 64, "d_head": 16, "ff_expert_size": 16, "group_size": 4,
                      "att_n_experts": 1, "att_k": 1, "ff_n_experts": 8},
        "moeut-g1": {"preset": "moeut-tiny", "d_model": 64, "d_head": 16, "ff_expert_size": 16, "group_size": 1,
                     "ff_n_experts": 32, "att_n_experts": 8},
        "moeut-pre": {"preset": "moeut-tiny", "d_model": 64, "d_head": 16, "ff_expert_size": 16, "norm": "pre"},
        "moeut-post": {"preset": "moeut-tiny", "d_model": 64, "d_head": 16, "ff_expert_size": 16, "norm": "post"},
    },
}


def run(cmd: list[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def prepare(corpus: list[str], out: Path, vocab: int) -> Path:
    """Tokenize the corpus (KJV and WEB kept on the training side: they are the same book)."""
    if (out / "metadata.json").is_file():
        return out
    inputs: list[str] = []
    for c in corpus:
        p = Path(c)
        files = sorted(p.glob("*.txt.gz")) + sorted(p.glob("*.txt")) if p.is_dir() else [p]
        bible = [str(f) for f in files if f.name.split(".")[0] in ("kjv", "web_bible")]
        rest = [str(f) for f in files if str(f) not in bible]
        inputs += ["--input", *rest] + (["--input", *bible, "--side", "train"] if bible else [])
    cmd = [sys.executable, "-m", "data_prep.prepare", *inputs, "--out", str(out), "--vocab-size", str(vocab)]
    print("preparing:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return out


def run_config(name: str, model: dict, scale: Scale, data: Path, out: Path, gpu: bool) -> Path:
    cfg = {
        "run_dir": str(out / name), "seed": 0, "model": {**model, "vocab_size": scale.vocab},
        "deepspeed_config": "ds_configs/zero2_bf16.json" if gpu else "ds_configs/zero2.json",
        "data": {"path": str(data), "context": scale.context},
        "optim": {"lr": scale.lr, "warmup_steps": scale.warmup, "grad_clip": scale.clip},
        "train": {"steps": scale.steps, "global_batch": scale.batch, "micro_batch": scale.batch},
        "eval": {"every": max(1, scale.steps // 4), "max_windows": scale.val_windows, "batch": 16},
        "log": {"every": max(1, scale.steps // 100), "expert_stats_every": max(1, scale.steps // 4),
                "progress": False},
        "checkpoint": {"every": 0, "keep_last": 1},
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_and_evaluate(names: list[str], configs: dict[str, Path], out: Path, data: Path, scale: Scale,
                       gpus: int) -> dict[str, float]:
    """Train then evaluate every model, `gpus` models at a time (one process per GPU; one CPU process when
    gpus == 0). Each model's evaluation follows its training in the same slot, so finished models have results even
    if a later one is interrupted. Returns the training wall time of each model."""
    pending, running, wall = list(names), {}, {}
    slots = list(range(max(gpus, 1)))
    while pending or running:
        while pending and slots:
            name, slot = pending.pop(0), slots.pop(0)
            env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(29600 + slot), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
            else:
                env["DS_ACCELERATOR"] = "cpu"
            train = [sys.executable, "-m", "moeut_ds.train", "--config", str(configs[name]), "--resume", "auto"]
            (out / "eval").mkdir(parents=True, exist_ok=True)
            script = (f"{shlex.join(train)} && echo TRAINED $(date +%s.%N) && "
                      f"{shlex.join(evaluate_cmd(name, out, data, scale, gpus > 0))}")
            running[name] = (run(["bash", "-c", script], out / "logs" / f"{name}.log", env), slot, time.time())
            print(f"training {name} (slot {slot})", flush=True)
        time.sleep(1)
        for name, (proc, slot, t0) in list(running.items()):
            if proc.poll() is not None:
                log = out / "logs" / f"{name}.log"
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed (exit {proc.returncode}): see {log}")
                trained = [line for line in log.read_text().splitlines() if line.startswith("TRAINED ")]
                wall[name] = float(trained[-1].split()[1]) - t0
                print(f"finished {name}: trained in {wall[name]:.0f} s, evaluated in "
                      f"{time.time() - t0 - wall[name]:.0f} s", flush=True)
                del running[name]
                slots.append(slot)
    return wall


def evaluate_cmd(name: str, out: Path, data: Path, scale: Scale, gpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "moeut_ds.evaluate", str(out / name), "--data", str(data), "--split", "val",
           "--json", str(out / "eval" / f"{name}.json"), "--device", "cuda" if gpu else "cpu"]
    if scale.blimp_pairs:
        cmd += ["--blimp-max-pairs", str(scale.blimp_pairs)]
    if scale.val_windows:
        cmd += ["--max-windows", str(scale.val_windows)]
    return cmd


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r and "event" not in r]


def summarize(names: list[str], out: Path, wall: dict, context: int) -> list[dict]:
    from moeut_ds.accounting import count_parameters, forward_macs_per_token
    from moeut_ds.train.config import load_run_config

    table = []
    for name in names:
        cfg = load_run_config(str(out / "configs" / f"{name}.yaml")).model_config()
        rows = read_metrics(out / name)
        train = [r for r in rows if "train/loss" in r]
        ev = json.loads((out / "eval" / f"{name}.json").read_text())
        table.append({
            "model": name, "params_M": count_parameters(cfg)["total"] / 1e6,
            "fwd_MACs_per_token_M": forward_macs_per_token(cfg, context) / 1e6,
            "tokens": train[-1]["progress/tokens"], "final_train_loss": train[-1]["train/loss"],
            "val_ppl": ev["perplexity"], "blimp": ev.get("blimp", {}).get("average", float("nan")),
            "tokens_per_s": sum(r["perf/tokens_per_s"] for r in train[len(train) // 2:]) / (len(train) - len(train) // 2),
            "wall_s": wall.get(name, float("nan")),
        })
    return table


def render(table: list[dict]) -> str:
    head = ("| model | params | fwd MACs/token | tokens | final train loss | val ppl | BLiMP | tokens/s | wall |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['model']} | {r['params_M']:.1f}M | {r['fwd_MACs_per_token_M']:.1f}M | {r['tokens']:,.0f} | "
        f"{r['final_train_loss']:.3f} | {r['val_ppl']:.2f} | {r['blimp']:.3f} | {r['tokens_per_s']:,.0f} | "
        f"{r['wall_s']:.0f} s |\n" for r in table)


def plot(names: list[str], out: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss-curve PNG (the scalars are in each run's metrics.jsonl)")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        rows = read_metrics(out / name)
        tr = [(r["progress/tokens"] / 1e6, r["train/loss"]) for r in rows if "train/loss" in r]
        va = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
        ax1.plot(*zip(*tr), label=name, linewidth=1)
        if va:
            ax2.plot(*zip(*va), marker="o", label=name)
    ax1.set_xlabel("tokens (M)"); ax1.set_ylabel("train cross-entropy"); ax1.legend(); ax1.grid(alpha=0.3)
    ax2.set_xlabel("step"); ax2.set_ylabel("validation cross-entropy"); ax2.legend(); ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="small")
    ap.add_argument("--data", help="an already prepared dataset (data_prep.prepare output)")
    ap.add_argument("--corpus", nargs="+", default=[str(ENGLISH)], help="text files or folders to prepare "
                    "(default: the bundled data/english)")
    ap.add_argument("--models", nargs="+", default=list(MODELS["small"]), help="subset of the models to compare")
    ap.add_argument("--gpus", type=int, default=None, help="train this many models at once, one per GPU "
                    "(default: all visible GPUs; 0 = CPU)")
    ap.add_argument("--steps", type=int, help="override the scale's step budget")
    ap.add_argument("--out", default="runs/reproduce", help="output directory")
    a = ap.parse_args(argv)

    import torch

    scale = dataclasses.replace(SCALES[a.scale], **({"steps": a.steps} if a.steps else {}))
    gpus = torch.cuda.device_count() if a.gpus is None else a.gpus
    unknown = [m for m in a.models if m not in MODELS[a.scale]]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS[a.scale])}")
    out = Path(a.out).resolve()
    t0 = time.time()
    data = Path(a.data).resolve() if a.data else prepare(a.corpus, out / f"data-{scale.vocab}", scale.vocab)
    configs = {n: run_config(n, MODELS[a.scale][n], scale, data, out, gpu=gpus > 0) for n in a.models}
    wall = train_and_evaluate(a.models, configs, out, data, scale, gpus)
    table = summarize(a.models, out, wall, scale.context)
    text = render(table)
    print(text)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"scale": a.scale, "steps": scale.steps, "context": scale.context,
                                                  "batch": scale.batch, "table": table,
                                                  "total_wall_s": time.time() - t0}, indent=1))
    png = plot(a.models, out)
    print(f"results: {out / 'results.md'}" + (f", curves: {png}" if png else ""))
    return 0 if all(math.isfinite(r["val_ppl"]) for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
