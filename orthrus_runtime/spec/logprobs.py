"""Log-probabilities of emitted (and prompt) tokens: the AR view's raw distribution.

The rule: a token's log-probability is log_softmax(AR logits at the position before it),
taken from the pass that decided it: the verify pass in Orthrus mode (row j of the block
scores the token emitted at j: draft j while j < accepted, then the final token), the AR
step in ar mode, the prefill for the first token and for prompt tokens. The same numbers
in both modes, since Orthrus only emits what the AR view verified; raw logits (before
temperature, top-k, top-p), as vLLM's default, so they do not depend on sampling settings.

On the device the result is one float32 table per row, [1 + 2n]: the token's log-prob, the
n best log-probs, then those n ids (exact as floats: ids < 2**24).
"""
from __future__ import annotations

from typing import Callable

import torch

from orthrus_runtime.types import TokenLogprob


def logprob_table(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """logits [..., V], tokens [...] -> [..., 1 + 2n] (see the module docstring)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    chosen = logits.gather(-1, tokens.long().unsqueeze(-1)) - lse
    if n == 0:
        return chosen
    v, i = logits.topk(n, dim=-1)
    return torch.cat([chosen, v - lse, i.float()], dim=-1)


def verify_tokens(drafts: torch.Tensor, num: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """The token each verify row scores: drafts [bs, T-1], accepted num [bs], final [bs] ->
    [bs, T]: draft j for j < num, the final token at num (rows past it are unused)."""
    bs = final.shape[0]
    padded = torch.cat([drafts, final.unsqueeze(1)], dim=1)
    j = torch.arange(padded.shape[1], device=final.device).unsqueeze(0).expand(bs, -1)
    return torch.where(j < num.unsqueeze(1), padded, final.unsqueeze(1))


def to_logprobs(rows: list[list[float]], k: int, decode: Callable[[int], str],
                token_ids: list[int]) -> list[TokenLogprob]:
    """Host tables (one per token, of some n >= k) -> TokenLogprob with the k best."""
    out = []
    for t, r in zip(token_ids, rows):
        n = (len(r) - 1) // 2
        top = [TokenLogprob(int(r[1 + n + i]), r[1 + i], decode(int(r[1 + n + i]))) for i in range(k)]
        out.append(TokenLogprob(t, r[0], decode(t), top))
    return out
