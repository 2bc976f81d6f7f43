"""Run-config errors name the key and the fix; overrides; schedule."""
from __future__ import annotations

import pytest

from moeut_ds.config import ConfigError
from moeut_ds.train.config import REPO_ROOT, load_run_config
from moeut_ds.train.schedule import lr_factor

OK = ["data.path=/some/data"]


@pytest.mark.parametrize("overrides,message", [
    ([], "data.path is empty"),
    (OK + ["train.stepz=3"], "unknown config key 'train.stepz'"),
    (OK + ["bogus=1"], "unknown config key 'bogus'"),
    (OK + ["train.steps=ten"], "train.steps='ten': expected an integer"),
    (OK + ["train.steps=true"], "train.steps=True: expected an integer"),
    (OK + ["optim.lr=null"], "optim.lr=None: expected a finite number"),
    (OK + ["optim.lr=.inf"], "optim.lr=inf: expected a finite number"),
    (OK + ["optim.betas=[a, b]"], "optim.betas\\[0\\]='a': expected a finite number"),
    (OK + ["optim.betas=[0.9]"], "optim.betas=\\[0.9\\]: expected a list of 2 values"),
    (OK + ["checkpoint.keep_last=null"], "checkpoint.keep_last=None: expected an integer"),
    (OK + ["checkpoint.dir=5"], "checkpoint.dir=5: expected a string"),
    (OK + ["run_dir=null"], "run_dir=None: expected a string"),
    (OK + ["log.peak_tflops=abc"], "log.peak_tflops='abc': expected a finite number"),
    (OK + ["debug.nan_steps=[1, x]"], "debug.nan_steps\\[1\\]='x': expected an integer"),
    (OK + ["model.rope_base=abc"], "model: rope_base='abc': expected a finite number"),
    (OK + ["model.norm=mid"], "model: norm='mid': must be one of 'peri', 'pre', 'post'"),
    (OK + ["train.steps=0"], "train.steps=0: must be a positive integer"),
    (OK + ["train.micro_batch=128"], "train.micro_batch=128 > train.global_batch=64"),
    (OK + ["optim.betas=[0.9, 1.5]"], "optim.betas"),
    (OK + ["optim.lr=-1"], "optim.lr=-1.0: must be > 0"),
    (OK + ["checkpoint.keep_last=0"], "checkpoint.keep_last=0"),
    (OK + ["deepspeed_config=nope.json"], "deepspeed_config='nope.json': no such file"),
    (OK + ["model.preset=moeut-huge"], "unknown preset 'moeut-huge'"),
    (OK + ["expert_backend=bogus"], "expert_backend='bogus': use one of auto, reference"),
    (OK + ["expert_dispatch=broadcast"], "expert_dispatch='broadcast': use one of auto, allgather, alltoall"),
    (OK + ["expert_combine=sum"], "expert_combine='sum': use buffer"),
    (OK + ["expert_combine=atomic", "expert_backend=reference"], "expert_combine=atomic needs the triton expert"),
    (OK + ["expert_combine=atomic", "expert_parallel_size=2"], "expert_combine=atomic with expert_parallel_size=2"),
    (OK + ["log.profile_step=-1"], "log.profile_step=-1: must be an integer >= 0"),
    (OK + ["model.n_layers=5"], "n_layers=5 is not divisible by group_size=2"),
    (OK + ["model.colour=3"], "model: .*colour"),
    (OK + ["train.steps"], "is not key=value"),
    (OK + ["train.cuda_graphs=true"], "train.cuda_graphs=true replays torch.compile's graphs: set train.compile"),
])
def test_invalid_config_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_optional_and_number_fields_take_their_types():
    """null where the field is optional, ints for floats (converted), lists for tuples."""
    cfg = load_run_config(None, OK + ["eval.max_windows=null", "log.peak_tflops=100", "optim.betas=[0, 0.5]",
                                      "model.rope_base=500"])
    assert cfg.eval.max_windows is None and cfg.log.peak_tflops == 100.0 and type(cfg.log.peak_tflops) is float
    assert cfg.optim.betas == (0.0, 0.5) and cfg.model_config().rope_base == 500.0


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- train.steps: 3\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of config keys .*got a list"):
        load_run_config(str(tmp_path / "list.yaml"), OK)


def test_accumulation_must_divide(tmp_path):
    cfg = load_run_config(None, OK + ["train.global_batch=8", "train.micro_batch=2"])
    assert cfg.accumulation(2) == 2 and cfg.accumulation(4) == 1
    with pytest.raises(ConfigError, match="global_batch=8 is not a multiple of train.micro_batch=2 x world size 3"):
        cfg.accumulation(3)


def test_yaml_plus_overrides_and_ds_config_ownership(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data: {path: /d, context: 32}\nmodel: {preset: dense-tiny}\ntrain: {steps: 7}\n")
    cfg = load_run_config(str(y), ["train.steps=9", "model.d_ff=256", "optim.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 9 and cfg.data.context == 32 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model_config().arch == "dense" and cfg.model_config().d_ff == 256
    from moeut_ds.train.loop import build_ds_config

    ds = build_ds_config(cfg, 1)
    assert ds["gradient_clipping"] == 0.25 and ds["optimizer"]["params"]["torch_adam"] is True
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_batch_size": 32, "zero_optimization": {"stage": 1}}')
    cfg = load_run_config(str(y), [f"deepspeed_config={bad}"])
    with pytest.raises(ConfigError, match="sets 'train_batch_size', which the run config owns"):
        build_ds_config(cfg, 1)
    with pytest.raises(ConfigError, match="--config .*: no such file"):
        load_run_config(str(tmp_path / "missing.yaml"))


def test_shipped_configs_load():
    for y in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        cfg = load_run_config(str(y))
        cfg.model_config()


def test_schedule_warmup_then_cosine_to_min():
    assert lr_factor(0, 4, 100, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 4, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 100, 0.1) == pytest.approx(1.0)
    mid = lr_factor(4 + 95 // 2, 4, 100, 0.1)
    assert 0.5 < mid < 0.6


def test_ds_config_timer_off_and_cuda_graphs_checks():
    """DeepSpeed's throughput timer is off in every run (it syncs the device per micro-batch, inside the traced
    forward when compiled); CUDA graphs refuse ZeRO-2 without contiguous gradients (DeepSpeed would keep the
    graphs' gradient outputs across micro-batches)."""
    from moeut_ds.train.loop import build_ds_config

    graphs = OK + ["train.compile=true", "train.cuda_graphs=true"]
    for over in (graphs + ["deepspeed_config=ds_configs/zero2_bf16.json"], OK):
        assert build_ds_config(load_run_config(None, over), 1)["timers"]["throughput"]["enabled"] is False
    split = graphs + ["deepspeed_config=ds_configs/zero2.json",
                      "deepspeed_overrides.zero_optimization.contiguous_gradients=false"]
    with pytest.raises(ConfigError, match="cuda_graphs=true at ZeRO-2 needs contiguous_gradients"):
        build_ds_config(load_run_config(None, split), 1)
    ds = build_ds_config(load_run_config(None, split[:-1] + [split[-1].replace("=false", "=true")]), 1)
    assert ds["zero_optimization"]["contiguous_gradients"] is True


def test_ds_config_zero_stage_must_exist():
    from moeut_ds.train.loop import build_ds_config

    with pytest.raises(ConfigError, match="zero_optimization.stage=7: use 0, 1, 2 or 3"):
        build_ds_config(load_run_config(None, OK + ["deepspeed_overrides.zero_optimization.stage=7"]), 1)
    assert build_ds_config(load_run_config(None, OK + ["deepspeed_overrides.zero_optimization.stage=1"]),
                           1)["zero_optimization"]["stage"] == 1
