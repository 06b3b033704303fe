"""Turning logits into distributions and tokens, batched, with per-row settings.

Both views' logits go through the same `processed_probs` (temperature, top-k,
top-p), so speculative sampling compares the distributions the AR model would
really sample from. Greedy rows (temperature 0) become one-hot at the argmax,
which makes greedy verification a special case of rejection sampling: the ratio
p/q is 1 or 0, the residual is the AR argmax.

Tokens are drawn by inverse CDF from uniforms that the caller supplies, drawn
from each request's own generator: a seeded request then samples the same
tokens whatever else is in the batch, and the device never has to sync to draw.
"""
from __future__ import annotations

from typing import Optional

import torch


def processed_probs(
    logits: torch.Tensor,  # [n, V] float32
    temperature: torch.Tensor,  # [n] float32; 0 = greedy
    top_k: torch.Tensor,  # [n] int64; <= 0 = off
    top_p: torch.Tensor,  # [n] float32; 1 = off
    flags: Optional[tuple[bool, bool, bool]] = None,
) -> torch.Tensor:
    """-> probs [n, V] float32 (rows sum to 1).

    flags = (any row uses top-k, any uses top-p, any is greedy), when the caller knows them
    from the requests' parameters on the host; without them they are read from the device
    tensors, which costs a synchronisation each."""
    n, V = logits.shape
    greedy = temperature <= 0
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1.0
    if flags is None:
        flags = (bool(use_k.any()), bool(use_p.any()), bool(greedy.any()))
    any_k, any_p, any_greedy = flags
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    x = logits / t.unsqueeze(-1)
    neg_inf = torch.tensor(float("-inf"), device=x.device)
    if any_k or any_p:
        sorted_x, order = x.sort(dim=-1, descending=True)
        if any_k:
            k = torch.where(use_k, top_k, torch.full_like(top_k, V)).clamp(min=1)
            kth = sorted_x.gather(-1, (k - 1).unsqueeze(-1))
            # Keep every logit >= the k-th largest (ties at the boundary stay, as in HF).
            x = torch.where(x < kth, neg_inf, x)
            sorted_x = torch.where(sorted_x < kth, neg_inf, sorted_x)
        if any_p:
            cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
            remove_sorted = cum > top_p.unsqueeze(-1)
            # Shift right: the token that crosses top_p stays; the first always stays.
            remove_sorted = torch.cat([torch.zeros_like(remove_sorted[:, :1]), remove_sorted[:, :-1]], dim=-1)
            remove_sorted &= use_p.unsqueeze(-1)
            remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
            x = torch.where(remove, neg_inf, x)
    probs = x.softmax(dim=-1)
    if any_greedy:
        onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(-1), onehot, probs)
    return probs


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [n, V] (need not be normalised, must have positive mass); u [n] in [0, 1) -> ids [n]."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)
