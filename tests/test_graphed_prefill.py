"""On a GPU: a short AR pass (a prefill chunk, or several sequences' at once) replays the verify
CUDA graphs captured at warm-up, chunk by chunk (ModelRunner.prefill_graph_lengths), instead
of one eager pass. It must compute what the eager pass computes: the logits at every row, the
K/V it leaves for later passes, and so the engine's output token for token (float32).
Skipped without CUDA."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.engine.setup import build_engine
    from orthrus_runtime.model.testing import tiny_checkpoint

    tmp = tmp_path_factory.mktemp("graphed-prefill")
    return build_engine(EngineArgs(model=str(tiny_checkpoint(tmp / "m", block_size=8)), device="cuda",
                                   dtype="float32", max_num_seqs=16, max_model_len=1024,
                                   kv_cache_bytes=256 * 2**20, verify_policy="adaptive"))


def _tables(bs: int, n: int, page: int, first: int) -> list[list[int]]:
    nb = -(-n // page)
    return [list(range(first + i * nb, first + (i + 1) * nb)) for i in range(bs)]


@pytest.mark.parametrize("bs,T", [(1, 5), (1, 64), (1, 65), (1, 300), (1, 1000), (3, 17), (3, 200), (16, 64),
                                  (16, 40), (5, 150)])
def test_graphed_pass_equals_eager(engine, bs, T):
    """Fresh sequences, ragged lengths, a prefix chunk then a continuation: logits at every row
    and at the last rows, asked out of order; the continuation reads the K/V each path wrote."""
    runner = engine.runner
    assert runner.prefill_graph_lengths(bs, T), "this shape should replay graphs"
    rng = random.Random(bs * 1000 + T)
    lens = [max(1, T - (i % 3) * rng.randint(0, 4)) for i in range(bs)]
    toks = [[rng.randrange(3, 290) for _ in range(n)] for n in lens]
    more = [[rng.randrange(3, 290) for _ in range(7)] for _ in range(bs)]
    total = T + 7
    tab_a = _tables(bs, total, runner.page, 0)
    tab_b = _tables(bs, total, runner.page, bs * len(tab_a[0]))
    rows = [list(range(n))[::-1] if i % 2 else [n - 1] for i, n in enumerate(lens)]
    ref = runner._run_ar_eager(tab_a, toks, [0] * bs, rows)
    got = runner.run_ar(tab_b, toks, [0] * bs, rows)
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    # The continuation (eager on both sides) attends to what each path wrote.
    last = [[6]] * bs
    ref2 = runner._run_ar_eager(tab_a, more, lens, last)
    got2 = runner._run_ar_eager(tab_b, more, lens, last)
    for r, g in zip(ref2, got2):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_large_passes_stay_eager(engine):
    runner = engine.runner
    assert runner.prefill_graph_lengths(1, runner.graphed_prefill_tokens + 1) == []
    assert runner.prefill_graph_lengths(16, 65) == []


def test_engine_output_is_the_eager_prefills(engine):
    """Greedy output of a ragged batch, both modes, with graphed prefill and with eager prefill
    (the same engine, graphed_prefill_tokens 0): token for token the same."""
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    rng = random.Random(5)

    def run() -> list[list[int]]:
        reqs = [GenerateRequest(prompt_token_ids=[rng.randrange(3, 290) for _ in range(n)], mode=mode,
                                params=SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
                for mode in ("orthrus", "ar") for n in (1, 9, 63, 64, 130, 700)]
        return [d.token_ids for d in engine.generate(reqs)]

    state = rng.getstate()
    graphed = run()
    before = engine.runner.graphed_prefill_tokens
    engine.runner.graphed_prefill_tokens = 0
    try:
        rng.setstate(state)
        eager = run()
    finally:
        engine.runner.graphed_prefill_tokens = before
    assert graphed == eager
    assert engine.num_compiles_after_ready == 0
