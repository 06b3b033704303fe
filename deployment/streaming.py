"""Coalescing a request's deltas into fewer stream messages.

Each message of a Serve stream is a Ray object and a proxy write, and the
engine can emit a delta every few milliseconds per request (an AR token, or
a cycle's accepted drafts). `coalesce` sends a delta at once when the previous
message left at least `interval_s` ago, and otherwise merges what arrives until
that much time has passed. So the first token is never delayed, a stream sends
at most 1/interval_s messages a second, and the text reaches the client no more
than interval_s late.

The interval may follow the load (`StreamPacer`): what costs the proxy, the router and
the replica CPU is the replica's total message rate, not one stream's. A pacer spreads a
budget of messages per second over the streams in flight, interval = min(max_interval_s,
streams / messages_per_s): one stream alone gets every cycle's delta as it comes, many share
the budget, and no stream's text is ever more than max_interval_s late.

It also narrows a race in Ray Serve 2.60's gRPC proxy: a client cancel that
lands while the proxy is writing a message is not passed on to the replica
(the proxy's generator is closed with GeneratorExit instead of being
cancelled), so fewer writes mean fewer missed cancels.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, Optional, Protocol, Union

from orthrus_runtime.types import GenerateDelta, merge_deltas as merge


class StreamPacer:
    """The merge interval of each stream from the replica's load (module docstring). One per
    replica; `relay` wraps each stream and counts it while it runs. messages_per_s None: the
    fixed interval max_interval_s whatever the load."""

    def __init__(self, max_interval_s: float, messages_per_s: Optional[float] = None):
        self.max_interval_s = max_interval_s
        self.messages_per_s = messages_per_s
        self.active = 0

    def interval(self) -> float:
        if self.messages_per_s is None:
            return self.max_interval_s
        return min(self.max_interval_s, self.active / self.messages_per_s)

    async def relay(self, stream: AsyncIterator[GenerateDelta]) -> AsyncIterator[GenerateDelta]:
        """`stream` coalesced at this pacer's interval, counted as in flight until it ends."""
        self.active += 1
        inner = coalesce(stream, self.interval)
        try:
            async for d in inner:
                yield d
        finally:
            self.active -= 1
            await inner.aclose()  # closes `stream` too (for the engine's, that aborts the request)


class MergingStream(Protocol):
    """A stream that merges what arrives while nobody reads it (the engine's RequestStream): a
    reader may sleep between messages instead of waking for every delta."""

    def __anext__(self) -> Awaitable[GenerateDelta]: ...

    async def wait_final(self, timeout_s: float) -> None:
        """Sleep timeout_s, or less if the last delta arrives meanwhile."""

    async def aclose(self) -> None: ...


async def coalesce(stream: AsyncIterator[GenerateDelta],
                   interval_s: Union[float, Callable[[], float]]) -> AsyncIterator[GenerateDelta]:
    """Relay `stream`, merging deltas so that messages are at least interval_s apart
    (a callable: read again at each decision, so that the interval follows the load).

    A MergingStream is read once a message: after each message the relay sleeps out the
    interval (cut short by the final delta) and then takes everything merged meanwhile, so
    it wakes once a message, not once a delta. Any other stream is read ahead, and what
    arrives within the interval is merged here.

    Closing or cancelling this generator cancels the pending read of `stream`
    and closes it (for the engine's stream, that aborts the request).
    """
    interval = interval_s if callable(interval_s) else (lambda: interval_s)
    if not callable(interval_s) and interval_s <= 0:
        try:
            async for d in stream:
                yield d
        finally:
            await stream.aclose()
        return
    wait_final = getattr(stream, "wait_final", None)
    if wait_final is not None:
        try:
            while True:
                try:
                    d = await stream.__anext__()
                except StopAsyncIteration:
                    return
                yield d
                if d.finished:
                    return
                gap = interval()
                if gap > 0:
                    await wait_final(gap)
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
                wait = last_sent + interval() - loop.time()
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
            if pending.finished or loop.time() - last_sent >= interval():
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
