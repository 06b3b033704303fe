"""Coalescing a request's deltas into fewer stream messages.

Each message of a Serve stream is a Ray object and a proxy write, and the
engine can emit a delta every few milliseconds per request (an AR token, or
a cycle's accepted drafts). `coalesce` sends a delta at once when the previous
message left at least `interval_s` ago, and otherwise merges what arrives until
that much time has passed. So the first token is never delayed, a stream sends
at most 1/interval_s messages a second, and the text reaches the client no more
than interval_s late.

It also narrows a race in Ray Serve 2.60's gRPC proxy: a client cancel that
lands while the proxy is writing a message is not passed on to the replica
(the proxy's generator is closed with GeneratorExit instead of being
cancelled), so fewer writes mean fewer missed cancels.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

from orthrus_runtime.types import GenerateDelta, merge_deltas as merge


async def coalesce(stream: AsyncIterator[GenerateDelta], interval_s: float) -> AsyncIterator[GenerateDelta]:
    """Relay `stream`, merging deltas so that messages are at least interval_s apart.

    Closing or cancelling this generator cancels the pending read of `stream`
    and closes it (for the engine's stream, that aborts the request).
    """
    if interval_s <= 0:
        try:
            async for d in stream:
                yield d
        finally:
            await stream.aclose()
        return

    loop = asyncio.get_running_loop()
    last_sent = float("-inf")
    pending: Optional[GenerateDelta] = None
    nxt: Optional[asyncio.Future] = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(stream.__anext__())
            if pending is not None:
                wait = last_sent + interval_s - loop.time()
                if wait > 0:
                    await asyncio.wait({nxt}, timeout=wait)
                if not nxt.done():  # the interval is over: send what has accumulated
                    yield pending
                    last_sent, pending = loop.time(), None
                    continue
            try:
                d = await nxt
            except StopAsyncIteration:
                if pending is not None:
                    yield pending
                return
            finally:
                if nxt.done():
                    nxt = None
            pending = merge(pending, d)
            if pending.finished or loop.time() - last_sent >= interval_s:
                out, pending = pending, None
                last_sent = loop.time()
                yield out
                if out.finished:
                    return
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            # Let the cancelled read unwind inside the stream before closing it.
            await asyncio.gather(nxt, return_exceptions=True)
        await stream.aclose()
