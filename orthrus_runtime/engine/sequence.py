"""Sequence: all state of one request inside the engine, with explicit counters."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch

from orthrus_runtime.types import AcceptanceStats, SamplingParams, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    mode: str  # "orthrus" or "ar"
    arrival_time: float
    eos_token_ids: frozenset[int]
    generator: Optional[torch.Generator] = None  # None for greedy
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache, all at positions [0, num_cached).
    num_cached: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    admit_order: int = -1  # larger = admitted later (preempted first)
    finish_reason: Optional[str] = None
    stats: AcceptanceStats = field(default_factory=AcceptanceStats)
    prompt_counted: bool = False  # prompt tokens enter the counters once, not on recompute
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    emissions: list[tuple[float, int]] = field(default_factory=list)
    # Output ids not yet handed out in a delta (and, with params.logprobs, their log-probs).
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # With params.prompt_logprobs: one per prompt token (entry 0 without a logprob), filled by
    # the prefill and handed out once, on the first delta.
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    prompt_logprobs_sent: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prefill_target(self) -> int:
        """Tokens that must be cached before decoding: all but the anchor (the last
        emitted token, whose K/V the next verify pass writes)."""
        return self.num_tokens - (1 if self.output_token_ids else 0)

    @property
    def is_prefilling(self) -> bool:
        return self.num_cached < self.prefill_target

    @property
    def remaining(self) -> int:
        """Tokens it may still emit."""
        return self.params.max_tokens - len(self.output_token_ids)

    def verify_len(self, plan_k: int) -> int:
        """Tokens of this sequence's next verify pass (anchor + drafts), which is also the K/V
        room its next cycle writes: the plan's K capped by what it may still emit; 1 in ar mode."""
        if self.mode == "ar":
            return 1
        return max(1, min(plan_k, self.remaining))

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def uniforms(self, n: int) -> torch.Tensor:
        """n uniforms from this request's own stream (zeros for greedy, which needs none)."""
        if self.generator is None:
            return torch.zeros(n)
        return torch.rand(n, generator=self.generator)
