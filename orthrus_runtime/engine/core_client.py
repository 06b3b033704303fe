"""Where the engine core's loop runs, behind one small interface (the async front's only
view of it):

  put(cmd)        queue a command (engine/core.py lists them); any thread
  recv()          the next CoreOutputs, blocking; None once the loop has ended
  info, tokenizer the model's facts and tokenizer, for the front's input/output processing
  close(timeout)  stop the loop; nothing of it is left afterwards

InprocCore runs EngineCore.run in a thread of this process (tests, embedding; the engine
object is the caller's). ProcessCore runs it in a child process that builds the engine from
EngineArgs (core_process.py): a Serve replica's choice, so that the step loop has an
interpreter to itself. The child uses the replica's GPU (it inherits CUDA_VISIBLE_DEVICES),
exits when its parent goes (the socket closes, or it is re-parented), and is killed if it
does not stop within close's timeout: no orphaned process or GPU memory.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any, Optional

from orthrus_runtime.engine.args import EngineArgs
from orthrus_runtime.engine.core import CoreOutputs, EngineCore
from orthrus_runtime.types import ModelInfo

log = logging.getLogger(__name__)


class CoreStartError(RuntimeError):
    """The engine core process could not build its engine (the message has its traceback)."""


class InprocCore:
    def __init__(self, engine, **policy: Any):
        from orthrus_runtime.engine.llm_engine import LLMEngine

        if not isinstance(engine, LLMEngine):
            raise TypeError("InprocCore needs an LLMEngine")
        self.engine = engine
        self.info: ModelInfo = engine.model_info()
        self.tokenizer = engine.tokenizer
        self.startup_s = dict(engine.startup_s)
        self.core = EngineCore(engine, **policy)
        self._cmds: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._outs: "queue.SimpleQueue[Optional[CoreOutputs]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="orthrus-engine-core", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.core.run(self._recv_cmds, self._outs.put)
        finally:
            self._outs.put(None)

    def _recv_cmds(self, timeout: float) -> list[tuple]:
        try:
            cmds = [self._cmds.get(timeout=timeout) if timeout > 0 else self._cmds.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                cmds.append(self._cmds.get_nowait())
            except queue.Empty:
                return cmds

    def put(self, cmd: tuple) -> None:
        self._cmds.put(cmd)

    def recv(self) -> Optional[CoreOutputs]:
        return self._outs.get()

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = 10.0) -> None:
        self._cmds.put(("stop",))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout_s)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class ProcessCore:
    def __init__(self, args: EngineArgs, *, start_timeout_s: float = 1800.0, **policy: Any):
        """Start the core process and wait until its engine is built and warmed up (the
        replica is not ready before). CoreStartError when it cannot build the engine."""
        t_spawn = time.monotonic()
        mine, theirs = socket.socketpair()
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orthrus_runtime.engine.core_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),))
        self.pid = self.proc.pid
        self._finalizer = weakref.finalize(self, _kill, self.proc)
        self._conn = Connection(mine.detach())
        self._closed = False
        try:
            self._conn.send((args, policy))
            if not self._conn.poll(start_timeout_s):
                raise CoreStartError(f"the engine core process did not start within {start_timeout_s:g}s")
            msg = self._conn.recv()
        except (EOFError, OSError) as e:
            self._finalizer()
            raise CoreStartError(f"the engine core process exited while starting (code {self.proc.poll()})") from e
        except BaseException:
            self._finalizer()
            raise
        if msg[0] != "ready":
            self._finalizer()
            raise CoreStartError(f"the engine core process could not build the engine:\n{msg[1]}")
        _, self.info, self.tokenizer, startup = msg
        # Seconds per phase: the child's imports, then build_engine's (setup.py).
        self.startup_s = {**startup, "process_start_to_ready": round(time.monotonic() - t_spawn, 2)}
        # Commands leave through one sender thread: `put` never blocks its caller (an event
        # loop) on a full socket while the core is inside a step, and the output thread, which
        # sends "finish" commands, keeps reading the core's messages whatever the socket holds.
        self._outbox: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="orthrus-core-commands", daemon=True)
        self._sender.start()
        log.info("engine core process %d ready", self.pid)

    def _send_loop(self) -> None:
        while (cmd := self._outbox.get()) is not None:
            try:
                self._conn.send(cmd)
            except (OSError, ValueError):  # the process is gone: recv reports it
                return

    def put(self, cmd: tuple) -> None:
        self._outbox.put(cmd)

    def recv(self) -> Optional[CoreOutputs]:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            return None

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.put(("stop",))
        self._outbox.put(None)
        self._sender.join(timeout=timeout_s)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("engine core process %d did not stop in %gs: killing it", self.pid, timeout_s)
        self._finalizer()
        self._conn.close()
