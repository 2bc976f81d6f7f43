"""Every kernel launch the Triton backend makes, compiled ahead of time for real GPUs without one.

The interpreter tests check what the kernels compute; they do not compile them. This test records each distinct
launch (kernel, argument types, constexprs, warps, stages) of a tiny MoEUT's forward and backward, of the
explicit-rows path of expert parallelism, and of the weight gradient with and without row chunks, all with the
configurations chosen for each GPU (its shared memory, TMA loads on sm_90+, Hopper's register caps), then
compiles each one with Triton's bundled ptxas for sm_90 (H100/H200), sm_80 (A100), sm_89 (L40S, RTX 4090: 99 KB of
shared memory per block) and sm_120 (RTX 5090: TMA, no wgmma, 99 KB), and checks its shared memory fits the chip
and that no launch with a register cap (`TileConfig.maxnreg`) spills. Each launch is specialised as Triton's JIT
would on a GPU (pointers and integers that are multiples of 16 marked divisible by 16, integers equal to 1
constant): without that, register counts, spills and pipelined shared memory are far from the GPU's. `pytest -s`
prints each launch's registers, spilled bytes and shared memory (ptxas -v).
The tiny model has the real expert widths (d_e = d_h = 128), so the tile configs and their shared memory are the
ones real models get. A kernel edit that only a GPU would reject fails here.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

from kernel_testing import DEVICE, tiny_moeut  # noqa: E402  (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from moeut_kernels import _triton as K  # noqa: E402
from moeut_kernels import grouped, pair_tiles, routing  # noqa: E402

KERNELS = ("gmm_kernel", "wgrad_kernel", "group_sum_kernel", "segment_sum_kernel", "pair_dot_kernel", "plan_kernel",
           "expert_starts_kernel", "sigmoid_topk_kernel", "pair_key_kernel", "pair_gmm_kernel")
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
                torch.int32: "i32", torch.int16: "i16"}
GMM_PARAMS = list(inspect.signature(K.gmm_kernel.fn).parameters)
SHARED_MEMORY = {90: 232448, 80: 166912, 89: 101376, 120: 101376}    # max dynamic shared memory per block (bytes)
REPO = Path(__file__).resolve().parents[1]
OPTIONS = ("num_warps", "num_stages", "maxnreg")      # launch options, not kernel arguments


def _arg_type(v) -> str:
    if v is None:                       # an absent TMA descriptor: a constexpr None
        return "constexpr"
    if isinstance(v, TensorDescriptor):
        return f"tensordesc<{TRITON_TYPES[v.base.dtype]}[{', '.join(map(str, v.block_shape))}]>"
    if isinstance(v, torch.Tensor):
        return "*" + TRITON_TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    raise TypeError(f"unexpected kernel argument {v!r}")


def _specialisation(args: tuple) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(indices Triton's JIT marks divisible by 16, indices of integers equal to 1, which it makes constant)."""
    divisible, ones = [], []
    for i, v in enumerate(args):
        if isinstance(v, torch.Tensor) and v.data_ptr() % 16 == 0:
            divisible.append(i)
        elif isinstance(v, int) and not isinstance(v, bool):
            if v == 1:
                ones.append(i)
            elif v % 16 == 0:
                divisible.append(i)
    return tuple(divisible), tuple(ones)


class _Recorder:
    """Stands in for a kernel: notes each launch's types, specialisation and constexprs, then runs the real one
    (interpreter)."""

    def __init__(self, name: str, kernel, seen: set):
        self.name, self.kernel, self.seen = name, kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = tuple(kwargs.get(k) for k in OPTIONS)
            consts = tuple(sorted((k, v) for k, v in kwargs.items() if k not in OPTIONS))
            self.seen.add((self.name, tuple(_arg_type(a) for a in args), consts, options, *_specialisation(args)))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _tiny_moeut_step(dtype: torch.dtype = torch.bfloat16, combine: str = "buffer") -> None:
    from moeut_ds.experts.triton_backend import TritonBackend

    # d_model > 128: the long-K calls take the looping-K path, the short-K ones (K = 128) keep A resident
    model, tokens = tiny_moeut(TritonBackend(block_m=128, combine=combine), d_model=160, n_layers=2, d_head=128,
                               ff_expert_size=128)
    out = model.to(dtype)(tokens)
    (out.logits.float().square().mean() + out.reg_loss).backward()


def _explicit_rows() -> None:
    """The receiving side of expert parallelism: rows with a variable number of pairs (in_index / out_offsets)."""
    from moeut_ds.experts.triton_backend import TritonBackend

    tb = TritonBackend(block_m=128)
    x = torch.randn(6, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(3, 32, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(3, 16, 32, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    row_index = torch.tensor([0, 0, 1, 2, 2, 2, 4, 5], device=DEVICE)
    row_offsets = torch.searchsorted(row_index, torch.arange(7, device=DEVICE))
    gate = torch.rand(8, 1, device=DEVICE, requires_grad=True)
    routing_ = tb.routing(gate, torch.tensor([[0], [1], [2], [0], [1], [2], [0], [1]], device=DEVICE), 3)
    y = tb.mlp_rows(x, w1, w2, routing_, row_index, row_offsets)
    y.float().sum().backward()


def _relu_projection() -> None:
    """A ReLU grouped_matmul (the model's MLP is gated_mlp): its input gradient masks its resident A tile."""
    from moeut_ds.experts.triton_backend import TritonBackend

    tb = TritonBackend(block_m=128)
    x = torch.randn(40, 160, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5, 160, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    routing_ = tb.route(torch.randn(40, 1, 5, device=DEVICE), 2)
    tb.matmul(x, w, routing_, in_group=2, out_group=None, activation="relu").float().sum().backward()


def _record(arch: int) -> list:
    """The distinct launches of the steps above with the configs gmm_config and wgrad_config choose for this arch:
    its shared memory per program, TMA loads on sm_90+ (a Triton without host descriptors gives sm_90 the sm_80
    configs, compiled for sm_80 here)."""
    seen: set = set()
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(grouped, "INTERPRET", False)      # GPU tile configs; the interpreter still runs the kernels
        mp.setattr(routing, "INTERPRET", False)
        mp.setattr(pair_tiles, "INTERPRET", False)
        mp.setattr(grouped, "_shared_memory", lambda device: SHARED_MEMORY[arch])
        mp.setattr(grouped, "_is_hopper", lambda device: arch == 90)
        mp.setattr(grouped, "_has_wgmma", lambda device: False)     # no interpreter: tests/test_kernels_gluon.py
        mp.setattr(grouped, "_has_tma", lambda device: arch >= 90)
        for name in KERNELS:
            mp.setattr(K, name, _Recorder(name, getattr(K, name), seen))
        for splits in (1, 4):                        # weight gradients with and without row chunks
            mp.setitem(grouped.OVERRIDES, "wgrad_splits", splits)
            _tiny_moeut_step()
            _explicit_rows()
        _relu_projection()
        # the MLP's atomic combine (in fp32: the interpreter has no bf16 atomics; on Hopper, bf16 ones are Gluon's)
        _tiny_moeut_step(torch.float32, combine="atomic")
        if arch < 90:      # fp32 training's configs (no TMA or cap in fp32: sm_90's are sm_80's, sm_120's sm_89's)
            _tiny_moeut_step(torch.float32)
    finally:
        mp.undo()
    return sorted(seen, key=repr)


@pytest.fixture(scope="module")
def launches() -> dict[int, list]:
    """arch -> its launches: sm_90 (H100/H200), sm_80 (A100), sm_89 (L40S, RTX 4090: no TMA, 99 KB of shared memory
    per block), sm_120 (RTX 5090: TMA without wgmma, 99 KB)."""
    return {arch: _record(arch) for arch in SHARED_MEMORY}


def test_every_kernel_is_launched(launches):
    launches = launches[90] + launches[80]      # with TMA loads and without
    assert {name for name, *_ in launches} == set(KERNELS)
    splits = {dict(consts)["SPLITS"] for name, _, consts, *_ in launches if name == "wgrad_kernel"}
    assert splits == {1, 4}
    gmm = [dict(consts) for name, _, consts, *_ in launches if name == "gmm_kernel"]
    assert {c["A_RESIDENT"] for c in gmm} == {True, False}
    # the weight gradient's masked/gated operand, stored by resident-A and by fused-gate-gradient launches
    assert {(c["A_RESIDENT"], c["GATE_GRAD"]) for c in gmm if c["STORE_SIDE"]} == {(True, False), (False, True)}
    # the MLP's down input gradient (gated_mlp) writes the gate's gradient from its gated, masked output: K loop,
    # or a resident A tile where d <= 128 (the explicit rows' d = 32)
    assert {(c["A_RESIDENT"], c["MASK_OUT"], c["HAS_SCALE"]) for c in gmm if c["SCALE_GRAD"]} == {
        (False, True, True), (True, True, True)}
    assert {c["A_RESIDENT"] for c in gmm if c["MASK_A"]} == {True}          # the ReLU projection's input gradient
    assert {c["TRANS_W"] for c in gmm if c["SUM_GROUP"]} == {True, False}   # atomic sums: down fwd, up input grad
    # TMA: W plain and transposed (in resident and looping-K launches), with the sorted A tile and its ReLU mask
    descs = {"w": set(), "a": set(), "m": set()}
    w_by_desc = set()      # A_RESIDENT of the launches that load W by descriptor
    for name, types, consts, *_ in launches:
        if name == "gmm_kernel":
            named = dict(zip(GMM_PARAMS, types))
            for d in descs:
                if named[f"{d}_desc"].startswith("tensordesc"):
                    descs[d].add(dict(consts)["TRANS_W"])
            if named["w_desc"].startswith("tensordesc"):
                w_by_desc.add(dict(consts)["A_RESIDENT"])
    assert descs == {"w": {True, False}, "a": {True, False}, "m": {True}} and w_by_desc == {True, False}
    wgrad_params = list(inspect.signature(K.wgrad_kernel.fn).parameters)
    wgrad_descs = {tuple(dict(zip(wgrad_params, types))[d].startswith("tensordesc") for d in ("a_desc", "b_desc"))
                   for name, types, *_ in launches if name == "wgrad_kernel"}
    assert wgrad_descs == {(False, False), (True, False), (False, True)}     # a sorted A or B by TMA, or neither
    # three 4-warp weight-gradient programs per SM on sm_90+ (a register cap); no cap on GPUs without TMA
    caps = {(any(t.startswith("tensordesc") for t in types), options[2]) for name, types, _, options, *_ in launches
            if name == "wgrad_kernel"}
    assert {cap for tma, cap in caps if tma} == {168} and {cap for _, cap in caps} == {None, 168}
    pair_params = list(inspect.signature(K.pair_gmm_kernel.fn).parameters)
    pair_descs = {dict(zip(pair_params, types))["w_desc"].startswith("tensordesc")
                  for name, types, *_ in launches if name == "pair_gmm_kernel"}
    assert pair_descs == {True, False}       # the attention O forward's W by TMA (sm_90+) or by pointers


COMPILE = """
import inspect, json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from moeut_kernels import _triton as K

arch, shared_limit = int(sys.argv[1]), int(sys.argv[2])
launches = json.load(sys.stdin)
OPTIONS = ("num_warps", "num_stages", "maxnreg")
spilled, too_big = [], []
for name, types, consts, options, divisible, ones in launches:
    kernel = getattr(K, name)
    params = list(inspect.signature(kernel.fn).parameters)
    signature = dict(zip(params, types))
    constexprs = {k: None for k, t in signature.items() if t == "constexpr"} | dict(consts)
    constexprs |= {params[i]: 1 for i in ones}
    signature.update({k: "constexpr" for k in constexprs})
    assert set(signature) == set(params), (name, set(params) - set(signature))
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible if params[i] not in constexprs}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={k: v for k, v in zip(OPTIONS, options) if v is not None})
    assert compiled.asm["cubin"], name
    if compiled.metadata.shared > shared_limit:
        too_big.append((name, consts, options, compiled.metadata.shared))
    # registers and spills as ptxas reports them for the PTX Triton made (the same ptxas Triton runs)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{'a' if arch >= 90 else ''}", "-v", ptx.name,
                              "-o", "/dev/null"], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\\d+) registers", log).group(1))
    spill = int(re.search(r"(\\d+) bytes spill stores", log).group(1))
    print(name, dict(options=options, registers=regs, spill_bytes=spill, shared=compiled.metadata.shared,
                     consts={k: v for k, v in consts if k.isupper() and not k.startswith("BLOCK")}))
    if spill and options[2] is not None:
        spilled.append((name, consts, options, regs, spill))
assert not too_big, (f"more shared memory than sm_{arch} has ({shared_limit} bytes)", too_big)
assert not spilled, ("a register cap (maxnreg) makes these launches spill: slower than without it", spilled)
print(f"compiled {len(launches)} launches for sm_{arch}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80, 89, 120])
def test_every_launch_compiles_for_the_gpu(launches, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # real JIT functions, not interpreted
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels"), env.get("PYTHONPATH", "")])
    launches = launches[arch]
    proc = subprocess.run([sys.executable, "-c", COMPILE, str(arch), str(SHARED_MEMORY[arch])],
                          input=json.dumps(launches), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
