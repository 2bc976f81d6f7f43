"""Per-GPU memory estimate for training a preset: states under ZeRO, expert shards, activations (analytic).

`estimate_memory(cfg, gpus=G, ep=N, zero=S, micro_batch=B, context=T)` counts, for one GPU of a G-GPU run:

1. Parameters DeepSpeed owns (everything except the σ-MoE expert weights W1/W2 when ep > 1; everything at ep = 1,
   where the trainer leaves the experts to DeepSpeed), as the trainer runs them ("torch_autocast" bf16): fp32
   parameter 4 B, fp32 gradient 4 B, fp32 AdamW exp_avg + exp_avg_sq 8 B per parameter. ZeRO-1 divides the optimizer
   states by G (all ranks are data parallel for these parameters), ZeRO-2 also the gradients, ZeRO-3 also the
   parameters (rounded up; DeepSpeed's alignment padding is ignored).
2. Expert shards (ep > 1): each σ-MoE layer's N_E experts split into ep contiguous shards (the largest shard,
   ceil(N_E / ep) experts, is counted); held outside DeepSpeed with a torch AdamW in fp32: 16 B per expert parameter,
   not partitioned (the G / ep expert-data-parallel replicas each hold a full copy of their shard).
3. DeepSpeed's gradient-reduction buckets (ZeRO-1/2/3 with contiguous gradients): reduce_bucket_size fp32 elements,
   twice with overlap_comm; defaults = the shipped ds_configs/zero{1,2,3}_bf16.json (5e8 elements; overlap_comm on
   for ZeRO-2/3, off for ZeRO-1).
4. Activations of one micro-batch of B x T tokens: the tensors autograd saves for the backward pass, counted per
   token and per layer application (there are L applications: shared layers save their activations every time),
   for the Triton expert backend under bf16 autocast with the fp32 residual stream the trainer uses
   (`activation_bytes_per_token_layer`), plus the LM head and loss, plus the bf16 weight copies that are saved for
   backward (autocast caches one copy of each dense weight per forward, and the Triton expert backend keeps one
   copy of each expert weight per forward pass, `ExpertBackend.forward_context`). Transient buffers (the backward's activation gradients of one layer, all-to-all
   buffers, allocator fragmentation) and the CUDA context / NCCL are not counted: leave a few GiB.
   With activation checkpointing (`train.activation_checkpointing`), each application keeps only its fp32 input
   and its router logits (+ the regulariser's softmax), and one application at a time is recomputed with everything
   it saves (`checkpointed_bytes_per_token_layer`); the weight copies stay counted as an upper bound.

Checked against measured peaks (docs/PARALLEL.md): plain PyTorch loop on one H200, Triton backend, eager:
MoEUT-244M 64 x 1024 tokens measured 50.5 GiB, MoEUT-1B 32 x 1024 measured 94.0 GiB (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from moeut_ds.config import ConfigError, ModelConfig

GIB = 2 ** 30
H200_GIB = 141.0
FP32, BF16 = 4, 2
PAIR_METADATA = 20          # bytes per (token, expert) pair: fp32 gate + int64 expert id + int64 sort order
REDUCE_BUCKET = 500_000_000


def check_layout(gpus: int, ep: int, zero: int, cfg: ModelConfig | None = None) -> None:
    """The trainer's constraints, with messages naming the CLI flags of `python -m moeut_ds.info`."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: must be at least 1")
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero {zero}: the ZeRO stage must be 0, 1, 2 or 3")
    if ep < 1:
        raise ConfigError(f"--ep {ep}: the expert-parallel size must be at least 1 (1 = no expert parallelism)")
    if gpus % ep:
        raise ConfigError(f"--ep {ep} does not divide --gpus {gpus}: expert-parallel groups are blocks of --ep "
                          f"consecutive ranks, so --gpus must be a multiple of --ep")
    if ep > 1 and zero not in (1, 2):
        raise ConfigError(f"--ep {ep} needs --zero 1 or 2 (got --zero {zero}): the trainer supports expert "
                          f"parallelism with ZeRO-1/2 only")
    if cfg is not None and ep > 1:
        if cfg.arch != "moeut":
            raise ConfigError(f"--ep {ep}: a {cfg.arch} model has no experts to shard; use --ep 1")
        if ep > cfg.ff_n_experts:
            raise ConfigError(f"--ep {ep} is more than the {cfg.ff_n_experts} experts per layer: some ranks would "
                              f"hold no expert")


def expert_parameters(cfg: ModelConfig) -> int:
    """σ-MoE expert weights (W1 and W2 of every distinct layer): what expert parallelism shards."""
    if cfg.arch != "moeut":
        return 0
    return cfg.n_distinct_layers * 2 * cfg.ff_n_experts * cfg.d_model * cfg.ff_expert_size


def zero_state_bytes(n_params: int, zero: int, dp: int) -> dict[str, int]:
    """fp32 params / grads / AdamW states of n_params parameters on one of dp ranks under ZeRO stage `zero`."""
    part = math.ceil(n_params / dp)
    return {"params": FP32 * (part if zero >= 3 else n_params),
            "grads": FP32 * (part if zero >= 2 else n_params),
            "optimizer": 2 * FP32 * (part if zero >= 1 else n_params)}


def max_shard_experts(cfg: ModelConfig, ep: int) -> int:
    return math.ceil(cfg.ff_n_experts / ep)


def activation_bytes_per_token_layer(cfg: ModelConfig, ep: int = 1, dispatch: str = "alltoall") -> dict[str, int]:
    """Bytes autograd keeps per token for one layer application (Triton backend, bf16 autocast, fp32 residual).
    dispatch (ep > 1): 'alltoall' or 'allgather' (moeut_ds/parallel/expert_parallel.py)."""
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    if cfg.arch == "dense":
        d_ff = cfg.d_ff
        return {"attention": FP32 * d + 3 * BF16 * d + 5 * BF16 * h * dh,     # LN in, Q/K/V inputs, SDPA q k v out
                "feed_forward": FP32 * d + BF16 * d + BF16 * d_ff}          # LN in, W1 input, ReLU output
    hna, k, de = h * cfg.att_n_experts, cfg.ff_k, cfg.ff_expert_size
    gathered = ep > 1 and dispatch == "allgather"
    copies, pair_sets = (ep, ep) if gathered else (min(k, ep), 1)
    parts = {
        # LN_att input (fp32); bf16 casts of LN'd x for Q, K and the V/O routers; bf16 x for the V experts
        "attention_inputs": FP32 * d + 4 * BF16 * d + BF16 * d,
        # SDPA saves q, k, v and its output; the output's contiguous copy feeds the O experts
        "attention_core": 5 * BF16 * h * dh,
        # V and O routers: fp32 logits kept for the regulariser, sigmoid output, regulariser softmax
        "attention_routers": 2 * 3 * FP32 * hna,
        # LN_ff input (fp32); bf16 LN'd x for the router; router logits, sigmoid, regulariser softmax (fp32)
        "ff_router": FP32 * d + BF16 * d + 3 * FP32 * cfg.ff_n_experts,
        # expert inputs: the token once (ep = 1: the kernel gathers rows by pair) or, with ep > 1, the received copies
        # of it: one per destination rank (<= min(K, ep); the kernels read the received rows through a pair -> row
        # index, so nothing of size K x d is kept); plus the ReLU output of every pair (bf16, K x d_e). The
        # all-gather dispatch keeps every rank's tokens (ep copies) and sizes the per-pair tensors for all of their
        # pairs (ep sets of K).
        "ff_experts": BF16 * d * copies + pair_sets * BF16 * k * de,
        "routing_metadata": PAIR_METADATA * (pair_sets * k + 2 * h * cfg.att_k),
    }
    if dh < d:   # V's pre-gate products of its H K_A pairs, kept for the gate gradient (moeut_kernels keeps_pairs)
        parts["attention_v_pairs"] = BF16 * h * cfg.att_k * dh
    return parts


def weight_copy_bytes(cfg: ModelConfig, ep: int = 1) -> dict[str, int]:
    """bf16 weight copies saved for backward in one forward pass."""
    d, v = cfg.d_model, cfg.vocab_size
    if cfg.arch == "dense":
        per_layer = 4 * d * cfg.n_heads * cfg.d_head + 2 * d * cfg.d_ff
        return {"dense_weights_once": BF16 * (cfg.n_distinct_layers * per_layer + v * d),
                "expert_weights_once": 0}
    h, dh, na = cfg.n_heads, cfg.d_head, cfg.att_n_experts
    dense = cfg.n_distinct_layers * (2 * d * h * dh + 2 * h * na * d + cfg.ff_n_experts * d) + v * d
    experts = 2 * h * na * d * dh + 2 * max_shard_experts(cfg, ep) * d * cfg.ff_expert_size
    return {"dense_weights_once": BF16 * dense,                               # autocast cache: Q, K, routers, head
            "expert_weights_once": BF16 * experts * cfg.n_distinct_layers}     # V/O and FF experts, one copy a pass


def checkpointed_bytes_per_token_layer(cfg: ModelConfig) -> int:
    """With activation checkpointing, what one layer application keeps per token until backward: its fp32 input,
    and (MoEUT) its fp32 router logits plus the regulariser's softmax of them, which live outside the recomputed
    region."""
    routers = 0 if cfg.arch == "dense" else cfg.ff_n_experts + 2 * cfg.n_heads * cfg.att_n_experts
    return FP32 * cfg.d_model + 2 * FP32 * routers


def activation_bytes(cfg: ModelConfig, micro_batch: int, context: int, ep: int = 1,
                     checkpointing: bool = False, dispatch: str = "alltoall") -> dict[str, int]:
    tokens = micro_batch * context
    per_layer = sum(activation_bytes_per_token_layer(cfg, ep, dispatch).values())
    d, v = cfg.d_model, cfg.vocab_size
    # checkpointing: every application keeps its input; one at a time is recomputed with everything it saves
    layers = (cfg.n_layers * checkpointed_bytes_per_token_layer(cfg) + per_layer if checkpointing
              else cfg.n_layers * per_layer)
    out = {"layers": tokens * layers,
           # final LN input (fp32) and bf16 output; bf16 logits, the loss's fp32 log-softmax, and the fp32 + bf16
           # logit gradients alive at the start of the backward pass
           "head_and_loss": tokens * (FP32 * d + BF16 * d + BF16 * v + FP32 * v + FP32 * v + BF16 * v)}
    out.update(weight_copy_bytes(cfg, ep))       # kept as an upper bound with checkpointing too
    return out


def bucket_bytes(zero: int, reduce_bucket_size: int = REDUCE_BUCKET, overlap_comm: bool | None = None) -> int:
    if zero == 0:
        return 0
    overlap = zero >= 2 if overlap_comm is None else overlap_comm
    return FP32 * reduce_bucket_size * (2 if overlap else 1)


@dataclass
class MemoryEstimate:
    gpus: int
    ep: int
    dispatch: str                         # the expert dispatch (ep > 1), 'auto' resolved
    zero: int
    micro_batch: int
    context: int
    activation_checkpointing: bool
    gpu_mem_gib: float
    params_total: int
    params_expert: int
    experts_in_deepspeed: bool            # ep = 1: DeepSpeed owns the experts too (ZeRO-partitioned with the rest)
    deepspeed: dict[str, int]             # params / grads / optimizer bytes of what DeepSpeed owns
    experts: dict[str, int]               # params / grads / optimizer bytes of this rank's expert shard (ep > 1)
    buckets: int
    activations: dict[str, int]
    per_token_layer: dict[str, int] = field(default_factory=dict)
    checkpointed_per_token_layer: int = 0

    @property
    def total(self) -> int:
        return (sum(self.deepspeed.values()) + sum(self.experts.values()) + self.buckets
                + sum(self.activations.values()))

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem_gib * GIB

    @property
    def per_sequence(self) -> int:
        """Activation bytes that grow with the micro-batch, per sequence of `context` tokens."""
        return (self.activations["layers"] + self.activations["head_and_loss"]) // self.micro_batch

    @property
    def max_micro_batch(self) -> int:
        """Largest micro-batch (sequences of `context` tokens) whose estimate fits in gpu_mem_gib (0: none)."""
        fixed = self.total - self.per_sequence * self.micro_batch
        return max(0, int((self.gpu_mem_gib * GIB - fixed) // self.per_sequence))

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(total_bytes=self.total, total_gib=self.total / GIB, fits=self.fits,
                   max_micro_batch=self.max_micro_batch,
                   states_bytes=sum(self.deepspeed.values()) + sum(self.experts.values()),
                   activations_bytes=sum(self.activations.values()))
        return out


def estimate_memory(cfg: ModelConfig, *, gpus: int = 1, ep: int = 1, zero: int = 2, micro_batch: int = 8,
                    context: int = 1024, activation_checkpointing: bool = False, gpu_mem_gib: float = H200_GIB,
                    params_total: int | None = None, reduce_bucket_size: int = REDUCE_BUCKET,
                    overlap_comm: bool | None = None, dispatch: str = "auto") -> MemoryEstimate:
    """Bytes per GPU; params_total defaults to the measured count (accounting.count_parameters). dispatch: the
    run config's expert_dispatch."""
    from moeut_ds.parallel.expert_parallel import choose_dispatch

    check_layout(gpus, ep, zero, cfg)
    dispatch = choose_dispatch(dispatch, ep)
    if micro_batch < 1 or context < 1:
        raise ConfigError(f"--micro-batch {micro_batch} --context {context}: both must be at least 1")
    if params_total is None:
        from moeut_ds.accounting import count_parameters
        params_total = count_parameters(cfg)["total"]
    n_expert = expert_parameters(cfg)
    sharded = ep > 1
    ds_params = params_total - n_expert if sharded else params_total
    shard = cfg.n_distinct_layers * 2 * max_shard_experts(cfg, ep) * cfg.d_model * cfg.ff_expert_size if sharded else 0
    return MemoryEstimate(
        gpus=gpus, ep=ep, dispatch=dispatch, zero=zero, micro_batch=micro_batch, context=context,
        activation_checkpointing=activation_checkpointing, gpu_mem_gib=gpu_mem_gib,
        params_total=params_total, params_expert=n_expert, experts_in_deepspeed=not sharded,
        deepspeed=zero_state_bytes(ds_params, zero, gpus),
        experts={"params": FP32 * shard, "grads": FP32 * shard, "optimizer": 2 * FP32 * shard},
        buckets=bucket_bytes(zero, reduce_bucket_size, overlap_comm),
        activations=activation_bytes(cfg, micro_batch, context, ep, activation_checkpointing, dispatch),
        per_token_layer=activation_bytes_per_token_layer(cfg, ep, dispatch),
        checkpointed_per_token_layer=checkpointed_bytes_per_token_layer(cfg))
