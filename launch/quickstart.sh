#!/usr/bin/env bash
# Quickstart: set up what is missing, prepare the bundled English corpus, train a small MoEUT (CPU when there is no
# GPU), evaluate it (perplexity + BLiMP), export it and generate a sample.
#
#   bash launch/quickstart.sh            # a few minutes on CPU
#   bash launch/quickstart.sh --smoke    # a minute or two
#   --out DIR                            # instead of runs/
#
# Everything goes under runs/ (runs/data/english, runs/quickstart or runs/smoke). Re-running resumes the training
# run from its newest checkpoint (--resume auto) and keeps the prepared data.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
OUT=runs
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) [ $# -ge 2 ] || { echo "--out needs a directory" >&2; exit 2; }; OUT=$2; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (use --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

bash launch/setup_env.sh          # creates/refreshes .venv from requirements.txt (fast when up to date)
PY=.venv/bin/python

if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then DEVICE=gpu; else DEVICE=cpu; fi
NPROC=$($PY -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$NPROC}

DATA=$OUT/data/english
if [ ! -f "$DATA/metadata.json" ]; then
  echo "== preparing the bundled English corpus -> $DATA"
  $PY -m data_prep.prepare --input 'data/english/*.txt.gz' --out "$DATA" --vocab-size 4000 --workers "$NPROC"
fi

if [ "$SMOKE" = 1 ]; then
  CONFIG=configs/smoke.yaml; RUN=$OUT/smoke; EXTRA=(train.steps=40); PAIRS=20
else
  CONFIG=configs/quickstart_cpu.yaml; RUN=$OUT/quickstart; EXTRA=(); PAIRS=200
fi
if [ "$DEVICE" = gpu ]; then EXTRA+=(deepspeed_config=ds_configs/zero1_bf16.json); fi

echo "== training ($DEVICE): $CONFIG"
set +e
$PY -m moeut_ds.train --config "$CONFIG" --resume auto run_dir="$RUN" data.path="$DATA" "${EXTRA[@]}"
rc=$?
set -e
if [ $rc -ne 0 ]; then echo "training exited with status $rc (75 = preempted: re-run to resume)" >&2; exit $rc; fi

echo "== evaluating"
$PY -m moeut_ds.evaluate "$RUN" --data "$DATA" --max-windows 64 --blimp-max-pairs "$PAIRS" \
  --json "$RUN/eval.json" | tail -n 3

echo "== exporting and sampling"
rm -rf "$RUN/model.previous"; [ -d "$RUN/model" ] && mv "$RUN/model" "$RUN/model.previous"
$PY -m moeut_ds.export "$RUN" --out "$RUN/model"
$PY -m moeut_ds.generate "$RUN/model" --prompt "It is a truth universally acknowledged" --max-new-tokens 60 \
  --top-k 40 --temperature 0.8 | tee "$RUN/sample.txt"

cat <<MSG

Done.
  TensorBoard logs : $RUN/tensorboard   (tensorboard --logdir $RUN/tensorboard)
  scalars (JSONL)  : $RUN/metrics.jsonl
  checkpoints      : $RUN/checkpoints
                     (resume: re-run this script, or $PY -m moeut_ds.train --config $CONFIG --resume auto
                      run_dir=$RUN data.path=$DATA ${EXTRA[*]})
  evaluation       : $RUN/eval.json
  exported model   : $RUN/model         (moeut_ds.load_model("$RUN/model"))
  sample           : $RUN/sample.txt
MSG
