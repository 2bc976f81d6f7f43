"""Expert parallelism on CPU/gloo: ep=2 and ep=4 (world 2 and 4), with either dispatch, equal the single-process
computation."""
import json
import sys
from pathlib import Path

import pytest
import torch

from dist_harness import Ranks

from moeut_ds import ConfigError
from moeut_ds.parallel import expert_parallel_layout, shard_bounds


def test_layout_and_bounds():
    ep, edp = expert_parallel_layout(8, 2)
    assert ep == [[0, 1], [2, 3], [4, 5], [6, 7]] and edp == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert shard_bounds(387, 2) == [0, 193, 387] and shard_bounds(7, 4) == [0, 1, 3, 5, 7]
    with pytest.raises(ConfigError, match="expert_parallel_size=3 does not divide the world size 4"):
        expert_parallel_layout(4, 3)


@pytest.mark.slow
@pytest.mark.parametrize("ep,world", [(2, 2), (2, 4), (4, 4)])
def test_expert_parallel_matches_single_process(ep, world, tmp_path):
    with Ranks([sys.executable, "tests/ep_worker.py", str(ep), str(tmp_path)], world, tmp_path / "logs") as ranks:
        codes = ranks.wait(300)
        assert codes == [0] * world, ranks.output(0)
    for r in range(world):
        errors = json.loads((tmp_path / f"rank{r}.json").read_text())
        for dispatch in ("alltoall", "allgather"):
            assert errors[f"{dispatch}/autocast/row_exchanges"] >= 2
            assert errors[f"{dispatch}/autocast/fp32_row_exchanges"] == 0
            assert errors[f"{dispatch}/autocast/packed_exchanges"] >= (2 if dispatch == "alltoall" else 1)
            assert errors[f"{dispatch}/autocast/wide_packed_exchanges"] == 0
            assert errors[f"{dispatch}/model/grad_norm"] < 1e-5
            # a shard that receives nothing still answers (zero-size exchanges) and the results stay exact
            assert f"{dispatch}/all_on_shard0/dw1" in errors
            assert errors[f"{dispatch}/random/bytes_sent"] > 0
        for name, value in errors.items():
            if name.endswith("bytes_sent") or name.endswith("exchanges"):
                continue
            if "/autocast/" in name:                 # bf16 against bf16, different summation orders
                assert value < 3e-2, (r, name, value)
            elif name.endswith(("rows_sent_minus_distinct_owners", "pairs_received_minus_in_shard")):
                assert value == 0, name          # all-to-all: one copy per (token, owner rank), not one per expert
            else:
                assert value < 1e-5, (r, name, value)


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_pack_unpack_round_trip(rows):
    """Rows of mixed dtypes and widths packed into one uint8 message come back bitwise, also with no rows and with
    widths that need alignment padding (an odd number of bf16 columns before int32 slots)."""
    from moeut_ds.parallel.expert_parallel import _layout, _pack, _unpack
    torch.manual_seed(rows)
    parts = [torch.randn(rows, 3, dtype=torch.bfloat16), torch.randint(-1, 9, (rows, 3), dtype=torch.int32),
             torch.randn(rows, 2, 2), torch.randn(rows, dtype=torch.bfloat16)]
    buf = _pack(parts)
    starts, width = _layout(parts)
    assert buf.dtype == torch.uint8 and buf.shape == (rows, width) and width % 4 == 0
    assert starts == [0, 8, 20, 36]                     # 6 bf16 bytes, padded to 8 for the int32 slots
    for got, want in zip(_unpack(buf, parts), parts):
        assert got.dtype == want.dtype and torch.equal(got, want)
