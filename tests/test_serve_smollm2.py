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

from orthrus_runtime.client import OrthrusClient
from orthrus_runtime.proto import orthrus_pb2 as pb

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "smollm2-135m-orthrus"  # the name in deployment/configs/serve_config.yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def server():
    http_port, grpc_port = _free_port(), _free_port()
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


def test_ctrl_c_stops_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0, "".join(server["output"][-40:])
    assert not _port_open(server["http"]) and not _port_open(server["grpc"])
