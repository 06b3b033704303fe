"""lm-evaluation-harness against `orthrus serve`: `local-completions` on two small local tasks.

    pip install "lm-eval[api]==0.4.13"          # into the project's venv (no torch change)
    python benchmarks/lm_eval_run.py --out benchmarks/results

What one run does (about 3 minutes on 2 CPU cores; the numbers are in docs/lm-eval.md):

1. reads the embedded SmolLM2-135M-Instruct GGUF with transformers (float32) and saves its
   tokenizer to a temporary folder: lm-eval needs a tokenizer for loglikelihood requests
   (it counts the context's tokens itself) and cannot reach the HF hub here;
2. starts `orthrus serve --config deployment/configs/serve_config.yaml` (the CPU default) on
   free ports with a Ray temp dir of its own, and waits for /ready;
3. runs lm-eval's `local-completions` model (token-id prompts, batch 1) on
   benchmarks/lm_eval/orthrus_mc.yaml (loglikelihood: 16 questions x 4 choices, acc and
   acc_norm) and orthrus_qa.yaml (generate_until: 16 one-word questions, exact match);
4. stops the server with SIGTERM to its pid (a server started from a script ignores SIGINT)
   and checks that no process of its Ray is left;
5. cross-checks: scores the same (context, continuation) pairs directly with transformers on
   the same float32 weights, and greedy-generates the same QA prompts, and reports how far
   they are from what lm-eval got over HTTP;
6. writes <out>/<date>-lm-eval-smollm2.json (date, commit, settings, metrics, per-request
   agreement, seconds) and prints a summary.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASK_DIR = ROOT / "benchmarks" / "lm_eval"
TASKS = ("orthrus_mc", "orthrus_qa")
DEFAULT_CONFIG = ROOT / "deployment" / "configs" / "serve_config.yaml"

# lm-eval and datasets must not try the hub (no network here; the tasks are local files).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _log(msg: str) -> None:
    print(f"[lm_eval_run {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a checkout
        return ""


def _model_id(config: Path) -> str:
    import yaml

    cfg = yaml.safe_load(config.read_text())
    return cfg["applications"][0]["args"]["model_id"]


def load_reference():
    """(transformers model, tokenizer) of the embedded GGUF, float32: what the server loads."""
    from orthrus_runtime.model.loader import load_tokenizer, default_gguf_path, gguf_hf_model

    gguf = default_gguf_path()
    model = gguf_hf_model(gguf)
    tok = load_tokenizer(gguf.parent, gguf.name)
    model.eval()
    return model, tok, gguf


# ---------------------------------------------------------------------------------- server


class Server:
    """`orthrus serve` in a subprocess; stop() sends SIGTERM to its pid and waits."""

    def __init__(self, config: Path, num_cpus: int | None):
        self.http_port, self.grpc_port = _free_port(), _free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="orlme", dir="/tmp")
        self.log_path = Path(self.temp_dir) / "serve.log"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("ORTHRUS_API_KEYS", None)
        cmd = [sys.executable, "-m", "orthrus_runtime.tools.cli", "serve", "--config", str(config),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--ray-temp-dir", self.temp_dir, "--timeout", "600"]
        if num_cpus:
            cmd += ["--num-cpus", str(num_cpus)]
        self.cmd = cmd
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout_s: float = 600) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"orthrus serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base + "/ready", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(1)
        raise RuntimeError(f"orthrus serve not ready after {timeout_s:g}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "".join(self.log_path.read_text().splitlines(keepends=True)[-n:])
        except OSError:
            return ""

    def _leftovers(self) -> list[int]:
        """Pids of processes whose command line names this server's Ray temp dir (its Ray)."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if self.temp_dir in cmdline:
                out.append(int(d.name))
        return out

    def stop(self, timeout_s: float = 90) -> dict[str, Any]:
        t0 = time.monotonic()
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _log("server did not stop after SIGTERM; killing it")
                self.proc.kill()
                rc = self.proc.wait()
        self._log.close()
        # Ray's own processes exit shortly after ray.shutdown(); give them a moment.
        deadline = time.monotonic() + 20
        left = self._leftovers()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self._leftovers()
        for pid in left:  # ours (they name our temp dir): end them by pid
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        return {"returncode": rc, "stop_s": round(time.monotonic() - t0, 1), "leftover_processes": len(left)}


# ---------------------------------------------------------------------------------- lm-eval


def run_lm_eval(task: str, model_args: dict[str, Any], limit: int | None, task_manager) -> tuple[dict, float]:
    import lm_eval

    t0 = time.monotonic()
    res = lm_eval.simple_evaluate(
        model="local-completions", model_args=dict(model_args), tasks=[task],
        task_manager=task_manager, batch_size=1, limit=limit,
        log_samples=True,
    )
    return res, time.monotonic() - t0


def _metrics(res: dict, task: str) -> dict[str, float]:
    r = res["results"][task]
    return {k: float(v) for k, v in r.items() if "," in k and isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------- cross-check


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for a causal model (no special tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def cross_check_mc(model, tok, samples: list[dict]) -> dict[str, Any]:
    import numpy as np
    import torch

    diffs, greedy_agree, n_req = [], 0, 0
    acc_http, acc_ref, norm_http, norm_ref, pred_agree = [], [], [], [], 0
    worst = None
    for s in samples:
        lls_http = [float(r[0]) for r in s["filtered_resps"]]
        greedy_http = [bool(r[1]) for r in s["filtered_resps"]]
        lls_ref, greedy_ref = [], []
        for context, continuation in s["arguments"]:
            ctx, cont = _encode_pair(tok, context, continuation)
            ids = ctx + cont
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            pos = torch.arange(len(ctx) - 1, len(ids) - 1)
            target = torch.tensor(cont)
            lls_ref.append(float(logp[pos, target].sum()))
            greedy_ref.append(bool((logp[pos].argmax(-1) == target).all()))
        for a, b, ga, gb, (context, continuation) in zip(lls_http, lls_ref, greedy_http, greedy_ref, s["arguments"]):
            d = abs(a - b)
            diffs.append(d)
            greedy_agree += ga == gb
            n_req += 1
            if worst is None or d > worst["abs_diff"]:
                worst = {"context": context, "continuation": continuation, "http": a, "reference": b, "abs_diff": d}
        choices = s["doc"]["choices"]
        lens = np.array([float(len(c)) for c in choices])
        gold = int(s["target"])
        ph, pr = int(np.argmax(lls_http)), int(np.argmax(lls_ref))
        pred_agree += ph == pr
        acc_http.append(ph == gold)
        acc_ref.append(pr == gold)
        norm_http.append(int(np.argmax(np.array(lls_http) / lens)) == gold)
        norm_ref.append(int(np.argmax(np.array(lls_ref) / lens)) == gold)
    return {
        "requests": n_req,
        "max_abs_loglik_diff": max(diffs),
        "mean_abs_loglik_diff": sum(diffs) / len(diffs),
        "is_greedy_agree": f"{greedy_agree}/{n_req}",
        "predictions_agree": f"{pred_agree}/{len(samples)}",
        "acc_http": sum(acc_http) / len(samples), "acc_reference": sum(acc_ref) / len(samples),
        "acc_norm_http": sum(norm_http) / len(samples), "acc_norm_reference": sum(norm_ref) / len(samples),
        "worst": worst,
    }


def cross_check_qa(model, tok, samples: list[dict]) -> dict[str, Any]:
    import torch

    same, rows = 0, []
    for s in samples:
        context, gen_kwargs = s["arguments"][0]
        ids = tok(context, add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=int(gen_kwargs["max_gen_toks"]), do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
        for stop in list(gen_kwargs["until"]) + [tok.eos_token]:
            if stop and stop in text:
                text = text[:text.index(stop)]
        http = s["resps"][0][0]
        same += http == text
        rows.append({"question": s["doc"]["question"], "target": s["target"], "http": http, "reference": text,
                     "exact_match": float(s["exact_match"])})
    return {"generations_identical": f"{same}/{len(samples)}", "rows": rows}


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of the results JSON")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="serve config (default: the CPU default)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the server's local Ray (default: all)")
    ap.add_argument("--num-concurrent", type=int, default=1, help="lm-eval's concurrent requests")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of %(default)s")
    ap.add_argument("--limit", type=int, default=None, help="first N documents of each task (a smoke run)")
    ap.add_argument("--no-cross-check", action="store_true", help="skip the transformers cross-check")
    ap.add_argument("--name", default=None, help="results file name (default: <date>-lm-eval-smollm2.json)")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        ap.error(f"unknown tasks {sorted(unknown)}; known: {TASKS}")

    import lm_eval
    import torch
    import transformers

    seconds: dict[str, float] = {}
    t_all = time.monotonic()
    config = Path(args.config).resolve()
    model_id = _model_id(config)

    t0 = time.monotonic()
    model, tok, gguf = load_reference()
    tok_dir = tempfile.mkdtemp(prefix="orlme-tok", dir="/tmp")
    tok.save_pretrained(tok_dir)
    seconds["load_reference_and_tokenizer"] = round(time.monotonic() - t0, 1)
    _log(f"tokenizer of {gguf.name} saved to {tok_dir} ({seconds['load_reference_and_tokenizer']}s)")

    server = Server(config, args.num_cpus)
    _log(f"started: {' '.join(server.cmd)} (pid {server.proc.pid}, log {server.log_path})")
    results: dict[str, Any] = {}
    stopped: dict[str, Any] = {}
    try:
        seconds["server_ready"] = round(server.wait_ready(), 1)
        _log(f"ready at {server.base} after {seconds['server_ready']}s")
        model_args = {
            "base_url": f"{server.base}/v1/completions",
            "model": model_id,
            "tokenizer": tok_dir,
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "num_concurrent": args.num_concurrent,
            "max_length": 2048,
            "max_retries": 1,
            "timeout": 600,
        }
        from lm_eval.tasks import TaskManager

        # Only our folder: indexing lm-eval's own 200-odd task folders takes seconds and is unused.
        task_manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
        for task in tasks:
            _log(f"lm-eval {task}...")
            res, secs = run_lm_eval(task, model_args, args.limit, task_manager)
            results[task] = res
            seconds[f"lm_eval_{task}"] = round(secs, 1)
            _log(f"{task}: {_metrics(res, task)} in {secs:.1f}s")
    finally:
        stopped = server.stop()
        _log(f"server stopped: {stopped}")
        shutil.rmtree(tok_dir, ignore_errors=True)
        if stopped["returncode"] == 0 and stopped["leftover_processes"] == 0:
            shutil.rmtree(server.temp_dir, ignore_errors=True)  # kept (with serve.log) otherwise

    cross: dict[str, Any] = {}
    if not args.no_cross_check:
        t0 = time.monotonic()
        if "orthrus_mc" in results:
            cross["orthrus_mc"] = cross_check_mc(model, tok, results["orthrus_mc"]["samples"]["orthrus_mc"])
        if "orthrus_qa" in results:
            cross["orthrus_qa"] = cross_check_qa(model, tok, results["orthrus_qa"]["samples"]["orthrus_qa"])
        seconds["cross_check"] = round(time.monotonic() - t0, 1)
    seconds["total"] = round(time.monotonic() - t_all, 1)

    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    public_args = {k: v for k, v in model_args.items() if k not in ("tokenizer", "base_url")}
    out = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit + ("-dirty" if dirty else ""),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "lm_eval": getattr(lm_eval, "__version__", "")},
        "settings": {
            "server": f"orthrus serve --config {config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}",
            "model_id": model_id, "weights": gguf.name,
            "lm_eval_model": "local-completions",
            "model_args": {**public_args, "tokenizer": f"saved from {gguf.name}", "base_url": "/v1/completions"},
            "batch_size": 1, "limit": args.limit, "tasks": tasks,
            "reference": "transformers AutoModelForCausalLM on the same GGUF, float32",
        },
        "metrics": {t: _metrics(results[t], t) for t in tasks},
        "n_samples": {t: results[t]["n-samples"][t] for t in tasks},
        "cross_check": cross,
        "server_stop": stopped,
        "seconds": seconds,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = args.name or f"{datetime.date.today().isoformat()}-lm-eval-smollm2.json"
    path = Path(args.out) / name
    path.write_text(json.dumps(out, indent=2) + "\n")

    print(f"lm-eval {out['machine']['lm_eval']} local-completions -> orthrus serve ({model_id}), commit {out['commit'][:12]}")
    for t in tasks:
        m = ", ".join(f"{k} {v:.4f}" for k, v in out["metrics"][t].items())
        print(f"  {t:11s} {out['n_samples'][t]['effective']:3d} docs  {m}  ({seconds[f'lm_eval_{t}']}s)")
    if "orthrus_mc" in cross:
        c = cross["orthrus_mc"]
        print(f"  cross-check (transformers, float32): {c['requests']} loglikelihoods, max |diff| "
              f"{c['max_abs_loglik_diff']:.2e}, mean {c['mean_abs_loglik_diff']:.2e}; is_greedy agree "
              f"{c['is_greedy_agree']}; predictions agree {c['predictions_agree']}; acc {c['acc_http']:.4f} vs "
              f"{c['acc_reference']:.4f}, acc_norm {c['acc_norm_http']:.4f} vs {c['acc_norm_reference']:.4f}")
    if "orthrus_qa" in cross:
        print(f"  cross-check generations identical: {cross['orthrus_qa']['generations_identical']}")
    print(f"  server: ready {seconds['server_ready']}s, stopped by SIGTERM rc {stopped.get('returncode')}, "
          f"leftover processes {stopped.get('leftover_processes')}; total {seconds['total']}s")
    print(f"  wrote {path}")
    ok = stopped.get("leftover_processes", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
