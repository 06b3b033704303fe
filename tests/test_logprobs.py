"""Log-probabilities (spec/logprobs.py through the engine): the AR view's raw log-softmax at
every emitted and prompt position, equal in both modes (float32), equal to the dense
reference decoder's, whatever the chunking, pipelining, batch or sampling settings."""
from __future__ import annotations

import pytest
import torch

from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
from orthrus_runtime.model.testing import tiny_model
from orthrus_runtime.spec.reference import ar_logits
from orthrus_runtime.types import GenerateRequest, InvalidRequestError, SamplingParams

PROMPTS = [list(range(3, 8)), list(range(10, 27)), [42, 43], [(7 * i) % 250 + 3 for i in range(40)]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model("qwen3")


def engine(model, **kw):
    cfg = dict(block_size=4, mask_token_id=300, max_model_len=256, num_kv_blocks=200, kv_page_size=8)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg))


def run(eng, mode, n=20, k=3, pk=2, **p):
    params = dict(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=k, prompt_logprobs=pk)
    params.update(p)
    return eng.generate([GenerateRequest(prompt_token_ids=list(x), mode=mode, params=SamplingParams(**params))
                         for x in PROMPTS])


def reference(model, prompt, out):
    """log_softmax of the dense reference's logits over prompt + output: row i scores token i + 1."""
    return torch.log_softmax(ar_logits(model, prompt + out[:-1]).float(), dim=-1)


def check_against_reference(model, d, prompt, k, pk, atol=2e-4):
    ref = reference(model, prompt, d.token_ids)
    assert len(d.logprobs) == len(d.token_ids)
    for j, (t, lp) in enumerate(zip(d.token_ids, d.logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert lp.token_id == t and abs(lp.logprob - row[t].item()) < atol
        assert len(lp.top) == k
        v, i = row.topk(k)
        assert [a.token_id for a in lp.top] == i.tolist()
        assert all(abs(a.logprob - b) < atol for a, b in zip(lp.top, v.tolist()))
    first = d.prompt_logprobs[0]
    assert (first.token_id, first.logprob, first.top) == (prompt[0], None, []) and len(d.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        e = d.prompt_logprobs[p]
        assert e.token_id == prompt[p] and abs(e.logprob - ref[p - 1, prompt[p]].item()) < atol
        assert len(e.top) == pk


@pytest.mark.parametrize("pipelined", [False, True])
def test_orthrus_logprobs_equal_ar_logprobs_and_the_reference(model, pipelined):
    ar = run(engine(model, async_scheduling=pipelined), "ar")
    orth = run(engine(model, async_scheduling=pipelined), "orthrus")
    for a, o, prompt in zip(ar, orth, PROMPTS):
        assert a.token_ids == o.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, o.logprobs)) < 1e-4
        assert [[t.token_id for t in x.top] for x in a.logprobs] == [[t.token_id for t in x.top] for x in o.logprobs]
        check_against_reference(model, o, prompt, 3, 2)
        check_against_reference(model, a, prompt, 3, 2)
    assert sum(d.stats.num_accepted_tokens for d in orth) > 0  # Orthrus did draft and accept


def test_chunked_prefill_and_k0_give_the_same_numbers(model):
    whole = run(engine(model), "orthrus", k=0, pk=0)
    chunked = run(engine(model, max_num_batched_tokens=8), "orthrus", k=0, pk=0)
    for a, b, prompt in zip(whole, chunked, PROMPTS):
        check_against_reference(model, b, prompt, 0, 0)
        assert all(x.top == [] for x in b.logprobs)
        assert [x.logprob for x in a.prompt_logprobs[1:]] == pytest.approx([x.logprob for x in b.prompt_logprobs[1:]],
                                                                            abs=1e-4)


def test_sampled_output_reports_raw_logprobs(model):
    # Temperature and top-k change which token is drawn, not the reported (raw) distribution.
    for d, prompt in zip(run(engine(model), "orthrus", temperature=0.9, top_k=20, seed=3), PROMPTS):
        check_against_reference(model, d, prompt, 3, 2)


def test_scoring_a_prompt_alone_and_requests_without_logprobs(model):
    eng = engine(model)
    (d,) = eng.generate([GenerateRequest(prompt_token_ids=PROMPTS[3], params=SamplingParams(
        max_tokens=0, prompt_logprobs=1))])
    assert d.finish_reason == "length" and d.token_ids == [] and d.usage.completion_tokens == 0
    ref = reference(model, PROMPTS[3], [0])
    assert [e.logprob for e in d.prompt_logprobs[1:]] == pytest.approx(
        [ref[p - 1, PROMPTS[3][p]].item() for p in range(1, len(PROMPTS[3]))], abs=2e-4)
    assert eng.blocks.num_free == eng.blocks.num_blocks  # nothing leaked
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        eng.validate(GenerateRequest(prompt_token_ids=[3, 4], params=SamplingParams(max_tokens=0)))
    with pytest.raises(InvalidRequestError, match="logprobs"):
        eng.validate(GenerateRequest(prompt_token_ids=[3, 4], params=SamplingParams(logprobs=21)))
    # Mixed batch: only the requests that asked get log-probabilities, and a stop cuts them too.
    reqs = [GenerateRequest(prompt_token_ids=p, params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                                      logprobs=2 if i % 2 else None))
            for i, p in enumerate(PROMPTS)]
    out = eng.generate(reqs)
    assert [d.logprobs is None for d in out] == [True, False, True, False]
    assert all(d.prompt_logprobs is None for d in out)
    stop = out[1].token_ids[4]
    (cut,) = eng.generate([GenerateRequest(prompt_token_ids=PROMPTS[1], params=SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, logprobs=1, stop_token_ids=[stop]))])
    assert cut.finish_reason == "stop" and len(cut.logprobs) == len(cut.token_ids) <= 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_graphs_and_pipelined_decoding(model):
    # CUDA graphs and pipelined decoding (on by default there): the log-prob tables travel in
    # their own pinned copy, ordered by the cycle's one event.
    import copy

    m = copy.deepcopy(model).to("cuda")
    ar_eng, orth_eng = engine(m), engine(m)
    assert orth_eng.pipelined and orth_eng.runner.graphs is not None
    ar, orth = run(ar_eng, "ar"), run(orth_eng, "orthrus")
    assert orth_eng.num_chained_steps > 0
    for a, o, prompt in zip(ar, orth, PROMPTS):
        assert a.token_ids == o.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, o.logprobs)) < 1e-4
        check_against_reference(m, o, prompt, 3, 2, atol=1e-3)
