"""train.compile=true: the compiled model trains to the same per-step losses and gradient norms as the eager one;
so does train.cuda_graphs=true, whose gradient buffers and graph generations (torch itself skips CUDA graphs on a
CPU) must not change what DeepSpeed accumulates over the micro-batches.

CPU, one rank, the Triton expert backend under TRITON_INTERPRET=1 (compile needs it: see the trainer's check).
Inductor compiles the forward and backward once per compiled run (no eval); the three runs take about two minutes
on two cores. The expert-usage scalars come from counts that the compiled forward returns: they are compared too.
With expert parallelism (two ranks, the all-gather dispatch) compiled training matches eager too. The last
test needs a CUDA GPU: there the graphs are replayed for real."""
from __future__ import annotations

import pytest
import torch

from dist_harness import Ranks, data_dir, read_jsonl, run_train, tiny_overrides, train_argv  # noqa: F401


def expert_scalars(rows: dict[int, dict]) -> dict[int, dict[str, float]]:
    """Step -> its experts/* scalars (usage entropy and unused fraction per layer and router), where logged."""
    got = {s: {k: v for k, v in r.items() if k.startswith("experts/")} for s, r in rows.items()}
    return {s: d for s, d in got.items() if d}


def assert_same_usage(got: dict, want: dict, tol: float) -> None:
    """The same usage up to a rare flip of a near-tied top-k pick. Fails on missing, zero or garbage counts. In a
    simulation of these runs' window sizes (8 experts, random skewed loads), one moved pick changes an entropy by
    at most 3.3e-3 (CPU test: 512 picks per window) or 1.0e-3 (GPU test: 2048), and one micro-batch's counts
    replaced by another's (stale graph outputs) by a median 8e-3 / 2e-3: tol sits between."""
    assert got.keys() == want.keys() and all(got[s].keys() == want[s].keys() for s in got), (got, want)
    for s in got:
        for k, v in got[s].items():
            assert v == pytest.approx(want[s][k], abs=tol), (s, k, got[s], want[s])


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, data_dir):
    curves, usage = {}, {}
    cache = tmp_path / "inductor_cache"
    modes = {"false": {"train.compile": "false"}, "true": {"train.compile": "true"},
             "graphs": {"train.compile": "true", "train.cuda_graphs": "true"}}
    for mode, extra in modes.items():
        # ZeRO-1 and 2 micro-batches per step: DeepSpeed leaves the gradients in param.grad between them. One layer
        # applied twice (its parameters twice in the compiled graph); the interpreted kernels, not Inductor, are
        # most of the time here (~7 s per micro-batch at the default 4 layers), hence the small run.
        over = tiny_overrides(data_dir, tmp_path / mode, **{
            "train.steps": 2, "train.global_batch": 4, "model.n_layers": 2, "model.group_size": 1,
            "expert_backend": "triton", "eval.at_end": "false", "log.expert_stats_every": 1,
            "deepspeed_config": "ds_configs/zero1.json", **extra})
        env = {"TRITON_INTERPRET": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        with Ranks(train_argv(None, *over), 1, tmp_path / f"logs_{mode}", env) as job:
            rcs = job.wait(900)
            assert rcs == [0], job.report(rcs)
        rows = read_jsonl(tmp_path / mode)
        curves[mode] = [(rows[s]["train/loss"], rows[s]["train/grad_norm"]) for s in sorted(rows)]
        usage[mode] = expert_scalars(rows)
    assert len(curves["true"]) == 2 and curves["graphs"] == curves["true"]
    assert len(usage["false"]) == 2 and usage["graphs"] == usage["true"]
    assert_same_usage(usage["true"], usage["false"], tol=5e-3)
    # the trainer compiled without Inductor's on-disk graph caches (compile_without_graph_cache): nothing cached
    assert cache.is_dir() and any(cache.iterdir()), "Inductor wrote nothing there: the run used another cache"
    assert not any(p.is_file() for sub in ("fxgraph", "aotautograd") for p in (cache / sub).rglob("*")), \
        sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())[:20]
    for (loss_c, norm_c), (loss_e, norm_e) in zip(curves["true"], curves["false"]):
        assert loss_c == pytest.approx(loss_e, rel=1e-5) and norm_c == pytest.approx(norm_e, rel=1e-4), curves


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (kind nvidia-h200-x2)")


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=TWO_GPUS)])
def test_compiled_expert_parallel_matches_eager(tmp_path, data_dir, device):
    """train.compile=true with expert parallelism (ep = 2, the all-gather dispatch, two ranks: gloo on CPU, NCCL on
    two GPUs): dynamo traces the dispatch's all_gather and reduce_scatter into the graph, and the compiled run gives
    the eager run's losses, gradient norms, expert statistics and dispatch bytes. The model compiles once, without
    graph breaks: the dispatch's traffic counters are a device tensor (CommStats), not Python ints that a compiled
    forward would guard on and recompile for at every step. fp32 on both; on a GPU Inductor's fused kernels round
    differently from eager's, hence the looser tolerances there."""
    env = {"TORCH_LOGS": "graph_breaks,recompiles", **({"TRITON_INTERPRET": "1"} if device == "cpu" else
                                                        {"CUDA_VISIBLE_DEVICES": "0,1", "DS_ACCELERATOR": "cuda"})}
    rel_loss, rel_norm = (1e-5, 1e-4) if device == "cpu" else (1e-4, 1e-3)
    rows, logs = {}, {}
    for mode in ("false", "true"):
        over = tiny_overrides(data_dir, tmp_path / mode, **{
            "train.steps": 3, "train.global_batch": 4, "train.micro_batch": 1, "model.n_layers": 2,
            "model.group_size": 1, "expert_backend": "triton", "expert_parallel_size": 2,
            "expert_dispatch": "allgather", "eval.at_end": "false", "log.expert_stats_every": 1,
            "deepspeed_config": "ds_configs/zero1.json", "train.compile": mode})
        with Ranks(train_argv(None, *over), 2, tmp_path / f"logs_{mode}", env) as job:
            rcs = job.wait(900)
            assert rcs == [0, 0], job.report(rcs)
            logs[mode] = job.logs[0].read_text(errors="replace")
        rows[mode] = read_jsonl(tmp_path / mode)
    assert "Recompiling" not in logs["true"] and "Graph break" not in logs["true"], logs["true"][-3000:]
    assert sorted(rows["true"]) == sorted(rows["false"]) == [1, 2, 3]
    for s in (1, 2, 3):
        got, want = rows["true"][s], rows["false"][s]
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=rel_loss), (s, got, want)
        assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=rel_norm), (s, got, want)
        assert got["comm/expert_alltoall_bytes_per_step"] == want["comm/expert_alltoall_bytes_per_step"] > 0
    assert_same_usage(expert_scalars(rows["true"]), expert_scalars(rows["false"]), tol=5e-3)


@pytest.mark.parametrize("world,extra,message", [
    (1, {"deepspeed_config": "ds_configs/zero3.json"}, "train.compile=true works with ZeRO stages 0-2"),
    (1, {"expert_backend": "reference"}, "train.compile=true needs the triton expert backend"),
    (2, {"expert_parallel_size": 2, "expert_dispatch": "alltoall", "expert_backend": "triton"},
     "train.compile=true with expert parallelism needs expert_dispatch=allgather"),
    (2, {"expert_parallel_size": 2, "train.cuda_graphs": "true", "expert_backend": "triton"},
     "train.cuda_graphs=true is not supported with expert parallelism"),
])
def test_compile_refusals(tmp_path, data_dir, world, extra, message):
    over = tiny_overrides(data_dir, tmp_path / "run", **{"train.compile": "true", **extra})
    job = run_train(tmp_path, world, *over, expect=2)
    assert message in job.output()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (CPU: the test above runs "
                    "the same gradient handling without the graphs)")
@pytest.mark.parametrize("ds_config,world", [
    ("ds_configs/zero0.json", 1), ("ds_configs/zero1_bf16.json", 1), ("ds_configs/zero2_bf16.json", 1),
    pytest.param("ds_configs/zero1_bf16.json", 2, marks=TWO_GPUS),
    pytest.param("ds_configs/zero2_bf16.json", 2, marks=TWO_GPUS)])
def test_cuda_graphs_train_like_compiled_on_gpu(tmp_path, data_dir, ds_config, world):
    """On a GPU, train.cuda_graphs replays the graphs (torch logs no skip) and gives the compiled run's losses,
    gradient norms and validation losses over steps whose micro-batches replay them: a gradient adopted from a
    graph's static output and overwritten by the next replay would change the norms. Validation (4 batches, twice)
    records its graph once, not once per batch. On two GPUs ZeRO-1/2 all-reduce the graphs' gradients (NCCL) at
    the last micro-batch."""
    curves, usage = {}, {}
    for mode, extra in {"compiled": {}, "graphs": {"train.cuda_graphs": "true"}}.items():
        over = tiny_overrides(data_dir, tmp_path / mode, **{
            "train.steps": 4, "train.compile": "true", "expert_backend": "triton", "eval.every": 2,
            "eval.at_end": "true", "eval.batch": 4, "eval.max_windows": 16, "log.expert_stats_every": 2,
            "deepspeed_config": ds_config, **extra})
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(world))), "DS_ACCELERATOR": "cuda",
               "TORCH_LOGS": "perf_hints,cudagraphs"}
        with Ranks(train_argv(None, *over), world, tmp_path / f"logs_{mode}", env) as job:
            rcs = job.wait(900)
            assert rcs == [0] * world, job.report(rcs)
            log = job.logs[0].read_text(errors="replace")
            assert "skipping cudagraphs" not in log, log[-3000:]
        if mode == "graphs":   # the training forward and backward, and the validation forward
            recorded = log.count("Recording function=")
            assert 3 <= recorded <= 4, f"{recorded} CUDA graphs recorded"
        rows = read_jsonl(tmp_path / mode)
        curves[mode] = [(rows[s]["train/loss"], rows[s]["train/grad_norm"], rows[s].get("val/loss"))
                        for s in sorted(rows)]
        usage[mode] = expert_scalars(rows)
    assert len(curves["graphs"]) == 4 and None not in (curves["graphs"][1][2], curves["graphs"][3][2])
    for (loss_g, norm_g, val_g), (loss_c, norm_c, val_c) in zip(curves["graphs"], curves["compiled"]):
        assert loss_g == pytest.approx(loss_c, rel=1e-5) and norm_g == pytest.approx(norm_c, rel=1e-4), curves
        assert val_g == pytest.approx(val_c, rel=1e-5), curves
    assert len(usage["graphs"]) == 2     # steps 2 and 4: counts read from graph outputs that later replays overwrite
    assert_same_usage(usage["graphs"], usage["compiled"], tol=1e-3)
