"""Data-parallel gradients equal single-process gradients; export of ZeRO checkpoints gives the engine's logits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_harness import REPO, Ranks, data_dir, tiny_overrides  # noqa: F401

GRAD_WORKER = r'''
import json, os, sys
import torch
from deepspeed.utils import safe_get_full_grad
from moeut_ds.model import LanguageModel
from moeut_ds.data import WindowLoader
from moeut_ds.train.config import load_run_config
from moeut_ds.train.loop import Trainer, cross_entropy
from moeut_ds.train.distributed import barrier, release_cpu_shm_buffer

cfg = load_run_config(None, json.loads(sys.argv[1]))
t = Trainer(cfg, "none"); t.setup()
engine = t.engine
batch = next(t.loader)
out = engine(batch[:, :-1]); loss = cross_entropy(out.logits, batch[:, 1:]) + out.reg_loss
engine.backward(loss)
grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
engine.step()
norm = float(engine.get_global_grad_norm())
if t.dist.rank == 0:
    torch.manual_seed(cfg.seed)
    ref = LanguageModel(t.mcfg, expert_backend=cfg.expert_backend).train()
    full = next(WindowLoader(t.train_ds, cfg.data.context, cfg.train.global_batch, 0, 1, seed=cfg.seed))
    o = ref(full[:, :-1]); (cross_entropy(o.logits, full[:, 1:]) + o.reg_loss).backward()
    rel = {n: ((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
           for n, p in ref.named_parameters()}
    print("worst", sorted(rel.items(), key=lambda kv: -kv[1])[:6], flush=True)
    worst = max(rel.values())
    ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()])).item()
    json.dump({"worst_rel": worst, "norm": norm, "ref_norm": ref_norm}, open(sys.argv[2], "w"))
# end the way the trainer does: no rank tears down its process group while a peer is still working
barrier()
release_cpu_shm_buffer(t.dist.rank)
'''

EXPORT_WORKER = r'''
import json, sys
import torch
from safetensors.torch import save_file
from moeut_ds.train.config import load_run_config
from moeut_ds.train.loop import Trainer

cfg = load_run_config(None, json.loads(sys.argv[1]))
t = Trainer(cfg, "none")
assert t.run() == 0
from moeut_ds.data import open_dataset
x = next(iter(open_dataset(cfg.data.path, "val").eval_windows(cfg.data.context, 4)))[:, :-1]
t.engine.eval()
with torch.no_grad():
    logits = t.engine(x).logits
if t.dist.rank == 0:
    save_file({"x": x.contiguous(), "logits": logits.contiguous()}, sys.argv[2])
'''


def _run_worker(tmp_path, source: str, world: int, overrides: list[str]) -> None:
    script = tmp_path / "worker.py"
    script.write_text(source)
    with Ranks([sys.executable, str(script), json.dumps(overrides), str(tmp_path / "result")], world,
               tmp_path / "logs") as job:
        rcs = job.wait(240)
        assert rcs == [0] * world, job.report(rcs)


@pytest.mark.slow
@pytest.mark.parametrize("stage,reg", [(2, True), (3, False), (3, True)])
def test_data_parallel_gradients_equal_single_process(tmp_path, data_dir, stage, reg):
    over = tiny_overrides(data_dir, tmp_path / "run", **{"deepspeed_config": f"ds_configs/zero{stage}.json",
                                                         "train.global_batch": 4, "optim.grad_clip": 0.0})
    over.append("deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0")
    if not reg:
        over += ["model.ff_entropy_reg=0.0", "model.att_entropy_reg=0.0"]
    _run_worker(tmp_path, GRAD_WORKER, 2, over)
    res = json.loads((tmp_path / "result").read_text())
    assert res["worst_rel"] < 1e-5, res
    assert res["norm"] == pytest.approx(res["ref_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage,world", [(3, 2), (0, 1)])
def test_export_then_load_gives_engine_logits(tmp_path, data_dir, stage, world):
    over = tiny_overrides(data_dir, tmp_path / "run", **{"deepspeed_config": f"ds_configs/zero{stage}.json",
                                                         "train.steps": 3, "eval.at_end": False})
    over.append("deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0")
    _run_worker(tmp_path, EXPORT_WORKER, world, over)
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "moeut_ds.export", str(tmp_path / "run"), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.model").is_file() and "exported step 3" in r.stdout
    from moeut_ds import load_model

    model = load_model(out)
    ref = load_file(str(tmp_path / "result"))
    with torch.no_grad():
        logits = model(ref["x"]).logits
    assert torch.equal(logits, ref["logits"])
    r = subprocess.run([sys.executable, "-m", "moeut_ds.export", str(tmp_path / "run"), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "exists" in r.stderr
