# Sourced by launch/local.sh and launch/slurm.sbatch: run the training command in the background, forward each
# SIGUSR1/SIGTERM this shell receives to it, and return its exit status.
#
# Why it is built this way (each point was a real failure):
# - Bash runs a trap only between commands, so the command runs in the background while this shell polls it
#   (a signal is forwarded within a second).
# - The traps only note the signal; the forwarding runs in the loop. A trap that forks (a $(date) in a log line)
#   broke bash's parser when another signal landed inside it, and under `set -e` a trap that returns non-zero
#   ends the shell.
# - The traps stay set until the shell exits. Slurm checks time limits only every ~30 s, so its warning can come
#   after the tasks exited; the default action would then kill this shell and fail a job that had finished.
# - The exit status comes from a file written by a subshell that runs the command in the foreground (its own
#   traps wait for the command), not from `wait`: a trapped signal makes `wait` return 128+n early, and when the
#   child exits at that moment bash 5.2 can lose its status.
#
# The caller sources this file as early as it can (a signal from then on is kept until the command runs) and
# defines `log MESSAGE` and `signal_targets PID` (prints the pids that get a forwarded signal, given the command's
# pid; empty while they do not exist yet, and the signal waits for them).

pending_USR1="" pending_TERM=""
trap 'pending_USR1=1' USR1
trap 'pending_TERM=1' TERM

# run_forwarding_signals COMMAND [ARG...]: sets command_status to COMMAND's exit status. Repeats of a signal
# between two polls are forwarded once.
run_forwarding_signals() {
    local status_file runner cmd_pid="" targets sig flag
    status_file=$(mktemp "${TMPDIR:-/tmp}/moeut-launch-status.XXXXXX")
    ( trap : USR1 TERM; rc=0; "$@" || rc=$?; echo "$rc" > "$status_file" ) &
    runner=$!
    while kill -0 "$runner" 2>/dev/null; do
        [[ -n $cmd_pid ]] || cmd_pid=$(ps -o pid= --ppid "$runner" 2>/dev/null | head -n 1 | tr -d ' ' || true)
        if [[ -n $pending_USR1$pending_TERM && -n $cmd_pid ]]; then
            targets=$(signal_targets "$cmd_pid")
            for sig in USR1 TERM; do
                flag=pending_$sig
                [[ -n $targets && -n ${!flag} ]] || continue
                printf -v "$flag" ''
                log "received SIG$sig: forwarding to the training tasks (pids $targets) to checkpoint and exit"
                kill -s "$sig" $targets 2>/dev/null || true
            done
        fi
        sleep 1 || true   # a job-wide SIGTERM kills the sleep too
    done
    for sig in USR1 TERM; do
        flag=pending_$sig
        [[ -z ${!flag} ]] || log "received SIG$sig after the tasks ended: nothing to forward"
    done
    if [[ -s $status_file ]]; then
        command_status=$(< "$status_file")
    else
        log "the training command ended without reporting a status (its shell was killed): treating it as failed"
        command_status=1
    fi
    rm -f "$status_file"
}
