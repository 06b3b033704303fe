"""Where the time of one engine step goes, on the GPU: host functions (cProfile), host
ops and device kernels (torch.profiler), for AR steps and fixed-block Orthrus cycles.

    python3 benchmarks/profile_step.py --shape qwen3-1.7b --bs 1,32 --block 8

Random bf16 weights of the given shape (see benchmarks/engine.py). Prints compact tables.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as bench  # noqa: E402  (benchmarks/engine.py)

from orthrus_runtime.types import GenerateRequest, SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen3-1.7b", choices=list(bench.SHAPES))
    ap.add_argument("--bs", default="1,32")
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    model = bench.random_model(bench.model_config(args.shape))
    eng = bench.make_engine(model, 512)
    sizes = sorted({1, args.block})
    for bs in (int(b) for b in args.bs.split(",")):
        eng.runner.capture_graphs([bs], sizes, eng.cfg.mask_token_id)
        for mode, plan in (("ar", None), ("orthrus", (args.block, args.block))):
            eng.planner.fixed, eng.acceptance.profile = plan, ([] if plan else None)
            ids = [eng.add_request(GenerateRequest(prompt_token_ids=list(range(1000 + i, 1064 + i)), mode=mode,
                                                   params=SamplingParams(max_tokens=300, temperature=0,
                                                                         ignore_eos=True))) for i in range(bs)]
            for _ in range(3):
                eng.step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                eng.step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / args.steps * 1e3
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.steps):
                eng.step()
            torch.cuda.synchronize()
            pr.disable()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    eng.step()
                torch.cuda.synchronize()
            ka = prof.key_averages()
            dev = sum(e.self_device_time_total for e in ka if str(e.device_type).endswith("CUDA")) / 1e3 / args.steps
            print(f"\n=== {args.shape} bs {bs} {mode} plan {plan}: {wall:.2f} ms/step wall, "
                  f"{dev:.2f} ms/step device kernels ===")
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
            print("\n".join(ln for ln in s.getvalue().splitlines() if ln.strip())[-2200:])
            print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48)[-2600:])
            print(ka.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=48)[-1800:])
            if plan:
                # The passes alone, synchronised: real data against the capture-time cost table.
                seqs = list(eng.scheduler.running)
                for q in seqs:
                    eng.blocks.allocate(q, q.num_cached + args.block)
                anchors = [q.output_token_ids[-1] for q in seqs]
                parts = {}
                for _ in range(5):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    tables, starts = [q.block_table for q in seqs], [q.num_cached for q in seqs]
                    dl = eng.runner.run_draft(tables, starts, anchors, args.block, eng.cfg.mask_token_id,
                                              args.block - 1)
                    torch.cuda.synchronize()
                    t1 = time.perf_counter()
                    d = dl.argmax(-1)
                    vids = torch.cat([torch.tensor(anchors, device="cuda").unsqueeze(1), d], 1)
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    lg = eng.runner.run_verify(tables, starts, vids, [args.block] * bs)
                    torch.cuda.synchronize()
                    t3 = time.perf_counter()
                    lg.argmax(-1).tolist()
                    t4 = time.perf_counter()
                    for k, v in (("draft+lm_head", t1 - t0), ("argmax+cat", t2 - t1), ("verify+lm_head", t3 - t2),
                                 ("argmax+tolist", t4 - t3)):
                        parts.setdefault(k, []).append(1e3 * v)
                for q in seqs:
                    eng.blocks.truncate(q, q.num_cached)
                table = eng.runner.graphs.cost_s if eng.runner.graphs else {}
                print("synced parts (median ms):", {k: round(sorted(v)[2], 3) for k, v in parts.items()},
                      "| capture-time table:", {f"{k}/{b}/{T}": round(1e3 * c, 3) for (k, b, T), c in table.items()
                                                if b == bench.bucket_bs(bs)})
            for r in ids:
                eng.abort(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
