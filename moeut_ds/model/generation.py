"""Incremental decoding with the KV cache: greedy, temperature and top-k sampling."""
from __future__ import annotations

from typing import Optional

import torch

from moeut_ds.model.lm import LanguageModel


@torch.no_grad()
def generate(model: LanguageModel, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, greedy: bool = False,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """prompt [B, T0] -> [B, T0 + max_new_tokens]. Feeds the prompt once, then one token at a time."""
    if temperature <= 0 and not greedy:
        raise ValueError(f"temperature={temperature}: must be > 0 (or use greedy=True)")
    was_training = model.training
    model.eval()
    out = model(prompt, cache=[])
    tokens, cache = prompt, out.cache
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        tokens = torch.cat([tokens, nxt], dim=1)
        if step + 1 < max_new_tokens:
            out = model(nxt, cache=cache)
            cache = out.cache
    model.train(was_training)
    return tokens
