"""Speculative rejection sampling for a batch of drafted blocks.

Terms (vLLM's):
- draft tokens d_0..d_{K-2}: proposed by the diffusion view, d_i ~ q_i;
- target distribution p_i: the AR view's (processed) distribution for the token
  that d_i proposes; p_{K-1} follows the last draft;
- accepted tokens: the longest prefix d_0..d_{a-1} where each d_i passes
  u_i < p_i(d_i) / q_i(d_i);
- recovered token: at the first rejection a, a token drawn from
  norm(max(0, p_a - q_a));
- bonus token: when every verified draft is accepted, a token drawn from p_{K-1}.
Each cycle emits the accepted tokens plus exactly one recovered or bonus token,
and the emitted sequence is distributed exactly as AR sampling from p.
With one-hot p and q (greedy) this reduces to "accept while equal, then the AR argmax".
"""
from __future__ import annotations

import torch

from orthrus_runtime.spec.sampling import sample_inverse_cdf


def rejection_sample(
    draft_tokens: torch.Tensor,  # [bs, K-1] int64
    draft_probs: torch.Tensor,  # [bs, K-1, V] q
    target_probs: torch.Tensor,  # [bs, K, V] p
    u_accept: torch.Tensor,  # [bs, K-1] uniforms
    u_final: torch.Tensor,  # [bs] uniforms for the recovered/bonus token
    max_accept: torch.Tensor,  # [bs] int64: verify at most this many drafts (<= K-1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (num_accepted [bs] int64, final_token [bs] int64)."""
    bs, K, V = target_probs.shape
    if K == 1:
        return torch.zeros(bs, dtype=torch.long, device=target_probs.device), sample_inverse_cdf(
            target_probs[:, 0], u_final
        )
    p_d = target_probs[:, :-1].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    q_d = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    ok = u_accept * q_d < p_d  # u < p/q without dividing by q
    pos = torch.arange(K - 1, device=ok.device)
    ok &= pos.unsqueeze(0) < max_accept.unsqueeze(-1)
    num_acc = ok.long().cumprod(dim=-1).sum(dim=-1)
    rows = torch.arange(bs, device=ok.device)
    p_at = target_probs[rows, num_acc]
    # q at the stop position; where every verified draft was accepted there is no q (bonus).
    q_pad = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    rejected = num_acc < max_accept
    q_at = torch.where(rejected.unsqueeze(-1), q_pad[rows, num_acc], torch.zeros_like(p_at))
    resid = (p_at - q_at).clamp(min=0)
    # p == q exactly leaves no residual mass (then any rejection had probability 0); fall back to p.
    empty = resid.sum(-1) <= 0
    resid = torch.where(empty.unsqueeze(-1), p_at, resid)
    return num_acc, sample_inverse_cdf(resid, u_final)
