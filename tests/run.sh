#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (slow tests included) in two pytest-xdist
# workers, one test file per worker at a time (--dist loadfile: a file's module fixtures are built once), files
# with slow tests first (tests/conftest.py orders them; --no-loadscope-reorder keeps that order).
# usage: bash tests/run.sh [pytest args]      e.g.  bash tests/run.sh -m "not slow"   for the quick subset
#        MOEUT_TEST_WORKERS=0 bash tests/run.sh tests/test_x.py -s    one process (pdb, print output)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/launch/setup_env.sh"
cd "$root"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$root/.venv/bin/python" -m pytest -q -ra --durations=15 -n "${MOEUT_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
