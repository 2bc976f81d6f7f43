#!/usr/bin/env bash
# The expert-parallel measurements of issue 7 on the GPUs of one host (kind nvidia-h200-x2), each run under its own
# time limit, whole logs under OUT_DIR and every run's RESULT line printed (tar OUT_DIR to take the results away).
#
#   bash bench/ep_checks.sh OUT_DIR 1b    # MoEUT-1B: one GPU and ep=2 at micro 8, 16 and 32 (a profiled ep=2
#                                         # step at 8), ep=1 at 8 (~5 min)
#   bash bench/ep_checks.sh OUT_DIR 8b    # MoEUT-8B at ep=2, micro-batch 4 then 6 (8 runs out of memory; up to
#                                         # 2 x 270 s)
#
# Needs torch and triton importable by $PYTHON (default python3; on the GPU image: the carried wheels unpacked on
# PYTHONPATH) and two GPUs.
# EP_CHECKS_ARGS (e.g. "--cpu --preset moeut-tiny --context 32") replaces the preset and runs every step on CPU
# ranks over gloo: the smoke test of this script (tests/test_bench_expert_parallel.py).
set -u
[ $# -eq 2 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
out=$1; part=$2
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
extra=${EP_CHECKS_ARGS:-}
py=${PYTHON:-python3}

run() {   # run NAME SECONDS GPUS ARGS...: one benchmark run, its log kept whole, its RESULT line printed
  local name=$1 limit=$2 gpus=$3; shift 3
  local launch=("$py" bench/bench_expert_parallel.py)
  [ "$gpus" -gt 1 ] && launch=("$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" \
    bench/bench_expert_parallel.py)
  echo "== $name ($(date -u +%T))"
  # shellcheck disable=SC2086  # $extra is a list of arguments
  timeout "$limit" "${launch[@]}" "$@" $extra > "$out/$name.log" 2>&1
  echo "rc=$?"; grep '^RESULT' "$out/$name.log" || tail -n 5 "$out/$name.log"
}

case $part in
  1b)
    p=(--preset moeut-1b --steps 5 --warmup 2)
    for m in 8 16 32; do run "one_gpu_m$m" 120 1 "${p[@]}" --micro "$m"; done
    run ep1_m8 150 2 "${p[@]}" --micro 8 --ep 1
    run ep2_m8_trace 180 2 "${p[@]}" --micro 8 --ep 2 --trace "$out/trace_ep2_m8"
    for m in 16 32; do run "ep2_m$m" 150 2 "${p[@]}" --micro "$m" --ep 2; done ;;
  8b)
    for m in 4 6; do run "ep2_8b_m$m" 270 2 --preset moeut-8b --micro "$m" --ep 2 --steps 3 --warmup 1; done ;;
  *) echo "part must be 1b or 8b" >&2; exit 2 ;;
esac
