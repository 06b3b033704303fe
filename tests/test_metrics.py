"""OrthrusMetrics: names, labels and counts, from hand-built records and from the real engine."""
from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orthrus_runtime.metrics import OrthrusMetrics, start_metrics_server, stop_metrics_server
from orthrus_runtime.types import CycleRecord, RequestRecord, StepRecord

M, R = "tiny-orthrus", "replica-a"


def val(metrics: OrthrusMetrics, name: str, **labels) -> float:
    v = metrics.registry.get_sample_value(name, {"model": M, "replica": R, **labels})
    assert v is not None, f"no sample {name} {labels}"
    return v


def step(cycles=(), *, generation=None, prompt=0, preempt=0, running=1, waiting=0, kv=0.25, decode=0.01):
    cycles = list(cycles)
    if generation is None:
        generation = sum(c.num_emitted_tokens for c in cycles)
    return StepRecord(duration_s=decode + 0.001, decode_duration_s=decode if cycles else 0.0, num_running=running,
                      num_waiting=waiting, kv_cache_usage=kv, num_preemptions=preempt, num_prompt_tokens=prompt,
                      num_generation_tokens=generation, cycles=cycles)


def test_names_follow_vllm_with_orthrus_prefix():
    met = OrthrusMetrics(M, R)
    names = {f.name for f in met.registry.collect()}
    # prometheus-client strips _total from the family name and adds it to the samples.
    expected_counters = {"spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
                         "spec_decode_num_accepted_tokens_per_pos", "prompt_tokens", "generation_tokens",
                         "request_success", "num_preemptions", "request_errors"}
    expected_gauges = {"num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"}
    expected_hists = {"time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds", "cycle_duration_seconds", "accepted_length"}
    for n in expected_counters | expected_gauges | expected_hists:
        assert "orthrus_" + n in names, n
    types = {f.name: f.type for f in met.registry.collect()}
    assert all(types["orthrus_" + n] == "counter" for n in expected_counters)
    assert all(types["orthrus_" + n] == "gauge" for n in expected_gauges)
    assert all(types["orthrus_" + n] == "histogram" for n in expected_hists)
    # Its own registry: two replicas in one process do not collide.
    OrthrusMetrics(M, "replica-b")


def test_engine_series_start_at_zero_when_an_engine_attaches():
    from orthrus_runtime.types import EngineStats

    # A router's registry holds only what a router records: it is no idle engine.
    router = OrthrusMetrics(M, "router")
    router.on_request_error("400", "http")
    samples = {s.name for f in router.registry.collect() for s in f.samples}
    assert samples == {"orthrus_request_errors_total", "orthrus_request_errors_created"}
    # An engine's series exist at zero before its first request, so rate() has data
    # from the first scrape instead of missing the first increase.
    met = OrthrusMetrics(M, R)
    met.bind_engine_stats(lambda: EngineStats())
    assert val(met, "orthrus_spec_decode_num_drafts_total", mode="orthrus") == 0
    assert val(met, "orthrus_request_success_total", mode="ar", finished_reason="length") == 0
    assert val(met, "orthrus_num_preemptions_total") == 0
    assert val(met, "orthrus_time_to_first_token_seconds_count", mode="orthrus") == 0
    # Without a bind, the first engine record creates them.
    met2 = OrthrusMetrics(M, R)
    met2.on_step(step([], generation=0))
    assert val(met2, "orthrus_generation_tokens_total", mode="ar") == 0


def test_step_counters_gauges_and_cycle_histograms():
    met = OrthrusMetrics(M, R)
    # Step 1: prefill of two requests (prompt 7 + 5), each samples its first token.
    met.on_step(step([], generation=2, prompt=12, running=2, waiting=3, kv=0.5))
    assert val(met, "orthrus_prompt_tokens_total") == 12
    assert val(met, "orthrus_num_requests_running") == 2
    assert val(met, "orthrus_num_requests_waiting") == 3
    assert val(met, "orthrus_kv_cache_usage_perc") == 0.5
    # Step 2: both decode in orthrus mode: 4 drafts each; 3 and 0 accepted.
    met.on_step(step([CycleRecord("orthrus", 4, 3, 4), CycleRecord("orthrus", 4, 0, 1)], decode=0.02))
    # Step 3: one orthrus cycle fully accepted, cut by a stop string (emits 2 of 5), and an ar cycle.
    met.on_step(step([CycleRecord("orthrus", 4, 4, 2), CycleRecord("ar", 0, 0, 1)], preempt=1, decode=0.03))

    assert val(met, "orthrus_spec_decode_num_drafts_total", mode="orthrus") == 3
    assert val(met, "orthrus_spec_decode_num_draft_tokens_total", mode="orthrus") == 12
    assert val(met, "orthrus_spec_decode_num_accepted_tokens_total", mode="orthrus") == 7
    per_pos = [val(met, "orthrus_spec_decode_num_accepted_tokens_per_pos_total", mode="orthrus", position=str(p))
               for p in range(4)]
    assert per_pos == [2, 2, 2, 1]
    assert sum(per_pos) == 7
    # ar cycles never count as drafts.
    assert val(met, "orthrus_spec_decode_num_drafts_total", mode="ar") == 0
    assert val(met, "orthrus_num_preemptions_total") == 1
    # Generated tokens of the cycles: 5 + 2 (orthrus) and 1 (ar). The two first tokens
    # of step 1 are counted when their requests finish, under the requests' modes.
    assert val(met, "orthrus_generation_tokens_total", mode="orthrus") == 7
    assert val(met, "orthrus_generation_tokens_total", mode="ar") == 1
    # accepted_length observes accepted + 1 per cycle.
    assert val(met, "orthrus_accepted_length_count", mode="orthrus") == 3
    assert val(met, "orthrus_accepted_length_sum", mode="orthrus") == 4 + 1 + 5
    assert val(met, "orthrus_accepted_length_bucket", mode="orthrus", le="1.0") == 1
    assert val(met, "orthrus_accepted_length_bucket", mode="orthrus", le="3.0") == 1
    assert val(met, "orthrus_accepted_length_bucket", mode="orthrus", le="4.0") == 2
    assert val(met, "orthrus_accepted_length_bucket", mode="orthrus", le="5.0") == 3
    assert val(met, "orthrus_accepted_length_sum", mode="ar") == 1
    # One cycle-duration observation per step that decoded, labelled by the batch's mode.
    assert val(met, "orthrus_cycle_duration_seconds_count", mode="orthrus") == 1
    assert val(met, "orthrus_cycle_duration_seconds_sum", mode="orthrus") == pytest.approx(0.02)
    assert val(met, "orthrus_cycle_duration_seconds_count", mode="mixed") == 1
    assert val(met, "orthrus_cycle_duration_seconds_count", mode="ar") == 0

    def finished(mode):
        return RequestRecord(request_id=mode, mode=mode, finish_reason="stop", prompt_tokens=6, completion_tokens=2,
                             arrival_time=1.0, first_scheduled_time=1.0, first_token_time=1.5, finished_time=2.0,
                             emissions=[(2.0, 1)])

    met.on_request_finished(finished("orthrus"))
    met.on_request_finished(finished("ar"))
    assert val(met, "orthrus_generation_tokens_total", mode="orthrus") == 8
    assert val(met, "orthrus_generation_tokens_total", mode="ar") == 2


def test_gauges_bound_to_engine_stats_read_live_values():
    from orthrus_runtime.types import EngineStats

    met = OrthrusMetrics(M, R)
    live = EngineStats(num_running=3, num_waiting=1, kv_cache_usage=0.75)
    met.bind_engine_stats(lambda: live)
    met.on_step(step([], running=9, waiting=9, kv=0.1))  # step records no longer drive the gauges
    assert (val(met, "orthrus_num_requests_running"), val(met, "orthrus_num_requests_waiting"),
            val(met, "orthrus_kv_cache_usage_perc")) == (3, 1, 0.75)
    live = EngineStats()  # e.g. the engine went idle after an abort
    assert val(met, "orthrus_num_requests_running") == 0


def test_request_histograms_and_success():
    met = OrthrusMetrics(M, R)
    met.on_request_finished(RequestRecord(
        request_id="a", mode="orthrus", finish_reason="length", prompt_tokens=5, completion_tokens=9,
        arrival_time=100.0, first_scheduled_time=100.5, first_token_time=101.0, finished_time=103.0,
        emissions=[(101.5, 5), (103.0, 3)]))
    met.on_request_finished(RequestRecord(
        request_id="b", mode="ar", finish_reason="abort", prompt_tokens=5, completion_tokens=0,
        arrival_time=100.0, first_scheduled_time=None, first_token_time=None, finished_time=100.25))

    assert val(met, "orthrus_request_success_total", mode="orthrus", finished_reason="length") == 1
    assert val(met, "orthrus_request_success_total", mode="ar", finished_reason="abort") == 1
    assert val(met, "orthrus_request_success_total", mode="orthrus", finished_reason="stop") == 0
    assert val(met, "orthrus_e2e_request_latency_seconds_sum", mode="orthrus") == pytest.approx(3.0)
    assert val(met, "orthrus_e2e_request_latency_seconds_sum", mode="ar") == pytest.approx(0.25)
    assert val(met, "orthrus_request_queue_time_seconds_sum", mode="orthrus") == pytest.approx(0.5)
    assert val(met, "orthrus_request_queue_time_seconds_count", mode="ar") == 0  # never scheduled
    assert val(met, "orthrus_time_to_first_token_seconds_sum", mode="orthrus") == pytest.approx(1.0)
    assert val(met, "orthrus_time_to_first_token_seconds_count", mode="ar") == 0
    # One inter-token observation per emission: 0.5 s and 1.5 s.
    assert val(met, "orthrus_inter_token_latency_seconds_count", mode="orthrus") == 2
    assert val(met, "orthrus_inter_token_latency_seconds_sum", mode="orthrus") == pytest.approx(2.0)
    assert val(met, "orthrus_inter_token_latency_seconds_bucket", mode="orthrus", le="0.5") == 1
    # Per-request time per output token: 2 s over the 8 tokens after the first.
    assert val(met, "orthrus_request_time_per_output_token_seconds_sum", mode="orthrus") == pytest.approx(0.25)


def test_errors_by_code_and_protocol():
    met = OrthrusMetrics(M, R)
    met.on_request_error("400", "http")
    met.on_request_error("400", "http")
    met.on_request_error("INVALID_ARGUMENT", "grpc")
    assert val(met, "orthrus_request_errors_total", code="400", protocol="http") == 2
    assert val(met, "orthrus_request_errors_total", code="INVALID_ARGUMENT", protocol="grpc") == 1


def test_bad_records_never_raise(caplog):
    met = OrthrusMetrics(M, R)
    met.on_step(None)  # type: ignore[arg-type]
    met.on_request_finished(object())  # type: ignore[arg-type]
    assert "on_step failed" in caplog.text and "on_request_finished failed" in caplog.text
    with pytest.raises(ValueError):
        OrthrusMetrics("", R)


def test_metrics_server_serves_and_skips_taken_ports():
    met = OrthrusMetrics(M, R)
    met.on_request_error("401", "http")
    # Hold a port so the server has to move past it.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    port = None
    try:
        port = start_metrics_server(met.registry, taken, host="127.0.0.1", max_tries=8)
        assert taken < port < taken + 8
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        samples = [s for s in fams["orthrus_request_errors"].samples if s.name == "orthrus_request_errors_total"]
        assert samples and samples[0].labels == {"model": M, "replica": R, "code": "401", "protocol": "http"}
        assert samples[0].value == 1
        with pytest.raises(OSError, match="no free metrics port"):
            start_metrics_server(met.registry, taken, host="127.0.0.1", max_tries=1)
    finally:
        blocker.close()
        if port is not None:
            stop_metrics_server(port)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


# --------------------------------------------------------------------------- against the real engine


class Tee(OrthrusMetrics):
    """Keeps the raw records too, as an independent count of drafts."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cycles = []

    def on_step(self, rec):
        self.cycles.extend(rec.cycles)
        super().on_step(rec)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from orthrus_runtime.model.testing import tiny_checkpoint

    # ar-copy: the diffusion view starts as the AR view, so some drafts are accepted.
    return str(tiny_checkpoint(tmp_path_factory.mktemp("tiny"), diffusion="ar-copy", block_size=4))


async def test_counters_equal_the_engines_truth(tiny_path):
    from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    met = Tee(M, R)
    # A KV cache of 12 blocks of 16 tokens: eight concurrent requests must preempt.
    args = EngineArgs(model=tiny_path, device="cpu", dtype="float32", max_model_len=128, kv_cache_bytes=12 * 8192)
    engine = AsyncOrthrusEngine.from_args(args, stat_logger=met)
    # Step records stop when the engine idles, so after the client abort below only
    # the engine's own snapshot is current: the gauges read it at scrape time.
    met.bind_engine_stats(engine.stats)
    try:
        prompts = ["The quick brown fox", "Orthrus drafts a block", "def add(a, b):", "Continuous batching lets",
                   "Speculative decoding is", "numbers 0123", "The lazy dog", "verifies it with the AR view"]
        reqs = []
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=20 + 7 * i, temperature=0.0 if i % 2 == 0 else 0.9, seed=i)
            reqs.append(GenerateRequest(prompt=p, params=params, mode="ar" if i % 3 == 2 else "orthrus"))

        async def consume(req):
            last = None
            async for d in engine.generate(req):
                last = d
            return req.mode, last

        finals = await asyncio.gather(*(consume(r) for r in reqs))
        # One more, aborted mid-stream by the client.
        agen = engine.generate(GenerateRequest(prompt="The quick", params=SamplingParams(max_tokens=100)))
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            if engine.stats().finished_by_reason.get("abort"):
                break
            await asyncio.sleep(0.02)
        st = engine.stats()
    finally:
        engine.shutdown()

    completion = {mode: sum(d.usage.completion_tokens for m_, d in finals if m_ == mode) for mode in ("orthrus", "ar")}
    assert st.finished_by_reason.get("abort") == 1
    total_gen = sum(val(met, "orthrus_generation_tokens_total", mode=m_) for m_ in ("orthrus", "ar"))
    # Generated tokens: the engine's own count, and per mode the completion tokens of the requests.
    assert total_gen == st.generation_tokens
    assert val(met, "orthrus_generation_tokens_total", mode="ar") == completion["ar"]
    assert val(met, "orthrus_generation_tokens_total", mode="orthrus") == st.generation_tokens - completion["ar"]
    assert val(met, "orthrus_prompt_tokens_total") == st.prompt_tokens
    assert st.prompt_tokens >= sum(d.usage.prompt_tokens for _, d in finals)
    assert val(met, "orthrus_num_preemptions_total") == st.num_preemptions
    assert st.num_preemptions > 0, "the small KV cache was meant to force preemptions"
    for reason, n in st.finished_by_reason.items():
        assert sum(val(met, "orthrus_request_success_total", mode=m_, finished_reason=reason)
                   for m_ in ("orthrus", "ar")) == n

    # Speculative counters against the engine's AcceptanceStats.
    spec = st.spec["orthrus"]
    assert spec.num_accepted_tokens > 0, "ar-copy drafts should sometimes be accepted"
    assert val(met, "orthrus_spec_decode_num_draft_tokens_total", mode="orthrus") == spec.num_draft_tokens
    assert val(met, "orthrus_spec_decode_num_accepted_tokens_total", mode="orthrus") == spec.num_accepted_tokens
    per_pos = [met.registry.get_sample_value("orthrus_spec_decode_num_accepted_tokens_per_pos_total",
                                             {"model": M, "replica": R, "mode": "orthrus", "position": str(i)}) or 0
               for i in range(len(spec.accepted_per_position))]
    assert per_pos == spec.accepted_per_position
    assert sum(per_pos) == spec.num_accepted_tokens
    # A draft is a cycle that verified drafts; only a request's last cycle (1 token left) has none.
    drafts = val(met, "orthrus_spec_decode_num_drafts_total", mode="orthrus")
    n_orthrus = sum(1 for r in reqs if r.mode == "orthrus") + 1
    assert spec.num_cycles - n_orthrus <= drafts <= spec.num_cycles
    assert drafts == sum(1 for c in met.cycles if c.mode == "orthrus" and c.num_draft_tokens > 0)
    assert val(met, "orthrus_spec_decode_num_drafts_total", mode="ar") == 0
    for mode in ("orthrus", "ar"):
        s = st.spec[mode]
        assert val(met, "orthrus_accepted_length_count", mode=mode) == s.num_cycles
        assert val(met, "orthrus_accepted_length_sum", mode=mode) == s.num_accepted_tokens + s.num_cycles
        # One inter-token observation per emission after the first token: one per cycle.
        assert val(met, "orthrus_inter_token_latency_seconds_count", mode=mode) == s.num_cycles
    assert st.spec["ar"].num_draft_tokens == 0

    # Per-request histograms: one observation per finished request.
    assert sum(val(met, "orthrus_e2e_request_latency_seconds_count", mode=m_) for m_ in ("orthrus", "ar")) == 9
    assert sum(val(met, "orthrus_time_to_first_token_seconds_count", mode=m_) for m_ in ("orthrus", "ar")) == 9
    assert sum(val(met, "orthrus_request_queue_time_seconds_count", mode=m_) for m_ in ("orthrus", "ar")) == 9
    # Idle at the end.
    assert val(met, "orthrus_num_requests_running") == 0
    assert val(met, "orthrus_num_requests_waiting") == 0
    assert val(met, "orthrus_kv_cache_usage_perc") == 0
