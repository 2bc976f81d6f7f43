#!/usr/bin/env bash
# Per-task wrapper for Slurm: turn the Slurm step variables into the torchrun-style environment that
# moeut_ds.train (and torch.distributed / deepspeed.init_distributed) read, then exec the command.
#
# Usage (inside a job step, one task per GPU; launch/slurm.sbatch does this for you):
#   srun [srun options] bash launch/slurm_task.sh COMMAND [ARGS...]
#   e.g. srun bash launch/slurm_task.sh python -m moeut_ds.train --config CONFIG.yaml --resume auto
#
# Sets, for each task:
#   RANK=$SLURM_PROCID  WORLD_SIZE=$SLURM_NTASKS  LOCAL_RANK=$SLURM_LOCALID  NODE_RANK=$SLURM_NODEID
#   LOCAL_WORLD_SIZE (= LOCAL_SIZE, tasks on this node)
#   MASTER_ADDR  = $MOEUT_MASTER_ADDR if set, else the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`
#   MASTER_PORT  = $MOEUT_MASTER_PORT if set, else 20000 + SLURM_JOB_ID % 12000 (same for every task of the job,
#                  below the Linux ephemeral range, different for jobs that share a node)
#   DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1 when no GPU is visible (CPU runs, tests); with GPUs,
#   OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK unless already set.
# Every other variable (NCCL_*, paths, ...) passes through unchanged.
#
# MOEUT_MASTER_ADDR: set it when the node names of the allocation are not resolvable host names (e.g. the
# fake nodes of tests/slurm/cluster.sh, which all live on one machine: use 127.0.0.1 there), or to pick a
# specific interface of the first node (e.g. its InfiniBand address).
# MOEUT_MASTER_WAIT: seconds ranks > 0 wait for rank 0's port to accept connections before giving up with a
# message naming the address (default 600).
# MOEUT_LAUNCH_VERBOSE=1 prints the mapping of every task (otherwise rank 0 only).
set -euo pipefail

die() { echo "slurm_task.sh: error: $*" >&2; exit 1; }

required=(SLURM_JOB_ID SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_NODEID SLURM_JOB_NODELIST)
missing=()
for v in "${required[@]}"; do [[ -n ${!v:-} ]] || missing+=("$v"); done
if [[ ${#missing[@]} -gt 0 ]]; then
    die "not inside a Slurm job step: ${missing[*]} not set.
  This wrapper maps Slurm's per-task variables to RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR and must run under srun:
    sbatch launch/slurm.sbatch CONFIG.yaml [key=value ...]          (batch job; see its header)
    srun bash launch/slurm_task.sh python -m moeut_ds.train ...     (inside salloc)
  On one machine without Slurm use launch/local.sh; on several machines without Slurm, launch/hostfile.sh."
fi
[[ $# -gt 0 ]] || die "no command given. Usage: srun bash launch/slurm_task.sh COMMAND [ARGS...]"

# SIGUSR1 (the checkpoint-and-requeue request) is ignored from here until the trainer installs its handler: an
# ignored signal stays ignored across exec, where its default action would kill a rank still importing torch (Slurm
# may send the time-limit warning seconds after the start). A rank that missed it learns of the stop from the others
# through the stop flag that every step all-reduces. SIGTERM keeps its default: before the rendezvous it should
# still end a rank that waits for its peers.
trap '' USR1

# Tasks on this node: SLURM_STEP_TASKS_PER_NODE (or the job's SLURM_TASKS_PER_NODE) looks like "2(x3),1",
# one entry per node in node order; take entry number SLURM_NODEID.
tasks_on_this_node() {
    local spec=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}} item count reps i=0
    [[ -n $spec ]] || { echo 1; return; }
    IFS=, read -ra items <<<"$spec"
    for item in "${items[@]}"; do
        if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then count=${BASH_REMATCH[1]}; reps=${BASH_REMATCH[2]}
        else count=$item; reps=1; fi
        if (( SLURM_NODEID < i + reps )); then echo "$count"; return; fi
        i=$(( i + reps ))
    done
    die "cannot find node $SLURM_NODEID in tasks-per-node spec '$spec'"
}

export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
export NODE_RANK=$SLURM_NODEID
LOCAL_WORLD_SIZE=$(tasks_on_this_node)
export LOCAL_WORLD_SIZE
export LOCAL_SIZE=$LOCAL_WORLD_SIZE   # DeepSpeed's CPU accelerator counts devices from LOCAL_SIZE

if [[ -n ${MOEUT_MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$MOEUT_MASTER_ADDR
else
    command -v scontrol >/dev/null || die "scontrol not on PATH on node ${SLURMD_NODENAME:-?}; it is needed to find the first node (or set MOEUT_MASTER_ADDR)"
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [[ -n $MASTER_ADDR ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
fi
export MASTER_ADDR
if ! getent ahosts "$MASTER_ADDR" >/dev/null 2>&1; then
    die "MASTER_ADDR '$MASTER_ADDR' (the first node of job $SLURM_JOB_ID) does not resolve on node ${SLURMD_NODENAME:-$(hostname)}.
  Set MOEUT_MASTER_ADDR to an address of that node that every node can reach (its IP, or its name on the
  cluster network), e.g.  MOEUT_MASTER_ADDR=10.0.0.1 sbatch launch/slurm.sbatch ...
  (all nodes on one machine, like the test cluster: MOEUT_MASTER_ADDR=127.0.0.1)."
fi
if [[ -n ${MOEUT_MASTER_PORT:-} ]]; then
    MASTER_PORT=$MOEUT_MASTER_PORT
else
    MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 12000 ))
fi
export MASTER_PORT

# Ranks other than 0 first wait until rank 0's rendezvous port accepts connections, so that an unreachable master
# (wrong address, firewall, rank 0 dead) fails with this message after MOEUT_MASTER_WAIT seconds (default 600),
# not with a bare socket timeout inside torch.
if [[ $RANK -ne 0 ]]; then
    wait_s=${MOEUT_MASTER_WAIT:-600}
    t0=$SECONDS
    until timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$MASTER_ADDR" "$MASTER_PORT" 2>/dev/null; do
        if (( SECONDS - t0 >= wait_s )); then
            die "rank $RANK on node ${SLURMD_NODENAME:-$(hostname)} cannot reach the master $MASTER_ADDR:$MASTER_PORT (rank 0 on the first node) after ${wait_s}s.
  Check that rank 0 started (its errors are in the job log), that $MASTER_ADDR is an address of the first node
  reachable from this one (else set MOEUT_MASTER_ADDR, e.g. the first node's IP on the cluster network), and that
  no firewall blocks port $MASTER_PORT (or choose another with MOEUT_MASTER_PORT)."
        fi
        sleep 1
    done
fi

# Accelerator: GPUs if nvidia-smi lists any, else CPU processes with gloo.
ngpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    ngpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [[ $ngpus -eq 0 ]]; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
else
    if (( ngpus < LOCAL_WORLD_SIZE )); then
        die "node ${SLURMD_NODENAME:-?} runs $LOCAL_WORLD_SIZE tasks but task $RANK sees only $ngpus GPU(s)
  (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'). Each task must see all GPUs of its node and picks
  GPU LOCAL_RANK: request --gpus-per-node=G with --ntasks-per-node=G and do not use --gpus-per-task/--gpu-bind."
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
fi

if [[ $RANK -eq 0 || ${MOEUT_LAUNCH_VERBOSE:-0} == 1 ]]; then
    echo "slurm_task.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: node ${SLURMD_NODENAME:-$(hostname)}" \
         "RANK=$RANK/$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK/$LOCAL_WORLD_SIZE NODE_RANK=$NODE_RANK" \
         "MASTER=$MASTER_ADDR:$MASTER_PORT accel=${DS_ACCELERATOR:-cuda x$ngpus}" >&2
fi
exec "$@"
