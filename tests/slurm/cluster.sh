#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for testing the launchers.
#
# Usage:
#   bash tests/slurm/cluster.sh start DIR    # start munged, slurmctld and slurmd n1 + n2; state lives in DIR
#   bash tests/slurm/cluster.sh stop DIR     # cancel its jobs, stop every daemon it started (by PID)
#   bash tests/slurm/cluster.sh status DIR   # sinfo + squeue of that cluster
#
# After `start`, point the Slurm commands at this cluster with:   source DIR/env.sh
# (it exports SLURM_CONF=DIR/slurm.conf; sbatch/srun/squeue/scontrol then talk to this cluster only).
#
# Needs root and the Debian packages (bash tests/slurm/install.sh). Nothing outside DIR is written: its own
# munged (own key and socket, so a system munged is left alone), slurm.conf, state, spool, logs and PID files all
# live in DIR. Ports are picked free at start. Two fake nodes, n1 and n2, share this host: inside a job `hostname`
# is the same on both, $SLURMD_NODENAME tells them apart, and "n1"/"n2" do not resolve as host names.
#
# Environment knobs:
#   SLURM_TEST_CPUS         CPUs declared per fake node (default: nproc)
#   SLURM_TEST_CRED_EXPIRE  seconds; Slurm holds a requeued job this long before it may start again
#                           (Slurm's default is 120; default here 5 to keep requeue tests short)
#   SLURM_TEST_START_TIMEOUT seconds to wait for both nodes to be idle (default 60)
set -Eeuo pipefail

die() { echo "cluster.sh: error: $*" >&2; exit 1; }

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

[[ $# -eq 2 ]] || usage
cmd=$1
dir=$2

# Record "name pid" as soon as a daemon starts, so that `stop` finds it even if start fails half way.
record_pid() { echo "$1 $2" >>"$dir/pids"; }

free_port() {
    # Ask the kernel for a free TCP port (bind to port 0), using whatever python is around.
    local py
    py=$(command -v python3 || command -v python) || die "python3 is needed to pick free ports"
    "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pid_alive_and_ours() {
    # True when PID is alive and its command line mentions our DIR (guards against a reused PID).
    local pid=$1
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir"
}

stop_cluster() {
    [[ -d $dir ]] || die "no such cluster directory: $dir"
    if [[ -f $dir/slurm.conf ]] && command -v scancel >/dev/null; then
        # Cancel whatever still runs, so no slurmstepd or task outlives its slurmd.
        SLURM_CONF=$dir/slurm.conf timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 20); do
            local left
            left=$(SLURM_CONF=$dir/slurm.conf timeout 5 squeue -h -o %i 2>/dev/null | wc -l) || break
            [[ $left -eq 0 ]] && break
            sleep 0.5
        done
    fi
    [[ -f $dir/pids ]] || { echo "cluster.sh: nothing recorded in $dir/pids, nothing to stop"; return 0; }
    # Stop in reverse start order: slurmd's, slurmctld, munged.
    local name pid
    tac "$dir/pids" | while read -r name pid; do
        if pid_alive_and_ours "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do pid_alive_and_ours "$pid" || break; sleep 0.2; done
            if pid_alive_and_ours "$pid"; then
                echo "cluster.sh: $name (pid $pid) ignored SIGTERM for 10 s, sending SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
            echo "cluster.sh: stopped $name (pid $pid)"
        fi
    done
    mv "$dir/pids" "$dir/pids.stopped"
}

write_conf() {
    local host cpus ctld_port p1 p2 cred_expire
    host=$(hostname -s)
    cpus=${SLURM_TEST_CPUS:-$(nproc)}
    cred_expire=${SLURM_TEST_CRED_EXPIRE:-5}
    ctld_port=$(free_port); p1=$(free_port); p2=$(free_port)
    while [[ $p1 == "$ctld_port" ]]; do p1=$(free_port); done
    while [[ $p2 == "$ctld_port" || $p2 == "$p1" ]]; do p2=$(free_port); done
    cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: two fake nodes on one machine, for tests only.
ClusterName=moeuttest
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${dir}/munge/munge.socket,cred_expire=${cred_expire}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge=4
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
MailProg=/bin/true
SlurmdParameters=config_overrides
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool/%n
SlurmctldPidFile=${dir}/slurmctld.pid
SlurmdPidFile=${dir}/slurmd-%n.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
NodeName=n1 NodeHostname=${host} NodeAddr=127.0.0.1 Port=${p1} CPUs=${cpus} State=UNKNOWN
NodeName=n2 NodeHostname=${host} NodeAddr=127.0.0.1 Port=${p2} CPUs=${cpus} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
    echo "export SLURM_CONF=${dir}/slurm.conf" >"$dir/env.sh"
}

start_cluster() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd and munged need it); run with sudo"
    local b
    for b in munged slurmctld slurmd sinfo sbatch setpriv; do
        command -v "$b" >/dev/null || die "'$b' not found; install Slurm first: bash tests/slurm/install.sh"
    done
    if [[ -f $dir/pids ]]; then
        die "$dir/pids exists: a cluster may still run there; stop it first: bash $0 stop $dir"
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd -P)
    chmod 0755 "$dir"
    # munged runs as user munge and checks that its directories are private to it; the path to them must be
    # traversable by munge.
    local d=$dir
    while [[ $d != / ]]; do
        [[ $(( $(stat -c '%a' "$d" | sed 's/^.*\(.\)$/\1/') & 1 )) -eq 1 ]] ||
            die "user munge cannot enter $d (mode $(stat -c %a "$d")); pick a DIR under a world-traversable path like /tmp"
        d=$(dirname "$d")
    done
    mkdir -p "$dir"/{state,spool/n1,spool/n2,log}
    # munged wants its socket directory executable by all, and its key private to user munge.
    install -d -o munge -g munge -m 0755 "$dir/munge"
    install -d -o munge -g munge -m 0700 "$dir/munge-key"
    # Our own key: this cluster never talks to any other.
    dd if=/dev/urandom of="$dir/munge-key/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$dir/munge-key/munge.key"; chmod 0600 "$dir/munge-key/munge.key"
    write_conf
    export SLURM_CONF=$dir/slurm.conf
    : >"$dir/pids"
    trap 'echo "cluster.sh: start failed; logs in $dir/log; stopping what was started" >&2; stop_cluster >&2' ERR

    # setpriv execs munged in place, so $! is munged itself (runuser would fork and $! would be runuser).
    setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --socket="$dir/munge/munge.socket" --key-file="$dir/munge-key/munge.key" \
        --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" \
        --log-file="$dir/munge/munged.log" >"$dir/log/munged.out" 2>&1 &
    record_pid munged $!
    for _ in $(seq 1 50); do [[ -S $dir/munge/munge.socket ]] && break; sleep 0.1; done
    [[ -S $dir/munge/munge.socket ]] || { cat "$dir/log/munged.out" >&2; false; }

    slurmctld -D -i -f "$dir/slurm.conf" >"$dir/log/slurmctld.out" 2>&1 &
    record_pid slurmctld $!
    slurmd -D -N n1 -f "$dir/slurm.conf" >"$dir/log/slurmd-n1.out" 2>&1 &
    record_pid slurmd-n1 $!
    slurmd -D -N n2 -f "$dir/slurm.conf" >"$dir/log/slurmd-n2.out" 2>&1 &
    record_pid slurmd-n2 $!

    local timeout=${SLURM_TEST_START_TIMEOUT:-60} t0=$SECONDS states=""
    while (( SECONDS - t0 < timeout )); do
        states=$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | sort | tr '\n' ' ') || true
        [[ $states == "n1 idle n2 idle " ]] && break
        local name pid
        while read -r name pid; do
            kill -0 "$pid" 2>/dev/null || { echo "cluster.sh: $name died; its log:" >&2;
                tail -n 20 "$dir/log/$name.out" "$dir/log/$name.log" 2>/dev/null >&2; false; }
        done <"$dir/pids"
        sleep 0.5
    done
    if [[ $states != "n1 idle n2 idle " ]]; then
        echo "cluster.sh: nodes not idle after ${timeout}s (sinfo: '${states}'); slurmctld log:" >&2
        tail -n 30 "$dir/log/slurmctld.log" >&2 || true
        false
    fi
    trap - ERR
    echo "cluster.sh: cluster up in $dir (nodes: ${states}); use: source $dir/env.sh"
}

case $cmd in
    start) start_cluster ;;
    stop) stop_cluster ;;
    status)
        export SLURM_CONF=$dir/slurm.conf
        sinfo; squeue ;;
    *) usage ;;
esac
