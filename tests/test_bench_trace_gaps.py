"""bench/trace_gaps.py on a hand-made trace whose busy time, gaps and syncs are known."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from trace_gaps import summarize  # noqa: E402


def _x(name: str, cat: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": 0}


def test_busy_idle_gaps_and_syncs(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": [
        _x("opt", "cpu_op", 2000, 1000),                 # host op covering the 1 ms gap (us units)
        _x("inner", "cpu_op", 2500, 100),                # nested, starts after the gap does: not reported
        _x("k1", "kernel", 0, 1000), _x("k2", "kernel", 500, 1500),    # overlap: busy [0, 2000]
        _x("copy", "gpu_memcpy", 3000, 500),             # busy [3000, 3500]
        _x("cudaStreamSynchronize", "cuda_runtime", 2600, 300),
        # a device-to-device copy is queued, not waited for (torch.sort's): not a sync
        dict(_x("cudaMemcpyAsync", "cuda_runtime", 2700, 50), args={"correlation": 7}),
        dict(_x("Memcpy DtoD (Device -> Device)", "gpu_memcpy", 3000, 1), args={"correlation": 7}),
        # a device-to-host copy is
        dict(_x("cudaMemcpyAsync", "cuda_runtime", 2800, 100), args={"correlation": 8}),
        dict(_x("Memcpy DtoH (Device -> Pageable)", "gpu_memcpy", 3001, 1), args={"correlation": 8}),
        {"ph": "i", "name": "marker", "ts": 10},         # not a complete event: ignored
    ]}))
    s = summarize(trace)
    assert s["span_ms"] == pytest.approx(3.5)
    assert s["device_busy_ms"] == pytest.approx(2.5)
    assert s["idle_ms"] == pytest.approx(1.0)
    assert s["sync_calls"] == 2 and s["sync_wait_ms"] == pytest.approx(0.4)
    assert s["gaps"] == [{"ms": 1.0, "at_ms": 2.0, "host_op": "opt"}]


def test_trace_without_device_events_is_refused(tmp_path):
    trace = tmp_path / "cpu.json"
    trace.write_text(json.dumps({"traceEvents": [_x("aten::mm", "cpu_op", 0, 10)]}))
    with pytest.raises(ValueError, match="no device events"):
        summarize(trace)
