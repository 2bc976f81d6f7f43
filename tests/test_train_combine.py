"""expert_combine=atomic through the trainer: the σ-MoE MLP's sums made by atomics (moeut_kernels.gated_mlp) train
like the default fixed-order sums, and a run that cannot use them is refused before it starts.

CPU, one rank, the Triton expert backend under TRITON_INTERPRET=1 (fp32: the interpreter has no bf16 atomics;
tests/test_kernels_gluon.py checks the bf16 sums on a GPU)."""
from __future__ import annotations

import pytest

from dist_harness import Ranks, data_dir, read_jsonl, run_train, tiny_overrides, train_argv  # noqa: F401


@pytest.mark.slow
def test_atomic_combine_trains_like_buffer(tmp_path, data_dir):
    """Three steps with each combine: the same losses and gradient norms up to the order of fp32 adds (K = 3
    experts per token, so that the order matters), and the model really got the atomic combine."""
    rows, logs = {}, {}
    for combine in ("buffer", "atomic"):
        # two layers, two micro-batches per step: the interpreted kernels take most of the time
        over = tiny_overrides(data_dir, tmp_path / combine, **{
            "train.steps": 3, "train.global_batch": 4, "model.n_layers": 2, "model.group_size": 1,
            "expert_backend": "triton", "expert_combine": combine, "model.ff_k": 3, "eval.at_end": "false"})
        with Ranks(train_argv(None, *over), 1, tmp_path / f"logs_{combine}", {"TRITON_INTERPRET": "1"}) as job:
            rcs = job.wait(900)
            assert rcs == [0], job.report(rcs)
        logs[combine] = job.output()
        rows[combine] = read_jsonl(tmp_path / combine)
    assert "(combine=atomic)" in logs["atomic"] and "(combine=buffer)" in logs["buffer"]
    assert sorted(rows["atomic"]) == sorted(rows["buffer"]) == [1, 2, 3]
    for s in (1, 2, 3):
        got, want = rows["atomic"][s], rows["buffer"][s]
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5), (s, got, want)
        assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=1e-4), (s, got, want)


def test_atomic_combine_without_the_triton_backend_is_refused(tmp_path, data_dir):
    """expert_backend=auto on a machine without a GPU gives the reference backend, which has no atomic combine."""
    over = tiny_overrides(data_dir, tmp_path / "run", **{"expert_combine": "atomic"})
    job = run_train(tmp_path, 1, *over, expect=2)
    assert "expert_combine=atomic needs the triton expert backend" in job.output()
