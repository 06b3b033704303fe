"""The engine core process: `python -m orthrus_runtime.engine.core_process FD`.

Started by core_client.ProcessCore, talking over the socket FD (pickled messages): it
receives (EngineArgs, loop policy), builds and warms up the engine, answers ("ready",
ModelInfo, tokenizer, seconds per start-up phase) or ("failed", traceback), then runs EngineCore's loop until told to
stop or until its parent goes away.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection


def _exit_with_parent(parent: int) -> None:
    """A parent killed outright (SIGKILL) closes the socket, which the loop sees at its next
    command poll; a loop stuck inside a step would not: re-parenting tells."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)
    threading.Thread(target=watch, name="orthrus-core-parent-watch", daemon=True).start()


def main(fd: int) -> int:
    t_start = time.monotonic()
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s orthrus-core[%(process)d] %(levelname)s %(name)s: %(message)s")
    _exit_with_parent(os.getppid())
    conn = Connection(fd)
    args, policy = conn.recv()
    from orthrus_runtime.engine.core import EngineCore, RecordBuffer
    from orthrus_runtime.engine.setup import build_engine

    t_imports = time.monotonic()
    records = RecordBuffer()
    try:
        engine = build_engine(args, stat_logger=records)
        startup = {"process_imports": round(t_imports - t_start, 2), **engine.startup_s}
        conn.send(("ready", engine.model_info(), engine.tokenizer, startup))
    except BaseException:  # noqa: BLE001 - the parent shows it
        conn.send(("failed", traceback.format_exc()))
        return 1

    def recv(timeout: float) -> list[tuple]:
        try:
            if not conn.poll(timeout):
                return []
            cmds = [conn.recv()]
            while conn.poll(0):
                cmds.append(conn.recv())
            return cmds
        except (EOFError, OSError):  # the parent is gone
            return [("stop",)]

    def send(out) -> None:
        try:
            conn.send(out)
        except (OSError, ValueError):
            pass  # the parent is gone: the next poll says so

    EngineCore(engine, records=records, **policy).run(recv, send)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
