"""Training recipes for the diffusion view, compared in one device call (issue 18).

One batch of fresh self-distilled data (the base model's answers through the engine:
greedy for two prompts in three, sampled for the third), then every variant trains the
same number of steps from the same starting view, and each is measured the same way:
tokens per cycle that greedy Orthrus decoding reaches on held-out greedy answers
(`distill.greedy_cycles`: every 50th prompt of the distillation stream, never MT-bench
or HumanEval; on the engine's own greedy answers it equals what the engine counts, see
tests/test_distill.py). The official numbers (`orthrus eval-acceptance` on MT-bench and
HumanEval) come after, from the chosen recipe (benchmarks/distill_curve.py).

A variant is `name:key=value,...` with keys
  data   mixed (the sampled answers plus as many greedy ones) or greedy (greedy answers
         only; the same number of sequences as mixed),
  lr     peak learning rate,
  decay  row weights exp(-i / decay) (0: every row alike),
  blocks draft blocks per sequence per step.

Outputs: OUT/recipes.json (written after every variant, so a call cut short returns what
it finished) and the best variant's int8 view as OUT/view.part0, ...; in --state: the data shards (data/), and the best variant's view as
best-view.safetensors (float32, not quantized: a later command keeps training it) with
best.json (its settings, and distill_curve.py options that continue it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import distill_curve as C  # noqa: E402
from orthrus_runtime.tools import distill as D  # noqa: E402
from orthrus_runtime.model.loader import (DEFAULT_DIFFUSION_VIEW, load_model, read_diffusion_view,  # noqa: E402
                                          save_diffusion_view)

# The comparison of 2026-12-07 (docs/distillation.md).
DEFAULT_VARIANTS = "mixed:data=mixed;greedy:data=greedy;greedy-decay3:data=greedy,decay=3"
KEYS = {"data": str, "lr": float, "decay": float, "blocks": int}
log = C.log  # one clock (C.T0) for this script's lines and distill_curve's


def parse_variants(spec: str) -> list[dict[str, Any]]:
    out = []
    for item in [s.strip() for s in spec.split(";") if s.strip()]:
        name, _, body = item.partition(":")
        v: dict[str, Any] = {"name": name.strip(), "data": "mixed", "lr": 2e-4, "decay": 0.0, "blocks": 32}
        for kv in [s for s in body.split(",") if s.strip()]:
            k, _, val = kv.partition("=")
            k = k.strip()
            if k not in KEYS:
                raise ValueError(f"variant {name!r}: unknown key {k!r} (one of {sorted(KEYS)})")
            v[k] = KEYS[k](val.strip())
        if v["data"] not in ("mixed", "greedy"):
            raise ValueError(f"variant {name!r}: data must be mixed or greedy")
        if not v["name"] or v["lr"] <= 0 or v["decay"] < 0 or v["blocks"] < 1:
            raise ValueError(f"variant {item!r}: needs a name, lr > 0, decay >= 0, blocks >= 1")
        out.append(v)
    if not out or len({v["name"] for v in out}) != len(out):
        raise ValueError("give one or more variants with distinct names")
    return out


def split_data(data: D.DistillData, heldout_every: int = 50) -> tuple[D.DistillData, D.DistillData, D.DistillData]:
    """(mixed, greedy, held-out greedy): held out are the greedy answers of every
    heldout_every-th uid; mixed is every sampled answer plus as many greedy ones (every
    other one, then the rest), greedy is as many greedy answers, so both train on the
    same number of sequences."""
    held = (data.uids % heldout_every == 0) & data.greedy
    g_idx = (data.greedy & ~held).nonzero().flatten().tolist()
    s_idx = (~data.greedy & ~held).nonzero().flatten().tolist()
    n = min(len(g_idx), 2 * len(s_idx))
    half = n - min(len(s_idx), n)
    g_for_mixed = (g_idx[::2] + g_idx[1::2])[:half]
    mixed = data.subset(sorted(s_idx[: n - half] + g_for_mixed))
    greedy = data.subset(g_idx[:n])
    return mixed, greedy, data.subset(held.nonzero().flatten().tolist())


def main(argv: list[str] | None = None) -> int:
    C.T0 = time.monotonic()  # the budget counts from here
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--state", type=Path, required=True, help="folder for the data and the best view")
    ap.add_argument("--budget-s", type=float, default=540, help="wall clock, loading included")
    ap.add_argument("--gen-seconds", type=float, default=150)
    ap.add_argument("--gen-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="dtype of the model answering the prompts (training and measuring run on float32 weights)")
    ap.add_argument("--gen-max-new-tokens", type=int, default=320)
    ap.add_argument("--gen-max-num-seqs", type=int, default=D.GEN_MAX_NUM_SEQS)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--init", default="default", help="'default' (the shipped view), 'ar-copy' or a view file")
    ap.add_argument("--prompts", default=str(D.DEFAULT_PROMPTS))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=0, help="steps per variant (0: from the budget)")
    ap.add_argument("--heldout-seqs", type=int, default=64)
    ap.add_argument("--part-mb", type=float, default=15.0, help="size of the returned int8 view's parts")
    ap.add_argument("--eval-best", action="store_true",
                    help="then evaluate the best variant's int8 view as distill_curve.py does (orthrus "
                         "eval-acceptance: MT-bench and HumanEval, float32 and bfloat16) into recipes.json")
    ap.add_argument("--speedup", action="store_true",
                    help="then time that view through the engine alone (bfloat16, batch 1 and 16, chat prompts)")
    ap.add_argument("--reserve-s", type=float, default=0,
                    help="seconds of the budget kept for --eval-best and --speedup")
    C.add_eval_arguments(ap)
    ap.add_argument("--measure-estimate-s", type=float, default=10, help="one held-out replay's seconds until measured")
    a = ap.parse_args(argv)
    if (a.eval_best or a.speedup) and a.reserve_s <= 0 and not a.steps:
        print("error: --eval-best and --speedup need --reserve-s (their seconds, kept out of the training budget)",
              file=sys.stderr)
        return 2
    try:
        variants = parse_variants(a.variants)
        return run(a, variants)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace, variants: list[dict[str, Any]]) -> int:
    deadline = C.T0 + a.budget_s - a.reserve_s
    torch.backends.cuda.matmul.allow_tf32 = False
    a.out.mkdir(parents=True, exist_ok=True)
    a.state.mkdir(parents=True, exist_ok=True)
    lm = load_model(a.model, "float32", a.device, None, None, None)
    gen_lm = lm if a.gen_dtype == "float32" else load_model(a.model, a.gen_dtype, a.device, None, None, None)
    cuda = lm.model.lm_head.weight.device.type == "cuda"
    amp = torch.bfloat16 if cuda else None
    init_meta: dict[str, str] = {}
    if a.init == "ar-copy":
        init = {k: p.detach().clone() for k, p in D.trainable_parameters(lm.model).items()}
    else:
        init, init_meta = read_diffusion_view(DEFAULT_DIFFUSION_VIEW if a.init == "default" else a.init)
    tokens0 = int(init_meta.get("tokens_seen", 0))
    rep: dict[str, Any] = {"what": "diffusion-view training recipes, same data and steps (benchmarks/distill_recipes.py)",
                           "model": lm.model_id, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                           "init": a.init, "init_tokens_seen": tokens0, "batch_size": a.batch_size,
                           "block_size": lm.block_size, "measure": "held-out greedy replay (distill.greedy_cycles), "
                           "float32, the float32 master weights", "variants": []}

    def write() -> None:
        (a.out / "recipes.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")

    # Data: greedy answers for 2 prompts in 3, sampled for the third (one pass of the stream).
    stream = D.PromptStream(gen_lm.tokenizer, D.load_prompts(a.prompts), greedy_fraction=2 / 3, seed=0)
    data = D.generate_data(gen_lm, stream, seconds=a.gen_seconds, max_new_tokens=a.gen_max_new_tokens,
                           max_num_seqs=a.gen_max_num_seqs, shard_seconds=0,
                           on_shard=D.ShardWriter(a.state / "data", {"model": lm.model_id}), log=log)
    (a.state / "data" / "generation.json").write_text(json.dumps(
        {"complete": False, "next_uid": int(data.meta["next_uid"]), "greedy_fraction": 2 / 3,
         "gen_dtype": a.gen_dtype, "seconds": float(data.meta["seconds"])}) + "\n")
    mixed, greedy, held = split_data(data)
    rep["data"] = {"sequences": len(data), "response_tokens": data.response_tokens,
                   "greedy_sequences": int(data.greedy.sum()), "gen_seconds": float(data.meta["seconds"]),
                   "gen_dtype": a.gen_dtype, "next_uid": int(data.meta["next_uid"]),
                   "train_sequences_per_variant": len(greedy), "heldout_greedy_sequences": len(held)}
    log(f"data: {len(data)} sequences ({rep['data']['greedy_sequences']} greedy), {data.response_tokens} response "
        f"tokens; {len(greedy)} training sequences per variant, {len(held)} held out")
    if len(greedy) < a.batch_size or len(mixed) < a.batch_size or not len(held):
        raise ValueError(f"too little data for the comparison ({len(greedy)} / {len(mixed)} training sequences, "
                         f"{len(held)} held out)")

    def measure() -> dict[str, Any]:
        t = time.monotonic()
        out = D.greedy_cycles(lm.model, held, lm.block_size, lm.mask_token_id, max_seqs=a.heldout_seqs).report()
        out["seconds"] = round(time.monotonic() - t, 1)
        return out

    C.set_view(lm.model, init)
    rep["before"] = measure()
    write()
    log(f"starting view: {rep['before']['tokens_per_cycle']:.3f} tokens per cycle on held-out greedy answers "
        f"({rep['before']['seconds']} s)")
    measure_s = rep["before"]["seconds"] or a.measure_estimate_s

    steps = a.steps
    best = None
    for n, v in enumerate(variants):
        C.set_view(lm.model, init)
        train_data = greedy if v["data"] == "greedy" else mixed
        cfg = D.TrainConfig(block_size=lm.block_size, batch_size=a.batch_size, blocks_per_seq=v["blocks"], lr=v["lr"],
                            loss_decay=v["decay"], max_steps=max(steps, 1))
        tr = D.Trainer(lm.model, train_data, lm.mask_token_id, cfg, amp=amp)
        tr.carry_totals(init_meta)
        if not steps:  # from the budget: the same count for every variant, timed on the first
            for i in range(6):
                if i == 2:
                    t_probe = time.monotonic()
                tr.probe_step()
            per = (time.monotonic() - t_probe) / 4
            left = deadline - time.monotonic() - len(variants) * (measure_s + 3)
            steps = max(10, int(0.95 * left / len(variants) / per))  # the held-out KL and saves take a little
            cfg.max_steps = steps
            log(f"{per * 1000:.0f} ms/step (probe) -> {steps} steps per variant")
        t = time.monotonic()
        D.train(tr, save_every=0, log_every=max(1, steps // 4), log_every_s=30, progress=False, log=log)
        train_s = time.monotonic() - t
        heldout = tr.evaluate(held, decay=0.0)  # every row alike, whatever the variant trained with
        res = {**v, "steps": tr.step_num, "ms_per_step": round(1000 * train_s / max(tr.step_num, 1), 1),
               "tokens_seen": tr.tokens_seen, "heldout_kl": round(heldout.loss, 4),
               "heldout_top1": round(heldout.accuracy, 4), "replay": measure()}
        rep["variants"].append(res)
        write()
        log(f"variant {n + 1}/{len(variants)} {v['name']}: {res['replay']['tokens_per_cycle']:.3f} tokens per cycle, "
            f"held-out KL {res['heldout_kl']:.4f}, {res['ms_per_step']:.0f} ms/step")
        if best is None or res["replay"]["tokens_per_cycle"] > best[0]["replay"]["tokens_per_cycle"]:
            best = (res, v)
            meta = D.view_metadata(tr, lm, train_data, a.init, {"tool": "benchmarks/distill_recipes.py",
                                                                "variant": v["name"], "data": rep["data"]})
            save_diffusion_view(lm.model, a.state / "best-view.safetensors", lm.block_size, lm.mask_token_id,
                                extra_metadata=meta, quantize=None)
            # The int8 view as it would ship, in parts small enough to come back from the device.
            best_int8 = C.write_view_parts(lm.model, lm, a.out, meta, int(a.part_mb * 1e6))
        del tr
        if cuda:
            torch.cuda.empty_cache()
    res, v = best
    curve_args = ["--lr", str(v["lr"]), "--loss-decay", str(v["decay"]), "--blocks-per-seq", str(v["blocks"]),
                  "--gen-greedy-fraction", "1.0" if v["data"] == "greedy" else "0.5",
                  "--train-on", "greedy" if v["data"] == "greedy" else "all"]
    rep["best"] = v["name"]
    (a.state / "best.json").write_text(json.dumps({"variant": v, "result": res, "curve_args": " ".join(curve_args)},
                                                  indent=1) + "\n")
    write()
    log(f"best: {v['name']} ({res['replay']['tokens_per_cycle']:.3f} tokens per cycle, before "
        f"{rep['before']['tokens_per_cycle']:.3f}); distill_curve.py options: {' '.join(curve_args)}")
    if a.eval_best:
        models = {"float32": lm}
        for dt in [d.strip() for d in a.eval_dtypes.split(",") if d.strip() and d.strip() != "float32"]:
            models[dt] = gen_lm if a.gen_dtype == dt else load_model(a.model, dt, a.device, None, None, None)
        t = time.monotonic()
        rep["best_eval"] = C.evaluate_point(models, best_int8, a)
        rep["best_eval_seconds"] = round(time.monotonic() - t, 1)
        write()
        log("best, eval-acceptance: " + ", ".join(f"{d} {ds} {r['tokens_per_cycle']:.3f}"
                                                   for d, x in rep["best_eval"].items() for ds, r in x.items()))
    if a.speedup:
        rep["speedup"] = C.engine_speedup(a.out, a.model)
        write()
        log(f"speed-up at batch 1: {rep['speedup'].get('orthrus_vs_ar_bs1')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
