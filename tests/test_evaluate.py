"""evaluate / generate CLIs on a trained run (perplexity, BLiMP accuracy, sampled text)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

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


def test_blimp_pairs_good_with_bad(tmp_path):
    """blimp() scores all sentences in one pass; its bookkeeping matches scoring goods and bads separately."""
    import sentencepiece as spm

    from moeut_ds.evaluate import DEFAULT_BLIMP, blimp, read_blimp, sentence_logprobs

    data = read_blimp(DEFAULT_BLIMP, max_pairs=2)
    text = tmp_path / "blimp.txt"
    text.write_text("\n".join(s for pairs in data.values() for pair in pairs for s in pair))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=200,
                                   model_type="unigram", eos_id=1, bos_id=-1, minloglevel=2)
    tok = str(tmp_path / "tok.model")
    sp, model = spm.SentencePieceProcessor(model_file=tok), _tiny_model(200).eval()
    acc = blimp(model, tok, DEFAULT_BLIMP, max_pairs=2)
    good, bad = (iter(sentence_logprobs(model, sp.encode([pair[j] for pairs in data.values() for pair in pairs]), 1))
                 for j in (0, 1))
    want = {paradigm: sum(next(good) > next(bad) for _ in pairs) / len(pairs) for paradigm, pairs in data.items()}
    assert {k: v for k, v in acc.items() if k != "average"} == want and len(set(want.values())) > 1
    assert acc["average"] == pytest.approx(sum(want.values()) / 67)
