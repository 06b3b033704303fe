"""On a GPU: after an engine's warm-up, serving builds no Triton kernel specialisation (issue 16:
"nothing compiles after ready"), over varied prompt lengths, batch sizes, both modes, greedy and
sampled requests and log-probabilities. On failure it lists what compiled, for the warm-up to
cover. Skipped without CUDA."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_nothing_compiles_after_ready(tmp_path, dtype):
    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.engine.setup import build_engine
    from orthrus_runtime.model.testing import tiny_checkpoint
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    eng = build_engine(EngineArgs(model=str(tiny_checkpoint(tmp_path / "m", block_size=8)), device="cuda",
                                  dtype=dtype, max_num_seqs=16, max_model_len=1024, kv_cache_bytes=256 * 2**20,
                                  verify_policy="adaptive", compile_cache_dir=str(tmp_path / "triton")))
    rng = random.Random(0)
    for bs in (1, 3, 16, 7):
        reqs = []
        for i in range(bs):
            n = rng.choice([1, 2, 15, 16, 17, 63, 64, 200, rng.randint(1, 700)])
            p = dict(max_tokens=rng.randint(1, 120), ignore_eos=True,
                     logprobs=rng.choice([None, 0, 5]), prompt_logprobs=rng.choice([None, 1]))
            p.update(temperature=0.0) if i % 2 else p.update(temperature=0.8, top_k=40, top_p=0.9, seed=i)
            reqs.append(GenerateRequest(prompt_token_ids=[rng.randrange(3, 290) for _ in range(n)],
                                        mode=rng.choice(["orthrus", "ar"]), params=SamplingParams(**p)))
        eng.generate(reqs)
    late = eng.compiles_after_ready()
    names = {d.split("[")[0] for d in late}
    warm = [d for d in eng.compiles.kernels[:eng.compiles.count - len(late)] if d.split("[")[0] in names]
    assert not late, (f"{len(late)} kernel specialisation(s) built after ready:\n" + "\n".join(late[:20])
                      + "\n-- the same kernels' warm-up builds:\n" + "\n".join(warm[:40]))
