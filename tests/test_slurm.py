"""The Slurm launcher (launch/slurm.sbatch + launch/slurm_task.sh) on a real two-node Slurm cluster.

The cluster (tests/slurm/cluster.sh: munged, slurmctld, slurmd n1 + n2 on this machine) is started once for the
session and always stopped again, by PID, also when a test fails. Jobs are submitted with `sbatch` of the
project's own launch/slurm.sbatch, exactly as a user would.

Needs root and Slurm (bash tests/slurm/install.sh). Without them these tests skip with the reason, unless
MOEUT_REQUIRE_SLURM=1 (set in CI), which turns the skip into a failure.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SH = ROOT / "tests" / "slurm" / "cluster.sh"
STANDIN = "tests/slurm/standin_trainer.py"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "setpriv")

pytestmark = pytest.mark.slow


class Cluster:
    def __init__(self, directory: str):
        self.dir = directory
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = os.path.join(directory, "slurm.conf")

    def run(self, *args, check=True, timeout=60, **kw):
        return subprocess.run(list(args), env=kw.pop("env", self.env), cwd=kw.pop("cwd", ROOT), text=True,
                              capture_output=True, check=check, timeout=timeout, **kw)

    def job_env(self, **extra):
        env = dict(self.env)
        env.update(MOEUT_PYTHON=sys.executable, MOEUT_MASTER_ADDR="127.0.0.1", MOEUT_LAUNCH_VERBOSE="1",
                   OMP_NUM_THREADS="1")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def sbatch(self, out: Path, args, env, nodes=2, wait=True, extra=(), timeout=600):
        """Submit launch/slurm.sbatch; with wait=True block until the job (including requeues) has ended."""
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1", f"--output={out}", *extra]
        if wait:
            cmd.insert(1, "--wait")
        cmd += ["launch/slurm.sbatch", *map(str, args)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, text=True, capture_output=True, timeout=timeout)
        job_id = proc.stdout.strip().split(";")[0]
        return proc, job_id

    def wait_gone(self, job_id: str, timeout=300):
        t0 = time.time()
        while time.time() - t0 < timeout:
            q = self.run("squeue", "-h", "-j", job_id, check=False)
            if q.returncode != 0 or not q.stdout.strip():
                return
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still in the queue after {timeout}s:\n{q.stdout}")

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        m = re.search(rf"\b{field}=(\S+)", out)
        return m.group(1) if m else ""


def _require_or_skip(reason: str):
    if os.environ.get("MOEUT_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason} (MOEUT_REQUIRE_SLURM=1: the Slurm tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        _require_or_skip(f"Slurm/munge not installed (missing {', '.join(missing)}): "
                         "run `sudo bash tests/slurm/install.sh` (Debian/Ubuntu) to enable these tests")
    if os.geteuid() != 0:
        _require_or_skip("the local Slurm cluster needs root (slurmd and munged run as root/munge)")
    directory = tempfile.mkdtemp(prefix="moeut-slurm-", dir="/tmp")
    try:
        start = subprocess.run(["bash", str(CLUSTER_SH), "start", directory], text=True, capture_output=True,
                               timeout=120)
        if start.returncode != 0:
            pytest.fail(f"cluster.sh start failed:\n{start.stdout}\n{start.stderr}")
        yield Cluster(directory)
    finally:
        # Always: stop every daemon cluster.sh recorded (it is a no-op for an already stopped cluster).
        stop = subprocess.run(["bash", str(CLUSTER_SH), "stop", directory], text=True, capture_output=True,
                              timeout=120)
        print(stop.stdout, stop.stderr, file=sys.stderr)
        if stop.returncode == 0 and os.environ.get("MOEUT_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(directory, ignore_errors=True)   # logs stay when stopping failed or when asked to keep


def _log(path: Path) -> str:
    return path.read_text() if path.exists() else f"<no log at {path}>"


def _final_loss(text: str) -> str:
    m = re.findall(r"final loss (\S+)", text)
    assert m, f"no final loss in:\n{text}"
    return m[-1]


def test_two_node_job_maps_slurm_env(slurm_cluster, tmp_path):
    (tmp_path / "cfg.yaml").write_text("steps: 8\nstep_seconds: 0.05\n")
    out = tmp_path / "job.out"
    proc, job = slurm_cluster.sbatch(out, [tmp_path / "cfg.yaml", f"run_dir={tmp_path}/run"],
                                     slurm_cluster.job_env(MOEUT_TRAIN_SCRIPT=STANDIN, NCCL_DEBUG="WARN"))
    log = _log(out)
    print(log)
    assert proc.returncode == 0, f"sbatch --wait failed ({proc.returncode}): {proc.stderr}\n{log}"
    # One task per node, ranks from SLURM_PROCID, both nodes used, the rendezvous port derived from the job id.
    port = 20000 + int(job) % 12000
    assert f"node n1 RANK=0/2 LOCAL_RANK=0/1 NODE_RANK=0 MASTER=127.0.0.1:{port}" in log
    assert f"node n2 RANK=1/2 LOCAL_RANK=0/1 NODE_RANK=1 MASTER=127.0.0.1:{port}" in log
    assert "standin: rank 0/2 local_rank 0 on n1" in log and "standin: rank 1/2 local_rank 0 on n2" in log
    assert "passing to the tasks: NCCL_DEBUG" in log
    assert "--resume auto" in log
    assert "training finished (exit 0)" in log
    assert slurm_cluster.job_field(job, "Restarts") == "0"


def test_preempted_job_requeues_and_resumes_to_same_result(slurm_cluster, tmp_path):
    (tmp_path / "cfg.yaml").write_text("steps: 30\nstep_seconds: 0.2\n")
    env = slurm_cluster.job_env(MOEUT_TRAIN_SCRIPT=STANDIN)
    ref_out = tmp_path / "ref.out"
    proc, _ = slurm_cluster.sbatch(ref_out, [tmp_path / "cfg.yaml", f"run_dir={tmp_path}/ref"], env)
    assert proc.returncode == 0, _log(ref_out)

    out = tmp_path / "pre.out"
    run_dir = tmp_path / "pre"
    proc, job = slurm_cluster.sbatch(out, [tmp_path / "cfg.yaml", f"run_dir={run_dir}"], env, wait=False)
    assert proc.returncode == 0, proc.stderr
    progress = run_dir / "progress"
    t0 = time.time()
    while not (progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= 5):
        assert time.time() - t0 < 120, f"job {job} made no progress:\n{_log(out)}"
        time.sleep(0.2)
    # What --signal=B:USR1@N does before a time limit: SIGUSR1 to the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    slurm_cluster.wait_gone(job)
    log = _log(out)
    print(log)
    assert "received SIGUSR1: forwarding to the training tasks" in log
    assert re.search(r"got SIGUSR1, checkpoint at step (\d+), exit 75", log)
    assert f"requeueing job {job} (restart 1)" in log
    assert f"job {job} (moeut) restart 1" in log
    assert re.search(r"standin: resumed from step \d+", log)
    assert "training finished (exit 0)" in log
    assert slurm_cluster.job_field(job, "Restarts") == "1"
    assert slurm_cluster.job_field(job, "JobState") == "COMPLETED"
    assert _final_loss(log) == _final_loss(_log(ref_out))


def test_time_limit_signal_requeues_until_done(slurm_cluster, tmp_path):
    """The real mechanism: --time=1 and --signal=B:USR1@50; Slurm warns each round, the job requeues itself
    and resumes until training is done (stand-in trainer: 45 s of steps, more than one round)."""
    (tmp_path / "cfg.yaml").write_text("steps: 150\nstep_seconds: 0.3\n")
    env = slurm_cluster.job_env(MOEUT_TRAIN_SCRIPT=STANDIN)
    out = tmp_path / "tl.out"
    proc, job = slurm_cluster.sbatch(out, [tmp_path / "cfg.yaml", f"run_dir={tmp_path}/tl"], env,
                                     extra=["--time=1", "--signal=B:USR1@50"], timeout=420)
    log = _log(out)
    print(log)
    assert proc.returncode == 0, f"{proc.stderr}\n{log}"
    assert "received SIGUSR1" in log and f"requeueing job {job} (restart 1)" in log
    assert "training finished (exit 0)" in log
    assert "done step 150" in log
    assert int(slurm_cluster.job_field(job, "Restarts")) >= 1


def test_failed_trainer_is_not_requeued(slurm_cluster, tmp_path):
    (tmp_path / "cfg.yaml").write_text("steps: 3\n")
    out = tmp_path / "fail.out"
    # Both ranks fail at start; rank 1 may first wait for rank 0's port: the grace time ends it (status 137).
    proc, job = slurm_cluster.sbatch(out, [tmp_path / "cfg.yaml", f"run_dir={tmp_path}/f", "steps=notanumber"],
                                     slurm_cluster.job_env(MOEUT_TRAIN_SCRIPT=STANDIN, MOEUT_TASK_EXIT_GRACE=3))
    log = _log(out)
    assert proc.returncode != 0, log
    assert "ValueError" in log, log
    assert re.search(r"trainer failed with exit status (1|137): not requeueing", log), log
    assert slurm_cluster.job_field(job, "Restarts") == "0"
    assert slurm_cluster.job_field(job, "JobState") == "FAILED"


def test_unresolvable_master_is_named(slurm_cluster, tmp_path):
    """Fake node names do not resolve: without MOEUT_MASTER_ADDR the task wrapper says so and how to fix it."""
    (tmp_path / "cfg.yaml").write_text("steps: 3\n")
    env = slurm_cluster.job_env(MOEUT_TRAIN_SCRIPT=STANDIN)
    del env["MOEUT_MASTER_ADDR"]
    out = tmp_path / "nm.out"
    proc, _ = slurm_cluster.sbatch(out, [tmp_path / "cfg.yaml", f"run_dir={tmp_path}/nm"], env)
    log = _log(out)
    assert proc.returncode != 0, log
    assert "MASTER_ADDR 'n1' (the first node of job" in log and "does not resolve" in log
    assert "MOEUT_MASTER_ADDR" in log


# ---------------------------------------------------------------- the real trainer (moeut_ds.train) through Slurm

def _trainer_overrides(data_dir, run_dir, **extra):
    from dist_harness import tiny_overrides

    base = {"train.steps": 12, "checkpoint.every": 6, "log.progress": False}
    base.update(extra)
    return tiny_overrides(data_dir, run_dir, **base)


@pytest.fixture(scope="module")
def trainer_data(tmp_path_factory):
    pytest.importorskip("deepspeed")
    from dist_harness import shared_data

    return shared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted_run(slurm_cluster, trainer_data, tmp_path_factory):
    """2 nodes x 1 process, CPU/gloo, tiny MoEUT, ZeRO-2, 12 steps, checkpoints every 6: through sbatch."""
    tmp = tmp_path_factory.mktemp("slurm-train")
    out, run_dir = tmp / "job.out", tmp / "run"
    proc, job = slurm_cluster.sbatch(out, ["configs/smoke.yaml", *_trainer_overrides(trainer_data, run_dir)],
                                     slurm_cluster.job_env(), timeout=600)
    log = _log(out)
    print(log)
    assert proc.returncode == 0, f"sbatch --wait: {proc.returncode} {proc.stderr}\n{log}"
    return job, log, run_dir


def test_two_node_zero2_training(slurm_cluster, uninterrupted_run):
    from dist_harness import read_jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job, log, run_dir = uninterrupted_run
    assert "node n1 RANK=0/2" in log and "node n2 RANK=1/2" in log
    assert "world size 2 (gloo, cpu)" in log and "ZeRO stage 2" in log
    assert "training finished (exit 0)" in log
    rows = read_jsonl(run_dir)
    assert sorted(rows) == list(range(1, 13))
    losses = [rows[s]["train/loss"] for s in sorted(rows)]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    tb = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert sorted(tb) == list(range(1, 13)) and tb[12] == pytest.approx(losses[-1], rel=1e-6)
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000012"
    assert (ckpt / "step00000012").is_dir() and any((ckpt / "step00000012").iterdir())


def test_preempted_training_resumes_to_same_loss(slurm_cluster, trainer_data, uninterrupted_run, tmp_path):
    """Same run, SIGUSR1 to the batch shell mid-run (what --signal=B:USR1@N does): the trainer checkpoints and
    exits 75, the job requeues itself, resumes from that checkpoint and ends on the uninterrupted run's loss."""
    from dist_harness import read_jsonl

    _, _, ref_dir = uninterrupted_run
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    over = _trainer_overrides(trainer_data, run_dir, **{"debug.step_sleep": 1.0})
    proc, job = slurm_cluster.sbatch(out, ["configs/smoke.yaml", *over], slurm_cluster.job_env(), wait=False)
    assert proc.returncode == 0, proc.stderr
    metrics = run_dir / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and sum('"train/loss"' in ln for ln in metrics.read_text().splitlines()) >= 3):
        assert time.time() - t0 < 300, f"job {job} made no progress:\n{_log(out)}"
        time.sleep(0.3)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    slurm_cluster.wait_gone(job, timeout=600)
    log = _log(out)
    print(log)
    assert "received SIGUSR1: forwarding to the training tasks" in log
    assert "exited 75: requeueing job" in log and f"job {job} (moeut) restart 1" in log
    assert "training finished (exit 0)" in log
    assert slurm_cluster.job_field(job, "Restarts") == "1"
    assert slurm_cluster.job_field(job, "JobState") == "COMPLETED"
    m = re.search(r"checkpoint \S*/checkpoints/step0*(\d+) \([\d.]+ s[^)\n]*\)\n"
                  r"(?:.*\n)*?slurm\.sbatch \[[^]]*\] trainer saved", log)
    assert m and 3 <= int(m.group(1)) < 12, "no preemption checkpoint before the requeue"
    rows, ref = read_jsonl(run_dir), read_jsonl(ref_dir)
    assert sorted(rows) == list(range(1, 13))
    # Exact resume on CPU/fp32: every step's loss equals the uninterrupted run's, the last one included.
    assert [rows[s]["train/loss"] for s in range(1, 13)] == [ref[s]["train/loss"] for s in range(1, 13)]


def test_world_size_mismatch_is_named(slurm_cluster, trainer_data, tmp_path):
    """2 tasks x micro_batch 3 does not divide global_batch 8: the trainer says so, the job fails, no requeue."""
    out = tmp_path / "job.out"
    over = _trainer_overrides(trainer_data, tmp_path / "run", **{"train.micro_batch": 3})
    proc, job = slurm_cluster.sbatch(out, ["configs/smoke.yaml", *over], slurm_cluster.job_env())
    log = _log(out)
    assert proc.returncode != 0, log
    assert "train.global_batch=8 is not a multiple of train.micro_batch=3 x world size 2" in log, log
    assert "not requeueing" in log
    assert slurm_cluster.job_field(job, "JobState") == "FAILED"
    assert slurm_cluster.job_field(job, "Restarts") == "0"


def test_unreachable_master_is_named(slurm_cluster, tmp_path):
    """An address that resolves but where nothing listens (TEST-NET-1): rank 1 gives up with a message naming it,
    srun ends the job after the grace time, the job fails and is not requeued."""
    (tmp_path / "cfg.yaml").write_text("steps: 3\n")
    env = slurm_cluster.job_env(MOEUT_TRAIN_SCRIPT=STANDIN, MOEUT_MASTER_ADDR="192.0.2.1", MOEUT_MASTER_WAIT=4,
                                MOEUT_TASK_EXIT_GRACE=3)
    out = tmp_path / "um.out"
    proc, job = slurm_cluster.sbatch(out, [tmp_path / "cfg.yaml", f"run_dir={tmp_path}/um"], env, timeout=180)
    log = _log(out)
    assert proc.returncode != 0, log
    assert re.search(r"rank 1 on node n2 cannot reach the master 192\.0\.2\.1:\d+ \(rank 0 on the first node\) "
                     r"after 4s", log), log
    assert "not requeueing" in log
    assert slurm_cluster.job_field(job, "Restarts") == "0"
