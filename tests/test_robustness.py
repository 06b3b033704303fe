"""Fault isolation in the async engine, without Ray: nothing one request carries stops the
others. Failures are injected through constructor arguments (a tokenizer, a stat logger)
and real inputs (a prompt holding a token the injected tokenizer refuses), never by
patching an engine after construction."""
from __future__ import annotations

import asyncio
import threading

import pytest

from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
from orthrus_runtime.model.testing import tiny_model, tiny_tokenizer
from orthrus_runtime.types import (
    GenerateRequest,
    InvalidRequestError,
    RequestRefusedError,
    SamplingParams,
    StatLogger,
)

MODEL = tiny_model("qwen3", seed=21, diffusion="ar-copy", eos_token_ids=[])
# Token ids whose text, in this order, the injected tokenizer refuses to decode.
POISON = (77, 13, 201)


def _poisoned(ids) -> bool:
    ids = list(ids)
    return any(tuple(ids[i:i + 3]) == POISON for i in range(len(ids) - 2))


class PoisonTokenizer:
    """The tiny tokenizer, except that decoding a window holding the POISON ids raises (a
    tokenizer bug hit by one request's text); records the threads that tokenize."""

    def __init__(self):
        self._tok = tiny_tokenizer()
        self.encode_threads: set[str] = set()

    def decode(self, ids, **kw):
        if _poisoned(ids):
            raise ValueError("tokenizer cannot decode this")
        return self._tok.decode(ids, **kw)

    def encode(self, *a, **kw):
        self.encode_threads.add(threading.current_thread().name)
        return self._tok.encode(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


class FailingStepLogger(StatLogger):
    """Raises from on_step, so that the step fails as a whole after the engine has updated
    the state of every sequence in it: on the first `times` steps that run `running`
    sequences."""

    def __init__(self, running: int, times: int = 1):
        self.running = running
        self.left = times

    def on_step(self, record) -> None:
        if self.left > 0 and record.num_running == self.running:
            self.left -= 1
            raise RuntimeError("injected step failure")


def make(tokenizer=None, stat_logger=None, max_num_seqs=16, pipelined=False, max_model_len=160, **kw):
    cfg = EngineConfig(block_size=4, mask_token_id=300, max_model_len=max_model_len,
                       num_kv_blocks=max(400, max_model_len), kv_page_size=4,
                       max_num_seqs=max_num_seqs, max_num_batched_tokens=64, async_scheduling=pipelined)
    return AsyncOrthrusEngine.in_thread(LLMEngine(MODEL, cfg, tokenizer, stat_logger=stat_logger), **kw)


def prompt(i, n):
    return [(i * 37 + j * 11) % 290 + 3 for j in range(n)]


async def collect(engine, req, delay=0.0):
    await asyncio.sleep(delay)
    ids, final = [], None
    async for d in engine.generate(req):
        ids += d.token_ids
        final = d if d.finished else final
    return ids, final


def assert_clean(engine):
    st = engine.stats()
    assert st.num_running == 0 and st.num_waiting == 0
    assert st.num_kv_blocks_free == st.num_kv_blocks_total
    assert not engine.core.engine.seqs and not engine._streams and not len(engine._outputs)


def batch():
    reqs = []
    for i in range(6):
        sampled = i % 2 == 1
        reqs.append(GenerateRequest(prompt_token_ids=prompt(i, 5 + 3 * i), mode="ar" if i == 4 else "orthrus",
                                    params=SamplingParams(max_tokens=40, temperature=0.9 if sampled else 0.0,
                                                          top_k=50, seed=1000 + i)))
    return reqs


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_request_failing_inside_a_step_ends_alone(pipelined):
    tok = PoisonTokenizer()
    eng = make(tokenizer=tok, pipelined=pipelined)
    try:
        without = await asyncio.gather(*(collect(eng, r, 0.01 * i) for i, r in enumerate(batch())))
        assert all(f.finish_reason != "error" for _, f in without)
        assert_clean(eng)
        # The same batch plus one request whose prompt the detokenizer fails on; it arrives
        # while the others decode, so it fails in a step they share.
        poisoned = GenerateRequest(prompt_token_ids=[5, *POISON, 8], params=SamplingParams(max_tokens=40))
        tasks = [collect(eng, r, 0.01 * i) for i, r in enumerate(batch())] + [collect(eng, poisoned, 0.05)]
        *with_it, (bad_ids, bad_final) = await asyncio.gather(*tasks)
        assert bad_final.finish_reason == "error"
        assert bad_final.error and "request id" in bad_final.error and "decode" not in bad_final.error
        # Token for token, with the same finish reasons and usage.
        same = lambda rs: [(ids, f.finish_reason, f.usage) for ids, f in rs]  # noqa: E731
        assert same(with_it) == same(without)
        assert_clean(eng)
        assert eng.stats().finished_by_reason["error"] == 1
        assert eng.is_alive()
    finally:
        eng.shutdown()


async def test_a_failed_step_ends_its_requests_and_the_loop_goes_on():
    # The first step running all three fails as a whole: they end with "error", the loop serves on.
    logger = FailingStepLogger(running=3)
    eng = make(stat_logger=logger)
    try:
        first = await asyncio.gather(*(collect(eng, r) for r in batch()[:3]))
        assert all(f.finish_reason == "error" and f.error for _, f in first)
        assert_clean(eng)
        ids, final = await collect(eng, batch()[0])
        assert final.finish_reason == "length" and len(ids) == 40
        assert eng.num_step_failures == 1 and eng.is_alive()
    finally:
        eng.shutdown()


async def test_failed_steps_in_a_row_stop_the_loop():
    eng = make(stat_logger=FailingStepLogger(running=1, times=3), max_step_failures=3)
    try:
        for _ in range(3):
            try:
                await collect(eng, batch()[0])
            except Exception as e:  # the third failure kills the loop
                assert type(e).__name__ == "EngineDeadError"
        assert not eng.is_alive() and not eng.health()["alive"]
    finally:
        eng.shutdown()


EXPLOITS = [
    dict(top_k=9223372036854775808), dict(top_k=10**30), dict(max_tokens=2**70), dict(max_tokens=2**31),
    dict(seed=2**64), dict(temperature=2.5), dict(temperature=1e300), dict(temperature=float("nan")),
    dict(top_p=float("inf")), dict(top_k=5.0), dict(max_tokens=True), dict(stop=["a\ud800b"]),
]


async def test_exploits_are_refused_before_the_step_loop():
    eng = make(tokenizer=tiny_tokenizer())
    try:
        for kw in EXPLOITS:
            with pytest.raises(InvalidRequestError) as e:
                await collect(eng, GenerateRequest(prompt="hi", params=SamplingParams(**{"max_tokens": 4, **kw})))
            assert e.value.param in {"top_k", "max_tokens", "seed", "temperature", "top_p", "stop"}, kw
        for bad in (GenerateRequest(prompt="a\ud800b"),
                    GenerateRequest(messages=[{"role": "user", "content": "\udfff"}]),
                    GenerateRequest(messages=[{"role": "wizard", "content": "x"}])):
            with pytest.raises(InvalidRequestError):
                await collect(eng, bad)
        # The greedy floor: 1e-38 (which overflowed into garbage) is greedy, like 0.
        greedy, _ = await collect(eng, GenerateRequest(prompt="hello", params=SamplingParams(max_tokens=12,
                                                                                           temperature=0)))
        for t in (1e-38, 1e-6):
            ids, final = await collect(eng, GenerateRequest(prompt="hello", params=SamplingParams(
                max_tokens=12, temperature=t, seed=3)))
            assert ids == greedy
        assert_clean(eng)
        assert eng.is_alive() and eng.num_step_failures == 0
    finally:
        eng.shutdown()


async def test_tokenization_runs_off_the_callers_loop():
    tok = PoisonTokenizer()
    eng = make(tokenizer=tok)
    try:
        await collect(eng, GenerateRequest(prompt="hello there", params=SamplingParams(max_tokens=3)))
        assert tok.encode_threads and threading.current_thread().name not in tok.encode_threads
        assert all(n.startswith("orthrus-tokenize") for n in tok.encode_threads)
        # Text too long to fit max_model_len (160) is refused before tokenizing.
        tok.encode_threads.clear()
        with pytest.raises(InvalidRequestError, match="characters"):
            await collect(eng, GenerateRequest(prompt="x" * (160 * 32 + 1), params=SamplingParams(max_tokens=4)))
        assert not tok.encode_threads
    finally:
        eng.shutdown()


async def test_queue_deadline_refuses_requests_that_wait_too_long():
    # One slot: a second request waits behind a long one and is refused after 0.3 s.
    eng = make(max_num_seqs=1, queue_timeout_s=0.3, max_model_len=2000)
    try:
        long = asyncio.create_task(collect(eng, GenerateRequest(prompt_token_ids=prompt(1, 5), mode="ar",
                                                                params=SamplingParams(max_tokens=1990))))
        short = GenerateRequest(prompt_token_ids=prompt(2, 5), params=SamplingParams(max_tokens=4))
        with pytest.raises(RequestRefusedError) as e:
            await collect(eng, short, 0.05)
        assert e.value.reason == "queue_timeout" and "0.3s" in str(e.value)
        assert not long.done()
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)
        await asyncio.sleep(0.2)
        assert eng.num_queue_timeouts == 1
        assert_clean(eng)
    finally:
        eng.shutdown()


async def test_drain_finishes_short_requests_and_ends_the_rest():
    eng = make(max_model_len=2000)
    try:
        short = asyncio.create_task(collect(eng, GenerateRequest(prompt_token_ids=prompt(1, 5),
                                                                 params=SamplingParams(max_tokens=8))))
        long = asyncio.create_task(collect(eng, GenerateRequest(prompt_token_ids=prompt(2, 5), mode="ar",
                                                                params=SamplingParams(max_tokens=1990))))
        await asyncio.sleep(0.05)
        drain = asyncio.create_task(eng.drain(timeout_s=0.5))
        await asyncio.sleep(0.01)
        with pytest.raises(RequestRefusedError) as e:  # no new admissions while draining
            await collect(eng, GenerateRequest(prompt_token_ids=prompt(3, 5), params=SamplingParams(max_tokens=2)))
        assert e.value.reason == "shutting_down"
        ended = await drain
        assert (await short)[1].finish_reason == "length"
        with pytest.raises(RequestRefusedError):
            await long
        assert ended == 1 and eng.health()["draining"]
        assert_clean(eng)
    finally:
        eng.shutdown()
