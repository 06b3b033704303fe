"""GPU smoke check of the serving path: a tiny float32 checkpoint through
AsyncOrthrusEngine.from_args on CUDA (graphs captured at start-up), greedy
Orthrus == AR for a ragged batch. Prints one JSON line; exit 1 on a mismatch."""
import asyncio
import json
import sys
import tempfile
import time

from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
from orthrus_runtime.engine.args import EngineArgs
from orthrus_runtime.model.testing import tiny_checkpoint
from orthrus_runtime.types import GenerateRequest, SamplingParams


async def main() -> int:
    folder = tiny_checkpoint(tempfile.mkdtemp() + "/m", block_size=8, diffusion="ar-copy", seed=3)
    t0 = time.perf_counter()
    eng = AsyncOrthrusEngine.from_args(EngineArgs(model=str(folder), device="cuda", dtype="float32",
                                                  max_num_seqs=8, max_model_len=512, kv_cache_bytes=64 * 2**20))
    start_s = time.perf_counter() - t0
    prompts = [[(i * 13 + j) % 290 + 3 for j in range(n)] for i, n in enumerate([3, 17, 40, 9, 1, 60])]

    async def run(mode):
        async def one(p):
            ids = []
            async for d in eng.generate(GenerateRequest(prompt_token_ids=p, mode=mode,
                                                        params=SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))):
                ids += d.token_ids
            return ids
        return await asyncio.gather(*(one(p) for p in prompts))

    ar, orth = await run("ar"), await run("orthrus")
    st, health = eng.stats(), eng.health()
    eng.shutdown()
    ok = ar == orth and st.num_kv_blocks_free == st.num_kv_blocks_total
    print(json.dumps({"ok": ok, "engine_core_pid": health["engine_core_pid"], "startup_s": round(start_s, 2),
                      "kernel_compiles_after_ready": health["kernel_compiles_after_ready"],
                      "tokens_per_cycle": st.spec["orthrus"].mean_accepted_length}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
