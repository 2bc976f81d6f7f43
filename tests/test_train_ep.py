"""Expert parallelism through the trainer (CPU, gloo): equal to ep=1, resharded resume, export."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_harness import REPO, data_dir, read_jsonl, run_train, seed_run_from, tiny_overrides  # noqa: F401

STEPS = 4


def _over(data_dir, run, **extra):
    base = {"train.steps": STEPS, "train.global_batch": 8, "train.micro_batch": 2, "optim.grad_clip": 0.05,
            "checkpoint.every": 2, "checkpoint.keep_last": 10, "log.expert_stats_every": 2}
    base.update(extra)
    return tiny_overrides(data_dir, run, **base)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    base = tmp_path_factory.mktemp("ep")
    run_train(base, 2, *_over(data_dir, base / "ep1"), name="ep1-logs")
    run_train(base, 2, *_over(data_dir, base / "ep2", expert_parallel_size=2), name="ep2-logs")
    run_train(base, 2, *_over(data_dir, base / "ep2_a2a", expert_parallel_size=2, expert_dispatch="alltoall"),
              name="ep2-a2a-logs")
    run_train(base, 2, *_over(data_dir, base / "ep2_ac", expert_parallel_size=2,
                              **{"train.activation_checkpointing": True}), name="ep2-ac-logs")
    return base


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.slow
@pytest.mark.parametrize("run,dispatch", [("ep2", "allgather"), ("ep2_a2a", "alltoall")])
def test_ep2_losses_and_clipping_norm_equal_ep1(runs, run, dispatch):
    """Either dispatch (auto takes the all-gather at ep=2) trains like ep=1."""
    ep1, ep2 = read_jsonl(runs / "ep1"), read_jsonl(runs / run)
    for step in range(1, STEPS + 1):
        for key in ("train/loss", "train/reg_loss", "train/grad_norm"):
            assert _close(ep1[step][key], ep2[step][key]), (step, key, ep1[step][key], ep2[step][key])
        assert ep2[step]["train/grad_norm"] > 0.05        # clipping was active: the global norm decided the update
    assert ep2[STEPS]["comm/expert_alltoall_bytes_per_step"] > 0
    assert "comm/expert_alltoall_bytes_per_step" not in ep1[STEPS]
    logs = runs / (run.replace("_", "-") + "-logs") / "rank0.log"
    assert f"{dispatch} dispatch" in logs.read_text()


@pytest.mark.slow
def test_ep2_with_activation_checkpointing_equals_ep2(runs):
    """Recomputing a layer application in backward reruns its all-to-alls on every rank in the same order."""
    ep2, ac = read_jsonl(runs / "ep2"), read_jsonl(runs / "ep2_ac")
    for step in range(1, STEPS + 1):
        for key in ("train/loss", "train/reg_loss", "train/grad_norm"):
            assert ac[step][key] == ep2[step][key], (step, key, ac[step][key], ep2[step][key])


@pytest.mark.slow
@pytest.mark.parametrize("world,ep", [(1, 1), (4, 4)])
def test_resume_at_another_ep_and_dp_size_continues_the_same_losses(runs, data_dir, world, ep, tmp_path):
    """Save at ep=2 on 2 ranks (step 2), resume on `world` ranks at ep, compare steps 3-4 with the uninterrupted run."""
    run = tmp_path / "resumed"
    seed_run_from(runs / "ep2" / "checkpoints" / "step00000002", run)
    micro = 8 // (world * 2) if world < 4 else 2
    run_train(tmp_path, world, *_over(data_dir, run, expert_parallel_size=ep, **{"train.micro_batch": micro}))
    want, got = read_jsonl(runs / "ep2"), read_jsonl(run)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert _close(got[step][key], want[step][key]), (step, key, got[step][key], want[step][key])


@pytest.mark.slow
def test_export_of_ep2_checkpoint_equals_ep1_model(runs, tmp_path):
    for name in ("ep1", "ep2"):
        r = subprocess.run([sys.executable, "-m", "moeut_ds.export", str(runs / name), "--out", str(tmp_path / name)],
                           cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    a = load_file(str(tmp_path / "ep1" / "model.safetensors"))
    b = load_file(str(tmp_path / "ep2" / "model.safetensors"))
    assert set(a) == set(b) and any(".ffn.w1" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_ep_config_errors(data_dir, tmp_path):
    job = run_train(tmp_path, 2, *_over(data_dir, tmp_path / "z3", expert_parallel_size=2,
                                        deepspeed_config="ds_configs/zero3.json"), expect=2, name="z3")
    assert "needs ZeRO stage 1 or 2" in job.output()
    job = run_train(tmp_path, 2, *_over(data_dir, tmp_path / "w", expert_parallel_size=4), expect=2, name="w")
    assert "expert_parallel_size=4 does not divide the world size 2" in job.output()
