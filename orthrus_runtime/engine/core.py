"""EngineCore: the step loop around an LLMEngine, fed by commands, answering with one
CoreOutputs message per iteration.

The same loop runs in a thread of the caller's process (core_client.InprocCore: tests,
embedding) or in a process of its own (core_client.ProcessCore: a Serve replica), where no
asyncio loop, detokenizer or Ray stream competes with it for the interpreter. It knows
nothing about streams, text or event loops: requests in, token deltas out. Everything that
ends requests for reasons other than their own output happens here, in one place:

  * admission failure: the request ends alone with finish_reason "error";
  * a step that raises ends the requests it ran ("error") and the loop goes on; only
    max_step_failures failed steps in a row (a broken device, say) end the loop, which
    then reports itself dead (CoreOutputs.dead) so that the replica turns unhealthy;
  * queue_timeout_s: a request still waiting for its first schedule after that long is
    ended with RequestRefusedError("queue_timeout");
  * end_all (shutdown): every request ends with RequestRefusedError("shutting_down").

Commands (plain tuples, picklable):
  ("add", request, prompt_ids, arrival_time)   ("abort", request_id)
  ("finish", request_id, reason, num_tokens)   the front's output processor ended it
  ("stats", token)                             answered in CoreOutputs.stats
  ("end_all",)                                 ("stop",)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from orthrus_runtime.types import (
    EngineStats,
    GenerateDelta,
    RequestRecord,
    RequestRefusedError,
    StatLogger,
    StepRecord,
    Usage,
)

if TYPE_CHECKING:  # the loop only calls its engine: the replica's front, which imports this module
    # for CoreOutputs, must not import torch (a second copy beside the core process's)
    from orthrus_runtime.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

# An idle loop waits at most this long for a command, and still sends a message that long
# apart: the front reads the age of the last message as the loop's heartbeat.
IDLE_WAIT_S = 0.5


@dataclass
class CoreOutputs:
    """What one loop iteration produced, for every request at once."""

    deltas: list[GenerateDelta] = field(default_factory=list)
    # Requests ended with an error instead of a final delta (their blocks already freed).
    ended: list[tuple[str, BaseException]] = field(default_factory=list)
    # The engine's statistics records, for the front's stat logger (ProcessCore only).
    steps: list[StepRecord] = field(default_factory=list)
    finished: list[RequestRecord] = field(default_factory=list)
    stats: list[tuple[int, EngineStats]] = field(default_factory=list)  # answers to ("stats", token)
    compiles_after_ready: int = 0
    dead: Optional[str] = None  # the loop ended on an error: what it was

    @property
    def empty(self) -> bool:
        return not (self.deltas or self.ended or self.steps or self.finished or self.stats or self.dead)


class RecordBuffer(StatLogger):
    """A stat logger that keeps the engine's records for the next CoreOutputs (the real
    logger lives in the front's process)."""

    def __init__(self):
        self.steps: list[StepRecord] = []
        self.finished: list[RequestRecord] = []

    def on_step(self, record: StepRecord) -> None:
        self.steps.append(record)

    def on_request_finished(self, record: RequestRecord) -> None:
        self.finished.append(record)

    def drain_into(self, out: CoreOutputs) -> None:
        out.steps, self.steps = self.steps, []
        out.finished, self.finished = self.finished, []


class EngineCore:
    def __init__(self, engine: LLMEngine, *, queue_timeout_s: Optional[float] = None,
                 max_step_failures: int = 3, records: Optional[RecordBuffer] = None):
        """records: the engine's stat logger when it is a RecordBuffer, drained into every
        message; None: the engine reports to its own logger."""
        self.engine = engine
        self.queue_timeout_s = queue_timeout_s
        self.max_step_failures = max_step_failures
        self.records = records
        self.num_step_failures = 0  # cumulative
        self.num_queue_timeouts = 0

    def run(self, recv: Callable[[float], list[tuple]], send: Callable[[CoreOutputs], None]) -> None:
        """Loop until a ("stop",) command: recv(timeout) returns the commands that came (waiting
        at most timeout for the first); send gets one CoreOutputs per iteration that produced
        anything, and one at least every IDLE_WAIT_S. A loop that dies sends its reason."""
        failures_in_row, next_expiry, last_send = 0, 0.0, 0.0
        out = CoreOutputs()
        try:
            while True:
                busy = self.engine.has_work()
                for cmd in recv(0.0 if busy else IDLE_WAIT_S):
                    if cmd[0] == "stop":
                        send(out)  # what the commands before it produced (end_all's refusals)
                        return
                    self._handle(cmd, out)
                now = time.monotonic()
                if self.queue_timeout_s is not None and now >= next_expiry:
                    self._expire_waiting(now, out)
                    next_expiry = now + min(0.1, self.queue_timeout_s / 4)
                if self.engine.has_work():
                    try:
                        out.deltas += self.engine.step()
                        failures_in_row = 0
                    except Exception:
                        failures_in_row += 1
                        self.num_step_failures += 1
                        if failures_in_row >= self.max_step_failures:
                            raise
                        self._fail_step(failures_in_row, out)
                if self.records is not None:
                    self.records.drain_into(out)
                if not out.empty or now - last_send >= IDLE_WAIT_S:
                    out.compiles_after_ready = self.engine.num_compiles_after_ready
                    send(out)
                    out, last_send = CoreOutputs(), now
        except BaseException as e:  # noqa: BLE001 - the front must hear of any death
            log.exception("orthrus engine loop died")
            out.dead = f"{type(e).__name__}: {e}"
            try:
                send(out)
            except Exception:  # noqa: BLE001 - nobody left to tell
                pass

    # -- commands ---------------------------------------------------------------------------
    def _handle(self, cmd: tuple, out: CoreOutputs) -> None:
        kind = cmd[0]
        eng = self.engine
        if kind == "add":
            self._add(*cmd[1:], out=out)
        elif kind == "abort":
            self._put(eng.abort(cmd[1]), out)
        elif kind == "finish":
            self._put(eng.finish(*cmd[1:]), out)
        elif kind == "stats":
            out.stats.append((cmd[1], self.stats()))
        elif kind == "end_all":
            self._end(list(eng.seqs), RequestRefusedError("the server is shutting down", "shutting_down"), out)
        else:
            raise ValueError(f"unknown engine command {kind!r}")

    def stats(self) -> EngineStats:
        s = self.engine.stats()
        s.num_step_failures = self.num_step_failures
        s.num_queue_timeouts = self.num_queue_timeouts
        return s

    @staticmethod
    def _put(d: Optional[GenerateDelta], out: CoreOutputs) -> None:
        if d is not None:
            out.deltas.append(d)

    def _add(self, req, ids: list[int], arrival: float, out: CoreOutputs) -> None:
        rid = req.request_id
        try:
            self.engine.add_request(req, prompt_ids=ids, arrival_time=arrival)
        except Exception:
            log.exception("request %s failed on admission; ending it alone", rid)
            self._put(self.engine.fail(rid) or GenerateDelta(rid, finished=True, finish_reason="error",
                                                             usage=Usage(len(ids), 0)), out)

    def _end(self, rids: list[str], error: BaseException, out: CoreOutputs) -> None:
        """Abort rids in the engine; their callers get `error` instead of a final delta."""
        for rid in rids:
            self.engine.abort(rid)
            out.ended.append((rid, error))

    def _expire_waiting(self, now: float, out: CoreOutputs) -> None:
        """Refuse requests that waited past queue_timeout_s without being scheduled (a
        preempted request was scheduled once and keeps its place)."""
        limit = self.queue_timeout_s
        expired = [s.request_id for s in self.engine.scheduler.waiting
                   if s.first_scheduled_time is None and now - s.arrival_time > limit]
        if expired:
            self.num_queue_timeouts += len(expired)
            self._end(expired, RequestRefusedError(
                f"the request waited more than {limit:g}s in the engine's queue", "queue_timeout"), out)

    def _fail_step(self, in_row: int, out: CoreOutputs) -> None:
        """A step raised: end the requests it ran (their state may be half-updated), keep the
        waiting ones."""
        rids = [s.request_id for s in self.engine.scheduler.running]
        log.exception("engine step failed (%d in a row); ending its %d request(s): %s",
                      in_row, len(rids), ", ".join(rids))
        for rid in rids:
            self._put(self.engine.fail(rid), out)
