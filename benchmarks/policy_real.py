"""The real SmolLM2 through the engine a replica builds (build_engine with gpu.yaml's engine args),
greedy chat prompts one at a time and in batches: AR, Orthrus with the full block, Orthrus with
the adaptive policy, and what the adaptive policy chose and believed. For runs where served
Orthrus lands below served AR (benchmarks/serving.py) while benchmarks/engine.py's smaller engine
(section smollm2) has it ahead: the difference is the engine's settings, so each variant of
`--set` rebuilds it.

    python3 benchmarks/policy_real.py --out /tmp/x                       # gpu.yaml's engine args
    python3 benchmarks/policy_real.py --set max_model_len=1024 --set max_num_seqs=16 --out /tmp/x
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse_sets(sets: list[str]) -> list[dict[str, Any]]:
    """`--set a=1,b=2` per variant: each becomes one dict of engine-argument overrides."""
    out = []
    for s in sets or [""]:
        d: dict[str, Any] = {}
        for kv in filter(None, s.split(",")):
            k, _, v = kv.partition("=")
            d[k] = json.loads(v) if v not in ("",) else None
        out.append(d)
    return out


def run_variant(over: dict[str, Any], model: str | None, n_prompts: int, max_tokens: int, batches: list[int],
                dry: bool) -> dict:
    import yaml

    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.engine.setup import build_engine
    from orthrus_runtime.spec.planner import FullBlockPlanner
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    base = yaml.safe_load((ROOT / "deployment/configs/gpu.yaml").read_text())["applications"][0]["args"]["engine"]
    args = {**base, "model": model, "verify_policy": "adaptive", **over}
    if dry:
        args.update(device="cpu", dtype="float32", cuda_graphs=False)
    t0 = time.perf_counter()
    eng = build_engine(EngineArgs.from_dict(args))
    res: dict[str, Any] = {"engine_args": args, "build_s": round(time.perf_counter() - t0, 1),
                           "num_kv_blocks": eng.cfg.num_kv_blocks, "max_model_len": eng.cfg.max_model_len}
    adaptive = eng.planner
    B = eng.cfg.block_size
    prompts = [json.loads(x)["messages"] for x in
               (ROOT / "orthrus_runtime/data/prompts/chat.jsonl").read_text().splitlines()][:max(n_prompts, max(batches))]
    trace: list[dict] = []
    orig_choose, orig_time = adaptive.choose, adaptive.observe_time

    def choose(bs, rem):
        plan = orig_choose(bs, rem)
        if bs == 1:
            cands = sorted(adaptive.rates(bs, rem), reverse=True)[:3]
            trace.append({"K": plan[0], "D": plan[1], "ar_ms": round(1e3 * adaptive.cycle_cost(bs, 1, 0), 3),
                          "top": [(round(r), k, d, round(1e3 * adaptive.cycle_cost(bs, k, d), 3)) for r, k, d in cands],
                          "alpha": [round(float(a), 3) for a in adaptive.acceptance.alpha()[:4]],
                          "scale": {k: round(v, 3) for k, v in adaptive.scale.items()}})
        return plan

    fed: dict[str, list[float]] = {}

    def observe_time(bs, K, D, s):
        if bs == 1:
            fed.setdefault(f"{K},{D}", []).append(round(1e3 * s, 3))
        return orig_time(bs, K, D, s)

    adaptive.choose, adaptive.observe_time = choose, observe_time
    for bs in batches:
        for name, mode, planner in (("ar", "ar", adaptive), ("full", "orthrus", FullBlockPlanner(B)),
                                    ("adaptive", "orthrus", adaptive)):
            eng.planner = planner
            reqs = [GenerateRequest(messages=m, mode=mode, params=SamplingParams(max_tokens=max_tokens,
                                                                                 temperature=0.0))
                    for m in prompts[:n_prompts if bs == 1 else bs]]

            def once():
                return ([eng.generate([r])[0] for r in reqs] if bs == 1 else eng.generate(reqs))

            once()  # untimed: the first meeting of each prompt
            trace.clear()
            fed.clear()
            t = time.perf_counter()
            ds = once()
            dt = time.perf_counter() - t
            toks = sum(len(d.token_ids) for d in ds)
            cyc = sum(d.stats.num_cycles for d in ds if d.stats)
            acc = sum(d.stats.num_accepted_tokens for d in ds if d.stats)
            r = {"tokens_per_s": round(toks / dt, 1), "tokens": toks, "cycles": cyc,
                 "tokens_per_cycle": round((acc + cyc) / cyc, 3) if cyc else None,
                 "ms_per_cycle_per_request": round(1e3 * dt / max(1, cyc) * (len(ds) if bs > 1 else 1), 3)}
            if name == "adaptive" and bs == 1:
                r["plans"] = [[list(k), v] for k, v in Counter((t_["K"], t_["D"]) for t_ in trace).most_common(8)]
                r["trace_every_20"] = trace[::20][:40]
                r["fed_ms_median"] = {k: (sorted(v)[len(v) // 2], len(v)) for k, v in fed.items()}
            res[f"{name}/bs{bs}"] = r
            print(f"  {over} {name} bs{bs}: {r['tokens_per_s']} tok/s, {r['tokens_per_cycle']} tok/cycle", flush=True)
    eng.planner = adaptive
    return res


def free_cuda() -> None:
    """Each variant's engine takes gpu_memory_utilization of the card: the last one goes first."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf or checkpoint (default: the SmolLM2 GGUF found)")
    ap.add_argument("--set", action="append", default=[],
                    help="engine-argument overrides of one variant, k=v,k=v (JSON values); repeat per variant")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--out", default="/tmp/policy_real")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny run on the CPU (numbers mean nothing)")
    a = ap.parse_args()
    model = a.model
    if model is None:
        import engine as bench

        found = bench.find_smollm2()
        model = str(found) if found else None
    rep = {"model": model, "variants": []}
    for over in parse_sets(a.set):
        rep["variants"].append(run_variant(over, model, a.prompts, a.max_tokens,
                                           [int(x) for x in a.batches.split(",")], a.cpu_dry_run))
        free_cuda()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy_real.json").write_text(json.dumps(rep, indent=1, default=str))
    print("variant | policy/bs | tok/s | tok/cycle | ms/cycle")
    for v in rep["variants"]:
        for k, r in v.items():
            if isinstance(r, dict) and "tokens_per_s" in r:
                print(json.dumps({kk: vv for kk, vv in v["engine_args"].items() if kk in ("max_model_len", "max_num_seqs",
                                                                                  "gpu_memory_utilization")}),
                      "|", k, "|", r["tokens_per_s"], "|", r["tokens_per_cycle"], "|", r["ms_per_cycle_per_request"])
        if "adaptive/bs1" in v:
            print("adaptive bs1 plans", v["adaptive/bs1"].get("plans"), "fed", v["adaptive/bs1"].get("fed_ms_median"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
