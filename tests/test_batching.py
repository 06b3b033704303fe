"""Continuous batching through the async engine: exactness, preemption, abort, no leaks."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest

from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
from orthrus_runtime.spec.reference import greedy_ar
from orthrus_runtime.model.testing import tiny_model, tiny_tokenizer
from orthrus_runtime.types import GenerateRequest, InvalidRequestError, SamplingParams

MODEL = tiny_model("qwen3", seed=21, diffusion="ar-copy", eos_token_ids=[])


def make_async(num_kv_blocks=400, max_num_seqs=16, block_size=4, tokenizer=None, **kw):
    cfg = EngineConfig(block_size=block_size, mask_token_id=300, max_model_len=160, num_kv_blocks=num_kv_blocks,
                       kv_page_size=4, max_num_seqs=max_num_seqs, max_num_batched_tokens=64, **kw)
    return AsyncOrthrusEngine.in_thread(LLMEngine(MODEL, cfg, tokenizer))


def prompt(i, n):
    return [(i * 37 + j * 11) % 290 + 3 for j in range(n)]


async def collect(engine, req, delay=0.0):
    await asyncio.sleep(delay)
    ids, final = [], None
    async for d in engine.generate(req):
        ids += d.token_ids
        if d.finished:
            final = d
    return ids, final


def assert_clean(engine):
    st = engine.stats()
    assert st.num_running == 0 and st.num_waiting == 0
    assert st.num_kv_blocks_free == st.num_kv_blocks_total
    assert not engine.core.engine.seqs and not engine._streams and not len(engine._outputs)


# async_scheduling=True: pipelined decoding (on by default with CUDA graphs), here on the CPU.
@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("mode", ["orthrus", "ar"])
async def test_greedy_batched_equals_alone(mode, pipelined):
    lens = [(3, 40), (25, 30), (9, 50), (60, 20), (1, 35), (14, 45)]
    alone = [greedy_ar(MODEL, prompt(i, n), m) for i, (n, m) in enumerate(lens)]
    eng = make_async(async_scheduling=pipelined)
    try:
        reqs = [GenerateRequest(prompt_token_ids=prompt(i, n), mode=mode,
                                params=SamplingParams(max_tokens=m, temperature=0)) for i, (n, m) in enumerate(lens)]
        # Staggered arrivals: later requests join while earlier ones decode.
        res = await asyncio.gather(*(collect(eng, r, delay=0.02 * i) for i, r in enumerate(reqs)))
        for (ids, final), ref, (_, m) in zip(res, alone, lens):
            assert ids == ref
            assert final.finish_reason == "length" and final.usage.completion_tokens == m
        assert eng.stats().spec[mode].num_cycles > 0
        assert_clean(eng)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("pipelined", [False, True])
async def test_seeded_sampling_same_alone_and_batched(pipelined):
    params = dict(max_tokens=30, temperature=0.8, top_k=50, top_p=0.95)
    eng = make_async(async_scheduling=pipelined)
    try:
        alone = []
        for i in range(3):
            ids, _ = await collect(eng, GenerateRequest(prompt_token_ids=prompt(i, 7 + i),
                                                        params=SamplingParams(seed=100 + i, **params)))
            alone.append(ids)
        others = [GenerateRequest(prompt_token_ids=prompt(9 + j, 5), params=SamplingParams(seed=7 + j, **params))
                  for j in range(5)]
        mine = [GenerateRequest(prompt_token_ids=prompt(i, 7 + i), params=SamplingParams(seed=100 + i, **params))
                for i in range(3)]
        res = await asyncio.gather(*(collect(eng, r, delay=0.01 * k) for k, r in enumerate(others + mine)))
        assert [ids for ids, _ in res[5:]] == alone
        assert_clean(eng)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("mode", ["orthrus", "ar"])
async def test_small_pool_preempts_and_stays_exact(mode, pipelined):
    lens = [(20, 60), (30, 50), (10, 70), (25, 60), (15, 55), (5, 65)]
    alone = [greedy_ar(MODEL, prompt(i, n), m) for i, (n, m) in enumerate(lens)]
    # 48 blocks of 4 tokens = 192 slots for ~6 x 85 tokens: sequences must be preempted.
    eng = make_async(num_kv_blocks=48, async_scheduling=pipelined)
    try:
        reqs = [GenerateRequest(prompt_token_ids=prompt(i, n), mode=mode,
                                params=SamplingParams(max_tokens=m, temperature=0)) for i, (n, m) in enumerate(lens)]
        res = await asyncio.gather(*(collect(eng, r) for r in reqs))
        assert [ids for ids, _ in res] == alone
        assert eng.stats().num_preemptions > 0
        assert_clean(eng)
    finally:
        eng.shutdown()


async def test_abort_mid_stream_returns_blocks():
    eng = make_async()
    try:
        req = GenerateRequest(prompt_token_ids=prompt(1, 10), request_id="victim",
                              params=SamplingParams(max_tokens=140, temperature=0))
        got, final = [], None
        async for d in eng.generate(req):
            got += d.token_ids
            if len(got) >= 5 and not final:
                await eng.abort("victim")
            if d.finished:
                final = d
        assert final.finish_reason == "abort" and 5 <= len(got) < 140
        assert_clean(eng)
        # Closing the iterator early (a client that left) aborts too.
        agen = eng.generate(GenerateRequest(prompt_token_ids=prompt(2, 10), params=SamplingParams(max_tokens=140, temperature=0)))
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            if eng.stats().num_running == 0:
                break
            await asyncio.sleep(0.02)
        assert_clean(eng)
        assert eng.stats().finished_by_reason.get("abort") == 2
    finally:
        eng.shutdown()


@pytest.mark.parametrize("pipelined", [False, True])
async def test_200_random_requests_with_aborts_leave_nothing_behind(pipelined):
    rng = random.Random(5)
    eng = make_async(num_kv_blocks=120, max_num_seqs=24, block_size=8, async_scheduling=pipelined)
    threads_before = threading.active_count()
    try:
        async def one(i):
            await asyncio.sleep(rng.random() * 1.5)
            mode = rng.choice(["orthrus", "ar"])
            req = GenerateRequest(prompt_token_ids=prompt(i, rng.randint(1, 40)), mode=mode,
                                  params=SamplingParams(max_tokens=rng.randint(1, 60),
                                                        temperature=rng.choice([0.0, 0.9]), seed=i))
            action = rng.random()
            n, final = 0, None
            agen = eng.generate(req)
            try:
                async for d in agen:
                    n += len(d.token_ids)
                    if action < 0.15 and n >= 3:
                        break  # client leaves
                    if action > 0.85 and n >= 2 and final is None:
                        await eng.abort(req.request_id)
                    if d.finished:
                        final = d
            finally:
                await agen.aclose()
            return final

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), timeout=300)
        ended = [r for r in results if r is not None]
        assert all(r.finish_reason in ("length", "abort", "stop") for r in ended)
        for _ in range(200):
            if eng.stats().num_running == 0 and eng.stats().num_waiting == 0:
                break
            await asyncio.sleep(0.02)
        assert_clean(eng)
        st = eng.stats()
        assert st.num_requests_finished == 200
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not pending
    finally:
        eng.shutdown()
    assert not eng.core.is_running() and not eng._pump_thread.is_alive()
    assert threading.active_count() <= threads_before


async def test_invalid_requests_get_errors_and_engine_keeps_serving():
    eng = make_async(tokenizer=tiny_tokenizer())
    try:
        P = SamplingParams
        bad = [
            (GenerateRequest(prompt=""), "empty"),
            (GenerateRequest(prompt_token_ids=[]), "empty"),
            (GenerateRequest(prompt_token_ids=prompt(0, 150), params=P(max_tokens=20)), "max_model_len"),
            (GenerateRequest(prompt="hi", params=P(max_tokens=0)), "max_tokens"),
            (GenerateRequest(prompt="hi", params=P(temperature=-0.5)), "temperature"),
            (GenerateRequest(prompt="hi", params=P(top_p=0.0)), "top_p"),
            (GenerateRequest(prompt="hi", params=P(top_p=1.5)), "top_p"),
            (GenerateRequest(prompt="hi", params=P(top_k=-2)), "top_k"),
            (GenerateRequest(prompt="hi", params=P(stop=["x"] * 17)), "at most 16"),
            (GenerateRequest(prompt="hi", params=P(stop=[""])), "must not be empty"),
            (GenerateRequest(prompt="hi", params=P(seed=2**64)), "64 bits"),
            (GenerateRequest(prompt_token_ids=[1, 99999]), "unknown token"),
            (GenerateRequest(prompt_token_ids=[1, -1]), "unknown token"),
            (GenerateRequest(prompt="hi", mode="fast"), "mode"),
            (GenerateRequest(prompt="hi", prompt_token_ids=[1]), "exactly one"),
            (GenerateRequest(messages=[{"role": "user"}]), "content"),
        ]
        good = asyncio.create_task(collect(eng, GenerateRequest(prompt_token_ids=prompt(3, 5),
                                                                params=SamplingParams(max_tokens=40, temperature=0))))
        for req, msg in bad:
            with pytest.raises(InvalidRequestError, match=msg):
                await collect(eng, req)
        ids, final = await good
        assert ids == greedy_ar(MODEL, prompt(3, 5), 40)
        ids, final = await collect(eng, GenerateRequest(messages=[{"role": "user", "content": "hello"}],
                                                        params=SamplingParams(max_tokens=5, temperature=0)))
        assert final.finish_reason == "length" and len(ids) == 5
        assert_clean(eng)
    finally:
        eng.shutdown()


async def test_a_paced_reader_gets_merged_deltas_and_an_unheld_end():
    """The engine's stream merges what arrives while its reader sleeps (deployment/streaming.py
    reads it once a message): the same ids as a delta-by-delta read, fewer messages, each at
    least the interval after the last, and the final one as soon as the request ends, not at the
    end of an interval."""
    from deployment.streaming import coalesce

    eng = make_async()
    try:
        req = GenerateRequest(prompt_token_ids=prompt(1, 12), mode="ar",
                              params=SamplingParams(max_tokens=120, temperature=0))
        ref, _ = await collect(eng, req)
        loop = asyncio.get_running_loop()
        stream = await eng.submit(req)
        msgs, times = [], []
        async for d in coalesce(stream, 0.05):
            msgs.append(d)
            times.append(loop.time())
        assert [t for d in msgs for t in d.token_ids] == ref == greedy_ar(MODEL, prompt(1, 12), 120)
        assert msgs[-1].finished and all(not d.finished for d in msgs[:-1])
        deltas = eng.stats().spec["ar"].num_cycles // 2  # this request's steps (the reference ran as many)
        assert 2 <= len(msgs) < deltas, (len(msgs), deltas)
        gaps = [b - a for a, b in zip(times[:-1], times[1:])]
        assert all(g >= 0.045 for g in gaps[:-1]), gaps
        # A 2-token request under a 0.5 s interval: its end cuts the reader's sleep short.
        short = GenerateRequest(prompt_token_ids=prompt(2, 5), mode="ar",
                                params=SamplingParams(max_tokens=2, temperature=0))
        t0 = loop.time()
        out = [d async for d in coalesce(await eng.submit(short), 0.5)]
        assert out[-1].finished and loop.time() - t0 < 0.4
        assert_clean(eng)
    finally:
        eng.shutdown()
