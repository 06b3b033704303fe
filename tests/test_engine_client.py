"""deployment/engine_client.py's LocalEngineClient over a real EngineHost (the colocated
topology's path, without Ray): the stream's items, and cancel() freeing the engine request
both when the stream is suspended between reads and when a reader is inside it."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

pytest.importorskip("ray")

from deployment.engine_client import LocalEngineClient  # noqa: E402
from deployment.engine_host import EngineHost  # noqa: E402
from deployment.errors import Accepted, Rejection  # noqa: E402
from orthrus_runtime.model.testing import tiny_checkpoint  # noqa: E402
from orthrus_runtime.types import GenerateDelta, GenerateRequest, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("tiny"), block_size=4, seed=3)
    h = EngineHost({"model": str(folder), "device": "cpu", "dtype": "float32", "max_model_len": 2048},
                   "tiny", replica="r0", actor_name="test", metrics_port=None, stream_interval_s=0.0)
    yield h
    asyncio.run(h.close())


def _req(rid: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(prompt="hello", request_id=rid, params=SamplingParams(max_tokens=max_tokens,
                                                                                 temperature=0.0))


async def _idle(host: EngineHost, timeout: float = 30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        s = await host.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_kv_blocks_free == s.num_kv_blocks_total:
            return s
        assert loop.time() < deadline, s
        await asyncio.sleep(0.05)


def test_a_local_stream_gives_accepted_then_the_deltas(host):
    async def go():
        client = LocalEngineClient(host)
        call = client.generate(_req("a", 6))
        assert isinstance(await call.__anext__(), Accepted)
        deltas = []
        while not (deltas and deltas[-1].finished):
            deltas.append(await call.__anext__())
        assert all(isinstance(d, GenerateDelta) for d in deltas)
        assert sum(len(d.token_ids) for d in deltas) == 6
        bad = client.generate(dataclasses.replace(_req("b", 6), prompt=""))
        assert isinstance(await bad.__anext__(), Rejection)
        assert (await client.ready())[0]

    asyncio.run(go())


def test_cancel_frees_the_request_whether_suspended_or_being_read(host):
    async def go():
        client = LocalEngineClient(host)
        before = (await _idle(host)).finished_by_reason.get("abort", 0)

        # Suspended between reads: the generator is closed, which aborts the engine request.
        call = client.generate(_req("c1", 1500))
        assert isinstance(await call.__anext__(), Accepted)
        await call.__anext__()
        call.cancel()
        assert (await _idle(host)).finished_by_reason.get("abort", 0) == before + 1

        # A reader inside the generator at that moment: the engine request is aborted under it,
        # and the reader gets the request's end instead of hanging.
        call = client.generate(_req("c2", 1500))
        assert isinstance(await call.__anext__(), Accepted)
        await call.__anext__()

        async def read_to_end():
            while True:
                d = await call.__anext__()
                if d.finished:
                    return d

        reader = asyncio.ensure_future(read_to_end())
        await asyncio.sleep(0)  # the reader is now awaiting inside the generator
        call.cancel()
        last = await asyncio.wait_for(reader, 30)
        assert last.finish_reason == "abort"
        assert (await _idle(host)).finished_by_reason.get("abort", 0) == before + 2
        call.cancel()  # a second cancel is a no-op
        await asyncio.sleep(0.05)
        assert not client._pending  # the cleanup tasks are gone

    asyncio.run(go())
