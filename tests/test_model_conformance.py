"""Conformance with the authors' implementation (tests/data/reference_moeut_tiny_g3.pt) and the importer."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeut_ds import ConfigError, load_model
from moeut_ds.convert import convert_state_dict, model_from_reference

GOLDEN = Path(__file__).parent / "data" / "reference_moeut_tiny_g3.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_logits_regulariser_and_gradients_match_reference(golden):
    model = model_from_reference(golden["state_dict"], golden["args"], "reference")
    tokens = golden["tokens"]
    model.eval()
    assert rel_err(model(tokens).logits, golden["logits_eval"]) < 1e-5
    model.train()
    out = model(tokens)
    assert rel_err(out.logits, golden["logits_train"]) < 1e-5
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert ce.item() == pytest.approx(float(golden["ce"]), rel=1e-5)
    assert out.reg_loss.item() == pytest.approx(float(golden["reg_loss"]), rel=1e-5)
    (ce + out.reg_loss).backward()
    params = dict(model.named_parameters())
    grads = convert_state_dict(golden["grads"])
    assert set(grads) == set(params)
    for name, g in grads.items():
        assert rel_err(params[name].grad, g) < 1e-5, name


def test_convert_cli_round_trip(golden, tmp_path):
    torch.save(golden["state_dict"], tmp_path / "ref.pt")
    (tmp_path / "args.json").write_text(json.dumps(golden["args"]))
    subprocess.run([sys.executable, "-m", "moeut_ds.convert", "--from-reference", str(tmp_path / "ref.pt"),
                    "--reference-args", str(tmp_path / "args.json"), "--out", str(tmp_path / "model")], check=True)
    model = load_model(tmp_path / "model", expert_backend="reference")
    assert not model.training
    assert rel_err(model(golden["tokens"]).logits, golden["logits_eval"]) < 1e-5


def test_convert_rejects_mismatched_args(golden, tmp_path):
    args = dict(golden["args"], n_tokens=301)          # vocabulary size that does not match the weights
    with pytest.raises(ConfigError, match="embedding.weight: checkpoint shape"):
        model_from_reference(golden["state_dict"], args)
    torch.save(golden["state_dict"], tmp_path / "ref.pt")
    (tmp_path / "args.json").write_text(json.dumps(dict(golden["args"], group_size=4)))
    r = subprocess.run([sys.executable, "-m", "moeut_ds.convert", "--from-reference", str(tmp_path / "ref.pt"),
                        "--reference-args", str(tmp_path / "args.json"), "--out", str(tmp_path / "m")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not divisible by group_size=4" in r.stderr
    assert not (tmp_path / "m").exists()


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model directory .*/nope does not exist"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("damage,msg", [
    ("config_truncated", "config.json is not valid JSON"),
    ("weights_truncated", "model.safetensors cannot be read .*truncated"),
    ("config_edited", r"model.safetensors does not match .*config.json \(size mismatch for "),
])
def test_load_model_damaged_dir(golden, tmp_path, damage, msg):
    """One ValueError naming the file and the fix (re-export), not a safetensors/torch traceback."""
    from moeut_ds.model_io import save_model

    path = save_model(model_from_reference(golden["state_dict"], golden["args"], "reference"), tmp_path / "m")
    cfg, weights = path / "config.json", path / "model.safetensors"
    if damage == "config_truncated":
        cfg.write_text(cfg.read_text()[:100])
    elif damage == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        meta = json.loads(cfg.read_text())
        meta["model"]["vocab_size"] += 8
        cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{msg}.*re-export the model with `python -m moeut_ds.export"):
        load_model(path)


def test_post_ln_model_in_the_old_layout_is_named(golden, tmp_path):
    """A post-LN export from before the layout change (final LayerNorm kept) is reported as such, not as edited."""
    from moeut_ds.model_io import save_model

    model = model_from_reference(golden["state_dict"], golden["args"], "reference")
    path = save_model(model, tmp_path / "m")                # a peri-LN model: has out_norm.*
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["norm"] = "post"
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="post-LN model in the layout before 2026-11-28"):
        load_model(path)
