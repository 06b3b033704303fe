"""Process and port helpers for the tests: whether a process still runs (the tests that check
nothing is left behind), and ports for servers that start later."""
from __future__ import annotations

import random
import socket


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie does not: it has exited and
    only waits for its parent to collect its status)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now, for a server that binds it later: drawn below the kernel's ephemeral
    range, where the ports the OS hands out meanwhile cannot land (Ray starts dozens of processes
    between the choice and the bind, each binding ports of its own; a port the OS chose for us
    once collided with one of theirs)."""
    hi = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(20000, hi) if hi > 21000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port below the ephemeral range")
