"""evaluate / export / generate CLIs on a trained run (perplexity, BLiMP accuracy, sampled text) and their input
checks on a tiny saved model."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_harness import REPO, data_dir, trained_run  # noqa: F401


@pytest.mark.slow
def test_evaluate_checkpoint_and_export_generate(tmp_path, data_dir, trained_run):
    r = subprocess.run([sys.executable, "-m", "moeut_ds.evaluate", str(trained_run), "--data", str(data_dir),
                        "--max-windows", "8", "--blimp-max-pairs", "4", "--json", str(tmp_path / "r.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "BLiMP accuracy (mean over 67 paradigms)" in r.stdout and "perplexity (val" in r.stdout
    res = json.loads((tmp_path / "r.json").read_text())
    assert 1 < res["perplexity"] < 512 and 0 <= res["blimp"]["average"] <= 1 and len(res["blimp"]) == 68
    out = tmp_path / "model"
    subprocess.run([sys.executable, "-m", "moeut_ds.export", str(trained_run), "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "moeut_ds.generate", str(out), "--prompt", "She said",
                        "--max-new-tokens", "12", "--top-k", "20"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("She said"), r.stderr
    r = subprocess.run([sys.executable, "-m", "moeut_ds.evaluate", str(out), "--blimp", str(tmp_path / "nope.zip")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "BLiMP data" in r.stderr and "not found" in r.stderr


def test_read_blimp_skips_macos_forks():
    from moeut_ds.evaluate import DEFAULT_BLIMP, read_blimp

    data = read_blimp(DEFAULT_BLIMP, max_pairs=2)
    assert len(data) == 67 and all(len(p) == 2 for p in data.values())


def _tiny_model(vocab: int):
    from moeut_ds import LanguageModel, get_preset

    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("moeut-tiny"), vocab_size=vocab, d_model=64, d_head=16, ff_n_experts=8,
                              ff_expert_size=16, ff_k=2)
    return LanguageModel(cfg, expert_backend="reference")


def test_sentence_logprobs_independent_of_batching():
    """Length-sorted token-budget batches (right padding, per-token routing) give each sentence's naive score."""
    from moeut_ds.evaluate import sentence_logprobs

    model, bos = _tiny_model(97).eval(), 3
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 24, (40,), generator=g)]
    ids.insert(7, [])                                                  # an empty sentence scores 0
    with torch.no_grad():
        naive = [torch.log_softmax(model(torch.tensor([[bos] + s[:-1]])).logits[0].float(), -1)
                 .gather(-1, torch.tensor(s)[:, None]).sum().item() if s else 0.0 for s in ids]
    one_each = sentence_logprobs(model, ids, bos, max_tokens=1)        # every batch holds a single sentence
    all_in_one = sentence_logprobs(model, ids, bos, max_tokens=10 ** 6)
    mixed = sentence_logprobs(model, ids, bos, max_tokens=50)
    for got in (one_each, all_in_one, mixed):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(naive), rtol=1e-5, atol=1e-5)
    assert naive[7] == all_in_one[7] == 0.0 and len(set(map(len, ids))) > 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A 200-piece SentencePiece model (eos 1) trained on the first BLiMP pairs."""
    import sentencepiece as spm

    from moeut_ds.evaluate import DEFAULT_BLIMP, read_blimp

    tmp = tmp_path_factory.mktemp("tok")
    text = tmp / "blimp.txt"
    text.write_text("\n".join(s for pairs in read_blimp(DEFAULT_BLIMP, 2).values() for pair in pairs for s in pair))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp / "tok"), vocab_size=200,
                                   model_type="unigram", eos_id=1, bos_id=-1, minloglevel=2)
    return str(tmp / "tok.model")


def _model_dir(path: Path, vocab: int, tokenizer: str) -> Path:
    """A tiny model in the exported format (config.json + model.safetensors + tokenizer.model)."""
    from moeut_ds.model_io import save_model

    save_model(_tiny_model(vocab), path)
    shutil.copyfile(tokenizer, path / "tokenizer.model")
    return path


def test_blimp_pairs_good_with_bad(tokenizer):
    """blimp() scores all sentences in one pass; its bookkeeping matches scoring goods and bads separately."""
    from moeut_ds.evaluate import DEFAULT_BLIMP, blimp, read_blimp, sentence_logprobs
    from moeut_ds.model_io import load_tokenizer

    data = read_blimp(DEFAULT_BLIMP, max_pairs=2)
    sp, model = load_tokenizer(tokenizer, 200), _tiny_model(200).eval()
    acc = blimp(model, sp, data)
    good, bad = (iter(sentence_logprobs(model, sp.encode([pair[j] for pairs in data.values() for pair in pairs]), 1))
                 for j in (0, 1))
    want = {paradigm: sum(next(good) > next(bad) for _ in pairs) / len(pairs) for paradigm, pairs in data.items()}
    assert {k: v for k, v in acc.items() if k != "average"} == want and len(set(want.values())) > 1
    assert acc["average"] == pytest.approx(sum(want.values()) / 67)


@pytest.mark.parametrize("bad,msg", [
    ("text.zip", "is not a valid BLiMP zip or directory (BadZipFile"),
    ("trunc.zip", "is not a valid BLiMP zip or directory (BadZipFile"),
    ("dir", "is not a valid BLiMP zip or directory (JSONDecodeError"),
    ("missing.zip", "not found: pass --blimp PATH"),
])
def test_evaluate_checks_blimp_before_the_model(tmp_path, capsys, bad, msg):
    """A bad --blimp is reported before the model is looked at (here it does not even exist), not after perplexity."""
    from moeut_ds.evaluate import DEFAULT_BLIMP, main

    (tmp_path / "text.zip").write_text("not a zip")
    (tmp_path / "trunc.zip").write_bytes(DEFAULT_BLIMP.read_bytes()[:4096])
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "adjunct_island.jsonl").write_text('{"sentence_good": "Who')
    assert main([str(tmp_path / "no-model"), "--blimp", str(tmp_path / bad)]) == 2
    err = capsys.readouterr().err
    assert f"error: BLiMP data {tmp_path / bad} {msg}" in err and "Traceback" not in err


def test_evaluate_vocab_mismatch_asks_for_the_training_data(tmp_path, tokenizer, capsys):
    from data_prep.prepare import main as prepare
    from moeut_ds.evaluate import DEFAULT_BLIMP, main, read_blimp

    (tmp_path / "text.txt").write_text("\n".join(p[0] for pairs in read_blimp(DEFAULT_BLIMP, 5).values() for p in pairs))
    assert prepare(["--input", str(tmp_path / "text.txt"), "--tokenizer", tokenizer, "--out", str(tmp_path / "data"),
                    "--workers", "1"]) == 0
    model = _model_dir(tmp_path / "model", 97, tokenizer)
    assert main([str(model), "--data", str(tmp_path / "data"), "--split", "train", "--blimp", "none"]) == 2
    err = capsys.readouterr().err
    assert "model vocab_size 97 does not match the tokenizer vocab_size 200" in err
    assert "pass the --data the model was trained on" in err


def test_heldout_text_must_use_the_models_tokenizer(tmp_path, tokenizer, capsys):
    """Held-out text prepared with the model's tokenizer is scored; with another tokenizer of the same size it is
    refused (its ids would mean other pieces: a perplexity without meaning)."""
    import sentencepiece as spm

    from data_prep.prepare import main as prepare
    from moeut_ds.evaluate import DEFAULT_BLIMP, main, read_blimp

    text = tmp_path / "held.txt"
    text.write_text("\n".join(p[1] for pairs in read_blimp(DEFAULT_BLIMP, 5).values() for p in pairs))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "other"), vocab_size=200,
                                   model_type="bpe", eos_id=1, bos_id=-1, minloglevel=2)
    model = _model_dir(tmp_path / "model", 200, tokenizer)
    for name, tok in (("same", tokenizer), ("other", str(tmp_path / "other.model"))):
        assert prepare(["--input", str(text), "--side", "val", "--tokenizer", tok, "--out", str(tmp_path / name),
                        "--workers", "1"]) == 0
    assert main([str(model), "--data", str(tmp_path / "same"), "--blimp", "none", "--context", "16"]) == 0
    assert "perplexity (val, context 16" in capsys.readouterr().out
    assert main([str(model), "--data", str(tmp_path / "other"), "--blimp", "none", "--context", "16"]) == 2
    err = capsys.readouterr().err
    assert "which is not the model's tokenizer" in err and "--tokenizer" in err


@pytest.mark.parametrize("args,msg", [
    (["--temperature", "0"], "--temperature 0.0: must be a finite number > 0 (or pass --greedy)"),
    (["--temperature", "-1"], "--temperature -1.0: must be a finite number > 0"),
    (["--temperature", "nan"], "--temperature nan: must be a finite number > 0"),
    (["--top-k", "0"], "--top-k 0: must be at least 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be at least 0"),
])
def test_generate_rejects_bad_sampling_flags(tmp_path, capsys, args, msg):
    from moeut_ds.generate import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_generate_greedy_ignores_temperature(tmp_path, tokenizer, capsys):
    from moeut_ds.generate import main

    model = _model_dir(tmp_path / "model", 200, tokenizer)
    assert main([str(model), "--prompt", "Who", "--temperature", "0", "--greedy", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "Who\n"


def test_generate_bad_model_dir_and_tokenizer(tmp_path, tokenizer, capsys):
    """Each message names the file that is wrong and what to pass instead."""
    from moeut_ds.generate import main

    assert main([str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"model directory {tmp_path / 'nope'} does not exist" in err and "tokenizer" not in err
    model = _model_dir(tmp_path / "model", 97, tokenizer)               # 200 pieces for 97 embedding rows
    assert main([str(model), "--prompt", "x"]) == 2
    assert (f"tokenizer {model / 'tokenizer.model'} has 200 pieces, the model's vocab_size is 97: use the "
            f"tokenizer.model of the prepared dataset" in capsys.readouterr().err)
    (tmp_path / "bad.model").write_bytes(b"\x00 not a sentencepiece model")
    assert main([str(model), "--prompt", "x", "--tokenizer", str(tmp_path / "bad.model")]) == 2
    err = capsys.readouterr().err
    assert f"error: tokenizer {tmp_path / 'bad.model'} cannot be loaded" in err and "Traceback" not in err
    # another tokenizer of the same size loads, and would print other text: refused when the model has its own
    import sentencepiece as spm
    (tmp_path / "text.txt").write_text("\n".join(f"line {i} of some other text, with other words {i * 7}"
                                                 for i in range(400)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "other"),
                                   vocab_size=200, model_type="bpe", eos_id=1, bos_id=-1, minloglevel=2)
    model = _model_dir(tmp_path / "model200", 200, tokenizer)
    assert main([str(model), "--prompt", "x", "--tokenizer", str(tmp_path / "other.model")]) == 2
    assert f"--tokenizer {tmp_path / 'other.model'} is not the model's own {model / 'tokenizer.model'}" in \
        capsys.readouterr().err
    assert main([str(model), "--prompt", "x", "--tokenizer", tokenizer, "--max-new-tokens", "0"]) == 0


def test_evaluate_without_anything_to_do_or_a_path_is_refused(tmp_path, capsys):
    """--blimp none without --data would exit 0 having done nothing; a path that does not exist says so."""
    from moeut_ds.evaluate import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--blimp", "none"])
    assert e.value.code == 2 and "--blimp none without --data leaves nothing to evaluate" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), "--blimp", "none", "--data", str(tmp_path)]) == 2
    assert f"{tmp_path / 'nope'} does not exist: pass a run directory" in capsys.readouterr().err


def test_model_config_without_model_settings_is_refused(tmp_path, tokenizer):
    import json

    from moeut_ds.model_io import read_config

    model = _model_dir(tmp_path / "model", 200, tokenizer)
    meta = json.loads((model / "config.json").read_text())
    del meta["model"]
    (model / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='config.json has no "model" settings'):
        read_config(model)


def test_export_checks_out_and_tokenizer_before_the_checkpoint(tmp_path, capsys):
    """--tokenizer and --out are the user's; they are checked before the (long) consolidation, here before the
    missing checkpoint is even looked for."""
    from moeut_ds.export import main

    (tmp_path / "file.txt").write_text("keep me")
    assert main([str(tmp_path / "no-run"), "--out", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "no.model")]) == 2
    assert f"--tokenizer {tmp_path / 'no.model'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main([str(tmp_path / "no-run"), "--out", str(tmp_path / "file.txt" / "sub" / "m")]) == 2
    assert f"{tmp_path / 'file.txt'} is a file, not a directory: choose an --out" in capsys.readouterr().err
    assert (tmp_path / "file.txt").read_text() == "keep me"
