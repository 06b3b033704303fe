"""The curve: tokens per cycle (`orthrus eval-acceptance`: MT-bench and HumanEval, B = 16,
256 tokens an answer, float32 and bfloat16) against training tokens seen, measured
while the default model's diffusion view is distilled, in chained commands that each fit
one device call (about 9 minutes on one H200).

One command, `python benchmarks/distill_curve.py --state DIR --out OUT --budget-s 500`:

1. loads the base twice (float32: training and the float32 evaluation; bfloat16: the
   bfloat16 evaluation) and the view to start from: DIR's, else --init;
2. on the first command, evaluates the starting view (the curve's first point);
3. generates fresh self-distilled data (greedy and sampled answers, through the engine at
   large batch) for the generation share of the budget, from where the prompt stream
   stopped last time (the prompts come round again sampled only);
4. trains on it and on every earlier command's answers kept in DIR/data (on this machine;
   a fresh machine starts with none) for the rest, in segments, evaluating the int8 view (as it would ship)
   after each; the number of points comes from the evaluation share and the measured
   time of one evaluation;
5. after every point saves DIR/state.json (totals, schedule, prompt cursor, timings),
   DIR/curve.json, DIR/curve.png, the int8 view in parts (view.part0, ...; at most
   --part-mb each) and DIR/checkpoint.pt (float32 master weights and AdamW moments,
   about 320 MB, for a machine that stays warm); the first command also keeps its
   held-out greedy answers (heldout-greedy.safetensors), which every point's replay
   measures; OUT gets copies of all but the checkpoint (6 files for SmolLM2) and the
   command's own answers (shard-cNNNN.safetensors, one file), so a command cut short
   still returns what it finished, and a later machine can train on the answers again
   (--data: a folder of the returned shards).

A later command with the same DIR continues exactly (checkpoint.pt, when it matches
state.json's step); with OUT's files carried back as DIR to a fresh machine it
continues from the int8 view with fresh AdamW moments and a --rewarm-steps ramp. The
learning-rate schedule spans --chain commands: the first one times a few probe steps
and fixes max_steps = chain x its training seconds / step time (commands past the chain
stay at the floor). `--plot-only` redraws DIR/curve.png from DIR/curve.json;
`--speedup-only` times DIR's view through the engine alone (speedup.json) and trains nothing.

`--answer-only` answers the stream's next prompts on any machine (the CPU while no GPU is
lent: on 2 cores in float32 at batch 128 with `--gen-kv-cache-mb 4000`, about 190 response
tokens a second while the answers are short, 50-60 once they are long; docs/distillation.md)
and moves DIR/state.json's prompt cursor past them; its
shard-aNNNN.safetensors in OUT are carried as --data with that state, and the next command
trains on them instead of answering those prompts again.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orthrus_runtime.tools import distill as D  # noqa: E402
from orthrus_runtime.tools import eval_acceptance as E  # noqa: E402
from orthrus_runtime.model.loader import (DEFAULT_DIFFUSION_VIEW, load_model, read_diffusion_view,  # noqa: E402
                                          save_diffusion_view)

STATE_FORMAT = "orthrus-distill-curve-v1"
REPLAY_SET = "heldout-greedy.safetensors"  # the held-out greedy answers every point's replay measures
DATA_DIR = "data"  # every command's generated answers, as shards (OUT gets the command's own: answers_name)
TARGETS = {"mt-bench": 4.0, "humaneval": 3.6}  # issue 18, float32
T0 = time.monotonic()
SAVE_S = 15  # seconds kept for the command's last save (the view's parts, the 320 MB checkpoint)


def answers_name(command: int) -> str:
    """The name a command's answers are returned under: a data shard (D.shard_paths finds it)."""
    return f"{D.SHARD_PREFIX}c{command:04d}.safetensors"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:5.0f}s] {msg}", file=sys.stderr, flush=True)


def set_view(model, tensors: dict[str, torch.Tensor]) -> None:
    params = D.trainable_parameters(model)
    missing = set(params) - set(tensors)
    if missing:
        raise ValueError(f"view lacks {sorted(missing)[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(p.device, p.dtype))


def read_view_parts(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    parts = sorted(folder.glob("view.part*"), key=lambda p: int(p.name[len("view.part"):]))
    tmp = folder / "_view.safetensors"
    tmp.write_bytes(b"".join(p.read_bytes() for p in parts))
    try:
        return read_diffusion_view(tmp)
    finally:
        tmp.unlink()


def write_view_parts(model, loaded, folder: Path, meta: dict[str, str], part_bytes: int) -> dict[str, torch.Tensor]:
    """The int8 view as parts of at most part_bytes; returns it dequantized (what ships)."""
    tmp = folder / "_view.safetensors"
    save_diffusion_view(model, tmp, loaded.block_size, loaded.mask_token_id, extra_metadata=meta, quantize="int8")
    raw = tmp.read_bytes()
    tensors, _ = read_diffusion_view(tmp)
    tmp.unlink()
    for old in folder.glob("view.part*"):
        old.unlink()
    for i in range(0, len(raw), part_bytes):
        (folder / f"view.part{i // part_bytes}").write_bytes(raw[i : i + part_bytes])
    return tensors


def add_eval_arguments(ap: argparse.ArgumentParser) -> None:
    """How a view is evaluated (evaluate_point): orthrus eval-acceptance's settings."""
    ap.add_argument("--eval-dtypes", default="float32,bfloat16")
    ap.add_argument("--eval-datasets", default="mt-bench,humaneval")
    ap.add_argument("--eval-block-size", type=int, default=16)
    ap.add_argument("--eval-max-tokens", type=int, default=256)
    ap.add_argument("--eval-max-num-seqs", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--eval-kv-cache-mb", type=int, default=8192)


def eval_namespace(a: argparse.Namespace) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    E.add_arguments(p)
    return p.parse_args(["--block-sizes", str(a.eval_block_size), "--max-tokens", str(a.eval_max_tokens),
                         "--max-num-seqs", str(a.eval_max_num_seqs), "--limit", str(a.eval_limit),
                         "--datasets", a.eval_datasets, "--kv-cache-mb", str(a.eval_kv_cache_mb)])


def evaluate_point(models: dict[str, Any], tensors: dict[str, torch.Tensor], a: argparse.Namespace) -> dict[str, Any]:
    """Tokens per cycle of the view `tensors` on every evaluation model (float32, bfloat16)."""
    out: dict[str, Any] = {}
    ns = eval_namespace(a)
    if torch.cuda.is_available():
        # A KV budget of its own: the default (a share of the free memory) finds next to none once
        # training's activations sit in the caching allocator.
        torch.cuda.empty_cache()
    for dtype, lm in models.items():
        set_view(lm.model, tensors)
        rep = E.evaluate(lm, ns, log=lambda s, d=dtype: log(f"eval {d}: {s}"))
        out[dtype] = {ds: {k: r[str(a.eval_block_size)][k] for k in
                           ("tokens_per_cycle", "tokens_per_forward_pass", "acceptance_by_position",
                            "requests", "completion_tokens", "seconds")}
                      for ds, r in rep["results"].items()}
    return out


def plot(curve: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    x = [p["tokens_seen"] / 1e6 for p in curve]
    colours = {"mt-bench": "tab:blue", "humaneval": "tab:orange"}
    for ds, c in colours.items():
        for dtype, style in (("float32", "-o"), ("bfloat16", "--s")):
            y = [p["acceptance"].get(dtype, {}).get(ds, {}).get("tokens_per_cycle") for p in curve]
            pts = [(xi, yi) for xi, yi in zip(x, y) if yi is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=c, ms=4, label=f"{ds} {dtype}")
        ax.axhline(TARGETS[ds], color=c, lw=0.8, ls=":")
    ax.set_xlabel("training tokens seen (millions; sequence tokens through the teacher)")
    ax.set_ylabel("tokens per cycle (B = 16, greedy)")
    ax.set_title("SmolLM2-135M-Instruct: acceptance against self-distillation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class Run:
    """One command's state: the folder, the totals, the curve."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.dir: Path = a.state
        self.dir.mkdir(parents=True, exist_ok=True)
        sp = self.dir / "state.json"
        self.state: dict[str, Any] = json.loads(sp.read_text()) if sp.exists() else {}
        if self.state and self.state.get("format") != STATE_FORMAT:
            raise ValueError(f"{sp}: format {self.state.get('format')!r}, expected {STATE_FORMAT!r}")
        cp = self.dir / "curve.json"
        self.curve: list[dict[str, Any]] = json.loads(cp.read_text())["points"] if cp.exists() else []
        self.evals = 0  # points evaluated by this process: its first evaluation also compiles
        self.fresh_shard: Path | None = None  # this command's answers (DIR/data/shard-N), to return to OUT

    def eval_cost(self, n: int) -> float:
        """Seconds that n more evaluations in this process take: the first one compiles (Triton,
        the engine's graphs) and takes about twice as long as the later ones (86 against 45 s on
        an H100): planning it at the later cost overran a device call on 2026-12-07."""
        if n <= 0:
            return 0.0
        later = float(self.state.get("eval_seconds", self.a.eval_estimate_s))
        # At least the estimate: a first evaluation measured on a machine whose caches were warm
        # (an earlier command's compiled kernels) understates a fresh machine's.
        first = max(self.a.eval_estimate_s, float(self.state.get("eval_first_seconds", later)))
        return (first if self.evals == 0 else later) + (n - 1) * later

    def save(self, trainer: D.Trainer, loaded, models, meta: dict[str, str], *, point: bool,
             heldout: D.DistillData | None = None) -> dict[str, torch.Tensor]:
        """Write the view, the state (and, with point, evaluate and add a curve point; with
        heldout, the point also gets the held-out greedy replay of the int8 view)."""
        t0 = time.monotonic()
        tensors = write_view_parts(loaded.model, loaded, self.dir, meta, int(self.a.part_mb * 1e6))
        if point:
            master = {k: p.detach().clone() for k, p in trainer.params.items()}
            acc = evaluate_point(models, tensors, self.a)
            replay = None
            if heldout is not None and bool(heldout.greedy.any()):  # evaluate_point left the int8 view in place
                replay = D.greedy_cycles(loaded.model, heldout, loaded.block_size, loaded.mask_token_id).report()
            set_view(loaded.model, master)
            self.state["eval_first_seconds" if self.evals == 0 else "eval_seconds"] = took = round(time.monotonic() - t0, 1)
            self.evals += 1
            self.curve.append({"command": self.state["commands"], "step": trainer.step_num,
                               "tokens_seen": trainer.tokens_seen, "target_rows_seen": trainer.targets_seen,
                               "train_minutes": round(trainer.train_seconds / 60, 3),
                               "data_response_tokens": self.state.get("data_response_tokens", 0),
                               "lr": trainer.lr_at(max(0, trainer.step_num - 1)) if trainer.cfg.max_steps > 0 else 0,
                               "heldout": self.state.get("heldout"), "heldout_greedy_replay": replay,
                               "acceptance": acc,
                               "eval_seconds": took})
            summary = ", ".join(f"{d} {ds} {r['tokens_per_cycle']:.3f}" for d, v in acc.items() for ds, r in v.items())
            log(f"point {len(self.curve)}: {trainer.tokens_seen / 1e6:.2f} M tokens seen: {summary}")
        self.state.update({"step": trainer.step_num, "max_steps": trainer.cfg.max_steps,
                           "warmup_steps": trainer.cfg.warmup_steps, **trainer.totals(),
                           "config": dataclasses.asdict(trainer.cfg)})
        (self.dir / "curve.json").write_text(json.dumps(
            {"what": "tokens per cycle against training tokens seen (benchmarks/distill_curve.py)",
             "model": loaded.model_id, "device": self.state.get("device"), "targets_float32": TARGETS,
             "eval": {"block_size": self.a.eval_block_size, "max_tokens": self.a.eval_max_tokens,
                      "limit": self.a.eval_limit, "view": "int8, as shipped"},
             "points": self.curve}, indent=1) + "\n")
        if self.curve:
            try:
                plot(self.curve, self.dir / "curve.png")
            except ImportError as e:
                log(f"no plot ({e}); --plot-only redraws it where matplotlib is")
        if self.a.checkpoint:
            trainer.save(self.dir / D.CHECKPOINT_NAME)
            self.state["checkpoint_step"] = trainer.step_num
        self.write_state()
        self.copy_out()
        return tensors

    def write_state(self, folder: Path | None = None) -> None:
        """folder/state.json (default DIR), through a temporary name: a run killed while
        writing leaves the last whole state."""
        folder = folder or self.dir
        tmp = folder / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        tmp.replace(folder / "state.json")

    def copy_out(self) -> None:
        out: Path = self.a.out
        if out is None or out.resolve() == self.dir.resolve():
            return
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.dir.iterdir()):
            if f.is_file() and f.name != D.CHECKPOINT_NAME and not f.name.endswith(".tmp") and not f.name.startswith("_"):
                shutil.copy2(f, out / f.name)
        # This command's answers go back too (about 6 MB a million response tokens, one file): a
        # later machine trains on them again (--data) instead of on its own answers alone. Not
        # when speedup.json is to come: the device returns at most --out-files files. Decided
        # at the first copy (the files OUT gets are all there by then), once.
        if self.fresh_shard is not None and not self.a.speedup_s:
            dest = out / answers_name(int(self.state["commands"]))
            if len(list(out.iterdir())) < self.a.out_files:
                shutil.copy2(self.fresh_shard, dest)
            else:
                log(f"{dest.name} not returned: {out} holds {self.a.out_files} files already")
            self.fresh_shard = None


def prompt_stream(tokenizer, prompts: list, a: argparse.Namespace) -> D.PromptStream:
    """The curve's prompt stream (uids mean the same prompts in every command). Greedy answers
    come from the first pass alone: training on them, the stream ends there (no time spent on
    sampled answers nothing trains on)."""
    return D.PromptStream(tokenizer, prompts, passes=1 if a.train_on == "greedy" else 10_000,
                          greedy_fraction=a.gen_greedy_fraction, seed=0)


def gen_kv_bytes(a: argparse.Namespace) -> int | None:
    """--gen-kv-cache-mb in bytes (None: generate_data's CPU default)."""
    return int(a.gen_kv_cache_mb * 2**20) or None


def answer_ahead(r: Run, a: argparse.Namespace) -> int:
    """--answer-only: answer the stream's next prompts on this machine (any device: the CPU
    while no GPU is lent) for the budget, and move the state's prompt cursor past them, so
    that the next command trains on them (carried as --data) instead of answering them again.
    The answers go to OUT as shard-aNNNN.safetensors every --ahead-shard-s as they come, and
    the state (DIR/state.json, copied to OUT) is written with each: a run cut short still
    has the next command skip what it handed over (answered_ahead). NNNN counts on in the
    state (ahead_shards), so that no two runs of one lineage name a shard alike: a carried
    file of the same name would be skipped, and its answers with it."""
    st = r.state
    if not st:
        raise FileNotFoundError(f"{a.state}: no state.json: --answer-only continues a curve's prompt stream")
    if a.out is None or a.out.resolve() == r.dir.resolve():
        raise ValueError("--answer-only needs --out, a folder other than --state, for the answers")
    a.train_on = a.train_on or st.get("train_on", "all")
    start, skip = int(st["next_uid"]), set(st.get("answered_ahead", []))
    loaded = load_model(a.model, a.gen_dtype, a.device, None, None, None, cache_dir=a.cache_dir or None)
    stream = prompt_stream(loaded.tokenizer, D.load_prompts(a.prompts), a)
    if start >= len(stream):
        raise ValueError(f"every prompt has its answer (the stream is at uid {start} of {len(stream)})")
    dev = loaded.model.lm_head.weight.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    a.out.mkdir(parents=True, exist_ok=True)
    handed: set[int] = set()

    def save_state() -> None:
        r.write_state()
        r.write_state(a.out)

    def hand_over(d: D.DistillData) -> None:
        n = int(st.get("ahead_shards", 0))
        d.meta.update({"made": "ahead (distill_curve.py --answer-only)", "device": where, "gen_dtype": a.gen_dtype})
        d.save(a.out / f"{D.SHARD_PREFIX}a{n:04d}.safetensors")
        handed.update(d.uids.tolist())
        st.update({"ahead_shards": n + 1, "answered_ahead": sorted(skip | handed),
                   "data_response_tokens": st["data_response_tokens"] + d.response_tokens})
        save_state()

    log(f"answering ahead on {where} ({a.gen_dtype}) from uid {start} of {len(stream)}")
    seconds = max(1.0, a.budget_s - (time.monotonic() - T0) - SAVE_S)
    data = D.generate_data(loaded, stream, start=start, skip=skip, seconds=seconds,
                           max_new_tokens=a.gen_max_new_tokens, max_num_seqs=a.gen_max_num_seqs,
                           shard_seconds=a.ahead_shard_s, on_shard=hand_over, kv_cache_bytes=gen_kv_bytes(a),
                           max_prompts=a.ahead_max_prompts, log=log)
    st["next_uid"], st["answered_ahead"] = D.resume_skip(data, skip)
    st.setdefault("ahead", []).append({"device": where, "gen_dtype": a.gen_dtype, "from_uid": start,
                                       "next_uid": st["next_uid"], "responses": len(data),
                                       "response_tokens": data.response_tokens, "seconds": float(data.meta["seconds"])})
    save_state()
    log(f"answered ahead: {len(data)} answers, {data.response_tokens} response tokens; the stream is at uid "
        f"{st['next_uid']} ({len(st['answered_ahead'])} answered past it)")
    return 0


def engine_speedup(view_dir: Path, model: str | None, quick: bool = False) -> dict[str, Any]:
    """benchmarks/engine.py's SmolLM2 section (bfloat16, engine alone: AR and Orthrus at
    batch 1 and 16, chat prompts) with the int8 view whose parts are in view_dir; quick: 64-token
    answers, one timed run (a check of the path, not a measurement)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import engine as bench
    from orthrus_runtime.model.loader import default_gguf_path

    if not torch.cuda.is_available():
        bench._dry_run_setup()  # a CPU check of this path: the numbers mean nothing
    view = view_dir / "_speedup_view.safetensors"
    parts = sorted(view_dir.glob("view.part*"), key=lambda p: int(p.name[len("view.part"):]))
    view.write_bytes(b"".join(p.read_bytes() for p in parts))
    rep: dict[str, Any] = {"what": f"engine alone, bfloat16, chat prompts, {64 if quick else 256} greedy tokens "
                                   f"(benchmarks/engine.py section_smollm2)"}
    try:
        bench.section_smollm2(rep, quick, path=Path(model) if model else default_gguf_path(), view=str(view))
    finally:
        view.unlink()
    sm = rep.get("smollm2", {})
    for tag in ("", "-first4"):  # batch 1: the 16 chat prompts one by one; the first 4 of them
        ar, full, ad = (sm.get(f"{m}/bs1{tag}", {}).get("tokens_per_s") for m in ("ar", "orthrus-full", "orthrus-adaptive"))
        if ar:
            rep[f"orthrus_vs_ar_bs1{tag}"] = {"full": full / ar if full else None, "adaptive": ad / ar if ad else None}
    return rep


def time_speedup(r: Run, model: str | None, quick: bool = False) -> None:
    """speedup.json: the engine-alone speed of the view in r.dir (int8, as shipped) against AR."""
    rep = {**engine_speedup(r.dir, model, quick), "step": r.state.get("step"), "tokens_seen": r.state.get("tokens_seen")}
    (r.dir / "speedup.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    log(f"speed-up at batch 1: {rep.get('orthrus_vs_ar_bs1')}")
    r.copy_out()

def log_memory() -> None:
    """The caching allocator's counters: retries (a cudaMalloc that failed, the cache freed
    and tried again) mean training runs at the memory's edge, each one a device sync."""
    if not torch.cuda.is_available():
        return
    m = torch.cuda.memory_stats()
    log(f"memory: peak {m.get('allocated_bytes.all.peak', 0) / 2**30:.1f} GiB allocated, "
        f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved, {m.get('segment.all.allocated', 0)} cudaMallocs, "
        f"{m.get('num_alloc_retries', 0)} alloc retries, {m.get('num_ooms', 0)} OOMs")


def profile_steps(trainer: D.Trainer, n: int) -> None:
    """n training steps (they count) under torch.profiler: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.monotonic()
    with profile(activities=acts) as prof:
        for _ in range(n):
            trainer.train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = (time.monotonic() - t0) / n
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
    log(f"profile of {n} training step(s) at step {trainer.step_num} ({wall * 1000:.0f} ms a step under the "
        f"profiler), sorted by {key}:\n{table}")
    log_memory()


def main(argv: list[str] | None = None) -> int:
    global T0
    T0 = time.monotonic()  # the budget counts from here
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", type=Path, required=True, help="folder kept between commands")
    ap.add_argument("--out", type=Path, default=None, help="where this command's results are copied ($OUT)")
    ap.add_argument("--budget-s", type=float, default=500, help="this command's wall-clock budget, loading included")
    ap.add_argument("--split", default="0.2,0.5,0.3", help="generation, training, evaluation shares of the budget")
    ap.add_argument("--chain", type=int, default=4, help="commands the learning-rate schedule spans")
    ap.add_argument("--init", default="default", help="first command's view: 'default' (shipped), 'ar-copy' or a file")
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2); a tiny one for dry runs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "orthrus"),
                    help="keeps the GGUF's conversion for the next load (the float32 and bfloat16 models, a later "
                         "command on the same machine); '' keeps none")
    ap.add_argument("--prompts", default=str(D.DEFAULT_PROMPTS))
    ap.add_argument("--gen-max-new-tokens", type=int, default=320)
    ap.add_argument("--gen-max-num-seqs", type=int, default=D.GEN_MAX_NUM_SEQS)
    ap.add_argument("--gen-greedy-fraction", type=float, default=1.0)
    ap.add_argument("--gen-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="dtype of the model answering the prompts (training runs on the float32 weights)")
    ap.add_argument("--gen-kv-cache-mb", type=float, default=0,
                    help="the generating engine's KV cache on a CPU (0: 256 MiB; a batch of 128 SmolLM2 answers "
                         "needs about 4,000); on CUDA the engine sizes it")
    ap.add_argument("--answer-only", action="store_true",
                    help="only answer the stream's next prompts for the budget (any device: the CPU while no GPU "
                         "is lent): answers to OUT as shard-aNNNN.safetensors, the state's prompt cursor moved "
                         "past them; the next command trains on them with --data")
    ap.add_argument("--ahead-shard-s", type=float, default=600,
                    help="with --answer-only, hand the answers over this often (and at the end)")
    ap.add_argument("--ahead-max-prompts", type=int, default=0,
                    help="with --answer-only, ask at most this many prompts (0: until the budget ends)")
    ap.add_argument("--data", type=Path, default=None,
                    help="folder of data shards (distill_recipes.py's STATE/data) trained on with this command's "
                         "fresh data; a first command continues the prompt stream after them")
    ap.add_argument("--train-on", default=None, choices=["all", "greedy"],
                    help="greedy: train on the greedy answers only (default: the state's, else all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--blocks-per-seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--loss-decay", type=float, default=3.0)
    ap.add_argument("--rewarm-steps", type=int, default=20)
    ap.add_argument("--train-compile", action="store_true",
                    help="run training's passes through torch.compile (fuses the element-wise work that took over "
                         "half of a step's kernels on an H100; not yet measured on a GPU: compare ms/step and "
                         "--profile-steps against a command without it)")
    add_eval_arguments(ap)
    ap.add_argument("--eval-estimate-s", type=float, default=90, help="one evaluation's seconds until measured")
    ap.add_argument("--max-points", type=int, default=3, help="curve points a command adds at most")
    ap.add_argument("--no-start-point", dest="start_point", action="store_false",
                    help="a first command does not evaluate the view it starts from (known already)")
    ap.add_argument("--part-mb", type=float, default=15.0)
    ap.add_argument("--out-files", type=int, default=8,
                    help="files --out may hold (the device returns 8, run.log among them): the command's answers "
                         "are returned only within it")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="training steps run under torch.profiler once --profile-after-s of the first segment have "
                         "passed (steady state); their top kernels and the allocator's counters go to the log")
    ap.add_argument("--profile-after-s", type=float, default=60.0)
    ap.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                    help="keep no checkpoint.pt (optimizer moments) in --state")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--speedup-only", action="store_true",
                    help="only time DIR's view through the engine alone (as --speedup-s does) and write speedup.json")
    ap.add_argument("--speedup-quick", action="store_true",
                    help="64-token answers and one timed run: a check of the timing path, not a measurement")
    ap.add_argument("--speedup-s", type=float, default=0,
                    help="seconds kept at the end to time the final view through the engine alone (bfloat16, "
                         "benchmarks/engine.py's SmolLM2 section: AR and Orthrus at batch 1 and 16); "
                         "writes speedup.json; 0: not timed")
    a = ap.parse_args(argv)
    try:
        split = [float(x) for x in a.split.split(",")]
    except ValueError:
        split = []
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6 or split[1] <= 0:
        print("error: --split needs three shares (generation, training, evaluation) summing to 1", file=sys.stderr)
        return 2
    if a.budget_s <= 0 or a.chain < 1:
        print("error: --budget-s must be > 0 and --chain >= 1", file=sys.stderr)
        return 2
    try:
        return run(a, split)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace, split: list[float]) -> int:
    r = Run(a)
    if a.plot_only:
        if not r.curve:
            raise FileNotFoundError(f"{a.state}/curve.json: no points")
        plot(r.curve, a.state / "curve.png")
        return 0
    if a.speedup_only:
        if not r.state or not list(r.dir.glob("view.part*")):
            raise FileNotFoundError(f"{a.state}: no state.json and view parts to time")
        time_speedup(r, a.model, a.speedup_quick)
        return 0
    if a.answer_only:
        return answer_ahead(r, a)
    deadline = T0 + a.budget_s - a.speedup_s
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 evaluation means float32
    cache = a.cache_dir or None  # a GGUF is dequantized once, not once a dtype (15 s each on 2 cores)
    loaded = load_model(a.model, "float32", a.device, None, None, None, cache_dir=cache)
    cuda = loaded.model.lm_head.weight.device.type == "cuda"
    models = {"float32": loaded}
    for dt in [d.strip() for d in a.eval_dtypes.split(",") if d.strip() and d.strip() != "float32"]:
        models[dt] = load_model(a.model, dt, a.device, None, None, None, cache_dir=cache)
    gen_model = models.get(a.gen_dtype) or load_model(a.model, a.gen_dtype, a.device, None, None, None, cache_dir=cache)
    log(f"models loaded ({', '.join(models)})")
    preloaded = D.load_shards(a.data) if a.data else None
    if a.data and not len(preloaded):
        raise FileNotFoundError(f"{a.data}: no data shards")
    st = r.state
    first = not st
    # A resumed curve keeps its data recipe unless told otherwise.
    if a.train_on is None:
        a.train_on = st.get("train_on", "all")
    elif st.get("train_on", a.train_on) != a.train_on:
        log(f"--train-on {a.train_on}: the state trained on {st['train_on']} answers until now")
    if first:
        st.update({"format": STATE_FORMAT, "commands": 0, "next_uid": 0, "init": a.init, "chain": a.chain,
                   "data_response_tokens": 0, "gen_seconds": 0.0,
                   "device": torch.cuda.get_device_name(0) if cuda else "cpu"})
        if a.init != "ar-copy":
            tensors, meta = read_diffusion_view(DEFAULT_DIFFUSION_VIEW if a.init == "default" else a.init)
            set_view(loaded.model, tensors)
            # The lineage's totals carry on (Trainer.carry_totals).
            st["init_totals"] = {k: meta[k] for k in ("tokens_seen", "target_rows_seen", "train_minutes",
                                                      "trained_steps") if k in meta}
        if preloaded is not None:  # the stream continues after the data brought along
            st["next_uid"] = int(preloaded.uids.max()) + 1
    else:
        tensors, _ = read_view_parts(r.dir)
        set_view(loaded.model, tensors)
    st["commands"] += 1
    log(f"command {st['commands']} on {st['device']}: {loaded.model_id}, view "
        f"{'from ' + str(r.dir) if not first else a.init}, {len(r.curve)} point(s) so far")

    prompts = D.load_prompts(a.prompts)
    stream = prompt_stream(loaded.tokenizer, prompts, a)
    budget_left = deadline - time.monotonic()
    # As many evaluations as the evaluation share pays for, at most --max-points: once an
    # evaluation is fast (about 20 s for SmolLM2 after the first) the share alone would buy a
    # dozen points and starve training. The first command's start point is one of them.
    start_point = first and a.start_point
    n_evals = 1
    while n_evals < a.max_points and r.eval_cost(n_evals + 1) <= split[2] * a.budget_s:
        n_evals += 1
    n_points = max(1, n_evals - (1 if start_point else 0))

    cfg = D.TrainConfig(block_size=loaded.block_size, batch_size=a.batch_size, blocks_per_seq=a.blocks_per_seq,
                        lr=a.lr, loss_decay=a.loss_decay, max_steps=0, rewarm_steps=a.rewarm_steps)
    if not first:
        cfg = D.TrainConfig(**st["config"])
        if a.chain != st["chain"]:  # a longer (or shorter) chain stretches the schedule from here
            cfg.max_steps = max(cfg.max_steps // st["chain"], round(cfg.max_steps * a.chain / st["chain"]))
            log(f"chain {st['chain']} -> {a.chain} commands: max_steps {cfg.max_steps}")
            st["chain"] = a.chain

    # Data for this command.
    gen_s = max(1.0, min(split[0] * a.budget_s, budget_left * 0.5))  # > 0: no limit would be endless
    parts: list[D.DistillData] = []
    # Greedy answers end with the first pass (a second greedy answer repeats the first).
    greedy_left = int(st["next_uid"]) < len(prompts) and a.gen_greedy_fraction > 0
    if a.train_on == "greedy" and not greedy_left:
        if preloaded is None and not D.shard_paths(r.dir / DATA_DIR):
            raise ValueError(f"every prompt has its greedy answer (the stream is at uid {st['next_uid']} of "
                             f"{len(prompts)} prompts): more greedy data needs more prompts (--prompts)")
        log("every prompt has its greedy answer: no new data, training on the answers kept and --data")
    for _ in range(5 if a.train_on == "all" or greedy_left else 0):  # enough to train on, even past the budget
        skip = st.get("answered_ahead", [])  # answered past the cursor (D.resume_skip)
        new = D.generate_data(gen_model, stream, start=int(st["next_uid"]), skip=set(skip), seconds=gen_s,
                              max_new_tokens=a.gen_max_new_tokens, max_num_seqs=a.gen_max_num_seqs,
                              kv_cache_bytes=gen_kv_bytes(a), log=log)
        parts.append(new)
        st["next_uid"], st["answered_ahead"] = D.resume_skip(new, skip)
        st["gen_seconds"] = round(st["gen_seconds"] + float(new.meta["seconds"]), 1)
        if sum(map(len, parts)) >= 4 or int(st["next_uid"]) >= len(stream):
            break
    fresh = D.DistillData.concat(parts)
    st["data_response_tokens"] += fresh.response_tokens
    # Every command's answers stay in DIR/data while the machine does, and each command trains
    # on all of them: fewer epochs over a wider set than its own answers alone.
    if len(fresh):
        r.fresh_shard = D.ShardWriter(r.dir / DATA_DIR)(fresh)
    data = D.load_shards(r.dir / DATA_DIR).first_of_each_uid()
    log(f"training data: {len(fresh)} new answers, {len(data)} kept in {DATA_DIR}/ "
        f"({data.response_tokens} response tokens)" + (f", {len(preloaded)} from --data" if preloaded else ""))
    if preloaded is not None:  # (answers carried back from earlier machines: each uid trains once)
        data = D.DistillData.concat([preloaded, data]).first_of_each_uid()
    if len(data) < 4:
        raise ValueError(f"only {len(data)} responses in {st['gen_seconds']:.0f} s of generation")
    train_data, val_data = data.split(0.02, len(prompts))
    # The replay's held-out greedy answers: the first command's, kept, so that every point
    # of the curve measures the same answers (held out by prompt, they never train).
    replay_path = r.dir / REPLAY_SET
    if replay_path.exists():
        replay_set = D.DistillData.load(replay_path)
    else:
        g = val_data.greedy_only()
        replay_set = g.subset(range(min(len(g), 64)))
        if len(replay_set):
            replay_set.save(replay_path)
    if a.train_on == "greedy":
        train_data = train_data.greedy_only()
        if len(train_data) < 2:
            raise ValueError(f"--train-on greedy: only {len(train_data)} greedy answers")
    st["train_on"] = a.train_on
    trainer = D.Trainer(loaded.model, train_data, loaded.mask_token_id, cfg, amp=torch.bfloat16 if cuda else None,
                        compile=a.train_compile)
    ck = r.dir / D.CHECKPOINT_NAME
    if not first and ck.exists() and st.get("checkpoint_step") == st["step"]:
        trainer.load(ck)
        log(f"resumed exactly from {ck} at step {trainer.step_num}")
    else:
        trainer.step_num = int(st.get("step", 0))
        if first:
            trainer.carry_totals(st.pop("init_totals", {}))
        else:
            trainer.set_totals(st)
        if not first:
            trainer.start_rewarm()
            log(f"resumed from the int8 view at step {trainer.step_num} (fresh AdamW moments, "
                f"{cfg.rewarm_steps}-step ramp)")
    before = trainer.evaluate(val_data)
    meta_fn: Callable[[], dict[str, str]] = lambda: D.view_metadata(  # noqa: E731
        trainer, loaded, train_data, st["init"],
        {"tool": "benchmarks/distill_curve.py", "commands": st["commands"], "chain": st["chain"],
         "data_response_tokens": st["data_response_tokens"], "gen_seconds": st["gen_seconds"],
         "train_on": a.train_on, "gen_greedy_fraction": a.gen_greedy_fraction, "gen_dtype": a.gen_dtype,
         "preloaded_response_tokens": preloaded.response_tokens if preloaded is not None else 0})
    if start_point:  # the curve's first point: the starting view
        st["heldout"] = {"loss": round(before.loss, 4), "acc": round(before.accuracy, 4)}
        r.save(trainer, loaded, models, meta_fn(), point=True, heldout=replay_set)
    if cfg.max_steps <= 0:  # the chain's schedule, from probe steps
        for i in range(8):
            if i == 3:
                t_probe = time.monotonic()
            trainer.probe_step()
        per = (time.monotonic() - t_probe) / 5
        train_s = max(1.0, deadline - time.monotonic() - r.eval_cost(n_points) - SAVE_S)
        cfg.max_steps = max(10, int(a.chain * train_s / per))
        cfg.warmup_steps = cfg.warmup()
        log(f"schedule: {per * 1000:.0f} ms/step -> {cfg.max_steps} steps over {a.chain} command(s), "
            f"warmup {cfg.warmup_steps}")
    for k in range(n_points):
        seg = (deadline - time.monotonic() - r.eval_cost(n_points - k) - SAVE_S) / (n_points - k)
        if seg < 0.5:  # over budget already: one short segment, so that every command trains
            log(f"segment {k + 1} of {n_points}: {seg:.1f} s left, training 0.5 s")
            seg = 0.5
        if k == 0 and a.profile_steps > 0 and seg > a.profile_after_s:
            t_seg = time.monotonic()
            D.train(trainer, minutes=a.profile_after_s / 60, save_every=0, log_every=50, progress=False, log=log)
            profile_steps(trainer, a.profile_steps)
            seg -= time.monotonic() - t_seg
        D.train(trainer, minutes=max(seg, 0.5) / 60, save_every=0, log_every=50, progress=False, log=log)
        log_memory()
        vs = trainer.evaluate(val_data)
        st["heldout"] = {"loss": round(vs.loss, 4), "acc": round(vs.accuracy, 4), "before": round(before.loss, 4)}
        r.save(trainer, loaded, models, meta_fn(), point=True, heldout=replay_set)
    if not r.curve or r.curve[-1]["step"] != trainer.step_num:  # else the last point's save wrote it all
        r.save(trainer, loaded, models, meta_fn(), point=False)
    log(f"command {st['commands']} done: step {trainer.step_num}/{cfg.max_steps}, "
        f"{trainer.tokens_seen / 1e6:.2f} M tokens seen, {len(r.curve)} point(s)")
    if a.speedup_s > 0:
        del trainer, models
        time_speedup(r, a.model, a.speedup_quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
