"""The Ray Serve application end to end, on CPU with a tiny random Orthrus checkpoint.

One Ray session serves two applications deployed from one Serve config (the
same path as `orthrus serve` / `serve deploy`):

- "main" (route /): one engine replica, API keys on (an env var and a key file).
  OpenAI client on both endpoints, gRPC Generate/Complete, equality with the
  engine's own greedy output, 32 concurrent streams, cancellation returning KV
  blocks, every kind of bad input, authentication, keys absent from the logs.
- "small" (route /small): two-slot engine replicas with a one-request queue and
  autoscaling between 1 and 2 replicas: backpressure, scale up and down under
  load, and a killed replica being replaced.
- "colo" (route /colo): the colocated topology, one OrthrusServer replica that is both
  the ingress and the engine host (admitting 3 requests at once, API keys on): the same
  outputs over both protocols, cancellation, bad input, keys, one metrics endpoint,
  backpressure, a killed engine process, drain.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.serve._private.constants import SERVE_NAMESPACE  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from deployment.cli import deploy, wait_running  # noqa: E402
from deployment.ingress import DEFAULT_INGRESS, ingress_env  # noqa: E402
from orthrus_runtime.client import OrthrusClient  # noqa: E402
from orthrus_runtime.engine.args import EngineArgs  # noqa: E402
from orthrus_runtime.proto import orthrus_pb2 as pb  # noqa: E402
from orthrus_runtime.model.testing import tiny_checkpoint  # noqa: E402
from orthrus_runtime.types import GenerateRequest, SamplingParams  # noqa: E402
from processes import free_port, pid_alive  # noqa: E402

MODEL_ID = "tiny-orthrus"
TEST_INGRESS = os.environ.get("ORTHRUS_TEST_INGRESS", DEFAULT_INGRESS)
KEY_ENV_VAR = "ORTHRUS_TEST_API_KEYS"
ENV_KEY = "sk-envkey-3f9c1a77d2"
FILE_KEY = "sk-filekey-8b2d7e41c0"
WRONG_KEY = "sk-wrongkey-55aa01be93"
MAX_MODEL_LEN = 2048
SERVICER = "deployment.grpc_service.add_OrthrusServicer_to_server"



@dataclass
class Stack:
    http: str  # base URL of the HTTP proxy
    grpc_target: str
    ckpt: Path
    temp_dir: str

    def openai(self, key: str | None = ENV_KEY, prefix: str = "") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http}{prefix}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def grpc(self, key: str | None = ENV_KEY, app: str = "main") -> OrthrusClient:
        return OrthrusClient(self.grpc_target, api_key=key, application=app, timeout=120)

    def engine_handle(self, app: str = "main"):
        """The deployment that hosts the engine: OrthrusEngine, or OrthrusServer in "colo"."""
        return serve.get_deployment_handle("OrthrusServer" if app == "colo" else "OrthrusEngine", app_name=app)


def _app(name: str, prefix: str, ckpt: Path, args: dict, engine: dict) -> dict:
    return {
        "name": name,
        "route_prefix": prefix,
        "import_path": "deployment.app:build_app",
        "args": {"engine": {"model": str(ckpt), "device": "cpu", "dtype": "float32",
                            "max_model_len": MAX_MODEL_LEN}, "model_id": MODEL_ID, "metrics_port": 0, **args},
        "deployments": [
            {"name": "OrthrusEngine", "ray_actor_options": {"num_cpus": 0}, "health_check_period_s": 1, **engine},
            {"name": "OrthrusRouter", "ray_actor_options": {"num_cpus": 0}},
        ],
    }


def _colocated_app(name: str, prefix: str, ckpt: Path) -> dict:
    return {
        "name": name,
        "route_prefix": prefix,
        "import_path": "deployment.app:build_app",
        "args": {"topology": "colocated",
                 "engine": {"model": str(ckpt), "device": "cpu", "dtype": "float32", "max_model_len": MAX_MODEL_LEN},
                 "model_id": MODEL_ID, "metrics_port": 0, "api_keys_env": KEY_ENV_VAR, "max_pending_requests": 3},
        "deployments": [
            {"name": "OrthrusServer", "ray_actor_options": {"num_cpus": 0}, "health_check_period_s": 1,
             "num_replicas": 1, "graceful_shutdown_timeout_s": 5},
        ],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"# test keys\n{FILE_KEY}\n")
    temp_dir = tempfile.mkdtemp(prefix="orsv", dir="/tmp")
    env = {
        "RAY_AUTH_MODE": "disabled",
        KEY_ENV_VAR: ENV_KEY,
        # Autoscaling reacts within seconds instead of the default 10 s metric pushes.
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        # The product's default ingress (HAProxy straight to the replicas), inherited by the Ray
        # this fixture starts; this process's own handles keep Serve's separate loop (its Ray
        # Serve modules were imported before). ORTHRUS_TEST_INGRESS=proxy: Serve's proxy actor.
        **ingress_env(TEST_INGRESS),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    http_port, grpc_port = free_port(), free_port()
    config = {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER]},
        "applications": [
            _colocated_app("colo", "/colo", ckpt),
            _app("main", "/", ckpt, {"api_keys_env": KEY_ENV_VAR, "api_keys_file": str(key_file)},
                 {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 256}),
            _app("small", "/small", ckpt, {"api_keys_env": None},
                 {"max_ongoing_requests": 2, "max_queued_requests": 1,
                  "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                         "upscale_delay_s": 1, "downscale_delay_s": 3,
                                         "look_back_period_s": 2, "metrics_interval_s": 0.5},
                  "graceful_shutdown_timeout_s": 5}),
        ],
    }
    ray.init(num_cpus=4, namespace=SERVE_NAMESPACE, include_dashboard=False, _temp_dir=temp_dir)
    try:
        deploy(ServeDeploySchema.model_validate(config))
        err = wait_running(["main", "small", "colo"], timeout=300)
        assert err is None, err
        yield Stack(http=f"http://127.0.0.1:{http_port}", grpc_target=f"127.0.0.1:{grpc_port}", ckpt=ckpt,
                    temp_dir=temp_dir)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(temp_dir, ignore_errors=True)


class Reference:
    """The engine itself, in this process, on the same checkpoint: the expected greedy outputs."""

    def __init__(self, ckpt: Path):
        from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine

        self.engine = AsyncOrthrusEngine.from_args(
            EngineArgs(model=str(ckpt), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN))
        self._cache: dict[str, tuple[str, list[int], str]] = {}

    def run(self, prompt=None, messages=None, ids=None, max_tokens=12, mode="orthrus") -> tuple[str, list[int], str]:
        key = json.dumps([prompt, messages, ids, max_tokens, mode])
        if key not in self._cache:
            req = GenerateRequest(prompt=prompt, messages=messages, prompt_token_ids=ids, mode=mode,
                                  params=SamplingParams(max_tokens=max_tokens, temperature=0.0))

            async def go():
                text, toks, last = [], [], None
                async for d in self.engine.generate(req):
                    text.append(d.text)
                    toks.extend(d.token_ids)
                    last = d
                return "".join(text), toks, last.finish_reason

            self._cache[key] = asyncio.run(go())
        return self._cache[key]


    def scored(self, prompt=None, messages=None, ids=None, max_tokens=8, k=2, pk=None, mode="orthrus", **p):
        """The engine's merged final delta with log-probabilities (greedy unless p says otherwise)."""
        params = dict(max_tokens=max_tokens, temperature=0.0, logprobs=k, prompt_logprobs=pk)
        params.update(p)
        req = GenerateRequest(prompt=prompt, messages=messages, prompt_token_ids=ids, mode=mode,
                              params=SamplingParams(**params))

        async def go():
            from orthrus_runtime.types import merge_deltas
            m = None
            async for d in self.engine.generate(req):
                m = merge_deltas(m, d)
            return m

        return asyncio.run(go())


@pytest.fixture(scope="module")
def ref(stack):
    r = Reference(stack.ckpt)
    yield r
    r.engine.shutdown()


def _engine_stats(stack, app="main"):
    return stack.engine_handle(app).stats.remote().result(timeout_s=30)


def _wait_idle(stack, app="main", timeout=30.0):
    """Wait until the engine runs nothing and every KV block is free again; returns its stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = _engine_stats(stack, app)
        if s.num_running == 0 and s.num_waiting == 0 and s.num_kv_blocks_free == s.num_kv_blocks_total:
            return s
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        time.sleep(0.2)


# ----------------------------------------------------------------------------- OpenAI HTTP


def test_openai_completions(stack, ref):
    client = stack.openai()
    text, ids, reason = ref.run(prompt="hello world", max_tokens=12)
    r = client.completions.create(model=MODEL_ID, prompt="hello world", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL_ID
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    stats = r.model_extra["orthrus"]
    assert stats["num_cycles"] >= 1 and 1.0 <= stats["mean_accepted_length"] <= 4.0

    # Token ids as the prompt, and ar mode, give the same greedy text (lossless decoding).
    r_ids = client.completions.create(model=MODEL_ID, prompt=ref.engine.tokenizer.encode("hello world"),
                                      max_tokens=12, temperature=0, extra_body={"mode": "ar"})
    assert r_ids.choices[0].text == text

    chunks = list(client.completions.create(model=MODEL_ID, prompt="hello world", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["orthrus"]["num_cycles"] >= 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_openai_chat(stack, ref):
    client = stack.openai(key=FILE_KEY)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say something"}]
    text, _, reason = ref.run(messages=msgs, max_tokens=10)
    r = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason
    assert r.usage.completion_tokens == 10

    stream = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_completion_tokens=10,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason
    assert "orthrus" in chunks[-1].model_extra


def test_models_and_health(stack):
    models = stack.openai().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert stack.openai().models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        stack.openai().models.retrieve("gpt-4")
    # Health needs no key (probes and load balancers call it).
    r = httpx.get(f"{stack.http}/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(f"{stack.http}/ready", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    # Unknown routes answer in OpenAI's error shape too.
    r = httpx.get(f"{stack.http}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_error_counters_exist_from_the_start(stack):
    # Before any error of these kinds: every code the router answers with has a series at 0.
    router = serve.get_deployment_handle("OrthrusRouter", app_name="small")
    text = _scrape(router.replica_info.remote().result(timeout_s=30)["metrics_port"])
    for code, proto in (("413", "http"), ("500", "http"), ("503", "http"), ("INTERNAL", "grpc"),
                        ("RESOURCE_EXHAUSTED", "grpc"), ("UNAVAILABLE", "grpc")):
        assert re.search(rf'orthrus_request_errors_total\{{[^}}]*code="{code}"[^}}]*protocol="{proto}"[^}}]*\}} 0\.0',
                         text), (code, proto)


# ----------------------------------------------------------------------------- gRPC


def test_grpc_generate_and_complete(stack, ref):
    text, ids, reason = ref.run(prompt="hello world", max_tokens=12)
    with stack.grpc() as c:
        parts = list(c.generate("hello world", max_tokens=12, temperature=0))
        assert all(p.request_id == parts[0].request_id for p in parts)
        assert [p.finished for p in parts] == [False] * (len(parts) - 1) + [True]
        assert "".join(p.text for p in parts) == text
        assert [t for p in parts for t in p.token_ids] == ids
        last = parts[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 12 and last.stats.num_cycles >= 1
        assert last.stats.mean_accepted_length >= 1.0

        whole = c.complete("hello world", max_tokens=12, temperature=0, request_id="my-request-1")
        assert whole.request_id == "my-request-1"
        assert whole.text == text and list(whole.token_ids) == ids and whole.finished

        # The other two inputs: token ids and chat messages.
        prompt_ids = ref.engine.tokenizer.encode("hello world")
        assert list(c.complete(prompt_token_ids=prompt_ids, max_tokens=12, temperature=0).token_ids) == ids
        msgs = [{"role": "user", "content": "say something"}]
        mtext, mids, _ = ref.run(messages=msgs, max_tokens=8)
        m = c.complete(messages=msgs, max_tokens=8, temperature=0, mode="ar")
        assert m.text == mtext and list(m.token_ids) == mids

        info = c.model_info()
        assert info.model_id == MODEL_ID and info.architecture == "qwen3"
        assert info.block_size == 4 and info.max_model_len == MAX_MODEL_LEN and info.vocab_size > 0
        assert list(info.modes) == ["orthrus", "ar"]
        assert c.health().status == pb.HealthResponse.STATUS_SERVING


def test_client_cli_streams_to_stdout(stack, ref, capsys):
    from orthrus_runtime import client as client_mod

    text, _, _ = ref.run(prompt="hello world", max_tokens=12)
    parser = __import__("argparse").ArgumentParser()
    client_mod.add_arguments(parser)
    rc = client_mod.run(parser.parse_args([
        "--target", stack.grpc_target, "--application", "main", "--api-key", ENV_KEY,
        "--prompt", "hello world", "--max-tokens", "12", "--temperature", "0"]))
    out = capsys.readouterr()
    assert rc == 0
    assert out.out == text + "\n"
    assert "[length]" in out.err and "completion 12 tokens" in out.err

    rc = client_mod.run(parser.parse_args(["--target", stack.grpc_target, "--application", "main",
                                           "--api-key", WRONG_KEY, "--prompt", "x"]))
    assert rc == 1 and "UNAUTHENTICATED" in capsys.readouterr().err


# ----------------------------------------------------------------------------- API parity (issue 19)


def _close(a, b, tol=1e-4):
    return all((x is None and y is None) or abs(x - y) < tol for x, y in zip(a, b)) and len(a) == len(b)


def test_openai_logprobs_echo_and_n(stack, ref):
    client = stack.openai()
    # A prompt scored alone: echo, logprobs, max_tokens 0 (lm-evaluation-harness sends max_tokens 1 and
    # drops the one generated entry: tests/test_serve_smollm2.py sends its exact bodies).
    want = ref.scored(prompt="hello world again", max_tokens=0, k=1, pk=1)
    r = client.completions.create(model=MODEL_ID, prompt="hello world again", echo=True, logprobs=1, max_tokens=0)
    c = r.choices[0]
    assert c.text == "hello world again" and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert _close(c.logprobs.token_logprobs[1:], [t.logprob for t in want.prompt_logprobs[1:]])
    assert c.logprobs.tokens == [t.token for t in want.prompt_logprobs] and c.logprobs.text_offset[0] == 0
    assert all(max(top.values()) >= lp - 1e-6 for top, lp in zip(c.logprobs.top_logprobs[1:],
                                                                     c.logprobs.token_logprobs[1:]))
    # Generated tokens: echo + logprobs, streamed and whole; the same numbers in ar mode.
    want = ref.scored(prompt="hello world", max_tokens=8, k=2, pk=2)
    whole = client.completions.create(model=MODEL_ID, prompt="hello world", echo=True, logprobs=2, max_tokens=8,
                                      temperature=0).choices[0]
    assert whole.text == "hello world" + ref.run(prompt="hello world", max_tokens=8)[0]
    lps = whole.logprobs
    assert _close(lps.token_logprobs[1:], [t.logprob for t in want.prompt_logprobs[1:] + want.logprobs])
    assert len(lps.tokens) == len(want.prompt_logprobs) + 8 and lps.text_offset == sorted(lps.text_offset)
    chunks = list(client.completions.create(model=MODEL_ID, prompt="hello world", echo=True, logprobs=2,
                                            max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.text
    assert [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens] == lps.tokens
    ar = client.completions.create(model=MODEL_ID, prompt="hello world", logprobs=2, max_tokens=8, temperature=0,
                                   extra_body={"mode": "ar"}).choices[0].logprobs
    assert _close(ar.token_logprobs, lps.token_logprobs[-8:]) and ar.tokens == lps.tokens[-8:]

    # n choices: each seeded from the request's seed (choice 0 with the seed itself), usage summed.
    kw = dict(model=MODEL_ID, prompt="once upon a time", max_tokens=6, temperature=1.0, seed=11)
    r3 = client.completions.create(n=3, **kw)
    assert [ch.index for ch in r3.choices] == [0, 1, 2] and r3.usage.completion_tokens == 18
    assert client.completions.create(**kw).choices[0].text == r3.choices[0].text
    assert [ch.text for ch in client.completions.create(n=3, **kw).choices] == [ch.text for ch in r3.choices]
    assert len({ch.text for ch in r3.choices}) > 1
    streamed = {}
    for ch in client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
        for x in ch.choices:
            streamed[x.index] = streamed.get(x.index, "") + x.text
        if ch.usage:
            assert ch.usage.completion_tokens == 18
    assert streamed == {ch.index: ch.text for ch in r3.choices}

    # Chat: logprobs with top alternatives, whole and streamed; n > 1.
    msgs = [{"role": "user", "content": "say something"}]
    want = ref.scored(messages=msgs, max_tokens=6, k=3)
    r = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == [t.token for t in want.logprobs]
    assert _close([t.logprob for t in content], [t.logprob for t in want.logprobs])
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert content[0].bytes == list(content[0].token.encode())
    got = [t for ch in client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=6, temperature=0,
                                                      logprobs=True, stream=True)
           if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in got] == [t.token for t in content] and all(t.top_logprobs == [] for t in got)
    rn = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=4, n=2, temperature=0)
    assert [c.index for c in rn.choices] == [0, 1] and rn.choices[0].message.content == rn.choices[1].message.content
    assert rn.choices[0].logprobs is None

    for bad in (dict(logprobs=6), dict(n=17), dict(max_tokens=0), dict(extra_body={"top_logprobs": 2})):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL_ID, prompt="x", **bad)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=msgs, logprobs=True, top_logprobs=21)
    _wait_idle(stack)


def test_tokenize_detokenize_and_max_model_len(stack, ref):
    h = {"Authorization": f"Bearer {ENV_KEY}"}
    r = httpx.post(f"{stack.http}/tokenize", json={"prompt": "hello world"}, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    ids = ref.engine.tokenizer.encode("hello world")
    assert r.json() == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids}
    r = httpx.post(f"{stack.http}/tokenize", json={"prompt": "hello world", "add_special_tokens": False},
                   headers=h, timeout=30)  # what lm-eval's remote tokenizer probe sends
    assert r.json()["tokens"] == ref.engine.tokenizer.encode("hello world", add_special_tokens=False)
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(f"{stack.http}/tokenize", json={"messages": msgs}, headers=h, timeout=30)
    assert r.json()["tokens"] == asyncio.run(ref.engine.tokenize(GenerateRequest(messages=msgs)))
    r = httpx.post(f"{stack.http}/tokenize", json={"messages": msgs, "add_generation_prompt": False}, headers=h,
                   timeout=30)
    assert r.json()["tokens"] == asyncio.run(ref.engine.tokenize(GenerateRequest(messages=msgs, add_generation_prompt=False)))
    r = httpx.post(f"{stack.http}/detokenize", json={"tokens": ids}, headers=h, timeout=30)
    assert r.status_code == 200 and r.json() == {"prompt": "hello world"}
    for path, body in (("/detokenize", {"tokens": [10**9]}), ("/detokenize", {"tokens": "x"}),
                       ("/tokenize", {"prompt": 3}), ("/tokenize", {}), ("/tokenize", {"prompt": "a", "messages": msgs}),
                       ("/tokenize", {"prompt": "a", "add_special_tokens": "no"})):
        r = httpx.post(f"{stack.http}{path}", json=body, headers=h, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (path, body, r.text)
    assert httpx.post(f"{stack.http}/tokenize", json={"prompt": "a"}, timeout=30).status_code == 401
    m = httpx.get(f"{stack.http}/v1/models", headers=h, timeout=30).json()
    assert m["data"][0]["max_model_len"] == MAX_MODEL_LEN


def test_grpc_logprobs_echo_and_n(stack, ref):
    from orthrus_runtime.client import collect

    want = ref.scored(prompt="hello world", max_tokens=6, k=2, pk=2)
    with stack.grpc() as c:
        whole = c.complete("hello world", max_tokens=6, temperature=0, logprobs=2, prompt_logprobs=2, echo=True)
        assert whole.text == "hello world" + ref.run(prompt="hello world", max_tokens=6)[0]
        assert _close([t.logprob for t in whole.logprobs], [t.logprob for t in want.logprobs])
        assert [len(t.top) for t in whole.logprobs] == [2] * 6
        assert not whole.prompt_logprobs[0].HasField("logprob")
        assert _close([t.logprob for t in whole.prompt_logprobs[1:]], [t.logprob for t in want.prompt_logprobs[1:]])
        scored = c.complete("hello world", max_tokens=0, prompt_logprobs=0)
        assert scored.finished and list(scored.token_ids) == [] and len(scored.prompt_logprobs) == len(want.prompt_logprobs)
        # n = 2 streamed: both choices' messages, by index; seeded choices reproducible.
        kw = dict(max_tokens=5, temperature=1.0, seed=11, n=2)
        a = collect(c.generate("once upon a time", **kw))
        b = collect([c.complete("once upon a time", **kw)])
        assert [x.index for x in a] == [0, 1] and [x.text for x in a] == [x.text for x in b]
        assert [x.token_ids for x in a] == [x.token_ids for x in b]
        with pytest.raises(grpc.RpcError) as e:
            c.complete("x", n=17)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    router = serve.get_deployment_handle("OrthrusRouter", app_name="main")
    text = _scrape(router.replica_info.remote().result(timeout_s=30)["metrics_port"])
    assert float(re.search(r'orthrus_request_choices_total\{[^}]*protocol="grpc"[^}]*\} (\S+)', text).group(1)) >= 4
    assert float(re.search(r'orthrus_echo_prompt_tokens_total\{[^}]*protocol="grpc"[^}]*\} (\S+)', text).group(1)) >= \
        len(want.prompt_logprobs)
    _wait_idle(stack)


# ----------------------------------------------------------------------------- concurrency


def test_32_concurrent_streams_over_both_protocols(stack, ref):
    prompts = [f"request {i}: the quick brown fox" for i in range(32)]
    expected = [ref.run(prompt=p, max_tokens=16) for p in prompts]

    def over_http(p):
        chunks = stack.openai().completions.create(model=MODEL_ID, prompt=p, max_tokens=16, temperature=0,
                                                   stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    def over_grpc(p):
        with stack.grpc() as c:
            return "".join(r.text for r in c.generate(p, max_tokens=16, temperature=0))

    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(over_http if i % 2 == 0 else over_grpc, p) for i, p in enumerate(prompts)]
        got = [f.result(timeout=300) for f in futures]
    assert got == [e[0] for e in expected]
    _wait_idle(stack)


# ----------------------------------------------------------------------------- cancellation


def test_cancelled_streams_return_their_kv_blocks(stack):
    before = _wait_idle(stack)
    aborted_before = before.finished_by_reason.get("abort", 0)
    long_tokens = 1500

    # HTTP: read a few SSE events, then drop the connection.
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{stack.http}/v1/completions",
                         headers={"Authorization": f"Bearer {ENV_KEY}"},
                         json={"model": MODEL_ID, "prompt": "hello", "max_tokens": long_tokens,
                               "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(x.startswith("data: ") for x in got)
            busy = _engine_stats(stack)
            assert busy.num_running == 1 and busy.num_kv_blocks_free < busy.num_kv_blocks_total
    after_http = _wait_idle(stack)
    assert after_http.finished_by_reason.get("abort", 0) == aborted_before + 1
    # It was aborted, not run to its end.
    assert after_http.generation_tokens - before.generation_tokens < long_tokens

    # gRPC, unary: cancel a Complete call while the engine works on it.
    with stack.grpc() as c:
        fut = c._stub.Complete.future(
            pb.GenerateRequest(prompt="hello", max_tokens=long_tokens, temperature=0), metadata=c._metadata)
        deadline = time.monotonic() + 30
        while _engine_stats(stack).num_running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fut.cancel()
    after_unary = _wait_idle(stack)
    assert after_unary.finished_by_reason.get("abort", 0) == aborted_before + 2
    assert after_unary.generation_tokens - after_http.generation_tokens < long_tokens

    # gRPC, streaming: cancel the call after two messages. Ray Serve 2.60's gRPC
    # proxy drops a cancel that lands while it is writing a message to the client
    # (its generator is closed with GeneratorExit, and the replica call is not
    # cancelled): a few percent of cancels with 50 ms stream messages. Our side
    # aborts whenever the cancel reaches the router, so up to 3 tries.
    aborted = after_unary.finished_by_reason.get("abort", 0)
    for _ in range(3):
        with stack.grpc() as c:
            call = c.generate("hello", max_tokens=long_tokens, temperature=0)
            next(call), next(call)
            call.cancel()
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.CANCELLED
        s = _wait_idle(stack, timeout=60)
        if s.finished_by_reason.get("abort", 0) == aborted + 1:
            break
        aborted = s.finished_by_reason.get("abort", 0)
    else:
        pytest.fail("three cancelled gRPC streams all ran to their end")


# ----------------------------------------------------------------------------- bad input

GOOD = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
BAD_HTTP = [
    # (path, raw body or dict, expected param or None)
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", b"\xff\xfe", None),
    ("/v1/completions", {**GOOD, "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**GOOD, "stop": 5}, "stop"),
    ("/v1/completions", {**GOOD, "stream": "yes"}, "stream"),
    ("/v1/completions", {**GOOD, "prompt": 42}, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": MODEL_ID}, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": -1}, "temperature"),
    ("/v1/completions", {**GOOD, "temperature": 3}, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, "top_p"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {**GOOD, "top_k": -5}, "top_k"),
    ("/v1/completions", {**GOOD, "n": 17}, "n"),
    ("/v1/completions", {**GOOD, "seed": 2**70}, None),
    ("/v1/completions", {**GOOD, "mode": "fast"}, "mode"),
    ("/v1/completions", {**GOOD, "logprobs": 6}, "logprobs"),
    ("/v1/completions", {**GOOD, "stop": [str(i) for i in range(40)]}, None),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, "model"),
    ("/v1/completions", {**GOOD, "prompt": [1] * (MAX_MODEL_LEN + 5)}, None),
    ("/v1/completions", {**GOOD, "prompt": "hi", "max_tokens": MAX_MODEL_LEN}, None),
    ("/v1/completions", {**GOOD, "prompt": [10**6]}, None),
    ("/v1/completions", {**GOOD, "prompt": ""}, None),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": 7}]}, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "top_p": "a"},
     "top_p"),
]


def test_bad_http_input_gets_400_and_service_keeps_serving(stack):
    headers = {"Authorization": f"Bearer {ENV_KEY}"}
    with httpx.Client(timeout=60) as http:
        for path, body, param in BAD_HTTP:
            if isinstance(body, bytes):
                r = http.post(stack.http + path, content=body, headers={**headers, "Content-Type": "application/json"})
            else:
                r = http.post(stack.http + path, json=body, headers=headers)
            assert r.status_code == 400, (path, body if len(str(body)) < 200 else str(body)[:200], r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"], r.text
            if param is not None:
                assert err["param"] == param, (body, err)
        r = http.post(f"{stack.http}/v1/completions", json={**GOOD, "model": "gpt-4"}, headers=headers)
        assert r.json()["error"]["code"] == "model_not_found"
        # The OpenAI client reports the same as BadRequestError.
        with pytest.raises(openai.BadRequestError):
            stack.openai().completions.create(model=MODEL_ID, prompt="hi", max_tokens=-3)
        r = http.post(f"{stack.http}/v1/completions", json=GOOD, headers=headers)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    _wait_idle(stack)


BAD_GRPC = [
    dict(),  # no input
    dict(prompt="a", prompt_token_ids=[1, 2]),  # two inputs
    dict(prompt="a", max_tokens=0),
    dict(prompt="a", max_tokens=-5),
    dict(prompt="a", temperature=-1.0),
    dict(prompt="a", top_p=2.0),
    dict(prompt="a", top_k=-7),
    dict(prompt="a", stop=[""]),
    dict(prompt_token_ids=[1] * (MAX_MODEL_LEN + 1)),
    dict(prompt_token_ids=[10**6]),
    dict(prompt_token_ids=[-1]),
    dict(messages=[{"role": "wizard", "content": "x"}]),
    dict(prompt="a", max_tokens=MAX_MODEL_LEN),
    dict(prompt="a", logprobs=21),
    dict(prompt="a", prompt_logprobs=-1),
    dict(prompt="a", n=0),
    dict(prompt="a", n=17),
    dict(prompt="a", max_tokens=0, echo=True),  # scoring a prompt needs prompt_logprobs
]


def test_bad_grpc_input_gets_invalid_argument(stack):
    with stack.grpc() as c:
        for kwargs in BAD_GRPC:
            with pytest.raises(grpc.RpcError) as e:
                c.complete(**kwargs)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kwargs, e.value)
            assert e.value.details(), kwargs
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate(**kwargs))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kwargs, e.value)
        # A bad request id (already in flight is checked by the engine; too long here).
        with pytest.raises(grpc.RpcError) as e:
            c.complete("a", max_tokens=2, request_id="x" * 500)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.complete("hi", max_tokens=2).usage.completion_tokens == 2


# ----------------------------------------------------------------------------- hostile input

HOSTILE_HTTP = [
    # (body: dict or raw bytes, expected status, expected param or None); today's exploits first.
    ({**GOOD, "top_k": 9223372036854775808}, 400, "top_k"),
    ({**GOOD, "top_k": 10**30}, 400, "top_k"),
    ({**GOOD, "max_tokens": 2**70}, 400, "max_tokens"),
    ({**GOOD, "prompt": "a\ud800b"}, 400, "prompt"),
    (b'{"model": "tiny-orthrus", "prompt": "a\\ud800b", "max_tokens": 2}', 400, "prompt"),
    ({**GOOD, "stop": ["\udc00"]}, 400, "stop"),
    ({**GOOD, "temperature": 2.5}, 400, "temperature"),
    ({**GOOD, "temperature": 1e300}, 400, "temperature"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None),
    (b'{"model": "tiny-orthrus", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    (json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]})[:-1].encode()
     + b', "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    ({**GOOD, "prompt": "x" * (2 * 2**20)}, 413, None),
]


def test_hostile_http_input_gets_json_errors_and_nothing_dies(stack, ref):
    actor = stack.engine_handle().health.remote().result(timeout_s=30)["actor_name"]
    headers = {"Authorization": f"Bearer {ENV_KEY}", "Content-Type": "application/json"}
    with httpx.Client(timeout=60) as http:
        for body, status, param in HOSTILE_HTTP:
            chat = isinstance(body, bytes) and b'"messages"' in body
            path = "/v1/chat/completions" if chat else "/v1/completions"
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(stack.http + path, content=raw, headers=headers)
            assert r.status_code == status, (str(body)[:120], r.text[:300])
            err = r.json()["error"]  # JSON in OpenAI's shape, never a plain-text 500
            assert err["message"] and err["type"] == "invalid_request_error", r.text
            if param is not None:
                assert err["param"] == param, (str(body)[:120], err)
        # 1e-38 is below the greedy floor: the greedy text, on both protocols and in both modes.
        for mode in ("orthrus", "ar"):
            text, _, _ = ref.run(prompt="hello world", max_tokens=12, mode=mode)
            r = http.post(f"{stack.http}/v1/completions", headers=headers, json={
                **GOOD, "prompt": "hello world", "max_tokens": 12, "temperature": 1e-38, "mode": mode})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == text
            with stack.grpc() as c:
                assert c.complete("hello world", max_tokens=12, temperature=1e-38, mode=mode).text == text
    _wait_idle(stack)
    after = stack.engine_handle().health.remote().result(timeout_s=30)
    assert after["actor_name"] == actor and after["alive"]  # the engine replica was never replaced


def _raw_grpc(stack, method: str, payload: bytes, key: str = ENV_KEY):
    """Send raw bytes as the request message (no client-side serialization)."""
    channel = grpc.insecure_channel(stack.grpc_target)
    try:
        call = channel.unary_unary(f"/orthrus.v1.Orthrus/{method}", request_serializer=None,
                                   response_deserializer=None)
        return call(payload, metadata=(("application", "main"), ("authorization", f"Bearer {key}")), timeout=60)
    finally:
        channel.close()


def test_malformed_grpc_messages_get_invalid_argument(stack):
    good = pb.GenerateRequest(prompt="hi", max_tokens=2).SerializeToString()
    assert pb.GenerateResponse.FromString(_raw_grpc(stack, "Complete", good)).usage.completion_tokens == 2
    bad_utf8 = b"\x0a\x03a\xffb"  # field 1 (prompt), 3 bytes, invalid UTF-8
    truncated = good[:-1] if good[-1:] != b"" else good
    oversized_prefix = b"\x0a\xff\xff\xff\x7fhi"  # field 1 claims 268 MB
    for payload in (bad_utf8, truncated[:3], b"\xff\xff\xff\xff", oversized_prefix):
        with pytest.raises(grpc.RpcError) as e:
            _raw_grpc(stack, "Complete", payload)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (payload, e.value)
        assert "DecodeError" not in e.value.details() and "class" not in e.value.details()
    with stack.grpc() as c:
        for kw in (dict(temperature=2.5), dict(temperature=1e300), dict(top_k=2**63 - 1), dict(max_tokens=2**62)):
            with pytest.raises(grpc.RpcError) as e:
                c.complete("hi", **{"max_tokens": 2, **kw})
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        # The same words as over HTTP: one validation module.
        with pytest.raises(grpc.RpcError) as e:
            c.complete("hi", max_tokens=2, temperature=2.5)
        r = httpx.post(f"{stack.http}/v1/completions", json={**GOOD, "temperature": 2.5},
                       headers={"Authorization": f"Bearer {ENV_KEY}"}, timeout=60)
        assert e.value.details() == r.json()["error"]["message"]
        assert c.complete("hi", max_tokens=2).usage.completion_tokens == 2


# ----------------------------------------------------------------------------- API keys


def test_api_keys(stack):
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
    with httpx.Client(timeout=60) as http:
        for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": ENV_KEY},
                        {"Authorization": f"Basic {ENV_KEY}"}):
            for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                 ("GET", "/v1/models")):
                r = http.request(method, stack.http + path, json=body if method == "POST" else None,
                                 headers=headers)
                assert r.status_code == 401, (headers, path, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
                assert WRONG_KEY not in r.text and ENV_KEY not in r.text
        for key in (ENV_KEY, FILE_KEY):
            r = http.post(f"{stack.http}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
    with pytest.raises(openai.AuthenticationError):
        stack.openai(key=WRONG_KEY).completions.create(model=MODEL_ID, prompt="hi", max_tokens=2)

    for key in (None, WRONG_KEY):
        with stack.grpc(key=key) as c:
            for call in (lambda: c.complete("hi", max_tokens=2), lambda: list(c.generate("hi", max_tokens=2)),
                         c.model_info):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert WRONG_KEY not in (e.value.details() or "")
            assert c.health().status == pb.HealthResponse.STATUS_SERVING  # health is open
    with stack.grpc(key=FILE_KEY) as c:
        assert c.complete("hi", max_tokens=2).usage.completion_tokens == 2


def _scrape(port: int) -> str:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert r.status_code == 200
    return r.text


def test_replicas_serve_their_metrics(stack):
    # Runs after the bad-input tests: the router counted their errors by code and protocol.
    router = serve.get_deployment_handle("OrthrusRouter", app_name="main")
    text = _scrape(router.replica_info.remote().result(timeout_s=30)["metrics_port"])
    assert re.search(r'orthrus_request_errors_total\{[^}]*code="400"[^}]*protocol="http"[^}]*\} [1-9]', text)
    assert re.search(r'orthrus_request_errors_total\{[^}]*code="INVALID_ARGUMENT"[^}]*protocol="grpc"[^}]*\} [1-9]',
                     text)
    assert re.search(r'orthrus_request_errors_total\{[^}]*code="401"[^}]*protocol="http"[^}]*\} [1-9]', text)
    engine = stack.engine_handle().health.remote().result(timeout_s=30)
    etext = _scrape(engine["metrics_port"])
    assert re.search(r'orthrus_generation_tokens_total\{[^}]*model="tiny-orthrus"[^}]*\} [1-9]', etext)


def test_keys_never_appear_in_logs(stack):
    # Runs after the auth and error tests: every key has been sent, right and wrong.
    logs = Path(stack.temp_dir) / "session_latest" / "logs"
    assert logs.is_dir()
    seen = []
    for p in logs.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for key in (ENV_KEY, FILE_KEY, WRONG_KEY):
                if key.encode() in data:
                    seen.append((p.name, key))
    assert not seen, f"API keys found in logs: {seen}"


# ----------------------------------------------------------------------------- the "small" app


def _running_replicas(app="small", deployment="OrthrusEngine") -> int:
    d = serve.status().applications[app].deployments[deployment]
    return d.replica_states.get("RUNNING", 0)


def test_backpressure_full_queue_is_refused_at_once(stack):
    # Two slots per engine and a one-request queue: of a burst of 8 long requests
    # at most 3 are admitted; the rest are refused without waiting.
    assert _running_replicas() == 1
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 300, "temperature": 0}

    def post(_):
        t = time.monotonic()
        r = httpx.post(f"{stack.http}/small/v1/completions", json=body, timeout=120)
        return r.status_code, r.json(), time.monotonic() - t, r.headers.get("retry-after")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(post, range(8)))
    codes = [r[0] for r in results]
    assert codes.count(200) >= 1 and codes.count(503) >= 4, codes
    for code, body_, took, retry_after in results:
        if code == 503:
            assert body_["error"]["code"] == "overloaded" and took < 2.0, (body_, took)
            assert retry_after == "1"

    def complete(_):
        with stack.grpc(key=None, app="small") as c:
            try:
                c.complete("hello", max_tokens=300, temperature=0)
                return grpc.StatusCode.OK, None
            except grpc.RpcError as e:
                return e.code(), dict(e.trailing_metadata() or ())

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(complete, range(8)))
    gcodes = [c for c, _ in results]
    assert gcodes.count(grpc.StatusCode.OK) >= 1, gcodes
    assert gcodes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4, gcodes
    for code, trailers in results:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a retry hint
            assert trailers.get("retry-after") == "1" and trailers.get("grpc-retry-pushback-ms") == "1000", trailers
    # Still serving afterwards.
    r = httpx.post(f"{stack.http}/small/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_health_answers_at_once_while_the_queue_is_full(stack):
    # Two slots and a one-request queue, filled with long requests: liveness and readiness
    # still answer 200 within a second (neither goes through the engine's queue).
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 400, "temperature": 0}
    stop = threading.Event()
    refused = threading.Event()  # a 503: both slots and the queue are taken

    def load():
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                if http.post(f"{stack.http}/small/v1/completions", json=body).status_code == 503:
                    refused.set()
                    time.sleep(0.05)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        assert refused.wait(60), "the queue never filled"
        with httpx.Client(timeout=30) as http:
            for path in ("/health", "/ready", "/health", "/ready"):
                t0 = time.monotonic()
                r = http.get(f"{stack.http}/small{path}")
                took = time.monotonic() - t0
                assert r.status_code == 200 and took < 1.0, (path, r.text, took)
        with stack.grpc(key=None, app="small") as c:
            assert c.health().status == pb.HealthResponse.STATUS_SERVING
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)


def test_autoscaling_up_under_load_and_down_after(stack):
    # The tests before loaded this app too: its second replica may still be on its way down.
    deadline = time.monotonic() + 120
    while _running_replicas() != 1:
        assert time.monotonic() < deadline, "the app did not settle at one replica"
        time.sleep(0.5)
    stop = threading.Event()
    outcomes: list[int] = []

    def load():
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                r = http.post(f"{stack.http}/small/v1/completions",
                              json={"model": MODEL_ID, "prompt": "hi", "max_tokens": 100, "temperature": 0})
                outcomes.append(r.status_code)
                if r.status_code == 503:
                    time.sleep(0.05)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while _running_replicas() < 2:
            assert time.monotonic() < deadline, "no second replica under sustained load"
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert outcomes.count(200) > 0
    deadline = time.monotonic() + 120
    while _running_replicas() != 1 or serve.status().applications["small"].deployments[
            "OrthrusEngine"].replica_states.get("STOPPING", 0):
        assert time.monotonic() < deadline, "the second replica did not go away after the load"
        time.sleep(0.5)


def test_killed_engine_process(stack):
    """The engine core process of a replica dies (killed, as the OOM killer would): its
    streams end with an error, the replica turns unhealthy, Serve replaces it, and nothing
    of the old one is left."""
    deadline = time.monotonic() + 120
    while _running_replicas() != 1:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    health = stack.engine_handle("small").health.remote().result(timeout_s=30)
    actor_name, core_pid = health["actor_name"], health["engine_core_pid"]
    boot = health["replica_startup_s"]
    assert boot["actor_start_to_init"] >= 0 and boot["replica_init"] >= health["startup_s"]["total"] > 0
    assert core_pid and core_pid != health["pid"]

    # One stream per protocol in flight on the replica (it has two slots).
    http_stream = stack.openai(prefix="/small").completions.create(
        model=MODEL_ID, prompt="hello", max_tokens=1500, temperature=0, stream=True)
    http_iter = iter(http_stream)
    next(http_iter)
    grpc_client = stack.grpc(key=None, app="small")
    grpc_call = grpc_client.generate("hello", max_tokens=1500, temperature=0)
    next(grpc_call)
    os.kill(core_pid, signal.SIGKILL)

    with pytest.raises(openai.APIError):
        for _ in http_iter:
            pass
    with pytest.raises(grpc.RpcError) as e:
        for _ in grpc_call:
            pass
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), e.value
    grpc_client.close()

    # Serve replaces the replica; requests succeed again.
    deadline = time.monotonic() + 180
    while True:
        try:
            r = httpx.post(f"{stack.http}/small/v1/completions",
                           json={"model": MODEL_ID, "prompt": "hi", "max_tokens": 4, "temperature": 0}, timeout=30)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "requests did not succeed after the replica was replaced"
        time.sleep(1.0)
    new = stack.engine_handle("small").health.remote().result(timeout_s=30)
    assert new["actor_name"] != actor_name and new["engine_core_pid"] != core_pid
    deadline = time.monotonic() + 60
    while pid_alive(health["pid"]):
        assert time.monotonic() < deadline, "the unhealthy replica's actor process was left running"
        time.sleep(0.5)
    with stack.grpc(key=None, app="small") as c:
        assert c.complete("hi", max_tokens=4, temperature=0).usage.completion_tokens == 4


def test_drain_over_both_protocols(stack):
    # Last: it drains the "small" application's router for good, as `orthrus serve` does on
    # SIGINT/SIGTERM (deployment.cli.drain). Streams in flight over both protocols; the
    # router stops admitting; after the drain timeout what is left ends with an explicit error.
    # The timeout is short (0.5 s): the streams (1,500 tokens) must still be running when it
    # ends them, and the tiny model streams fast through the HAProxy ingress.
    from deployment.cli import drain
    from deployment.ingress import HandleCaller

    router = serve.get_deployment_handle("OrthrusRouter", app_name="small")
    deadline = time.monotonic() + 120
    while _running_replicas() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{stack.http}/small/v1/completions",
                         json={"model": MODEL_ID, "prompt": "hello", "max_tokens": 1500, "temperature": 0,
                               "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            grpc_client = stack.grpc(key=None, app="small")
            call = grpc_client.generate("hello", max_tokens=1500, temperature=0)
            next(call)
            assert router.replica_info.remote().result(timeout_s=30)["in_flight"] == 2
            caller = HandleCaller()
            drainer = threading.Thread(target=drain, args=(caller, ["small"], 0.5))
            drainer.start()
            deadline = time.monotonic() + 30
            while not router.replica_info.remote().result(timeout_s=30)["draining"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            # New requests: 503 with a retry hint / UNAVAILABLE; readiness fails, liveness holds.
            refused = http.post(f"{stack.http}/small/v1/completions", json={"model": MODEL_ID, "prompt": "hi"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "shutting_down"
            with pytest.raises(grpc.RpcError) as e:
                stack.grpc(key=None, app="small").complete("hi", max_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert http.get(f"{stack.http}/small/ready").status_code == 503
            assert http.get(f"{stack.http}/small/health").status_code == 200
            rest = [x for x in lines if x.startswith("data: ")]  # until the drain ends the stream
            drainer.join(timeout=60)
            caller.close()
            assert not drainer.is_alive()
        # The HTTP stream: an error event, then [DONE].
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
    grpc_client.close()
    _wait_idle(stack, "small")


# ----------------------------------------------------------------------------- the "colo" app (colocated)

COLO = "colo"


def _colo_http(stack, path: str, body: dict, key: str | None = ENV_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{stack.http}/colo{path}", json=body, headers=headers, timeout=kw.pop("timeout", 60), **kw)


def test_colocated_serves_the_engines_output_over_both_protocols(stack, ref):
    assert set(serve.status().applications[COLO].deployments) == {"OrthrusServer"}
    client = stack.openai(prefix="/colo")
    text, ids, reason = ref.run(prompt="hello world", max_tokens=12)
    r = client.completions.create(model=MODEL_ID, prompt="hello world", max_tokens=12, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    assert r.model_extra["orthrus"]["num_cycles"] >= 1
    chunks = list(client.completions.create(model=MODEL_ID, prompt="hello world", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 12
    msgs = [{"role": "user", "content": "say something"}]
    mtext, mids, _ = ref.run(messages=msgs, max_tokens=8)
    chat = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == mtext
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    tok = _colo_http(stack, "/tokenize", {"model": MODEL_ID, "prompt": "hello world"})
    assert tok.status_code == 200 and tok.json()["tokens"] == ref.engine.tokenizer.encode("hello world")
    for path in ("/health", "/ready"):
        h = httpx.get(f"{stack.http}/colo{path}", timeout=30)
        assert h.status_code == 200 and h.json()["status"] == "ok", (path, h.text)

    with stack.grpc(app=COLO) as c:
        parts = list(c.generate("hello world", max_tokens=12, temperature=0))
        assert "".join(p.text for p in parts) == text and [t for p in parts for t in p.token_ids] == ids
        assert parts[-1].finished and parts[-1].stats.num_cycles >= 1
        m = c.complete(messages=msgs, max_tokens=8, temperature=0, mode="ar")
        assert m.text == mtext and list(m.token_ids) == mids
        assert c.model_info().max_model_len == MAX_MODEL_LEN
        assert c.health().status == pb.HealthResponse.STATUS_SERVING
    _wait_idle(stack, COLO)


def test_colocated_cancelled_streams_return_their_kv_blocks(stack):
    before = _wait_idle(stack, COLO)
    aborted = before.finished_by_reason.get("abort", 0)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{stack.http}/colo/v1/completions", headers={"Authorization": f"Bearer {ENV_KEY}"},
                         json={"model": MODEL_ID, "prompt": "hello", "max_tokens": 1500, "temperature": 0,
                               "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(6))
            busy = _engine_stats(stack, COLO)
            assert busy.num_running == 1 and busy.num_kv_blocks_free < busy.num_kv_blocks_total
    after = _wait_idle(stack, COLO)
    assert after.finished_by_reason.get("abort", 0) == aborted + 1
    assert after.generation_tokens - before.generation_tokens < 1500
    # gRPC streaming cancel (up to 3 tries: see test_cancelled_streams_return_their_kv_blocks).
    aborted += 1
    for _ in range(3):
        with stack.grpc(app=COLO) as c:
            call = c.generate("hello", max_tokens=1500, temperature=0)
            next(call), next(call)
            call.cancel()
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.CANCELLED
        s = _wait_idle(stack, COLO, timeout=60)
        if s.finished_by_reason.get("abort", 0) == aborted + 1:
            break
        aborted = s.finished_by_reason.get("abort", 0)
    else:
        pytest.fail("three cancelled gRPC streams all ran to their end")


def test_colocated_bad_input_keys_backpressure_and_one_metrics_endpoint(stack):
    for path, body, param in BAD_HTTP[::3]:
        if isinstance(body, bytes):
            r = httpx.post(f"{stack.http}/colo{path}", content=body, timeout=60,
                           headers={"Authorization": f"Bearer {ENV_KEY}", "Content-Type": "application/json"})
        else:
            r = _colo_http(stack, path, body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (path, r.text)
    for key in (None, WRONG_KEY):
        r = _colo_http(stack, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with stack.grpc(app=COLO) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.complete("hi", max_tokens=2, top_p=0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with stack.grpc(key=WRONG_KEY, app=COLO) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.complete("hi", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # Three requests admitted at once: of a burst of 6 long ones the surplus is refused at once,
    # in the API's error shape (the replica's admission, not Serve's plain-text queue limit).
    def post(_):
        t = time.monotonic()
        r = _colo_http(stack, "/v1/completions", {"model": MODEL_ID, "prompt": "hello", "max_tokens": 300,
                                                  "temperature": 0}, timeout=120)
        return r.status_code, r.json(), time.monotonic() - t

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(post, range(6)))
    codes = [c for c, _, _ in results]
    assert codes.count(200) >= 1 and codes.count(503) >= 2, codes
    assert all(b["error"]["code"] == "overloaded" and took < 2.0 for c, b, took in results if c == 503), results
    assert stack.engine_handle(COLO).replica_info.remote().result(timeout_s=30)["pending"] == 0

    # The replica's one metrics endpoint carries the ingress's series and the engine's.
    port = stack.engine_handle(COLO).health.remote().result(timeout_s=30)["metrics_port"]
    text = _scrape(port)
    assert re.search(r'orthrus_request_errors_total\{[^}]*code="400"[^}]*protocol="http"[^}]*\} [1-9]', text)
    assert re.search(r'orthrus_request_errors_total\{[^}]*code="INVALID_ARGUMENT"[^}]*protocol="grpc"[^}]*\} [1-9]',
                     text)
    assert re.search(r'orthrus_generation_tokens_total\{[^}]*model="tiny-orthrus"[^}]*\} [1-9]', text)
    _wait_idle(stack, COLO, timeout=60)


def test_colocated_killed_engine_process_replaces_the_replica(stack):
    health = stack.engine_handle(COLO).health.remote().result(timeout_s=30)
    actor_name, core_pid = health["actor_name"], health["engine_core_pid"]
    with stack.grpc(app=COLO) as c:
        call = c.generate("hello", max_tokens=1500, temperature=0)
        next(call)
        os.kill(core_pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), e.value
    deadline = time.monotonic() + 180
    while True:
        try:
            r = _colo_http(stack, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 4,
                                                      "temperature": 0}, timeout=30)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "requests did not succeed after the replica was replaced"
        time.sleep(1.0)
    new = stack.engine_handle(COLO).health.remote().result(timeout_s=30)
    assert new["actor_name"] != actor_name and new["engine_core_pid"] != core_pid
    deadline = time.monotonic() + 60
    while pid_alive(health["pid"]) or pid_alive(core_pid):
        assert time.monotonic() < deadline, "the unhealthy replica's processes were left running"
        time.sleep(0.5)


def test_colocated_drain(stack):
    # Last for "colo": `orthrus serve`'s drain finds the application's ingress, the server.
    from deployment.cli import drain
    from deployment.ingress import HandleCaller

    server = stack.engine_handle(COLO)
    with stack.grpc(app=COLO) as c:
        call = c.generate("hello", max_tokens=1500, temperature=0)
        next(call)
        assert server.replica_info.remote().result(timeout_s=30)["in_flight"] == 1
        with HandleCaller() as caller:
            drain(caller, [COLO], 0.5)
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
    r = _colo_http(stack, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert httpx.get(f"{stack.http}/colo/ready", timeout=30).status_code == 503
    _wait_idle(stack, COLO)
