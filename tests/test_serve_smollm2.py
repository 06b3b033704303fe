"""`orthrus serve` with the shipped default config: the embedded SmolLM2 on CPU.

Runs the real command in a subprocess (a local Ray of its own), talks to it
with the OpenAI client and the gRPC client command, and stops it with Ctrl-C.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from orthrus_runtime.client import OrthrusClient
from orthrus_runtime.proto import orthrus_pb2 as pb
from processes import free_port  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "smollm2-135m-orthrus"  # the name in deployment/configs/serve_config.yaml



def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def server():
    http_port, grpc_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="orsm", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("ORTHRUS_API_KEYS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orthrus_runtime.tools.cli", "serve", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--ray-temp-dir", temp_dir, "--timeout", "600"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: "queue.Queue[str]" = queue.Queue()
    output: list[str] = []

    def pump():
        for line in proc.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 600
    while True:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            line = ""
        if "serving; Ctrl-C to stop" in line:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("orthrus serve did not come up:\n" + "".join(output[-60:]))
    try:
        yield {"http": http_port, "grpc": grpc_port, "proc": proc, "output": output}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def test_addresses_are_printed(server):
    text = "".join(server["output"])
    assert f"http://127.0.0.1:{server['http']}/v1" in text
    assert f"127.0.0.1:{server['grpc']}" in text


def test_smollm2_over_both_protocols(server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server['http']}/v1", api_key="unused", max_retries=0,
                           timeout=300)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    chat = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=12, temperature=0)
    answer = chat.choices[0].message.content
    assert "Paris" in answer, answer
    stats = chat.model_extra["orthrus"]
    assert stats["num_cycles"] >= 1

    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL_ID, messages=msgs, max_tokens=12, temperature=0, stream=True))
    assert streamed == answer

    # gRPC: the same greedy request gives the same text, in both decoding modes
    # (Orthrus decoding is lossless).
    with OrthrusClient(f"127.0.0.1:{server['grpc']}", timeout=300) as c:
        for mode in ("orthrus", "ar"):
            r = c.complete(messages=msgs, max_tokens=12, temperature=0, mode=mode)
            assert r.text == answer, (mode, r.text)
        parts = list(c.generate(messages=msgs, max_tokens=12, temperature=0))
        assert "".join(p.text for p in parts) == answer and parts[-1].finished
        info = c.model_info()
        assert info.model_id == MODEL_ID and info.architecture == "llama"
        assert c.health().status == pb.HealthResponse.STATUS_SERVING


def test_client_command_streams_to_stdout(server):
    out = subprocess.run(
        [sys.executable, "-m", "orthrus_runtime.tools.cli", "client", "--target", f"127.0.0.1:{server['grpc']}",
         "--prompt", "What is the capital of France? Answer in one word.", "--chat", "--max-tokens", "12",
         "--temperature", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tokens/cycle" in out.stderr


def _lm_eval_parse_logprobs(out: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval 0.4.13's LocalCompletionsAPI.parse_logprobs for one prompt: the continuation is
    token_logprobs[ctxlen:-1] (the last entry is the one generated token, max_tokens 1), and it is
    greedy when each of its log-probs equals the best of that position's top_logprobs."""
    choice = sorted(out["choices"], key=lambda c: c["index"])[0]
    lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))


def test_lm_eval_local_completions_requests(server):
    """The bodies lm-eval's `local-completions` sends (benchmarks/lm_eval_run.py runs lm-eval
    itself): token-id prompts in a one-prompt batch, an empty bearer token, and for a
    log-likelihood echo + logprobs 1 + max_tokens 1, read back through lm-eval's own slicing."""
    base = f"http://127.0.0.1:{server['http']}"
    http = requests.Session()  # lm-eval's own client (httpx refuses the empty bearer token)
    http.headers["Authorization"] = "Bearer "

    def ids(text: str) -> list[int]:
        r = http.post(base + "/tokenize", json={"prompt": text}, timeout=300)  # SmolLM2 adds no BOS
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    context = "Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of France?\nA:"
    ctx = ids(context)
    gen = http.post(base + "/v1/completions", timeout=300, json={"prompt": [ctx], "model": MODEL_ID, "max_tokens": 4, "temperature": 0,
                                             "stop": ["\n", "<|im_end|>"], "seed": 1234})
    assert gen.status_code == 200, gen.text
    greedy_text = gen.json()["choices"][0]["text"]
    assert greedy_text.strip(), greedy_text

    def loglikelihood(continuation: str) -> tuple[float, bool, dict]:
        whole = ids(context + continuation)
        assert whole[:len(ctx)] == ctx
        body = {"model": MODEL_ID, "prompt": [whole], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                "seed": 1234, "echo": True}
        r = http.post(base + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        out = r.json()
        lp = out["choices"][0]["logprobs"]
        # every prompt token (the first without a log-prob), then the one generated token
        assert len(lp["token_logprobs"]) == len(whole) + 1 and lp["token_logprobs"][0] is None
        assert all(t is not None for t in lp["top_logprobs"][1:])
        # the prompt scored alone (max_tokens 0) gives the same continuation log-prob
        alone = http.post(base + "/v1/completions", json={**body, "max_tokens": 0}, timeout=300).json()["choices"][0]["logprobs"]
        assert len(alone["token_logprobs"]) == len(whole)
        ll, is_greedy = _lm_eval_parse_logprobs(out, len(ctx))
        assert ll == pytest.approx(sum(alone["token_logprobs"][len(ctx):]), abs=1e-4)
        return ll, is_greedy, lp

    ll_greedy, is_greedy, lp = loglikelihood(greedy_text)
    assert is_greedy and ll_greedy < 0
    # the generated token at temperature 0 is the best of its position
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    ll_odd, is_greedy_odd, _ = loglikelihood(" zebra zebra zebra")
    assert not is_greedy_odd and ll_odd < ll_greedy


def test_ctrl_c_stops_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0, "".join(server["output"][-40:])
    assert not _port_open(server["http"]) and not _port_open(server["grpc"])
