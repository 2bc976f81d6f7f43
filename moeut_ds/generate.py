"""Sample text from an exported model: `python -m moeut_ds.generate MODEL_DIR --prompt "..."`.

Uses the SentencePiece tokenizer saved in the model directory by `python -m moeut_ds.export` (or --tokenizer).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


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

    import sentencepiece as spm

    from moeut_ds.model import generate
    from moeut_ds.model_io import load_model

    tok = Path(args.tokenizer or Path(args.model) / "tokenizer.model")
    if not tok.is_file():
        print(f"error: tokenizer {tok} not found: export with `python -m moeut_ds.export` (it copies the tokenizer) "
              f"or pass --tokenizer", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sp = spm.SentencePieceProcessor(model_file=str(tok))
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
