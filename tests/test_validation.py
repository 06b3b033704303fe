"""The one request validation (orthrus_runtime.validation), through both protocols' parsers:
the same rules and the same messages for HTTP, gRPC and the engine."""
from __future__ import annotations

import pytest

from deployment import grpc_protocol, openai_protocol as oa
from deployment.errors import ApiError
from deployment.grpc_service import MalformedMessage, _parser
from orthrus_runtime import validation as v
from orthrus_runtime.proto import orthrus_pb2 as pb
from orthrus_runtime.types import GenerateRequest, InvalidRequestError, SamplingParams

# (field, value, param): each refused on every path.
BAD = [
    ("top_k", 9223372036854775808, "top_k"),
    ("top_k", 10**30, "top_k"),
    ("top_k", -2, "top_k"),
    ("max_tokens", 2**70, "max_tokens"),
    ("max_tokens", 2**31, "max_tokens"),
    ("max_tokens", 0, "max_tokens"),
    ("temperature", 2.5, "temperature"),
    ("temperature", 1e300, "temperature"),
    ("temperature", -0.1, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("seed", 2**64, "seed"),
    ("seed", -(2**63) - 1, "seed"),
]


def _http(field, value):
    return oa.parse_completion({"prompt": "hi", "max_tokens": 4, field: value}, "m")


def _grpc(field, value):
    msg = pb.GenerateRequest(prompt="hi", max_tokens=4)
    setattr(msg, field, value)
    return grpc_protocol.to_generate_request(msg)


def _engine(field, value):
    p = SamplingParams(max_tokens=4)
    setattr(p, field, value)
    v.check_request(GenerateRequest(prompt="hi", params=p))


@pytest.mark.parametrize("field,value,param", BAD)
def test_same_rules_and_messages_on_every_path(field, value, param):
    with pytest.raises(ApiError) as h:
        _http(field, value)
    with pytest.raises(InvalidRequestError) as e:
        _engine(field, value)
    assert h.value.status == 400 and h.value.param == param == e.value.param
    assert h.value.message == str(e.value)
    try:
        with pytest.raises(ApiError) as g:
            _grpc(field, value)
    except (ValueError, TypeError):  # the proto field cannot even hold the value (int64/uint64)
        return
    assert g.value.grpc_code.name == "INVALID_ARGUMENT" and g.value.message == h.value.message


def test_temperature_floor_is_greedy_on_every_path():
    for t in (1e-38, 1e-6, 0.0):
        req, _ = _http("temperature", t)
        assert req.params.temperature == 0.0 and req.params.greedy
        assert _grpc("temperature", t).params.temperature == 0.0
    assert _http("temperature", 1e-4)[0].params.temperature == 1e-4  # above the floor: kept


def test_lone_surrogates_and_roles():
    with pytest.raises(ApiError) as e:
        oa.parse_completion({"prompt": "a\ud800b"}, "m")
    assert e.value.param == "prompt" and "surrogate" in e.value.message
    with pytest.raises(ApiError) as e:
        oa.parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "m", 8)
    assert e.value.param == "messages"
    # Roles: the same four on both protocols, developer meaning system.
    req, _ = oa.parse_chat({"messages": [{"role": "developer", "content": "a"}]}, "m", 8)
    g = grpc_protocol.to_generate_request(pb.GenerateRequest(messages=[pb.ChatMessage(role="developer",
                                                                                      content="a")]))
    assert req.messages == g.messages == [{"role": "system", "content": "a"}]
    with pytest.raises(ApiError) as h:
        oa.parse_chat({"messages": [{"role": "wizard", "content": "a"}]}, "m", 8)
    with pytest.raises(ApiError) as g:
        grpc_protocol.to_generate_request(pb.GenerateRequest(messages=[pb.ChatMessage(role="wizard", content="a")]))
    assert h.value.message == g.value.message


def test_engine_limits():
    lim = v.ModelLimits(vocab_size=100, max_model_len=50)
    for req, param in [
        (GenerateRequest(prompt_token_ids=[1, 100]), "prompt_token_ids"),
        (GenerateRequest(prompt_token_ids=[1] * 50), "prompt_token_ids"),
        (GenerateRequest(prompt="x" * (50 * v.MAX_CHARS_PER_TOKEN + 1), params=SamplingParams(max_tokens=2)),
         "prompt"),
        (GenerateRequest(prompt="hi", params=SamplingParams(max_tokens=50)), "max_tokens"),
        (GenerateRequest(prompt="hi", params=SamplingParams(max_tokens=2, stop_token_ids=[100])), "stop_token_ids"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            v.check_request(req, lim)
        assert e.value.param == param, req
    v.check_request(GenerateRequest(prompt_token_ids=[1, 99], params=SamplingParams(max_tokens=48)), lim)


def test_json_limits():
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a": ' + b"9" * 5000 + b"}",
                b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}"):
        with pytest.raises(ApiError) as e:
            oa.parse_json_body(raw)
        assert e.value.status == 400 and e.value.code == "invalid_json"
    # Brackets inside strings do not count; 32 levels are fine.
    assert oa.parse_json_body(b'{"p": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[["}')["p"].startswith("[[")
    assert oa.parse_json_body(b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}")


def test_malformed_grpc_bytes_become_a_value():
    parse = _parser(pb.GenerateRequest)
    assert parse(pb.GenerateRequest(prompt="hi").SerializeToString()).prompt == "hi"
    for raw in (b"\x0a\x03a\xffb", b"\x0a\xff\xff\xff\x7fhi", b"\xff\xff\xff\xff"):
        m = parse(raw)
        assert isinstance(m, MalformedMessage) and m.message_type == "orthrus.v1.GenerateRequest"
