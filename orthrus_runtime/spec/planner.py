"""Verify planners: how many drafts to verify (K - 1) and how long a block to draft (D),
chosen once a step (`VerifyPlan`). `FullBlockPlanner` always runs the whole block;
`VerifyPolicy` (the adaptive plan) picks the (K, D) of the most expected tokens per
second. Design and the measurements behind each rule: docs/adaptive-policy.md.

The adaptive plan's inputs:
- live acceptance by draft position, alpha[j] = P(draft j accepted | drafts before it
  accepted): decayed counts over recent cycles, per draft length D, shrunk towards the
  pooled estimate where D has little data; unverified positions take the last alpha;
- the measured cost of each pass at the padded batch size (`PassCosts`), corrected by
  what the kind's recent cycles (AR or speculative) show the table misses: a per-cycle
  `overhead` when not pipelined (host work between passes), a `scale` when pipelined
  (the device slower than on the table's synthetic inputs). Untried speculative plans
  take AR's scale, never the reverse, so that neither kind is costed more optimistically
  than the one it is weighed against. A correction needs 3 cycles (one slow cycle must
  not rule a kind out: a kind no longer chosen is no longer measured).

A cycle verifying K - 1 drafts emits 1 + sum_{i<K-1} prod_{j<=i} alpha[j] tokens on
average and costs (draft(bs, D) + verify(bs, K)) * scale + overhead; plain AR (K = 1)
emits one for verify(bs, 1) * scale + overhead. A plan with 3 cycles of its own is costed
by their median instead (the table runs a few percent fast on compute-bound passes).

Rules:
- Only K and D change: the acceptance rule and each request's uniforms per cycle do not,
  so the output distribution stays the AR model's.
- From AR, a plan must beat AR's rate by `spec_margin` (3 %, above the estimates' error);
  once speculating, a plan keeps the step while it is ahead of AR (hysteresis: a margin
  both ways flips between two near-equal choices).
- While AR wins, the cheapest plan is probed at growing intervals, only if an optimistic
  acceptance (estimate plus uncertainty) would win by `probe_gain`, and spaced so that
  probes cost at most `probe_budget` (0.25 %, below an AR step's noise) of the AR time
  between them.
- After `ar_recheck` cycles of speculation winning by less than `ar_recheck_gain`, AR's old
  cost is forgotten so that AR runs and is measured again.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple, Optional

import numpy as np

from orthrus_runtime.worker.cuda_graphs import TOKEN_SIZES
from orthrus_runtime.worker.pass_costs import PassCosts, batch_bucket


class VerifyPlan(NamedTuple):
    """What one step's speculative cycle runs, the same for every orthrus sequence in it."""

    num_verify: int  # K: tokens of the verify pass, the anchor and K - 1 drafts; 1 is a plain AR step
    draft_len: int  # D: tokens of the draft pass (0 when num_verify is 1: no draft pass)


class Planner:
    """Chooses the verify plan once at the top of each step; the engine feeds back what the
    cycles accepted and cost. A fixed planner learns nothing from that feedback."""

    def choose(self, num_seqs: int, max_remaining: int) -> VerifyPlan:
        raise NotImplementedError

    def observe(self, draft_len: int, verified: list[int], accepted: list[int]) -> None:
        return None

    def observe_time(self, num_seqs: int, num_verify: int, draft_len: int, seconds: float) -> None:
        return None

    def pass_lengths(self) -> set[int]:
        """The verify and draft pass lengths it may choose (their CUDA graphs are captured ahead)."""
        raise NotImplementedError


class FullBlockPlanner(Planner):
    """The paper's cycle: draft the whole block, verify every draft."""

    def __init__(self, block_size: int):
        self.plan = VerifyPlan(block_size, block_size)

    def choose(self, num_seqs: int, max_remaining: int) -> VerifyPlan:
        return self.plan

    def pass_lengths(self) -> set[int]:
        return {self.plan.num_verify}


def make_planner(verify_policy: str, block_size: int, costs: PassCosts, pipelined: bool) -> Planner:
    """The planner an engine setting names: "full" (FullBlockPlanner) or "adaptive" (VerifyPolicy)."""
    if verify_policy == "full":
        return FullBlockPlanner(block_size)
    if verify_policy == "adaptive":
        return VerifyPolicy(block_size, costs, pipelined=pipelined)
    raise ValueError(f"verify_policy must be 'full' or 'adaptive', got {verify_policy!r}")


class AcceptanceEstimator:
    def __init__(self, max_drafts: int, decay: float = 0.98, prior_alpha: float = 0.5, prior_weight: float = 2.0,
                 shrink: float = 4.0):
        self.n = max(1, max_drafts)
        self.decay, self.prior_alpha, self.prior_weight, self.shrink = decay, prior_alpha, prior_weight, shrink
        self.tried: dict[Optional[int], np.ndarray] = {None: np.zeros(self.n)}
        self.acc: dict[Optional[int], np.ndarray] = {None: np.zeros(self.n)}
        self._curves: dict[tuple, np.ndarray] = {}  # cached, cleared whenever the counts change
        self._pooled: Optional[np.ndarray] = None  # likewise: the pooled estimate (a Python loop)

    def observe(self, draft_len: int, verified: list[int], accepted: list[int]) -> None:
        """One cycle: per sequence, drafts verified and drafts accepted (a prefix)."""
        v = np.minimum(np.asarray(verified), self.n)
        a = np.minimum(np.asarray(accepted), v)
        reached = np.minimum(a + 1, v)  # positions 0..reached-1 were tried
        tried = np.bincount(reached, minlength=self.n + 1)[::-1].cumsum()[::-1][1:]
        acc = np.bincount(a, minlength=self.n + 1)[::-1].cumsum()[::-1][1:]
        for key in (None, draft_len):
            if key not in self.tried:
                self.tried[key], self.acc[key] = np.zeros(self.n), np.zeros(self.n)
            self.tried[key] = self.tried[key] * self.decay + tried[: self.n]
            self.acc[key] = self.acc[key] * self.decay + acc[: self.n]
        self._curves.clear()
        self._pooled = None

    def age(self) -> None:
        """A cycle without speculation: old evidence fades all the same (the estimate is live)."""
        for key in self.tried:
            self.tried[key] *= self.decay
            self.acc[key] *= self.decay
        self._curves.clear()
        self._pooled = None

    def alpha(self, draft_len: Optional[int] = None, optimistic: bool = False) -> np.ndarray:
        """Conditional acceptance per draft position (length self.n). optimistic: raised by
        1/sqrt(1 + observations at position 0), the uncertainty that justifies a probe."""
        pooled = self._pooled
        if pooled is None:
            # Each position shrinks towards the one before (the first towards the prior).
            pooled = np.empty(self.n)
            prior = self.prior_alpha
            t, c = self.tried[None], self.acc[None]
            for j in range(self.n):
                pooled[j] = (c[j] + self.prior_weight * prior) / (t[j] + self.prior_weight)
                prior = pooled[j]
            self._pooled = pooled
        al = pooled
        if draft_len is not None and draft_len in self.tried:
            t, c = self.tried[draft_len], self.acc[draft_len]
            al = (c + self.shrink * pooled) / (t + self.shrink)
        if optimistic:
            al = np.minimum(1.0, al + 1.0 / np.sqrt(1.0 + self.tried[None][0]))
        return al

    def curve(self, draft_len: Optional[int] = None, optimistic: bool = False) -> np.ndarray:
        """curve[K] = mean tokens emitted by a cycle verifying K - 1 drafts (K = 1..n+1)."""
        key = (draft_len, optimistic)
        c = self._curves.get(key)
        if c is None:
            c = np.concatenate([[1.0, 1.0], 1.0 + np.cumsum(np.cumprod(self.alpha(draft_len, optimistic)))])
            self._curves[key] = c
        return c

    def expected_tokens(self, K: int, draft_len: Optional[int] = None) -> float:
        """Mean tokens emitted by a cycle verifying K - 1 drafts (the AR token included)."""
        return float(self.curve(draft_len)[min(max(K, 1), self.n + 1)])


class VerifyPolicy(Planner):
    """The adaptive plan: the (K, D) of the highest expected tokens per second (module docstring)."""

    def __init__(self, block_size: int, costs: PassCosts, token_sizes=TOKEN_SIZES, vary_draft_len: bool = True,
                 probe_min: int = 8, probe_max: int = 256, probe_gain: float = 1.10, pipelined: bool = False,
                 probe_budget: float = 0.0025, ar_recheck: int = 128, ar_recheck_gain: float = 1.25,
                 spec_margin: float = 1.03):
        self.B = block_size
        self.costs = costs
        self.pipelined = pipelined
        self.acceptance = AcceptanceEstimator(block_size - 1)
        # Per kind, recent cycles' excess over the table: seconds (not pipelined) or ratios (pipelined).
        self._extra: dict[str, deque] = {"spec": deque(maxlen=15), "ar": deque(maxlen=15)}
        self._cycle: dict[tuple[int, int, int], deque] = {}  # (batch bucket, K, D) -> recent cycle seconds
        self.overhead = {"spec": 0.0, "ar": 0.0}  # seconds added to a cycle (not pipelined)
        self.scale = {"spec": 1.0, "ar": 1.0}  # factor on a cycle's passes (pipelined)
        self.vary_draft_len = vary_draft_len
        sizes = sorted({s for s in token_sizes if 2 <= s <= block_size} | {block_size})
        self.sizes = sizes
        self.probe_min, self.probe_max, self.probe_gain = probe_min, probe_max, probe_gain
        self.probe_budget = probe_budget
        self.spec_margin = spec_margin
        self.speculating = False  # the last choice was a speculative plan (a probe does not count)
        self.ar_recheck, self.ar_recheck_gain = ar_recheck, ar_recheck_gain
        self.since_ar = 0
        self.probe_every = probe_min
        self.since_spec = 0
        self._pass_cost: dict[tuple[int, int, int], float] = {}  # (bs, K, D) -> passes, for costs.version
        self._pass_version = -1

    def pass_lengths(self) -> set[int]:
        return {1, *self.sizes}

    def _draft_lens(self, K: int) -> list[int]:
        if not self.vary_draft_len:
            return [self.B]
        return sorted({d for d in self.sizes if d >= K} | {self.B})

    def pass_cost(self, bs: int, K: int, D: int) -> float:
        """Device time of the passes of one cycle (cached: this runs every step)."""
        if self._pass_version != self.costs.version:
            self._pass_cost.clear()
            self._pass_version = self.costs.version
        key = (bs, K, D)
        c = self._pass_cost.get(key)
        if c is None:
            c = self.costs.estimate("verify", bs, max(K, 1))
            if K > 1:
                c += self.costs.estimate("draft", bs, D)
            self._pass_cost[key] = c
        return c

    def cycle_cost(self, bs: int, K: int, D: int) -> float:
        seen = self._cycle.get((batch_bucket(bs), K, D if K > 1 else 0))
        if seen is not None and len(seen) >= 3:
            return sorted(seen)[len(seen) // 2]
        kind = "spec" if K > 1 else "ar"
        return self.pass_cost(bs, K, D) * self.scale[kind] + self.overhead[kind]

    def rates(self, bs: int, max_remaining: int, optimistic: bool = False) -> list[tuple[float, int, int]]:
        """(expected tokens per second per sequence, K, D) of every candidate."""
        out = [(1.0 / self.cycle_cost(bs, 1, 0), 1, 0)]
        est = self.acceptance
        for K in self.sizes:
            if K > max(max_remaining, 1):
                break
            for D in self._draft_lens(K):
                out.append((est.curve(D, optimistic)[min(K, est.n + 1)] / self.cycle_cost(bs, K, D), K, D))
        return out

    def _best(self, cands: list[tuple[float, int, int]]) -> tuple[float, int, int]:
        """The fastest candidate; from AR, a plan only if it beats AR (cands[0]) by spec_margin."""
        best = max(cands, key=lambda c: c[0])
        return best if best[0] > (1.0 if self.speculating else self.spec_margin) * cands[0][0] else cands[0]

    def choose(self, bs: int, max_remaining: int) -> VerifyPlan:
        cands = self.rates(bs, max_remaining)
        best = self._best(cands)
        if best[1] > 1:
            self.since_ar += 1
            if self.since_ar >= self.ar_recheck and best[0] < self.ar_recheck_gain * cands[0][0]:
                # Speculation wins by a modest margin over an AR step measured long ago: forget
                # that measurement, so that AR is costed by the table again, runs, and is measured
                # afresh (a few slow AR samples must not keep it out for good). At most a few AR
                # cycles every ar_recheck cycles, each losing at most 20 %: under 1 %.
                self._forget_ar(bs)
                cands = self.rates(bs, max_remaining)
                best = self._best(cands)
        probe = False
        if best[1] > 1:
            self.since_spec, self.probe_every = 0, self.probe_min
        elif len(cands) > 1:
            self.since_ar = 0
            self.acceptance.age()
            self.since_spec += 1
            if self.since_spec >= self.probe_every:
                # AR wins on the estimate. Probe (the cheapest speculative cycle) only if an
                # optimistic acceptance, within the estimate's uncertainty, would make
                # speculation win by a margin worth a probe (10 %: the pass table behind an
                # untried plan is itself a few percent optimistic on large passes): a confident
                # "no" (say, a compute-bound batch), or a possible gain of a few percent, costs nothing.
                opt = self.rates(bs, max_remaining, optimistic=True)
                if max(c[0] for c in opt[1:]) > self.probe_gain * opt[0][0]:
                    best, probe = min(cands[1:], key=lambda c: self.cycle_cost(bs, c[1], c[2])), True
                    self.since_spec = 0
                    # The next probe: twice as far, and far enough that probes' extra time stays
                    # within probe_budget of the AR steps between them (a probe at batch 128
                    # costs several AR steps, at batch 1 about two).
                    ar = self.cycle_cost(bs, 1, 0)
                    extra = max(0.0, self.cycle_cost(bs, best[1], best[2]) - ar)
                    self.probe_every = max(min(self.probe_every * 2, self.probe_max),
                                           int(extra / (self.probe_budget * ar)) if ar > 0 else 0)
        self.speculating = best[1] > 1 and not probe
        return VerifyPlan(best[1], best[2])

    def _forget_ar(self, bs: int) -> None:
        self._cycle.pop((batch_bucket(bs), 1, 0), None)
        self._extra["ar"].clear()
        self.overhead["ar"], self.scale["ar"] = 0.0, 1.0
        self.since_ar = 0

    def observe(self, draft_len: int, verified: list[int], accepted: list[int]) -> None:
        self.acceptance.observe(draft_len, verified, accepted)

    def observe_time(self, bs: int, K: int, D: int, seconds: float) -> None:
        """A whole cycle's wall time; what the passes do not explain is the kind's `overhead`
        (not pipelined) or `scale` (pipelined; see the module docstring): the median of its
        recent cycles once it has 3."""
        kind = "spec" if K > 1 else "ar"
        self._cycle.setdefault((batch_bucket(bs), K, D if K > 1 else 0), deque(maxlen=9)).append(seconds)
        passes = self.pass_cost(bs, K, D)
        if self.pipelined:
            self._extra[kind].append(max(1.0, seconds / passes) if passes > 0 else 1.0)
            own = {k: sorted(xs)[len(xs) // 2] for k, xs in self._extra.items() if len(xs) >= 3}
            self.scale["ar"] = own.get("ar", 1.0)
            self.scale["spec"] = own.get("spec", self.scale["ar"])
        else:
            xs = self._extra[kind]
            xs.append(max(0.0, seconds - passes))
            self.overhead[kind] = sorted(xs)[len(xs) // 2] if len(xs) >= 3 else 0.0
