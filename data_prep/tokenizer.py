"""SentencePiece BPE: bounded training sample, training with the spec's settings, loading and checks.

Settings: model_type=bpe, split_digits, byte_fallback (no input is ever unencodable), identity normalisation
without whitespace collapsing and "\\n" as a user-defined piece, so decode(encode(text)) == text for code and
verse. Ids: unk=0, bos=1, eos=2; the end-of-document token is the eos id.
"""
from __future__ import annotations

import heapq
import io
import zlib
from typing import Iterable

import sentencepiece as spm

from .errors import InputError

MAX_LINE_CHARS = 4096  # sample lines longer than this are cut at a space
USER_SYMBOLS = ["\n"]
# SentencePiece needs a piece for each of: 256 byte-fallback bytes, unk/bos/eos, the user symbols and the
# word-boundary mark U+2581, plus one per character of the sample (only known after sampling).
MIN_VOCAB = 256 + 3 + len(USER_SYMBOLS) + 1
MAX_VOCAB = 2**31 - 1  # SentencePiece's vocab_size is an int32


def _cut_line(line: str) -> Iterable[str]:
    while len(line) > MAX_LINE_CHARS:
        cut = line.rfind(" ", MAX_LINE_CHARS // 2, MAX_LINE_CHARS)
        cut = MAX_LINE_CHARS if cut == -1 else cut
        yield line[:cut]
        line = line[cut:]
    if line.strip():
        yield line


class LineSample:
    """A bounded, uniform, deterministic sample of lines: keeps the lines with the smallest seeded hash until
    budget_chars is reached (a bottom-k sample), so the sample covers every input, not just the first files."""

    def __init__(self, budget_chars: int, seed: int):
        self.budget = budget_chars
        self.salt = zlib.crc32(str(seed).encode())
        self.heap: list[tuple[int, int, str]] = []  # (-priority, tiebreak, line): max-heap on priority
        self.chars = 0
        self.seen_chars = 0
        self._n = 0

    def add_text(self, text: str) -> None:
        self.seen_chars += len(text)
        for raw in text.split("\n"):
            for line in _cut_line(raw):
                prio = zlib.crc32(line.encode("utf-8", "surrogatepass"), self.salt)
                if self.chars >= self.budget and prio >= -self.heap[0][0]:
                    continue
                self._n += 1
                heapq.heappush(self.heap, (-prio, self._n, line))
                self.chars += len(line)
                while self.chars - len(self.heap[0][2]) >= self.budget and len(self.heap) > 1:
                    self.chars -= len(heapq.heappop(self.heap)[2])

    def lines(self) -> list[str]:
        """The sample in a fixed order (by priority), independent of insertion order."""
        return [line for _, _, line in sorted(self.heap, key=lambda t: (-t[0], t[2]))]


def check_vocab_size(vocab_size: int) -> None:
    """Reject a --vocab-size no sample can support before the sampling pass, not after it."""
    if vocab_size < MIN_VOCAB:
        raise InputError(f"--vocab-size {vocab_size} is below {MIN_VOCAB}, the smallest byte-fallback BPE "
                         f"tokenizer (256 byte pieces + unk/bos/eos + newline + word boundary, plus one piece per "
                         f"character of the text): raise --vocab-size or pass --tokenizer MODEL")
    if vocab_size > MAX_VOCAB:
        raise InputError(f"--vocab-size {vocab_size} is above {MAX_VOCAB}, the largest SentencePiece accepts: "
                         f"lower --vocab-size (a few thousand to 100k pieces is usual)")


def train(lines: list[str], vocab_size: int) -> bytes:
    """Train a BPE model on the sample; returns the serialized .model bytes.

    One trainer thread: SentencePiece's result depends on its thread count, and the same inputs must give the
    same tokenizer on every machine (training the default 24 MB sample takes a few seconds anyway)."""
    if not lines:
        raise InputError("no training text for the tokenizer: the inputs hold no train-side text")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            split_digits=True, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=USER_SYMBOLS,
            character_coverage=0.9995, max_sentence_length=4 * MAX_LINE_CHARS + 16, num_threads=1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    except RuntimeError as e:
        raise InputError(f"SentencePiece training failed ({str(e).strip().splitlines()[-1]}): pick a --vocab-size "
                         f"the sample supports (with byte_fallback at least 256 byte pieces + specials + the "
                         f"characters), give more text, or pass --tokenizer MODEL") from None
    return buf.getvalue()


def load(model: bytes | str) -> spm.SentencePieceProcessor:
    """Load a model (bytes or path) and check it has an eos piece to use as end-of-document token."""
    try:
        sp = (spm.SentencePieceProcessor(model_proto=model) if isinstance(model, bytes)
              else spm.SentencePieceProcessor(model_file=model))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError
        raise InputError(f"tokenizer {model if isinstance(model, str) else '<trained>'} cannot be loaded ({e}): "
                         f"pass a SentencePiece .model file") from None
    if sp.eos_id() < 0:
        raise InputError("the tokenizer has no eos piece (eos_id=-1), needed as end-of-document token: "
                         "use a model trained with an eos id")
    return sp
