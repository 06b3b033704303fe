"""Trace the adaptive policy inside a real engine: every step's choice, what it believed
(the AR step's and each candidate plan's cost and rate, the acceptance estimate) and every
cycle time it was fed. For runs where the benchmark's adaptive point lands below AR.

    python3 benchmarks/policy_trace.py --bs 128 --mean 16 --steps 190 --out /tmp/trace.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import engine as bench  # noqa: E402
from orthrus_runtime.types import GenerateRequest, SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--mean", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=190)
    ap.add_argument("--out", default="/tmp/policy_trace.json")
    ap.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cpu_dry_run:
        bench._dry_run_setup()
    model = bench.random_model(bench.model_config(args.shape))
    eng = bench.make_engine(model, bench.PROMPT + args.steps * 8 + 2 * bench.B, max_seqs=args.bs,
                            policy="adaptive")
    eng.runner.capture_graphs([args.bs], [1, 2, 4, 8, 16, 32], eng.cfg.mask_token_id)
    rows, fed = [], []
    for rep in range(2):  # the first pass warms everything up; the second is traced
        eng.planner.reset()  # a fresh adaptive policy; the trace wraps its methods
        pol = eng.planner.inner
        eng.acceptance.profile = bench.geometric_profile(args.mean)
        orig_choose, orig_time = pol.choose, pol.observe_time

        def choose(bs, rem, pol=pol, orig=orig_choose):
            plan = orig(bs, rem)
            K, D = plan
            cands = sorted(pol.rates(bs, rem), reverse=True)[:4]
            rows.append({"step": eng.num_steps, "K": K, "D": D, "ar_cost_ms": 1e3 * pol.cycle_cost(bs, 1, 0),
                         "top": [(round(r, 2), k, d, round(1e3 * pol.cycle_cost(bs, k, d), 2)) for r, k, d in cands],
                         "alpha": [round(float(a), 3) for a in pol.acceptance.alpha()[:4]],
                         "scale": dict(pol.scale), "probe_every": pol.probe_every, "since_ar": pol.since_ar})
            return plan

        def observe_time(bs, K, D, s, orig=orig_time):
            fed.append({"step": eng.num_steps, "K": K, "D": D, "ms": 1e3 * s})
            return orig(bs, K, D, s)

        if rep == 1:
            pol.choose, pol.observe_time = choose, observe_time
        g = torch.Generator().manual_seed(rep)
        ids = [eng.add_request(GenerateRequest(
            prompt_token_ids=torch.randint(0, 150000, (bench.PROMPT,), generator=g).tolist(), mode="orthrus",
            params=SamplingParams(max_tokens=args.steps * 8, temperature=0.0, ignore_eos=True)))
            for _ in range(args.bs)]
        t0, g0 = time.perf_counter(), eng.generation_tokens
        for _ in range(args.steps):
            eng.step()
        bench.sync()
        tps = (eng.generation_tokens - g0) / (time.perf_counter() - t0)
        for r in ids:
            eng.abort(r)
    Path(args.out).write_text(json.dumps({"tokens_per_s": tps, "choices": rows, "cycle_times": fed}, indent=0))
    from collections import Counter

    print("tokens/s", round(tps), "plans", Counter((r["K"], r["D"]) for r in rows).most_common(6))
    for r in rows[::10]:
        print(r["step"], (r["K"], r["D"]), "AR", round(r["ar_cost_ms"], 2), "top", r["top"][:3], "alpha", r["alpha"],
              "scale", {k: round(v, 3) for k, v in r["scale"].items()})
    by = {}
    for f in fed:
        by.setdefault((f["K"], f["D"]), []).append(f["ms"])
    print("fed cycle ms (median, n):", {k: (round(sorted(v)[len(v) // 2], 2), len(v)) for k, v in by.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
