"""bench/bench_experts.py runs end to end at tiny shapes (Triton's interpreter on CPU, the kernels themselves on a
GPU): its sweeps and layer tables are the first GPU call of every session, and a Python error there costs device
minutes. Times are not checked; every row must be a time, not an error."""
import sys
from pathlib import Path

import pytest
import torch

from kernel_testing import DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_experts as B  # noqa: E402

FF = dict(d=64, n_experts=12, d_e=32, k=4)
ATT = dict(d=64, heads=2, n_experts=4, k=2, d_h=32)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(B, "DEV", DEVICE)
    monkeypatch.setattr(B, "TOKENS", 64)
    monkeypatch.setattr(B, "ms", lambda fn, rep=0: (fn(), 1.0)[1])     # run once; the time is not the point
    monkeypatch.setitem(B.FF_SHAPES, "244M", FF)
    monkeypatch.setitem(B.ATT_SHAPES, "244M", ATT)
    if DEVICE == "cpu":
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(B, "count_syncs", lambda fn: (fn(), 0)[1])    # torch's sync debug mode is CUDA-only


@pytest.mark.slow
def test_sweeps_and_layer_tables_run(tiny_1b, monkeypatch):
    rows: list = []
    B.sweep(FF, rows, defaults_only=True)
    B.sweep_att("244M", ATT, rows)
    B.sweep_order(rows)
    B.sweep_combine(rows)
    B.sweep_route(rows)
    B.bench_ff("tiny", FF, 1.0, rows, check=True)
    B.bench_att("tiny", ATT, 1.0, rows, check=True)
    assert [r for r in rows if "error" in r] == []
    if DEVICE == "cpu":
        monkeypatch.setattr(torch.cuda.profiler, "start", lambda: None)
        monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: None)
    B.profile_layers(["ff244"])
    names = " | ".join(r["what"] for r in rows)
    for what in ("down_dx_store_gated", "down_dx_plain", "down_dx_plain_scaled", "down_dx_masked_gate_grad",
                 "up_dx_nomask", "V dx + gated store",
                 "order FF 1B down_dx + mask + gate grad window order",
                 "order att 1B O dx (+gate grad) + gated store window order",
                 "order L2 W", "combine FF 1B up dx atomic, window order in 8 group(s)",
                 "V wgrad on gathered operands", "O fwd pair tiles",
                 "top-k rows", "route FF 244M: expert offsets", "FF tiny triton", "att V+O tiny triton"):
        assert what in names, what
    checks = [r for r in rows if r["what"].startswith("check")]
    assert checks and all(max(r["err"]) < 2e-2 for r in checks)     # bf16 kernels vs the fp32 reference
    splits = {r["what"]: r["split_ms"] for r in rows if "split_ms" in r}
    assert set(splits) == {"FF tiny triton kernels", "att V+O tiny triton kernels"}
    if DEVICE == "cuda":
        assert all(split["expert matmuls (ours)"] > 0 for split in splits.values())


@pytest.fixture
def tiny_1b(tiny, monkeypatch):
    """The sweeps that run both sizes: a second tiny shape as "1B"."""
    monkeypatch.setitem(B.FF_SHAPES, "1B", dict(FF, d=48, n_experts=9))
    monkeypatch.setitem(B.ATT_SHAPES, "1B", dict(ATT, d=48, heads=3))


@pytest.mark.slow
def test_tma_sweep_runs_and_matches_pointer_loads(tiny_1b):
    """--sweep-tma: every row a time, every TMA call's output equal to the pointer-load call's (to bf16 rounding)."""
    rows: list = []
    B.sweep_tma(rows)
    assert [r for r in rows if "error" in r] == []
    variants: list[list] = []       # per call: the TMA rows after its pointer-load row
    for r in rows:
        if "tma layer" in r["what"]:
            continue
        if "pointer loads" in r["what"]:
            variants.append([])
        else:
            variants[-1].append(r)
    # 8 matmul calls + 4 weight gradients per size; 4 TMA configs per resident-A call (which calls are resident
    # depends on the shape and device: d = 64 is a short K on a GPU), 3 per looping-K call and weight gradient
    assert len(variants) == 2 * (8 + 4) and all(len(v) in (3, 4) for v in variants)
    tma_rows = [r for v in variants for r in v]
    assert all("max_abs_diff" in r for r in tma_rows) and max(r["max_abs_diff"] for r in tma_rows) < 1e-2
    assert sum("tma layer" in r["what"] for r in rows) == 2 * 2 * 4
    assert B.GM._has_tma.__name__ == "_has_tma"      # restored


def test_wgrad_sweep_runs_and_every_config_matches_the_default(tiny_1b):
    """--sweep-wgrad: every variant of the four weight gradients a time, its result equal to the default config's
    (to fp32 summation order)."""
    rows: list = []
    B.sweep_wgrad(rows)
    assert [r for r in rows if "error" in r] == []
    diffs = [r["max_abs_diff"] for r in rows]
    assert len(diffs) == 2 * 4 * len(B.WGRAD_VARIANTS) and max(diffs) < 1e-3


def test_floor_sweep_runs_and_its_one_expert_call_matches_the_dense_matmul(tiny):
    """--sweep-floor (one size: the same code runs for both): every row a time, and the one-expert down forward (the
    dense analog the routed call is compared with) equal to h @ W to bf16 rounding."""
    rows: list = []
    B.sweep_floor(rows, sizes=("244M",))
    assert [r for r in rows if "error" in r] == []
    # two calls on the routed and the one-expert plan (and on gmm_kernel where the Gluon kernel is chosen), cuBLAS,
    # the fill
    gluon = B._floor_config(FF["d"], FF["d_e"], B.TritonBackend().block_m, True).gluon
    assert any("routed gmm_kernel" in r["what"] for r in rows) == gluon
    assert len(rows) == 2 * (3 if gluon else 2) + 2
    (one,) = [r for r in rows if "max_abs_diff_vs_cublas" in r]
    assert "down_fwd one expert" in one["what"] and one["max_abs_diff_vs_cublas"] < 2e-2


@pytest.mark.slow
def test_host_overhead_runs(tiny):
    """--host-overhead: a host time and a GPU time for every op, and the module's token count restored."""
    rows: list = []
    B.host_overhead(rows, tokens=32, calls=2)
    assert len(rows) == 6 and all(r["host_us"] > 0 and r["gpu_us"] > 0 for r in rows)
    assert B.TOKENS == 64


def test_unknown_layer_table_is_refused_before_any_gpu_work(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_experts.py", "--only", "ff244,ff99"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: pytest.fail("reached the GPU part"))
    with pytest.raises(SystemExit):
        B.main()
    assert "not ff99" in capsys.readouterr().err


def test_every_layer_table_names_a_shape_of_its_kind():
    for kind, size in B.LAYERS.values():
        assert size in (B.FF_SHAPES if kind == "ff" else B.ATT_SHAPES)
    assert all(d % 16 == 0 for shapes in (B.FF_SHAPES, B.ATT_SHAPES) for s in shapes.values()
               for d in (s["d"], s.get("d_h", 16)))       # widths as the kernels see them
