"""Pipelined decoding (EngineConfig.async_scheduling): the next cycle is queued from the
in-flight one's device outputs. On the CPU the fast path runs it eagerly; the output must
be the synchronous engine's, token for token, and nothing may leak."""
from __future__ import annotations

import pytest

from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine, build_runner
from orthrus_runtime.spec.planner import VerifyPolicy
from orthrus_runtime.spec.reference import greedy_ar
from orthrus_runtime.model.testing import tiny_model
from orthrus_runtime.types import GenerateRequest, SamplingParams

MODEL = tiny_model("qwen3", seed=21, diffusion="ar-copy", eos_token_ids=[])
LENS = [(3, 40), (25, 30), (9, 50), (60, 20), (1, 35), (14, 45), (7, 2), (5, 1)]


def prompt(i, n):
    return [(i * 37 + j * 11) % 290 + 3 for j in range(n)]


def config(pipelined: bool, policy: str = "full", blocks: int = 400) -> EngineConfig:
    return EngineConfig(block_size=4, mask_token_id=300, max_model_len=160, num_kv_blocks=blocks, kv_page_size=4,
                        max_num_seqs=16, max_num_batched_tokens=64, async_scheduling=pipelined, verify_policy=policy)


def engine(pipelined: bool, policy: str = "full", blocks: int = 400) -> LLMEngine:
    return LLMEngine(MODEL, config(pipelined, policy, blocks))


class _TimedPolicy(VerifyPolicy):
    """The adaptive policy, recording the cycle times it is fed."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: list[tuple] = []

    def observe_time(self, *a) -> None:
        self.seen.append(a)
        super().observe_time(*a)


def requests(mode: str, temperature: float, stops: list[int]):
    return [GenerateRequest(prompt_token_ids=prompt(i, n), mode=mode, params=SamplingParams(
        max_tokens=m, temperature=temperature, top_k=50 if temperature else 0, seed=i, stop_token_ids=stops))
        for i, (n, m) in enumerate(LENS)]


@pytest.mark.parametrize("mode", ["orthrus", "ar"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_pipelined_output_is_the_synchronous_output(mode, temperature):
    # Stop tokens that do occur, so that sequences end mid-pipeline with a cycle in flight.
    stops = [11, 107] if temperature else []
    out = {}
    for pipelined in (False, True):
        eng = engine(pipelined)
        res = eng.generate(requests(mode, temperature, stops))
        out[pipelined] = [(r.token_ids, r.finish_reason) for r in res]
        assert eng.blocks.num_free == eng.blocks.num_blocks and eng._inflight is None
        if pipelined:
            assert eng.num_chained_steps > 10
    assert out[True] == out[False]
    if temperature:
        assert any(reason == "stop" for _, reason in out[True])
    else:
        assert [ids for ids, _ in out[True]] == [greedy_ar(MODEL, prompt(i, n), m) for i, (n, m) in enumerate(LENS)]


def test_pipelined_adaptive_policy_is_exact():
    eng = engine(True, policy="adaptive")
    res = eng.generate(requests("orthrus", 0.0, []))
    assert [r.token_ids for r in res] == [greedy_ar(MODEL, prompt(i, n), m) for i, (n, m) in enumerate(LENS)]
    assert eng.num_chained_steps > 0


@pytest.mark.parametrize("mode", ["orthrus", "ar"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_arrivals_ride_along_the_pipeline_and_stay_exact(mode, temperature):
    """Requests arriving while a cycle is in flight are prefilled in the same pipelined step
    (the pipeline does not stop for them) and join the next cycle; output is the synchronous
    engine's, token for token, whatever the arrival times."""
    reqs = requests(mode, temperature, [])
    expected = [(r.token_ids, r.finish_reason) for r in engine(False).generate(requests(mode, temperature, []))]
    eng = engine(True)
    got: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    ids, step = [], 0
    while len(ids) < len(reqs) or eng.has_work():
        if len(ids) < len(reqs) and step % 3 == 0:  # one arrival every third step
            ids.append(eng.add_request(reqs[len(ids)]))
            got[ids[-1]] = []
        for d in eng.step():
            got[d.request_id] += d.token_ids
            if d.finished:
                reasons[d.request_id] = d.finish_reason
        step += 1
    assert [(got[i], reasons[i]) for i in ids] == expected
    assert eng.num_pipelined_prefills >= len(reqs) - 2  # admissions rode along (the first starts it)
    assert eng.blocks.num_free == eng.blocks.num_blocks and eng._inflight is None


def test_abort_with_a_cycle_in_flight_returns_every_block():
    eng = engine(True)
    ids = [eng.add_request(GenerateRequest(prompt_token_ids=prompt(i, 10), params=SamplingParams(
        max_tokens=100, temperature=0))) for i in range(4)]
    for _ in range(5):
        eng.step()
    assert eng._inflight is not None and eng.num_chained_steps > 0
    # Two leave while a cycle of theirs is queued; the others go on, then leave too.
    eng.abort(ids[0])
    eng.abort(ids[1])
    for _ in range(3):
        eng.step()
    assert {s.request_id for s in eng.scheduler.running} == set(ids[2:])
    eng.abort(ids[2])
    eng.abort(ids[3])
    assert eng.has_work()  # the queued cycle still has to be drained
    while eng.has_work():
        eng.step()
    assert eng._inflight is None and not eng.seqs
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_new_request_mid_pipeline_is_admitted_and_exact():
    eng = engine(True)
    first = eng.add_request(GenerateRequest(prompt_token_ids=prompt(0, 12), params=SamplingParams(
        max_tokens=60, temperature=0)))
    got = {first: []}
    for _ in range(6):
        for d in eng.step():
            got[d.request_id] += d.token_ids
    late = eng.add_request(GenerateRequest(prompt_token_ids=prompt(1, 30), params=SamplingParams(
        max_tokens=40, temperature=0)))
    got[late] = []
    while eng.has_work():
        for d in eng.step():
            got[d.request_id] += d.token_ids
    assert got[first] == greedy_ar(MODEL, prompt(0, 12), 60)
    assert got[late] == greedy_ar(MODEL, prompt(1, 30), 40)
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_engine_args_switch_pipelining(tmp_path):
    """`async_scheduling` in EngineArgs (YAML, Helm values): None keeps it for CUDA graphs only;
    True turns it on, here on the CPU, with the same greedy output."""
    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.engine.setup import build_engine
    from orthrus_runtime.model.testing import tiny_checkpoint

    folder = tiny_checkpoint(str(tmp_path / "m"), block_size=4, diffusion="ar-copy", seed=3)
    outs = {}
    for flag in (None, True):
        eng = build_engine(EngineArgs(model=str(folder), device="cpu", dtype="float32", max_model_len=128,
                                      async_scheduling=flag))
        assert eng.pipelined is bool(flag)
        req = [GenerateRequest(prompt_token_ids=prompt(i, 9), params=SamplingParams(max_tokens=24, temperature=0))
               for i in range(3)]
        outs[flag] = [d.token_ids for d in eng.generate(req)]
        assert eng.num_chained_steps > 0 if flag else eng.num_chained_steps == 0
    assert outs[True] == outs[None]


@pytest.mark.parametrize("pipelined", [False, True])
def test_policy_learns_cycle_times_from_chained_cycles_only(pipelined):
    """Pipelined, a cycle launched after the previous commit (the pipeline restarting after an
    admission or prefill) carries launch time the pipeline otherwise hides: the adaptive
    policy learns cycle times only from cycles queued ahead. Not pipelined: from every cycle."""
    cfg = config(pipelined, policy="adaptive")
    runner = build_runner(MODEL, cfg)
    pol = _TimedPolicy(4, runner.costs, pipelined=pipelined)
    eng = LLMEngine(MODEL, cfg, runner=runner, planner=pol)
    seen = pol.seen
    eng.generate(requests("orthrus", 0.0, []))
    commits = eng.num_batch_cycles
    if pipelined:
        assert 0 < len(seen) == eng.num_chained_steps < commits
    else:
        assert eng.num_chained_steps == 0 and len(seen) == commits
    assert eng.blocks.num_free == eng.blocks.num_blocks
