"""`orthrus bench`: a load generator for a running Orthrus Serve application.

Sends prompts over HTTP (the OpenAI-compatible streaming endpoints) or gRPC
(Orthrus.Generate), at a fixed concurrency or a Poisson request rate, and reports
request and output-token throughput, TTFT, TPOT, inter-token latency (mean, p50,
p90, p99) and the mean acceptance length the server reports per request. Writes a
JSON report and a PNG chart.

Definitions (those of vLLM's benchmark_serving, so numbers compare):
  TTFT  time from sending the request to the first non-empty text increment;
  ITL   time between successive non-empty increments (one increment may carry
        several tokens in orthrus mode);
  TPOT  per request, (latency - TTFT) / (completion tokens - 1);
  E2EL  time from sending to the end of the stream.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from orthrus_runtime.defaults import DATA_DIR

BUILTIN_DIR = DATA_DIR / "prompts"
PERCENTILES = (50, 90, 99)


class BenchError(Exception):
    """A bad argument or input file: reported as one line, exit status 2."""


# --------------------------------------------------------------------------- prompts


@dataclass
class PromptItem:
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None
    max_tokens: Optional[int] = None

    def as_text(self) -> str:
        """A plain prompt for the completions/gRPC-prompt path: the conversation's turns."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m["content"] for m in self.messages or [])


def builtin_sets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


def parse_prompt_line(obj: Any, where: str) -> PromptItem:
    if not isinstance(obj, dict):
        raise BenchError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        raise BenchError(f"{where}: give exactly one of 'prompt' or 'messages'")
    item = PromptItem()
    if has_p:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise BenchError(f"{where}: 'prompt' must be a non-empty string")
        item.prompt = obj["prompt"]
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise BenchError(f"{where}: 'messages' must be a non-empty list of {{role, content}} string objects")
        item.messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "max_tokens" in obj:
        mt = obj["max_tokens"]
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise BenchError(f"{where}: 'max_tokens' must be a positive integer")
        item.max_tokens = mt
    return item


def load_prompt_file(path: Path) -> list[PromptItem]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BenchError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    items = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}:{i}: not valid JSON: {e.msg}") from None
        items.append(parse_prompt_line(obj, f"{path}:{i}"))
    if not items:
        raise BenchError(f"{path}: no prompts")
    return items


def load_prompts(prompts_file: Optional[str], dataset: str, num: int, seed: int) -> list[PromptItem]:
    """num prompts from a JSONL file or a built-in set, shuffled with seed, repeated when short."""
    if prompts_file:
        items = load_prompt_file(Path(prompts_file))
    else:
        if dataset not in builtin_sets():
            raise BenchError(f"unknown built-in prompt set {dataset!r}; available: {', '.join(builtin_sets())}")
        items = load_prompt_file(BUILTIN_DIR / f"{dataset}.jsonl")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[order[i % len(order)]] for i in range(num)]


# --------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    index: int
    ok: bool = False
    error: Optional[str] = None
    error_code: Optional[str] = None  # HTTP status or gRPC status name
    start_s: float = 0.0  # relative to the benchmark start
    ttft_s: Optional[float] = None
    latency_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    stats: Optional[dict[str, Any]] = None  # the server's AcceptanceStats of this request

    @property
    def tpot_s(self) -> Optional[float]:
        if not self.ok or self.ttft_s is None or self.latency_s is None or self.completion_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.completion_tokens - 1)


class _Timer:
    """Marks the first and each later non-empty increment of one stream."""

    def __init__(self, res: RequestResult, t0: float):
        self.res, self.t0, self.last = res, t0, None

    def text(self, s: str) -> None:
        if not s:
            return
        now = time.perf_counter()
        if self.last is None:
            self.res.ttft_s = now - self.t0
        else:
            self.res.itl_s.append(now - self.last)
        self.last = now

    def done(self) -> None:
        self.res.latency_s = time.perf_counter() - self.t0


def _as_chat(item: PromptItem, api: str) -> Optional[list[dict[str, str]]]:
    """The messages to send, or None to send a plain prompt."""
    if api == "completions":
        return None
    if item.messages is not None:
        return item.messages
    return [{"role": "user", "content": item.prompt or ""}] if api == "chat" else None


def _request_body(item: PromptItem, args: argparse.Namespace, model: str) -> tuple[str, dict[str, Any]]:
    messages = _as_chat(item, args.api)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": item.max_tokens or args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.mode:
        body["mode"] = args.mode
    if args.seed_requests:
        body["seed"] = args.seed
    if messages is not None:
        body["messages"] = messages
        return "/v1/chat/completions", body
    body["prompt"] = item.as_text()
    return "/v1/completions", body


async def _http_one(client, base: str, headers: dict, item: PromptItem, args, model: str, res: RequestResult) -> None:
    path, body = _request_body(item, args, model)
    t0 = time.perf_counter()
    timer = _Timer(res, t0)
    chat = path.endswith("chat/completions")
    usage = None
    async with client.stream("POST", base + path, json=body, headers=headers, timeout=args.timeout) as resp:
        if resp.status_code != 200:
            raw = (await resp.aread()).decode(errors="replace")
            try:
                msg = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = raw[:200]
            res.error_code, res.error = str(resp.status_code), msg
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:  # an error after the stream started
                res.error_code = str(chunk["error"].get("code") or "stream_error")
                res.error = chunk["error"].get("message", "error in stream")
                return
            for choice in chunk.get("choices") or []:
                text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
                timer.text(text)
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("orthrus"):
                res.stats = chunk["orthrus"]
    timer.done()
    if usage is None:
        res.error_code, res.error = "no_usage", "the stream ended without a usage chunk"
        return
    res.prompt_tokens = int(usage["prompt_tokens"])
    res.completion_tokens = int(usage["completion_tokens"])
    res.ok = True


async def _grpc_one(stub, metadata, item: PromptItem, args, res: RequestResult) -> None:
    import grpc

    from orthrus_runtime.client import build_request
    from orthrus_runtime.proto import orthrus_pb2 as pb

    messages = _as_chat(item, args.api)
    req = build_request(
        None if messages is not None else item.as_text(), messages=messages,
        max_tokens=item.max_tokens or args.max_tokens, temperature=args.temperature,
        seed=args.seed if args.seed_requests else None, mode=args.mode,
    )
    t0 = time.perf_counter()
    timer = _Timer(res, t0)
    last = None
    try:
        async for msg in stub.Generate(req, metadata=metadata, timeout=args.timeout):
            timer.text(msg.text)
            last = msg
    except grpc.aio.AioRpcError as e:
        res.error_code, res.error = e.code().name, e.details()
        return
    timer.done()
    if last is None or not last.finished:
        res.error_code, res.error = "no_final", "the stream ended without a finished message"
        return
    res.prompt_tokens = last.usage.prompt_tokens
    res.completion_tokens = last.usage.completion_tokens
    res.finish_reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    s = last.stats
    res.stats = {"num_cycles": s.num_cycles, "num_draft_tokens": s.num_draft_tokens,
                 "num_accepted_tokens": s.num_accepted_tokens,
                 "accepted_per_position": list(s.accepted_per_position)}
    res.ok = True


# --------------------------------------------------------------------------- the run


async def _arrivals(n: int, rate: Optional[float], seed: int):
    """Yields request indices: at once, or as a Poisson process of the given rate."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield i
        if rate is not None and math.isfinite(rate) and i < n - 1:
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))


async def _drive(send, n: int, args, progress) -> tuple[list[RequestResult], float]:
    """Runs n requests through send(index, result), honouring concurrency and rate."""
    results = [RequestResult(index=i) for i in range(n)]
    limit = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    t_start = time.perf_counter()

    async def one(i: int) -> None:
        res = results[i]
        try:
            res.start_s = time.perf_counter() - t_start
            await send(i, res)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a transport failure is a failed request, not a crash of the run
            res.ok, res.error_code, res.error = False, type(e).__name__, str(e) or type(e).__name__
        finally:
            if limit is not None:
                limit.release()
            progress.update(1)

    tasks = []
    try:
        async for i in _arrivals(n, args.request_rate, args.seed):
            if limit is not None:
                await limit.acquire()
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return results, time.perf_counter() - t_start


async def _run_http(args, items: list[PromptItem], progress) -> tuple[list[RequestResult], float, str]:
    import httpx

    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency or 0, 256), max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:
        model = args.model
        if not model:
            try:
                r = await client.get(base + "/v1/models", headers=headers)
            except httpx.HTTPError as e:
                raise BenchError(f"cannot reach {base}: {type(e).__name__}: {e}") from None
            if r.status_code != 200:
                raise BenchError(f"GET {base}/v1/models answered {r.status_code}: {r.text[:200]}")
            model = r.json()["data"][0]["id"]

        async def send(i: int, res: RequestResult) -> None:
            await _http_one(client, base, headers, items[i], args, model, res)

        results, duration = await _drive(send, len(items), args, progress)
    return results, duration, model


async def _run_grpc(args, items: list[PromptItem], progress) -> tuple[list[RequestResult], float, str]:
    import grpc

    from orthrus_runtime.proto import orthrus_pb2 as pb
    from orthrus_runtime.proto import orthrus_pb2_grpc as pb_grpc

    metadata = []
    if args.application:
        metadata.append(("application", args.application))
    if args.api_key:
        metadata.append(("authorization", f"Bearer {args.api_key}"))
    async with grpc.aio.insecure_channel(args.grpc_target) as channel:
        stub = pb_grpc.OrthrusStub(channel)
        try:
            info = await stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as e:
            raise BenchError(f"ModelInfo on {args.grpc_target} failed: {e.code().name}: {e.details()}") from None

        async def send(i: int, res: RequestResult) -> None:
            await _grpc_one(stub, metadata, items[i], args, res)

        results, duration = await _drive(send, len(items), args, progress)
    return results, duration, info.model_id


# --------------------------------------------------------------------------- report


def _dist_ms(values: list[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(values, dtype=float) * 1000.0
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def _count(keys) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors = _count(r.error_code or "unknown" for r in results if not r.ok)
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    cycles = drafts = accepted = 0
    per_pos: list[int] = []
    for r in ok:
        if not r.stats:
            continue
        cycles += int(r.stats.get("num_cycles", 0))
        drafts += int(r.stats.get("num_draft_tokens", 0))
        accepted += int(r.stats.get("num_accepted_tokens", 0))
        for i, v in enumerate(r.stats.get("accepted_per_position") or []):
            if i >= len(per_pos):
                per_pos.append(0)
            per_pos[i] += int(v)
    d = duration_s if duration_s > 0 else float("nan")
    return {
        "duration_s": duration_s,
        "sent": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / d,
        "output_throughput": out_tokens / d,
        "total_token_throughput": (in_tokens + out_tokens) / d,
        "ttft_ms": _dist_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": _dist_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": _dist_ms([x for r in ok for x in r.itl_s]),
        "e2el_ms": _dist_ms([r.latency_s for r in ok if r.latency_s is not None]),
        "finish_reasons": _count(r.finish_reason or "unknown" for r in ok),
        "acceptance": {
            "num_cycles": cycles,
            "num_draft_tokens": drafts,
            "num_accepted_tokens": accepted,
            "accepted_per_position": per_pos,
            # Tokens emitted per decode cycle, over all requests (AcceptanceStats' definition).
            "mean_acceptance_length": (accepted + cycles) / cycles if cycles else None,
            "acceptance_rate": accepted / drafts if drafts else None,
        },
    }


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_png(results: list[RequestResult], summary: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; never touches a GUI toolkit
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(title, fontsize=11)

    ax = axes[0][0]
    ends = sorted(r.start_s + (r.latency_s or 0.0) for r in ok)
    toks = [r.completion_tokens for r in sorted(ok, key=lambda r: r.start_s + (r.latency_s or 0.0))]
    ax.plot([0.0] + ends, [0] + list(np.cumsum(toks)), drawstyle="steps-post")
    ax.set_title(f"Output tokens completed ({summary['output_throughput']:.1f} tok/s)")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("tokens")

    ax = axes[0][1]
    starts = [r.start_s for r in ok]
    ax.scatter(starts, [1000 * (r.ttft_s or 0) for r in ok], s=10, label="TTFT")
    ax.scatter(starts, [1000 * (r.latency_s or 0) for r in ok], s=10, label="end-to-end")
    ax.set_title("Latency per request")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("ms")
    ax.legend()

    ax = axes[1][0]
    itl = [1000 * x for r in ok for x in r.itl_s]
    tpot = [1000 * r.tpot_s for r in ok if r.tpot_s is not None]
    bins = np.histogram_bin_edges(itl + tpot, bins=40) if itl or tpot else 10
    if itl:
        ax.hist(itl, bins=bins, alpha=0.6, label="ITL (per increment)")
    if tpot:
        ax.hist(tpot, bins=bins, alpha=0.6, label="TPOT (per request)")
    ax.set_title("Inter-token latency and time per output token")
    ax.set_xlabel("ms")
    ax.set_ylabel("count")
    if itl or tpot:
        ax.legend()

    ax = axes[1][1]
    acc = summary["acceptance"]
    if acc["num_cycles"] and acc["accepted_per_position"]:
        rates = [v / acc["num_cycles"] for v in acc["accepted_per_position"]]
        ax.bar(range(len(rates)), rates)
        ax.set_xticks(range(len(rates)))
        ax.set_ylim(0, 1)
        ax.set_title(f"Acceptance by draft position (mean length {acc['mean_acceptance_length']:.2f})")
        ax.set_xlabel("draft position")
        ax.set_ylabel("accepted / cycles")
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no draft statistics (ar mode)", ha="center", va="center")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_summary(s: dict[str, Any], out=sys.stdout) -> None:
    def dist(name: str, d: dict) -> str:
        if d["mean"] is None:
            return f"{name:<6} -"
        return f"{name:<6} mean {d['mean']:9.2f}  p50 {d['p50']:9.2f}  p90 {d['p90']:9.2f}  p99 {d['p99']:9.2f} ms"

    acc = s["acceptance"]
    mal = acc["mean_acceptance_length"]
    lines = [
        f"requests      sent {s['sent']}, completed {s['completed']}, failed {s['failed']} {s['errors'] or ''}".rstrip(),
        f"duration      {s['duration_s']:.2f} s",
        f"throughput    {s['request_throughput']:.3f} req/s, {s['output_throughput']:.1f} output tok/s, "
        f"{s['total_token_throughput']:.1f} total tok/s",
        dist("TTFT", s["ttft_ms"]), dist("TPOT", s["tpot_ms"]), dist("ITL", s["itl_ms"]), dist("E2EL", s["e2el_ms"]),
        f"acceptance    mean length {mal:.3f}" + (f", rate {acc['acceptance_rate']:.3f}" if acc["acceptance_rate"] is not None else "")
        if mal is not None else "acceptance    -",
    ]
    print("\n".join(lines), file=out)


# --------------------------------------------------------------------------- CLI


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _rate(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL (default %(default)s)")
    parser.add_argument("--grpc-target", default="127.0.0.1:9000", help="gRPC host:port (default %(default)s)")
    parser.add_argument("--application", default=None,
                        help="gRPC: the Serve application to address (metadata 'application')")
    parser.add_argument("--api-key", default=os.environ.get("ORTHRUS_API_KEY"),
                        help="API key (default: $ORTHRUS_API_KEY)")
    parser.add_argument("--model", default=None, help="model name (default: the server's)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                     help="one JSON object per line: {\"prompt\": str} or {\"messages\": [...]}, optional \"max_tokens\"")
    src.add_argument("--dataset", default="chat", help=f"built-in prompt set: {', '.join(builtin_sets())} (default %(default)s)")
    parser.add_argument("--api", choices=("auto", "completions", "chat"), default="auto",
                        help="auto: chat for message prompts, completions for text prompts; "
                             "completions: send conversations as plain text")
    parser.add_argument("-n", "--num-prompts", type=_positive_int, default=64)
    parser.add_argument("-c", "--concurrency", type=_positive_int, default=None,
                        help="requests in flight at most (default 8 without --request-rate)")
    parser.add_argument("-r", "--request-rate", type=_rate, default=None,
                        help="Poisson arrivals per second (inf: all at once; default: fixed concurrency)")
    parser.add_argument("--max-tokens", type=_positive_int, default=128, help="per request, unless the prompt sets it")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--mode", choices=("orthrus", "ar"), default=None, help="decoding mode (default: the server's)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles prompts and arrival times")
    parser.add_argument("--seed-requests", action="store_true", help="also send --seed as each request's sampling seed")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--output-json", default="bench.json")
    parser.add_argument("--output-png", default="bench.png", help="chart; '' to skip")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = 8
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    target = args.url if args.protocol == "http" else args.grpc_target
    try:
        items = load_prompts(args.prompts, args.dataset, args.num_prompts, args.seed)
        from tqdm import tqdm

        with tqdm(total=len(items), desc=f"bench {args.protocol}", unit="req", disable=args.no_progress,
                  file=sys.stderr) as progress:
            runner = _run_http if args.protocol == "http" else _run_grpc
            results, duration, model = asyncio.run(runner(args, items, progress))
    except BenchError as e:
        print(f"orthrus bench: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(results, duration)
    rate = args.request_rate
    config = {
        "protocol": args.protocol, "target": target, "model": model, "mode": args.mode,
        "prompts": args.prompts or f"builtin:{args.dataset}", "api": args.api, "num_prompts": args.num_prompts,
        "concurrency": args.concurrency,
        "request_rate": None if rate is None else ("inf" if math.isinf(rate) else rate),
        "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed, "started_at": started_at,
    }
    report = {"config": config, "summary": summary,
              "requests": [{**asdict(r), "tpot_s": r.tpot_s} for r in results]}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    if args.output_png:
        rate_s = "-" if rate is None else f"{rate:g}/s"
        write_png(results, summary, f"orthrus bench: {model} over {args.protocol}, {args.mode or 'server mode'}, "
                  f"concurrency {args.concurrency or '-'}, rate {rate_s}", Path(args.output_png))
    _print_summary(summary)
    if args.output_json:
        print(f"report: {args.output_json}" + (f", chart: {args.output_png}" if args.output_png else ""))
    # Non-zero when any request failed, so scripts notice.
    return 0 if summary["failed"] == 0 else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="orthrus bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
