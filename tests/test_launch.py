"""The launch/ scripts outside Slurm: local.sh with 2 CPU processes (torchrun and the deepspeed launcher),
signal forwarding and the exit-code contract, and the errors of slurm_task.sh and hostfile.sh.
The training processes are tests/slurm/standin_trainer.py (real gloo all_reduce, checkpoint on SIGUSR1/SIGTERM,
exit 75); test_slurm.py and test_launch_train.py run the real trainer."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STANDIN = "tests/slurm/standin_trainer.py"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "MOEUT_"))}
    env.update(MOEUT_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_slurm_task_outside_a_job_names_the_problem():
    proc = subprocess.run(["bash", "launch/slurm_task.sh", "python", "-c", "pass"], cwd=ROOT, env=_env(),
                          text=True, capture_output=True, timeout=30)
    assert proc.returncode == 1
    assert "not inside a Slurm job step" in proc.stderr
    assert "SLURM_JOB_ID SLURM_PROCID SLURM_NTASKS SLURM_LOCALID" in proc.stderr
    assert "sbatch launch/slurm.sbatch" in proc.stderr and "launch/local.sh" in proc.stderr


def test_slurm_task_ignores_sigusr1_until_the_trainer_handles_it():
    """A SIGUSR1 that reaches a task before its trainer installs the handler must not kill it (the default action):
    slurm_task.sh execs the command with SIGUSR1 ignored; a handler installed later replaces that."""
    env = _env(SLURM_JOB_ID=7, SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_LOCALID=0, SLURM_NODEID=0,
               SLURM_JOB_NODELIST="localhost", MOEUT_MASTER_ADDR="127.0.0.1")
    body = ("import os, signal; os.kill(os.getpid(), signal.SIGUSR1); print('survived'); "
            "got = []; signal.signal(signal.SIGUSR1, lambda *a: got.append(1)); os.kill(os.getpid(), signal.SIGUSR1); "
            "print('handled', len(got))")
    proc = subprocess.run(["bash", "launch/slurm_task.sh", sys.executable, "-c", body], cwd=ROOT, env=env,
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["survived", "handled", "1"], (proc.returncode,
                                                                                          proc.stdout, proc.stderr)


def test_slurm_sbatch_outside_a_job_names_the_problem():
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "cfg.yaml"], cwd=ROOT, env=_env(), text=True,
                          capture_output=True, timeout=30)
    assert proc.returncode == 1 and "not inside a Slurm job" in proc.stderr and "sbatch" in proc.stderr


def test_slurm_sbatch_survives_a_signal_after_the_tasks_ended(tmp_path):
    """Slurm's time-limit warning can land after the tasks exited but before the batch shell does (it checks limits
    every ~30 s, so a short last round ends right at it). That must not kill the shell and fail a finished job.
    srun is replaced by a script that exits 0 while SIGUSR1 keeps hitting the batch shell; test_slurm.py covers the
    real signal path on a real cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "trap '' USR1 TERM\n"
        # The batch shell: the oldest ancestor running slurm.sbatch (launch/signals.sh runs srun from a subshell).
        "batch=$PPID; while up=$(ps -o ppid= -p $batch | tr -d ' '); grep -q slurm.sbatch /proc/$up/cmdline; do\n"
        "    batch=$up; done\n"
        # Signal the batch shell until it has exited (a zombie still accepts kill), at most ~2 s.
        "( for _ in $(seq 1000); do [[ $(cut -d' ' -f3 /proc/$batch/stat 2>/dev/null) == [RSD] ]] || exit 0\n"
        "    kill -USR1 $batch 2>/dev/null; sleep 0.002; done ) >/dev/null 2>&1 &\n"
        "sleep 0.3\n"
        "exit 0\n")
    (bin_dir / "srun").chmod(0o755)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 1\n")
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=7, SLURM_JOB_NAME="moeut",
               SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES=1, SLURM_NTASKS=1, MOEUT_ROOT=ROOT,
               MOEUT_MASTER_ADDR="127.0.0.1")
    for attempt in range(5):   # the window is milliseconds wide; the storm of signals covers it every time
        proc = subprocess.run(["bash", "launch/slurm.sbatch", str(cfg)], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, f"attempt {attempt}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert "training finished (exit 0)" in proc.stdout
        assert "after the tasks ended" in proc.stdout


def test_hostfile_errors_name_the_problem(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 1\n")
    missing = subprocess.run(["bash", "launch/hostfile.sh", str(tmp_path / "nope"), str(cfg)], cwd=ROOT,
                             env=_env(), text=True, capture_output=True, timeout=30)
    assert missing.returncode == 1 and "hostfile" in missing.stderr and "not found" in missing.stderr
    bad = tmp_path / "hosts"
    bad.write_text("node-a 4\n")
    proc = subprocess.run(["bash", "launch/hostfile.sh", str(bad), str(cfg)], cwd=ROOT, env=_env(), text=True,
                          capture_output=True, timeout=30)
    assert proc.returncode == 1 and "expected 'HOSTNAME slots=N'" in proc.stderr


def test_local_bad_options_are_named(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 1\n")
    for args, msg in [(["--launcher", "mpirun", str(cfg)], "--launcher must be torchrun or deepspeed"),
                      (["--nproc", "0", str(cfg)], "--nproc must be a positive integer"),
                      ([str(tmp_path / "missing.yaml")], "not found"),
                      ([], "missing CONFIG.yaml")]:
        proc = subprocess.run(["bash", "launch/local.sh", *args], cwd=ROOT, env=_env(), text=True,
                              capture_output=True, timeout=30)
        assert proc.returncode != 0 and msg in proc.stderr, (args, proc.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_local_two_cpu_processes(launcher, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 5\nstep_seconds: 0.05\n")
    proc = subprocess.run(["bash", "launch/local.sh", "--launcher", launcher, "--nproc", "2", str(cfg),
                           f"run_dir={tmp_path}/run"], cwd=ROOT, env=_env(MOEUT_TRAIN_SCRIPT=STANDIN), text=True,
                          capture_output=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "cpu x2 (gloo)" in out
    assert "standin: rank 0/2 local_rank 0" in out and "standin: rank 1/2 local_rank 1" in out
    assert "final loss" in out


@pytest.mark.slow
def test_local_sigterm_checkpoints_and_resume_matches(tmp_path):
    """SIGTERM to local.sh (SIGUSR1 goes the same way; test_slurm.py covers it) reaches the ranks; they checkpoint and exit 75 (the deepspeed launcher passes
    the status through); the same command then resumes and ends on the uninterrupted result."""
    sig = signal.SIGTERM
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 25\nstep_seconds: 0.1\n")
    env = _env(MOEUT_TRAIN_SCRIPT=STANDIN)
    base = ["bash", "launch/local.sh", "--launcher", "deepspeed", "--nproc", "2", str(cfg)]
    ref = subprocess.run(base + [f"run_dir={tmp_path}/ref"], cwd=ROOT, env=env, text=True, capture_output=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr
    run_dir = tmp_path / "run"
    p = subprocess.Popen(base + [f"run_dir={run_dir}"], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while not (run_dir / "progress").exists():
            assert time.time() - t0 < 120 and p.poll() is None, "no progress"
            time.sleep(0.1)
        p.send_signal(sig)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 75, out
    assert re.search(rf"got {sig.name}, checkpoint at step \d+, exit 75", out), out
    again = subprocess.run(base + [f"run_dir={run_dir}"], cwd=ROOT, env=env, text=True, capture_output=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from step" in again.stdout
    final = lambda s: re.findall(r"final loss (\S+)", s)[-1]  # noqa: E731
    assert final(again.stdout) == final(ref.stdout)


@pytest.mark.slow
def test_local_two_cpu_processes_real_trainer(tmp_path, tmp_path_factory):
    """The real trainer: 2 CPU ranks under torchrun, tiny MoEUT with ZeRO-2, metrics and a checkpoint."""
    pytest.importorskip("deepspeed")
    from dist_harness import read_jsonl, shared_data, tiny_overrides

    data = shared_data(tmp_path_factory)   # shared with the trainer tests
    run_dir = tmp_path / "run"
    over = tiny_overrides(data, run_dir, **{"train.steps": 6, "checkpoint.every": 6})
    proc = subprocess.run(["bash", "launch/local.sh", "--cpu", "--nproc", "2", "configs/smoke.yaml", *over], cwd=ROOT,
                          env=_env(), text=True, capture_output=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "torchrun, cpu x2 (gloo)" in out and "world size 2 (gloo, cpu)" in out
    assert sorted(read_jsonl(run_dir)) == list(range(1, 7))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000006"
