"""evaluate / generate CLIs on a trained run (perplexity, BLiMP accuracy, sampled text)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
