#!/usr/bin/env bash
# One pass of GPU checks and benchmarks on a single GPU, each step under its own time limit, logs and JSON under
# OUT_DIR (tar it to take the results away): the kernel tests compiled for the GPU, the expert-layer table (FF and
# SwitchHead at 244M and 1B; MegaBlocks' row when its source archives are given), the time of each kernel call of
# the FF and SwitchHead layers at 244M with the chosen configs (and the gathering FF calls in expert vs window tile
# order), the calls and layers with and without TMA loads (--sweep-tma, 244M and 1B), and the compiled 244M
# full-step rows with their kernel-time profile.
#
#   bash bench/gpu_checks.sh OUT_DIR [MEGABLOCKS_SRC_DIR]
#
# Needs torch, triton and pytest importable (on the GPU image: the carried wheels unpacked on PYTHONPATH) and
# TORCH_CUDA_ARCH_LIST=9.0 where the image sets 9.0a. ~5 minutes on one H200 in the fifth session, plus ~2 for
# --sweep-tma; the MegaBlocks build adds 3.4 min, which no longer fits one 600 s call with the rest. Give the call
# room for the archive step after it, or results are lost with a killed call.
set -u
[ $# -ge 1 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
out=$1; mb_src=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"

step() {   # step NAME SECONDS CMD...: run with a limit, keep the whole log, print its tail
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T)): $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "rc=$?"; tail -n "${TAILN:-6}" "$out/$name.log"
}

# kernel tests compiled for this GPU, in 4 parallel shards (Triton compiles dominate)
python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels_experts.py tests/test_kernels_rows.py \
  tests/test_kernels_gluon.py \
  2>/dev/null | grep '::' > "$out/kernel_test_ids"
for i in 0 1 2 3; do
  (awk "NR % 4 == $i" "$out/kernel_test_ids" | xargs env TRITON_INTERPRET=0 timeout 240 python3 -m pytest -q \
    -p no:cacheprovider > "$out/kernel_tests_$i.log" 2>&1; echo "rc=$?" >> "$out/kernel_tests_$i.log") &
done
wait
echo "== kernel tests on the GPU ($(wc -l < "$out/kernel_test_ids") collected)"
for i in 0 1 2 3; do tail -n 2 "$out/kernel_tests_$i.log"; done

if [ -n "$mb_src" ]; then
  step megablocks_build 300 bash bench/build_megablocks.sh build "$mb_src" /tmp/megablocks_site
  export PYTHONPATH="/tmp/megablocks_site:$PYTHONPATH"
fi
TAILN=14 step experts 200 python3 bench/bench_experts.py --only ff244,att,ff1b,att1b --json "$out/experts.json"
TAILN=70 step sweeps 240 python3 bench/bench_experts.py --only none --sweep defaults --sweep-att 244M --sweep-order \
  --json "$out/sweeps.json"
TAILN=70 step sweep_tma 240 python3 bench/bench_experts.py --only none --sweep-tma --json "$out/sweep_tma.json"
TAILN=6 step step_244m_compiled 300 python3 bench/bench_step.py --sizes 244m --no-eager --budget-s 250 --profile-compiled \
  --out "$out/step_244m_compiled"
