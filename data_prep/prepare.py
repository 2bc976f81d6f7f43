"""Prepare a training dataset: inputs -> SentencePiece BPE tokenizer -> token shards + metadata.json.

    python -m data_prep.prepare --input 'data/english/austen_*.txt.gz' \\
        --input data/english/kjv.txt.gz --side train --out runs/data/english

Options written after an --input (--weight, --side, --text-field, --doc-unit, --ext, --hf-config, --hf-split,
--chunk-chars, --utf8-errors) apply to that input only; written before the first --input they set the default for
all inputs. See docs/DATA.md.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import multiprocessing
import os
import shutil
import sys
import time
from typing import Iterator, Optional, Sequence

from tqdm import tqdm

from moeut_ds.data.errors import DataError
from moeut_ds.data.format import (FORMAT_NAME, FORMAT_VERSION, METADATA_FILE, SPLITS, TOKENIZER_FILE, read_metadata,
                                  sha256_file, token_dtype, write_json_atomic)

from . import split as splitting
from . import tokenizer as tok
from .errors import InputError
from .shards import (ShardPlanner, ShardWriter, check_out_dir, init_worker, invalidate_metadata,
                     remove_temporaries)
from .sources import DOC_UNITS, Document, InputGroup, expand, iter_documents

GROUP_OPTIONS = {"weight", "side", "text_field", "doc_unit", "extensions", "hf_config", "hf_split", "chunk_chars",
                 "utf8_errors"}
SOURCE_SETTINGS = ("paths", "weight", "side", "doc_unit", "text_field", "chunk_chars", "extensions", "hf_config",
                   "hf_split")  # the group options that decide its documents (utf8_errors only decides failure)


class _InputAction(argparse.Action):
    """--input PATH [PATH ...]: start a new input group."""

    def __call__(self, parser, ns, values, option_string=None):
        ns.groups.append(InputGroup(paths=list(values), **ns.group_defaults))


class _GroupOption(argparse.Action):
    """A per-input option: applies to the latest --input, or to all inputs when given before the first one."""

    def __call__(self, parser, ns, values, option_string=None):
        if self.dest == "extensions":
            values = tuple(e.strip().lstrip(".") for e in values.split(",") if e.strip())
        if ns.groups:
            setattr(ns.groups[-1], self.dest, values)
        else:
            ns.group_defaults[self.dest] = values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", action=_InputAction, metavar="PATH", default=argparse.SUPPRESS,
                   help="one input group: files, globs, directories (source trees by --ext, or datasets "
                        "save_to_disk folders), or hf:NAME_OR_PATH for datasets.load_dataset; repeatable")
    g = p.add_argument_group("per-input options (apply to the preceding --input)")
    g.add_argument("--weight", type=float, action=_GroupOption, default=argparse.SUPPRESS,
                   help="repeat this input's training documents WEIGHT times (fractions: per-document; default 1)")
    g.add_argument("--side", choices=["split", "train", "val"], action=_GroupOption, default=argparse.SUPPRESS,
                   help="split: by --split-by (default); train/val: put the whole input on that side")
    g.add_argument("--text-field", dest="text_field", action=_GroupOption, default=argparse.SUPPRESS,
                   help="field/column with the text in .jsonl, .parquet and datasets inputs (default: text)")
    g.add_argument("--doc-unit", dest="doc_unit", choices=DOC_UNITS, action=_GroupOption, default=argparse.SUPPRESS,
                   help="what a document is in text files: auto (chunk for text files, file inside directories), "
                        "file, chunk (~--chunk-chars, cut at paragraph/line/word), paragraph (blank-line separated), "
                        "line")
    g.add_argument("--chunk-chars", dest="chunk_chars", type=int, action=_GroupOption, default=argparse.SUPPRESS,
                   help="target document size for --doc-unit chunk (default 16384)")
    g.add_argument("--ext", dest="extensions", action=_GroupOption, default=argparse.SUPPRESS,
                   help="comma-separated file extensions read from directories (default: common code and text)")
    g.add_argument("--hf-config", dest="hf_config", action=_GroupOption, default=argparse.SUPPRESS,
                   help="datasets config name for hf: inputs")
    g.add_argument("--hf-split", dest="hf_split", action=_GroupOption, default=argparse.SUPPRESS,
                   help="datasets split to read (default: train)")
    g.add_argument("--utf8-errors", dest="utf8_errors", choices=["strict", "replace"], action=_GroupOption,
                   default=argparse.SUPPRESS,
                   help="strict (default): invalid UTF-8 is an error naming file and byte offset; "
                        "replace: substitute U+FFFD")
    p.add_argument("--out", required=True, help="output dataset directory (created; re-runs resume in it)")
    p.add_argument("--vocab-size", type=int, default=8000, help="pieces of the trained tokenizer (default 8000)")
    p.add_argument("--tokenizer", help="reuse this SentencePiece .model instead of training one")
    p.add_argument("--tokenizer-sample-mb", type=float, default=24.0,
                   help="bound on the text sampled (uniformly, by hash) to train the tokenizer (default 24)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of split units sent to validation")
    p.add_argument("--split-by", choices=splitting.SPLIT_BY, default="document",
                   help="unit kept whole on one side: document (default), file, or input (a whole --input group)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights and tokenizer sample")
    p.add_argument("--shard-size-mb", type=float, default=128.0, help="text per shard (default 128)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    p.set_defaults(groups=[], group_defaults={})
    return p


def _documents(groups: list[InputGroup], args) -> Iterator[tuple[int, Document, str]]:
    """(group index, doc, side) over all groups in order."""
    for gi, g in enumerate(groups):
        for doc in iter_documents(g):
            yield gi, doc, splitting.assign_side(doc, g, args.split_by, args.val_fraction, args.seed)


def _check_args(args) -> None:
    if not args.groups:
        raise InputError("no --input given: name at least one file, glob, directory or hf:DATASET")
    for g in args.groups:
        expand(g)  # missing files and empty globs fail here, before any work
        if g.weight <= 0:
            raise InputError(f"--weight {g.weight} for {g.paths}: weights must be > 0 (drop the input instead)")
        if g.chunk_chars < 1:
            raise InputError("--chunk-chars must be >= 1")
    if not 0 <= args.val_fraction < 1:
        raise InputError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.tokenizer:
        if not os.path.isfile(args.tokenizer):
            raise InputError(f"--tokenizer {args.tokenizer!r} does not exist: pass a SentencePiece .model file")
        tok.load(args.tokenizer)  # a bad model fails here, naming the user's file, before anything is copied
    else:
        tok.check_vocab_size(args.vocab_size)
    if args.workers < 1 or args.shard_size_mb <= 0 or args.tokenizer_sample_mb <= 0:
        raise InputError("--workers, --shard-size-mb and --tokenizer-sample-mb must be positive")


def _make_out_dir(out: str) -> Optional[str]:
    """Create --out; returns the topmost directory this created (None when --out existed), for _remove_created."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file, not a dataset directory: choose a new directory (or an existing "
                         f"dataset to resume)")
    top, path = None, os.path.abspath(out)
    while not os.path.exists(path):
        top, path = path, os.path.dirname(path)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out} cannot be created ({e.strerror}): choose a directory path you can write to"
                         ) from None
    return top


def _remove_created(out: str, top: Optional[str]) -> None:
    """After a failed run, remove the directories _make_out_dir created, while they are still empty."""
    if top is None:
        return
    path = os.path.abspath(out)
    while not os.listdir(path):
        os.rmdir(path)
        if path == top:
            return
        path = os.path.dirname(path)


def _source_settings(g: InputGroup) -> dict:
    """The group's SOURCE_SETTINGS, JSON-ready, as metadata.json records them."""
    settings = {k: getattr(g, k) for k in SOURCE_SETTINGS}
    settings["extensions"] = list(g.extensions)
    settings["label"] = g.label
    return settings


def _recipe(args) -> dict:
    """What decides the dataset's content (inputs, tokenizer and split settings), in metadata.json's layout."""
    tokenizer = ({"trained": False, "sha256": sha256_file(args.tokenizer)} if args.tokenizer else
                 {"trained": True, "vocab_size": args.vocab_size, "sample_mb": args.tokenizer_sample_mb})
    return {"sources": [_source_settings(g) for g in args.groups], "tokenizer": tokenizer,
            "split": {"seed": args.seed, "val_fraction": args.val_fraction, "split_by": args.split_by}}


def _recipe_changes(meta: dict, recipe: dict) -> list[str]:
    """'setting recorded vs now' for each setting the metadata records with another value than the recipe."""
    old, new = meta.get("sources", []), recipe["sources"]
    changes = [f"--input groups {len(old)} vs {len(new)}"] if len(old) != len(new) else []
    sections = [("tokenizer", meta["tokenizer"], recipe["tokenizer"]),
                ("split", meta.get("split", {}), recipe["split"]),
                *((f"input {i + 1}", o, n) for i, (o, n) in enumerate(zip(old, new)))]
    # paths as typed depend on the working directory; the label (basenames, what the split hashes) does not
    return changes + [f"{name} {k} {o[k]!r} vs {v!r}" for name, o, n in sections for k, v in n.items()
                      if k != "paths" and k in o and o[k] != v]


def _check_same_recipe(out: str, recipe: dict) -> None:
    """A re-run may resume or refresh the dataset in --out, never replace one prepared from other settings."""
    try:
        meta = read_metadata(out)
    except DataError:
        return  # no finished dataset there (or an unreadable one): this run writes it
    changes = _recipe_changes(meta, recipe)
    if changes:
        raise InputError(f"--out {out} already holds a finished dataset prepared from other inputs/settings "
                         f"(recorded vs now: {'; '.join(changes)}): choose a new --out, or delete the directory "
                         f"to replace it")


def _tokenizer(args, out: str) -> tuple[str, float]:
    """Train (or copy) the tokenizer into OUT/tokenizer.model; a re-run with the same sample reuses it."""
    path = os.path.join(out, TOKENIZER_FILE)
    if args.tokenizer:
        if not os.path.isfile(path) or sha256_file(path) != sha256_file(args.tokenizer):
            shutil.copyfile(args.tokenizer, path + ".tmp")
            invalidate_metadata(out)
            os.replace(path + ".tmp", path)
        return path, 0.0
    t0 = time.perf_counter()
    sample = tok.LineSample(int(args.tokenizer_sample_mb * 1e6), args.seed)
    for _, doc, side in tqdm(_documents(args.groups, args), desc="sampling", unit=" docs", leave=False):
        if side == "train":
            sample.add_text(doc.text)
    lines = sample.lines()
    h = hashlib.sha256(f"bpe:{args.vocab_size}:{tok.spm.__version__}".encode())
    for line in lines:
        h.update(line.encode("utf-8", "surrogatepass") + b"\n")
    stamp = path + ".sample-sha256"
    if os.path.isfile(path) and os.path.isfile(stamp) and open(stamp).read().strip() == h.hexdigest():
        print(f"tokenizer: reusing {path} (same sample and settings)", file=sys.stderr)
        return path, time.perf_counter() - t0
    print(f"tokenizer: training BPE vocab {args.vocab_size} on {sum(map(len, lines)) / 1e6:.1f}M chars "
          f"({len(lines)} lines sampled from {sample.seen_chars / 1e6:.1f}M)", file=sys.stderr)
    model = tok.train(lines, args.vocab_size)
    tok.load(model)
    with open(path + ".tmp", "wb") as f:
        f.write(model)
    invalidate_metadata(out)
    os.replace(path + ".tmp", path)
    with open(stamp, "w") as f:
        f.write(h.hexdigest() + "\n")
    return path, time.perf_counter() - t0


def prepare(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the whole preparation; returns the metadata written. Raises InputError/DataError on bad input."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    created = _make_out_dir(args.out)
    try:
        return _prepare_in(args, args.out)
    except BaseException:
        _remove_created(args.out, created)
        raise


def _prepare_in(args, out: str) -> dict:
    """prepare() once OUT exists; a finished dataset there keeps its metadata until a file it describes changes."""
    check_out_dir(out)
    recipe = _recipe(args)
    _check_same_recipe(out, recipe)
    stale = remove_temporaries(out)
    if stale:
        print(f"removed {stale} temporary file(s) left by an interrupted run", file=sys.stderr)
    t_start = time.perf_counter()
    tok_path, t_tok = _tokenizer(args, out)
    sp = tok.load(tok_path)
    vocab, eod = sp.get_piece_size(), sp.eos_id()
    dtype = token_dtype(vocab)
    tok_sha = sha256_file(tok_path)

    planner = ShardPlanner(int(args.shard_size_mb * 1e6), f"{FORMAT_VERSION}:{tok_sha}:{eod}:{dtype.str}")
    stats = {gi: {"train": [0, 0], "val": [0, 0]} for gi in range(len(args.groups))}  # [documents, chars]
    t_enc = time.perf_counter()
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(args.workers, initializer=init_worker, initargs=(tok_path, eod, dtype.str)) as pool, \
            tqdm(desc="tokenizing", unit="B", unit_scale=True, smoothing=0.1) as bar:
        writer = ShardWriter(pool, out, bar)
        for gi, doc, side in _documents(args.groups, args):
            times = splitting.copies(doc, args.groups[gi].weight, args.seed) if side == "train" else 1
            if times == 0:
                continue
            stats[gi][side][0] += times
            stats[gi][side][1] += times * len(doc.text)
            sealed = planner.add(side, doc.text, times)
            if sealed is not None:
                writer.submit(sealed)
        for sealed in planner.flush():
            writer.submit(sealed)
        records = writer.finish()
    t_enc = time.perf_counter() - t_enc

    planned = {r["file"] for r in records}
    for name in os.listdir(out):  # shards of an earlier, larger plan would otherwise linger
        if name.endswith((".bin", ".bin.json")) and name.split(".bin")[0] + ".bin" not in planned:
            invalidate_metadata(out)
            os.remove(os.path.join(out, name))
    splits = {}
    for s in SPLITS:
        shards = sorted((r for r in records if r["split"] == s), key=lambda r: r["file"])
        splits[s] = {"num_tokens": sum(r["num_tokens"] for r in shards),
                     "num_documents": sum(r["num_documents"] for r in shards),
                     "shards": [{k: r[k] for k in ("file", "num_tokens", "bytes", "sha256", "num_documents")}
                                for r in shards]}
    sources = [{**src, "train_documents": stats[i]["train"][0],
                "train_chars": stats[i]["train"][1], "val_documents": stats[i]["val"][0],
                "val_chars": stats[i]["val"][1]} for i, src in enumerate(recipe["sources"])]
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab,
            "eod_id": eod, "eod_piece": sp.id_to_piece(eod),
            "tokenizer": {**recipe["tokenizer"], "file": TOKENIZER_FILE, "sha256": tok_sha, "vocab_size": vocab,
                          "model_type": "bpe"},
            "splits": splits, "sources": sources, "split": recipe["split"],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tool": "data_prep.prepare"}
    write_json_atomic(os.path.join(out, METADATA_FILE), meta)

    chars = sum(r["text_chars"] for r in records)
    tokens = splits["train"]["num_tokens"] + splits["val"]["num_tokens"]
    docs = splits["train"]["num_documents"] + splits["val"]["num_documents"]
    total = time.perf_counter() - t_start
    fresh = writer.tokens
    print(f"done: {docs} documents, {tokens} tokens (train {splits['train']['num_tokens']}, val "
          f"{splits['val']['num_tokens']}), {len(records)} shards ({writer.skipped} reused); tokenizer "
          f"{t_tok:.1f}s, tokenization {t_enc:.1f}s = {fresh / max(t_enc, 1e-9):,.0f} tokens/s, "
          f"{chars / 1e6 / max(t_enc, 1e-9):.2f} M chars/s on {args.workers} workers; total {total:.1f}s -> {out}",
          file=sys.stderr)
    if splits["val"]["num_tokens"] == 0 and args.val_fraction > 0:
        print("warning: the validation split is empty: raise --val-fraction, use smaller --doc-unit, or pin an "
              "input with --side val", file=sys.stderr)
    meta["_timing"] = {"tokenizer_s": t_tok, "tokenize_s": t_enc, "total_s": total, "chars": chars,
                       "fresh_tokens": fresh}
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        prepare(argv)
    except (InputError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
