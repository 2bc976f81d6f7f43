#!/usr/bin/env bash
# Install what the Slurm launch tests need: Debian's slurmctld, slurmd, the Slurm client commands and munge.
#
# Usage: bash tests/slurm/install.sh
#
# Idempotent: does nothing when everything is already installed (about 15 s otherwise). Needs root and apt
# (Debian/Ubuntu). Starts no daemon: tests/slurm/cluster.sh starts its own, by PID, in a directory of its own.
set -euo pipefail

needed=(munged slurmctld slurmd sbatch srun sinfo scontrol setpriv)
missing=()
for b in "${needed[@]}"; do command -v "$b" >/dev/null || missing+=("$b"); done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install.sh: slurm and munge already installed ($(slurmctld -V))"
    exit 0
fi
echo "install.sh: missing: ${missing[*]}; installing slurmd slurmctld slurm-client munge"
[[ $(id -u) -eq 0 ]] || { echo "install.sh: error: needs root to apt-get install; rerun with sudo" >&2; exit 1; }
command -v apt-get >/dev/null || {
    echo "install.sh: error: no apt-get here; install slurmctld, slurmd, slurm client and munge with your" \
         "package manager (the tests then find them on PATH)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmd slurmctld slurm-client munge util-linux >/dev/null
# Debian's packages may try to start the services; this harness runs its own, so leave none behind.
echo "install.sh: installed $(slurmctld -V)"
