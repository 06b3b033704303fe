"""`orthrus bench`: prompt loading, report arithmetic, the chart, and runs against the real app."""
from __future__ import annotations

import argparse
import json
import struct

import pytest

from orthrus_runtime.tools import bench
from orthrus_runtime.tools.bench import BenchError, RequestResult, load_prompts, summarize


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- without a server


def test_builtin_sets_load_and_repeat():
    assert {"chat", "code"} <= set(bench.builtin_sets())
    chat = load_prompts(None, "chat", 100, seed=1)
    assert len(chat) == 100 and all(it.messages for it in chat)
    assert len({it.messages[0]["content"] for it in chat}) == 40  # every prompt, then repeats
    assert [it.messages for it in load_prompts(None, "chat", 10, seed=1)] == [it.messages for it in chat[:10]]
    assert [it.messages for it in load_prompts(None, "chat", 10, seed=2)] != [it.messages for it in chat[:10]]
    with pytest.raises(BenchError, match="unknown built-in prompt set 'nope'; available: chat, code"):
        load_prompts(None, "nope", 1, 0)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": ""}', "'prompt' must be a non-empty string"),
    ('{"prompt": "a", "messages": []}', "exactly one of"),
    ('{}', "exactly one of"),
    ('{"messages": [{"role": "user"}]}', "'messages' must be a non-empty list"),
    ('{"prompt": "a", "max_tokens": 0}', "'max_tokens' must be a positive integer"),
    ('[1, 2]', "must be a JSON object"),
    ('{"prompt": "a"', "not valid JSON"),
])
def test_prompt_file_errors_name_the_line(tmp_path, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(BenchError, match=message) as e:
        load_prompts(str(f), "chat", 1, 0)
    assert f"{f}:3:" in str(e.value)


def test_prompt_file_values(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "one", "max_tokens": 5}\n{"messages": [{"role": "user", "content": "two"}]}\n')
    items = load_prompts(str(f), "chat", 2, 0)
    assert sorted((it.as_text(), it.max_tokens) for it in items) == [("one", 5), ("two", None)]
    with pytest.raises(BenchError, match="cannot read prompt file"):
        load_prompts(str(tmp_path / "missing.jsonl"), "chat", 1, 0)


def _result(i, ttft, latency, tokens, itl, stats=None, ok=True, code=None):
    return RequestResult(index=i, ok=ok, error_code=code, start_s=0.1 * i, ttft_s=ttft, latency_s=latency,
                         itl_s=itl, prompt_tokens=10, completion_tokens=tokens, finish_reason="length" if ok else None,
                         stats=stats)


def test_summary_arithmetic():
    results = [
        _result(0, 0.1, 1.1, 11, [0.5, 0.5], {"num_cycles": 4, "num_draft_tokens": 12, "num_accepted_tokens": 6,
                                              "accepted_per_position": [3, 2, 1]}),
        _result(1, 0.3, 2.3, 5, [1.0, 1.0], {"num_cycles": 2, "num_draft_tokens": 6, "num_accepted_tokens": 2,
                                            "accepted_per_position": [2]}),
        _result(2, None, None, 0, [], ok=False, code="400"),
    ]
    s = summarize(results, duration_s=4.0)
    assert (s["sent"], s["completed"], s["failed"], s["errors"]) == (3, 2, 1, {"400": 1})
    assert s["total_output_tokens"] == 16 and s["total_input_tokens"] == 20
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["output_throughput"] == pytest.approx(4.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    # TPOT: (1.1 - 0.1) / 10 and (2.3 - 0.3) / 4.
    assert s["tpot_ms"]["mean"] == pytest.approx((100.0 + 500.0) / 2)
    assert s["itl_ms"]["mean"] == pytest.approx(750.0)
    assert s["itl_ms"]["p99"] == pytest.approx(1000.0)
    acc = s["acceptance"]
    assert acc["accepted_per_position"] == [5, 2, 1]
    assert acc["mean_acceptance_length"] == pytest.approx((8 + 6) / 6)
    assert acc["acceptance_rate"] == pytest.approx(8 / 18)
    assert s["finish_reasons"] == {"length": 2}


def test_chart_is_a_png(tmp_path):
    results = [_result(0, 0.1, 1.1, 11, [0.5, 0.5], {"num_cycles": 4, "num_draft_tokens": 12,
                                                     "num_accepted_tokens": 6, "accepted_per_position": [3, 2, 1]})]
    path = tmp_path / "c.png"
    bench.write_png(results, summarize(results, 2.0), "test", path)
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (1200, 800)


def test_arguments():
    a = parse([])
    assert a.protocol == "http" and a.concurrency is None and a.request_rate is None
    assert parse(["-r", "inf"]).request_rate == float("inf")
    with pytest.raises(SystemExit):
        parse(["-r", "0"])
    with pytest.raises(SystemExit):
        parse(["-c", "0"])
    with pytest.raises(SystemExit):
        parse(["--prompts", "x.jsonl", "--dataset", "code"])


# --------------------------------------------------------------------------- against the running application


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from obs_app import running_app

    with running_app(tmp_path_factory.mktemp("bench-app")) as a:
        yield a


def scrape_sum(app, sample: str, **labels) -> float:
    """Sum of a sample over every replica's /metrics endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for port in app.metrics_ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue  # nobody on this port
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
    return total


def run_bench(tmp_path, *argv):
    import subprocess
    import sys

    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "orthrus_runtime.tools.cli", "bench", *argv,
         "--output-json", str(out_json), "--output-png", str(out_png)],
        capture_output=True, text=True, timeout=300)
    report = json.loads(out_json.read_text()) if out_json.exists() else None
    return proc, report, out_png


def check_consistent(report: dict, n: int) -> None:
    s, reqs = report["summary"], report["requests"]
    assert len(reqs) == n == s["sent"]
    assert s["completed"] + s["failed"] == s["sent"]
    ok = [r for r in reqs if r["ok"]]
    assert s["completed"] == len(ok)
    assert s["total_output_tokens"] == sum(r["completion_tokens"] for r in ok)
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in ok)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(s["completed"] / s["duration_s"])
    for r in ok:
        assert 0 < r["ttft_s"] <= r["latency_s"] <= s["duration_s"] + 1e-6
        assert r["completion_tokens"] >= 1
        assert sum(r["itl_s"]) <= r["latency_s"] - r["ttft_s"] + 1e-6
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        d = s[key]
        if d["mean"] is None:  # e.g. ITL when every stream came in one increment
            assert all(v is None for v in d.values()), key
            continue
        assert d["p50"] <= d["p90"] <= d["p99"], key
    if s["completed"]:
        assert s["ttft_ms"]["mean"] is not None and s["e2el_ms"]["mean"] is not None
    acc = s["acceptance"]
    assert acc["num_cycles"] == sum(r["stats"]["num_cycles"] for r in ok)
    assert acc["num_accepted_tokens"] == sum(r["stats"]["num_accepted_tokens"] for r in ok)
    # Every token after a request's first comes from a decode cycle.
    assert acc["num_accepted_tokens"] + acc["num_cycles"] >= s["total_output_tokens"] - s["completed"]


def test_http_fixed_concurrency_matches_server_metrics(app, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ["The quick brown fox", "Orthrus drafts a block", "def add(a, b):"]) + "\n")
    before = scrape_sum(app, "orthrus_generation_tokens_total")
    proc, report, png = run_bench(tmp_path, "--url", app.http_url, "--prompts", str(prompts), "-n", "10",
                                  "-c", "4", "--max-tokens", "24", "--mode", "orthrus")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_consistent(report, 10)
    s = report["summary"]
    assert s["completed"] == 10 and s["failed"] == 0
    assert report["config"]["model"] == app.model_id and report["config"]["concurrency"] == 4
    # The server counted the same tokens the client received.
    assert scrape_sum(app, "orthrus_generation_tokens_total") - before == s["total_output_tokens"]
    acc = s["acceptance"]
    assert acc["mean_acceptance_length"] >= 1.0 and 0 <= acc["acceptance_rate"] <= 1
    assert "mean length" in proc.stdout and "output tok/s" in proc.stdout
    assert "bench http" in proc.stderr  # the progress bar
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpc_request_rate_builtin_chat_ar_mode(app, tmp_path):
    proc, report, _ = run_bench(tmp_path, "--protocol", "grpc", "--grpc-target", app.grpc_target,
                                "--dataset", "chat", "-n", "6", "-r", "20", "--max-tokens", "12",
                                "--mode", "ar", "--temperature", "0.7", "--seed-requests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_consistent(report, 6)
    s = report["summary"]
    assert s["completed"] == 6
    # ar mode: one token per cycle, nothing drafted.
    assert s["acceptance"]["mean_acceptance_length"] == 1.0
    assert s["acceptance"]["num_draft_tokens"] == 0 and s["acceptance"]["acceptance_rate"] is None
    assert report["config"]["request_rate"] == 20


def test_refused_requests_are_counted_not_fatal(app, tmp_path):
    prompts = tmp_path / "p.jsonl"
    # The second asks for more tokens than max_model_len allows: the server answers 400.
    prompts.write_text(json.dumps({"prompt": "fine", "max_tokens": 8}) + "\n"
                       + json.dumps({"prompt": "too long", "max_tokens": 100000}) + "\n")
    proc, report, _ = run_bench(tmp_path, "--url", app.http_url, "--prompts", str(prompts), "-n", "4", "-c", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    check_consistent(report, 4)
    s = report["summary"]
    assert (s["completed"], s["failed"], s["errors"]) == (2, 2, {"400": 2})
    bad = [r for r in report["requests"] if not r["ok"]]
    assert all("max_model_len" in r["error"] for r in bad)


def test_unreachable_server_is_a_clear_error(tmp_path):
    from obs_app import free_port

    proc, report, _ = run_bench(tmp_path, "--url", f"http://127.0.0.1:{free_port()}", "-n", "1")
    assert proc.returncode == 2 and report is None
    assert "orthrus bench: error: cannot reach" in proc.stderr
