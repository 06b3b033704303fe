"""Benchmark controls injected into an engine through its constructor (the runtime holds no
benchmark-only code): a planner that can pin a fixed (K, D) plan, an acceptance rule that can
force how many drafts verification accepts while every pass still runs, and the Triton op set
without split-KV attention (to measure what the split gains)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine, build_runner, pipelined_for
from orthrus_runtime.spec.cycle import RejectionSampling, SamplingBatch
from orthrus_runtime.spec.planner import Planner, VerifyPlan, make_planner
from orthrus_runtime.worker.fast_forward import TritonOps


class TritonOpsNoSplit(TritonOps):
    """The Triton kernels with one program per row block in attention (no split-KV)."""

    name = "triton-no-split"

    def attention(self, q, kb, vb, kc, vc, bt, start, nvalid, T, scale, causal, meta=None):
        return self.tk.paged_attention(q, kb, vb, kc, vc, bt, start, nvalid, T, scale, causal, splits=1)


class ForcedAcceptance(RejectionSampling):
    """With `profile` set (P(accept draft i | drafts before accepted), per position; [] accepts
    none), a cycle accepts a number of drafts drawn from it, then the AR argmax; with None, the
    real rule. Counts are drawn for the whole batch at once (a per-token Python loop would
    dominate large batches)."""

    def __init__(self, seed: int = 0):
        self.profile: Optional[list[float]] = None
        self._rng = torch.Generator().manual_seed(seed)

    def counts(self, bs: int, n: int) -> torch.Tensor:
        prof = list(self.profile or [])[:n]
        prof += [0.0] * (n - len(prof))
        r = torch.rand(bs, n, generator=self._rng)
        return (r < torch.tensor(prof)).long().cumprod(dim=-1).sum(dim=-1)

    def accept(self, drafts: torch.Tensor, q: Optional[torch.Tensor], logits: torch.Tensor,
               sb: SamplingBatch, u: torch.Tensor, max_accept: torch.Tensor, B: int):
        bs, K, V = logits.shape
        if self.profile is None or K == 1:
            return super().accept(drafts, q, logits, sb, u, max_accept, B)
        target = logits.argmax(-1) if sb.all_greedy else sb.probs(logits.reshape(-1, V), K).view(bs, K, V).argmax(-1)
        num = torch.minimum(max_accept, self.counts(bs, K - 1).to(logits.device))
        return num, target[torch.arange(bs, device=logits.device), num]


class BenchPlanner(Planner):
    """A fixed (K, D) plan while `fixed` is set, else the configured planner (`inner`), which
    `reset()` replaces by a fresh one (no acceptance or cycle history). Feedback always reaches
    `inner`, as it reaches the engine's own planner. `last`: the inner planner's last choice."""

    def __init__(self, make: Callable[[], Planner]):
        self._make = make
        self.inner = make()
        self.fixed: Optional[tuple[int, int]] = None
        self.last: dict = {}

    def reset(self) -> None:
        self.inner = self._make()

    def choose(self, num_seqs: int, max_remaining: int) -> VerifyPlan:
        if self.fixed is not None:
            return VerifyPlan(*self.fixed)
        plan = self.inner.choose(num_seqs, max_remaining)
        self.last = {"bs": num_seqs, "K": plan.num_verify, "D": plan.draft_len}
        return plan

    def observe(self, draft_len: int, verified: list[int], accepted: list[int]) -> None:
        self.inner.observe(draft_len, verified, accepted)

    def observe_time(self, num_seqs: int, num_verify: int, draft_len: int, seconds: float) -> None:
        self.inner.observe_time(num_seqs, num_verify, draft_len, seconds)

    def pass_lengths(self) -> set[int]:
        return self.inner.pass_lengths()


def bench_engine(model, cfg: EngineConfig, tokenizer=None) -> LLMEngine:
    """An engine whose planner is a BenchPlanner and whose acceptance rule is ForcedAcceptance
    (both reachable as eng.planner and eng.acceptance); unforced, it runs as a served engine."""
    runner = build_runner(model, cfg)
    pipelined = pipelined_for(cfg, runner)
    planner = BenchPlanner(lambda: make_planner(cfg.verify_policy, cfg.block_size, runner.costs, pipelined))
    return LLMEngine(model, cfg, tokenizer, runner=runner, planner=planner, acceptance=ForcedAcceptance())
