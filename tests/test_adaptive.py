"""Adaptive verification and the device-side cycle: the estimates, the choices, and that
changing how many drafts are verified never changes what is sampled."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from distribution_check import fit_to_exact

from orthrus_runtime.spec.planner import AcceptanceEstimator, Planner, VerifyPlan, VerifyPolicy
from orthrus_runtime.worker.pass_costs import PassCosts
from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
from orthrus_runtime.spec.reference import exact_joint_distribution, greedy_ar
from orthrus_runtime.spec.rejection_sampler import rejection_sample
from orthrus_runtime.spec.sampling import processed_probs, sample_inverse_cdf
from orthrus_runtime.spec.cycle import greedy_accept
from orthrus_runtime.model.testing import tiny_model
from orthrus_runtime.types import GenerateRequest, SamplingParams

# -- estimates --------------------------------------------------------------------------------------


def _geometric_cycles(est, alpha, n_drafts, cycles, bs, rng, draft_len=8):
    for _ in range(cycles):
        acc = []
        for _ in range(bs):
            a = 0
            while a < n_drafts and rng.random() < alpha:
                a += 1
            acc.append(a)
        est.observe(draft_len, [n_drafts] * bs, acc)


def test_acceptance_estimator_recovers_a_geometric_profile():
    rng = np.random.default_rng(0)
    est = AcceptanceEstimator(15, decay=0.999)
    _geometric_cycles(est, 0.8, 15, 400, 8, rng)
    al = est.alpha(8)
    assert np.all(np.abs(al[:6] - 0.8) < 0.05), al
    # Mean tokens of a cycle verifying K-1 drafts: 1 + sum_i 0.8^(i+1).
    for K in (2, 4, 16):
        want = 1 + sum(0.8 ** (i + 1) for i in range(K - 1))
        assert abs(est.expected_tokens(K, 8) - want) < 0.25 * want ** 0.5
    assert est.expected_tokens(1) == 1.0


def test_acceptance_estimator_counts_and_extrapolates():
    est = AcceptanceEstimator(7, decay=1.0, prior_weight=1e-9)
    # Seq 1 verified 3 drafts, accepted 1 (tried 0, 1); seq 2 verified 3, accepted 3 (tried 0..2).
    est.observe(4, [3, 3], [1, 3])
    assert est.tried[4].tolist()[:4] == [2, 2, 1, 0] and est.acc[4].tolist()[:4] == [2, 1, 1, 0]
    al = est.alpha()
    assert al[0] == pytest.approx(1.0) and al[1] == pytest.approx(0.5) and al[2] == pytest.approx(1.0)
    assert al[3] == pytest.approx(al[2])  # never tried: the last estimate carries on
    # Live: old evidence decays away.
    est2 = AcceptanceEstimator(3, decay=0.5, prior_weight=0.1)
    for _ in range(30):
        est2.observe(4, [3], [3])
    for _ in range(30):
        est2.observe(4, [3], [0])
    assert est2.alpha()[0] < 0.05


def test_pass_costs_measured_and_estimated():
    c = PassCosts()
    c.record("verify", 3, 5, 2.0)  # bucketed to (4, 8)
    assert c.estimate("verify", 4, 8) == 2.0 and c.estimate("verify", 3, 7) == 2.0
    c.record("verify", 4, 8, 4.0)
    assert 2.0 < c.estimate("verify", 4, 8) < 4.0  # moving average
    c.record("verify", 4, 8, 1.0, replace=True)
    assert c.estimate("verify", 4, 8) == 1.0
    # Unmeasured: never cheaper than a smaller measured pass, growing with sqrt(tokens).
    assert c.estimate("verify", 4, 32) == pytest.approx(2.0)
    assert c.estimate("verify", 4, 2) == pytest.approx(1.0)
    assert c.estimate("draft", 4, 8) == pytest.approx(1.0)  # the other view's pass of that shape


# -- choices ----------------------------------------------------------------------------------------


def _costs(per_token_s: float, fixed_s: float = 1.0) -> PassCosts:
    """A device model: a pass of T tokens at batch bs costs fixed + per_token * bs * T."""
    c = PassCosts()
    for bs in (1, 2, 4, 8, 16, 32, 64, 128):
        for T in (1, 2, 4, 8, 16, 32, 64):
            for kind in ("draft", "verify"):
                c.record(kind, bs, T, fixed_s + per_token_s * bs * T)
    return c


def _trained_policy(costs, alpha, B=32, bs=8, **kw):
    pol = VerifyPolicy(B, costs, **kw)
    _geometric_cycles(pol.acceptance, alpha, B - 1, 300, 8, np.random.default_rng(1), draft_len=B)
    for D in pol.sizes:  # the same profile seen at every draft length
        _geometric_cycles(pol.acceptance, alpha, D - 1, 50, 8, np.random.default_rng(D), draft_len=D)
    return pol


def test_policy_speculates_long_when_passes_are_flat_and_acceptance_high():
    pol = _trained_policy(_costs(0.0001), alpha=0.95)
    K, D = pol.choose(1, 1000)
    assert K >= 16 and D >= K


def test_policy_degrades_to_ar_when_acceptance_collapses_and_probes_rarely():
    pol = _trained_policy(_costs(0.0001), alpha=0.0)
    plans = [pol.choose(1, 1000) for _ in range(1000)]
    spec = [i for i, (K, _) in enumerate(plans) if K > 1]
    assert plans[0] == (1, 0)
    # While the evidence against speculation is fresh, no probe; as it decays, the uncertainty
    # grows back and probes come, with the cheapest speculative cycle, at growing intervals.
    assert spec and spec[0] >= 50 and len(spec) <= 10
    assert all(plans[i] == (2, 2) for i in spec)
    assert np.all(np.diff(np.diff(spec)) >= 0) and all(b - a >= 8 for a, b in zip(spec, spec[1:]))
    # A probe that confirms the collapse pushes the next one far away again.
    pol.observe(2, [1] * 8, [0] * 8)
    assert pol.acceptance.alpha(optimistic=True)[0] < 0.5


def test_policy_notices_acceptance_recovering_through_probes():
    """Acceptance collapses, then recovers to 0.9 (launch-bound passes, where speculation pays
    several-fold): probes (a probe every ~400 AR steps at probe_budget 0.25 %) find out, and
    the policy speculates again, for good."""
    pol = _trained_policy(_costs(0.0001), alpha=0.0)
    rng = np.random.default_rng(0)
    plans = []
    for step in range(1500):
        K, D = pol.choose(1, 10**6)
        plans.append(K)
        if K > 1:
            _geometric_cycles(pol.acceptance, 0.9, K - 1, 1, 1, rng, draft_len=D)
    first = plans.index(next(k for k in plans if k > 1))
    assert first < 1000, first
    assert sum(k > 1 for k in plans[-100:]) == 100


def test_policy_never_probes_where_speculation_cannot_win():
    """Compute-bound: a pass costs in proportion to its tokens, so even with every draft
    accepted a cycle of K tokens costs more than K AR steps. No probe, ever."""
    pol = _trained_policy(_costs(1.0, fixed_s=0.0), alpha=0.0)
    assert all(pol.choose(128, 1000) == (1, 0) for _ in range(300))


def test_policy_does_not_probe_for_a_gain_of_a_few_percent():
    """Near the batch size where speculation stops paying: even with every draft accepted the
    best cycle would beat AR by only ~2 %, less than a probe's price is worth. No probe."""
    pol = _trained_policy(_costs(0.00703, fixed_s=1.0), alpha=0.0)
    plans = [pol.choose(128, 1000) for _ in range(1000)]
    opt = pol.rates(128, 1000, optimistic=True)
    assert 1.0 < max(r for r, _, _ in opt[1:]) / opt[0][0] < 1.05  # optimistically a small win
    assert all(p == (1, 0) for p in plans)


def test_policy_verifies_less_when_compute_bound():
    """At a large batch every token costs (compute-bound): fewer drafts and a short block win;
    with flat costs (small batch, memory-bound) the same acceptance asks for more."""
    flat = _trained_policy(_costs(1e-6), alpha=0.85)
    steep = _trained_policy(_costs(0.05), alpha=0.85)
    Kf, Df = flat.choose(128, 1000)
    Ks, Ds = steep.choose(128, 1000)
    assert Ks < Kf and Ds <= Df
    # Never worse than AR by its own estimate: the chosen rate is at least the AR rate.
    for pol in (flat, steep):
        rates = pol.rates(128, 1000)
        assert max(r for r, _, _ in rates) >= rates[0][0]


def test_policy_respects_remaining_tokens():
    pol = _trained_policy(_costs(1e-6), alpha=0.95)
    K, _ = pol.choose(1, 3)
    assert K <= 3


def test_overhead_learned_from_cycle_times():
    pol = VerifyPolicy(8, _costs(0.0))
    for _ in range(100):
        pol.observe_time(1, 8, 8, 2.0 + 0.5)  # passes: 1 + 1; 0.5 s unexplained
    assert pol.overhead["spec"] == pytest.approx(0.5, rel=0.01)
    assert pol.overhead["ar"] == 0.0  # no AR cycle yet: optimistic, so that AR gets tried


def test_pipelined_overhead_is_a_ratio_passed_from_ar_to_untried_plans():
    """Pipelined, the host's work hides behind the device: what the table misses grows with
    the pass. AR steps measured 20 % over the table make the untried speculative plans 20 %
    dearer too, not table-priced (which made them look like wins at batch 128). Speculative
    cycles' ratio does not pass to an AR step not yet run: it stays optimistic (the table),
    so that it gets run and measured."""
    pol = VerifyPolicy(8, _costs(0.01), pipelined=True)  # a pass of T tokens at batch 128: 1 + 1.28 T s
    assert pol.cycle_cost(128, 4, 4) == pytest.approx(pol.pass_cost(128, 4, 4))  # nothing seen: the table
    for _ in range(3):
        pol.observe_time(128, 4, 4, 1.25 * pol.pass_cost(128, 4, 4))
    assert pol.scale == pytest.approx({"ar": 1.0, "spec": 1.25})
    assert pol.cycle_cost(128, 1, 0) == pytest.approx(pol.pass_cost(128, 1, 0))
    pol = VerifyPolicy(8, _costs(0.01), pipelined=True)
    for _ in range(3):
        pol.observe_time(128, 1, 0, 1.2 * pol.pass_cost(128, 1, 0))
    assert pol.scale == pytest.approx({"ar": 1.2, "spec": 1.2}) and pol.overhead == {"ar": 0.0, "spec": 0.0}
    assert pol.cycle_cost(128, 4, 4) == pytest.approx(1.2 * pol.pass_cost(128, 4, 4))
    for _ in range(3):  # once speculative cycles are seen, their own ratio
        pol.observe_time(128, 2, 2, 1.05 * pol.pass_cost(128, 2, 2))
    assert pol.scale == pytest.approx({"ar": 1.2, "spec": 1.05})
    assert pol.cycle_cost(128, 4, 4) == pytest.approx(1.05 * pol.pass_cost(128, 4, 4))


def test_pipelined_policy_does_not_probe_plans_only_a_slow_ar_step_made_look_good():
    """The H200 batch-128 case (benchmarks/simulate_policy.py), in small. Every cycle runs 11 %
    over its table. At acceptance 0.5 AR wins; as the evidence ages the optimistic acceptance
    reaches 1, and a 2-token cycle (table 1.9 s, for 2 tokens) then beats the measured AR step
    (1.11 s a token) by 17 %, a probe's worth, but not the AR step scaled alike (by 5 %).
    Pipelined, the policy scales the untried plans like the AR step and never probes; with an
    added constant (the non-pipelined model: the plan is table-priced) it does."""
    def spec_cycles(pipelined):
        costs = PassCosts()
        for kind, table in (("verify", {1: 1.0, 2: 0.95, 4: 3.0, 8: 8.0}), ("draft", {8: 0.95})):
            for T, sec in table.items():
                costs.record(kind, 128, T, sec)
        pol = VerifyPolicy(8, costs, pipelined=pipelined, vary_draft_len=False)
        _geometric_cycles(pol.acceptance, 0.5, 7, 300, 8, np.random.default_rng(1), draft_len=8)
        spec = 0
        for _ in range(600):
            K, D = pol.choose(128, 1000)
            pol.observe_time(128, K, D, 1.11 * pol.pass_cost(128, K, D))
            if K > 1:
                spec += 1
                _geometric_cycles(pol.acceptance, 0.5, K - 1, 1, 128, np.random.default_rng(spec), draft_len=D)
        return spec

    assert spec_cycles(pipelined=True) == 0
    assert spec_cycles(pipelined=False) > 0


def test_a_few_slow_ar_samples_do_not_lock_out_ar():
    """AR's first three cycles ran 20 % slow (a pipeline restart, say), so speculation wins on
    the estimate by 14 %, and AR would never run again to correct it; in truth AR is 5 %
    faster than every plan. The policy re-measures AR after a while and settles on it.
    Where speculation wins by a wide margin, it never spends cycles re-measuring AR."""
    curve = _trained_policy(_costs(0.0), alpha=0.8, B=8).acceptance.curve(8)

    def run(spec_seconds, **kw):
        pol = _trained_policy(_costs(0.0), alpha=0.8, B=8, pipelined=True, **kw)  # flat table: 1 s a pass
        for _ in range(3):
            pol.observe_time(128, 1, 0, 1.2)
        plans = []
        for _ in range(400):
            K, D = pol.choose(128, 1000)
            plans.append(K)
            pol.observe_time(128, K, D, 1.0 if K == 1 else spec_seconds(K))
            if K > 1:
                _geometric_cycles(pol.acceptance, 0.8, K - 1, 1, 8, np.random.default_rng(len(plans)), draft_len=D)
        return plans

    plans = run(lambda K: curve[K] * 1.05)  # each plan: 1/1.05 tokens a second
    assert plans[0] > 1  # the slow AR samples: speculation first
    assert plans[-50:].count(1) >= 45, plans
    # Without the recheck (and without spec_margin, which lets AR back in once the plans'
    # estimates drift to within 3 % of AR's stale cost) AR never runs again.
    assert run(lambda K: curve[K] * 1.05, ar_recheck=10**9, spec_margin=1.0)[-50:].count(1) == 0
    # Every plan at 2 s (2.5 tokens at K=4): speculation wins by far, AR is never re-run.
    assert run(lambda K: 2.0).count(1) == 0


class _OnePlanPolicy:
    """A policy at batch 4 with one speculative plan (verify one draft of a 2-token block) whose
    rate is set as a multiple of AR's: AR steps and verify passes cost 1 s, the draft pass the rest."""

    def __init__(self, cycles: int):
        """cycles: observed cycles of 8 rows at acceptance 0.8 (few: an uncertain estimate)."""
        self.pol = VerifyPolicy(2, PassCosts())
        _geometric_cycles(self.pol.acceptance, 0.8, 1, cycles, 8, np.random.default_rng(0), draft_len=2)
        self.tokens = self.pol.acceptance.curve(2)[2]  # mean tokens of a cycle verifying one draft
        self.pol.costs.record("verify", 4, 1, 1.0)
        self.pol.costs.record("verify", 4, 2, 1.0)

    def plan_at(self, gain: float) -> int:
        """Set the plan to `gain` x AR's tokens a second; the K the policy then chooses."""
        return self.full_plan_at(gain).num_verify

    def full_plan_at(self, gain: float) -> VerifyPlan:
        self.pol.costs.record("draft", 4, 2, self.tokens / gain - 1.0, replace=True)
        return self.pol.choose(4, 100)


@pytest.mark.parametrize("gain, plan", [(1.02, 1), (1.05, 2)])
def test_speculation_must_beat_ar_by_the_margin(gain, plan):
    """Near a tie AR keeps the step: a plan estimated 2 % ahead of AR (within the estimates'
    error) is not run, one 5 % ahead is (spec_margin 3 %)."""
    p = _OnePlanPolicy(300)
    chosen = p.full_plan_at(gain)
    assert chosen.num_verify == plan
    assert p.pol.rates(4, 100)[1][0] == pytest.approx(gain)
    assert chosen.draft_len == (0 if plan == 1 else 2)


def test_once_speculating_a_plan_keeps_the_step_while_it_is_ahead_of_ar():
    """The margin applies on entry only (hysteresis): from a plan 5 % ahead the policy stays
    on it when it drops to 2 % ahead, and goes back to AR once AR is faster; from AR, 2 %
    is not enough to leave it."""
    p = _OnePlanPolicy(300)
    assert [p.plan_at(g) for g in (1.02, 1.05, 1.02, 1.01, 0.99, 1.02)] == [1, 2, 2, 2, 1, 1]


def test_a_probe_does_not_count_as_speculating():
    """A probe runs a plan AR beats; it must not lower the bar for the step after it."""
    # Little evidence (24 rows): an optimistic acceptance makes the plan win by > 10 %, a probe.
    p = _OnePlanPolicy(3)
    plans = [p.plan_at(1.02) for _ in range(40)]  # 2 % ahead: probed (optimistic), not entered
    assert 2 in plans  # probes ran
    assert all(b == 1 for a, b in zip(plans, plans[1:]) if a == 2), plans  # and AR after each


def test_one_slow_cycle_does_not_lock_out_speculation():
    """A launch-bound model: passes cost the same at any length, acceptance is good. One
    cycle that takes 50x longer (a compile, say) must not keep the policy on AR for good."""
    pol = _trained_policy(_costs(0.0), alpha=0.8)
    pol.observe_time(1, 8, 8, 100.0)  # the first speculative cycle: very slow
    for _ in range(40):
        K, D = pol.choose(1, 1000)
        pol.observe_time(1, K, D, pol.pass_cost(1, K, D) + 0.1)
    assert pol.choose(1, 1000)[0] > 1
    assert pol.overhead["spec"] == pytest.approx(0.1)


# -- the device-side cycle is the reference acceptance rule ------------------------------------------


def test_host_flags_give_the_same_probs():
    g = torch.Generator().manual_seed(0)
    n, V = 64, 50
    logits = torch.randn(n, V, generator=g) * 3
    for trial in range(6):
        t = torch.rand(n, generator=g) * 1.5
        t[torch.rand(n, generator=g) < 0.3] = 0.0
        k = torch.randint(-1, V + 3, (n,), generator=g)
        p = torch.rand(n, generator=g).clamp(min=0.05)
        p[torch.rand(n, generator=g) < 0.4] = 1.0
        if trial == 1:
            k[:] = -1
        if trial == 2:
            p[:] = 1.0
        if trial == 3:
            t[:] = 0.5
        want = processed_probs(logits, t, k, p)
        got = processed_probs(logits, t, k, p, flags=(bool(((k > 0) & (k < V)).any()), bool((p < 1).any()),
                                                      bool((t <= 0).any())))
        assert torch.equal(got, want)


def test_greedy_accept_equals_rejection_sampling_on_one_hot():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        bs, K, V = 16, 6, 5  # a small vocabulary: drafts often agree with the argmax
        dl, tl = torch.randn(bs, K - 1, V, generator=g), torch.randn(bs, K, V, generator=g)
        zeros = torch.zeros(bs * (K - 1))
        q = processed_probs(dl.reshape(-1, V), zeros, -torch.ones_like(zeros, dtype=torch.long), zeros + 1)
        p = processed_probs(tl.reshape(-1, V), torch.zeros(bs * K), -torch.ones(bs * K, dtype=torch.long),
                            torch.ones(bs * K))
        drafts = sample_inverse_cdf(q, zeros).view(bs, K - 1)
        max_acc = torch.randint(0, K, (bs,), generator=g)
        want = rejection_sample(drafts, q.view(bs, K - 1, V), p.view(bs, K, V), torch.zeros(bs, K - 1),
                                torch.zeros(bs), max_acc)
        got = greedy_accept(dl.argmax(-1), tl.argmax(-1), max_acc)
        assert torch.equal(drafts, dl.argmax(-1))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# -- engine ---------------------------------------------------------------------------------------------


PROMPTS = [list(range(3, 8)), list(range(10, 27)), [42]]


def test_adaptive_engine_greedy_equals_ar():
    model = tiny_model("llama", diffusion="ar-copy", seed=1)
    ref = [greedy_ar(model, p, 48) for p in PROMPTS]
    eng = LLMEngine(model, EngineConfig(block_size=8, mask_token_id=300, max_model_len=256, num_kv_blocks=200,
                                        kv_page_size=8, verify_policy="adaptive"))
    reqs = [GenerateRequest(prompt_token_ids=p, params=SamplingParams(max_tokens=48, temperature=0,
                                                                      ignore_eos=True)) for p in PROMPTS]
    res = eng.generate(reqs)
    assert [d.token_ids for d in res] == ref
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.planner.acceptance.tried[None].sum() > 0  # it speculated and learned from it


class _CyclingPlans(Planner):
    """A planner that changes K and D every cycle, AR steps included."""

    def __init__(self):
        self.plans = [VerifyPlan(*p) for p in [(1, 0), (2, 2), (4, 4), (3, 4), (4, 8), (2, 8)]]
        self.i = 0

    def choose(self, bs, max_remaining):
        self.i += 1
        return self.plans[self.i % len(self.plans)]


def test_varying_verify_length_keeps_the_distribution():
    """Sampled output under a plan that changes K and D every cycle is still the AR model's
    joint distribution (chi-square against exact enumeration)."""
    T, TOP_K, TOP_P, prompt = 0.8, 5, 0.9, [1, 4, 2]
    model = tiny_model("qwen3", seed=11, vocab_size=8, hidden=32, heads=2, kv_heads=1, head_dim=16)
    exact = exact_joint_distribution(model, prompt, 3, T, TOP_K, TOP_P)
    eng = LLMEngine(model, EngineConfig(block_size=8, mask_token_id=7, max_model_len=64, num_kv_blocks=4000,
                                        kv_page_size=4, max_num_seqs=512, max_num_batched_tokens=4096,
                                        verify_policy="adaptive"), planner=_CyclingPlans())
    n = 6000
    reqs = [GenerateRequest(prompt_token_ids=prompt, params=SamplingParams(
        max_tokens=3, temperature=T, top_k=TOP_K, top_p=TOP_P, seed=7000 + i, ignore_eos=True)) for i in range(n)]
    res = eng.generate(reqs)
    pvalue, _ = fit_to_exact([tuple(d.token_ids) for d in res], exact)
    assert pvalue > 1e-4
    st = eng.spec["orthrus"]
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens


def test_forced_acceptance_profile_and_count():
    """The benchmarks' forced acceptance (benchmarks/forcing.py), injected as the acceptance rule."""
    from benchmarks.forcing import ForcedAcceptance

    model = tiny_model("qwen3", seed=2)
    forced = ForcedAcceptance()
    eng = LLMEngine(model, EngineConfig(block_size=8, mask_token_id=300, max_model_len=256, num_kv_blocks=200,
                                        kv_page_size=8), acceptance=forced)
    forced.profile = [1.0] * 3  # accept exactly 3 drafts per cycle
    c = forced.counts(5, 7)
    assert c.tolist() == [3] * 5
    forced.profile = [0.5] * 7
    c = forced.counts(20000, 7).float()
    want = sum(0.5 ** (i + 1) for i in range(7))
    assert abs(c.mean().item() - want) < 0.03
    # End to end: every cycle accepts 3 drafts and emits 4 tokens; the cache holds them.
    forced.profile = [1.0] * 3
    (d,) = eng.generate([GenerateRequest(prompt_token_ids=PROMPTS[1], params=SamplingParams(
        max_tokens=21, temperature=0, ignore_eos=True))])
    assert d.stats.num_cycles == 5 and d.stats.num_accepted_tokens == 15
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_measured_cycle_times_override_an_optimistic_pass_table():
    """The table decides wrongly (it says speculation wins by 25 %); the plans' own measured
    cycle times must bring the policy back to AR, and keep it there."""
    pol = _trained_policy(_costs(0.0), alpha=0.6)  # flat passes: 1 s each
    K, D = pol.choose(128, 1000)
    assert K > 1  # E[tokens] ~ 2.5 for 2 passes + no overhead: the table says speculate
    truth = {True: 3.0, False: 1.0}  # in reality a speculative cycle costs 3 s, an AR step 1 s
    for _ in range(60):
        K, D = pol.choose(128, 1000)
        pol.observe_time(128, K, D, truth[K > 1])
        if K > 1:
            pol.observe(D, [K - 1] * 8, [1] * 8)
    assert [pol.choose(128, 1000)[0] for _ in range(5)] == [1] * 5


def test_a_plan_with_three_cycles_costs_its_own_median():
    pol = VerifyPolicy(8, _costs(0.0))  # every pass 1 s
    for _ in range(3):
        pol.observe_time(128, 4, 4, 5.0)
        pol.observe_time(128, 2, 2, 2.5)
    assert pol.cycle_cost(128, 4, 4) == 5.0 and pol.cycle_cost(100, 2, 2) == 2.5  # batch 100 -> bucket 128
    # A plan never run: table + the kind's overhead (median of all speculative extras: 3 s).
    assert pol.cycle_cost(128, 8, 8) == pytest.approx(2.0 + 3.0)
    assert pol.cycle_cost(128, 1, 0) == pytest.approx(1.0)  # AR never run: optimistic
