"""Engine core: AR view == transformers, Orthrus greedy == AR greedy, rollback, pool accounting."""
from __future__ import annotations

import pytest
import torch

from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine, build_runner
from orthrus_runtime.spec.reference import ar_logits, greedy_ar, greedy_orthrus
from orthrus_runtime.model.testing import tiny_model
from orthrus_runtime.types import GenerateRequest, SamplingParams

PROMPTS = [list(range(3, 8)), list(range(10, 27)), [42], [(7 * i) % 250 + 3 for i in range(40)]]


def make_engine(model, B, runner_for=None, **kw):
    """runner_for(model, cfg) -> the runner to inject (default: the config's)."""
    cfg = dict(block_size=B, mask_token_id=300, max_model_len=256, num_kv_blocks=200, kv_page_size=8)
    cfg.update(kw)
    cfg = EngineConfig(**cfg)
    return LLMEngine(model, cfg, runner=runner_for(model, cfg) if runner_for else None)


def greedy(n, mode, eos_free=True):
    return [GenerateRequest(prompt_token_ids=p, params=SamplingParams(max_tokens=n, temperature=0.0,
                                                                       ignore_eos=eos_free), mode=mode)
            for p in PROMPTS]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_ar_view_matches_transformers(arch):
    import transformers

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64} if arch == "llama" else None
    model = tiny_model(arch, tie=(arch == "qwen3"), rope_scaling=rope)
    c = model.cfg
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                  max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                  attention_bias=False)
    rp = {"rope_type": "default", "rope_theta": c.rope_theta} if rope is None else dict(rope, rope_theta=c.rope_theta)
    if arch == "qwen3":
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, rope_parameters=rp))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_parameters=rp))
    sd = {k: v for k, v in model.state_dict().items() if "_diff" not in k and "mask_embedding" not in k}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    hf.eval()
    ids = PROMPTS[3] + PROMPTS[1]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = ar_logits(model, ids)
    assert (ours - ref).abs().max().item() < 1e-4
    # The paged engine path (prefill in chunks, logits at every position) agrees too.
    eng = make_engine(model, 4)
    eng.add_request(GenerateRequest(prompt_token_ids=ids, params=SamplingParams(max_tokens=1, temperature=0)))
    seq = next(iter(eng.seqs.values()))
    eng.blocks.allocate(seq, len(ids))
    half = len(ids) // 2
    a = eng.runner.run_ar([seq.block_table], [ids[:half]], [0], [list(range(half))])[0]
    b = eng.runner.run_ar([seq.block_table], [ids[half:]], [half], [list(range(len(ids) - half))])[0]
    assert (torch.cat([a, b]) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("diffusion", ["random", "ar-copy"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_orthrus_greedy_equals_ar_greedy(arch, diffusion):
    model = tiny_model(arch, diffusion=diffusion, seed=1)
    ref = [greedy_ar(model, p, 64) for p in PROMPTS]
    ar_out = [d.token_ids for d in make_engine(model, 4).generate(greedy(64, "ar"))]
    assert ar_out == ref
    for B in (2, 4, 8, 32):
        eng = make_engine(model, B)
        res = eng.generate(greedy(64, "orthrus"))
        assert [d.token_ids for d in res] == ref, f"block {B}"
        assert all(len(d.token_ids) == 64 and d.finish_reason == "length" for d in res)
        assert eng.blocks.num_free == eng.blocks.num_blocks
        # The dense reference Orthrus loop agrees token for token, with the same acceptances.
        if B == 8:
            for p, d in zip(PROMPTS, res):
                toks, acc = greedy_orthrus(model, p, 64, B, 300)
                assert toks == d.token_ids
                assert sum(acc) == d.stats.num_accepted_tokens and len(acc) == d.stats.num_cycles
    if diffusion == "ar-copy":
        # The warm start drafts something useful: some drafts were accepted.
        assert sum(d.stats.num_accepted_tokens for d in res) > 0


class OracleDrafts:
    """Test double for the diffusion view: a runner whose draft pass proposes the verifier's own
    future greedy tokens, except at chosen draft positions where it proposes a wrong token. The
    other passes are the real runner's. `prompt_lens[rid]` maps a row back to its request: a row
    is known by its block table and cached length alone."""

    def __init__(self, runner, futures: dict[str, list[int]], wrong_every: int = 0):
        self.runner, self.futures, self.wrong_every = runner, futures, wrong_every
        self.calls = 0
        self.eng: LLMEngine = None  # set once the engine exists: rows are found among its sequences

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def run_draft(self, tables, starts, anchors, block_size, mask_id, num_logits, **_):
        V = self.runner.model.cfg.vocab_size
        out = torch.full((len(tables), num_logits, V), -10.0)
        self.calls += 1
        owner = {id(s.block_table): s for s in self.eng.seqs.values()}
        for i, t in enumerate(tables):
            s = owner[id(t)]
            fut = self.futures[s.request_id]
            start = len(s.output_token_ids)  # drafts propose output positions start, start+1, ...
            for j in range(num_logits):
                k = start + j
                tok = fut[k] if k < len(fut) else 0
                if self.wrong_every and (self.calls + j) % self.wrong_every == 0:
                    tok = (tok + 1) % V
                out[i, j, tok] = 10.0
        return out


@pytest.mark.parametrize("wrong_every", [0, 3])
def test_oracle_drafts_long_acceptance_bonus_and_eos(wrong_every):
    model = tiny_model("qwen3", seed=2)
    B = 8
    futures = {f"r{i}": greedy_ar(model, p, 200) for i, p in enumerate(PROMPTS)}
    eng = make_engine(model, B, runner_for=lambda m, c: OracleDrafts(build_runner(m, c), futures, wrong_every))
    eng.runner.eng = eng
    reqs = greedy(64, "orthrus")
    for i, r in enumerate(reqs):
        r.request_id = f"r{i}"
    res = eng.generate(reqs)
    for i, d in enumerate(res):
        assert d.token_ids == futures[f"r{i}"][:64]
        if wrong_every == 0:
            # Every block fully accepted plus its bonus token: B tokens per cycle (the first token
            # comes from prefill; the last cycle may be cut by max_tokens).
            assert d.stats.accepted_per_position[B - 2] >= 6
            assert d.stats.num_cycles == -(-63 // B)
        else:
            assert 0 < d.stats.num_accepted_tokens < d.stats.num_draft_tokens
    # EOS inside an accepted run: pick a token that appears mid-way in a continuation.
    fut = futures["r1"]
    eos = fut[20]
    first = fut.index(eos)
    eng2 = make_engine(model, B, runner_for=lambda m, c: OracleDrafts(build_runner(m, c), {"e": fut}))
    eng2.runner.eng = eng2
    req = GenerateRequest(prompt_token_ids=PROMPTS[1], request_id="e",
                          params=SamplingParams(max_tokens=64, temperature=0, stop_token_ids=[eos]))
    (d,) = eng2.generate([req])
    assert d.token_ids == fut[: first + 1] and d.finish_reason == "stop"
    assert d.token_ids == greedy_ar(model, PROMPTS[1], 64, eos=frozenset([eos]))
    assert eng2.blocks.num_free == eng2.blocks.num_blocks


def _cache_rows(eng, seq, n):
    pos = torch.arange(n)
    slots = torch.tensor([seq.block_table[p // eng.kv.page_size] * eng.kv.page_size + p % eng.kv.page_size
                          for p in pos.tolist()])
    k = eng.kv.k.view(eng.kv.k.shape[0], -1, *eng.kv.k.shape[-2:])[:, slots]
    v = eng.kv.v.view(eng.kv.v.shape[0], -1, *eng.kv.v.shape[-2:])[:, slots]
    return k, v


def test_rollback_leaves_cache_as_if_never_written():
    model = tiny_model("llama", seed=3, diffusion="ar-copy")
    snaps = {}
    for mode in ("orthrus", "ar"):
        eng = make_engine(model, 8)
        eng.add_request(GenerateRequest(prompt_token_ids=PROMPTS[1], request_id="x",
                                        params=SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
                                        mode=mode))
        seq = eng.seqs["x"]
        while len(seq.output_token_ids) < 40:
            eng.step()
        # Only blocks covering cached tokens remain (the verify block's extra blocks were freed).
        assert len(seq.block_table) == -(-seq.num_cached // eng.kv.page_size)
        assert seq.num_cached == seq.num_tokens - 1
        snaps[mode] = (seq.output_token_ids[:40], _cache_rows(eng, seq, len(PROMPTS[1]) + 39))
        eng.abort("x")
        assert eng.blocks.num_free == eng.blocks.num_blocks
    assert snaps["orthrus"][0] == snaps["ar"][0]
    (ko, vo), (ka, va) = snaps["orthrus"][1], snaps["ar"][1]
    assert torch.allclose(ko, ka, atol=1e-5) and torch.allclose(vo, va, atol=1e-5)


def test_stop_strings_and_text():
    from orthrus_runtime.model.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3", seed=5)  # a seed whose greedy text is printable
    eng = LLMEngine(model, EngineConfig(block_size=4, mask_token_id=300, max_model_len=256, num_kv_blocks=200),
                    tokenizer=tok)
    (full,) = eng.generate([GenerateRequest(prompt="The quick brown", params=SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))])
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    text = full.text
    i = text.index(" d")
    stop = text[i - 1: i + 2]
    assert len(stop) == 3 and "\ufffd" not in stop
    (cut,) = eng.generate([GenerateRequest(prompt="The quick brown", params=SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))])
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert stop not in cut.text


def test_default_mode_and_fitted_default_max_tokens():
    model = tiny_model("qwen3", seed=6)
    eng = make_engine(model, 4, max_model_len=64, default_mode="ar")
    long_prompt = list(range(3, 3 + 60))
    # A client-chosen max_tokens that does not fit is refused ...
    from orthrus_runtime.types import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        eng.validate(GenerateRequest(prompt_token_ids=long_prompt, params=SamplingParams(max_tokens=10)))
    # ... a server default shrinks to the room left, and mode None takes the engine's default.
    req = GenerateRequest(prompt_token_ids=long_prompt,
                          params=SamplingParams(max_tokens=256, max_tokens_defaulted=True, temperature=0, ignore_eos=True))
    (d,) = eng.generate([req])
    assert req.mode == "ar" and d.usage.completion_tokens == 4 and d.finish_reason == "length"
    assert d.stats.num_draft_tokens == 0
