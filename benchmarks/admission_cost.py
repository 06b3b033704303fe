"""What admitting a request costs the running batch, on the GPU: host wall time of the engine
steps while c sequences decode, with and without a new request's prefill in the step.

    python3 benchmarks/admission_cost.py --out $OUT          # SmolLM2-135M's shape, random bf16 weights

For each running batch c and prompt length L: the mean step time over `--steady` steps with no
admission, then the mean over steps that admit one request of L tokens (one old request is
aborted at each admission, so the batch stays at c). The difference is what one admission
costs every running sequence: continuous arrivals pay it once a request, a batch admitted at
once pays one prefill pass for all. First the graphed prefill is checked against the eager
pass (logits at every row); then every point runs twice on the same engine, prefill passes
eager and then graphed (ModelRunner.prefill_graph_lengths). Writes <date>-<gpu>-admission-cost.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import engine as bench  # noqa: E402
from orthrus_runtime.engine.setup import warm_up  # noqa: E402
from orthrus_runtime.model.config import ModelConfig  # noqa: E402
from orthrus_runtime.types import GenerateRequest, SamplingParams  # noqa: E402

# SmolLM2-135M's shape (the served model), as a Qwen3 config: the pass's launch count and sizes
# are what matter here, not the weights.
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def _req(g: torch.Generator, rid: str, n: int, max_tokens: int) -> tuple[GenerateRequest, list[int]]:
    ids = torch.randint(0, 49000, (n,), generator=g).tolist()
    return (GenerateRequest(request_id=rid, mode="orthrus",
                            params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)), ids)


def measure(eng, c: int, prompt: int, steady: int, admissions: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    live: list[str] = []
    for i in range(c):
        r, ids = _req(g, f"s{seed}-{i}", 200, 10_000)
        live.append(eng.add_request(r, prompt_ids=ids))
    for _ in range(20):  # prefills done, the policy settled
        eng.step()
    torch.cuda.synchronize()

    def timed_step() -> float:
        t0 = time.perf_counter()
        eng.step()
        return time.perf_counter() - t0

    base = [timed_step() for _ in range(steady)]
    adm, after = [], []
    for k in range(admissions):
        eng.abort(live.pop(0))
        r, ids = _req(g, f"a{seed}-{k}", prompt, 10_000)
        live.append(eng.add_request(r, prompt_ids=ids))
        adm.append(timed_step())
        after.extend(timed_step() for _ in range(4))  # pipelined: the cost may land a step later
    for rid in live:
        eng.abort(rid)
    for _ in range(4):  # let the pipeline drain the aborted ones
        eng.step()
    ms = lambda xs: round(1e3 * statistics.mean(xs), 3)  # noqa: E731
    window = [a + sum(after[4 * i: 4 * i + 4]) for i, a in enumerate(adm)]  # the admission and 4 more
    return {"c": c, "prompt": prompt, "steady_ms": ms(base), "admission_step_ms": ms(adm),
            "next_4_steps_ms": ms(after), "admission_window_5_steps_ms": ms(window),
            "extra_ms_per_admission": round(1e3 * (statistics.mean(window) - 5 * statistics.mean(base)), 3)}


def check_graphed_prefill(eng, lengths=(5, 16, 48, 64, 100, 300, 1000), batches=(1, 3, 16)) -> list[dict]:
    """The graphed prefill (verify graphs, chunk by chunk) against the eager pass on the same
    tokens, into two disjoint sets of fresh KV blocks, logits at every row: the largest
    difference and how often the argmax differs. Run before any request holds a block."""
    runner = eng.runner
    page = runner.page
    g = torch.Generator().manual_seed(7)
    out = []
    for bs in batches:
        for n in lengths:
            if bs * n > 4096:
                continue
            nb = -(-n // page)
            toks = [torch.randint(0, 49000, (n - (i % 3),), generator=g).tolist() for i in range(bs)]
            rows = [list(range(len(t))) for t in toks]
            tab_a = [list(range(i * nb, (i + 1) * nb)) for i in range(bs)]
            tab_b = [list(range((bs + i) * nb, (bs + i + 1) * nb)) for i in range(bs)]
            graphed = runner.prefill_graph_lengths(bs, n)
            a = runner._run_ar_eager(tab_a, toks, [0] * bs, rows)
            b = runner.run_ar(tab_b, toks, [0] * bs, rows)
            la, lb = torch.cat(a), torch.cat(b)
            out.append({"bs": bs, "T": n, "graph_lengths": graphed,
                        "max_abs_diff": round(float((la - lb).abs().max()), 5),
                        "argmax_differs": round(float((la.argmax(-1) != lb.argmax(-1)).float().mean()), 5)})
            print(json.dumps(out[-1]), flush=True)
    torch.cuda.synchronize()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompts", default="48,200,600")
    ap.add_argument("--steady", type=int, default=60)
    ap.add_argument("--admissions", type=int, default=20)
    args = ap.parse_args()
    cfg = ModelConfig.from_hf_dict(dict(bench.COMMON, **SMOLLM2), "smollm2-135m-shape")
    model = bench.random_model(cfg)
    eng = bench.make_engine(model, max_len=2048, max_seqs=64, policy="adaptive", mask_id=49151)
    t0 = time.perf_counter()
    warm_up(eng)
    check = check_graphed_prefill(eng)
    rows = []
    graphed_tokens = eng.runner.graphed_prefill_tokens
    # The same engine, prefill passes eager (graphed_prefill_tokens 0) and then graphed.
    for prefill, limit in (("eager", 0), ("graphed", graphed_tokens)):
        eng.runner.graphed_prefill_tokens = limit
        for c in [int(x) for x in args.batches.split(",")]:
            for p in [int(x) for x in args.prompts.split(",")]:
                rows.append({"prefill": prefill, **measure(eng, c, p, args.steady, args.admissions, seed=len(rows))})
                print(json.dumps(rows[-1]), flush=True)
    rep = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "warm_up_s": round(time.perf_counter() - t0, 1),
           "engine": {"block_size": eng.cfg.block_size, "max_num_seqs": eng.cfg.max_num_seqs,
                      "verify_policy": eng.cfg.verify_policy, "runner": eng.runner.backend},
           "graphed_prefill_check": check, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = torch.cuda.get_device_name(0).split()[-1].lower()
    path = out / f"{datetime.date.today().isoformat()}-{slug}-admission-cost.json"
    path.write_text(json.dumps(rep, indent=1) + "\n")
    worst = max(r["max_abs_diff"] for r in check)
    print(f"graphed prefill against eager: max |logit diff| {worst}, "
          f"argmax differs at most {max(r['argmax_differs'] for r in check)}")
    print(f"{'prefill':>8} {'c':>4} {'prompt':>6} {'steady ms':>10} {'adm step':>9} {'extra/adm ms':>12}")
    for r in rows:
        print(f"{r['prefill']:>8} {r['c']:>4} {r['prompt']:>6} {r['steady_ms']:>10} {r['admission_step_ms']:>9} "
              f"{r['extra_ms_per_admission']:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
