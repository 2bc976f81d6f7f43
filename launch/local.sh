#!/usr/bin/env bash
# Train on one machine: N processes (one per GPU, or CPU processes with gloo when there is no GPU or with --cpu).
#
# Usage:
#   bash launch/local.sh [--launcher torchrun|deepspeed] [--nproc N] [--cpu] [--no-resume] \
#                        CONFIG.yaml [dotted.key=value ...]
#     --launcher   torchrun (default) or the deepspeed launcher; both set RANK/WORLD_SIZE/LOCAL_RANK/
#                  MASTER_ADDR/MASTER_PORT for each process, which is all moeut_ds.train reads
#     --nproc N    processes (default: the number of GPUs nvidia-smi lists; 1 CPU process when there is none)
#     --cpu        CPU processes even if GPUs are present (DS_ACCELERATOR=cpu, gloo, CUDA hidden)
#     --no-resume  do not pass --resume auto (by default a rerun of the same command continues from the newest
#                  complete checkpoint in the run directory, as the Slurm launcher does)
#   e.g. bash launch/local.sh configs/tiny.yaml                      # all local GPUs
#        bash launch/local.sh --cpu --nproc 2 configs/tiny.yaml train.steps=20
#
# Environment: MOEUT_PYTHON (default: python on PATH), MASTER_PORT (default: a free port),
#   OMP_NUM_THREADS (default 1 per CPU process), MOEUT_TRAIN_SCRIPT (run this script instead of
#   -m moeut_ds.train; used to test the launcher). Everything else (NCCL_*, ...) reaches every process.
# Signals: SIGTERM or SIGUSR1 sent to this script goes to every rank (not the launcher), so they checkpoint and
#   exit 75; rerun the same command to resume. Ctrl-C interrupts without a checkpoint.
# Exit status: the launcher's. The deepspeed launcher passes a rank's status through (0 finished, 75 checkpointed
#   and stopped, else failure); torchrun reports any non-zero rank status, 75 included, as 1.
set -euo pipefail

die() { echo "local.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

launcher=torchrun nproc="" cpu=0 resume=(--resume auto)
while [[ $# -gt 0 ]]; do
    case $1 in
        --launcher) [[ $# -ge 2 ]] || die "--launcher needs a value (torchrun or deepspeed)"; launcher=$2; shift 2 ;;
        --launcher=*) launcher=${1#*=}; shift ;;
        --nproc) [[ $# -ge 2 ]] || die "--nproc needs a number"; nproc=$2; shift 2 ;;
        --nproc=*) nproc=${1#*=}; shift ;;
        --cpu) cpu=1; shift ;;
        --no-resume) resume=(); shift ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        -*) die "unknown option '$1' (see: bash launch/local.sh --help)" ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || die "missing CONFIG.yaml. Usage: bash launch/local.sh [options] CONFIG.yaml [key=value ...]"
config=$1; shift
[[ -f $config ]] || die "config '$config' not found"
[[ $launcher == torchrun || $launcher == deepspeed ]] || die "--launcher must be torchrun or deepspeed, not '$launcher'"
[[ -z $nproc || $nproc =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, not '$nproc'"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { echo "local.sh: $*" >&2; }
source "$root/launch/signals.sh"   # from here on SIGTERM/SIGUSR1 are kept for the ranks
python=${MOEUT_PYTHON:-python}
command -v "$python" >/dev/null || die "'$python' not found: activate the project's environment or set MOEUT_PYTHON=/path/to/venv/bin/python"
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

ngpus=0
if [[ $cpu -eq 0 ]] && command -v nvidia-smi >/dev/null 2>&1; then
    ngpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [[ $ngpus -gt 0 ]]; then
    nproc=${nproc:-$ngpus}
    (( nproc <= ngpus )) || die "--nproc $nproc but only $ngpus GPU(s) visible; use --nproc $ngpus, or --cpu for CPU processes"
    device="cuda x$nproc"
else
    nproc=${nproc:-1}
    export DS_ACCELERATOR=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    [[ $cpu -eq 0 ]] || export CUDA_VISIBLE_DEVICES=""
    device="cpu x$nproc (gloo)"
fi
export LOCAL_SIZE=$nproc   # DeepSpeed's CPU accelerator counts devices from LOCAL_SIZE

if [[ -z ${MASTER_PORT:-} ]]; then
    MASTER_PORT=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if [[ -n ${MOEUT_TRAIN_SCRIPT:-} ]]; then entry=("$MOEUT_TRAIN_SCRIPT"); ds_entry=("$MOEUT_TRAIN_SCRIPT")
else entry=(-m moeut_ds.train); ds_entry=(--module moeut_ds.train); fi
args=(--config "$config" "${resume[@]}" "$@")

case $launcher in
    torchrun)
        cmd=("$python" -m torch.distributed.run --nnodes 1 --nproc-per-node "$nproc"
             --master-addr 127.0.0.1 --master-port "$MASTER_PORT" "${entry[@]}" "${args[@]}") ;;
    deepspeed)
        # --no_local_rank: the trainer reads LOCAL_RANK from the environment, not a --local_rank argument.
        cmd=("$python" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_addr 127.0.0.1
             --master_port "$MASTER_PORT" --no_local_rank "${ds_entry[@]}" "${args[@]}") ;;
esac
echo "local.sh: $launcher, $device, MASTER_PORT=$MASTER_PORT: ${cmd[*]}" >&2

# The ranks themselves get SIGTERM/SIGUSR1, not the launcher: torchrun ignores SIGUSR1 and dies of it, and both
# launchers answer SIGTERM by terminating their children on a timer, which could cut a checkpoint save short.
# The ranks are the launcher's children (torchrun) or grandchildren (deepspeed: runner -> launch.py -> ranks).
signal_targets() {
    local depth=1 level=1 pids=("$1") next=() p c
    [[ $launcher == deepspeed ]] && level=2
    while (( depth <= level )); do
        next=()
        for p in "${pids[@]}"; do
            while read -r c; do [[ -n $c ]] && next+=("$c"); done < <(ps -o pid= --ppid "$p" 2>/dev/null || true)
        done
        pids=("${next[@]}")
        depth=$(( depth + 1 ))
    done
    echo "${pids[@]}"
}
run_forwarding_signals "${cmd[@]}"
exit "$command_status"
