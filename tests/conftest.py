import glob
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

_SHM = "/dev/shm/deepspeed_allreduce_buffer_*"
_SHM_BEFORE = pytest.StashKey[set]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort). tests/run.sh hands whole files to its pytest-xdist workers in this order
    (--dist loadfile --no-loadscope-reorder), so the long files start first and the quick ones fill in at the end,
    instead of one long file running alone after the other worker has finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):      # the pytest-xdist controller or a plain run
        session.config.stash[_SHM_BEFORE] = set(glob.glob(_SHM))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """DeepSpeed's CPU shared-memory all-reduce never unlinks its ~66 MB /dev/shm segment per rank. The trainer and
    tests/dist_harness.py remove theirs; this removes any a crashed test process left, so that a test run never
    fills the machine's RAM (only segments that appeared during this run are touched). Under pytest-xdist only the
    controller does it, after every worker has finished: a worker that finishes early would otherwise unlink the
    segment of a rank that another worker's test is still starting."""
    before = session.config.stash.get(_SHM_BEFORE, None)
    if before is None:
        return
    for f in set(glob.glob(_SHM)) - before:
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
