"""Entropy regulariser (spec 1.5): per sequence, maximise the entropy of the mean expert selection."""
from __future__ import annotations

import math

import torch


def mean_selection_neg_entropy(logits: list[torch.Tensor]) -> torch.Tensor:
    """logits: R tensors [B, T, ..., E] of one router (one per application of its shared layer).

    p_b = mean over tokens and repeats of softmax(s); returns -mean over b (and heads) of H(p_b).
    """
    s = torch.cat(logits, dim=1)                                   # [B, R*T, ..., E]
    log_p = torch.log_softmax(s.float(), dim=-1)
    log_mean = torch.logsumexp(log_p, dim=1) - math.log(s.shape[1])   # [B, ..., E]
    entropy = -(log_mean.exp() * log_mean).sum(-1)
    return -entropy.mean()


def entropy_regularizer(router_logs: list[dict[str, list[torch.Tensor]]], ff_coef: float,
                        att_coef: float) -> torch.Tensor:
    """gamma * sum_g L_ff(g) + delta * sum_g (L_v(g) + L_o(g)) over the distinct layers' router logs."""
    total = None
    for log in router_logs:
        for key, coef in (("ff", ff_coef), ("v", att_coef), ("o", att_coef)):
            if log.get(key):
                term = coef * mean_selection_neg_entropy(log[key])
                total = term if total is None else total + term
    return total
