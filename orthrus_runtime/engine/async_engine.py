"""AsyncOrthrusEngine: the engine behind an async-generator interface.

The step loop runs in its own thread and is the only code that touches the
LLMEngine's state; callers talk to it through a command queue, and deltas travel
back to each caller's own asyncio loop with call_soon_threadsafe. So `submit`,
`generate`, `abort` and `stats` are safe from any event loop (a Ray Serve
replica's, a FastAPI app's, a test's).

Fault isolation: nothing one request carries may stop the loop for the others.
  * Requests are checked (orthrus_runtime.validation) and tokenized in one worker
    thread, never on the caller's event loop, so a long prompt does not stall the
    other streams of a replica.
  * A request that fails inside a step ends alone with finish_reason "error" (the
    LLMEngine guards its per-request work); a request whose admission fails ends
    alone the same way. The client is told only the request id; the log has the rest.
  * A step that fails as a whole ends the requests that were running in it, with
    "error", and the loop goes on; only max_step_failures failed steps in a row (a
    broken device, say) stop it, and then Serve's health check replaces the replica.
The loop beats a heartbeat every iteration; liveness reads it instead of queueing
behind requests (`health`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from typing import Any, AsyncIterator, Optional

from orthrus_runtime.engine.args import EngineArgs
from orthrus_runtime.engine.llm_engine import LLMEngine
from orthrus_runtime.engine.setup import build_engine
from orthrus_runtime.types import (
    EngineDeadError,
    EngineStats,
    GenerateDelta,
    GenerateRequest,
    InvalidRequestError,
    ModelInfo,
    RequestRefusedError,
    StatLogger,
    Usage,
)
from orthrus_runtime.validation import ModelLimits, check_request

log = logging.getLogger(__name__)

# A loop iteration waits at most this long for work, so an idle loop still beats.
_IDLE_WAIT_S = 0.5


def error_message(request_id: str) -> str:
    """What a client is told about a request that failed inside the engine."""
    return f"the request failed inside the engine; the server log has the details under request id {request_id}"


class _Mailbox:
    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()


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
        item = await self._box.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            self._owner._release(self.request_id)
            raise item
        if item.finished:
            self._done = True
            self._owner._release(self.request_id)
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._owner._cancel(self.request_id)


class AsyncOrthrusEngine:
    def __init__(self, engine: LLMEngine, *, queue_timeout_s: Optional[float] = None,
                 max_step_failures: int = 3, stall_timeout_s: float = 300.0):
        """queue_timeout_s: a request still waiting for its first schedule after this long
        is refused (RequestRefusedError "queue_timeout"); None: no deadline.
        max_step_failures: failed steps in a row after which the loop stops.
        stall_timeout_s: a heartbeat older than this makes the engine not alive (hung)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.queue_timeout_s = queue_timeout_s
        self.max_step_failures = max_step_failures
        self.stall_timeout_s = stall_timeout_s
        self._cmds: "queue.Queue[tuple]" = queue.Queue()
        self._streams: dict[str, _Mailbox] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._draining = False
        self._error: Optional[BaseException] = None
        self._stats = engine.stats()
        self._info = engine.model_info()
        self._limits = ModelLimits(self._info.vocab_size, self._info.max_model_len)
        self.num_step_failures = 0  # cumulative
        self.num_queue_timeouts = 0
        self._heartbeat = time.monotonic()
        # One thread: HF tokenizers are not safe to call concurrently, and one thread
        # bounds the CPU that tokenization takes from the step loop.
        self._prep = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="orthrus-tokenize")
        self._thread = threading.Thread(target=self._loop, name="orthrus-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs, stat_logger: Optional[StatLogger] = None,
                  **kwargs: Any) -> "AsyncOrthrusEngine":
        return cls(build_engine(args, stat_logger=stat_logger), **kwargs)

    # -- public API ---------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def heartbeat_age_s(self) -> float:
        return max(0.0, time.monotonic() - self._heartbeat)

    def is_alive(self) -> bool:
        return (self._thread.is_alive() and self._error is None and not self._stop.is_set()
                and self.heartbeat_age_s() < self.stall_timeout_s)

    def health(self) -> dict[str, Any]:
        """Liveness from the loop's heartbeat: answered at once, whatever the load."""
        return {"alive": self.is_alive(), "heartbeat_age_s": self.heartbeat_age_s(),
                "draining": self._draining, "num_requests": len(self._streams),
                "kernel_compiles_after_ready": self.engine.num_compiles_after_ready}

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._stats
        s.loop_alive = self.is_alive()
        return s

    def validate(self, req: GenerateRequest) -> list[int]:
        return self.engine.validate(req)

    async def tokenize(self, req: GenerateRequest) -> list[int]:
        """The prompt ids `req` would be served with (its chat template applied), on the
        tokenizer thread; InvalidRequestError for a bad input."""
        if not isinstance(req, GenerateRequest):
            raise InvalidRequestError("the request must be a GenerateRequest")
        check_request(req, self._limits)
        return await asyncio.get_running_loop().run_in_executor(self._prep, self.engine.tokenize, req)

    async def detokenize(self, ids: list[int]) -> str:
        """The text of token ids, on the tokenizer thread; InvalidRequestError for bad ids."""
        return await asyncio.get_running_loop().run_in_executor(self._prep, self.engine.detokenize, ids)

    async def submit(self, req: GenerateRequest) -> RequestStream:
        """Check and tokenize req (in the worker thread) and queue it; returns its stream.

        Raises InvalidRequestError (bad input), RequestRefusedError (draining) or
        EngineDeadError, all before anything is queued."""
        if not self.is_alive():
            raise EngineDeadError("the engine loop is not running")
        if self._draining:
            raise RequestRefusedError("the server is shutting down", "shutting_down")
        if not isinstance(req, GenerateRequest):
            raise InvalidRequestError("the request must be a GenerateRequest")
        check_request(req, self._limits)  # cheap checks first, on the caller's loop
        rid = req.request_id or f"req-{uuid.uuid4().hex}"
        req.request_id = None  # uniqueness is checked here, against live streams
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._prep, self.engine.validate, req)
        box = _Mailbox(loop)
        with self._lock:
            if rid in self._streams:
                raise InvalidRequestError(f"request_id {rid!r} is already in use", param="request_id")
            if self._draining:
                raise RequestRefusedError("the server is shutting down", "shutting_down")
            self._streams[rid] = box
        req.request_id = rid
        self._cmds.put(("add", req, ids, time.monotonic()))
        self._wake.set()
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
        self._cmds.put(("abort", request_id))
        self._wake.set()

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
            self._cmds.put(("end_all",))
            self._wake.set()
            t_end = time.monotonic() + end_wait_s
            while self._streams and time.monotonic() < t_end and self.is_alive():
                await asyncio.sleep(0.02)
        return n

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """From outside the callers' loops: let in-flight requests finish for up to
        drain_timeout_s, end the rest (RequestRefusedError), stop the loop."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self.is_alive() and self._streams:
            time.sleep(0.05)
        self._cmds.put(("end_all",))
        self._wake.set()
        # Give the loop a moment to deliver the final items before it stops.
        t_end = time.monotonic() + 5.0
        while time.monotonic() < t_end and self.is_alive() and self._streams:
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        self._prep.shutdown(wait=False, cancel_futures=True)

    # -- stream bookkeeping (callers' side) ---------------------------------------------
    def _release(self, rid: str) -> None:
        with self._lock:
            self._streams.pop(rid, None)

    def _cancel(self, rid: str) -> None:
        self._release(rid)
        self._cmds.put(("abort", rid))
        self._wake.set()

    # -- the loop thread ----------------------------------------------------------------
    def _send(self, rid: str, item: Any) -> None:
        with self._lock:
            box = self._streams.get(rid)
        if box is not None:
            try:
                box.loop.call_soon_threadsafe(box.queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _deliver(self, d: GenerateDelta) -> None:
        if d.finish_reason == "error" and d.error is None:
            d.error = error_message(d.request_id)
        self._send(d.request_id, d)

    def _add(self, req: GenerateRequest, ids: list[int], arrival: float) -> None:
        rid = req.request_id
        with self._lock:
            live = rid in self._streams
        if not live:
            return  # cancelled while queued
        try:
            self.engine.add_request(req, prompt_ids=ids, arrival_time=arrival)
        except Exception:
            log.exception("request %s failed on admission; ending it alone", rid)
            d = self.engine.fail(rid) or GenerateDelta(rid, finished=True, finish_reason="error",
                                                       usage=Usage(len(ids), 0))
            self._publish_stats()
            self._deliver(d)

    def _end(self, rids: list[str], error: BaseException) -> None:
        """Abort rids in the engine and hand their callers `error` instead of a final delta."""
        for rid in rids:
            self.engine.abort(rid)
        self._publish_stats()
        for rid in rids:
            self._send(rid, error)

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                self._add(*cmd[1:])
            elif cmd[0] == "abort":
                d = self.engine.abort(cmd[1])
                self._publish_stats()
                if d is not None:
                    self._deliver(d)
            elif cmd[0] == "end_all":
                self._end(list(self.engine.seqs), RequestRefusedError("the server is shutting down", "shutting_down"))

    def _expire_waiting(self, now: float) -> None:
        """Refuse requests that have waited past queue_timeout_s without being scheduled
        (a preempted request was scheduled once and keeps its place)."""
        limit = self.queue_timeout_s
        expired = [s.request_id for s in self.engine.scheduler.waiting
                   if s.first_scheduled_time is None and now - s.arrival_time > limit]
        if expired:
            self.num_queue_timeouts += len(expired)
            self._end(expired, RequestRefusedError(
                f"the request waited more than {limit:g}s in the engine's queue", "queue_timeout"))

    def _fail_step(self) -> None:
        """A step raised: end the requests it ran (their state may be half-updated), keep
        the waiting ones."""
        rids = [s.request_id for s in self.engine.scheduler.running]
        log.exception("engine step failed (%d in a row); ending its %d request(s): %s",
                      self._failures_in_row, len(rids), ", ".join(rids))
        deltas = [d for d in map(self.engine.fail, rids) if d is not None]
        self._publish_stats()
        for d in deltas:
            self._deliver(d)

    def _loop(self) -> None:
        self._failures_in_row = 0
        next_expiry = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self._heartbeat = now
                self._run_commands()
                if self.queue_timeout_s is not None and now >= next_expiry:
                    self._expire_waiting(now)
                    next_expiry = now + min(0.1, self.queue_timeout_s / 4)
                if not self.engine.has_work():
                    self._publish_stats()
                    self._wake.wait(timeout=_IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                try:
                    deltas = self.engine.step()
                except Exception:
                    self._failures_in_row += 1
                    self.num_step_failures += 1
                    if self._failures_in_row >= self.max_step_failures:
                        raise
                    self._fail_step()
                    continue
                self._failures_in_row = 0
                # Publish first, so that a caller who sees its final delta also sees its blocks freed.
                self._publish_stats()
                for d in deltas:
                    self._deliver(d)
        except BaseException as e:  # noqa: BLE001 - the loop must report any death to its callers
            log.exception("orthrus engine loop died")
            self._error = e
            err = EngineDeadError("the engine loop died")
            with self._lock:
                rids = list(self._streams)
            for rid in rids:
                self._send(rid, err)
            self._publish_stats()

    def _publish_stats(self) -> None:
        s = self.engine.stats()
        with self._lock:
            self._stats = s
