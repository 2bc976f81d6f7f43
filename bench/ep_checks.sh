#!/usr/bin/env bash
# The expert-parallel measurements of issue 7 on the GPUs of one host (kind nvidia-h200-x2), each run under its own
# time limit, whole logs under OUT_DIR and every run's RESULT line printed (tar OUT_DIR to take the results away).
#
#   bash bench/ep_checks.sh OUT_DIR 1b    # MoEUT-1B: one GPU and ep=2 (all-gather dispatch) at micro 8, 16 and
#                                         # 32 (the ep=2 step at 32 profiled), the all-to-all dispatch at 16 and
#                                         # 32, ep=1 at 8 (~6 min)
#   bash bench/ep_checks.sh OUT_DIR 8b    # MoEUT-8B at ep=2, micro-batch 4 then 6 (8 runs out of memory; up to
#                                         # 2 x 270 s)
#   bash bench/ep_checks.sh OUT_DIR 8b-trainer   # MoEUT-8B through the trainer (ZeRO-2 + ep=2, micro-batch 4) on
#                                         # the bundled English text, killed after 10 logged steps so that it never
#                                         # writes its ~100 GB checkpoint (~5 min, most of it the first step)
#
# Needs torch and triton importable by $PYTHON (default python3; on the GPU image: the carried wheels unpacked on
# PYTHONPATH) and two GPUs.
# EP_CHECKS_ARGS (e.g. "--cpu --preset moeut-tiny --context 32") replaces the preset and runs every step on CPU
# ranks over gloo: the smoke test of this script (tests/test_bench_expert_parallel.py). For 8b-trainer,
# EP_CHECKS_LAUNCH_ARGS goes to launch/local.sh (e.g. --cpu) and EP_CHECKS_TRAIN_ARGS (key=value) to the trainer.
set -u
[ $# -eq 2 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
out=$1; part=$2
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
extra=${EP_CHECKS_ARGS:-}
py=${PYTHON:-python3}

run() {   # run NAME SECONDS GPUS ARGS...: one benchmark run, its output kept whole, its RESULT line printed
  local name=$1 limit=$2 gpus=$3; shift 3
  local launch=("$py" bench/bench_expert_parallel.py)
  [ "$gpus" -gt 1 ] && launch=("$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" \
    bench/bench_expert_parallel.py)
  echo "== $name ($(date -u +%T))"
  # shellcheck disable=SC2086  # $extra is a list of arguments
  # stderr apart: another rank's warning written while rank 0 prints RESULT could share its line (seen in CI with
  # the profiler's warning of the traced run)
  timeout "$limit" "${launch[@]}" "$@" $extra > "$out/$name.log" 2> "$out/$name.err"
  echo "rc=$?"; grep '^RESULT' "$out/$name.log" || tail -n 5 "$out/$name.log" "$out/$name.err"
}

descendants() {  # descendants PID: PID and every process below it (torchrun starts each rank in its own session)
  local child
  for child in $(ps -o pid= --ppid "$1"); do descendants "$child"; done
  echo "$1"
}

train_until() {   # train_until RUN_DIR STEPS SECONDS LOCAL_SH_ARGS...: a trainer run, killed (with every process
  local run=$1 steps=$2 limit=$3 n=0; shift 3   # below it) once metrics.jsonl has STEPS steps or after SECONDS
  echo "== $(basename "$run") ($(date -u +%T))"
  MOEUT_PYTHON=$py bash launch/local.sh "$@" run_dir="$run" > "$run.log" 2>&1 &
  local pid=$! t0; t0=$(date +%s)
  while kill -0 "$pid" 2> /dev/null; do
    sleep 2
    [ -f "$run/metrics.jsonl" ] && n=$(grep -c '"train/loss"' "$run/metrics.jsonl")
    if [ "$n" -ge "$steps" ] || [ $(($(date +%s) - t0)) -ge "$limit" ]; then
      # shellcheck disable=SC2046  # one PID per word
      kill -9 $(descendants "$pid") 2> /dev/null; break
    fi
  done
  wait "$pid" 2> /dev/null
  # killed CPU ranks leave DeepSpeed's shared-memory all-reduce segments (~66 MB each) in RAM (docs/TRAINING.md),
  # named by the port that local.sh chose and logged
  local port; port=$(grep -om1 'MASTER_PORT=[0-9]*' "$run.log" | cut -d= -f2)
  [ -n "$port" ] && rm -f /dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_"${port}"_*
  echo "logged steps: $n after $(($(date +%s) - t0)) s (MASTER_PORT=$port)"
  [ "$n" -gt 0 ] || { tail -n 20 "$run.log"; return 1; }
  "$py" - "$run/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "train/loss" not in r:   # the start event, validation rows
        continue
    print("STEP", json.dumps({k: v for k, v in r.items() if k in (
        "step", "train/loss", "perf/step_time_s", "perf/tokens_per_s", "mem/gpu_peak_gib")}))
PY
}

case $part in
  1b)
    p=(--preset moeut-1b --steps 5 --warmup 2)
    for m in 8 16 32; do run "one_gpu_m$m" 120 1 "${p[@]}" --micro "$m"; done
    run ep1_m8 150 2 "${p[@]}" --micro 8 --ep 1
    for m in 8 16; do run "ep2_allgather_m$m" 150 2 "${p[@]}" --micro "$m" --ep 2 --dispatch allgather; done
    run ep2_allgather_m32_trace 180 2 "${p[@]}" --micro 32 --ep 2 --dispatch allgather --trace "$out/trace_ep2_m32"
    for m in 16 32; do run "ep2_alltoall_m$m" 150 2 "${p[@]}" --micro "$m" --ep 2 --dispatch alltoall; done ;;
  8b)
    for m in 4 6; do run "ep2_8b_m$m" 270 2 --preset moeut-8b --micro "$m" --ep 2 --steps 3 --warmup 1; done ;;
  8b-trainer)
    data=$out/data8k
    "$py" -m data_prep.prepare --input 'data/english/*.txt.gz' --out "$data" --vocab-size 8000 --workers 4 \
      > "$out/prepare.log" 2>&1 || { tail -n 20 "$out/prepare.log"; exit 1; }
    # shellcheck disable=SC2086  # the two variables are lists of arguments
    train_until "$out/train_8b_m4" 10 560 --nproc 2 --no-resume ${EP_CHECKS_LAUNCH_ARGS:-} configs/moeut_1b_gpu.yaml \
      train.compile=false model.preset=moeut-8b expert_parallel_size=2 deepspeed_config=ds_configs/zero2_bf16.json \
      data.path="$data" train.steps=200 train.global_batch=8 train.micro_batch=4 eval.every=0 eval.at_end=false log.every=1 \
      log.expert_stats_every=0 checkpoint.every=0 ${EP_CHECKS_TRAIN_ARGS:-} ;;
  *) echo "part must be 1b, 8b or 8b-trainer" >&2; exit 2 ;;
esac
