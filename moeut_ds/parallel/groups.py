"""Process groups for expert parallelism.

Layout (world W, expert-parallel size ep): expert-parallel groups are blocks of consecutive ranks
[0..ep-1], [ep..2ep-1], ... so that, with ranks numbered node by node, the all-to-all stays inside a node (fast
links) whenever ep <= GPUs per node. Expert-data-parallel groups are the strided sets {r, r+ep, r+2ep, ...}: the
ranks that hold the same expert shard and average its gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from moeut_ds.config import ConfigError


@dataclass
class ExpertParallelGroups:
    world_size: int
    rank: int
    ep_size: int
    ep_rank: int                                     # position inside the expert-parallel group = expert shard id
    ep_group: Optional[dist.ProcessGroup]            # ranks that together hold every expert once
    edp_group: Optional[dist.ProcessGroup]           # ranks that hold the same shard (gradient averaging)

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size


def expert_parallel_layout(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(expert-parallel groups, expert-data-parallel groups) as rank lists."""
    if ep_size < 1 or world_size % ep_size != 0:
        raise ConfigError(f"expert_parallel_size={ep_size} does not divide the world size {world_size}: launch a "
                          f"multiple of {ep_size} processes or choose an expert_parallel_size that divides "
                          f"{world_size}")
    ep_groups = [list(range(s, s + ep_size)) for s in range(0, world_size, ep_size)]
    edp_groups = [list(range(r, world_size, ep_size)) for r in range(ep_size)]
    return ep_groups, edp_groups


def build_expert_parallel_groups(ep_size: int, timeout: timedelta = timedelta(minutes=10)) -> ExpertParallelGroups:
    """Collective: every rank must call it, in the same order. ep_size = 1 creates no groups."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    ep_groups, edp_groups = expert_parallel_layout(world, ep_size)
    if ep_size == 1:
        return ExpertParallelGroups(world, rank, 1, 0, None, dist.group.WORLD if dist.is_initialized() else None)
    mine_ep = mine_edp = None
    for ranks in ep_groups:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine_ep = g
    for ranks in edp_groups:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine_edp = g
    return ExpertParallelGroups(world, rank, ep_size, rank % ep_size, mine_ep, mine_edp)
