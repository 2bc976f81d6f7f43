import glob
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

_SHM = "/dev/shm/deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="session", autouse=True)
def _release_deepspeed_shm():
    """DeepSpeed's CPU shared-memory all-reduce never unlinks its ~66 MB /dev/shm segment per rank. The trainer and
    tests/dist_harness.py remove theirs; this removes any a crashed test process left, so that a test run never
    fills the machine's RAM (only segments that appeared during this session are touched)."""
    before = set(glob.glob(_SHM))
    yield
    for f in set(glob.glob(_SHM)) - before:
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
