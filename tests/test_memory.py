"""The per-GPU memory estimate (moeut_ds/memory.py), the 4B/8B presets and the info CLI's memory flags."""
import json
import math
import subprocess
import sys

import pytest

from moeut_ds import ConfigError, get_preset
from moeut_ds.accounting import count_parameters
from moeut_ds.info import main as info_main
from moeut_ds.memory import GIB, estimate_memory, expert_parameters


def test_tiny_estimate_equals_hand_computation():
    # moeut-tiny: d 128, L 4, G 2, H 2, d_h 32, N_A 4, K_A 2, N_E 16, d_e 32, K 4, V 8000
    cfg = get_preset("moeut-tiny")
    total = count_parameters(cfg)["total"]
    e = estimate_memory(cfg, gpus=2, ep=2, zero=2, micro_batch=2, context=16, dispatch="alltoall")
    experts = 2 * 2 * 16 * 128 * 32                       # G x (W1 + W2) x N_E x d x d_e
    assert e.params_expert == expert_parameters(cfg) == experts and not e.experts_in_deepspeed
    shard = experts // 2                                  # 8 of 16 experts per rank
    assert e.experts == {"params": 4 * shard, "grads": 4 * shard, "optimizer": 8 * shard}
    n = total - experts                                   # DeepSpeed: ZeRO-2 over 2 ranks partitions grads + Adam
    assert e.deepspeed == {"params": 4 * n, "grads": 4 * math.ceil(n / 2), "optimizer": 8 * math.ceil(n / 2)}
    assert e.buckets == 2 * 4 * 500_000_000               # two fp32 reduce buckets (overlap_comm)
    per_token_layer = ((4 * 128 + 4 * 2 * 128 + 2 * 128)  # LN_att input, 4 bf16 LN'd casts, bf16 x for V
                       + 5 * 2 * 64                        # SDPA q k v out + contiguous out, H*d_h = 64
                       + 2 * 3 * 4 * 8                     # V/O routers, H*N_A = 8: logits, sigmoid, softmax
                       + (4 * 128 + 2 * 128 + 3 * 4 * 16)  # LN_ff input, bf16 router input, N_E logits x 3
                       + (2 * 2 * 128 + 2 * 4 * 32)        # ep = 2: a received copy per rank (min(K, ep) = 2) + ReLU
                       + 20 * (4 + 2 * 2 * 2)              # pair metadata: K + 2 H K_A pairs
                       + 2 * 2 * 2 * 32)                   # V's kept pre-gate products: H K_A pairs x d_h, bf16
    assert sum(e.per_token_layer.values()) == per_token_layer == 4848
    tokens = 2 * 16
    assert e.activations == {
        "layers": tokens * 4 * 4848,
        "head_and_loss": tokens * (6 * 128 + 12 * 8000),
        "dense_weights_once": 2 * (2 * (2 * 128 * 64 + 2 * 8 * 128 + 16 * 128) + 8000 * 128),
        "expert_weights_once": 2 * (2 * 8 * 128 * 32 + 2 * 8 * 128 * 32) * 2,    # one copy per distinct layer
    }
    assert e.total == (sum(e.deepspeed.values()) + sum(e.experts.values()) + e.buckets
                       + sum(e.activations.values()))
    assert e.fits and e.max_micro_batch > 2
    # activation checkpointing: each of the L applications keeps its fp32 input, its fp32 router logits and the
    # regulariser's softmax of them (N_E + 2 x H*N_A per token); one application is recomputed at full size
    ac = estimate_memory(cfg, gpus=2, ep=2, zero=2, micro_batch=2, context=16, activation_checkpointing=True,
                         dispatch="alltoall")
    kept = 4 * 128 + 2 * 4 * (16 + 2 * 8)
    assert ac.activations["layers"] == tokens * (4 * kept + 4848)
    assert {k: v for k, v in ac.activations.items() if k != "layers"} == {
        k: v for k, v in e.activations.items() if k != "layers"}


def test_more_gpus_and_ep_lower_per_gpu_memory():
    cfg = get_preset("moeut-4b")
    one = estimate_memory(cfg, gpus=1, ep=1, zero=2)
    # ep = 1: experts are DeepSpeed's; ZeRO-2 divides grads and optimizer states by the GPU count, not params
    eight_dp = estimate_memory(cfg, gpus=8, ep=1, zero=2)
    assert eight_dp.deepspeed["params"] == one.deepspeed["params"]
    assert eight_dp.deepspeed["grads"] == pytest.approx(one.deepspeed["grads"] / 8, abs=4)
    assert eight_dp.deepspeed["optimizer"] == pytest.approx(one.deepspeed["optimizer"] / 8, abs=8)
    assert eight_dp.activations == one.activations
    # ep = 8: every state of the experts shrinks 8x (1095 = 137 x 8 - 1: the largest shard has 137 experts)
    ep8 = estimate_memory(cfg, gpus=8, ep=8, zero=2)
    full = 16 * expert_parameters(cfg)
    assert sum(ep8.experts.values()) == full * 137 // 1095
    # bf16 expert weight copies: the FF shard shrinks 8x, the replicated V/O experts do not
    assert ep8.activations["expert_weights_once"] < one.activations["expert_weights_once"] / 4
    ep2 = estimate_memory(cfg, gpus=2, ep=2, zero=2)
    assert sum(ep8.experts.values()) < sum(ep2.experts.values()) / 3.9
    # the dispatch: auto is the all-gather at ep 2, which keeps both ranks' tokens and sizes the ReLU output and the
    # routing metadata for all their pairs; only the activations differ
    a2a = estimate_memory(cfg, gpus=2, ep=2, zero=2, dispatch="alltoall")
    assert ep2.dispatch == "allgather" and ep8.dispatch == "alltoall" and a2a.dispatch == "alltoall"
    k, de, d = cfg.ff_k, cfg.ff_expert_size, cfg.d_model
    extra = 8 * 1024 * cfg.n_layers * (2 * k * de + 20 * k)       # one more rank's h and pair metadata per token
    assert ep2.activations["layers"] - a2a.activations["layers"] == extra
    assert ep2.experts == a2a.experts and ep2.deepspeed == a2a.deepspeed
    assert ep8.total < ep2.total
    assert sum(ep8.deepspeed.values()) + sum(ep8.experts.values()) < (sum(eight_dp.deepspeed.values()))
    # ZeRO stages order the states; the micro-batch scales the token-proportional activations linearly
    states = [sum(estimate_memory(cfg, gpus=8, zero=z).deepspeed.values()) for z in (0, 1, 2, 3)]
    assert states == sorted(states, reverse=True) and states[3] == pytest.approx(states[0] / 8, rel=1e-6)
    a4, a8 = (estimate_memory(cfg, micro_batch=b).activations for b in (4, 8))
    assert a8["layers"] == 2 * a4["layers"] and a8["expert_weights_once"] == a4[
        "expert_weights_once"]


@pytest.mark.parametrize("name,target", [("moeut-4b", 4e9), ("moeut-8b", 8e9)])
def test_large_presets_keep_the_paper_ratios(name, target):
    cfg = get_preset(name)
    assert count_parameters(cfg)["total"] == pytest.approx(target, rel=0.02)
    assert cfg.ff_k * cfg.ff_expert_size == 2 * cfg.d_model and cfg.ff_expert_size == 128
    assert (cfg.group_size, cfg.d_head, cfg.att_k, cfg.att_n_experts) == (4, 128, 2, 12)
    assert cfg.n_heads * cfg.d_head * 2 == cfg.d_model           # H scaled like the 1B row (6 x 128 = 1536 / 2)
    assert 0.3 < cfg.ff_n_experts / cfg.d_model < 0.45           # the paper's rows: 0.36-0.38
    assert get_preset(name.replace("b", ".0b")) is cfg


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moeut_ds.info", *args], capture_output=True, text=True)


def test_cli_memory_flags_json_and_text(capsys):
    assert info_main(["moeut-1b", "--ep", "2", "--zero", "2", "--gpus", "2", "--micro-batch", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == count_parameters(get_preset("moeut-1b"))["total"] and info["macs_per_token"] > 0
    m = info["memory"]
    want = estimate_memory(get_preset("moeut-1b"), gpus=2, ep=2, zero=2, micro_batch=8).to_dict()
    assert m == want and m["fits"] is True and m["total_gib"] == pytest.approx(m["total_bytes"] / GIB)
    assert info_main(["moeut-8b", "--gpus", "8", "--ep", "8", "--gpu-mem-gib", "80"]) == 0
    text = capsys.readouterr().out
    assert "ZeRO-2, ep 8" in text and "expert shard (1/8" in text and "does NOT fit in 80 GiB" in text
    assert info_main(["moeut-244m", "--json"]) == 0                   # no memory flag: unchanged output
    assert "memory" not in json.loads(capsys.readouterr().out)
    assert info_main(["moeut-244m", "--gpus", "1"]) == 0
    assert "all parameters (experts included, ep 1)" in capsys.readouterr().out
    assert info_main(["moeut-8b", "--ep", "2", "--gpus", "2", "--activation-checkpointing", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["memory"]
    assert m == estimate_memory(get_preset("moeut-8b"), gpus=2, ep=2, micro_batch=8,
                                activation_checkpointing=True).to_dict()
    assert m["activation_checkpointing"] is True and m["fits"]


@pytest.mark.parametrize("args,msg", [
    (["--ep", "3", "--gpus", "8"], "--ep 3 does not divide --gpus 8"),
    (["--zero", "4"], "--zero 4: the ZeRO stage must be 0, 1, 2 or 3"),
    (["--ep", "2", "--gpus", "2", "--zero", "3"], "--ep 2 needs --zero 1 or 2"),
    (["--ep", "2", "--gpus", "4", "--zero", "0"], "--ep 2 needs --zero 1 or 2"),
    (["--gpus", "0"], "--gpus 0: must be at least 1"),
    (["--context", "0"], "--context 0: must be at least 1"),
    (["--gpu-mem-gib", "-5"], "--gpu-mem-gib -5: must be more than 0"),
    (["--gpu-mem-gib", "nan"], "--gpu-mem-gib nan: must be more than 0"),
])
def test_cli_errors_name_the_flag(args, msg, capsys):
    assert info_main(["moeut-1b", *args]) == 2
    assert msg in capsys.readouterr().err


def test_errors_from_the_library_and_a_subprocess():
    with pytest.raises(ConfigError, match="--ep 2: a dense model has no experts"):
        estimate_memory(get_preset("dense-1b"), gpus=2, ep=2, zero=2)
    with pytest.raises(ConfigError, match="--ep 32 is more than the 16 experts"):
        estimate_memory(get_preset("moeut-tiny"), gpus=32, ep=32, zero=1)
    bad = _cli("moeut-1b", "--ep", "3", "--gpus", "4")
    assert bad.returncode == 2 and "--ep 3 does not divide --gpus 4" in bad.stderr
