#!/usr/bin/env bash
# Create or refresh the project's virtual environment from requirements.txt (idempotent, fast when up to date).
# usage: bash launch/setup_env.sh [VENV_DIR]          (default: <repo>/.venv)
# Installs torch first (an unpinned torch elsewhere could pull a multi-GB CUDA build on a CPU machine), then the
# pinned requirements with DeepSpeed's CPU shared-memory op built ahead (DS_BUILD_SHM_COMM=1, ~2.5 min once), then
# this project in editable mode.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:-$root/.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py=$venv/bin/python
want=$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)
stamp=$venv/.moeut_ds_requirements
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $venv (a few minutes the first time)"
  "$py" -m pip install -q --upgrade pip wheel setuptools
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "$(grep -E '^torch==' "$root/requirements.txt")"
  DS_BUILD_SHM_COMM=1 "$py" -m pip install -q --no-build-isolation -r "$root/requirements.txt"
  "$py" -m pip install -q --no-deps --no-build-isolation -e "$root"
  echo "$want" > "$stamp"
fi
