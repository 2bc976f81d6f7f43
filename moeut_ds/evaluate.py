"""Held-out perplexity and zero-shot BLiMP of a trained model.

    python -m moeut_ds.evaluate CHECKPOINT_OR_MODEL_DIR --data DIR [--split validation] [--blimp PATH]

BLiMP as in the paper: a minimal pair counts as correct when the summed token log-probability of the good
sentence exceeds the bad one's (not length-normalised); accuracy per paradigm and the mean over paradigms.
Each sentence is scored after the end-of-document token, the boundary the model saw between training documents.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BLIMP = REPO_ROOT / "data" / "blimp" / "BLiMP.zip"


def load_any(path: str, expert_backend: str = "auto", device: str = "cpu"):
    """A model directory (moeut_ds format) or a trainer checkpoint/run directory -> (model, tokenizer path or None)."""
    p = Path(path)
    if (p / "config.json").is_file():
        from moeut_ds.model_io import load_model

        tok = p / "tokenizer.model"
        return load_model(p, expert_backend=expert_backend, device=device), (str(tok) if tok.is_file() else None)
    from moeut_ds.export import load_from_checkpoint

    model, state = load_from_checkpoint(p, expert_backend=expert_backend)
    tok = Path(state["run_config"]["data"]["path"]) / "tokenizer.model"
    return model.to(device), (str(tok) if tok.is_file() else None)


@torch.no_grad()
def perplexity(model, data_dir: str, split: str = "val", context: int = 1024, batch_size: int = 8,
               max_windows: Optional[int] = None, device: str = "cpu") -> tuple[float, int]:
    """exp(mean token cross-entropy) over non-overlapping held-out windows (no context carry-over)."""
    from moeut_ds.data import DataError, open_dataset

    ds = open_dataset(data_dir, split)
    if ds.vocab_size != model.cfg.vocab_size:   # not check_vocab: its fix (change the model config) fits training
        raise DataError(f"model vocab_size {model.cfg.vocab_size} does not match the tokenizer vocab_size "
                        f"{ds.vocab_size} of --data {data_dir}: pass the --data the model was trained on")
    total, count = 0.0, 0
    for batch in ds.eval_windows(context, batch_size, max_windows=max_windows):
        batch = batch.to(device)
        logits = model(batch[:, :-1]).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count), count


def read_blimp(path: str | Path, max_pairs: Optional[int] = None) -> dict[str, list[tuple[str, str]]]:
    """{paradigm: [(good, bad), ...]} from the BLiMP zip (data/<paradigm>.jsonl) or a directory of .jsonl files."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"BLiMP data {p} not found: pass --blimp PATH (the zip from "
                                f"https://github.com/alexwarstadt/blimp or a directory of its .jsonl files)")
    try:
        out = {paradigm: _blimp_pairs(text)[:max_pairs or None] for paradigm, text in _blimp_files(p).items()}
    except (zipfile.BadZipFile, zlib.error, KeyError, ValueError) as e:   # ValueError: bad UTF-8 or JSON
        raise ValueError(f"BLiMP data {p} is not a valid BLiMP zip or directory ({type(e).__name__}: {e}): "
                         f"re-download it from https://github.com/alexwarstadt/blimp or pass --blimp none") from None
    if not out:
        raise ValueError(f"BLiMP data {p} holds no .jsonl files: pass the zip from "
                         f"https://github.com/alexwarstadt/blimp or a directory of its .jsonl files")
    return out


def _blimp_files(p: Path) -> dict[str, str]:
    """{paradigm: text of its .jsonl} from the zip or the directory."""
    files: dict[str, str] = {}
    if p.is_dir():
        for f in sorted(p.rglob("*.jsonl")):
            if f.name.startswith("._") or "__MACOSX" in f.parts:
                continue
            files[f.stem] = f.read_text(encoding="utf-8")
    else:
        with zipfile.ZipFile(p) as z:
            for name in sorted(z.namelist()):
                if name.endswith(".jsonl") and not name.startswith("__MACOSX/") and \
                        not Path(name).name.startswith("._"):      # macOS resource forks in the archive
                    files[Path(name).stem] = z.read(name).decode("utf-8")
    return files


def _blimp_pairs(text: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [(r["sentence_good"], r["sentence_bad"]) for r in rows]


@torch.no_grad()
def sentence_logprobs(model, ids: list[list[int]], bos: int, max_tokens: int = 32768,
                      device: str = "cpu") -> list[float]:
    """Summed log p(token | bos, previous) per sentence; length-sorted <= max_tokens batches: few costly MoE calls."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))     # longest first: a batch's first row is its widest
    scores = [0.0] * len(ids)
    start = 0
    while start < len(order) and ids[order[start]]:                 # empty sentences keep score 0
        width = len(ids[order[start]])
        rows = order[start:start + max(1, max_tokens // width)]
        start += len(rows)
        lens = torch.tensor([len(ids[i]) for i in rows])
        real = torch.arange(width) < lens[:, None]                  # [B, W]: real (non-padding) target positions
        tgt = torch.full((len(rows), width), -100, dtype=torch.long)  # ignore_index; right padding: causally unseen
        tgt[real] = torch.tensor([t for i in rows for t in ids[i]], dtype=torch.long)
        x = torch.cat([torch.full((len(rows), 1), bos, dtype=torch.long), tgt[:, :-1].clamp(min=0)], 1).to(device)
        logits = model(x).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten().to(device), reduction="none")
        for i, s in zip(rows, (-nll.view(len(rows), width).sum(-1)).tolist()):
            scores[i] = s
    return scores


def blimp(model, sp, data: dict[str, list[tuple[str, str]]], max_tokens: int = 32768,
          device: str = "cpu") -> dict[str, float]:
    """Accuracy per paradigm of read_blimp's pairs plus 'average' (mean over paradigms); sp: the SentencePiece
    processor (model_io.load_tokenizer); all sentences scored in one length-sorted pass."""
    bos = sp.eos_id() if sp.eos_id() >= 0 else 0
    scores = iter(sentence_logprobs(model, sp.encode([s for pairs in data.values() for pair in pairs for s in pair]),
                                    bos, max_tokens, device))
    acc = {paradigm: sum(next(scores) > next(scores) for _ in pairs) / len(pairs) for paradigm, pairs in data.items()}
    acc["average"] = sum(acc.values()) / len(acc)
    return acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeut_ds.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model", help="exported model directory, run directory or trainer checkpoint")
    p.add_argument("--data", help="prepared dataset for perplexity (and its tokenizer for BLiMP)")
    p.add_argument("--split", default="val", help="split for perplexity (train/val/validation)")
    p.add_argument("--context", type=int, default=None, help="window length (default: the training context, or 1024)")
    p.add_argument("--max-windows", type=int, default=None, help="limit the held-out windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--blimp", default=str(DEFAULT_BLIMP), help="BLiMP zip or directory ('none' to skip)")
    p.add_argument("--blimp-max-pairs", type=int, default=None, help="first N pairs per paradigm (quick runs)")
    p.add_argument("--blimp-max-tokens", type=int, default=32768, help="padded tokens per BLiMP forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    from moeut_ds.data import DataError
    from moeut_ds.model_io import load_tokenizer

    if args.blimp == "none" and not args.data:
        p.error("--blimp none without --data leaves nothing to evaluate: pass --data DIR (perplexity) or a BLiMP set")
    try:
        pairs = None if args.blimp == "none" else read_blimp(args.blimp, args.blimp_max_pairs)  # before model work
        model, tok = load_any(args.model, device=args.device)
        if args.data:
            data_tok = Path(args.data) / "tokenizer.model"
            check_same_tokenizer(tok, data_tok)
            tok = tok or str(data_tok)
        if pairs is not None:
            if tok is None or not Path(tok).is_file():
                raise FileNotFoundError("no tokenizer for BLiMP: pass --data DIR (its tokenizer.model is used) or "
                                        "export the model with its tokenizer")
            sp = load_tokenizer(tok, model.cfg.vocab_size)
        results: dict = {"model": args.model}
        if args.data:
            context = args.context or _train_context(args.model) or 1024
            ppl, n = perplexity(model, args.data, args.split, context, args.batch_size, args.max_windows, args.device)
            results.update(perplexity=ppl, tokens=n, split=args.split, context=context)
            print(f"perplexity ({args.split}, context {context}, {n} tokens): {ppl:.3f}")
        if pairs is not None:
            acc = blimp(model, sp, pairs, args.blimp_max_tokens, args.device)
            results["blimp"] = acc
            for paradigm, a in acc.items():
                if paradigm != "average":
                    print(f"  blimp {paradigm:45s} {a:.3f}")
            print(f"BLiMP accuracy (mean over {len(acc) - 1} paradigms): {acc['average']:.4f}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    except (FileNotFoundError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check_same_tokenizer(model_tok: Optional[str], data_tok: Path) -> None:
    """Token ids only mean something under the tokenizer they were made with: a held-out set prepared with another
    tokenizer of the same size would give a perplexity without meaning, silently."""
    from moeut_ds.data import DataError

    if model_tok and Path(model_tok).is_file() and data_tok.is_file() and \
            Path(model_tok).read_bytes() != data_tok.read_bytes():
        raise DataError(f"{data_tok.parent} was tokenized with {data_tok}, which is not the model's tokenizer "
                        f"{model_tok}: prepare the held-out text with `python -m data_prep.prepare --input TEXT "
                        f"--side val --tokenizer {model_tok} --out DIR`")


def _train_context(path: str) -> Optional[int]:
    """The context the model was trained with, when the run config is at hand."""
    try:
        from moeut_ds.export import find_checkpoint
        from moeut_ds.train.checkpoint import read_state

        return int(read_state(find_checkpoint(path))["run_config"]["data"]["context"])
    except (FileNotFoundError, KeyError, ValueError):
        meta = Path(path) / "config.json"
        if meta.is_file():
            ctx = json.loads(meta.read_text()).get("train_context")
            return int(ctx) if ctx else None
        return None


if __name__ == "__main__":
    sys.exit(main())
