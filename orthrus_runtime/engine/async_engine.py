"""AsyncOrthrusEngine: the engine behind an async-generator interface.

The front (this class) and the engine core (engine/core.py) are apart: the core's step loop
runs in a process of its own (`from_args`, a Serve replica's way: core_client.ProcessCore)
or in a thread (`in_thread`, over an LLMEngine the caller built: core_client.InprocCore),
and the two talk through commands one way and one CoreOutputs message per loop iteration
the other, carrying every request's new token ids at once. On this side:

  * requests are checked and tokenized (engine/input_processor.py) on one tokenizer
    thread, never on a caller's event loop, so a long prompt stalls no other stream;
  * one output thread receives the core's messages, makes text and checks stop strings
    (engine/output_processor.py; a request that hits one is finished in the core), hands
    the engine's statistics records to the stat logger, and delivers each message's deltas
    with one call_soon_threadsafe per caller event loop, not one per request;
  * statistics are read on demand (`stats`: one command, answered by the core), never
    copied per step; liveness is the age of the last message (`health`), which an idle
    core still sends every IDLE_WAIT_S, so the check never queues behind requests.

Fault isolation: a request failing in the core ends alone ("error"; the client is told only
its request id, the log has the rest); a failing step ends the requests it ran; a core
that dies (max_step_failures failed steps in a row, its process killed) ends every stream
with EngineDeadError and makes the engine not alive, so that Serve's health check replaces
the replica. Every method is safe from any event loop and any thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, AsyncIterator, Optional, Union

from orthrus_runtime.engine.args import EngineArgs
from orthrus_runtime.engine.core import CoreOutputs
from orthrus_runtime.engine.core_client import InprocCore, ProcessCore
from orthrus_runtime.engine.input_processor import InputProcessor
from orthrus_runtime.engine.output_processor import OutputProcessor
from orthrus_runtime.types import (
    EngineDeadError,
    EngineStats,
    GenerateDelta,
    GenerateRequest,
    InvalidRequestError,
    ModelInfo,
    RequestRefusedError,
    StatLogger,
    merge_deltas,
)
from orthrus_runtime.validation import check_request

log = logging.getLogger(__name__)

# How long `stats` waits for the core's answer before it returns the last one it has.
_STATS_TIMEOUT_S = 5.0


def error_message(request_id: str) -> str:
    """What a client is told about a request that failed inside the engine."""
    return f"the request failed inside the engine; the server log has the details under request id {request_id}"


class _Mailbox:
    """One request's undelivered outputs, on its caller's event loop (touched only there).

    Deltas that arrive while an unfinished one waits are merged into it: a consumer that reads
    less often than the core steps (a stream paced to a message interval) gets one delta with
    everything since its last read, and is woken once, not once per step."""

    __slots__ = ("loop", "items", "waiter", "final", "cancelled")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque = deque()  # GenerateDelta, or the exception that ends the stream
        self.waiter: Optional[asyncio.Future] = None  # a reader waiting for the next item
        self.final: Optional[asyncio.Future] = None  # done once the last item is here (wait_final)
        # Closed by its caller before the end: nothing more is delivered, and the request id
        # stays taken until the core's last word on it arrives (so that a retry under the same
        # id cannot receive the old request's output).
        self.cancelled = False

    def put(self, item: Any) -> None:
        items = self.items
        last = items[-1] if items else None
        if isinstance(item, GenerateDelta) and isinstance(last, GenerateDelta) and not last.finished:
            items[-1] = merge_deltas(last, item)
        else:
            items.append(item)
        if isinstance(item, BaseException) or item.finished:
            if self.final is not None and not self.final.done():
                self.final.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> Any:
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()

    async def wait_final(self, timeout_s: float) -> None:
        """Return after timeout_s, or as soon as the last item is here (sooner)."""
        if self.items and (isinstance(self.items[-1], BaseException) or self.items[-1].finished):
            return
        fut = self.final = self.loop.create_future()
        timer = self.loop.call_later(timeout_s, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            timer.cancel()
            self.final = None


def _deliver_all(items: list[tuple[_Mailbox, Any]]) -> None:
    for box, item in items:
        box.put(item)


class RequestStream:
    """The deltas of one queued request, as an async iterator.

    aclose() before the final delta aborts the request in the engine (its KV blocks
    return); the caller must close it on every path (generate() does)."""

    def __init__(self, owner: "AsyncOrthrusEngine", request_id: str, box: _Mailbox):
        self.request_id = request_id
        self._owner = owner
        self._box = box
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> GenerateDelta:
        if self._done:
            raise StopAsyncIteration
        item = await self._box.get()
        if isinstance(item, BaseException):
            self._done = True
            self._owner._release(self.request_id)
            raise item
        if item.finished:
            self._done = True
            self._owner._release(self.request_id)
        return item

    async def wait_final(self, timeout_s: float) -> None:
        """Sleep timeout_s, or less if the request's last delta arrives meanwhile (what a paced
        reader waits on between two messages: the end is never held back)."""
        if not self._done:
            await self._box.wait_final(timeout_s)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._owner._cancel(self.request_id)


class AsyncOrthrusEngine:
    def __init__(self, core: Union[InprocCore, ProcessCore], *, stat_logger: Optional[StatLogger] = None,
                 stall_timeout_s: float = 300.0):
        """core: a started core client (core_client.py). stat_logger: gets the records a core
        process sends (an in-thread core's engine reports to its own logger).
        stall_timeout_s: a core silent for this long is not alive (hung)."""
        self._core = core
        self.stat_logger = stat_logger or StatLogger()
        self.stall_timeout_s = stall_timeout_s
        self.tokenizer = core.tokenizer
        self._info: ModelInfo = core.info
        self._inputs = InputProcessor(core.tokenizer, self._info.vocab_size, self._info.max_model_len,
                                      self._info.default_mode)
        self._outputs = OutputProcessor(core.tokenizer)
        self._streams: dict[str, _Mailbox] = {}
        self._lock = threading.Lock()
        self._draining = False
        self._dead: Optional[str] = None
        self._heartbeat = time.monotonic()
        self._compiles_after_ready = 0
        self._stats = EngineStats()
        self._stat_tokens = itertools.count()
        self._stat_waits: dict[int, list] = {}  # token -> [Event, EngineStats | None]
        # One thread: HF tokenizers are not safe to call concurrently, and one thread
        # bounds the CPU that tokenization takes from the rest of the replica.
        self._prep = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="orthrus-tokenize")
        self._pump_thread = threading.Thread(target=self._pump, name="orthrus-engine-outputs", daemon=True)
        self._pump_thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs, stat_logger: Optional[StatLogger] = None, *,
                  stall_timeout_s: float = 300.0, **policy: Any) -> "AsyncOrthrusEngine":
        """The engine core in a process of its own, built from args (this returns once it is
        warmed up); policy: EngineCore's queue_timeout_s, max_step_failures."""
        return cls(ProcessCore(args, **policy), stat_logger=stat_logger, stall_timeout_s=stall_timeout_s)

    @classmethod
    def in_thread(cls, engine, *, stall_timeout_s: float = 300.0, **policy: Any) -> "AsyncOrthrusEngine":
        """The engine core's loop in a thread of this process, over `engine` (an LLMEngine,
        reporting to its own stat logger); policy as in from_args."""
        return cls(InprocCore(engine, **policy), stall_timeout_s=stall_timeout_s)

    @property
    def core(self) -> Union[InprocCore, ProcessCore]:
        return self._core

    # -- public API ---------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def heartbeat_age_s(self) -> float:
        return max(0.0, time.monotonic() - self._heartbeat)

    def is_alive(self) -> bool:
        return self._dead is None and self.heartbeat_age_s() < self.stall_timeout_s

    def health(self) -> dict[str, Any]:
        """Liveness from the core's last message: answered at once, whatever the load."""
        return {"alive": self.is_alive(), "heartbeat_age_s": self.heartbeat_age_s(),
                "draining": self._draining, "num_requests": len(self._streams),
                "kernel_compiles_after_ready": self._compiles_after_ready,
                "engine_core_pid": getattr(self._core, "pid", None), "startup_s": self._core.startup_s}

    def stats(self) -> EngineStats:
        """The core's statistics now (one command; counters it keeps in place). A dead or
        unanswering core: the last answer, loop_alive False."""
        if self.is_alive():
            token = next(self._stat_tokens)
            wait = [threading.Event(), None]
            self._stat_waits[token] = wait
            self._core.put(("stats", token))
            if wait[0].wait(_STATS_TIMEOUT_S) and wait[1] is not None:
                self._stats = wait[1]
            self._stat_waits.pop(token, None)
        s = dataclasses.replace(self._stats)
        s.loop_alive = self.is_alive()
        return s

    @property
    def num_step_failures(self) -> int:
        return self.stats().num_step_failures

    @property
    def num_queue_timeouts(self) -> int:
        return self.stats().num_queue_timeouts

    def validate(self, req: GenerateRequest) -> list[int]:
        return self._inputs.validate(req)

    async def tokenize(self, req: GenerateRequest) -> list[int]:
        """The prompt ids `req` would be served with (its chat template applied), on the
        tokenizer thread; InvalidRequestError for a bad input."""
        if not isinstance(req, GenerateRequest):
            raise InvalidRequestError("the request must be a GenerateRequest")
        check_request(req, self._inputs.limits)
        return await asyncio.get_running_loop().run_in_executor(self._prep, self._inputs.tokenize, req)

    async def detokenize(self, ids: list[int]) -> str:
        """The text of token ids, on the tokenizer thread; InvalidRequestError for bad ids."""
        return await asyncio.get_running_loop().run_in_executor(self._prep, self._inputs.detokenize, ids)

    async def submit(self, req: GenerateRequest) -> RequestStream:
        """Check and tokenize req (in the worker thread) and queue it; returns its stream.

        Raises InvalidRequestError (bad input), RequestRefusedError (draining) or
        EngineDeadError, all before anything is queued. The request's arrival (what TTFT,
        queue time and the queue deadline count from) is its receipt here, before tokenization,
        as vLLM's front counts it."""
        arrival = time.monotonic()
        if not self.is_alive():
            raise EngineDeadError("the engine loop is not running")
        if self._draining:
            raise RequestRefusedError("the server is shutting down", "shutting_down")
        if not isinstance(req, GenerateRequest):
            raise InvalidRequestError("the request must be a GenerateRequest")
        check_request(req, self._inputs.limits)  # cheap checks first, on the caller's loop
        rid = req.request_id or f"req-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._prep, self._inputs.validate, req)
        box = _Mailbox(loop)
        with self._lock:  # the output thread marks the core dead under this lock
            if self._dead is not None:
                raise EngineDeadError("the engine loop is not running")
            if rid in self._streams:
                raise InvalidRequestError(f"request_id {rid!r} is already in use", param="request_id")
            if self._draining:
                raise RequestRefusedError("the server is shutting down", "shutting_down")
            self._streams[rid] = box
        self._outputs.add(rid, ids, req.params)
        # The core needs the ids, not the text: nothing else of the prompt crosses.
        lean = dataclasses.replace(req, prompt=None, messages=None, prompt_token_ids=None, request_id=rid)
        self._core.put(("add", lean, ids, arrival))
        return RequestStream(self, rid, box)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        stream = await self.submit(req)
        try:
            async for d in stream:
                yield d
        finally:
            # Closed or cancelled before the end (client left): abort, returning its KV blocks.
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        self._core.put(("abort", request_id))

    async def drain(self, timeout_s: float, end_wait_s: float = 5.0) -> int:
        """Stop admitting, let in-flight requests finish for up to timeout_s, then end the
        rest with RequestRefusedError("shutting_down"); returns how many were ended.
        Awaitable from the callers' own loop, which must keep running to deliver."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline and self.is_alive():
            await asyncio.sleep(0.05)
        n = len(self._streams)
        if n:
            self._core.put(("end_all",))
            t_end = time.monotonic() + end_wait_s
            while self._streams and time.monotonic() < t_end and self.is_alive():
                await asyncio.sleep(0.02)
        return n

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """From outside the callers' loops: let in-flight requests finish for up to
        drain_timeout_s, end the rest (RequestRefusedError), stop the core (its process
        exits, or is killed)."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self.is_alive() and self._streams:
            time.sleep(0.05)
        self._core.put(("end_all",))
        # Give the core a moment to answer before it stops.
        t_end = time.monotonic() + 5.0
        while time.monotonic() < t_end and self.is_alive() and self._streams:
            time.sleep(0.01)
        self._dead = self._dead or "shut down"
        self._core.close()
        if threading.current_thread() is not self._pump_thread:
            self._pump_thread.join(timeout=10)
        self._prep.shutdown(wait=False, cancel_futures=True)

    # -- stream bookkeeping (callers' side) ---------------------------------------------
    def _release(self, rid: str) -> None:
        with self._lock:
            self._streams.pop(rid, None)

    def _cancel(self, rid: str) -> None:
        with self._lock:
            box = self._streams.get(rid)
            if box is not None:
                box.cancelled = True
        self._core.put(("abort", rid))

    # -- the output thread --------------------------------------------------------------
    def _pump(self) -> None:
        while True:
            out = self._core.recv()
            if out is None:
                break
            self._heartbeat = time.monotonic()
            try:
                self._take(out)
            except Exception:  # noqa: BLE001 - a bug here must not silence every stream
                log.exception("the engine output thread failed on a message")
            if out.dead is not None:
                self._dead = out.dead
                break
        with self._lock:
            if self._dead is None:
                self._dead = "the engine core stopped"
                log.error("the engine core stopped unexpectedly (its process exited or was killed)")
            rids = list(self._streams)
        for wait in list(self._stat_waits.values()):
            wait[0].set()
        err = EngineDeadError("the engine loop died")
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for rid in rids:
            self._outputs.drop(rid)
            self._route(rid, err, batches)
        self._send(batches)

    def _take(self, out: CoreOutputs) -> None:
        self._compiles_after_ready = out.compiles_after_ready
        for r in out.steps:
            self._log(self.stat_logger.on_step, r)
        for r in out.finished:
            self._log(self.stat_logger.on_request_finished, r)
        for token, st in out.stats:
            wait = self._stat_waits.get(token)
            if wait is not None:
                wait[1] = st
                wait[0].set()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for d in out.deltas:
            c = self._outputs.process(d)
            if c is None:
                continue
            if c.finish_reason == "error" and c.error is None:
                c.error = error_message(c.request_id)
            self._route(c.request_id, c, batches)
        for rid, reason, n in self._outputs.take_finishing():
            self._core.put(("finish", rid, reason, n))
        for rid, err in out.ended:
            self._outputs.drop(rid)
            self._route(rid, err, batches)
        self._send(batches)

    @staticmethod
    def _log(fn, record) -> None:
        try:
            fn(record)
        except Exception:  # noqa: BLE001 - metrics must not stop the outputs
            log.exception("stat logger failed")

    def _route(self, rid: str, item: Any, batches: dict) -> None:
        box = self._streams.get(rid)
        if box is None:
            return
        if box.cancelled:  # nobody listens: the id is free once the request has ended
            if isinstance(item, BaseException) or item.finished:
                with self._lock:
                    if self._streams.get(rid) is box:
                        del self._streams[rid]
            return
        batches.setdefault(box.loop, []).append((box, item))

    @staticmethod
    def _send(batches: dict) -> None:
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass
