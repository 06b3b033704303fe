"""The engine core in a process of its own (engine/core_client.ProcessCore, the Serve
replica's way): start, stream, stop strings, abort, statistics, the process dying, shutdown,
and its output token for token the synchronous engine's."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from orthrus_runtime.engine.args import EngineArgs
from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
from orthrus_runtime.engine.core_client import CoreStartError
from orthrus_runtime.engine.setup import build_engine
from orthrus_runtime.model.testing import tiny_checkpoint
from orthrus_runtime.types import EngineDeadError, GenerateRequest, SamplingParams, StatLogger, merge_deltas
from processes import pid_alive


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("tiny"), diffusion="ar-copy", block_size=4, seed=5)
    return EngineArgs(model=str(folder), device="cpu", dtype="float32", max_model_len=160, seed=7)


class Records(StatLogger):
    def __init__(self):
        self.steps, self.finished = [], []

    def on_step(self, r):
        self.steps.append(r)

    def on_request_finished(self, r):
        self.finished.append(r)


@pytest.fixture(scope="module")
def served(args):
    rec = Records()
    eng = AsyncOrthrusEngine.from_args(args, stat_logger=rec)
    eng.records = rec
    yield eng
    eng.shutdown()


def requests(stop: str = "") -> list[GenerateRequest]:
    reqs = []
    for i, p in enumerate(["The quick brown", "def add(a, b):", "Orthrus drafts", "numbers 0123", "lazy dog"]):
        sampled = i % 2 == 1
        reqs.append(GenerateRequest(
            prompt=p, mode="ar" if i == 3 else "orthrus",
            params=SamplingParams(max_tokens=30 + 5 * i, temperature=0.8 if sampled else 0.0, top_k=40, seed=100 + i,
                                  ignore_eos=True, stop=[stop] if stop and i in (0, 2) else [])))
    return reqs


async def run_all(eng, reqs):
    async def one(r):
        m = None
        async for d in eng.generate(r):
            m = merge_deltas(m, d)
        return m
    return await asyncio.gather(*(one(r) for r in reqs))


def summary(d):
    return d.token_ids, d.text, d.finish_reason, d.usage.completion_tokens


def test_streams_equal_the_synchronous_engine_token_for_token(served, args):
    """Seeded sampling and greedy, both modes, stop strings: the process core's output is
    the synchronous engine's (the same engine code, the same per-request random streams)."""
    sync = build_engine(args)
    (probe,) = sync.generate(requests()[:1])
    stop = probe.text[10:13]  # a stop string that greedy request 0 surely meets
    assert len(stop) == 3
    expected = [summary(d) for d in sync.generate(requests(stop))]
    finals = asyncio.run(run_all(served, requests(stop)))
    got = [summary(d) for d in finals]
    assert got == expected
    assert got[0][2] == "stop" and stop not in got[0][1] and got[1][2] == "length"
    # The core finished the stop-string requests itself: blocks free, counted as "stop".
    st = served.stats()
    assert st.num_running == 0 and st.num_kv_blocks_free == st.num_kv_blocks_total
    assert st.finished_by_reason.get("stop", 0) >= 1
    assert not served._streams and not len(served._outputs)
    # The engine's records crossed to this process's stat logger, with the kept token counts.
    by_id = {r.request_id: r for r in served.records.finished}
    assert served.records.steps
    for d in finals:
        r = by_id[d.request_id]
        assert (r.finish_reason, r.completion_tokens) == (d.finish_reason, d.usage.completion_tokens)


def test_abort_frees_the_request_in_the_core(served):
    async def go():
        req = GenerateRequest(prompt="hello", params=SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
        gen = served.generate(req)
        first = await gen.__anext__()
        await gen.aclose()
        return first
    first = asyncio.run(go())
    assert first.token_ids
    deadline = time.monotonic() + 10
    while (st := served.stats()).num_running or st.num_kv_blocks_free != st.num_kv_blocks_total:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert st.finished_by_reason.get("abort", 0) >= 1 and not served._streams


def test_health_answers_from_the_last_message(served):
    h = served.health()
    assert h["alive"] and h["engine_core_pid"] == served.core.pid and h["heartbeat_age_s"] < 2
    assert h["kernel_compiles_after_ready"] == 0
    # Where the start-up went, per phase (seconds): the child's imports, build_engine's phases.
    s = h["startup_s"]
    assert {"process_imports", "load_model", "kv_cache_and_runner", "warm_prefill", "total",
            "process_start_to_ready"} <= set(s), s
    assert 0 < s["total"] <= s["process_start_to_ready"] and all(v >= 0 for v in s.values())


def test_a_killed_engine_process_ends_every_stream_and_the_engine(args):
    eng = AsyncOrthrusEngine.from_args(args)
    pid = eng.core.pid

    async def go():
        req = GenerateRequest(prompt="hello", params=SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
        got = []
        with pytest.raises(EngineDeadError):
            async for d in eng.generate(req):
                got.append(d)
                if len(got) == 1:
                    os.kill(pid, signal.SIGKILL)
        return got
    try:
        assert asyncio.run(go())
        assert not eng.is_alive() and not eng.health()["alive"]
        assert not eng.stats().loop_alive
        with pytest.raises(EngineDeadError):
            asyncio.run(eng.submit(GenerateRequest(prompt="hi")))
    finally:
        eng.shutdown()
    assert not pid_alive(pid)


def test_shutdown_ends_the_process_and_its_threads(args):
    eng = AsyncOrthrusEngine.from_args(args)
    pid = eng.core.pid
    assert pid_alive(pid)
    eng.shutdown()
    assert not pid_alive(pid) and eng.core.proc.returncode == 0
    assert not eng._pump_thread.is_alive()


def test_a_bad_model_fails_at_start_with_the_cause(tmp_path):
    with pytest.raises(CoreStartError, match="could not build the engine"):
        AsyncOrthrusEngine.from_args(EngineArgs(model=str(tmp_path / "missing"), device="cpu"))


def test_the_core_process_exits_when_its_parent_is_killed(args, tmp_path):
    """No orphan: a replica process killed outright (SIGKILL) takes its engine process along."""
    script = textwrap.dedent(f"""
        import sys, time
        from orthrus_runtime.engine.args import EngineArgs
        from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
        eng = AsyncOrthrusEngine.from_args(EngineArgs(model={args.model!r}, device="cpu", max_model_len=64))
        print(eng.core.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        child = int(parent.stdout.readline())
        assert pid_alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while pid_alive(child):
            assert time.monotonic() < deadline, "the engine core process outlived its parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()


def test_a_request_id_is_free_again_only_after_its_request_ended(served):
    """A client that cancels and retries under the same id gets the new request's output alone,
    never the old one's tail."""
    def req():
        return GenerateRequest(prompt="hello", request_id="same-id",
                               params=SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))

    async def go():
        gen = served.generate(req())
        await gen.__anext__()
        await gen.aclose()
        while True:
            try:
                stream = await served.submit(req())
                break
            except Exception as e:  # noqa: BLE001 - in use until the core's abort lands
                assert "already in use" in str(e)
                await asyncio.sleep(0.01)
        m = None
        async for d in stream:
            m = merge_deltas(m, d)
        return m
    expected = asyncio.run(run_all(served, [GenerateRequest(prompt="hello", params=SamplingParams(
        max_tokens=40, temperature=0, ignore_eos=True))]))[0]
    got = asyncio.run(go())
    assert (got.token_ids, got.finish_reason) == (expected.token_ids, "length")


def test_the_replicas_front_does_not_import_torch(args):
    """Only the core process loads the model stack: the front (tokenizer, streams, outputs), as a
    Serve replica runs it, serves a request without torch in its interpreter (a second copy
    would cost the replica seconds of start-up and hundreds of MB)."""
    code = textwrap.dedent(f"""
        import asyncio, sys
        from orthrus_runtime.engine.args import EngineArgs
        from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
        from orthrus_runtime.types import GenerateRequest, SamplingParams
        eng = AsyncOrthrusEngine.from_args(EngineArgs(**{args.to_dict()!r}))
        async def go():
            return [d async for d in eng.generate(GenerateRequest(prompt="hello", params=SamplingParams(
                max_tokens=4, temperature=0)))]
        out = asyncio.run(go())
        eng.shutdown()
        assert out[-1].finished and out[-1].usage.completion_tokens == 4, out
        print("torch" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout
