"""The generated gRPC code matches protos/ and is importable from the package."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "orthrus_runtime" / "proto"

# Lines that only record which protoc/grpcio-tools release wrote the file. They
# differ between tool releases but not between .proto contents, so a newer
# grpcio-tools in CI must not make the committed code look stale.
_VERSION_STAMPS = [
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
]


def _normalized(text: str) -> str:
    for pat in _VERSION_STAMPS:
        text = pat.sub("<version stamp>", text)
    return text


def _load_generator():
    spec = importlib.util.spec_from_file_location("orthrus_protos_generate", REPO / "protos" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    written = _load_generator().generate(tmp_path)
    names = sorted(p.name for p in written)
    committed = sorted(p.name for p in GENERATED.iterdir() if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name)
    assert names == committed, f"generated {names}, committed {committed}: run `python protos/generate.py`"
    for p in written:
        fresh = _normalized(p.read_text())
        old = _normalized((GENERATED / p.name).read_text())
        assert fresh == old, f"orthrus_runtime/proto/{p.name} is stale against protos/: run `python protos/generate.py`"


def test_generated_imports_are_package_relative():
    grpc_code = (GENERATED / "orthrus_pb2_grpc.py").read_text()
    assert "from . import orthrus_pb2" in grpc_code
    assert "from orthrus.v1" not in grpc_code


def test_relativize_leaves_foreign_imports_alone():
    gen = _load_generator()
    src = (
        "from orthrus.v1 import orthrus_pb2 as orthrus_dot_v1_dot_orthrus__pb2\n"
        "from google.protobuf import empty_pb2 as google_dot_protobuf_dot_empty__pb2\n"
    )
    out = gen._relativize(src, {"orthrus_pb2", "empty_pb2"})
    assert "from . import orthrus_pb2 as orthrus_dot_v1_dot_orthrus__pb2" in out
    assert "from google.protobuf import empty_pb2" in out


def test_service_shape():
    from orthrus_runtime.proto import orthrus_pb2 as pb
    from orthrus_runtime.proto import orthrus_pb2_grpc as pb_grpc

    service = pb.DESCRIPTOR.services_by_name["Orthrus"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Complete", "ModelInfo", "Health"}
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert not methods["Complete"].server_streaming
    assert methods["Generate"].input_type is methods["Complete"].input_type
    assert service.full_name == "orthrus.v1.Orthrus"
    assert callable(pb_grpc.add_OrthrusServicer_to_server)

    req = pb.GenerateRequest(prompt="hi", stop=["\n"], mode=pb.MODE_AR, temperature=0.0)
    # proto3 `optional`: an explicit 0.0 (greedy) is distinguishable from unset.
    assert req.HasField("temperature") and not req.HasField("top_p")
    assert pb.GenerateRequest.FromString(req.SerializeToString()) == req


def test_messages_pickle_under_their_package_module():
    # Ray Serve pickles request messages to ship them from the gRPC proxy to a
    # replica: the classes must be importable under the name they report.
    import pickle

    from orthrus_runtime.proto import orthrus_pb2 as pb

    assert pb.GenerateRequest.__module__ == "orthrus_runtime.proto.orthrus_pb2"
    req = pb.GenerateRequest(prompt="x", max_tokens=3)
    assert pickle.loads(pickle.dumps(req)) == req


# ------------------------------------------------------------------ log-probabilities, n, echo
# (issue 19): the request mapping, the response mapping, and the client's side of both.

import argparse  # noqa: E402
import math  # noqa: E402

import grpc  # noqa: E402

from deployment import grpc_protocol as gp  # noqa: E402
from deployment.errors import ApiError  # noqa: E402
from orthrus_runtime import client as client_mod  # noqa: E402
from orthrus_runtime import validation  # noqa: E402
from orthrus_runtime.proto import orthrus_pb2 as pb  # noqa: E402
from orthrus_runtime.types import GenerateDelta, InvalidRequestError, SamplingParams, TokenLogprob, Usage  # noqa: E402


def test_request_maps_logprobs_n_and_echo():
    msg = pb.GenerateRequest(prompt="hi", max_tokens=4, logprobs=5, prompt_logprobs=0, n=3, echo=True)
    req, choices = gp.parse_request(msg)
    assert (req.params.logprobs, req.params.prompt_logprobs) == (5, 0)  # 0 alternatives is not "none"
    assert choices == gp.Choices(n=3, echo=True)
    assert gp.to_generate_request(msg).params.logprobs == 5
    # Unset: no log-probabilities, one choice, no echo.
    req, choices = gp.parse_request(pb.GenerateRequest(prompt="hi"), default_max_tokens=7)
    assert req.params.logprobs is None and req.params.prompt_logprobs is None
    assert choices == gp.Choices(n=1, echo=False)
    # echo leaves max_tokens as set: unset is the default, not 0.
    req, choices = gp.parse_request(pb.GenerateRequest(prompt="hi", echo=True), default_max_tokens=7)
    assert choices.echo and req.params.max_tokens == 7 and req.params.max_tokens_defaulted


@pytest.mark.parametrize("field,value", [("logprobs", 21), ("logprobs", -1), ("prompt_logprobs", 21),
                                         ("prompt_logprobs", -1), ("n", 0), ("n", 17), ("n", -3)])
def test_out_of_range_logprobs_and_n_are_invalid_argument(field, value):
    msg = pb.GenerateRequest(prompt="hi", max_tokens=4)
    setattr(msg, field, value)
    with pytest.raises(ApiError) as g:
        gp.parse_request(msg)
    assert g.value.status == 400 and g.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert g.value.param == field
    # The shared rule refuses the same value with the same words.
    with pytest.raises(InvalidRequestError) as e:
        if field == "n":
            validation.check_choices(value)
        else:
            validation.check_sampling(SamplingParams(max_tokens=4, **{field: value}))
    assert e.value.param == field and str(e.value) == g.value.message
    with pytest.raises(ApiError):  # the n = 1 entry point refuses it too
        gp.to_generate_request(msg)


def test_max_tokens_zero_scores_a_prompt_only_with_prompt_logprobs():
    req, choices = gp.parse_request(pb.GenerateRequest(prompt="hi", max_tokens=0, prompt_logprobs=2, echo=True))
    assert req.params.max_tokens == 0 and not req.params.max_tokens_defaulted and choices.echo
    for msg in (pb.GenerateRequest(prompt="hi", max_tokens=0, echo=True),
                pb.GenerateRequest(prompt="hi", max_tokens=0, logprobs=2)):
        with pytest.raises(ApiError) as e:
            gp.parse_request(msg)
        assert e.value.param == "max_tokens"


def _tl(token_id, logprob, token, top=()):
    return TokenLogprob(token_id, logprob, token, [TokenLogprob(i, lp, t) for i, lp, t in top])


def test_delta_maps_logprobs_prompt_logprobs_and_index():
    d = GenerateDelta("r", token_ids=[7, 8], text="ab",
                      logprobs=[_tl(7, -0.25, "a", [(7, -0.25, "a"), (9, -1.5, "c")]), _tl(8, 0.0, "b")],
                      prompt_logprobs=[None, _tl(3, -4.0, "x", [(5, -2.0, "y")])])
    r = gp.delta_to_response(d, 2, echo_text="PROMPT ")
    assert r.index == 2 and r.text == "PROMPT ab" and list(r.token_ids) == [7, 8]
    assert [(t.token_id, t.token, t.logprob) for t in r.logprobs] == [(7, "a", -0.25), (8, "b", 0.0)]
    assert r.logprobs[1].HasField("logprob")  # a log-probability of 0 is set, not missing
    assert [(a.token_id, a.token, a.logprob) for a in r.logprobs[0].top] == [(7, "a", -0.25), (9, "c", -1.5)]
    assert not r.logprobs[1].top
    first, second = r.prompt_logprobs
    assert not first.HasField("logprob") and first.token_id == 0 and not first.top  # nothing predicts it
    assert second.HasField("logprob") and (second.token_id, second.logprob) == (3, -4.0)
    assert [(a.token_id, a.logprob) for a in second.top] == [(5, -2.0)]
    # Through the wire unchanged, unset logprob included.
    again = pb.GenerateResponse.FromString(r.SerializeToString())
    assert again == r and not again.prompt_logprobs[0].HasField("logprob")
    # A delta without them: empty lists, choice 0, the text as it is.
    plain = gp.delta_to_response(GenerateDelta("r", token_ids=[1], text="a"))
    assert plain.index == 0 and plain.text == "a" and not plain.logprobs and not plain.prompt_logprobs


def test_final_response_takes_a_whole_choice():
    last = GenerateDelta("r", token_ids=[8], text="b", finished=True, finish_reason="length", usage=Usage(2, 2),
                         logprobs=[_tl(8, -1.0, "b")])
    merged = [_tl(7, -0.5, "a"), _tl(8, -1.0, "b")]
    prompt = [None, _tl(3, -4.0, "x")]
    r = gp.final_response("req-1", "ab", [7, 8], last, index=1, echo_text="x y ", logprobs=merged,
                          prompt_logprobs=prompt)
    assert r.request_id == "req-1" and r.index == 1 and r.text == "x y ab" and list(r.token_ids) == [7, 8]
    assert [t.logprob for t in r.logprobs] == [-0.5, -1.0]  # the merged list, not the last delta's too
    assert [t.HasField("logprob") for t in r.prompt_logprobs] == [False, True]
    assert r.finished and r.finish_reason == pb.FINISH_REASON_LENGTH and r.usage.total_tokens == 4
    # The old call keeps working: choice 0, no echo, no log-probabilities.
    old = gp.final_response("req-1", "ab", [7, 8], last)
    assert old.index == 0 and old.text == "ab" and not old.logprobs


def test_complete_response_lists_choices_only_when_several():
    last = GenerateDelta("r", finished=True, finish_reason="stop")
    a = gp.final_response("r", "zero", [1], last, index=0)
    b = gp.final_response("r", "one", [2], last, index=1)
    assert gp.complete_response([a]) == a and not gp.complete_response([a]).choices
    both = gp.complete_response([a, b])
    assert both.text == "zero" and both.index == 0  # choice 0 at the top, for n = 1 readers
    assert [(c.index, c.text) for c in both.choices] == [(0, "zero"), (1, "one")]
    with pytest.raises(ValueError):
        gp.complete_response([])


def test_client_builds_the_new_fields():
    req = client_mod.build_request("hi", logprobs=0, prompt_logprobs=3, n=2, echo=True, max_tokens=0)
    assert req.HasField("logprobs") and req.logprobs == 0 and req.prompt_logprobs == 3
    assert req.n == 2 and req.echo and req.HasField("max_tokens") and req.max_tokens == 0
    plain = client_mod.build_request("hi")
    assert not plain.HasField("logprobs") and not plain.HasField("prompt_logprobs") and not plain.HasField("n")
    assert not plain.echo
    # What the client sends is what the router reads.
    parsed, choices = gp.parse_request(req)
    assert (parsed.params.logprobs, parsed.params.prompt_logprobs, parsed.params.max_tokens) == (0, 3, 0)
    assert choices == gp.Choices(n=2, echo=True)


def _resp(index, text, ids=(), lps=(), plps=None, finished=False):
    r = pb.GenerateResponse(request_id="r", index=index, text=text, token_ids=list(ids), finished=finished)
    for tid, tok, lp in lps:
        r.logprobs.add(token_id=tid, token=tok, logprob=lp)
    for p in plps or ():
        r.prompt_logprobs.append(p)
    if finished:
        r.finish_reason = pb.FINISH_REASON_STOP
    return r


def test_collect_gathers_interleaved_choices_and_complete_answers():
    stream = [_resp(1, "B", [2], [(2, "B", -0.5)]), _resp(0, "a", [1], [(1, "a", -0.1)],
                                                           plps=[pb.TokenLogprob(token_id=0)]),
              _resp(0, "b", [3], [(3, "b", -0.2)], finished=True), _resp(1, "", finished=True)]
    c0, c1 = client_mod.collect(stream)
    assert (c0.index, c0.text, c0.token_ids, [t.logprob for t in c0.logprobs]) == (0, "ab", [1, 3], [-0.1, -0.2])
    assert len(c0.prompt_logprobs) == 1 and not c1.prompt_logprobs
    assert (c1.index, c1.text, c1.final.finished) == (1, "B", True) and c0.final is stream[2]
    answer = gp.complete_response([_resp(0, "x", finished=True), _resp(1, "y", finished=True)])
    assert [(c.index, c.text) for c in client_mod.collect([answer])] == [(0, "x"), (1, "y")]
    assert [c.text for c in client_mod.collect([_resp(0, "solo", finished=True)])] == ["solo"]


def _choice():
    c = client_mod.Choice(0)
    c.add(_resp(0, "", plps=[pb.TokenLogprob(token_id=0), pb.TokenLogprob(
        token_id=5, token="Hi", logprob=-3.25, top=[pb.TopLogprob(token_id=6, token="Hello", logprob=-1.0)])]))
    r = _resp(0, " there\n", [4, 9], [(4, " there", -0.125), (9, "\n", -math.inf)])
    r.logprobs[0].top.add(token_id=4, token=" there", logprob=-0.125)
    r.logprobs[0].top.add(token_id=8, token=" a very long token indeed", logprob=-2.5)
    c.add(r)
    return c


def test_format_logprobs_table():
    assert client_mod.format_logprobs(_choice(), 2) == "\n".join([
        "log-probabilities:",
        "     #  token      logprob  alternatives",
        "    p0  ''               -",
        "    p1  'Hi'        -3.250  'Hello' -1.000",
        "     0  ' there'    -0.125  ' there' -0.125  ' a very long... -2.500",
        "     1  '\\n'          -inf",
    ])
    # K = 0: log-probabilities only; a labelled choice says which.
    table = client_mod.format_logprobs(_choice(), 0, labelled=True)
    assert table.splitlines()[:2] == ["log-probabilities of choice 0:", "     #  token      logprob"]
    assert "Hello" not in table and "-0.125" in table
    assert client_mod.format_logprobs(client_mod.Choice(3), 1) == "log-probabilities: none"


def test_format_choices_labels_each_text():
    a, b = client_mod.Choice(0, text="one"), client_mod.Choice(1, text="two\n")
    assert client_mod.format_choices([a, b]) == "[choice 0]\none\n[choice 1]\ntwo\n\n"


class _FakeClient:
    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def generate(self, prompt=None, **kwargs):
        _FakeClient.calls.append((prompt, kwargs))
        return iter(_FakeClient.stream)


def _cli(monkeypatch, capsys, argv, stream):
    monkeypatch.setattr(client_mod, "OrthrusClient", _FakeClient)
    _FakeClient.calls, _FakeClient.stream = [], stream
    parser = argparse.ArgumentParser()
    client_mod.add_arguments(parser)
    rc = client_mod.run(parser.parse_args(["--prompt", "Hi", *argv]))
    out = capsys.readouterr()
    return rc, out.out, out.err, _FakeClient.calls[0]


def test_client_cli_n_echo_and_logprobs(monkeypatch, capsys):
    stream = [_resp(1, "Hi B", [2], [(2, "B", -0.5)]), _resp(0, "Hi a", [1], [(1, "a", -0.1)]),
              _resp(0, "", finished=True), _resp(1, "", finished=True)]
    rc, out, err, (prompt, kw) = _cli(monkeypatch, capsys, ["--n", "2", "--echo", "--logprobs", "1"], stream)
    assert rc == 0 and prompt == "Hi"
    assert (kw["n"], kw["echo"], kw["logprobs"], kw["prompt_logprobs"]) == (2, True, 1, 1)  # echo: the prompt's too
    assert out == "[choice 0]\nHi a\n[choice 1]\nHi B\n"
    assert err.index("log-probabilities of choice 0:") < err.index("choice 0: [stop]") \
        < err.index("log-probabilities of choice 1:") < err.index("choice 1: [stop]")
    assert "'a'" in err and "-0.100" in err


def test_client_cli_one_choice_streams_as_before(monkeypatch, capsys):
    stream = [_resp(0, "hello", [1]), _resp(0, " world", [2], finished=True)]
    rc, out, err, (_, kw) = _cli(monkeypatch, capsys, [], stream)
    assert rc == 0 and out == "hello world\n" and "log-probabilities" not in err
    assert err.startswith("[stop]")  # unlabelled
    assert kw["n"] is None and kw["logprobs"] is None and kw["prompt_logprobs"] is None and not kw["echo"]
    rc, out, err, (_, kw) = _cli(monkeypatch, capsys, ["--logprobs", "0"], stream)
    assert kw["prompt_logprobs"] is None and "log-probabilities:" in err  # no --echo: output tokens only
