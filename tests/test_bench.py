"""`orthrus bench`: prompt loading, report arithmetic, the chart, and runs against the real app."""
from __future__ import annotations

import argparse
import json
import struct

import pytest

from orthrus_runtime import bench
from orthrus_runtime.bench import BenchError, RequestResult, load_prompts, summarize


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
