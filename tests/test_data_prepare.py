"""data_prep.prepare / validate end to end on small real text (bundled Austen), tiny vocabularies."""
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.prepare import main as prepare_main, prepare
from data_prep.validate import main as validate_main
from moeut_ds.data import DataError, WindowLoader, open_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUSTEN = os.path.join(ROOT, "data", "english", "austen_prideprejudice.txt.gz")
VOCAB = ["--vocab-size", "400", "--workers", "2"]


@pytest.fixture(scope="module")
def text() -> str:
    with gzip.open(AUSTEN, "rt", encoding="utf-8") as f:
        return f.read()[:120_000]


@pytest.fixture(scope="module")
def files(tmp_path_factory, text):
    """A plain file, a gzip file and a small code tree."""
    d = tmp_path_factory.mktemp("inputs")
    half = len(text) // 2
    (d / "a.txt").write_text(text[:half], encoding="utf-8")
    with gzip.open(d / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text[half:])
    code = d / "code" / "pkg"
    code.mkdir(parents=True)
    (code / "m.py").write_text("def f(x):\n    return x + 12345\n\n\tprint('héllo')\n", encoding="utf-8")
    (code / "skip.bin").write_bytes(b"\xff\xfe")
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, files):
    out = tmp_path_factory.mktemp("ds") / "ds"
    prepare([*VOCAB, "--input", str(files / "a.txt"), str(files / "b.txt.gz"), "--doc-unit", "paragraph",
             "--input", str(files / "code"), "--ext", "py", "--side", "train",
             "--val-fraction", "0.1", "--shard-size-mb", "0.03", "--out", str(out)])
    return out


def decode_docs(ds_dir, split):
    ds = open_dataset(str(ds_dir), split)
    sp = spm.SentencePieceProcessor(model_file=ds.tokenizer_path)
    toks = ds.tokens(0, ds.num_tokens).tolist()
    docs, cur = [], []
    for t in toks:
        if t == ds.eod_id:
            docs.append(sp.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert cur == []  # the stream ends with an end-of-document token
    return docs


def test_round_trip_and_split(dataset, text):
    meta = json.load(open(dataset / "metadata.json"))
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    assert meta["eod_id"] == 2 and meta["eod_piece"] == "</s>"
    assert len(meta["splits"]["train"]["shards"]) > 1  # small shards: windows cross shard files
    train, val = decode_docs(dataset, "train"), decode_docs(dataset, "val")
    paragraphs = [p for p in text[:len(text) // 2].split("\n\n") if p.strip()] + \
                 [p for p in text[len(text) // 2:].split("\n\n") if p.strip()]
    code = "def f(x):\n    return x + 12345\n\n\tprint('héllo')\n"
    assert code in train and code not in val
    assert sorted(train + val) == sorted(paragraphs + [code])  # exact text back, nothing lost or duplicated
    assert 0.03 < len(val) / len(paragraphs) < 0.25
    assert not set(val) & set(train) - {p for p in paragraphs if paragraphs.count(p) > 1}
    tok = open_dataset(str(dataset)).tokenizer_path
    assert os.path.dirname(tok) == str(dataset)
    assert subprocess.run([sys.executable, "-m", "data_prep.validate", str(dataset)], cwd=ROOT,
                          capture_output=True).returncode == 0


def test_determinism_same_seed_same_bytes(tmp_path, files, dataset):
    args = [*VOCAB, "--input", str(files / "a.txt"), str(files / "b.txt.gz"), "--doc-unit", "paragraph",
            "--input", str(files / "code"), "--ext", "py", "--side", "train",
            "--val-fraction", "0.1", "--shard-size-mb", "0.03", "--workers", "1"]
    prepare(args + ["--out", str(tmp_path / "again")])
    for name in sorted(os.listdir(dataset)):
        if name.endswith((".bin", ".model")):
            assert (tmp_path / "again" / name).read_bytes() == (dataset / name).read_bytes(), name
    prepare(args + ["--seed", "7", "--out", str(tmp_path / "seed7")])
    assert decode_docs(tmp_path / "seed7", "val") != decode_docs(dataset, "val")


def test_loader_on_prepared_data(dataset):
    ds = open_dataset(str(dataset))
    raw = np.concatenate([np.fromfile(dataset / s["file"], dtype="<u2")
                          for s in json.load(open(dataset / "metadata.json"))["splits"]["train"]["shards"]])
    ld = WindowLoader(ds, 64, 4, shuffle=False)
    b = next(ld)
    assert b.tolist() == [raw[i * 64:i * 64 + 65].tolist() for i in range(4)]
    ds.check_vocab(400)
    with pytest.raises(DataError, match="vocab_size 512 does not match"):
        ds.check_vocab(512)
    ds.check_vocab(512, allow_padding=True)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "saved", "hf"])
def test_record_inputs(tmp_path, text, fmt):
    rows = [{"id": i, "content": p} for i, p in enumerate(p for p in text.split("\n\n") if p.strip())][:300]
    path = tmp_path / f"in.{fmt}"
    if fmt.startswith("jsonl"):
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(data) if fmt.endswith("gz") else data)
        arg = str(path)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)
        arg = str(path)
    else:
        import datasets
        ds = datasets.Dataset.from_list(rows)
        if fmt == "saved":
            ds.save_to_disk(str(path))
            arg = str(path)
        else:  # a local folder of data files, read by datasets.load_dataset (no network)
            path.mkdir()
            ds.to_json(str(path / "train.jsonl"))
            arg = f"hf:{path}"
    out = tmp_path / "ds"
    assert prepare_main([*VOCAB, "--input", arg, "--text-field", "content", "--val-fraction", "0",
                         "--out", str(out)]) == 0
    assert sorted(decode_docs(out, "train")) == sorted(r["content"] for r in rows)


def test_weights_repeat_training_documents(tmp_path, files):
    out = tmp_path / "w"
    meta = prepare([*VOCAB, "--input", str(files / "a.txt"), "--doc-unit", "paragraph", "--weight", "2.5",
                    "--input", str(files / "code"), "--ext", "py", "--val-fraction", "0", "--out", str(out)])
    src = meta["sources"][0]
    n = len([p for p in (files / "a.txt").read_text().split("\n\n") if p.strip()])
    assert 2.3 * n < src["train_documents"] < 2.7 * n
    docs = decode_docs(out, "train")
    assert max(docs.count(d) for d in set(docs)) >= 3


def test_split_by_input_keeps_groups_whole(tmp_path, files):
    from data_prep.split import unit_hash
    # a seed that sends the a.txt group to validation and keeps b.txt.gz in training
    seed = next(s for s in range(100) if unit_hash(s, "split", "a.txt") < 0.5 <= unit_hash(s, "split", "b.txt.gz"))
    out = tmp_path / "g"
    meta = prepare([*VOCAB, "--input", str(files / "a.txt"), "--doc-unit", "paragraph",
                    "--input", str(files / "b.txt.gz"), "--doc-unit", "paragraph",
                    "--input", str(files / "code"), "--ext", "py", "--side", "val",
                    "--split-by", "input", "--val-fraction", "0.5", "--seed", str(seed), "--out", str(out)])
    a, b, code = meta["sources"]
    assert a["train_documents"] == 0 and a["val_documents"] > 100
    assert b["val_documents"] == 0 and b["train_documents"] > 100
    assert code["val_documents"] == 1 and code["train_documents"] == 0


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("noglob", "matches no file"),
    ("empty", "is empty"),
    ("utf8", "invalid UTF-8 at byte offset 9"),
    ("field", "unknown text field 'body'"),
    ("parquet_field", "unknown text field 'body'"),
    ("noinput", "no --input"),
    ("weight", "weights must be > 0"),
    ("foreign_out", "not part of a prepared dataset"),
    ("vocab_small", "--vocab-size 260 is below 261"),
    ("vocab_huge", "--vocab-size 2147483648 is above 2147483647"),
    ("bad_tokenizer", "r.jsonl cannot be loaded"),
    ("out_file", "is a file, not a dataset directory"),
    ("out_under_file", "cannot be created"),
])
def test_bad_inputs_fail_with_reason(tmp_path, capsys, case, message):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "bad.txt").write_bytes(b"good text\xff more")
    (tmp_path / "r.jsonl").write_text('{"text": "hi"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), tmp_path / "r.parquet")
    inputs = {"missing": [str(tmp_path / "nope.txt")], "noglob": [str(tmp_path / "*.nothing")],
              "empty": [str(tmp_path / "empty.txt")], "utf8": [str(tmp_path / "bad.txt")],
              "field": [str(tmp_path / "r.jsonl"), "--text-field", "body"],
              "parquet_field": [str(tmp_path / "r.parquet"), "--text-field", "body"],
              "weight": [str(tmp_path / "r.jsonl"), "--weight", "0"], "foreign_out": [str(tmp_path / "r.jsonl")],
              "vocab_small": [str(tmp_path / "r.jsonl"), "--vocab-size", "260"],
              "vocab_huge": [str(tmp_path / "r.jsonl"), "--vocab-size", str(2**31)],
              "bad_tokenizer": [str(tmp_path / "r.jsonl"), "--tokenizer", str(tmp_path / "r.jsonl")],
              "out_file": [str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "r.jsonl")],
              "out_under_file": [str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "r.jsonl" / "sub")]}
    argv = [*VOCAB, "--out", str(tmp_path / "out")]
    if case == "foreign_out":
        os.makedirs(tmp_path / "out")
        (tmp_path / "out" / "notes.bin").write_bytes(b"mine")
    if case != "noinput":
        argv += ["--input", *inputs[case]]
    assert prepare_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert err.startswith("error: ") and message in err
    if case.startswith("vocab"):
        assert len(lines) == 1  # refused before the sampling pass
    if case == "utf8":
        assert "bad.txt" in err
    if case == "foreign_out":
        assert (tmp_path / "out" / "notes.bin").read_bytes() == b"mine"
    assert (tmp_path / "out").exists() == (case == "foreign_out")  # a failed run leaves no empty --out behind
    assert (tmp_path / "r.jsonl").read_text() == '{"text": "hi"}\n'


def test_invalid_utf8_replace_option(tmp_path, dataset):
    (tmp_path / "bad.txt").write_bytes(("good text " * 200).encode() + b"\xff more text " * 50)
    out = tmp_path / "out"
    assert prepare_main(["--tokenizer", str(dataset / "tokenizer.model"), "--input", str(tmp_path / "bad.txt"),
                         "--utf8-errors", "replace",
                         "--val-fraction", "0", "--out", str(out)]) == 0
    assert "\ufffd more" in decode_docs(out, "train")[0]


def test_cli_exit_status_and_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--input", str(tmp_path / "none.txt"),
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: ") and "none.txt" in lines[-1]
    assert sum("error" in ln for ln in lines) == 1


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_dataset_damage_is_reported(tmp_path, dataset, capsys):
    meta = json.load(open(dataset / "metadata.json"))
    shard = meta["splits"]["train"]["shards"][1]["file"]
    d = _copy(dataset, tmp_path / "corrupt")
    data = bytearray((d / shard).read_bytes())
    data[10] ^= 1
    (d / shard).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard} is corrupt"):
        open_dataset(str(d))
    open_dataset(str(d), verify_checksums=False)  # sizes still fine: only the checksum catches it
    assert validate_main([str(d)]) == 2 and "is corrupt" in capsys.readouterr().err

    d = _copy(dataset, tmp_path / "truncated")
    (d / shard).write_bytes((dataset / shard).read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        open_dataset(str(d), verify_checksums=False)

    d = _copy(dataset, tmp_path / "missing")
    os.remove(d / shard)
    with pytest.raises(DataError, match="is missing"):
        open_dataset(str(d))

    d = _copy(dataset, tmp_path / "tok")
    (d / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="sha256"):
        open_dataset(str(d))

    d = _copy(dataset, tmp_path / "nometa")
    os.remove(d / "metadata.json")
    with pytest.raises(DataError, match="did not finish"):
        open_dataset(str(d))
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "nowhere"))
    assert validate_main([str(dataset), "--model-vocab-size", "8000"]) == 2
    assert "does not match" in capsys.readouterr().err
    val_tokens = json.load(open(dataset / "metadata.json"))["splits"]["val"]["num_tokens"]
    assert validate_main([str(dataset), "--context", str(val_tokens - 1)]) == 0
    capsys.readouterr()
    assert validate_main([str(dataset), "--context", str(val_tokens)]) == 2
    assert "split 'val'" in capsys.readouterr().err


def test_rerun_resumes_and_skips_finished_shards(tmp_path, files, capsys):
    out = tmp_path / "r"
    args = [*VOCAB, "--input", str(files / "a.txt"), str(files / "b.txt.gz"), "--doc-unit", "paragraph",
            "--val-fraction", "0.1", "--shard-size-mb", "0.03", "--out", str(out)]
    prepare(args)
    before = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".bin")}
    # Simulate a run killed mid-way: no metadata, a half-written temporary shard, one shard never renamed.
    os.remove(out / "metadata.json")
    (out / "train-00001.bin.tmp999").write_bytes(b"\0" * 10)
    os.remove(out / "train-00002.bin")
    with pytest.raises(DataError, match="did not finish"):
        open_dataset(str(out))
    capsys.readouterr()
    prepare(args)
    err = capsys.readouterr().err
    assert "removed 1 temporary" in err and "reusing" in err
    assert f"({len(before) - 1} reused)" in err
    assert sorted(n for n in os.listdir(out) if ".tmp" in n) == []
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".bin")} == before
    assert validate_main([str(out)]) == 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text):
    """A finished dataset from one small text file, and the arguments that prepared it."""
    d = tmp_path_factory.mktemp("finished")
    (d / "in").mkdir()
    (d / "in" / "a.txt").write_text(text[:30_000], encoding="utf-8")
    args = [*VOCAB, "--input", str(d / "in" / "*.txt"), "--doc-unit", "paragraph", "--val-fraction", "0.2"]
    prepare(args + ["--out", str(d / "ds")])
    return d / "ds", args


def _files(d) -> dict:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def test_rerun_of_finished_dataset_with_same_settings_reuses_it(tmp_path, finished, capsys, monkeypatch):
    ds, args = finished
    out = _copy(ds, tmp_path / "ds")
    shards = len([n for n in os.listdir(out) if n.endswith(".bin")])
    capsys.readouterr()
    prepare(args + ["--out", str(out)])
    err = capsys.readouterr().err
    assert "reusing" in err and f"({shards} reused)" in err
    # the same files typed as a path relative to another working directory are the same inputs
    monkeypatch.chdir(ds.parent)
    prepare([a.replace(str(ds.parent) + os.sep, "") for a in args] + ["--out", str(out)])
    assert f"({shards} reused)" in capsys.readouterr().err
    assert {n: b for n, b in _files(out).items() if n != "metadata.json"} == \
        {n: b for n, b in _files(ds).items() if n != "metadata.json"}
    open_dataset(str(out))


@pytest.mark.parametrize("change,expect", [
    (["--vocab-size", "300"], "tokenizer vocab_size 400 vs 300"),
    (["--seed", "3"], "split seed 0 vs 3"),
    (["--doc-unit", "line"], "input 1 doc_unit 'paragraph' vs 'line'"),
    (["--input", "OTHER"], "--input groups 1 vs 2"),
    (["--tokenizer", "TOKENIZER"], "tokenizer trained True vs False"),
])
def test_rerun_with_other_settings_keeps_the_finished_dataset(tmp_path, finished, capsys, change, expect):
    ds, args = finished
    out = _copy(ds, tmp_path / "ds")
    (tmp_path / "other.txt").write_text("other text\n" * 50)
    tok = tmp_path / "tok.model"
    tok.write_bytes((ds / "tokenizer.model").read_bytes())
    change = [{"OTHER": str(tmp_path / "other.txt"), "TOKENIZER": str(tok)}.get(a, a) for a in change]
    assert prepare_main(args + change + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already holds a finished dataset prepared from other inputs/settings" in err
    assert expect in err and "choose a new --out, or delete the directory" in err
    assert _files(out) == _files(ds)


@pytest.mark.parametrize("given_tokenizer", [False, True])
def test_failed_rerun_keeps_the_finished_dataset(tmp_path, finished, capsys, given_tokenizer):
    """Same settings, but the glob now also matches a bad file: the old dataset must stay loadable."""
    ds, args = finished
    d = tmp_path / "d"
    (d / "in").mkdir(parents=True)
    (d / "in" / "a.txt").write_bytes((ds.parent / "in" / "a.txt").read_bytes())
    args = [a.replace(str(ds.parent), str(d)) for a in args]
    if given_tokenizer:
        args += ["--tokenizer", str(ds / "tokenizer.model")]
    out = d / "ds"
    prepare(args + ["--out", str(out)])
    before = _files(out)
    (d / "in" / "z.txt").write_bytes(b"more text\xff")
    assert prepare_main(args + ["--out", str(out)]) == 2
    assert "invalid UTF-8" in capsys.readouterr().err
    assert _files(out) == before
    open_dataset(str(out))


def test_failed_run_removes_only_the_directories_it_created(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"bad\xff")
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper" / "out"):
        assert prepare_main([*VOCAB, "--input", str(tmp_path / "bad.txt"), "--out", str(out)]) == 2
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "empty"]


@pytest.mark.slow
def test_killed_process_resumes(tmp_path, text):
    """A real kill -9 during tokenization, then a re-run: the result equals an uninterrupted run."""
    big = tmp_path / "big.txt"
    big.write_text((text + "\n\n") * 25)
    base = [sys.executable, "-m", "data_prep.prepare", *VOCAB, "--input", str(big), "--doc-unit", "paragraph",
            "--shard-size-mb", "0.2", "--workers", "1"]
    ref = tmp_path / "ref"
    subprocess.run(base + ["--out", str(ref)], cwd=ROOT, check=True, capture_output=True)
    out = tmp_path / "out"
    p = subprocess.Popen(base + ["--out", str(out)], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "train-00002.bin").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)  # kill as soon as a few shards are finished, mid-tokenization
    p.kill()
    p.wait()
    n_ref = len([n for n in os.listdir(ref) if n.endswith(".bin")])
    n_done = len([n for n in os.listdir(out) if n.endswith(".bin")])
    assert not (out / "metadata.json").exists() and 0 < n_done < n_ref
    subprocess.run(base + ["--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    for name in os.listdir(ref):
        if name.endswith(".bin"):
            assert (out / name).read_bytes() == (ref / name).read_bytes()


def test_token_dtype_switches_at_65535():
    from moeut_ds.data.format import token_dtype
    assert token_dtype(8000).name == "uint16" and token_dtype(65535).name == "uint16"
    assert token_dtype(65536).name == "uint32"


def test_directory_input_reads_gzipped_files_of_the_wanted_types(files, text):
    """A folder of .txt.gz books (like data/english) is text, not an empty input."""
    from data_prep.sources import InputGroup, iter_documents
    docs = list(iter_documents(InputGroup([str(files)], extensions=("txt",))))
    assert [d.source.split("/")[-1] for d in docs] == ["a.txt", "b.txt.gz"]
    assert "".join(d.text for d in docs) == text
