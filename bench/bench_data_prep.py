"""Benchmark: prepare a whole text corpus (default ../shared/data/english) with an 8000-piece BPE tokenizer.

    python bench/bench_data_prep.py [CORPUS_DIR] [--out DIR] [--workers N]

Times tokenizer training and tokenization separately and prints the figures docs/PERFORMANCE.md records.
KJV and the World English Bible (the same book) are pinned to the training side, as docs/DATA.md recommends.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.prepare import prepare  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", nargs="?", default="../shared/data/english")
    p.add_argument("--out", help="output directory (default: a temporary one, deleted after)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vocab-size", type=int, default=8000)
    args = p.parse_args()
    files = sorted(glob.glob(os.path.join(args.corpus, "*.txt.gz")))
    if not files:
        print(f"error: no *.txt.gz in {args.corpus}", file=sys.stderr)
        return 2
    bibles = [f for f in files if os.path.basename(f).startswith(("kjv", "web_bible"))]
    others = [f for f in files if f not in bibles]
    text_bytes = 0
    for f in files:
        with gzip.open(f, "rb") as fh:
            text_bytes += len(fh.read())
    out = args.out or tempfile.mkdtemp(prefix="bench_data_")
    if os.path.exists(out):
        shutil.rmtree(out)
    argv = ["--input", *others]
    if bibles:
        argv += ["--input", *bibles, "--side", "train"]
    argv += ["--vocab-size", str(args.vocab_size), "--workers", str(args.workers), "--out", out]
    t0 = time.perf_counter()
    meta = prepare(argv)
    wall = time.perf_counter() - t0
    tm = meta["_timing"]
    tokens = meta["splits"]["train"]["num_tokens"] + meta["splits"]["val"]["num_tokens"]
    import datasets
    import numpy
    import sentencepiece
    print(f"corpus: {args.corpus} ({len(files)} files, {text_bytes / 1e6:.1f} MB of UTF-8 text)")
    print(f"machine: {platform.machine()} {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"sentencepiece {sentencepiece.__version__}, numpy {numpy.__version__}, datasets {datasets.__version__}")
    print(f"end to end: {wall:.1f} s (tokenizer sampling+training {tm['tokenizer_s']:.1f} s, "
          f"tokenization+writing {tm['tokenize_s']:.1f} s)")
    print(f"tokens: {tokens:,} (train {meta['splits']['train']['num_tokens']:,} in "
          f"{meta['splits']['train']['num_documents']:,} documents, val {meta['splits']['val']['num_tokens']:,} in "
          f"{meta['splits']['val']['num_documents']:,} documents)")
    print(f"tokenization: {tokens / tm['tokenize_s']:,.0f} tokens/s, {text_bytes / 1e6 / tm['tokenize_s']:.2f} MB/s "
          f"on {args.workers} workers = {text_bytes / 1e6 / tm['tokenize_s'] / args.workers:.2f} MB/s per core")
    for s in meta["sources"]:
        print(f"  {s['label'][:60]:60s} train {s['train_documents']:5d} docs  val {s['val_documents']:4d} docs")
    if not args.out:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
