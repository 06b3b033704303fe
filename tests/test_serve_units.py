"""The Serve layer's pure parts, without Ray: delta coalescing, request parsing, API keys, config."""
from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from deployment import grpc_protocol, openai_protocol as oa
from deployment.auth import ApiKeys, bearer_token
from deployment.errors import ApiError
from deployment.streaming import StreamPacer, coalesce, merge
from orthrus_runtime.proto import orthrus_pb2 as pb
from orthrus_runtime.types import AcceptanceStats, GenerateDelta, Usage

# ----------------------------------------------------------------------------- coalescing


async def _source(gaps, log=None):
    """Deltas "t0", "t1", ... with the given gaps (s) before each; the last one is final."""
    try:
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            last = i == len(gaps) - 1
            yield GenerateDelta("r", token_ids=[i], text=f"t{i}", finished=last,
                                finish_reason="length" if last else None,
                                usage=Usage(3, len(gaps)) if last else None)
    finally:
        if log is not None:
            log.append("closed")


async def _collect(agen):
    return [d async for d in agen]


def test_merge_keeps_order_and_final_accounting():
    a = GenerateDelta("r", token_ids=[1], text="a")
    b = GenerateDelta("r", token_ids=[2, 3], text="bc", finished=True, finish_reason="stop", usage=Usage(1, 3),
                      stats=AcceptanceStats(num_cycles=2))
    m = merge(a, b)
    assert m.token_ids == [1, 2, 3] and m.text == "abc" and m.finished and m.finish_reason == "stop"
    assert m.usage == Usage(1, 3) and m.stats.num_cycles == 2
    assert merge(None, a) is a


def test_coalesce_zero_interval_passes_through():
    out = asyncio.run(_collect(coalesce(_source([0] * 5), 0)))
    assert [d.text for d in out] == ["t0", "t1", "t2", "t3", "t4"]


def test_coalesce_merges_fast_deltas_and_sends_the_first_at_once():
    gaps = [0.0] + [0.002] * 59

    async def run():
        t0 = time.monotonic()
        out, times = [], []
        async for d in coalesce(_source(gaps), 0.05):
            out.append(d)
            times.append(time.monotonic() - t0)
        return out, times

    out, times = asyncio.run(run())
    assert out[0].text == "t0" and times[0] < 0.03  # first token not held back
    assert "".join(d.text for d in out) == "".join(f"t{i}" for i in range(60))
    assert [t for d in out for t in d.token_ids] == list(range(60))
    assert 2 <= len(out) <= 8, len(out)  # ~0.12 s of deltas in 50 ms messages
    assert out[-1].finished and out[-1].usage == Usage(3, 60)
    assert all(not d.finished for d in out[:-1])
    gaps_between = [b - a for a, b in zip(times[:-1], times[1:])]
    assert all(g >= 0.045 for g in gaps_between[:-1]), gaps_between


def test_coalesce_slow_deltas_are_not_delayed():
    out = asyncio.run(_collect(coalesce(_source([0.0, 0.03, 0.03, 0.03]), 0.01)))
    assert [d.text for d in out] == ["t0", "t1", "t2", "t3"]


def test_coalesce_flushes_held_text_when_the_interval_ends():
    # t1 arrives 5 ms after t0 and is held; t2 only comes 200 ms later, but t1
    # must leave when the 30 ms interval ends, not wait for t2.
    async def run():
        t0 = time.monotonic()
        seen = []
        async for d in coalesce(_source([0.0, 0.005, 0.2]), 0.03):
            seen.append((d.text, time.monotonic() - t0))
        return seen

    seen = asyncio.run(run())
    assert [s[0] for s in seen] == ["t0", "t1", "t2"]
    assert seen[1][1] < 0.1


def test_pacer_spreads_its_message_budget_over_the_streams_in_flight():
    """messages_per_s 100: a lone stream may send every 10 ms, eight share the budget (80 ms,
    capped at max_interval_s 50 ms); the count follows streams starting and ending."""
    pacer = StreamPacer(0.05, messages_per_s=100)
    assert StreamPacer(0.05).interval() == 0.05  # no budget: the fixed interval

    async def run():
        seen = {}

        async def one(name, gaps):
            n = 0
            async for d in pacer.relay(_source(gaps)):
                n += 1
                seen.setdefault(name, []).append(pacer.active)
            return n

        alone = await one("alone", [0.0] + [0.004] * 49)  # 0.2 s of deltas, 4 ms apart
        assert pacer.active == 0
        crowd = await asyncio.gather(*(one(f"c{i}", [0.0] + [0.004] * 49) for i in range(8)))
        assert pacer.active == 0
        return alone, crowd, seen

    alone, crowd, seen = asyncio.run(run())
    assert set(seen["alone"]) == {1} and max(seen["c0"]) == 8
    assert 13 <= alone <= 30, alone  # ~every 10 ms (2-3 deltas a message), not every 50 ms (5 messages)
    assert all(3 <= n <= 7 for n in crowd), crowd  # the 50 ms cap: ~5 messages each


@pytest.mark.parametrize("interval", [0, 0.05])
def test_closing_coalesce_closes_the_source(interval):
    async def run():
        log = []
        agen = coalesce(_source([0.0] + [0.01] * 100, log), interval)
        first = await agen.__anext__()
        await agen.aclose()
        return first, log

    first, log = asyncio.run(run())
    assert first.text == "t0" and log == ["closed"]


def test_cancelling_coalesce_closes_the_source():
    async def run():
        log = []

        async def consume():
            async for _ in coalesce(_source([0.0] + [0.5] * 10, log), 0.05):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return log

    assert asyncio.run(run()) == ["closed"]


def test_coalesce_passes_source_errors_on():
    async def bad():
        raise ValueError("refused")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match="refused"):
        asyncio.run(_collect(coalesce(bad(), 0.05)))


# ----------------------------------------------------------------------------- OpenAI parsing


def _err(fn, *a) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*a)
    assert e.value.status == 400 and e.value.message
    return e.value


def test_parse_completion_fields():
    req, opts = oa.parse_completion({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0,
                                     "top_p": 0.5, "top_k": 3, "seed": 7, "stop": "\n", "mode": "ar",
                                     "stream": True, "stream_options": {"include_usage": True},
                                     "user": "ignored", "n": 1, "presence_penalty": 0}, "m")
    assert req.prompt == "hi" and req.prompt_token_ids is None and req.mode == "ar"
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (5, 0.0, 0.5, 3, 7, ["\n"])
    assert opts.stream and opts.include_usage and opts.request_id.startswith("cmpl-")
    assert req.request_id == opts.request_id
    # Defaults: OpenAI's 16 tokens for completions, temperature 1; model may be omitted.
    req, _ = oa.parse_completion({"prompt": [[1, 2, 3]]}, "m")
    assert req.prompt_token_ids == [1, 2, 3] and req.params.max_tokens == 16 and req.params.temperature == 1.0


def test_parse_chat_fields():
    req, opts = oa.parse_chat({"messages": [{"role": "developer", "content": "be nice"},
                                            {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]}],
                               "max_completion_tokens": 9}, "m", 256)
    assert req.messages == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "ab"}]
    assert req.params.max_tokens == 9 and opts.request_id.startswith("chatcmpl-")
    req, _ = oa.parse_chat({"messages": [{"role": "user", "content": "x"}]}, "m", 123)
    assert req.params.max_tokens == 123


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "top_logprobs": 2}, "top_logprobs"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0, "logprobs": 1}, "max_tokens"),
    ({"prompt": "x", "stream_options": "yes", "stream": True}, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "y"}}, "stream_options"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": "x", "model": 3}, "model"),
])
def test_parse_completion_rejects(body, param):
    assert _err(oa.parse_completion, body, "m").param == param


def test_parse_logprobs_n_echo():
    req, opts = oa.parse_completion({"prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0, "n": 3}, "m")
    assert (req.params.logprobs, req.params.prompt_logprobs, req.params.max_tokens) == (1, 1, 0)
    assert (opts.n, opts.echo, opts.logprobs) == (3, True, True)
    req, opts = oa.parse_completion({"prompt": "x", "echo": True}, "m")  # echo alone: text only
    assert (req.params.logprobs, req.params.prompt_logprobs, opts.logprobs) == (None, None, False)
    req, opts = oa.parse_completion({"prompt": "x", "logprobs": 0}, "m")
    assert (req.params.logprobs, req.params.prompt_logprobs, opts.echo) == (0, None, False)
    chat = {"messages": [{"role": "user", "content": "x"}]}
    req, opts = oa.parse_chat(dict(chat, logprobs=True, top_logprobs=20), "m", 8)
    assert req.params.logprobs == 20 and opts.logprobs and req.params.prompt_logprobs is None
    req, opts = oa.parse_chat(dict(chat, logprobs=False), "m", 8)
    assert req.params.logprobs is None and not opts.logprobs
    for body, param in ((dict(chat, top_logprobs=3), "top_logprobs"), (dict(chat, logprobs=True, top_logprobs=21),
                        "top_logprobs"), (dict(chat, logprobs=1), "logprobs"), (dict(chat, echo=True), "echo"),
                        (dict(chat, n=1.5), "n")):
        assert _err(oa.parse_chat, body, "m", 8).param == param


def test_logprob_shapes():
    T = oa.TokenLogprob
    lps = [T(5, None, "A"), T(6, -0.5, " b", [T(6, -0.5, " b"), T(7, -1.5, "c")]), T(8, -2.0, "é", [T(9, -0.1, "z")])]
    c = oa.completion_logprobs(lps, offset=3)
    assert c == {"tokens": ["A", " b", "é"], "token_logprobs": [None, -0.5, -2.0],
                 "top_logprobs": [None, {" b": -0.5, "c": -1.5}, {"z": -0.1, "é": -2.0}], "text_offset": [3, 4, 6]}
    ch = oa.chat_logprobs(lps[1:])
    assert ch["content"][1] == {"token": "é", "logprob": -2.0, "bytes": [195, 169],
                                "top_logprobs": [{"token": "z", "logprob": -0.1, "bytes": [122]}]}
    assert oa.chat_logprobs(None) is None and ch["refusal"] is None


def test_parse_json_body():
    assert oa.parse_json_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"", b"{", b"null", b"[]", b'"s"', b"\xff"):
        e = _err(oa.parse_json_body, raw)
        assert e.code == "invalid_json"


def test_error_shapes_and_codes():
    e = ApiError(400, "bad", code="invalid_value", param="top_p")
    assert e.to_openai() == {"error": {"message": "bad", "type": "invalid_request_error", "param": "top_p",
                                       "code": "invalid_value"}}
    assert e.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert ApiError(401, "x").grpc_code == grpc.StatusCode.UNAUTHENTICATED
    from deployment.errors import overloaded
    assert overloaded("q").status == 503 and overloaded("q").grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED


# ----------------------------------------------------------------------------- gRPC conversion


def test_grpc_request_conversion():
    msg = pb.GenerateRequest(prompt="hi", max_tokens=4, temperature=0.0, top_k=5, seed=2**63 + 1,
                             stop=["x"], mode=pb.MODE_AR, request_id="abc")
    req = grpc_protocol.to_generate_request(msg)
    assert req.prompt == "hi" and req.request_id == "abc" and req.mode == "ar"
    assert (req.params.max_tokens, req.params.temperature, req.params.top_k, req.params.seed) == (4, 0.0, 5, 2**63 + 1)
    # Unset fields take the defaults; an empty request id is replaced.
    req = grpc_protocol.to_generate_request(pb.GenerateRequest(prompt_token_ids=[5, 6]), default_max_tokens=99)
    assert req.prompt_token_ids == [5, 6] and req.params.max_tokens == 99 and req.params.temperature == 1.0
    assert req.request_id.startswith("grpc-") and req.mode is None  # MODE_UNSPECIFIED: the engine default
    assert req.params.max_tokens_defaulted and not grpc_protocol.to_generate_request(msg).params.max_tokens_defaulted


def test_grpc_delta_conversion():
    d = GenerateDelta("r", token_ids=[1, 2], text="ab", finished=True, finish_reason="stop", usage=Usage(3, 2),
                      stats=AcceptanceStats(num_cycles=1, num_draft_tokens=3, num_accepted_tokens=1,
                                            accepted_per_position=[1, 0, 0]), queue_time_s=0.5)
    r = grpc_protocol.delta_to_response(d)
    assert r.finished and r.finish_reason == pb.FINISH_REASON_STOP and r.usage.total_tokens == 5
    assert r.stats.mean_accepted_length == 2.0 and list(r.stats.accepted_per_position) == [1, 0, 0]
    mid = grpc_protocol.delta_to_response(GenerateDelta("r", token_ids=[1], text="a"))
    assert not mid.finished and not mid.HasField("usage")


# ----------------------------------------------------------------------------- API keys


def test_bearer_token():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    for v in (None, "", "abc", "Basic abc", "Bearer", "Bearer  "):
        assert bearer_token(v) is None


def test_api_keys_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("T_KEYS", " k1 , k2,,")
    keys = ApiKeys("T_KEYS")
    assert keys.enabled and keys.check("k1") and keys.check("k2")
    assert not keys.check("k3") and not keys.check(None) and not keys.check("")

    monkeypatch.setenv("T_KEYS", "")
    assert not ApiKeys("T_KEYS").enabled and ApiKeys("T_KEYS").check(None)
    assert not ApiKeys(None).enabled

    f = tmp_path / "keys"
    f.write_text("# comment\nf1\n\nf2  # trailing comment\n")
    keys = ApiKeys("T_KEYS", str(f), recheck_s=0)
    assert keys.check("f1") and keys.check("f2") and not keys.check("k1")
    # A rotated file takes effect without a restart.
    f.write_text("f3\n")
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert keys.check("f3") and not keys.check("f1")
    # An empty key file refuses everything rather than opening the service.
    f.write_text("")
    os.utime(f, (time.time() + 10, time.time() + 10))
    assert keys.enabled and not keys.check("f3") and not keys.check(None)
    with pytest.raises(FileNotFoundError):
        ApiKeys(None, str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- config and app args


def test_shipped_configs_validate_and_build_args():
    from deployment.app import AppArgs
    from deployment.config import CONFIG_DIR, SERVICER_FUNCTION, load_config

    for name in ("serve_config.yaml", "gpu.yaml", "gpu-split.yaml"):
        cfg = load_config(CONFIG_DIR / name)
        assert cfg.http_options.port == 8000 and cfg.grpc_options.port == 9000
        assert cfg.grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION]
        app = cfg.applications[0]
        assert app.import_path == "deployment.app:build_app"
        args = AppArgs.from_dict(app.args)
        deps = {d.name: d for d in app.deployments}
        # Each topology's config names the deployments that topology builds.
        gpu_host = "OrthrusServer" if args.topology == "colocated" else "OrthrusEngine"
        assert set(deps) == ({"OrthrusServer"} if args.topology == "colocated" else {"OrthrusEngine", "OrthrusRouter"})
        assert deps[gpu_host].ray_actor_options.num_gpus == (0 if name == "serve_config.yaml" else 1)
        asc = deps[gpu_host].autoscaling_config
        assert asc["min_replicas"] >= 1 and asc["max_replicas"] >= asc["min_replicas"]
    cpu_engine = load_config(CONFIG_DIR / "serve_config.yaml").applications[0].deployments[0]
    assert cpu_engine.ray_actor_options.num_gpus == 0  # `make serve` must run without a GPU
    over = load_config(CONFIG_DIR / "serve_config.yaml", http_port=18000, grpc_port=19000)
    assert over.http_options.port == 18000 and over.grpc_options.port == 19000


def test_app_args_are_checked():
    from deployment.app import AppArgs

    with pytest.raises(ValueError, match="unknown application arg"):
        AppArgs.from_dict({"engin": {}})
    with pytest.raises(ValueError, match="unknown engine argument"):
        AppArgs.from_dict({"engine": {"modle": "x"}})
    with pytest.raises(ValueError, match="metrics_port"):
        AppArgs.from_dict({"metrics_port": 70000})
    with pytest.raises(ValueError, match="stream_interval_s"):
        AppArgs.from_dict({"stream_interval_s": -1})
    for bad in (0, -5, "fast", True):
        with pytest.raises(ValueError, match="stream_messages_per_s"):
            AppArgs.from_dict({"stream_messages_per_s": bad})
    assert AppArgs.from_dict({"stream_messages_per_s": 1000}).stream_messages_per_s == 1000
    for bad in ({"metrics_host": ""}, {"max_request_bytes": 10}, {"queue_timeout_s": 0}, {"queue_timeout_s": "x"},
                {"topology": "mesh"}, {"topology": None}, {"max_pending_requests": 0},
                {"max_pending_requests": True}, {"max_pending_requests": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AppArgs.from_dict(bad)


def test_each_topology_builds_its_deployments():
    from deployment.app import build_app

    def names(app) -> set:  # the application's deployments, through their bound arguments
        d = app._bound_deployment
        return {d.name}.union(*(names(a) for a in d._replica_config.init_args if hasattr(a, "_bound_deployment")))

    cpu = {"device": "cpu"}
    assert names(build_app({"engine": cpu})) == {"OrthrusRouter", "OrthrusEngine"}
    colo = build_app({"engine": {**cpu, "max_num_seqs": 8}, "topology": "colocated"})
    assert names(colo) == {"OrthrusServer"}
    _, settings, *_ = colo._bound_deployment._replica_config.init_args
    assert settings["max_pending_requests"] == 16  # 2 x max_num_seqs unless set
    assert colo._bound_deployment._replica_config.ray_actor_options["num_gpus"] == 0


def test_binding_defaults_and_the_generated_servicer_is_replaced(tmp_path):
    import yaml

    from deployment.app import AppArgs
    from deployment.config import CONFIG_DIR, GENERATED_SERVICER_FUNCTION, SERVICER_FUNCTION, load_config

    # The local command binds loopback; the GPU/Kubernetes config binds what pods need.
    local = load_config(CONFIG_DIR / "serve_config.yaml")
    assert local.http_options.host == "127.0.0.1"
    assert AppArgs.from_dict(local.applications[0].args).metrics_host == "127.0.0.1"
    assert AppArgs.from_dict(load_config(CONFIG_DIR / "gpu.yaml").applications[0].args).metrics_host == "0.0.0.0"
    raw = yaml.safe_load((CONFIG_DIR / "serve_config.yaml").read_text())
    raw["grpc_options"]["grpc_servicer_functions"] = [GENERATED_SERVICER_FUNCTION]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "c.yaml").grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION]


def test_metrics_server_binds_the_given_host():
    import socket

    from prometheus_client import CollectorRegistry

    from orthrus_runtime.metrics import start_metrics_server, stop_metrics_server

    port = start_metrics_server(CollectorRegistry(), 0)  # loopback by default
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for addr in addrs:  # another interface of this machine does not reach it
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=2).close()
    finally:
        stop_metrics_server(port)


def test_error_series_exist_at_zero():
    from orthrus_runtime.metrics import GRPC_ERROR_CODES, HTTP_ERROR_CODES, OrthrusMetrics
    from prometheus_client import generate_latest

    m = OrthrusMetrics("m", "r")
    m.precreate_router_series()
    text = generate_latest(m.registry).decode()
    for code in HTTP_ERROR_CODES:
        assert f'code="{code}",model="m",protocol="http",replica="r"}} 0.0' in text
    for code in GRPC_ERROR_CODES:
        assert f'code="{code}",model="m",protocol="grpc",replica="r"}} 0.0' in text


def test_per_position_series_exist_at_zero():
    from orthrus_runtime.metrics import OrthrusMetrics
    from prometheus_client import generate_latest

    m = OrthrusMetrics("m", "r")
    m.precreate_positions(3)
    text = generate_latest(m.registry).decode()
    for pos in range(3):
        assert f'orthrus_spec_decode_num_accepted_tokens_per_pos_total{{mode="orthrus",model="m",position="{pos}"' \
               f',replica="r"}} 0.0' in text


def test_ingress_modes_set_ray_serves_environment(monkeypatch):
    from deployment.ingress import ingress_env, ingress_mode, use_ingress

    assert ingress_env("haproxy", local=False) == {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                                                   "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    assert ingress_env("haproxy")["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"
    with pytest.raises(ValueError, match="ingress must be one of proxy, haproxy"):
        ingress_env("nginx")
    for k in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED",
              "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "9")
    use_ingress("haproxy")
    assert ingress_mode() == "haproxy"
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "9"  # the caller's stays
    use_ingress("proxy")  # the flag wins over what the environment had
    assert ingress_mode() == "proxy" and os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
