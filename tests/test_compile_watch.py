"""worker/compile_watch.py: the process's count of Triton specialisations (Triton calls the
hook on every one), the cache directory, and an engine's "after ready" mark. The GPU check that
nothing compiles after warm-up is tests/test_compiles.py."""
from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402

from orthrus_runtime.worker import compile_watch as cw  # noqa: E402


def test_the_hook_counts_and_keeps_a_hook_installed_before(monkeypatch):
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(kw["repr"]))
    c = cw.KernelCompiles()
    assert c.install() and c.install()  # once
    mark = c.count
    # What Triton's JITFunction._call_hook passes after building a specialisation.
    knobs.runtime.jit_post_compile_hook(key=("k",), repr="_attn_kernel[num_warps=4](Q: *fp32)", fn=None,
                                        compile={}, is_manual_warmup=False, already_compiled=False)
    assert c.count == mark + 1 and c.since(mark) == ["_attn_kernel[num_warps=4](Q: *fp32) key=('k',)"]
    assert seen == ["_attn_kernel[num_warps=4](Q: *fp32)"]


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setattr(knobs.cache, "dir", knobs.cache.dir)
    d = tmp_path / "kernels" / "triton"
    assert cw.use_cache_dir(str(d)) == str(d) and d.is_dir()
    assert os.environ["TRITON_CACHE_DIR"] == str(d) and knobs.cache.dir == str(d)
    assert cw.use_cache_dir(None) == str(d)  # None leaves it


def test_engine_counts_from_its_ready_mark(tmp_path, monkeypatch):
    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.engine.setup import build_engine
    from orthrus_runtime.model.testing import tiny_checkpoint

    monkeypatch.setenv("TRITON_CACHE_DIR", os.environ.get("TRITON_CACHE_DIR", str(tmp_path / "c")))
    monkeypatch.setattr(knobs.cache, "dir", knobs.cache.dir)  # both restored afterwards
    eng = build_engine(EngineArgs(model=str(tiny_checkpoint(tmp_path / "m")), device="cpu", dtype="float32",
                                  max_model_len=256, compile_cache_dir=str(tmp_path / "cache")))
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache")
    assert eng.stats().num_kernel_compiles_after_ready == 0
    knobs.runtime.jit_post_compile_hook(key=("k",), repr="late_kernel")  # one built after ready
    st = eng.stats()
    assert st.num_kernel_compiles_after_ready == 1 and eng.compiles_after_ready() == ["late_kernel key=('k',)"]
    assert st.num_kernel_compiles >= 1
    eng.mark_ready()
    assert eng.stats().num_kernel_compiles_after_ready == 0
