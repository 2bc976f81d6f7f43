"""Exact resume after kill -9 (also during a save), SIGTERM -> checkpoint + exit 75, resume refusals."""
from __future__ import annotations

import json
import signal
import time

import pytest

from dist_harness import Ranks, data_dir, read_jsonl, run_train, seed_run_from, tiny_overrides, train_argv  # noqa: F401

from moeut_ds.train import PREEMPTED_EXIT_CODE
from moeut_ds.train import checkpoint as ckpt

STEPS = 10


def _over(data_dir, run, **extra):
    base = {"train.steps": STEPS, "checkpoint.every": 3, "checkpoint.keep_last": 5, "log.expert_stats_every": 0,
            "optim.grad_clip": 0.5}
    base.update(extra)
    return tiny_overrides(data_dir, run, **base)


def _wait_for(pred, job: Ranks, timeout: float = 120) -> None:
    t0 = time.time()
    while not pred():
        assert time.time() - t0 < timeout, job.output()
        assert all(p.poll() is None for p in job.procs), f"exited early:\n{job.output()}"
        time.sleep(0.1)


@pytest.mark.slow
def test_kill9_mid_save_then_resume_reproduces_losses_bitwise(tmp_path, data_dir):
    run_train(tmp_path, 2, *_over(data_dir, tmp_path / "ref"), name="ref")
    ref = read_jsonl(tmp_path / "ref")

    run = tmp_path / "run"
    cdir = run / "checkpoints"
    with Ranks(train_argv(None, *_over(data_dir, run, **{"debug.save_pause_step": 6})), 2, tmp_path / "a") as job:
        _wait_for(lambda: (cdir / ".tmp-step00000006" / ckpt.STATE_FILE).is_file(), job)
        job.kill()                                    # kill -9 every rank in the middle of the step-6 save
    assert (cdir / ckpt.LATEST).read_text() == "step00000003"
    assert ckpt.newest_checkpoint(cdir).name == "step00000003"
    assert not (cdir / "step00000006").exists()
    run_train(tmp_path, 2, *_over(data_dir, run), name="b")          # --resume auto
    got = read_jsonl(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step]["train/loss"] == ref[step]["train/loss"], step        # bitwise (fp32 CPU)
        assert got[step]["train/grad_norm"] == ref[step]["train/grad_norm"], step
    assert got[STEPS]["compute/fwd_macs_total"] == ref[STEPS]["compute/fwd_macs_total"]
    assert "resumed from" in (tmp_path / "b" / "rank0.log").read_text()
    assert [p.name for p in ckpt.complete_checkpoints(cdir)] == ["step00000003", "step00000006", "step00000009",
                                                                 "step00000010"]


@pytest.mark.slow
def test_background_saves_survive_kill9_and_hold_the_state_of_their_step(tmp_path, data_dir):
    """checkpoint.async_save with DeepSpeed (ZeRO-2, 2 ranks): the step-6 save waits 30 s before its threads write
    (test hook) while training goes on. kill -9 then leaves step 3 the newest; the resume (saving in the background
    again, step 6 again deferred past steps 7-8) and a run from that step-6 checkpoint both reproduce the
    uninterrupted run's losses bitwise, so the deferred files hold step 6's state, not a later one."""
    run_train(tmp_path, 2, *_over(data_dir, tmp_path / "ref"), name="ref")
    ref = read_jsonl(tmp_path / "ref")

    run = tmp_path / "run"
    cdir = run / "checkpoints"
    over = _over(data_dir, run, **{"checkpoint.async_save": True, "debug.save_pause_step": 6})
    with Ranks(train_argv(None, *over), 2, tmp_path / "a") as job:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and max(read_jsonl(run), default=0) >= 8, job)
        job.kill()                                    # kill -9 every rank while the step-6 save is pending
    assert (cdir / ".tmp-step00000006").is_dir() and not (cdir / "step00000006").exists()
    assert ckpt.newest_checkpoint(cdir).name == "step00000003"
    job = run_train(tmp_path, 2, *over, name="b")                    # --resume auto, from step 3
    assert "state copied to host memory" in job.output()
    assert [p.name for p in ckpt.complete_checkpoints(cdir)] == ["step00000003", "step00000006", "step00000009",
                                                                 "step00000010"]
    seed_run_from(cdir / "step00000006", tmp_path / "from6")
    run_train(tmp_path, 2, *_over(data_dir, tmp_path / "from6"), name="c")
    for got, first in ((read_jsonl(run), 1), (read_jsonl(tmp_path / "from6"), 7)):
        assert sorted(got) == list(range(first, STEPS + 1))
        for step in range(first, STEPS + 1):
            assert got[step]["train/loss"] == ref[step]["train/loss"], step        # bitwise (fp32 CPU)
            assert got[step]["train/grad_norm"] == ref[step]["train/grad_norm"], step


@pytest.mark.slow
def test_kill9_mid_step_and_sigterm_exit_75(tmp_path, data_dir):
    run = tmp_path / "run"
    over = _over(data_dir, run, **{"debug.step_sleep": 0.5, "train.steps": 40})
    with Ranks(train_argv(None, *over), 2, tmp_path / "a") as job:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_jsonl(run)) >= 4, job)
        job.kill()                                    # kill -9 between checkpoints
    assert ckpt.newest_checkpoint(run / "checkpoints").name == "step00000003"
    with Ranks(train_argv(None, *over), 2, tmp_path / "b") as job:
        _wait_for(lambda: max(read_jsonl(run)) >= 5, job)
        job.signal(signal.SIGTERM, ranks=[1])        # one rank told; all must stop at the same step
        rcs = job.wait(120)
    assert rcs == [PREEMPTED_EXIT_CODE] * 2, job.report(rcs, PREEMPTED_EXIT_CODE)
    last = max(read_jsonl(run))
    newest = ckpt.newest_checkpoint(run / "checkpoints")
    assert newest.name == ckpt.tag_for(last) and ckpt.read_state(newest)["step"] == last
    assert "exiting with 75" in job.output()


def test_resume_refusals(tmp_path, data_dir, trained_run):
    cdir = trained_run / "checkpoints"
    with pytest.raises(Exception, match="model config differs .*d_model: saved 64 vs now 96"):
        st = ckpt.read_state(ckpt.newest_checkpoint(cdir))
        ckpt.check_compatible(st, {**st["model_config"], "d_model": 96}, 2, 2, cdir)
    ckpt.check_compatible(st, st["model_config"], 1, 2, cdir)       # ZeRO-1/2: another world size is resharded
    with pytest.raises(Exception, match="saved with world size 2, this run has 1"):
        ckpt.check_compatible({**st, "zero_stage": 3}, st["model_config"], 1, 3, cdir)
    with pytest.raises(Exception, match="saved without expert parallelism and this run is with it"):
        ckpt.check_compatible(st, st["model_config"], 2, 2, cdir, experts_sharded=True)
    with pytest.raises(Exception, match="ZeRO stage 2, this run uses stage 3"):
        ckpt.check_compatible(st, st["model_config"], 2, 3, cdir)
    assert len(st["tokenizer_sha256"]) == 64                       # saved with every checkpoint
    ckpt.check_compatible(st, st["model_config"], 2, 2, cdir, tokenizer_sha256=st["tokenizer_sha256"])
    with pytest.raises(Exception, match="tokenized with another tokenizer .*--tokenizer OLD_DATA"):
        ckpt.check_compatible(st, st["model_config"], 2, 2, cdir, tokenizer_sha256="0" * 64)
    with pytest.raises(Exception, match="--resume none but .* already holds checkpoints"):
        ckpt.resolve_resume("none", cdir)
    with pytest.raises(Exception, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path), cdir)
    # end to end: the CLI prints the message and exits 2
    over = tiny_overrides(data_dir, trained_run, **{"model.d_model": 96, "model.d_head": 24})
    job = run_train(tmp_path, 1, *over, expect=2, name="mismatch")
    assert "the model config differs" in job.output()


from dist_harness import trained_run  # noqa: E402,F401


@pytest.mark.slow
def test_zero2_resume_on_another_number_of_ranks_continues_the_same_losses(tmp_path, data_dir, trained_run):
    """The shared 2-rank ZeRO-2 run saved at step 5; resume it on 1 rank (DeepSpeed's universal format) and compare
    steps 6-10 with the uninterrupted run (same global batch: 1 rank accumulates twice as many micro-batches)."""
    run = tmp_path / "one-rank"
    seed_run_from(trained_run / "checkpoints" / "step00000005", run)
    run_train(tmp_path, 1, *tiny_overrides(data_dir, run, **{"eval.every": 5, "checkpoint.every": 5,
                                                             "log.peak_tflops": 1.0}))
    want, got = read_jsonl(trained_run), read_jsonl(run)
    assert sorted(s for s in got if "train/loss" in got[s]) == list(range(6, 11))
    for step in range(6, 11):
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)
    assert (run / "checkpoints" / "step00000005" / "universal").is_dir()     # converted once, kept beside the original


def _copy_run(trained_run, dest):
    import shutil
    shutil.copytree(trained_run / "checkpoints", dest / "checkpoints")
    return dest / "checkpoints"


@pytest.mark.slow
def test_damaged_and_stale_checkpoints_are_refused_with_the_fix(tmp_path, trained_run):
    cdir = _copy_run(trained_run, tmp_path)
    s5, s10 = cdir / "step00000005", cdir / "step00000010"
    state = ckpt.read_state(s10)
    ckpt.verify_files(s10, state)                                     # intact: passes
    optim = sorted(s10.glob("*optim_states.pt"))
    assert len(optim) == 2
    assert sorted(state[ckpt.DIGESTS]) == sorted(str(f.relative_to(s10)) for f in s10.rglob("*")
                                                 if f.is_file() and f.name != ckpt.STATE_FILE)
    good = optim[1].read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2:len(good) // 2 + 64] = bytes(b ^ 0xFF for b in flipped[len(good) // 2:len(good) // 2 + 64])
    optim[1].write_bytes(bytes(flipped))                              # same size, a zip directory that still opens
    with pytest.raises(Exception, match=f"{s10} is damaged .*{optim[1].name} does not match the sha256 .*move "
                                        f"step00000010 out of .*{s5}, is then the newest"):
        ckpt.verify_files(s10, state)
    # two ranks share the hashing: exactly one of them hashes this file and finds it (no process group here, so
    # each sees only its own findings)
    found = []
    for rank in (0, 1):
        try:
            ckpt.verify_files(s10, state, rank, 2)
        except Exception as e:
            found.append((rank, str(e)))
    assert len(found) == 1 and optim[1].name in found[0][1], found
    optim[1].write_bytes(good)
    rng = s10 / "rng_rank1.json"
    rng_good = rng.read_text()
    rng.write_text(rng_good[:-20])                                    # a corrupt RNG file: refused up front too
    with pytest.raises(Exception, match="damaged \\(rng_rank1.json: "):
        ckpt.verify_files(s10, state)
    rng.write_text(rng_good)
    ckpt.verify_files(s10, state)
    optim[1].write_bytes(optim[1].read_bytes()[:1000])                # truncated
    with pytest.raises(Exception, match=f"{s10} is damaged .*{optim[1].name}.*{s5}"):
        ckpt.verify_files(s10, state)
    optim[1].unlink()                                                 # missing
    with pytest.raises(Exception, match="1 DeepSpeed optimizer-state files for the 2 ranks"):
        ckpt.verify_files(s10, state)
    (s10 / ckpt.STATE_FILE).write_text('{"step": 10, "wor')
    with pytest.raises(Exception, match=f"damaged \\({ckpt.STATE_FILE}: .*{s5}"):
        ckpt.read_state(s10)
    # resuming step 5 where step 10 exists would overwrite or prune step 10
    with pytest.raises(Exception, match="step00000005 is older than step00000010 .*new run_dir"):
        ckpt.check_no_newer(s5, cdir)
    ckpt.check_no_newer(s10, cdir)
    # export and evaluate read checkpoints too: the same message, exit 2
    import subprocess
    import sys
    from dist_harness import REPO
    for tool in (["moeut_ds.export", str(s10), "--out", str(tmp_path / "exported")],
                 ["moeut_ds.evaluate", str(s10), "--blimp", "none", "--data", str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", *tool], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "is damaged" in r.stderr and "Traceback" not in r.stderr, (tool, r.stderr)


@pytest.mark.slow
def test_damaged_newest_checkpoint_stops_every_rank_with_exit_2(tmp_path, data_dir, trained_run):
    import glob
    cdir = _copy_run(trained_run, tmp_path / "run")
    model_states = cdir / "step00000010" / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])
    over = tiny_overrides(data_dir, tmp_path / "run", **{"eval.every": 5, "checkpoint.every": 5,
                                                         "log.peak_tflops": 1.0, "train.steps": 12})
    with Ranks(train_argv(None, *over), 2, tmp_path / "logs") as job:
        rcs = job.wait(120)
        assert rcs == [2, 2], job.report(rcs, 2)
        assert "mp_rank_00_model_states.pt" in job.output() and f"{cdir / 'step00000005'}, is then the newest" \
            in job.output()
        # the refused ranks released DeepSpeed's CPU all-reduce segments themselves (before the harness cleans up)
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{job.port}_*")


@pytest.mark.slow
def test_resume_with_a_new_lr_and_more_steps_follows_the_new_schedule(tmp_path, data_dir, trained_run):
    from moeut_ds.train.schedule import lr_factor

    run = tmp_path / "run"
    seed_run_from(trained_run / "checkpoints" / "step00000005", run)
    over = tiny_overrides(data_dir, run, **{"eval.every": 5, "checkpoint.every": 5, "log.peak_tflops": 1.0,
                                            "optim.lr": 1e-3, "train.steps": 8})
    job = run_train(tmp_path, 2, *over)
    assert "changed since the checkpoint: optim.lr 0.003 -> 0.001, train.steps 10 -> 8" in job.output()
    got = read_jsonl(run)
    for step in range(6, 9):                                          # warm-up 2, cosine to 0.1 x lr at step 8
        assert got[step]["train/lr"] == pytest.approx(1e-3 * lr_factor(step - 1, 2, 8, 0.1), rel=1e-12), step


def test_rank_outside_the_world_is_refused_before_the_rendezvous(tmp_path, data_dir):
    import os
    import subprocess
    import sys

    from dist_harness import REPO

    for env, msg in [({"RANK": "3", "WORLD_SIZE": "2"}, "need 0 <= RANK < WORLD_SIZE"),
                     ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer")]:
        r = subprocess.run(train_argv(None, *tiny_overrides(data_dir, tmp_path / "run")), cwd=REPO, timeout=120,
                           env={**os.environ, "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
                                "CUDA_VISIBLE_DEVICES": "", **env}, capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_incomplete_step_directories_are_refused_and_pruning_leaves_none(tmp_path, monkeypatch):
    """A stepNNNNNNNN without trainer_state.json (a copy cut short) would be skipped by --resume auto and collide
    with the save of its step: refused, named. The trainer's own pruning deletes through a .tmp- name, so a kill
    in the middle of it leaves nothing that looks like a step."""
    import shutil

    cdir = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (cdir / ckpt.tag_for(step)).mkdir(parents=True)
        (cdir / ckpt.tag_for(step) / ckpt.STATE_FILE).write_text("{}")
    (cdir / ckpt.LATEST).write_bytes(b"\xff\xfe not utf-8")                 # unreadable: counts as stale
    assert ckpt.newest_checkpoint(cdir).name == "step00000003"
    (cdir / "step00000003" / ckpt.STATE_FILE).unlink()
    for resume in ("auto", "none", str(cdir)):
        with pytest.raises(Exception, match=f"{cdir} holds step00000003 without {ckpt.STATE_FILE}: .*Move it out"):
            ckpt.resolve_resume(resume, cdir)
    assert ckpt.resolve_resume(str(cdir / "step00000002"), tmp_path / "elsewhere").name == "step00000002"
    shutil.rmtree(cdir / "step00000003")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt                                          # a kill in the middle of the delete
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(cdir, keep_last=1, keep_every=0)
    assert ckpt.incomplete_checkpoints(cdir) == [] and (cdir / ".tmp-pruned-step00000001").is_dir()
    assert ckpt.resolve_resume("auto", cdir).name == "step00000002"


def test_verify_files_wants_every_partition_and_expert_shard(tmp_path):
    """ZeRO-3 writes one model-state file per rank; an expert-parallel save one expert shard file per ep rank."""
    import zipfile

    tag = tmp_path / "step00000004"
    (tag / "experts").mkdir(parents=True)

    def pt(name):
        with zipfile.ZipFile(tag / name, "w") as z:
            z.writestr("data.pkl", b"x")
    for r in (0, 1):
        pt(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    pt("zero_pp_rank_0_mp_rank_00_model_states.pt")
    state = {"zero_stage": 3, "world_size": 2}
    with pytest.raises(Exception, match="1 DeepSpeed model-state files for the 2 ranks"):
        ckpt.verify_files(tag, state)
    pt("zero_pp_rank_1_mp_rank_00_model_states.pt")
    ckpt.verify_files(tag, state)
    (tag / "experts" / "shard0-of-2.safetensors").write_bytes(b"")
    with pytest.raises(Exception, match="expert shard file\\(s\\) missing: shard1-of-2.safetensors"):
        ckpt.verify_files(tag, {**state, "experts_sharded": True, "expert_parallel_size": 2})


def test_world_size_change_is_refused_outside_zero_1_and_2(tmp_path):
    state = {"model_config": {"d_model": 8}, "world_size": 2, "zero_stage": 0, "run_config": {}}
    for stage in (0, 3):
        with pytest.raises(Exception, match="saved with world size 2, this run has 1, and only ZeRO-1/2 checkpoints "
                                            "are converted .*resume with 2 ranks"):
            ckpt.check_compatible({**state, "zero_stage": stage}, {"d_model": 8}, 1, stage, tmp_path)
    ckpt.check_compatible({**state, "zero_stage": 2}, {"d_model": 8}, 1, 2, tmp_path)


def test_file_digest_hashes_blocks_and_sees_every_byte(tmp_path):
    """The checkpoint digest: sha256 over the sha256s of fixed-size blocks (hashed in threads), the last one short."""
    import hashlib
    import os

    data = os.urandom(1000)
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    blocks = [hashlib.sha256(data[i:i + 64]).digest() for i in range(0, 1000, 64)]
    assert ckpt.file_digest(f, block=64) == hashlib.sha256(b"".join(blocks)).hexdigest()
    for i in (0, 500, 999):
        f.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1:])
        assert ckpt.file_digest(f, block=64) != hashlib.sha256(b"".join(blocks)).hexdigest(), i


class _Engine:
    """What DeepSpeed's engine does in save_checkpoint on one rank: its files through its checkpoint engine."""

    def __init__(self, rank: int, weights):
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine, self.rank, self.weights = TorchCheckpointEngine(), rank, weights

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        from pathlib import Path

        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"optimizer_state_dict": {"fp32": [self.weights]}},
                                    str(Path(save_dir) / tag / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"))


def test_every_rank_fsyncs_the_files_it_wrote(tmp_path, monkeypatch):
    """On a file system shared by nodes only the writer's node can flush a file: rank 1 fsyncs its own files and
    leaves the rename to rank 0. DeepSpeed's own checkpoint engine is back in place after the save."""
    from pathlib import Path

    import torch

    synced, fsync = [], ckpt._fsync_path
    monkeypatch.setattr(ckpt, "_fsync_path", lambda p: (synced.append(Path(p).name), fsync(p)))
    engine = _Engine(1, torch.zeros(3))
    default = engine.checkpoint_engine
    saver = ckpt.Saver(engine, tmp_path, rank=1, keep_last=2, keep_every=0)
    assert saver.start(4, {"step": 4}) and not saver.writing()
    path, total, phases = saver.commit()
    assert sorted(synced) == ["rng_rank1.json", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not path.exists() and sorted(phases) == ["commit", "digests", "fsync", "write"]
    assert engine.checkpoint_engine is default


def test_background_save_writes_the_state_of_its_step_and_commits_after_the_thread(tmp_path, monkeypatch):
    """async_save: start() copies the state; the thread writes it later (after the test hook's pause here), so
    weights changed in the meantime must not reach the file. Until the commit the previous checkpoint is the
    newest. A failed write is reported by commit() and leaves the previous checkpoint in place."""
    import torch

    weights = torch.zeros(3)
    saver = ckpt.Saver(_Engine(0, weights), tmp_path, rank=0, keep_last=5, keep_every=0, background=True)
    optim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    for step in (2, 4):
        assert saver.start(step, {"step": step}, pause_s=0.5 if step == 4 else 0.0)
        assert saver.writing() or step == 2
        weights += 1                                          # training goes on
        if step == 4:
            assert ckpt.newest_checkpoint(tmp_path).name == "step00000002"
            assert not (tmp_path / ".tmp-step00000004" / optim).exists()
        path, total, phases = saver.commit()
        assert sorted(phases) == ["commit", "copy", "digests", "fsync", "write"] and path.name == ckpt.tag_for(step)
    assert (tmp_path / ckpt.LATEST).read_text() == "step00000004"
    saved = torch.load(tmp_path / "step00000004" / optim)["optimizer_state_dict"]["fp32"][0]
    assert torch.equal(saved, torch.ones(3))                  # step 4's weights, not the later 2s
    state = json.loads((tmp_path / "step00000004" / ckpt.STATE_FILE).read_text())
    assert sorted(state[ckpt.DIGESTS]) == ["rng_rank0.json", optim]
    assert state[ckpt.DIGESTS][optim] == ckpt.file_digest(tmp_path / "step00000004" / optim)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    assert saver.start(6, {"step": 6})
    with pytest.raises(RuntimeError, match="step00000006 was not saved .*rank 0: OSError: .*No space left on device"
                                           ".*previous checkpoint is still the newest"):
        saver.commit()
    assert ckpt.newest_checkpoint(tmp_path).name == "step00000004" and saver.pending is None


def test_a_deepspeed_checkpoint_writer_in_the_ds_config_is_refused(tmp_path):
    import torch

    engine = _Engine(0, torch.zeros(1))
    engine.checkpoint_engine = object()
    with pytest.raises(Exception, match="selects DeepSpeed's object: moeut_ds writes checkpoints itself"):
        ckpt.Saver(engine, tmp_path, rank=0, keep_last=1, keep_every=0).start(1, {"step": 1})
