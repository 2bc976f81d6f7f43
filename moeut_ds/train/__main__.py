"""`python -m moeut_ds.train --config CONFIG.yaml [--resume auto|PATH|none] [dotted.key=value ...]`."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeut_ds.train", description=__doc__.split("\n")[0] +
                                " Exit status 75 = checkpoint saved after SIGTERM/SIGUSR1 (requeue and resume).")
    p.add_argument("--config", help="run config YAML (configs/*.yaml)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint of the run, else start fresh), none, or a checkpoint path")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=200 model.preset=dense-tiny")
    args = p.parse_intermixed_args(argv)     # options may come after key=value overrides
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from moeut_ds.config import ConfigError
    from moeut_ds.data import DataError
    from moeut_ds.train.config import load_run_config
    from moeut_ds.train.distributed import prepare_env

    try:
        cfg = load_run_config(args.config, args.overrides)
        prepare_env()
        from moeut_ds.train.loop import main_with

        return main_with(cfg, args.resume)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
