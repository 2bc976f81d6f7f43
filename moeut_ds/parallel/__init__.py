"""Parallelism applied to the plain model from outside: process groups and expert parallelism."""
from moeut_ds.parallel.expert_parallel import (CommStats, ExpertParallelBackend, ExpertShards, shard_bounds,
                                               shard_experts)
from moeut_ds.parallel.groups import ExpertParallelGroups, build_expert_parallel_groups, expert_parallel_layout

__all__ = ["CommStats", "ExpertParallelBackend", "ExpertShards", "shard_bounds", "shard_experts",
           "ExpertParallelGroups", "build_expert_parallel_groups", "expert_parallel_layout"]
