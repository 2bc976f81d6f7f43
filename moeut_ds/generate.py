"""Sample text from an exported model: `python -m moeut_ds.generate MODEL_DIR --prompt "..."`.

Uses the SentencePiece tokenizer saved in the model directory by `python -m moeut_ds.export` (or --tokenizer).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sampling settings the sampler cannot use are usage errors, reported before the model is loaded."""
    if not args.greedy and not (math.isfinite(args.temperature) and args.temperature > 0):
        p.error(f"--temperature {args.temperature}: must be a finite number > 0 (or pass --greedy)")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k {args.top_k}: must be at least 1 (leave it out to sample from all tokens)")
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens {args.max_new_tokens}: must be at least 0")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeut_ds.generate", description=__doc__.split("\n")[0])
    p.add_argument("model", help="exported model directory (moeut_ds.load_model format)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start after a document boundary)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature and top-k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="SentencePiece .model (default: MODEL/tokenizer.model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    _check_args(p, args)

    from moeut_ds.model import generate
    from moeut_ds.model_io import load_model, load_tokenizer, read_config

    try:
        vocab_size = read_config(args.model)["model"]["vocab_size"]   # the model dir first, then its tokenizer
        own = Path(args.model) / "tokenizer.model"
        tok = Path(args.tokenizer) if args.tokenizer else own
        if not tok.is_file():
            raise FileNotFoundError(f"tokenizer {tok} not found: export with `python -m moeut_ds.export` (it copies "
                                    f"the tokenizer) or pass --tokenizer")
        sp = load_tokenizer(tok, vocab_size)
        if own.is_file() and tok.read_bytes() != own.read_bytes():
            raise ValueError(f"--tokenizer {tok} is not the model's own {own}: another tokenizer of the same size "
                             f"would turn the ids into other text; leave --tokenizer out")
        model = load_model(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bos = sp.eos_id() if sp.eos_id() >= 0 else 0
    ids = [bos] + sp.encode(args.prompt)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, torch.tensor([ids], device=args.device), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, greedy=args.greedy, generator=gen)
    new = out[0, len(ids):].tolist()
    if bos in new:                                    # stop at the end of the document
        new = new[:new.index(bos)]
    print(args.prompt + sp.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
