"""Conversions between the orthrus.v1 protobuf messages and the engine's data classes."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

from orthrus_runtime.defaults import DEFAULT_MAX_TOKENS
from orthrus_runtime.proto import orthrus_pb2 as pb
from orthrus_runtime.types import (
    AcceptanceStats,
    GenerateDelta,
    GenerateRequest,
    ModelInfo,
    InvalidRequestError,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from orthrus_runtime.validation import check_choices

from .errors import checked, invalid

_MODES = {pb.MODE_ORTHRUS: "orthrus", pb.MODE_AR: "ar"}
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


@dataclass(frozen=True)
class Choices:
    """What a request asks beyond one engine request: n choices (the router runs n engine
    requests, choice i seeded with validation.derive_seed(seed, i)), and echo (the prompt's
    text, and with prompt_logprobs its log-probabilities, first in every choice's output)."""

    n: int = 1
    echo: bool = False


def parse_request(msg: pb.GenerateRequest,
                  default_max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[GenerateRequest, Choices]:
    """Validate the message and build the engine request (one choice's: the request's seed)
    and its Choices; ApiError 400 (INVALID_ARGUMENT) naming the field when malformed."""
    inputs = [name for name, present in (
        ("prompt", msg.HasField("prompt")),
        ("messages", len(msg.messages) > 0),
        ("prompt_token_ids", len(msg.prompt_token_ids) > 0),
    ) if present]
    if len(inputs) != 1:
        raise invalid(
            "exactly one of prompt, messages, prompt_token_ids must be set"
            + (f" (got {', '.join(inputs)})" if inputs else ""),
            param="prompt",
        )
    if msg.mode not in (pb.MODE_UNSPECIFIED, *_MODES):
        raise invalid(f"unknown mode {msg.mode}", param="mode")

    params = SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
        max_tokens_defaulted=not msg.HasField("max_tokens"),
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_k=msg.top_k if msg.HasField("top_k") else -1,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
    )
    req = GenerateRequest(params=params, request_id=msg.request_id or f"grpc-{uuid.uuid4().hex}")
    if msg.HasField("prompt"):
        req.prompt = msg.prompt
    elif msg.messages:
        req.messages = [{"role": m.role, "content": m.content} for m in msg.messages]
    else:
        req.prompt_token_ids = list(msg.prompt_token_ids)
    if msg.mode in _MODES:
        req.mode = _MODES[msg.mode]
    checked(req)  # the same rules and messages as over HTTP
    try:
        n = check_choices(msg.n if msg.HasField("n") else 1)
    except InvalidRequestError as e:
        raise invalid(str(e), param=e.param) from None
    return req, Choices(n=n, echo=msg.echo)


def to_generate_request(msg: pb.GenerateRequest, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerateRequest:
    """parse_request's engine request alone, for a caller that serves one choice without echo
    (n and echo are still validated, and ignored)."""
    return parse_request(msg, default_max_tokens)[0]


def _usage(u: Optional[Usage]) -> pb.Usage:
    u = u or Usage()
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


def _stats(s: Optional[AcceptanceStats]) -> pb.AcceptanceStats:
    s = s or AcceptanceStats()
    return pb.AcceptanceStats(
        num_cycles=s.num_cycles,
        num_draft_tokens=s.num_draft_tokens,
        num_accepted_tokens=s.num_accepted_tokens,
        accepted_per_position=s.accepted_per_position,
        mean_accepted_length=s.mean_accepted_length,
        acceptance_rate=s.acceptance_rate,
    )


def _token_logprob(t: Optional[TokenLogprob]) -> pb.TokenLogprob:
    """None (the first prompt token, which nothing predicts) -> a TokenLogprob with logprob unset."""
    if t is None:
        return pb.TokenLogprob()
    m = pb.TokenLogprob(token_id=t.token_id, token=t.token,
                        top=[pb.TopLogprob(token_id=a.token_id, token=a.token, logprob=a.logprob) for a in t.top])
    if t.logprob is not None:
        m.logprob = t.logprob
    return m


def delta_to_response(d: GenerateDelta, index: int = 0, *, echo_text: str = "") -> pb.GenerateResponse:
    """One stream message of choice `index`; echo_text goes before the delta's text (a choice's
    first message, with echo). Logprobs and prompt logprobs are copied when the delta has them."""
    r = pb.GenerateResponse(request_id=d.request_id, text=echo_text + d.text, token_ids=d.token_ids, index=index)
    if d.logprobs:
        r.logprobs.extend(_token_logprob(t) for t in d.logprobs)
    if d.prompt_logprobs:
        r.prompt_logprobs.extend(_token_logprob(t) for t in d.prompt_logprobs)
    if d.finished:
        r.finished = True
        r.finish_reason = FINISH_REASONS.get(d.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED)
        r.usage.CopyFrom(_usage(d.usage))
        r.stats.CopyFrom(_stats(d.stats))
        r.queue_time_s = d.queue_time_s or 0.0
    return r


def final_response(
    request_id: str,
    text: str,
    token_ids: list[int],
    last: GenerateDelta,
    *,
    index: int = 0,
    echo_text: str = "",
    logprobs: Optional[Sequence[TokenLogprob]] = None,
    prompt_logprobs: Optional[Sequence[Optional[TokenLogprob]]] = None,
) -> pb.GenerateResponse:
    """One choice's Complete answer: its whole output (after echo_text, with echo) plus the
    last delta's accounting. logprobs / prompt_logprobs: the choice's, merged over all its
    deltas (the last delta's own are not used)."""
    r = delta_to_response(last, index)
    r.request_id = request_id
    r.text = echo_text + text
    del r.token_ids[:]
    r.token_ids.extend(token_ids)
    del r.logprobs[:]
    r.logprobs.extend(_token_logprob(t) for t in logprobs or ())
    del r.prompt_logprobs[:]
    r.prompt_logprobs.extend(_token_logprob(t) for t in prompt_logprobs or ())
    return r


def complete_response(answers: Sequence[pb.GenerateResponse]) -> pb.GenerateResponse:
    """The Complete answer of a request with n choices, from final_response's per choice (in
    index order): choice 0's fields, and with n > 1 every choice in `choices`."""
    if not answers:
        raise ValueError("a Complete answer needs at least one choice")
    r = pb.GenerateResponse()
    r.CopyFrom(answers[0])
    if len(answers) > 1:
        r.choices.extend(answers)
    return r


def model_info_response(info: ModelInfo, served_model_id: str) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(
        model_id=served_model_id,
        architecture=info.architecture,
        block_size=info.block_size,
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        modes=list(info.modes),
        mask_token_id=info.mask_token_id,
        eos_token_ids=list(info.eos_token_ids),
    )
