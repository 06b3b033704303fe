"""`orthrus generate`: one prompt through the engine, streamed or as JSON."""
from __future__ import annotations

import argparse
import json
import sys
import time

from orthrus_runtime.types import MODES, GenerateRequest, InvalidRequestError, SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--diffusion-weights", default="default",
                   help="diffusion-view safetensors to lay over the model ('default': the trained view of the default model; 'none': AR copy)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mode", choices=MODES, default="orthrus")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")


def run(args: argparse.Namespace) -> int:
    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.engine.llm_engine import LLMEngine
    from orthrus_runtime.engine.output_processor import OutputProcessor
    from orthrus_runtime.engine.setup import engine_config_from_args, load

    dw = None if args.diffusion_weights == "none" else args.diffusion_weights
    eargs = EngineArgs(model=args.model, diffusion_weights=dw, dtype=args.dtype, device=args.device,
                       block_size=args.block_size, max_num_seqs=1)
    loaded = load(eargs)
    engine = LLMEngine(loaded.model, engine_config_from_args(eargs, loaded), loaded.tokenizer)
    tok = loaded.tokenizer
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    if not args.raw and tok is not None and getattr(tok, "chat_template", None):
        req = GenerateRequest(messages=[{"role": "user", "content": args.prompt}], params=params, mode=args.mode)
    else:
        req = GenerateRequest(prompt=args.prompt, params=params, mode=args.mode)
    outputs = OutputProcessor(tok)
    try:
        rid = engine.add_request(req)
    except InvalidRequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outputs.add(rid, engine.seqs[rid].prompt_token_ids, params)
    t0 = time.perf_counter()
    ids: list[int] = []
    text = ""
    final = None
    while engine.has_work():
        for d in engine.step_outputs(outputs):
            ids += d.token_ids
            text += d.text
            if not args.json and d.text:
                sys.stdout.write(d.text)
                sys.stdout.flush()
            if d.finished:
                final = d
    dt = time.perf_counter() - t0
    st = final.stats
    result = {
        "text": text, "token_ids": ids, "finish_reason": final.finish_reason, "mode": args.mode,
        "block_size": loaded.block_size, "num_cycles": st.num_cycles,
        "mean_accepted_length": st.mean_accepted_length, "acceptance_rate": st.acceptance_rate,
        "accepted_per_position": st.accepted_per_position, "prompt_tokens": final.usage.prompt_tokens,
        "completion_tokens": final.usage.completion_tokens, "seconds": dt,
        "tokens_per_second": len(ids) / dt if dt > 0 else 0.0, "diffusion_view": loaded.diffusion_source,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print()
        print(f"[{len(ids)} tokens in {dt:.2f}s, {result['tokens_per_second']:.1f} tok/s, {args.mode}, "
              f"{st.num_cycles} cycles, {st.mean_accepted_length:.2f} tokens/cycle, finish={final.finish_reason}]",
              file=sys.stderr)
    return 0
