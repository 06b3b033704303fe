"""AsyncOrthrusEngine: the engine behind an async-generator interface.

The step loop runs in its own thread and is the only code that touches the
LLMEngine; callers talk to it through a command queue, and deltas travel back to
each caller's own asyncio loop with call_soon_threadsafe. So `generate`,
`abort` and `stats` are safe from any event loop (a Ray Serve replica's, a
FastAPI app's, a test's).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import Any, AsyncIterator, Optional


from orthrus_runtime.engine.llm_engine import LLMEngine
from orthrus_runtime.engine.args import EngineArgs
from orthrus_runtime.engine.setup import build_engine
from orthrus_runtime.types import (
    EngineDeadError,
    EngineStats,
    GenerateDelta,
    GenerateRequest,
    InvalidRequestError,
    ModelInfo,
    StatLogger,
)

log = logging.getLogger(__name__)
class _Stream:
    __slots__ = ("loop", "queue", "finished")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False


class AsyncOrthrusEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._cmds: "queue.Queue[tuple]" = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._stats = engine.stats()
        self._info = engine.model_info()
        self._thread = threading.Thread(target=self._loop, name="orthrus-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs, stat_logger: Optional[StatLogger] = None) -> "AsyncOrthrusEngine":
        return cls(build_engine(args, stat_logger=stat_logger))

    # -- public API ---------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stop.is_set()

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._stats
        s.loop_alive = self.is_alive()
        return s

    def validate(self, req: GenerateRequest) -> list[int]:
        return self.engine.validate(req)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        if not self.is_alive():
            raise EngineDeadError(f"the engine loop is not running ({self._error!r})")
        if req.request_id is not None and not isinstance(req.request_id, str):
            raise InvalidRequestError("request_id must be a string")
        rid = req.request_id or f"req-{uuid.uuid4().hex}"
        req.request_id = None  # uniqueness is checked here, against live streams
        ids = self.engine.validate(req)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if rid in self._streams:
                raise InvalidRequestError(f"request_id {rid!r} is already in use")
            self._streams[rid] = stream
        req.request_id = rid
        self._cmds.put(("add", req, ids, time.monotonic()))
        self._wake.set()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
                if item.finished:
                    return
        finally:
            # Closed or cancelled before the end (client left): abort, returning its KV blocks.
            if not stream.finished:
                self._cmds.put(("abort", rid))
                self._wake.set()
            with self._lock:
                self._streams.pop(rid, None)

    async def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))
        self._wake.set()

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Let in-flight requests finish for up to drain_timeout_s, abort the rest, stop the loop."""
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self.is_alive():
            with self._lock:
                if not self._streams:
                    break
            time.sleep(0.05)
        self._cmds.put(("abort_all",))
        self._wake.set()
        # Give the loop a moment to deliver the abort deltas before it stops.
        t_end = time.monotonic() + 5.0
        while time.monotonic() < t_end and self.is_alive():
            with self._lock:
                if not self._streams:
                    break
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    # -- the loop thread ----------------------------------------------------------------
    def _deliver(self, d: GenerateDelta) -> None:
        with self._lock:
            st = self._streams.get(d.request_id)
        if st is not None:
            try:
                st.loop.call_soon_threadsafe(st.queue.put_nowait, d)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, req, ids, arrival = cmd
                with self._lock:
                    live = req.request_id in self._streams
                if live:
                    self.engine.add_request(req, prompt_ids=ids, arrival_time=arrival)
            elif cmd[0] in ("abort", "abort_all"):
                rids = [cmd[1]] if cmd[0] == "abort" else list(self.engine.seqs)
                deltas = [d for d in map(self.engine.abort, rids) if d is not None]
                self._publish_stats()
                for d in deltas:
                    self._deliver(d)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands()
                if not self.engine.has_work():
                    self._publish_stats()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                deltas = self.engine.step()
                # Publish first, so that a caller who sees its final delta also sees its blocks freed.
                self._publish_stats()
                for d in deltas:
                    self._deliver(d)
        except BaseException as e:  # noqa: BLE001 - the loop must report any death to its callers
            log.exception("orthrus engine loop died")
            self._error = e
            err = EngineDeadError(f"the engine loop died: {e!r}")
            with self._lock:
                streams = list(self._streams.values())
            for st in streams:
                try:
                    st.loop.call_soon_threadsafe(st.queue.put_nowait, err)
                except RuntimeError:
                    pass
            self._publish_stats()

    def _publish_stats(self) -> None:
        s = self.engine.stats()
        with self._lock:
            self._stats = s
