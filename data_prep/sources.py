"""Input groups and the documents they yield.

An input group is what one `--input PATH [PATH ...]` names, with its own options (weight, side, text field, ...).
Paths may be files, globs, directories (source trees, or `datasets` save_to_disk folders) or `hf:NAME` for
`datasets.load_dataset`. Every document carries a stable key (independent of the working directory) that the
train/validation split hashes.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
from typing import Iterator, Optional

from .errors import InputError

DOC_UNITS = ("auto", "file", "chunk", "paragraph", "line")
DEFAULT_CODE_EXTS = ("py", "c", "h", "cc", "cpp", "hpp", "cu", "rs", "go", "java", "js", "ts", "sh", "md", "rst",
                     "txt", "toml", "yaml", "yml")


@dataclasses.dataclass
class InputGroup:
    """One --input occurrence: its paths and per-group options."""
    paths: list[str]
    weight: float = 1.0
    side: str = "split"           # split | train | val
    text_field: str = "text"
    doc_unit: str = "auto"
    extensions: tuple[str, ...] = DEFAULT_CODE_EXTS
    hf_config: Optional[str] = None
    hf_split: str = "train"
    chunk_chars: int = 16384
    utf8_errors: str = "strict"   # strict: fail naming file and byte offset; replace: U+FFFD

    @property
    def label(self) -> str:
        """Stable name of the group for split hashing and metadata: basenames, not cwd-dependent paths."""
        return "+".join(_stable_name(p) for p in self.paths)


@dataclasses.dataclass
class Document:
    key: str        # stable id, e.g. "emma.txt.gz#3"
    source: str     # stable file/source label, e.g. "emma.txt.gz"
    text: str


def _stable_name(path: str) -> str:
    if path.startswith("hf:"):
        return path
    return os.path.basename(os.path.normpath(path)) or path


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def expand(group: InputGroup) -> list[tuple[str, str]]:
    """Resolve the group's paths to (kind, path) pairs, sorted within each glob; fail on anything missing."""
    out: list[tuple[str, str]] = []
    for p in group.paths:
        if p.startswith("hf:"):
            out.append(("hf", p[3:]))
            continue
        if any(c in p for c in "*?["):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise InputError(f"input {p!r} matches no file: check the glob and the working directory")
        elif os.path.exists(p):
            matches = [p]
        else:
            raise InputError(f"input {p!r} does not exist: check the path (use hf:NAME for a hub dataset)")
        for m in matches:
            if _is_saved_dataset(m):
                out.append(("saved", m))
            elif os.path.isdir(m):
                out.append(("tree", m))
            else:
                out.append(("file", m))
    return out


def _decode(data: bytes, where: str, errors: str, base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: invalid UTF-8 at byte offset {base_offset + e.start} (of the decompressed "
                         f"data): fix or re-encode the file, or pass --utf8-errors replace to substitute U+FFFD"
                         ) from None


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _file_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def split_text(text: str, unit: str, chunk_chars: int) -> list[str]:
    """Cut one file's text into documents: whole file, paragraphs (blank-line separated), lines, or chunks of
    about chunk_chars ending at a paragraph, line or word boundary (so huge files still give a usable split)."""
    if unit == "file":
        return [text] if text.strip() else []
    if unit == "paragraph":
        return [p for p in text.split("\n\n") if p.strip()]
    if unit == "line":
        return [ln for ln in text.split("\n") if ln.strip()]
    docs, pos, n = [], 0, len(text)
    while pos < n:
        if n - pos <= chunk_chars + chunk_chars // 2:
            cut = n
        else:
            cut = -1
            for sep in ("\n\n", "\n", " "):  # prefer the cleanest boundary within [chunk, 2*chunk)
                i = text.find(sep, pos + chunk_chars, pos + 2 * chunk_chars)
                if i != -1:
                    cut = i + len(sep)
                    break
            if cut == -1:
                cut = pos + chunk_chars
        piece = text[pos:cut]
        if piece.strip():
            docs.append(piece)
        pos = cut
    return docs


def _text_docs(path: str, label: str, g: InputGroup, unit: str) -> Iterator[Document]:
    with _open_bytes(path) as f:
        data = f.read()
    text = _decode(data, path, g.utf8_errors)
    for i, d in enumerate(split_text(text, unit, g.chunk_chars)):
        yield Document(f"{label}#{i}", label, d)


def _field(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if field not in record:
        raise InputError(f"{where}: unknown text field {field!r} (fields: {', '.join(sorted(record)[:20])}): "
                         f"pass --text-field with one of them")
    value = record[field]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {field!r} holds {type(value).__name__}, not text: pick a text field")
    return value


def _jsonl_docs(path: str, label: str, g: InputGroup) -> Iterator[Document]:
    offset = 0
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = _decode(raw, path, g.utf8_errors, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg}): a .jsonl file needs one JSON object per line"
                                 ) from None
            text = _field(rec, g.text_field, where)
            if text.strip():
                yield Document(f"{label}#{lineno}", label, text)


def _column_docs(rows: Iterator[Optional[str]], label: str) -> Iterator[Document]:
    for i, text in enumerate(rows):
        if text is not None and text.strip():
            yield Document(f"{label}#{i}", label, text)


def _check_column(names: list[str], field: str, where: str) -> None:
    if field not in names:
        raise InputError(f"{where}: unknown text field {field!r} (columns: {', '.join(names)}): "
                         f"pass --text-field with one of them")


def _parquet_docs(path: str, label: str, g: InputGroup) -> Iterator[Document]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for damaged files
        raise InputError(f"{path}: cannot read as parquet ({e})") from None
    _check_column(pf.schema_arrow.names, g.text_field, path)

    def rows() -> Iterator[Optional[str]]:
        for batch in pf.iter_batches(columns=[g.text_field], batch_size=4096):
            yield from batch.column(0).to_pylist()
    return _column_docs(rows(), label)


def _hf_docs(kind: str, path: str, label: str, g: InputGroup) -> Iterator[Document]:
    import datasets
    try:
        if kind == "saved":
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, g.hf_config, split=g.hf_split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise InputError(f"{path}: cannot load as a datasets dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if g.hf_split not in ds:
            raise InputError(f"{path}: no split {g.hf_split!r} (splits: {', '.join(ds)}): pass --hf-split")
        ds = ds[g.hf_split]
    _check_column(list(ds.column_names), g.text_field, path)

    def rows() -> Iterator[Optional[str]]:
        for batch in ds.iter(batch_size=4096):
            yield from batch[g.text_field]
    return _column_docs(rows(), label)


def _tree_files(root: str, exts: tuple[str, ...]) -> list[str]:
    wanted = tuple("." + e.lstrip(".") for e in exts)
    wanted += tuple(w + ".gz" for w in wanted)       # gzip'd files of those types (emma.txt.gz) count too
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(wanted))
    return found


def _tree_docs(root: str, g: InputGroup, unit: str) -> Iterator[Document]:
    base = _stable_name(root)
    for f in _tree_files(root, g.extensions):
        yield from _text_docs(f, base + "/" + os.path.relpath(f, root).replace(os.sep, "/"), g, unit)


def iter_documents(group: InputGroup) -> Iterator[Document]:
    """All documents of a group, in a fixed order. Raises InputError if the group yields none."""
    count = 0
    for kind, path in expand(group):
        if kind in ("hf", "saved"):
            label = f"hf:{_stable_name(path)}" if kind == "hf" else _stable_name(path)
            docs = _hf_docs(kind, path, label, group)
        elif kind == "tree":
            docs = _tree_docs(path, group, "file" if group.doc_unit == "auto" else group.doc_unit)
        else:
            label = _stable_name(path)
            fmt = _file_format(path)
            if fmt == "jsonl":
                docs = _jsonl_docs(path, label, group)
            elif fmt == "parquet":
                docs = _parquet_docs(path, label, group)
            else:
                docs = _text_docs(path, label, group, "chunk" if group.doc_unit == "auto" else group.doc_unit)
        for d in docs:
            count += 1
            yield d
    if count == 0:
        raise InputError(f"input {' '.join(group.paths)!r} is empty (no non-blank document): "
                         f"remove it or point it at files with text")
