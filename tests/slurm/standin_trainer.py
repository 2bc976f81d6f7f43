"""A tiny stand-in for moeut_ds.train, used to test the launchers and the Slurm harness on their own.

It honours the trainer's launch contract and nothing more:
  python tests/slurm/standin_trainer.py --config CONFIG [--resume auto] [key=value ...]
  (keys: run_dir, steps, step_seconds)
- rank, world size and rendezvous come from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
- every step does a real torch.distributed all_reduce over gloo;
- SIGUSR1 or SIGTERM: finish the current step, all ranks agree on the step to stop at, rank 0 writes a
  checkpoint file, every rank exits with status 75;
- --resume auto continues from the newest checkpoint in run_dir.
The "loss" is a running value built from all_reduce sums, so a run that is stopped and resumed ends on the
same final value as an uninterrupted one only if the checkpoint and resume are right.
"""

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", choices=["auto"], default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = {"run_dir": "runs/standin", "steps": 20, "step_seconds": 0.2}
    with open(args.config) as f:  # a flat "key: value" file is enough for a stand-in
        for line in f:
            if ":" in line and not line.lstrip().startswith("#"):
                key, value = line.split(":", 1)
                cfg[key.strip()] = value.strip()
    for item in args.overrides:
        key, value = item.split("=", 1)
        cfg[key] = value
    run_dir, steps, step_seconds = cfg["run_dir"], int(cfg["steps"]), float(cfg["step_seconds"])

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    print(f"standin: rank {rank}/{world} local_rank {os.environ['LOCAL_RANK']} on {node}", flush=True)

    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.json")
    step, loss = 0, 1.0
    if args.resume == "auto" and os.path.exists(ckpt_path):
        with open(ckpt_path) as f:
            state = json.load(f)
        if state["world_size"] != world:
            raise SystemExit(f"standin: checkpoint world size {state['world_size']} != {world}")
        step, loss = state["step"], state["loss"]
        if rank == 0:
            print(f"standin: resumed from step {step}", flush=True)

    while step < steps:
        x = torch.tensor([loss * (rank + 1) + step], dtype=torch.float64)
        dist.all_reduce(x)
        loss = float(x) / (world * (world + 1) / 2) * 0.9
        step += 1
        time.sleep(step_seconds)
        if rank == 0:
            print(f"standin: step {step} loss {loss:.12f}", flush=True)
            with open(os.path.join(run_dir, "progress"), "w") as f:
                f.write(str(step))
        # A signal can reach ranks at different steps: agree on stopping together.
        flag = torch.tensor([1 if stop["signal"] else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and step < steps:
            if rank == 0:
                tmp = ckpt_path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"step": step, "loss": loss, "world_size": world}, f)
                os.replace(tmp, ckpt_path)
                print(f"standin: got {stop['signal'] or 'peer signal'}, checkpoint at step {step}, exit 75",
                      flush=True)
            dist.barrier()
            dist.destroy_process_group()
            return PREEMPTED_EXIT_CODE

    if rank == 0:
        print(f"standin: done step {step} final loss {loss:.12f}", flush=True)
        with open(os.path.join(run_dir, "final_loss"), "w") as f:
            f.write(f"{loss:.12f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
