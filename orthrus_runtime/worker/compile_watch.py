"""Counting Triton kernel compilations in this process, so that "nothing compiles after
ready" is a number (EngineStats.num_kernel_compiles_after_ready, the metric
orthrus_kernel_compiles_after_ready, tests/test_compiles.py) rather than a guess.

The rule: every call that makes a Triton JIT function build a new specialisation (a new
argument-type, divisibility or constexpr combination) runs Triton's post-compile hook, whether
the binary then comes from the on-disk cache or the compiler. Each such event stalls the step
that meets it (compiling: seconds; loading from a warm cache: milliseconds), so after warm-up
there should be none. Where Triton is absent (or in its CPU interpreter) nothing compiles and
the count stays 0.

Triton's cache directory (where compiled binaries persist across restarts) is TRITON_CACHE_DIR;
`use_cache_dir` sets it before the first compile (EngineArgs.compile_cache_dir, the Helm value
engine.compileCacheDir with its volume).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional


class KernelCompiles:
    """The process's count of Triton specialisations built, with their descriptions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.kernels: list[str] = []  # Triton's description of each, in order (kernel, options, types)
        self.installed = False

    def record(self, description: str) -> None:
        with self._lock:
            self.count += 1
            self.kernels.append(description)

    def since(self, mark: int) -> list[str]:
        """The descriptions of what compiled after `count` was `mark`."""
        with self._lock:
            return list(self.kernels[mark:])

    def install(self) -> bool:
        """Chain a post-compile hook into Triton (once); False where Triton has no hook API."""
        if self.installed:
            return True
        try:
            from triton import knobs
        except Exception:  # noqa: BLE001 - no Triton, or one too old for knobs: nothing to count
            return False
        prev = knobs.runtime.jit_post_compile_hook

        def hook(*args: Any, **kwargs: Any) -> Any:
            # repr names the kernel and its options; key is the whole specialisation (argument
            # types, value classes, constexprs): what tells two builds of one kernel apart.
            self.record(f"{kwargs.get('repr') or '?'} key={kwargs.get('key')}")
            return prev(*args, **kwargs) if prev is not None else None

        knobs.runtime.jit_post_compile_hook = hook
        self.installed = True
        return True


_COMPILES = KernelCompiles()


def kernel_compiles() -> KernelCompiles:
    """The process-wide counter, its hook installed."""
    _COMPILES.install()
    return _COMPILES


def use_cache_dir(path: Optional[str]) -> Optional[str]:
    """Make `path` Triton's cache directory (created if needed) for this process and the ones it
    starts; None leaves TRITON_CACHE_DIR (or Triton's default, ~/.triton/cache) as it is.
    Returns the directory in use."""
    if path:
        p = Path(path).expanduser()
        p.mkdir(parents=True, exist_ok=True)
        os.environ["TRITON_CACHE_DIR"] = str(p)
        try:
            from triton import knobs

            knobs.cache.dir = str(p)
        except Exception:  # noqa: BLE001 - the environment variable alone serves older Triton
            pass
    return os.environ.get("TRITON_CACHE_DIR") or str(Path("~/.triton/cache").expanduser())
