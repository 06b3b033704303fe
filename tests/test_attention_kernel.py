"""The Triton paged-attention kernel against the torch reference, with and without
split-KV (the prefix spread over several programs and merged by the last one to finish).

On the GPU: float32 and bf16, and the split kernel inside a CUDA graph replayed with other
prefix lengths (its counters must be back at zero after every call). Without a GPU the
same checks run in Triton's interpreter (tests/conftest.py), float32 only: it has no bf16.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from orthrus_runtime.worker.fast_forward import TorchOps

HAS_CUDA = torch.cuda.is_available()
RUNS = importlib.util.find_spec("triton") is not None and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
pytestmark = pytest.mark.skipif(not RUNS, reason="needs triton (compiled on a GPU, or its interpreter)")
DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])


def _case(H, HKV, D, T, starts, nvalid, dtype, page=16, W=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    bs = len(starts)
    nblocks = bs * W + 8
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEV)  # noqa: E731
    kc, vc = r(nblocks, page, HKV, D), r(nblocks, page, HKV, D)
    q, kb = r(bs * T, H, D), r(bs * T, HKV, D)
    vb = r(bs * T, (H + 2 * HKV) * D)[:, (H + HKV) * D:].view(bs * T, HKV, D)  # strided, as in the fast path
    # Scattered blocks, and the table transposed out of a [rows, batch] buffer, as the CUDA graphs hold it.
    bt = torch.randperm(nblocks, generator=g)[: bs * W].view(W, bs).to(torch.int32).to(DEV).t()
    st = torch.tensor(starts, dtype=torch.int32, device=DEV)
    nv = torch.tensor(nvalid, dtype=torch.int32, device=DEV)
    return q, kb, vb, kc, vc, bt, st, nv


def _check(got, want, T, nvalid, tol):
    assert torch.isfinite(got).all()
    for b, n in enumerate(nvalid):
        if n:
            err = (got[b * T: b * T + n].float() - want[b * T: b * T + n]).abs().max().item()
            assert err < tol, f"sequence {b}: max |kernel - reference| = {err}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,causal", [(1, True), (5, True), (5, False)])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_paged_attention_matches_the_reference(dtype, T, causal, splits):
    """Prefixes from none to several split chunks (256 keys each at least): one chunk only
    (no merge), uneven chunks, more splits than chunks; padding rows and a padding sequence."""
    from orthrus_runtime.worker import triton_kernels as tk

    H, HKV, D = 6, 2, 32
    starts, nvalid = [0, 40, 700, 257, 760, 0], [T, T, max(1, T - 2), 1, T, 0]
    args = _case(H, HKV, D, T, starts, nvalid, dtype)
    want = TorchOps().attention(*[a.float() if a.is_floating_point() else a for a in args], T, D ** -0.5, causal)
    got = tk.paged_attention(*args, T, D ** -0.5, causal, splits=splits)
    _check(got, want, T, nvalid, 1e-5 if dtype == torch.float32 else 3e-2)
    assert not tk._locks or all(int(x.abs().sum()) == 0 for x in tk._locks.values()), "counters left set"


def test_split_count_follows_the_grid():
    from orthrus_runtime.worker import triton_kernels as tk

    cuda = torch.device("cuda", 0)
    tk._sm_count[0] = 132
    assert tk.num_splits(1, 8, 1, 8192, cuda) == 32  # an 8B-shape batch-1 step: 8 programs
    assert tk.num_splits(1, 8, 2, 8192, cuda) == 16
    assert tk.num_splits(16, 8, 1, 8192, cuda) == 2
    assert tk.num_splits(32, 8, 1, 8192, cuda) == 1  # 256 programs fill the GPU already
    assert tk.num_splits(1, 8, 1, 300, cuda) == 1  # the table cannot reach two chunks
    assert tk.num_splits(1, 8, 1, 1024, cuda) == 4
    assert tk.num_splits(1, 8, 1, 8192, torch.device("cpu")) == 1


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_split_attention_replays_in_a_cuda_graph():
    """Captured once with short prefixes, replayed with long, short and long ones again: each
    replay matches the reference (a counter left non-zero would stop the merge)."""
    from orthrus_runtime.worker import triton_kernels as tk

    H, HKV, D, T = 32, 8, 128, 4
    base = _case(H, HKV, D, T, [10, 10], [T, T], torch.bfloat16, W=64)
    q, kb, vb, kc, vc, bt, st, nv = base
    assert tk.num_splits(2, HKV, 1, bt.shape[1] * 16, q.device) > 1
    tk.paged_attention(q, kb, vb, kc, vc, bt, st, nv, T, D ** -0.5, True)  # compiles, allocates the counters
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tk.paged_attention(q, kb, vb, kc, vc, bt, st, nv, T, D ** -0.5, True)
    f = [x.float() for x in (q, kb, vb, kc, vc)]
    for starts in ([1000, 3], [17, 900], [1023 - T, 600], [0, 0], [512, 513]):
        st.copy_(torch.tensor(starts, dtype=torch.int32))
        g.replay()
        want = TorchOps().attention(*f, bt, st, nv, T, D ** -0.5, True)
        _check(out, want, T, [T, T], 3e-2)
