"""Where the GPU idles in a profiled step: read a torch.profiler Chrome trace (log.profile_step, or
bench_trainer's plain-loop profile) and report device busy vs idle time, the host syncs, and the longest idle gaps
with the host op that was running when each began.

    python bench/trace_gaps.py TRACE.json [--top 12]

A step is GPU-bound when idle is a few percent of the span; a long gap right after a synchronising call
(cudaStreamSynchronize, a device-to-host copy) is host work the GPU waits for and is the place to look.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNC_NAMES = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent")


def _is_sync(call: dict, device_copies: dict[int, str]) -> bool:
    """A runtime call the host may wait in. A device-to-device copy (torch.sort copies its input that way) is
    queued like a kernel, so a copy call counts only when its device copy, matched by correlation id, is not
    DtoD."""
    if call.get("cat") != "cuda_runtime" or not any(s in call["name"] for s in SYNC_NAMES):
        return False
    copy = device_copies.get(call.get("args", {}).get("correlation"), "")
    return "DtoD" not in copy


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def summarize(trace: Path, top: int = 12) -> dict:
    """Span, device-busy and idle time (ms), sync calls, and the `top` longest idle gaps."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    dev = _merge([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_CATS])
    if not dev:
        raise ValueError(f"{trace}: no device events (was the step profiled on a GPU?)")
    host_ops = [e for e in events if e.get("cat") == "cpu_op"]
    start = min([dev[0][0]] + [e["ts"] for e in host_ops])
    end = dev[-1][1]
    busy = sum(e - s for s, e in dev)
    gaps = sorted(((dev[i + 1][0] - dev[i][1], dev[i][1]) for i in range(len(dev) - 1)), reverse=True)[:top]

    def host_at(t: float) -> str:
        """The innermost host op running at time t (shortest covering cpu_op)."""
        cover = [e for e in host_ops if e["ts"] <= t <= e["ts"] + e["dur"]]
        return min(cover, key=lambda e: e["dur"])["name"] if cover else "-"

    copies = {e["args"]["correlation"]: e["name"] for e in events
              if e.get("cat") == "gpu_memcpy" and "correlation" in e.get("args", {})}
    syncs = [e for e in events if _is_sync(e, copies)]
    return {"span_ms": (end - start) / 1e3, "device_busy_ms": busy / 1e3, "idle_ms": (end - start - busy) / 1e3,
            "lead_in_ms": (dev[0][0] - start) / 1e3,
            "sync_calls": len(syncs), "sync_wait_ms": sum(e["dur"] for e in syncs) / 1e3,
            "gaps": [{"ms": round(g / 1e3, 3), "at_ms": round((t - start) / 1e3, 2), "host_op": host_at(t)}
                     for g, t in gaps]}


def format_summary(name: str, s: dict) -> str:
    lines = [f"{name}: span {s['span_ms']:.1f} ms, device busy {s['device_busy_ms']:.1f} ms, idle "
             f"{s['idle_ms']:.1f} ms (lead-in {s['lead_in_ms']:.1f}), {s['sync_calls']} sync calls "
             f"({s['sync_wait_ms']:.1f} ms waiting)"]
    lines += [f"  gap {g['ms']:8.3f} ms at {g['at_ms']:8.2f} ms  during {g['host_op']}" for g in s["gaps"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    for t in args.traces:
        print(format_summary(t.name, summarize(t, args.top)))


if __name__ == "__main__":
    main()
