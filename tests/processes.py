"""Whether a process still runs, for the tests that check nothing is left behind."""
from __future__ import annotations


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie does not: it has exited and
    only waits for its parent to collect its status)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
