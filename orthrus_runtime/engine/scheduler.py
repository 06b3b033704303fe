"""Continuous-batching scheduler: first come, first served, with chunked prefill
and recompute preemption.

Each step every running sequence that has finished its prefill runs one decode
cycle; new and partially prefilled sequences get prompt chunks under a token
budget. A decode cycle writes its verify pass's K/V, `seq.verify_len(plan_k)`
tokens for the step's plan (the lookahead), so room for them is reserved before
the step. When the pool runs dry the
most recently admitted sequence is preempted: its blocks are freed and it goes
back to the head of the queue, to be recomputed (its generated tokens included)
when room returns.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from orthrus_runtime.engine.block_manager import BlockManager
from orthrus_runtime.engine.sequence import Sequence, SeqStatus


@dataclass
class SchedulerOutput:
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, tokens in this chunk)
    decodes: list[Sequence] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._admit_counter = 0
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def can_admit(self, plan_k: int) -> bool:
        """Whether `schedule(plan_k)` would admit the first waiting sequence now."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        seq = self.waiting[0]
        return self.blocks.num_new_blocks(seq, seq.prefill_target + seq.verify_len(plan_k)) <= self.blocks.num_free

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and return its blocks."""
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _newest_running(self) -> Sequence:
        return max(self.running, key=lambda s: s.admit_order)

    def schedule_prefills(self, plan_k: int) -> SchedulerOutput:
        """Prefill chunks and admissions alone, in the pages the pool has left, preempting
        nobody: a pipelined step's, beside the decode cycle it already queued (a chunk that
        does not fit waits for a later step)."""
        out = SchedulerOutput()
        self._prefills(plan_k, out, preempt=False)
        return out

    def _prefills(self, plan_k: int, out: SchedulerOutput, preempt: bool) -> None:
        # Prefill chunks of admitted sequences, oldest first.
        budget = self.max_num_batched_tokens
        for seq in sorted((s for s in self.running if s.is_prefilling), key=lambda s: s.admit_order):
            if budget <= 0:
                break
            n = min(seq.prefill_target - seq.num_cached, budget)
            if not self.blocks.can_allocate(seq, seq.num_cached + n):
                if not preempt:
                    return  # no room now: it goes on first, before anyone is admitted
                self._preempt(seq)
                continue
            self.blocks.allocate(seq, seq.num_cached + n)
            out.prefills.append((seq, n))
            budget -= n

        # Admit waiting sequences in arrival order while the whole prompt plus one cycle's
        # lookahead fits (no skipping ahead: first come, first served).
        while budget > 0 and self.can_admit(plan_k):
            seq = self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.admit_order = self._admit_counter
            self._admit_counter += 1
            self.running.append(seq)
            n = min(seq.prefill_target - seq.num_cached, budget)
            self.blocks.allocate(seq, seq.num_cached + n)
            out.prefills.append((seq, n))
            budget -= n

    def schedule(self, plan_k: int) -> SchedulerOutput:
        """One step's batch; plan_k: the step's verify plan K, whose K/V room each decode reserves."""
        out = SchedulerOutput()
        before = self.num_preemptions

        # 1. Decodes, oldest first: reserve the verify block's room, preempting the newest.
        for seq in sorted((s for s in self.running if not s.is_prefilling), key=lambda s: s.admit_order):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted below by an older sequence
            need = seq.num_cached + seq.verify_len(plan_k)
            while not self.blocks.can_allocate(seq, need):
                victim = self._newest_running()
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.blocks.allocate(seq, need)
                out.decodes.append(seq)
        # Drop decodes of sequences preempted after they were scheduled.
        out.decodes = [s for s in out.decodes if s.status is SeqStatus.RUNNING]

        self._prefills(plan_k, out, preempt=True)
        out.num_preempted = self.num_preemptions - before
        return out
