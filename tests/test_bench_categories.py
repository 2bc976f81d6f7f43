"""bench_utils' profile categories: every kernel of ours is counted as ours, in the right category."""
import sys
from pathlib import Path

from kernel_testing import DEVICE  # noqa: F401  (sets TRITON_INTERPRET before the kernels are imported)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_utils as B  # noqa: E402


def test_every_kernel_of_ours_is_in_an_expert_category():
    matmuls = {"gmm_kernel", "wgrad_kernel", "pair_gmm_kernel"} | ({"resident_gmm_kernel"} if B.grouped.GL else set())
    routing = {"group_sum_kernel", "segment_sum_kernel", "pair_dot_kernel", "sigmoid_topk_kernel",
               "expert_starts_kernel", "plan_kernel", "window_tiles_kernel", "pair_key_kernel"}
    assert set(B.OURS) == matmuls | routing        # a new kernel: add it here, and check its category below
    for name in matmuls:
        assert B.category(name) == "expert matmuls (ours)", name
    for name in routing:
        assert B.category(name) == "expert sums and routing (ours)", name
    assert B.category("triton_per_fused__to_copy_add_native_layer_norm_backward_view_6").startswith("inductor")
    assert B.category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "cuBLAS matmuls"
