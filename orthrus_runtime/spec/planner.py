"""Adaptive verification: how many drafts to verify (K - 1) and how long a block to
draft (D), chosen each cycle to maximise expected emitted tokens per second.

Inputs:
- the live acceptance by draft position: alpha[j] = P(draft j accepted | drafts
  0..j-1 accepted), an exponentially decayed count over recent cycles, kept per
  draft length D and shrunk towards the pooled estimate where D has little data;
  positions never verified take the last estimated alpha (geometric extrapolation);
- the measured cost of each pass at the current (padded) batch size: CUDA-graph
  replay times on the GPU, wall-clock on the CPU (`PassCosts`), corrected by what the
  recent cycles of each kind (AR or speculative) show the table misses. How depends on
  where that time goes:
  - not pipelined (the CPU, or `async_scheduling` off): the host's work between passes
    (sampling, acceptance, bookkeeping) adds a per-cycle constant, the `overhead`;
  - pipelined: the host's work hides behind the next cycle, and what the table misses
    is the device running slower than on the table's synthetic inputs, which grows
    with the pass: a ratio, the `scale`. Speculative plans with no cycles of their own
    yet take the AR step's ratio: mostly untried where AR wins, they are then not
    costed more optimistically than the AR step they are weighed against (at batch 128
    on an H200 the bare table made 16-token plans look 10 % ahead, and the policy kept
    probing them). Not the other way round: an AR step costed by the speculative
    cycles' ratio (25 % on an H100 at batch 128, against AR's own 10 %) can look slower
    than it is, lose to speculation before it has run, and then never be measured.
  Each correction is the median of the kind's recent cycles, taken as none
  (optimistic, so that the kind gets tried) until it has 3: one slow cycle (a compile,
  a collection) must not make a kind look expensive for good, since a kind the policy
  stops choosing is no longer measured.

A cycle verifying K - 1 drafts emits 1 + sum_{i<K-1} prod_{j<=i} alpha[j] tokens on
average and costs (draft(bs, D) + verify(bs, K)) * scale + overhead; plain AR (K = 1)
emits one token for verify(bs, 1) * scale + overhead. Once a plan (batch bucket, K, D)
has run 3 cycles, its cost is the median of its own recent cycle times instead: the pass
table is measured on synthetic inputs and runs a few percent fast on compute-bound passes,
which is the whole margin near the batch size where speculation stops paying.

The policy only ever changes K and D: the
acceptance rule, and the uniforms each request draws per cycle, are untouched, so
the output distribution stays the AR model's. When acceptance collapses, K = 1 wins
and Orthrus runs at AR speed; it still probes the cheapest speculative cycle now and then
(at exponentially growing intervals) so that it notices when acceptance recovers, but
only while an optimistic acceptance (the estimate plus its uncertainty, which grows
back as old evidence decays) would make speculation win: where the estimate is
confidently against it (a compute-bound batch, say), probes stop. Probes are spaced so
that their extra time stays within `probe_budget` (0.25 %: below the run-to-run noise of
an AR step, so that "never slower than AR" holds when measured) of the AR steps between
them; by an H100's measured passes that is a probe every ~500 AR steps at batch 128 (about 4 s), at batch 1
about every 400. With 1 % the same card lost 0.3 % to AR at acceptance 0.875.
Near a tie, AR keeps the step: the policy leaves AR for a speculative plan only when the
plan's estimated rate beats AR's by `spec_margin` (3 %); once speculating, it stays while
a plan is estimated at least as fast as AR (hysteresis). The estimates carry errors of a
few percent (a plan's cost comes from a table measured on synthetic inputs, or from a few
recent cycles, while the AR step's cost grows with the context): an H100 at batch 128 and
acceptance 0.875 ran 7 cycles of a 4-token plan estimated 0.1 % ahead of AR and measured
3 % behind it. The margin only on entry: with it both ways, the same card at acceptance
0.94 (a plan truly 4 % ahead) flipped between AR and the plan and lost 2 % to AR.
The converse check: when speculation has won for `ar_recheck` (128) cycles by less than
`ar_recheck_gain` (25 %), the AR step's old measurement is dropped, so that AR runs and
is measured again (a plan the policy stops choosing is otherwise never measured again).
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import numpy as np

from orthrus_runtime.worker.cuda_graphs import TOKEN_SIZES
from orthrus_runtime.worker.pass_costs import PassCosts, batch_bucket


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


class VerifyPolicy:
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
        self.last: dict = {}
        self._pass_cost: dict[tuple[int, int, int], float] = {}  # (bs, K, D) -> passes, for costs.version
        self._pass_version = -1

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

    def choose(self, bs: int, max_remaining: int) -> tuple[int, int]:
        """-> (K, D): verify K - 1 drafts of a D-token draft block; K == 1 is a plain AR step."""
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
        self.last = {"bs": bs, "K": best[1], "D": best[2], "rate": best[0]}
        return best[1], best[2]

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
