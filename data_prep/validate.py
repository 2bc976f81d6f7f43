"""Check a prepared dataset with every start-up check the loader makes, plus a full token-range scan.

    python -m data_prep.validate DIR [--model-vocab-size N] [--context N] [--no-checksums]

Exit status 0 when the dataset is usable, 2 with a one-line reason otherwise.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from moeut_ds.data import DataError, open_dataset
from moeut_ds.data.checks import check_token_range
from moeut_ds.data.format import SPLITS, read_metadata


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="dataset directory written by data_prep.prepare")
    p.add_argument("--model-vocab-size", type=int, help="also check against the model config's vocab_size")
    p.add_argument("--context", type=int,
                   help="also check that every split holds at least one window of context+1 tokens (the trainer "
                        "refuses a split shorter than that at setup)")
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 of every shard (sizes still checked)")
    args = p.parse_args(argv)
    try:
        meta = read_metadata(args.dir)
        for split in SPLITS:
            if split == "val" and meta["splits"].get("val", {}).get("num_tokens", 0) == 0:
                print("note: no validation split", file=sys.stderr)
                continue
            ds = open_dataset(args.dir, split, verify_checksums=not args.no_checksums)
            check_token_range(ds.root, meta["splits"][split]["shards"], ds.dtype, ds.vocab_size)
            if args.model_vocab_size is not None:
                ds.check_vocab(args.model_vocab_size)
            if args.context is not None:
                ds.require_windows(args.context)
            print(f"{split}: {ds.num_tokens} tokens in {len(meta['splits'][split]['shards'])} shards, "
                  f"vocab {ds.vocab_size}, eod {ds.eod_id}: ok")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
