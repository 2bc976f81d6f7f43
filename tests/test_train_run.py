"""End-to-end trainer runs on CPU with gloo: ZeRO stages, logged scalars, NaN handling."""
from __future__ import annotations

import json
import math
import re

import pytest

from dist_harness import Ranks, data_dir, read_jsonl, run_train, tiny_overrides, train_argv, trained_run  # noqa: F401

from moeut_ds import get_preset
from moeut_ds.accounting import forward_macs_per_token


def _decreases(rows: dict[int, dict]) -> tuple[float, float]:
    losses = [rows[s]["train/loss"] for s in sorted(rows) if "train/loss" in rows[s]]
    return sum(losses[:3]) / 3, sum(losses[-3:]) / 3


@pytest.mark.slow
def test_zero3_with_activation_checkpointing_gives_the_same_run(tmp_path, data_dir):
    """ZeRO-3 re-gathers a shared layer's parameters again when backward recomputes its application."""
    curves = {}
    for ac in (False, True):
        over = tiny_overrides(data_dir, tmp_path / f"run{ac}", **{
            "deepspeed_config": "ds_configs/zero3.json", "train.steps": 4, "eval.at_end": False,
            "train.activation_checkpointing": ac})
        over.append("deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0")
        run_train(tmp_path, 2, *over, name=f"logs{ac}")
        rows = read_jsonl(tmp_path / f"run{ac}")
        curves[ac] = [(rows[s]["train/loss"], rows[s]["train/grad_norm"]) for s in sorted(rows)]
    assert len(curves[True]) == 4 and curves[True] == curves[False]


@pytest.mark.slow
@pytest.mark.parametrize("stage,preset", [(1, "moeut-tiny"), (3, "moeut-tiny"), (3, "dense-tiny")])
def test_two_ranks_zero_stage_loss_decreases(tmp_path, data_dir, stage, preset):
    extra = {"deepspeed_config": f"ds_configs/zero{stage}.json", "model.preset": preset, "train.steps": 12}
    if preset == "dense-tiny":
        extra.update({"model.d_model": 64, "model.d_head": 16, "model.d_ff": 128})
        over = tiny_overrides(data_dir, tmp_path / "run", **extra)
        over = [o for o in over if not o.startswith(("model.ff_", "model.ff"))]
    else:
        over = tiny_overrides(data_dir, tmp_path / "run", **extra)
    if stage == 3:   # force real partitioning of the tiny model and re-gathering on every use of a shared layer
        over.append("deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0")
    run_train(tmp_path, 2, *over)
    first, last = _decreases(read_jsonl(tmp_path / "run"))
    assert last < first - 0.3, (first, last)


def test_zero2_run_scalars(trained_run):
    rows = read_jsonl(trained_run)
    assert sorted(rows) == list(range(1, 11))
    first, last = _decreases(rows)
    assert last < first - 0.3
    cfg = get_preset("moeut-tiny").replace(vocab_size=512, d_model=64, d_head=16, ff_n_experts=8, ff_expert_size=16,
                                           ff_k=2)
    fwd_step = forward_macs_per_token(cfg, 32) * 8 * 32
    for step, row in rows.items():
        assert 0 < row["train/loss"] < math.log(512) + 1
        assert row["compute/fwd_macs_per_step"] == pytest.approx(fwd_step)
        assert row["compute/train_macs_per_step"] == pytest.approx(3 * fwd_step)
        assert row["compute/fwd_macs_total"] == pytest.approx(fwd_step * step)
        assert row["compute/train_macs_total"] == pytest.approx(3 * fwd_step * step)
        assert row["progress/samples"] == 8 * step and row["progress/tokens"] == 8 * 32 * step
        assert row["train/grad_norm"] > 0 and row["perf/tokens_per_s"] > 0 and row["train/lr"] > 0
        assert row["train/ppl"] == pytest.approx(math.exp(row["train/loss"]))
        assert row["perf/mfu"] == pytest.approx(row["perf/tflops"] / 2)
    assert 0 < rows[5]["val/loss"] < math.log(512) + 1 and rows[10]["val/ppl"] < rows[5]["val/ppl"] * 1.05
    for g in range(2):
        for kind in ("ff", "v", "o"):
            assert 0 < rows[5][f"experts/layer{g}_{kind}_usage_entropy"] <= 1
            assert 0 <= rows[10][f"experts/layer{g}_{kind}_unused_frac"] < 1


def test_profile_of_one_step_per_rank(trained_run):
    """log.profile_step=3: every rank writes a Chrome trace and a top-op table of that step, and only of it."""
    files = sorted(p.name for p in (trained_run / "profile").iterdir())
    assert files == [f"step000003_rank{r}.{ext}" for r in (0, 1) for ext in ("json", "txt")]
    trace = json.loads((trained_run / "profile" / "step000003_rank1.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::bmm" in names           # the model's matmuls ran inside the profile
    table = (trained_run / "profile" / "step000003_rank0.txt").read_text()
    assert "Self CPU" in table and "aten::" in table


def test_tensorboard_events_hold_every_scalar(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    rows = read_jsonl(trained_run)
    expected = {k for row in rows.values() for k in row if k not in ("step", "time")}
    need = {"train/loss", "train/reg_loss", "train/ppl", "train/lr", "train/grad_norm", "perf/tokens_per_s",
            "progress/samples", "progress/tokens", "compute/fwd_macs_per_step", "compute/train_macs_per_step",
            "compute/fwd_macs_total", "compute/train_macs_total", "perf/tflops", "perf/mfu", "val/loss", "val/ppl",
            "experts/layer0_ff_usage_entropy", "experts/layer1_o_unused_frac"}
    assert need <= expected == tags
    for tag in expected:
        tb = {e.step: e.value for e in ea.Scalars(tag)}
        js = {s: r[tag] for s, r in rows.items() if tag in r}
        assert tb.keys() == js.keys()
        assert all(tb[s] == pytest.approx(js[s], rel=1e-6) for s in js), tag
    assert {"experts/usage_ff", "experts/usage_v", "experts/usage_o"} <= set(ea.Tags()["images"])
    reg = [e.value for e in ea.Scalars("train/reg_loss")]
    assert all(-1 < v < 0 for v in reg)    # -(entropy) terms, scaled by gamma/delta


def test_nan_loss_skips_step_then_stops(tmp_path, data_dir):
    over = tiny_overrides(data_dir, tmp_path / "run", **{"train.steps": 6, "debug.nan_steps": [3],
                                                         "log.expert_stats_every": 0})
    run_train(tmp_path, 1, *over, name="one")
    rows = read_jsonl(tmp_path / "run")
    assert rows[3]["train/skipped_steps"] == 1 and rows[6]["train/skipped_steps"] == 1
    assert math.isfinite(rows[6]["train/loss"])
    over = tiny_overrides(data_dir, tmp_path / "run2", **{"train.steps": 8, "debug.nan_steps": [2, 3, 4],
                                                          "train.max_bad_steps": 3, "log.expert_stats_every": 0})
    job = run_train(tmp_path, 1, *over, expect=3, name="stop")
    assert "3 non-finite steps in a row" in job.output()


@pytest.mark.slow
def test_step_time_leaves_out_saves_and_validation(tmp_path, data_dir):
    """perf/step_time_s (and tokens/s, MFU) time training only: the save of step 2 pauses 30 s, step 3 stays fast.
    The save's log line splits its time into phases; the test pause sits between them, in none."""
    over = tiny_overrides(data_dir, tmp_path / "run", **{"train.steps": 4, "checkpoint.every": 2, "eval.every": 2,
                                                         "debug.save_pause_step": 2, "log.expert_stats_every": 2})
    job = run_train(tmp_path, 1, *over, timeout=200)
    rows = read_jsonl(tmp_path / "run")
    assert "val/loss" in rows[2] and rows[3]["perf/step_time_s"] < 10, rows[3]
    m = re.search(r"step00000002 \(([\d.]+) s, write ([\d.]+), digests ([\d.]+), fsync ([\d.]+), "
                  r"commit ([\d.]+)\)", job.output())
    assert m, job.output()[-3000:]
    total, *phases = (float(g) for g in m.groups())
    assert total >= 30 and sum(phases) < total - 29, m.group(0)


def test_unusable_validation_split_and_checkpoint_dir_stop_the_run_before_its_first_step(tmp_path, data_dir):
    """Found at setup, not at the first validation or save: those come after training steps (and validation runs
    before the save of its step, so a late error there would lose every step on every retry)."""
    from moeut_ds.data import open_dataset

    n_val = open_dataset(str(data_dir), "val").num_tokens            # one window needs context + 1 tokens
    job = run_train(tmp_path, 1, *tiny_overrides(data_dir, tmp_path / "run", **{"data.context": n_val,
                                                                                  "eval.every": 2}), expect=2)
    assert f"split 'val' of {data_dir} has {n_val} tokens, fewer than one window" in job.output()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not read_jsonl(tmp_path / "run")
    (tmp_path / "file").write_text("keep me")
    over = tiny_overrides(data_dir, tmp_path / "run2", **{"checkpoint.dir": str(tmp_path / "file"),
                                                           "checkpoint.every": 2})
    job = run_train(tmp_path, 1, *over, expect=2, name="logs2")
    assert f"checkpoint.dir='{tmp_path / 'file'}' is a file, not a directory" in job.output()
    assert (tmp_path / "file").read_text() == "keep me"
    # on CPU without the interpreter (kernel test files set TRITON_INTERPRET=1 in the worker's environment)
    over = tiny_overrides(data_dir, tmp_path / "run3", **{"expert_backend": "triton"})
    with Ranks(train_argv(None, *over), 1, tmp_path / "logs3", {"TRITON_INTERPRET": "0"}) as job:
        rcs = job.wait(120)
        assert rcs == [2], job.report(rcs, 2)
    assert "expert_backend=triton needs a CUDA GPU (this run has none)" in job.output()


def test_fresh_start_supersedes_a_run_killed_before_its_first_checkpoint(tmp_path, data_dir):
    """Such a run leaves scalars and no checkpoint; a new run there starts from scratch, and its steps replace the
    old ones in TensorBoard (purge) and in metrics.jsonl (a start event), also the steps it never reaches."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    old = SummaryWriter(str(run / "tensorboard"))
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 21):
            old.add_scalar("train/loss", 100.0 + step, step)
            f.write(json.dumps({"step": step, "train/loss": 100.0 + step}) + "\n")
    old.close()
    run_train(tmp_path, 1, *tiny_overrides(data_dir, run, **{"train.steps": 3, "log.expert_stats_every": 0}))
    rows = read_jsonl(run)
    assert sorted(rows) == [1, 2, 3] and all(r["train/loss"] < 100 for r in rows.values()), rows
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    tb = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert tb == pytest.approx({s: r["train/loss"] for s, r in rows.items()}), tb


def test_expert_usage_sums_the_models_counts_over_micro_batches():
    """ExpertUsage adds each micro-batch's per-layer counts (fp64 on the device) and summarize() resets them."""
    import torch

    from moeut_ds import LanguageModel
    from moeut_ds.train.metrics import ExpertUsage

    cfg = get_preset("moeut-tiny").replace(vocab_size=64)
    model = LanguageModel(cfg, "reference").train()
    usage = ExpertUsage(cfg, torch.device("cpu"))
    assert set(usage.counts) == set(cfg.routers)
    want = {k: torch.zeros_like(c) for k, c in usage.counts.items()}
    for seed in range(3):
        out = model(torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed)),
                    return_expert_counts=True)
        usage.update(out.expert_counts)
        for g, layer in enumerate(out.expert_counts):
            for kind, c in layer.items():
                want[kind][g] += c.double()
    for kind in want:
        assert torch.equal(usage.counts[kind], want[kind]) and want[kind].sum() > 0
    scalars, images = usage.summarize()
    assert all(c.sum() == 0 for c in usage.counts.values())
    assert set(images) == {f"experts/usage_{k}" for k in cfg.routers}
