"""Speculative sampling is lossless: Orthrus samples the AR model's own distribution."""
from __future__ import annotations

import torch
from distribution_check import fit_to_exact

from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
from orthrus_runtime.spec.reference import exact_joint_distribution
from orthrus_runtime.spec.rejection_sampler import rejection_sample
from orthrus_runtime.spec.sampling import processed_probs
from orthrus_runtime.model.testing import tiny_model
from orthrus_runtime.types import GenerateRequest, SamplingParams

T, TOP_K, TOP_P = 0.7, 5, 0.9
PROMPT = [1, 4, 2]


def _sample_first3(model, mode, n, B=4):
    eng = LLMEngine(model, EngineConfig(block_size=B, mask_token_id=7, max_model_len=64, num_kv_blocks=4000,
                                        kv_page_size=4, max_num_seqs=512, max_num_batched_tokens=4096))
    reqs = [GenerateRequest(prompt_token_ids=PROMPT, mode=mode, params=SamplingParams(
        max_tokens=3, temperature=T, top_k=TOP_K, top_p=TOP_P, seed=1000 + i, ignore_eos=True)) for i in range(n)]
    res = eng.generate(reqs)
    assert eng.blocks.num_free == eng.blocks.num_blocks
    return [tuple(d.token_ids) for d in res], eng


def test_joint_distribution_of_first_three_tokens_matches_ar():
    # A tiny vocabulary (8 ids): top-k 5 and top-p 0.9 both bite (106 reachable 3-token cells),
    # and the random diffusion view's q differs from p, so rejections and residual draws happen.
    model = tiny_model("qwen3", seed=11, vocab_size=8, hidden=32, heads=2, kv_heads=1, head_dim=16)
    exact = exact_joint_distribution(model, PROMPT, 3, T, TOP_K, TOP_P)
    n = 12000
    for mode in ("orthrus", "ar"):
        samples, eng = _sample_first3(model, mode, n)
        p, tv = fit_to_exact(samples, exact, mode)
        # Bounds: chi-square p-value above 1e-4 (a false alarm once in 10,000 runs), and the
        # total-variation distance within 0.07 (pure sampling noise over ~106 cells at n=12000
        # is about 0.035; a sampler that ignored top-p, say, moves it by far more).
        assert p > 1e-4, f"{mode}: chi-square p={p:.2e}, tv={tv:.3f}"
        assert tv < 0.07, f"{mode}: tv={tv:.3f}"
        if mode == "orthrus":
            st = eng.spec["orthrus"]
            assert 0 < st.num_accepted_tokens < st.num_draft_tokens  # both outcomes exercised


def test_rejection_sampler_one_position_exact():
    """Monte Carlo of one position: P(emitted token) == p for arbitrary q (accept + residual)."""
    g = torch.Generator().manual_seed(0)
    V, n = 6, 200_000
    p = torch.softmax(torch.randn(V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(V, generator=g) * 2, -1)
    u_d = torch.rand(n, generator=g)
    drafts = torch.searchsorted(q.cumsum(0), u_d.unsqueeze(-1) * q.sum(), right=True).squeeze(-1).clamp(max=V - 1)
    target = torch.stack([p, p]).expand(n, 2, V)
    num, final = rejection_sample(drafts.unsqueeze(-1), q.expand(n, 1, V), target, torch.rand(n, 1, generator=g),
                                  torch.rand(n, generator=g), torch.ones(n, dtype=torch.long))
    first = torch.where(num == 1, drafts, final)
    freq = torch.bincount(first, minlength=V).float() / n
    assert (freq - p).abs().max() < 0.005


def test_processed_probs_greedy_top_k_top_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    pr = processed_probs(logits, torch.tensor([0.0, 1.0]), torch.tensor([-1, 2]), torch.tensor([1.0, 1.0]))
    assert pr[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert pr[1, 0] == 0 and pr[1, 3] == 0 and abs(pr[1].sum() - 1) < 1e-6
    pr = processed_probs(logits[:1], torch.tensor([1.0]), torch.tensor([-1]), torch.tensor([0.5]))
    assert pr[0, 1] == 1.0  # the top token alone already crosses top_p
