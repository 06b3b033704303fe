"""The device side of one decode cycle for a batch: draft, sample the drafts, verify,
accept, with a single host synchronisation at the end (one copy of the accepted
counts, the final tokens and the drafts).

`launch_cycle` queues a cycle and returns at once; `LaunchedCycle.outcome()` waits
for its result. Between the two the host may queue the next cycle (`Chain`): it
takes its start positions and anchors from this cycle's device outputs, so the
device never waits for the host's bookkeeping (pipelined decoding, see
engine/llm_engine.py). A cycle sees block tables, positions and sampling settings,
never the engine's Sequence objects.

The acceptance rule is handed in (`RejectionSampling` in production:
`rejection_sampler.rejection_sample` over the distributions of
`sampling.processed_probs`). Two shortcuts keep it on the device and cheap:
- `processed_probs` gets its "does any row use top-k / top-p / greedy" decisions
  from the requests' parameters on the host (`flags`) instead of by reading device
  tensors (same operations, no synchronisation);
- a batch where every request is greedy skips probabilities altogether: with one-hot
  p and q, rejection sampling is "accept while the draft is the AR argmax, then emit
  the AR argmax", computed on token ids (the same result, exactly; tested).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch

from orthrus_runtime.spec.logprobs import logprob_table, verify_tokens
from orthrus_runtime.spec.rejection_sampler import rejection_sample
from orthrus_runtime.spec.sampling import processed_probs, sample_inverse_cdf
from orthrus_runtime.types import SamplingParams


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without waiting: a copy from pageable memory would block the host
    until the device has finished everything queued before it."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class SamplingBatch:
    """The sampling parameters of a batch, as device tensors, and the host-side flags. Built
    once per batch composition (the engine keeps it while the batch stays the same)."""

    def __init__(self, ps: Seq[SamplingParams], device: torch.device):
        ps = list(ps)
        self.all_greedy = all(p.greedy for p in ps)
        self.any_greedy = any(p.greedy for p in ps)
        self.device = device
        self.ps = ps
        # Alternatives per position for the rows that asked for log-probabilities (None: none did).
        self.num_logprobs = max((p.logprobs for p in ps if p.logprobs is not None), default=None)
        self._t = None

    def _tensors(self):
        if self._t is None:
            dev = self.device
            self._t = (to_device(torch.tensor([float(p.temperature) for p in self.ps]), dev),
                       to_device(torch.tensor([int(p.top_k) for p in self.ps]), dev),
                       to_device(torch.tensor([float(p.top_p) for p in self.ps]), dev))
        return self._t

    def probs(self, logits: torch.Tensor, per_seq: int) -> torch.Tensor:
        """logits [bs*per_seq, V] (row-major by sequence) -> processed probs."""
        V = logits.shape[-1]
        t, k, p = (x.repeat_interleave(per_seq) for x in self._tensors())
        any_k = any(0 < q.top_k < V for q in self.ps)
        any_p = any(q.top_p < 1.0 for q in self.ps)
        return processed_probs(logits, t, k, p, flags=(any_k, any_p, self.any_greedy))


class RejectionSampling:
    """The production acceptance rule: speculative rejection sampling (vLLM's terms), or, when
    every request is greedy, its exact one-hot form on token ids (`greedy_accept`)."""

    def accept(self, drafts: torch.Tensor, q: Optional[torch.Tensor], logits: torch.Tensor,
               sb: SamplingBatch, u: torch.Tensor, max_accept: torch.Tensor, B: int):
        """drafts [bs, K-1]; q [bs, K-1, V] draft probs (None when all greedy); logits [bs, K, V]
        of the verify pass; u [bs, 2B-1] on the device (unused when all greedy); max_accept [bs]
        -> (num_accepted [bs], final token [bs])."""
        bs, K, V = logits.shape
        if sb.all_greedy:
            return greedy_accept(drafts, logits.argmax(-1), max_accept)
        p = sb.probs(logits.reshape(-1, V), K).view(bs, K, V)
        if K > 1:
            ua, uf = u[:, B - 1: B - 1 + K - 1], u[:, 2 * B - 2]
        else:
            ua, uf = u[:, :0], u[:, -1]
            q = torch.zeros(bs, 0, V, device=logits.device)
        return rejection_sample(drafts, q, p, ua, uf, max_accept)


def greedy_accept(drafts: torch.Tensor, target: torch.Tensor, max_accept: torch.Tensor):
    """Rejection sampling for one-hot p and q, on ids: drafts [bs, K-1], target (AR argmax)
    [bs, K], max_accept [bs] -> (num_accepted [bs], final token [bs])."""
    bs, K = target.shape
    rows = torch.arange(bs, device=target.device)
    if K == 1:
        return torch.zeros(bs, dtype=torch.long, device=target.device), target[:, 0]
    ok = drafts == target[:, :-1]
    ok &= torch.arange(K - 1, device=ok.device).unsqueeze(0) < max_accept.unsqueeze(-1)
    num = ok.long().cumprod(dim=-1).sum(dim=-1)
    return num, target[rows, num]


@dataclass
class CycleOutcome:
    num_accepted: list[int]
    final: list[int]
    drafts: list[list[int]]  # the drafts of each sequence (Kmax - 1 of them; only a prefix is used)
    # With SamplingBatch.num_logprobs: per sequence, per verify row, a logprobs.logprob_table row.
    logprobs: Optional[list[list[list[float]]]] = None


@dataclass
class Chain:
    """A cycle launched before the previous one is committed (pipelined decoding): row i of the
    new batch continues row rows[i] of `prev` (-1: a sequence whose host state is current).
    The new cycle's start and anchor come from prev's device outputs: start + accepted + 1, and
    the final token. Host starts of chained rows are upper bounds (sizing only)."""
    prev: "LaunchedCycle"
    rows: list[int]


@dataclass
class LaunchedCycle:
    """A decode cycle whose device work is queued. Its outcome is on its way to pinned host
    memory; `outcome()` waits for that copy alone, not for work queued after it."""
    K: list[int]
    draft_len: int
    start: torch.Tensor  # [bs] int32, device: cached length each sequence started at
    num: torch.Tensor    # [bs] int64, device: accepted drafts
    final: torch.Tensor  # [bs] int64, device: the recovered/bonus token (the next anchor)
    host: torch.Tensor   # [bs, 1 + Kmax] int64 (pinned on CUDA): num, final, drafts
    ready: Optional[torch.cuda.Event]
    t_launch: float
    lp_host: Optional[torch.Tensor] = None  # [bs, Kmax, 1 + 2n] float32: logprobs.logprob_table

    def outcome(self) -> CycleOutcome:
        if self.ready is not None:
            self.ready.synchronize()  # the one host synchronisation of the cycle
        packed = self.host.tolist()
        return CycleOutcome([r[0] for r in packed], [r[1] for r in packed], [r[2:] for r in packed],
                            self.lp_host.tolist() if self.lp_host is not None else None)


def _chained(chain: Optional[Chain], host_starts: list[int], anchors: list[int], dev: torch.device):
    """Device starts [bs] int32 and anchors [bs] int64 of a cycle: host values, or, for chained
    rows, the previous cycle's device outputs (no synchronisation)."""
    p = chain.prev if chain is not None else None
    if p is not None and chain.rows == list(range(len(p.K))):
        # The steady state: the same batch in the same order. Two small kernels, no copies.
        return (p.start + p.num + 1).to(torch.int32), p.final
    start = to_device(torch.tensor(host_starts, dtype=torch.int32), dev)
    anchor = to_device(torch.tensor(anchors, dtype=torch.long), dev)
    if p is None:
        return start, anchor
    idx = to_device(torch.tensor([max(r, 0) for r in chain.rows], dtype=torch.long), dev)
    on = to_device(torch.tensor([r >= 0 for r in chain.rows]), dev)
    start = torch.where(on, (p.start[idx] + p.num[idx] + 1).to(torch.int32), start)
    anchor = torch.where(on, p.final[idx], anchor)
    return start, anchor


def launch_cycle(runner, block_tables: list[list[int]], host_starts: list[int], anchors: list[int],
                 K: list[int], draft_len: int, B: int, mask_id: int, sb: SamplingBatch, u: torch.Tensor,
                 acceptance: RejectionSampling, chain: Optional[Chain] = None) -> LaunchedCycle:
    """Queue draft (draft_len tokens) + verify (max(K) tokens) + accept for a batch; sequence i
    (block table block_tables[i], host_starts[i] tokens cached) verifies K[i] - 1 drafts.
    u [bs, 2B-1] (CPU): the requests' uniforms of this cycle (drafts use u[:, :K-1], acceptance
    u[:, B-1:B-1+K-1], the final token u[:, 2B-2]). With `chain`, chained rows take start and
    anchor from the previous cycle on the device (`anchors` and `host_starts` are then
    placeholders / upper bounds for those rows)."""
    t_launch = time.perf_counter()
    dev = runner.device
    bs, Kmax = len(block_tables), max(K)
    greedy = sb.all_greedy
    # Every host input goes over before the first launch: nothing after it waits for the
    # device until the one synchronisation in `outcome()`.
    start_d, anchors_d = _chained(chain, host_starts, anchors, dev)
    dev_pos = chain is not None  # the passes must read positions/anchors from the device
    max_acc = to_device(torch.tensor([k - 1 for k in K], dtype=torch.long), dev)
    if not greedy:
        u = to_device(u, dev)
        sb._tensors()
    q = None
    if Kmax > 1:
        dl = runner.run_draft(block_tables, host_starts, anchors, draft_len, mask_id, Kmax - 1,
                              start_dev=start_d if dev_pos else None, anchor_dev=anchors_d if dev_pos else None)
        V = dl.shape[-1]
        if greedy:
            drafts = dl.argmax(-1)
        else:
            q = sb.probs(dl.reshape(-1, V), Kmax - 1).view(bs, Kmax - 1, V)
            drafts = sample_inverse_cdf(q.reshape(-1, V), u[:, : Kmax - 1].reshape(-1)).view(bs, Kmax - 1)
    else:
        drafts = torch.zeros(bs, 0, dtype=torch.long, device=dev)
    ids = torch.cat([anchors_d.unsqueeze(1), drafts], dim=1)
    lg = runner.run_verify(block_tables, host_starts, ids, list(K), start_dev=start_d if dev_pos else None)
    num, final = acceptance.accept(drafts, q, lg, sb, u, max_acc, B)
    packed = torch.cat([num.unsqueeze(1), final.unsqueeze(1), drafts], dim=1)
    lp = None
    if sb.num_logprobs is not None:  # the raw AR log-probs of what each row emits
        lp = logprob_table(lg, verify_tokens(drafts, num, final), sb.num_logprobs)
    ready = None
    if dev.type == "cuda":
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        if lp is not None:
            lp_host = torch.empty(lp.shape, dtype=lp.dtype, pin_memory=True)
            lp_host.copy_(lp, non_blocking=True)
            lp = lp_host
        ready = torch.cuda.Event()
        ready.record()
    else:
        host = packed
    return LaunchedCycle(list(K), draft_len, start_d, num, final, host, ready, t_launch, lp)
