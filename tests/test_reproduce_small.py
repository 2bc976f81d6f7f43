"""CI smoke test of bench/reproduce_small.py at toy scale: data -> six trainings -> evaluation -> one table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_small_toy_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "bench/reproduce_small.py", "--scale", "toy", "--gpus", "0", "--out",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    names = [row["model"] for row in res["table"]]
    assert names == ["moeut", "dense", "sigma-moe", "moeut-g1", "moeut-pre", "moeut-post"]
    for row in res["table"]:
        assert row["tokens"] == res["steps"] * res["batch"] * res["context"]      # identical token budgets
        assert 1 < row["val_ppl"] < 400 and 0 <= row["blimp"] <= 1               # vocab 400: trained below uniform
    assert "| moeut |" in (tmp_path / "results.md").read_text()
