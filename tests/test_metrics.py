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
    # Series exist at zero before any event, so rate() has data from the first scrape.
    assert val(met, "orthrus_spec_decode_num_drafts_total", mode="orthrus") == 0
    assert val(met, "orthrus_request_success_total", mode="ar", finished_reason="length") == 0
    assert val(met, "orthrus_num_preemptions_total") == 0
    # Its own registry: two replicas in one process do not collide.
    OrthrusMetrics(M, "replica-b")


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
    # Generated tokens: 2 first tokens + 5 + 2 (orthrus) + 1 (ar).
    assert val(met, "orthrus_generation_tokens_total", mode="orthrus") == 9
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
