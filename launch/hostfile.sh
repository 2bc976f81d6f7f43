#!/usr/bin/env bash
# Multi-node training without Slurm: the deepspeed launcher starts the ranks on every host of a hostfile over
# pdsh/ssh.
#
# Usage:
#   bash launch/hostfile.sh HOSTFILE CONFIG.yaml [dotted.key=value ...]
#   HOSTFILE, one line per host, MPI style (slots = GPUs to use on that host; the first host runs rank 0):
#       gpu-node-01 slots=8
#       gpu-node-02 slots=8
#   e.g. bash launch/hostfile.sh hosts.txt configs/moeut_244m_gpu.yaml run_dir=runs/m244
#
# Requirements (checked where possible):
#   - pdsh on this machine and password-less ssh from it to every host (this one included when it is listed);
#   - the repository and the Python environment at the SAME absolute paths on every host (a shared file
#     system): the launcher runs `cd $PWD; $MOEUT_PYTHON -m deepspeed.launcher.launch ...` remotely;
#   - variables for the remote ranks: DeepSpeed forwards those whose names start with NCCL, PYTHON, UCX, MV2 or
#     MLFLOW, plus every KEY=VALUE line of ./.deepspeed_env or ~/.deepspeed_env (DS_ENV_FILE renames it);
#     anything else (e.g. OMP_NUM_THREADS, HF_HOME) must go into that file.
# Environment:
#   MOEUT_PYTHON       python of the project's environment, same path on every host (default: python on PATH)
#   MOEUT_MASTER_ADDR  address of the first host that the others can reach (default: its name in the hostfile)
#   MASTER_PORT        rendezvous port (default 29500)
#   MOEUT_LAUNCHER     deepspeed --launcher backend (default pdsh; also openmpi, mvapich, mpich, impi)
#   MOEUT_NO_RESUME=1  do not pass --resume auto (by default a rerun continues from the newest checkpoint)
# Exit status: the launcher's (non-zero when any rank failed). Checkpoint-on-signal works as elsewhere: send
# SIGTERM to the ranks (e.g. `pdsh -w HOSTS pkill -TERM -f moeut_ds.train`); they save and exit 75.
# On a Slurm cluster use launch/slurm.sbatch instead (requeue on preemption, no ssh needed).
set -euo pipefail

die() { echo "hostfile.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

[[ ${1:-} == -h || ${1:-} == --help ]] && usage 0
[[ $# -ge 2 ]] || die "need HOSTFILE and CONFIG.yaml. Usage: bash launch/hostfile.sh HOSTFILE CONFIG.yaml [key=value ...]"
hostfile=$1 config=$2; shift 2
[[ -f $hostfile ]] || die "hostfile '$hostfile' not found"
[[ -f $config ]] || die "config '$config' not found"

# Validate the hostfile: "host slots=N" lines, comments and blank lines allowed.
hosts=()
while read -r line; do
    line=${line%%#*}
    [[ -z ${line// } ]] && continue
    [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]] ||
        die "bad hostfile line '$line' in $hostfile: expected 'HOSTNAME slots=N'"
    hosts+=("${BASH_REMATCH[1]}")
done <"$hostfile"
[[ ${#hosts[@]} -gt 0 ]] || die "hostfile '$hostfile' lists no host"

launcher=${MOEUT_LAUNCHER:-pdsh}
if [[ $launcher == pdsh && ${#hosts[@]} -gt 1 ]]; then
    command -v pdsh >/dev/null || die "pdsh not found: install it (Debian/Ubuntu: apt-get install pdsh) or set MOEUT_LAUNCHER=openmpi"
fi
master=${MOEUT_MASTER_ADDR:-${hosts[0]}}
getent ahosts "$master" >/dev/null 2>&1 ||
    die "master address '$master' (first host of $hostfile) does not resolve here; set MOEUT_MASTER_ADDR to its IP"
if [[ ${#hosts[@]} -gt 1 && $launcher == pdsh ]]; then
    for h in "${hosts[@]}"; do
        ssh -o BatchMode=yes -o ConnectTimeout=10 "$h" true 2>/dev/null ||
            die "cannot ssh to '$h' without a password (ssh -o BatchMode=yes $h true failed): set up keys for it"
    done
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${MOEUT_PYTHON:-python}
python=$(command -v "$python") || die "'${MOEUT_PYTHON:-python}' not found: activate the environment or set MOEUT_PYTHON"
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}   # forwarded to remote ranks (PYTHON* variables are)
resume=(--resume auto)
[[ ${MOEUT_NO_RESUME:-0} == 1 ]] && resume=()

cmd=("$python" -m deepspeed.launcher.runner --hostfile "$hostfile" --launcher "$launcher"
     --master_addr "$master" --master_port "${MASTER_PORT:-29500}" --no_local_rank
     --module moeut_ds.train --config "$config" "${resume[@]}" "$@")
echo "hostfile.sh: ${#hosts[@]} host(s) (${hosts[*]}), master $master: ${cmd[*]}" >&2
exec "${cmd[@]}"
