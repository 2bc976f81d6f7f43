"""bench/bench_trainer.py trains, in its trainer run, the model of its plain loop: the run config is the preset's."""
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_trainer as B  # noqa: E402


@pytest.mark.parametrize("preset", ["moeut-44m", "dense-126m", "moeut-244m", "moeut-1b"])
def test_trainer_run_config_is_the_presets(preset):
    cfg = yaml.safe_load(B.trainer_config(preset).read_text())
    assert cfg["model"]["preset"] == preset


def test_preset_without_a_run_config_is_refused_by_name():
    with pytest.raises(SystemExit, match="moeut-244m-g1.*presets with one:.*moeut-126m"):
        B.trainer_config("moeut-244m-g1")
